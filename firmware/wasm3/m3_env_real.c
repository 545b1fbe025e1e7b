/* wasm3's m3_env.c, as the engine needs it:
 *   - ResizeMemory keeps its name here, where it is defined; every other wasm3 source is
 *     compiled with -DResizeMemory=deparrow_ResizeMemory, so the interpreter's memory.grow
 *     reaches the engine's cap (dp_engine.c) first, as tools/build-wasm3-runner.sh does for
 *     wasm3-run;
 *   - the native-stack log the build switches on for its probe (dp_loop_check) stays off
 *     here: it would print the stack used after every call. */
#undef ResizeMemory
#undef d_m3LogNativeStack
#undef m3StackCheck
#define d_m3LogNativeStack 0
#include "m3_env.c"
