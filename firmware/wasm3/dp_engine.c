/* The firmware's wasm job engine: see dp_engine.h. What differs from wasm3-run, and why:
 *   - no process to end, so fail()/failf()/finish() record the outcome and longjmp back to
 *     dp_run, which frees the wasm3 runtime (everything wasm3 allocated for the job);
 *   - no signals on a board, so the wall-clock limit is checked from inside the interpreter,
 *     at every loop iteration and function return (dp_loop_check);
 *   - no files: stdout and stderr go to buffers kept to cap + 1 bytes, stdin comes from
 *     memory (wasi.c's read() calls are routed to dp_stdin_read at build time).
 * The limits' outcomes and error words are wasm3-run's. */

/* The module build defines ResizeMemory=deparrow_ResizeMemory for every source (see
 * micropython.mk); here ResizeMemory must be wasm3's own. */
#undef ResizeMemory

#include <setjmp.h>
#include <stdarg.h>

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
char errbuf[ERR_MAX];

static jmp_buf escape;
static int in_job;
static volatile int cancel_requested;
static int64_t deadline_ns, start_ns;
static uint32_t yields;
static uint32_t cap_pages, limit_pages;
static int grow_past_limit_fails;
static uint8_t *out_buf, *err_buf;
static size_t in_pos;
static const uint8_t *in_bytes;
static size_t in_len;
static char timeout_msg[96];
static char returns_buf[MAX_VALUES * 32 + 8];
static struct {
    int completed;
    int64_t exit_code;
    const char *returns, *error;
} ending;


/* ------------------------------------------------------------------------------------------ */
/* What wasi.c and module.c use from wasm3run.c                                                */

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

void finish(int completed, int64_t exit_code, const char *error, const char *returns,
            int from_signal) {
    (void)from_signal;
    ending.completed = completed;
    ending.exit_code = exit_code;
    ending.error = error;
    ending.returns = returns;
    if (in_job) longjmp(escape, 1);
}

void fail(const char *error) {
    finish(0, -1, error, NULL, 0);
    abort(); /* fail() outside a job: a bug here, never a job's doing */
}

void failf(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(errbuf, sizeof errbuf, fmt, ap);
    va_end(ap);
    fail(errbuf);
}

/* ------------------------------------------------------------------------------------------ */
/* The limits: memory.grow, the deadline, cancel                                               */

/* wasm3's interpreter calls this instead of ResizeMemory (renamed at build time). */
M3Result deparrow_ResizeMemory(IM3Runtime rt, u32 pages);

M3Result deparrow_ResizeMemory(IM3Runtime rt, u32 pages) {
    if (grow_past_limit_fails && pages > cap_pages)
        failf("memory limit: job exceeded %llu MiB (memory.grow past the cap)",
              (unsigned long long)job.memory_mb);
    M3Result r = ResizeMemory(rt, pages);
    if (r && pages <= limit_pages)
        failf("memory limit: job exceeded %llu MiB (the host could not allocate more)",
              (unsigned long long)job.memory_mb);
    return r;
}

/* The wall-clock limit and cancel. wasm3 has no hook for them, so the build gives it one: its
 * native-stack probe, m3StackCheck(), which the interpreter runs at every loop iteration
 * (ContinueLoop) and every function return, is compiled as a call to this function
 * (-Dd_m3LogNativeStack=1 -Dm3StackCheck=dp_loop_check, see micropython.mk). Past the
 * deadline it ends the job from inside the interpreter, as a trap would: by the longjmp in
 * fail(). The clock is read every 1024 probes. */
