# DEparrow hub image, built FROM a local Debian base (tools/containers/build-base.sh:
# debootstrap + podman import, no registry needed). Build it with tools/containers/build.sh
# hub, which makes the base and a clean build context (the repository's files, no venvs).
#   podman build -f tools/containers/hub.Dockerfile -t deparrow/hub CONTEXT
ARG BASE=localhost/deparrow/debian-base:bookworm

# Stage 1: wheels for the project and its dependencies. pywasm3 has no binary wheels, so it
# is compiled here, with a compiler the final image does not carry.
FROM ${BASE} AS wheels
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      gcc libc6-dev python3-dev >/dev/null \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/build
COPY pyproject.toml README.md /src/
# Dependencies first: this layer is rebuilt only when pyproject.toml changes. The build
# host's CA bundle (a build secret, see build.sh) is used when given: networks that inspect
# TLS need it to reach PyPI; it never lands in a layer.
RUN --mount=type=secret,id=cacert \
    if [ -s /run/secrets/cacert ]; then export PIP_CERT=/run/secrets/cacert; fi \
 && /opt/build/bin/pip install -q --no-cache-dir wheel \
 && /opt/build/bin/python -c "import tomllib; \
print('\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /src/requirements.txt \
 && /opt/build/bin/pip wheel -q --no-cache-dir -w /wheels -r /src/requirements.txt
COPY . /src
RUN --mount=type=secret,id=cacert \
    if [ -s /run/secrets/cacert ]; then export PIP_CERT=/run/secrets/cacert; fi \
 && /opt/build/bin/pip wheel -q --no-cache-dir --no-deps -w /wheels /src

# Stage 2: the image: Python, the project in a venv, nothing to build with.
FROM ${BASE}
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    python3 -m venv /opt/deparrow \
 && /opt/deparrow/bin/pip install -q --no-cache-dir --no-index --find-links /wheels deparrow
ENV PATH=/opt/deparrow/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1
# HTTPS (the REST API and web page) on 8765, and the embedded broker's MQTT over TLS for nodes
# and agents on 8883, with a CA the hub makes once in the volume (docs/tls.md); nodes pin it by
# the fingerprint `deparrow node token` prints. Add --tls-name HUB-ADDRESS, the name nodes use.
# The broker's plain port (1883) is the hub's own, on the container's loopback; a hub behind a
# TLS-terminating proxy publishes it to the proxy instead (docs/containers.md).
EXPOSE 8765 8883
VOLUME /var/lib/deparrow
CMD ["deparrow", "hub", "--host", "0.0.0.0", "--tls", "--data-dir", "/var/lib/deparrow", "--broker", "embedded"]
