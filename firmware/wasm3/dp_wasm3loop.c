/* edge/native/wasm3loop.c (the job's run in wasm3, from the module's bytes to its outcome,
 * that wasm3-run shares), compiled unchanged into the firmware. */
#include "../../edge/native/wasm3loop.c"