void dp_loop_check(void) {
    if (!in_job || (++yields & 1023)) return;
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
/* Running the job (wasm3run.c's run(), in a process that lives on)                            */

static void fail_wasm3(M3Result r, IM3Runtime rt) {
    M3ErrorInfo ei;
    memset(&ei, 0, sizeof ei);
    if (rt) m3_GetErrorInfo(rt, &ei);
    char msg[512];
    if (ei.message && *ei.message) snprintf(msg, sizeof msg, "%s (%s)", r, ei.message);
    else snprintf(msg, sizeof msg, "%s", r);
    if (r == m3Err_mallocFailed || strstr(msg, "memory allocation failed") || strstr(msg, "out of memory"))
        failf("memory limit: job exceeded %llu MiB (the host could not allocate more)",
              (unsigned long long)job.memory_mb);
    if (!strncmp(msg, "[trap] Out of gas", 17) && job.gas)
        failf("gas limit: job used more than its %llu units of gas", (unsigned long long)job.gas);
    if (!strncmp(msg, "[trap] ", 7)) failf("trap: %s", msg + 7);
    failf("invalid module: %s", msg);
}

static int is(Str s, const char *lit) { return s.n == strlen(lit) && !memcmp(s.p, lit, s.n); }

static IM3Function function_at(IM3Module module, IM3Runtime rt, uint32_t index) {
    IM3Function f = Module_GetFunction(module, index);
    if (!f) fail("invalid module: export refers to a missing function");
    if (!f->compiled) {
        M3Result r = CompileFunction(f);
        if (r) fail_wasm3(r, rt);
    }
    return f;
}

static void check_imports(void) {
    Sb miss = {errbuf, sizeof errbuf, 0};
    sb_str(&miss, "invalid module: unsupported import ");
    size_t start = miss.len;
    for (int pass = 0; pass < 2; pass++) /* functions first, then other kinds, as runner.py */
        for (uint32_t i = 0; i < info.nimports; i++) {
            const Import *im = &info.imports[i];
            if ((pass == 0) != (im->kind == 0)) continue;
            if (pass == 0 && (wasi_fn(im->mod, im->name) || is_gas_import(im->mod, im->name)))
                continue;
            if (miss.len > start) sb_str(&miss, ", ");
            sb_raw(&miss, (const char *)im->mod.p, im->mod.n);
            sb_str(&miss, ".");
            sb_raw(&miss, (const char *)im->name.p, im->name.n);
            if (pass) {
                sb_str(&miss, " (");
                sb_str(&miss, im->kind < 4 ? KINDS[im->kind] : "?");
                sb_str(&miss, ")");
            }
        }
    if (miss.len > start) {
        sb_str(&miss, " (this executor provides WASI preview1 args, environ, clocks, random, "
                      "stdio and proc_exit, no files or sockets)");
        errbuf[miss.len] = 0;
        fail(errbuf);
    }
}

static IM3Environment env;
static IM3Runtime rt;
static void *rt_stack; /* wasm3 points rt->stack elsewhere while a host function runs */

static void run(void) {
    cap_pages = job.memory_mb > (1u << 20) ? (1u << 24) : (uint32_t)(job.memory_mb * 16);
    if (!cap_pages) cap_pages = 1;
    read_module(info.b, info.n);
    const Export *entry = find_export(job.entry);
    if (!entry || entry->kind != 0) {
        Sb b = {errbuf, sizeof errbuf, 0};
        sb_str(&b, "invalid module: no exported function ");
        repr(&b, job.entry);
        sb_str(&b, " (it exports: ");
        const Str **names = calloc(info.nexports + 1, sizeof *names);
        uint32_t k = 0;
        for (uint32_t i = 0; names && i < info.nexports; i++)
            if (info.exports[i].kind == 0) names[k++] = &info.exports[i].name;
        if (names) qsort(names, k, sizeof *names, cmp_names);
        for (uint32_t i = 0; i < k; i++) {
            if (i) sb_str(&b, ", ");
            sb_raw(&b, (const char *)names[i]->p, names[i]->n);
        }
        free(names);
        sb_str(&b, k ? ")" : "no functions)");
        errbuf[b.len] = 0;
        fail(errbuf);
    }
    check_imports();
    if (info.has_memory && info.mem_min > cap_pages)
        failf("memory limit: job exceeded %g MiB (the module asks for %g MiB of initial memory)",
              cap_pages / 16.0, info.mem_min / 16.0);
    limit_pages = info.has_memory && info.has_max && info.mem_max < cap_pages ? info.mem_max : cap_pages;
    grow_past_limit_fails = !(info.has_memory && info.has_max && info.mem_max <= cap_pages);

    argv_count = is(job.entry, "_start") ? job.nargs + 1 : 1;
    argv_items = calloc(argv_count, sizeof(Str));
    if (!argv_items) fail("memory limit: the board cannot hold this job's arguments");
    argv_items[0] = job.job_id;
    for (uint32_t i = 1; i < argv_count; i++) argv_items[i] = job.args[i - 1];

    env = m3_NewEnvironment();
    rt = env ? m3_NewRuntime(env, DP_WASM_STACK, NULL) : NULL;
    if (!rt) fail_wasm3(m3Err_mallocFailed, NULL);
    rt_stack = rt->stack;
    IM3Module module;
    M3Result r = m3_ParseModule(env, &module, info.b, (uint32_t)info.n);
    if (r) fail_wasm3(r, NULL);
    r = m3_LoadModule(rt, module);
    if (r) {
        m3_FreeModule(module); /* the runtime owns it only once loaded */
        fail_wasm3(r, rt);
    }
    rt->memory.maxPages = limit_pages;
    gas_left = job.gas ? (job.gas > (uint64_t)INT64_MAX ? INT64_MAX : (int64_t)job.gas) : INT64_MAX;
    for (uint32_t i = 0; i < info.nimports; i++) {
        if (info.imports[i].kind == 0 && is_gas_import(info.imports[i].mod, info.imports[i].name)) {
            r = m3_LinkRawFunction(module, "metering", "usegas", "v(i)", metering_usegas);
            if (r && r != m3Err_functionLookupFailed) fail_wasm3(r, rt);
            continue;
        }
        const WasiFn *w = wasi_fn(info.imports[i].mod, info.imports[i].name);
        if (!w) continue;
        r = m3_LinkRawFunction(module, WASI, w->name, w->sig, w->fn);
        if (r && r != m3Err_functionLookupFailed) fail_wasm3(r, rt);
    }
    r = m3_RunStart(module);
    if (r) fail_wasm3(r, rt);

    uint64_t vals[MAX_VALUES];
    const void *ptrs[MAX_VALUES];
    for (int i = 0; i < MAX_VALUES; i++) ptrs[i] = &vals[i];
    int start_entry = is(job.entry, "_start");
    const Export *init = find_export((Str){(const uint8_t *)"_initialize", 11});
    if (!start_entry && init && init->kind == 0) {
        r = m3_Call(function_at(module, rt, init->index), 0, NULL);
        if (r) fail_wasm3(r, rt);
    }
    IM3Function f = function_at(module, rt, entry->index);
    if (start_entry) {
        if (m3_GetArgCount(f)) fail("invalid module: _start takes parameters");
        r = m3_Call(f, 0, NULL);
        if (r) fail_wasm3(r, rt);
        finish(1, 0, NULL, NULL, 0);
    }
    convert_args(f, vals);
    r = m3_Call(f, job.nargs, ptrs);
    if (r) fail_wasm3(r, rt);
    uint32_t nrets = m3_GetRetCount(f);
    if (nrets > MAX_VALUES) failf("invalid module: more than %d results", MAX_VALUES);
    memset(vals, 0, sizeof vals);
    r = nrets ? m3_GetResults(f, nrets, ptrs) : NULL;
    if (r) fail_wasm3(r, rt);
    Sb b = {returns_buf, sizeof returns_buf, 0};
    sb_str(&b, "[");
    for (uint32_t i = 0; i < nrets; i++) {
        if (i) sb_str(&b, ",");
        M3ValueType t = m3_GetRetType(f, i);
        int32_t i32;
        int64_t i64;
        float f32;
        double f64;
        if (t == c_m3Type_i32) memcpy(&i32, &vals[i], 4), sb_i64(&b, i32);
        else if (t == c_m3Type_i64) memcpy(&i64, &vals[i], 8), sb_i64(&b, i64);
        else if (t == c_m3Type_f32) memcpy(&f32, &vals[i], 4), sb_double(&b, f32);
        else memcpy(&f64, &vals[i], 8), sb_double(&b, f64);
    }
    sb_str(&b, "]");
    returns_buf[b.len] = 0; /* Sb does not terminate; the buffer outlives a job */
    finish(1, 0, NULL, returns_buf, 0);
}

static void tidy(void) {
    /* A job that ended inside a host function (proc_exit, a cap) left wasm3 mid-call. */
    if (rt) rt->stack = rt_stack;
    if (rt) m3_FreeRuntime(rt);
    if (env) m3_FreeEnvironment(env);
    rt = NULL;
    env = NULL;
    free(info.imports);
    free(info.exports);
    free(argv_items);
    memset(&info, 0, sizeof info);
    argv_items = NULL;
    argv_count = 0;
}

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
    memset(&info, 0, sizeof info);
    info.b = j->module;
    info.n = j->module_len;
    in_bytes = j->stdin_bytes;
    in_len = j->stdin_bytes ? j->stdin_len : 0;
    in_pos = 0;
    out_size = err_size = 0;
    yields = 0;
    memset(&ending, 0, sizeof ending);
    snprintf(timeout_msg, sizeof timeout_msg, "timeout: job exceeded its %gs limit",
             (double)job.timeout_ms / 1000.0);
    out_buf = malloc((size_t)job.stdout_cap + 1);
    err_buf = malloc((size_t)job.stderr_cap + 1);
    start_ns = mono_ns();
    deadline_ns = start_ns + (int64_t)job.timeout_ms * 1000000LL;
    if (!out_buf || !err_buf) {
        ending.error = "memory limit: the board cannot hold this job's output buffers";
        ending.exit_code = -1;
    } else if (setjmp(escape) == 0) {
        in_job = 1;
        run();
    }
    in_job = 0;
    cancel_requested = 0;
    tidy();
    res->completed = ending.completed;
    res->exit_code = ending.exit_code;
    res->returns = ending.returns;
    res->error = ending.error;
    res->out = out_buf;
    res->out_len = out_buf ? (size_t)out_size : 0;
    res->err = err_buf;
    res->err_len = err_buf ? (size_t)err_size : 0;
    int64_t wall = mono_ns() - start_ns;
    res->wall_ms = wall > 0 ? (uint64_t)wall / 1000000u : 0;
}

const char *dp_version(void) { return DP_VERSION " (wasm3 " M3_VERSION ")"; }
