/* The firmware's wasm job engine: see dp_engine.h. The job runs in edge/native/wasm3loop.c,
 * the loop wasm3-run shares; what this engine adds is a process that lives on after the job:
 *   - output goes to buffers kept to cap + 1 bytes, stdin comes from memory (wasi.c's read()
 *     calls are routed to dp_stdin_read at build time);
 *   - no signals on a board, so the wall-clock limit and cancel are checked from inside the
 *     interpreter, at every loop iteration and function return (dp_loop_check);
 *   - an ending comes back to dp_run (the loop's longjmp), which frees what wasm3 allocated
 *     for the job (end_job).
 * The limits' outcomes and error words are wasm3-run's. */

#include "wasm3run.h"
#include "dp_engine.h"

#define DP_VERSION "dpwasm3 1"
/* The wasm stack of a job. wasm3 also recurses on the C stack for wasm calls, so the thread a
 * job runs on needs a C stack large enough for this much wasm stack to overflow (a clean
 * "trap: stack overflow") first: firmware/wasm3_exec.py's THREAD_STACK, measured with
 * tests/edge/fixtures/calc.wat's recurse. */
#ifndef DP_WASM_STACK
#define DP_WASM_STACK (16u << 10) /* recursion ~500 calls deep */
#endif

Job job;
int out_fd = 1, err_fd = 2, in_fd = 0; /* stream numbers for write_all, not descriptors */
uint64_t out_size, err_size;

static volatile int cancel_requested;
static int64_t deadline_ns;
static uint32_t yields;
static uint8_t *out_buf, *err_buf;
static size_t in_pos;
static const uint8_t *in_bytes;
static size_t in_len;
static char timeout_msg[96];

static const Runner BOARD = {
    DP_WASM_STACK, "memory limit: the board cannot hold this job's arguments", NULL};

/* ------------------------------------------------------------------------------------------ */
/* What the loop, wasi.c and module.c use from their runner                                    */

/* Stream 1 or 2 into its buffer; wasi.c's capped_write keeps it to cap + 1 bytes. */
int write_all(int fd, const char *p, size_t n) {
    uint8_t *buf = fd == out_fd ? out_buf : fd == err_fd ? err_buf : NULL;
    uint64_t size = fd == out_fd ? out_size : err_size;
    if (!buf) return -1;
    memcpy(buf + size, p, n);
    return 0;
}

/* wasi.c's fd_read from stdin, by the -Dread=dp_stdin_read its build gets. */
ssize_t dp_stdin_read(int fd, void *p, size_t n);
ssize_t dp_stdin_read(int fd, void *p, size_t n) {
    (void)fd;
    size_t left = in_len - in_pos;
    if (n > left) n = left;
    if (n) memcpy(p, in_bytes + in_pos, n);
    in_pos += n;
    return (ssize_t)n;
}

/* Every ending of a job comes back to dp_run; one outside a job is a bug here, never a job's
 * doing. */
void runner_end(const Outcome *o) {
    (void)o;
    abort();
}

/* ------------------------------------------------------------------------------------------ */
/* The deadline and cancel                                                                     */

/* The wall-clock limit and cancel. wasm3 has no hook for them, so the build gives it one: its
 * native-stack probe, m3StackCheck(), which the interpreter runs at every loop iteration
 * (ContinueLoop) and every function return, is compiled as a call to this function
 * (-Dd_m3LogNativeStack=1 -Dm3StackCheck=dp_loop_check, see micropython.mk). Past the
 * deadline it ends the job from inside the interpreter, as a trap would: by the longjmp in
 * fail(). The clock is read every 1024 probes. */
void dp_loop_check(void) {
    if (!job_running || (++yields & 1023)) return;
    if (cancel_requested) fail("cancelled");
    if (mono_ns() > deadline_ns) fail(timeout_msg);
}

void dp_cancel(void) { cancel_requested = 1; }

/* poll_oneoff's sleep (wasi.c's nanosleep, by dp_wasi.c's build): in slices of at most 50 ms,
 * ending the job at its deadline or a cancel, as the loop check does. */
int dp_nanosleep(const struct timespec *req, struct timespec *rem);
int dp_nanosleep(const struct timespec *req, struct timespec *rem) {
    int64_t until = mono_ns() + ns_of(req);
    for (;;) {
        if (cancel_requested) fail("cancelled");
        int64_t now = mono_ns();
        if (now > deadline_ns) fail(timeout_msg);
        if (now >= until) break;
        int64_t step = until - now;
        if (step > 50000000) step = 50000000;
        if (step > deadline_ns - now + 1000000) step = deadline_ns - now + 1000000;
        struct timespec t = {step / 1000000000LL, step % 1000000000LL};
        nanosleep(&t, NULL);
    }
    if (rem) rem->tv_sec = rem->tv_nsec = 0;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Running the job                                                                             */

void dp_release(void) {
    free(out_buf);
    free(err_buf);
    out_buf = err_buf = NULL;
}

void dp_run(const DpJob *j, DpResult *res) {
    dp_release();
    memset(&job, 0, sizeof job);
    job.entry = j->entry.n ? (Str){j->entry.p, j->entry.n} : (Str){(const uint8_t *)"_start", 6};
    job.job_id = j->job_id.n ? (Str){j->job_id.p, j->job_id.n} : (Str){(const uint8_t *)"job", 3};
    job.args = (Str *)j->args; /* DpStr and Str are the same two fields */
    job.nargs = j->nargs;
    job.env = (Str *)j->env;
    job.nenv = j->nenv;
    job.timeout_ms = j->timeout_ms ? j->timeout_ms : 60000;
    job.memory_mb = j->memory_mb ? j->memory_mb : 64;
    job.stdout_cap = j->stdout_cap ? j->stdout_cap : 16 << 10;
    job.stderr_cap = j->stderr_cap ? j->stderr_cap : 4 << 10;
    job.gas = j->gas;
    job.module = j->module;
    job.module_len = j->module_len;
    in_bytes = j->stdin_bytes;
    in_len = j->stdin_bytes ? j->stdin_len : 0;
    in_pos = 0;
    out_size = err_size = 0;
    yields = 0;
    snprintf(timeout_msg, sizeof timeout_msg, "timeout: job exceeded its %gs limit",
             (double)job.timeout_ms / 1000.0);
    out_buf = malloc((size_t)job.stdout_cap + 1);
    err_buf = malloc((size_t)job.stderr_cap + 1);
    deadline_ns = mono_ns() + (int64_t)job.timeout_ms * 1000000LL;
    Outcome o = {0, -1, "memory limit: the board cannot hold this job's output buffers", NULL, 0};
    if (out_buf && err_buf) o = run_job(&BOARD);
    cancel_requested = 0;
    end_job();
    res->completed = o.completed;
    res->exit_code = o.exit_code;
    res->returns = o.returns;
    res->error = o.error;
    res->out = out_buf;
    res->out_len = out_buf ? (size_t)out_size : 0;
    res->err = err_buf;
    res->err_len = err_buf ? (size_t)err_size : 0;
    res->wall_ms = o.wall_ns > 0 ? (uint64_t)o.wall_ns / 1000000u : 0;
}

const char *dp_version(void) { return DP_VERSION " (wasm3 " M3_VERSION ")"; }
