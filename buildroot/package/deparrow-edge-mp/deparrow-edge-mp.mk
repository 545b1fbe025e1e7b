################################################################################
#
# deparrow-edge-mp
#
################################################################################

DEPARROW_EDGE_MP_VERSION = 0.1.0
DEPARROW_EDGE_MP_SITE = $(BR2_EXTERNAL_DEPARROW_PATH)/../edge
DEPARROW_EDGE_MP_SITE_METHOD = local
DEPARROW_EDGE_MP_LICENSE = Apache-2.0
DEPARROW_EDGE_MP_DEPENDENCIES = micropython wasm3-run

# What a MicroPython node loads (docs/edge-micropython.md); the CPython-only adapters
# (paho, psutil, the pywasm3 pool, the dashboard) stay out of a 256 MB board's image.
DEPARROW_EDGE_MP_FILES = __init__.py core/__init__.py core/compat.py core/protocol.py \
	core/jobs.py core/jobfiles.py core/session.py core/outbox.py core/mqtt_umqtt.py mp_main.py mp_tls.py \
	executors/__init__.py executors/wasm3_cli.py

define DEPARROW_EDGE_MP_INSTALL_TARGET_CMDS
	$(foreach f,$(DEPARROW_EDGE_MP_FILES),
		$(INSTALL) -D -m 0644 $(@D)/$(f) $(TARGET_DIR)/usr/lib/deparrow/edge/$(f)
	)
endef

$(eval $(generic-package))
