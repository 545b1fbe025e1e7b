/* One wasm job in wasm3, from the module's bytes to how it ended: the loop that wasm3-run
 * (wasm3run.c) and the boards' engine (firmware/wasm3/dp_engine.c) share, so both refuse,
 * limit and report a job in the same words (runner.py's error kinds: "invalid module",
 * "invalid argument", "memory limit", "gas limit", "trap").
 *
 * run_job() checks the module and what it imports before wasm3 sees it (module.c), links the
 * host functions (wasi.c), calls the entry and returns the outcome. Every ending, here, in
 * module.c or in a host function (proc_exit, a cap), goes through finish(), which longjmps
 * back to run_job: wasm3 is left where it was, and end_job() frees it for a runner that lives
 * on. The limits that need a clock (the deadline, cancel) are the runners': signals in
 * wasm3-run, the interpreter's loop probe on a board. */

/* A build may rename ResizeMemory for every source (micropython.mk does, so that the
 * interpreter's memory.grow reaches deparrow_ResizeMemory); here it must be wasm3's own. */
#undef ResizeMemory

#include <setjmp.h>
#include <stdarg.h>

#include "wasm3run.h"

char errbuf[ERR_MAX];
int job_running;

static jmp_buf escape;
static Outcome ending;
static int64_t started_ns; /* not run_job's local: one that longjmp may clobber */
static uint32_t cap_pages, limit_pages;
static int grow_past_limit_fails; /* the cap, not the module's own maximum, is the limit */
static IM3Environment env;
static IM3Runtime rt;
static void *rt_stack; /* wasm3 points rt->stack elsewhere while a host function runs */
static char returns_buf[MAX_VALUES * 32 + 8];

void finish(int completed, int64_t exit_code, const char *error, const char *returns) {
    ending.completed = completed;
    ending.exit_code = exit_code;
    ending.error = error;
    ending.returns = returns;
    if (job_running) longjmp(escape, 1);
    runner_end(&ending);
}

void fail(const char *error) { finish(0, -1, error, NULL); }

void failf(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(errbuf, sizeof errbuf, fmt, ap);
    va_end(ap);
    fail(errbuf);
}

/* ------------------------------------------------------------------------------------------ */
/* The memory cap: wasm3's interpreter calls this instead of ResizeMemory (renamed at build   */
/* time: tools/build-wasm3-runner.sh, firmware/wasm3/micropython.mk)                          */

M3Result deparrow_ResizeMemory(IM3Runtime runtime, u32 pages);

M3Result deparrow_ResizeMemory(IM3Runtime runtime, u32 pages) {
    if (grow_past_limit_fails && pages > cap_pages)
        failf("memory limit: job exceeded %llu MiB (memory.grow past the cap)",
              (unsigned long long)job.memory_mb);
    M3Result r = ResizeMemory(runtime, pages);
    if (r && pages <= limit_pages)
        failf("memory limit: job exceeded %llu MiB (the host could not allocate more)",
              (unsigned long long)job.memory_mb);
    return r;
}

/* ------------------------------------------------------------------------------------------ */
/* The job                                                                                    */

/* wasm3's error, as one of the executor's error kinds (runner._explain). wasm3's errors are
 * constants of under 100 characters and its runtime's message is at most 255 (M3Runtime's
 * error_message), so msg holds both whole. */
static void fail_wasm3(M3Result r, IM3Runtime runtime) {
    M3ErrorInfo ei;
    memset(&ei, 0, sizeof ei);
    if (runtime) m3_GetErrorInfo(runtime, &ei);
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

static IM3Function function_at(IM3Module module, uint32_t index) {
    IM3Function f = Module_GetFunction(module, index);
    if (!f) fail("invalid module: export refers to a missing function");
    if (!f->compiled) {
        M3Result r = CompileFunction(f);
        if (r) fail_wasm3(r, rt);
    }
    return f;
}

static const Export *entry_export(void) {
    const Export *entry = find_export(job.entry);
    if (entry && entry->kind == 0) return entry;
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

/* Imports neither WASI (as this build gives it) nor metering.usegas: refused up front. */
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
    if (miss.len == start) return;
#ifdef DEPARROW_NO_FILES
    sb_str(&miss, " (this executor provides WASI preview1 args, environ, clocks, random, "
                  "stdio and proc_exit, no files or sockets)");
#else
    sb_str(&miss, " (this executor provides WASI preview1 args, environ, clocks, random, "
                  "stdio and proc_exit, files in the job's preopened directories, no "
                  "sockets)");
#endif
    errbuf[miss.len] = 0;
    fail(errbuf);
}

static void link_imports(IM3Module module) {
    for (uint32_t i = 0; i < info.nimports; i++) {
        M3Result r;
        if (info.imports[i].kind == 0 && is_gas_import(info.imports[i].mod, info.imports[i].name)) {
            r = m3_LinkRawFunction(module, "metering", "usegas", "v(i)", metering_usegas);
        } else {
            const WasiFn *w = wasi_fn(info.imports[i].mod, info.imports[i].name);
            if (!w) continue;
            r = m3_LinkRawFunction(module, WASI, w->name, w->sig, w->fn);
        }
        if (r && r != m3Err_functionLookupFailed) fail_wasm3(r, rt);
    }
}

/* The entry's results, as the JSON array runner.py reports. */
static const char *returns_of(IM3Function f, uint64_t *vals, const void **ptrs) {
    uint32_t nrets = m3_GetRetCount(f);
    if (nrets > MAX_VALUES) failf("invalid module: more than %d results", MAX_VALUES);
    memset(vals, 0, MAX_VALUES * sizeof *vals);
    M3Result r = nrets ? m3_GetResults(f, nrets, ptrs) : NULL;
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
        else if (t == c_m3Type_f32) memcpy(&f32, &vals[i], 4), sb_double(&b, (double)f32);
        else memcpy(&f64, &vals[i], 8), sb_double(&b, f64);
    }
    sb_str(&b, "]");
    returns_buf[b.len] = 0; /* Sb does not terminate; the buffer outlives a job */
    return returns_buf;
}

