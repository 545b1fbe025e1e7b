/* The wasm job engine of the board firmware: runs one job in wasm3, in this process, with the
 * WASI subset and limits of wasm3-run. Plain C over wasm3's API, no MicroPython in it, so it
 * is built and tested on a PC too (tests/firmware/test_wasm3_engine.py); modwasm3.c is the
 * MicroPython binding around it.
 *
 * The job's loop, the host functions and the module checks are edge/native/wasm3loop.c,
 * wasi.c and module.c, compiled unchanged into both wasm3-run and the firmware: dp_engine.c
 * supplies what they expect from their runner (the job, the output streams), for a process
 * that must live on after the job: output goes to capped buffers, and the job's outcome comes
 * back to dp_run instead of ending the process. */

#ifndef DEPARROW_DP_ENGINE_H
#define DEPARROW_DP_ENGINE_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    const uint8_t *p;
    uint32_t n;
} DpStr;

typedef struct {
    const uint8_t *module;
    size_t module_len;
    DpStr entry;  /* empty: _start */
    DpStr job_id; /* argv[0] of a WASI program */
    const DpStr *args;
    uint32_t nargs;
    const DpStr *env; /* "KEY=VALUE" */
    uint32_t nenv;
    const uint8_t *stdin_bytes;
    size_t stdin_len;
    uint64_t timeout_ms, memory_mb, stdout_cap, stderr_cap, gas; /* 0: the defaults, no gas */
} DpJob;

typedef struct {
    int completed;          /* 1: "completed", 0: "failed" */
    int64_t exit_code;      /* -1: none */
    const char *returns;    /* a JSON array, or NULL */
    const char *error;      /* the executor's error words, or NULL */
    const uint8_t *out;     /* at most stdout_cap + 1 bytes: one more means truncated */
    size_t out_len;
    const uint8_t *err;
    size_t err_len;
    uint64_t wall_ms;
} DpResult;

/* Runs the job to its end. The result's pointers stay valid until the next dp_run or
 * dp_release. Not reentrant: one job at a time per process. */
void dp_run(const DpJob *job, DpResult *result);
/* Asks the running job to stop at its next wasm function call or gas charge ("cancelled").
 * Safe from another thread. */
void dp_cancel(void);
void dp_release(void);
const char *dp_version(void);

#endif
