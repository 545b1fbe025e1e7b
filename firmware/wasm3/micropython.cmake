# dpwasm3, the wasm job engine, as a MicroPython user C module for CMake-based ports (esp32,
# rp2): make -C ports/esp32 USER_C_MODULES=path/to/deparrow/firmware/micropython.cmake
# (firmware/build.sh does it). wasm3's C core is unpacked into core/ by firmware/build.sh, or
# set WASM3_CORE.
set(DPWASM3_DIR ${CMAKE_CURRENT_LIST_DIR})
if(NOT DEFINED WASM3_CORE)
    set(WASM3_CORE ${DPWASM3_DIR}/core)
endif()
if(NOT EXISTS ${WASM3_CORE}/wasm3.h)
    message(FATAL_ERROR "dpwasm3: wasm3's C core is not in ${WASM3_CORE}: run firmware/build.sh")
endif()

file(GLOB WASM3_CORE_SOURCES ${WASM3_CORE}/*.c)
list(FILTER WASM3_CORE_SOURCES EXCLUDE REGEX "/m3_(env|core)\\.c$")

add_library(usermod_dpwasm3 INTERFACE)
target_sources(usermod_dpwasm3 INTERFACE
    ${DPWASM3_DIR}/modwasm3.c
    ${DPWASM3_DIR}/dp_engine.c
    ${DPWASM3_DIR}/dp_wasm3loop.c
    ${DPWASM3_DIR}/dp_wasi.c
    ${DPWASM3_DIR}/dp_module.c
    ${DPWASM3_DIR}/dp_textbuf.c
    ${DPWASM3_DIR}/m3_env_real.c
    ${DPWASM3_DIR}/m3_core_real.c
    ${WASM3_CORE_SOURCES}
)
target_include_directories(usermod_dpwasm3 INTERFACE
    ${DPWASM3_DIR} ${DPWASM3_DIR}/../../edge/native ${WASM3_CORE})
# The engine's hooks into wasm3: memory.grow meets the job's cap, and the interpreter's
# native-stack probe checks the deadline (dp_engine.c, m3_env_real.c, m3_core_real.c).
target_compile_definitions(usermod_dpwasm3 INTERFACE ResizeMemory=deparrow_ResizeMemory
    d_m3LogNativeStack=1 m3StackCheck=dp_loop_check)
target_compile_options(usermod_dpwasm3 INTERFACE "SHELL:-include ${DPWASM3_DIR}/dp_port.h"
    -fno-strict-aliasing
    -Wno-unused-parameter -Wno-sign-compare -Wno-unused-function)
target_link_libraries(usermod INTERFACE usermod_dpwasm3)
