/* edge/native/textbuf.c (the string builder and clock wasm3-run uses), compiled unchanged
 * into the firmware. */
#include "../../edge/native/textbuf.c"
