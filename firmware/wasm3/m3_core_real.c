/* wasm3's m3_core.c. Every wasm3 source is compiled with -Dm3StackCheck=dp_loop_check, so the
 * interpreter's native-stack probe reaches the engine's deadline check (dp_engine.c); this
 * file keeps wasm3's own probe under another name, unused. */
#undef m3StackCheck
#define m3StackCheck wasm3_native_stack_probe
#include "m3_core.c"
