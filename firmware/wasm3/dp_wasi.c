/* edge/native/wasi.c, the host functions wasm3-run is built with, compiled for the firmware.
 * Two calls are routed to dp_engine.c, because a board has neither files nor signals:
 *   read() of stdin -> dp_stdin_read, the job's stdin from memory;
 *   nanosleep() (poll_oneoff's clock wait) -> dp_nanosleep, which wakes at the job's deadline
 *   or a cancel (wasm3-run's timer signal interrupts the sleep instead). */
#include <sys/types.h>
#include <time.h>
ssize_t dp_stdin_read(int fd, void *p, size_t n);
int dp_nanosleep(const struct timespec *req, struct timespec *rem);
#define read dp_stdin_read
#define nanosleep dp_nanosleep
#include "../../edge/native/wasi.c"
