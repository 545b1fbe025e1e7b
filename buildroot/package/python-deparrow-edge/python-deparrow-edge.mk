################################################################################
#
# python-deparrow-edge
#
################################################################################

# The node is built from the repository this BR2_EXTERNAL tree lives in.
PYTHON_DEPARROW_EDGE_VERSION = 0.1.0
PYTHON_DEPARROW_EDGE_SITE = $(BR2_EXTERNAL_DEPARROW_PATH)/..
PYTHON_DEPARROW_EDGE_SITE_METHOD = local
PYTHON_DEPARROW_EDGE_SETUP_TYPE = setuptools
PYTHON_DEPARROW_EDGE_LICENSE = Apache-2.0
PYTHON_DEPARROW_EDGE_RSYNC_EXCLUDES = --exclude=output --exclude=.venv --exclude=buildroot \
	--exclude=tests --exclude=bench --exclude=wasm-jobs

# Only edge/ goes into the image: our own pyproject.toml replaces the repository's.
define PYTHON_DEPARROW_EDGE_EDGE_ONLY
	$(INSTALL) -m 0644 $(PYTHON_DEPARROW_EDGE_PKGDIR)/pyproject.toml $(@D)/pyproject.toml
endef
PYTHON_DEPARROW_EDGE_POST_RSYNC_HOOKS += PYTHON_DEPARROW_EDGE_EDGE_ONLY

$(eval $(python-package))
