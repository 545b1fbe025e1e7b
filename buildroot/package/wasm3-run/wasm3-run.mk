################################################################################
#
# wasm3-run
#
################################################################################

WASM3_RUN_VERSION = 0.1.0
WASM3_RUN_SITE = $(BR2_EXTERNAL_DEPARROW_PATH)/../edge/native
WASM3_RUN_SITE_METHOD = local
WASM3_RUN_LICENSE = Apache-2.0 (runner), MIT (wasm3)
# wasm3's C core comes from the same pywasm3 sdist CPython nodes use.
WASM3_RUN_EXTRA_DOWNLOADS = \
	https://files.pythonhosted.org/packages/source/p/pywasm3/pywasm3-0.5.0.tar.gz

# The repository's own build script, with the target compiler: one definition of how
# wasm3-run is built (tools/build-wasm3-runner.sh), here and on a developer's machine.
define WASM3_RUN_BUILD_CMDS
	PYWASM3_SDIST=$(WASM3_RUN_DL_DIR)/pywasm3-0.5.0.tar.gz \
	CC="$(TARGET_CC)" \
	WASM3_RUN_CFLAGS="$(TARGET_CFLAGS) -O2 -fomit-frame-pointer -DNASSERTS" \
		$(BR2_EXTERNAL_DEPARROW_PATH)/../tools/build-wasm3-runner.sh \
		--out $(@D)/wasm3-run --force
endef

define WASM3_RUN_INSTALL_TARGET_CMDS
	$(INSTALL) -D -m 0755 $(@D)/wasm3-run $(TARGET_DIR)/usr/bin/wasm3-run
endef

$(eval $(generic-package))