static void run(const Runner *runner) {
    cap_pages = job.memory_mb > (1u << 20) ? (1u << 24) : (uint32_t)(job.memory_mb * 16);
    if (!cap_pages) cap_pages = 1;
#if SIZE_MAX > UINT32_MAX
    /* wasm3 takes the length in 32 bits: a larger module would be read cut short */
    if (job.module_len > UINT32_MAX) fail("invalid module: larger than 4 GiB");
#endif
    read_module(job.module, job.module_len);
    const Export *entry = entry_export();
    check_imports();
    if (info.has_memory && info.mem_min > cap_pages)
        failf("memory limit: job exceeded %g MiB (the module asks for %g MiB of initial memory)",
              cap_pages / 16.0, info.mem_min / 16.0);
    limit_pages = info.has_memory && info.has_max && info.mem_max < cap_pages ? info.mem_max : cap_pages;
    /* past the module's own maximum memory.grow answers -1 (the spec); past the job's cap,
       below that maximum, the job is over its limit */
    grow_past_limit_fails = !(info.has_memory && info.has_max && info.mem_max <= cap_pages);

    int start_entry = is(job.entry, "_start");
    argv_count = start_entry ? job.nargs + 1 : 1;
    argv_items = calloc(argv_count, sizeof(Str));
    if (!argv_items) fail(runner->no_memory_for_argv);
    argv_items[0] = job.job_id;
    for (uint32_t i = 1; i < argv_count; i++) argv_items[i] = job.args[i - 1];

    if (runner->prepare) runner->prepare(job.module_len, cap_pages);
    env = m3_NewEnvironment();
    rt = env ? m3_NewRuntime(env, runner->wasm_stack, NULL) : NULL;
    if (!rt) fail_wasm3(m3Err_mallocFailed, NULL);
    rt_stack = rt->stack;
    IM3Module module;
    M3Result r = m3_ParseModule(env, &module, job.module, (uint32_t)job.module_len);
    if (r) fail_wasm3(r, NULL);
    r = m3_LoadModule(rt, module);
    if (r) {
        m3_FreeModule(module); /* the runtime owns it only once loaded */
        fail_wasm3(r, rt);
    }
    rt->memory.maxPages = limit_pages;
    gas_left = job.gas ? (job.gas > (uint64_t)INT64_MAX ? INT64_MAX : (int64_t)job.gas) : INT64_MAX;
    link_imports(module);
    r = m3_RunStart(module);
    if (r) fail_wasm3(r, rt);

    uint64_t vals[MAX_VALUES];
    const void *ptrs[MAX_VALUES];
    for (int i = 0; i < MAX_VALUES; i++) ptrs[i] = &vals[i];
    const Export *init = find_export((Str){(const uint8_t *)"_initialize", 11});
    if (!start_entry && init && init->kind == 0) {
        r = m3_Call(function_at(module, init->index), 0, NULL);
        if (r) fail_wasm3(r, rt);
    }
    IM3Function f = function_at(module, entry->index);
    if (start_entry) {
        if (m3_GetArgCount(f)) fail("invalid module: _start takes parameters");
        r = m3_Call(f, 0, NULL);
        if (r) fail_wasm3(r, rt);
        finish(1, 0, NULL, NULL);
    }
    convert_args(f, vals);
    r = m3_Call(f, job.nargs, ptrs);
    if (r) fail_wasm3(r, rt);
    finish(1, 0, NULL, returns_of(f, vals, ptrs));
}

Outcome run_job(const Runner *runner) {
    memset(&ending, 0, sizeof ending);
    started_ns = mono_ns();
    if (setjmp(escape) == 0) {
        job_running = 1;
        run(runner);
    }
    job_running = 0;
    ending.wall_ns = mono_ns() - started_ns;
    return ending;
}

void end_job(void) {
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
