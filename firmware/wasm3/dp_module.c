/* edge/native/module.c (the module and argument checks wasm3-run makes before wasm3 sees a
 * job), compiled unchanged into the firmware. */
#include "../../edge/native/module.c"
