# dpwasm3, the wasm job engine, as a MicroPython user C module for make-based ports (unix,
# stm32, ...): make USER_C_MODULES=path/to/deparrow/firmware ... (firmware/build.sh does it).
# wasm3's C core is unpacked into core/ by firmware/wasm3/fetch-core.sh (from the pywasm3
# source package, the same wasm3 as wasm3-run), or set WASM3_CORE (firmware/build.sh does).
DPWASM3_DIR := $(USERMOD_DIR)
WASM3_CORE ?= $(DPWASM3_DIR)/core

ifeq ($(wildcard $(WASM3_CORE)/wasm3.h),)
$(error dpwasm3: wasm3's C core is not in $(WASM3_CORE): run firmware/build.sh, or set WASM3_CORE)
endif

# wasm3's core, two files of it through the engine's hooks (m3_env_real.c, m3_core_real.c).
DPWASM3_CORE_C := $(DPWASM3_DIR)/m3_env_real.c $(DPWASM3_DIR)/m3_core_real.c \
	$(filter-out %/m3_env.c %/m3_core.c,$(wildcard $(WASM3_CORE)/*.c))
# Ours, every other C file here: the binding (modwasm3.c) and the engine (dp_*.c, with
# edge/native's wasi.c and module.c compiled unchanged).
DPWASM3_OWN_C := $(filter-out $(DPWASM3_CORE_C),$(wildcard $(DPWASM3_DIR)/*.c))

SRC_USERMOD_C += $(DPWASM3_DIR)/modwasm3.c
SRC_USERMOD_LIB_C += $(filter-out %/modwasm3.c,$(DPWASM3_OWN_C)) $(DPWASM3_CORE_C)
# Include paths for every file (the port's qstr scan reads modwasm3.c with them too).
CFLAGS_USERMOD += -I$(DPWASM3_DIR) -I$(DPWASM3_DIR)/../../edge/native -I$(WASM3_CORE)

# Everything else is per file, as target-specific flags on the module's objects: the port's
# CFLAGS come after CFLAGS_USERMOD on the command line (the unix port's -Werror
# -Wfloat-conversion -Wdouble-promotion among them), so only a flag added to the object itself
# can set one of those aside, and then for wasm3's files alone, not MicroPython's or ours.
# Object names as py/py.mk makes them: $(BUILD)/ and the path below USER_C_MODULES (or the
# whole path, for a WASM3_CORE elsewhere).
dpwasm3_src = $(patsubst $(USER_C_MODULES)/%.c,%.c,$(1))
dpwasm3_obj = $(addprefix $(BUILD)/,$(patsubst %.c,%.o,$(call dpwasm3_src,$(1))))

# The engine's hooks into wasm3: memory.grow meets the job's cap, and the interpreter's
# native-stack probe checks the deadline (dp_engine.c, m3_env_real.c, m3_core_real.c); and
# dp_port.h, what the engine expects of a POSIX libc.
DPWASM3_HOOKS := -include $(DPWASM3_DIR)/dp_port.h -DResizeMemory=deparrow_ResizeMemory \
	-Dd_m3LogNativeStack=1 -Dm3StackCheck=dp_loop_check -fno-strict-aliasing
# The port's warnings, errors included, less those the engine's C is not written to (as
# build-host.sh builds it for the tests: keep the two in step): configurations leave
# variables and functions unused (a board's WASI has no files).
DPWASM3_WARN := -Wno-sign-compare -Wno-missing-field-initializers -Wno-unused-function \
	-Wno-unused-variable
$(call dpwasm3_obj,$(DPWASM3_OWN_C)): CFLAGS += $(DPWASM3_HOOKS) $(DPWASM3_WARN)
# wasm3 is third-party C written to its own warning set: its float opcodes convert f64 to f32
# on purpose (f32.demote_f64 in m3_exec.h, m3_env.c), which the unix port's -Werror
# -Wfloat-conversion -Wdouble-promotion stop. Those two are off for wasm3's files alone.
$(call dpwasm3_obj,$(DPWASM3_CORE_C)): CFLAGS += $(DPWASM3_HOOKS) $(DPWASM3_WARN) \
	-Wno-float-conversion -Wno-double-promotion
