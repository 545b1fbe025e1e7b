/* Included before every source of the module (-include): what the engine's shared C files
 * (edge/native/wasm3run.h) expect of a POSIX system, for ports whose libc lacks it. */
#ifndef DEPARROW_DP_PORT_H
#define DEPARROW_DP_PORT_H
#include <time.h>
/* ESP-IDF's clock_gettime knows CLOCK_REALTIME and CLOCK_MONOTONIC only: a job's CPU clock is
 * its wall clock there (one core, nothing else runs while it does). */
#ifndef CLOCK_PROCESS_CPUTIME_ID
#define CLOCK_PROCESS_CPUTIME_ID CLOCK_MONOTONIC
#endif
/* A board has no directories to give a job: wasm3run.h then leaves WASI's files out
 * (edge/native/wasi_fs.c), and modules that import them are refused. */
#define DEPARROW_NO_FILES 1
#endif
