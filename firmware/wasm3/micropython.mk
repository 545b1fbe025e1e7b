# dpwasm3, the wasm job engine, as a MicroPython user C module for make-based ports (unix,
# stm32, ...): make USER_C_MODULES=path/to/deparrow/firmware ... (firmware/build.sh does it).
# wasm3's C core is unpacked into core/ by firmware/build.sh (from the pywasm3 source package,
# the same wasm3 as wasm3-run), or set WASM3_CORE.
DPWASM3_DIR := $(USERMOD_DIR)
WASM3_CORE ?= $(DPWASM3_DIR)/core

ifeq ($(wildcard $(WASM3_CORE)/wasm3.h),)
$(error dpwasm3: wasm3's C core is not in $(WASM3_CORE): run firmware/build.sh, or set WASM3_CORE)
endif

SRC_USERMOD_C += $(DPWASM3_DIR)/modwasm3.c
SRC_USERMOD_LIB_C += $(DPWASM3_DIR)/dp_engine.c $(DPWASM3_DIR)/dp_wasi.c \
	$(DPWASM3_DIR)/dp_module.c $(DPWASM3_DIR)/dp_textbuf.c $(DPWASM3_DIR)/m3_env_real.c $(DPWASM3_DIR)/m3_core_real.c \
	$(filter-out %/m3_env.c %/m3_core.c,$(wildcard $(WASM3_CORE)/*.c))

# The engine's hooks into wasm3: memory.grow meets the job's cap, and the interpreter's
# native-stack probe checks the deadline (dp_engine.c, m3_env_real.c, m3_core_real.c).
CFLAGS_USERMOD += -I$(DPWASM3_DIR) -I$(DPWASM3_DIR)/../../edge/native -I$(WASM3_CORE) \
	-include $(DPWASM3_DIR)/dp_port.h -DResizeMemory=deparrow_ResizeMemory \
	-Dd_m3LogNativeStack=1 -Dm3StackCheck=dp_loop_check -fno-strict-aliasing \
	-Wno-unused-parameter -Wno-sign-compare -Wno-missing-field-initializers \
	-Wno-unused-function -Wno-unused-variable -Wno-double-promotion -Wno-float-conversion
