/*
 * wasm3-run: runs one DEparrow wasm job in a process of its own, with wasm3's C core.
 *
 *   wasm3-run [--parent PID] JOBDIR
 *
 * The node (edge/executors/wasm3_cli.py) writes JOBDIR/module.wasm, JOBDIR/stdin (optional)
 * and JOBDIR/job, a list of records "KEY LEN\nBYTES\n" (keys: entry, job_id, arg, env,
 * timeout_ms, memory_mb, stdout_cap, stderr_cap, gas, dir), and starts this program in the
 * background. A "dir" record is a directory the job sees (a WASI preopen, fd 3, 4, ... in the
 * order of the records): "r" or "w" (read-only or writable), the guest path, a NUL byte, the
 * host path; see wasi_fs.c.
 * The job's stdout and stderr go to JOBDIR/stdout and JOBDIR/stderr as it writes them (at most
 * cap + 1 bytes each: one byte more tells the node the job wrote more than its cap), and the
 * outcome, last, to JOBDIR/result.json through a rename, so a result file that exists is
 * complete: {"status", "exit_code", "returns", "error", "wall_ms", "cpu_ms"}.
 *
 * This is the one place where a MicroPython node's wasm jobs meet their limits and WASI, with
 * the same semantics and error kinds as the CPython executor (edge/executors/runner.py):
 *   - WASI preview1, the same subset as wasi.py (args, environ, clocks, random, stdio,
 *     proc_exit, poll_oneoff clocks), files confined to the job's preopened directories
 *     (wasi_fs.c), and gas metering through metering.usegas; a module importing anything
 *     else (sockets) is refused up front;
 *   - wall-clock timeout: an interval timer checks the deadline (and that the node is alive)
 *     and ends the job from the signal handler; RLIMIT_CPU is the backstop. The node may stop
 *     a job (SIGSTOP) while its owner uses the machine; before it continues it (SIGCONT) it
 *     writes to JOBDIR/paused how long it was stopped (see paused_ns), which neither times
 *     out nor counts as wall time;
 *   - memory: memory.grow past the job's cap ends the job with "memory limit" (calls to
 *     wasm3's ResizeMemory from its interpreter are renamed to ours at build time, see
 *     tools/build-wasm3-runner.sh); RLIMIT_AS bounds wasm3's own allocations;
 *   - a job runs on a thread with a 64 MiB stack, because wasm3 recurses on the C stack for
 *     wasm calls and its own 1 MiB wasm stack must overflow (a clean trap) first.
 * The job itself runs in wasm3loop.c, the loop the boards' engine shares; this file is the
 * process around it. Every way out goes through write_result(), which is async-signal-safe: it
 * formats the result without malloc or stdio, writes it and _exit()s, so no exit path can hang
 * or half-write.
 */

#include "wasm3run.h"

/* ------------------------------------------------------------------------------------------ */
/* The job, as the node described it                                                          */

Job job = {.timeout_ms = 60000, .memory_mb = 64, .stdout_cap = 1 << 20, .stderr_cap = 64 << 10};

static char path_result[PATH_MAX], path_result_tmp[PATH_MAX], path_paused[PATH_MAX];
int out_fd = -1, err_fd = -1, in_fd = -1;
uint64_t out_size, err_size;
static struct timespec t0, c0;
static int64_t deadline_ns;
static pid_t parent_pid;
static char timeout_msg[128], cpu_timeout_msg[160];
static volatile int done_flag;

/* ------------------------------------------------------------------------------------------ */
/* write_result(): the async-signal-safe way out                                              */

/* Length of the valid UTF-8 sequence at s (n bytes left), or 0 when it is not valid. */
static int utf8_len(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    int len;
    unsigned min;
    if (c < 0x80) return 1;
    if ((c & 0xE0) == 0xC0) len = 2, min = 0x80;
    else if ((c & 0xF0) == 0xE0) len = 3, min = 0x800;
    else if ((c & 0xF8) == 0xF0) len = 4, min = 0x10000;
    else return 0;
    if ((size_t)len > n) return 0;
    unsigned cp = c & (0x3F >> (len - 1));
    for (int i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
    return len;
}

/* A JSON string; bytes that are not UTF-8 become U+FFFD, as Python's "replace" would. */
static void sb_json(Sb *b, const char *s, size_t n) {
    static const char hex[] = "0123456789abcdef";
    sb_raw(b, "\"", 1);
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0;
    while (i < n && b->len + 8 < b->cap) {
        unsigned c = u[i];
        if (c == '"' || c == '\\') {
            char esc[2] = {'\\', (char)c};
            sb_raw(b, esc, 2);
            i++;
        } else if (c < 0x20 || c == 0x7f) {
            char esc[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
            sb_raw(b, esc, 6);
            i++;
        } else {
            int len = utf8_len(u + i, n - i);
            if (len) {
                sb_raw(b, s + i, (size_t)len);
                i += (size_t)len;
            } else {
                sb_raw(b, "\\ufffd", 6);
                i++;
            }
        }
    }
    sb_raw(b, "\"", 1);
}

int write_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* How long the node kept this job stopped (SIGSTOP) since its clock started: neither timed
 * out nor reported as wall time. Before each SIGCONT the node writes JOBDIR/paused: the
 * milliseconds of stops that began after it saw JOBDIR/started, then "start end" wall-clock
 * pairs of the stops that began before (a stop may land before this process got that far,
 * even before it exec'd), of which only the part after start_real_ms is ours. */
static int64_t start_real_ms;

static int64_t paused_ns(void) {
    int fd = open(path_paused, O_RDONLY);
    if (fd < 0) return 0;
    char buf[512];
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 0;
    int64_t v[32];
    int k = 0;
    for (ssize_t i = 0; i < n && k < 31;) {
        while (i < n && (buf[i] < '0' || buf[i] > '9')) i++;
        if (i >= n) break;
        int64_t x = 0;
        while (i < n && buf[i] >= '0' && buf[i] <= '9' && x < (1LL << 50)) x = x * 10 + (buf[i++] - '0');
        v[k++] = x;
    }
    int64_t ms = k ? v[0] : 0;
    for (int j = 1; j + 1 < k; j += 2) {
        int64_t from = v[j] > start_real_ms ? v[j] : start_real_ms;
        if (v[j + 1] > from) ms += v[j + 1] - from;
    }
    return ms * 1000000LL;
}

/* Writes the result and ends the process. exit_code < 0: null. Only async-signal-safe calls:
 * this runs from signal handlers too. The first caller wins; a signal handler that comes
 * second returns (the process is on its way out), anyone else waits for the end. */
static void write_result(int completed, int64_t exit_code, const char *error,
                         const char *returns, int from_signal) {
    if (!__sync_bool_compare_and_swap(&done_flag, 0, 1)) {
        if (from_signal) return;
        for (;;) pause();
    }
    struct timespec now, cpu;
    clock_gettime(CLOCK_MONOTONIC, &now);
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &cpu);
    static char buf[ERR_MAX + 4096];
    Sb b = {buf, sizeof buf, 0};
    sb_str(&b, completed ? "{\"status\":\"completed\",\"exit_code\":"
                         : "{\"status\":\"failed\",\"exit_code\":");
    if (exit_code < 0) sb_str(&b, "null");
    else sb_u64(&b, (uint64_t)exit_code);
    sb_str(&b, ",\"returns\":");
    sb_str(&b, returns ? returns : "null");
    sb_str(&b, ",\"error\":");
    if (error) sb_json(&b, error, strnlen(error, ERR_MAX));
    else sb_str(&b, "null");
    sb_str(&b, ",\"wall_ms\":");
    int64_t wall = ns_of(&now) - ns_of(&t0) - paused_ns();
    sb_i64(&b, (wall > 0 ? wall : 0) / 1000000);
    sb_str(&b, ",\"cpu_ms\":");
    sb_i64(&b, (ns_of(&cpu) - ns_of(&c0)) / 1000000);
    sb_str(&b, "}\n");
    int fd = open(path_result_tmp, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    int ok = fd >= 0 && write_all(fd, buf, b.len) == 0;
    if (fd >= 0) close(fd);
    ok = ok && rename(path_result_tmp, path_result) == 0;
    if (!ok) {
        static const char msg[] = "wasm3-run: cannot write the result file\n";
        (void)!write(2, msg, sizeof msg - 1);
    }
    _exit(ok ? 0 : 70);
}

/* An ending before the job's loop (the job file, a path) or, by job_thread, after it. */
void runner_end(const Outcome *o) {
    write_result(o->completed, o->exit_code, o->error, o->returns, 0);
    for (;;) pause();
}

/* ------------------------------------------------------------------------------------------ */
/* Signals: the deadline, a vanished node, the CPU backstop, crashes                           */

static void arm_timer(int64_t ns) {
    struct itimerval it = {{0, 0}, {0, 0}};
    if (ns < 1000) ns = 1000;
    it.it_value.tv_sec = ns / 1000000000LL;
    it.it_value.tv_usec = (ns % 1000000000LL) / 1000;
    setitimer(ITIMER_REAL, &it, NULL);
}

static void on_alarm(int sig) {
    (void)sig;
    int saved = errno;
    int64_t left = deadline_ns + paused_ns() - mono_ns();
    if (left <= 0) write_result(0, -1, timeout_msg, NULL, 1);
    else if (parent_pid > 1 && kill(parent_pid, 0) == -1 && errno == ESRCH)
        write_result(0, -1, "executor error: the node that started this job went away", NULL, 1);
    else arm_timer(left < TICK_NS ? left : TICK_NS);
    errno = saved;
}

static void on_xcpu(int sig) {
    (void)sig;
    write_result(0, -1, cpu_timeout_msg, NULL, 1);
}

static void on_fatal(int sig) {
    const char *msg;
    switch (sig) {
    case SIGSEGV: msg = "executor error: wasm3 runner crashed (SIGSEGV)"; break;
    case SIGBUS: msg = "executor error: wasm3 runner crashed (SIGBUS)"; break;
    case SIGILL: msg = "executor error: wasm3 runner crashed (SIGILL)"; break;
    case SIGFPE: msg = "executor error: wasm3 runner crashed (SIGFPE)"; break;
    case SIGABRT: msg = "executor error: wasm3 runner crashed (SIGABRT)"; break;
    case SIGTERM: msg = "executor error: wasm3 runner stopped by SIGTERM"; break;
    case SIGINT: msg = "executor error: wasm3 runner stopped by SIGINT"; break;
    default: msg = "executor error: wasm3 runner stopped by SIGHUP"; break;
    }
    write_result(0, -1, msg, NULL, 1);
    _exit(70); /* finishing already, and then this: do not loop on the fault */
}

static void on(int sig, void (*handler)(int), int flags) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = handler;
    sa.sa_flags = flags;
    sigfillset(&sa.sa_mask);
    sigaction(sig, &sa, NULL);
}

/* ------------------------------------------------------------------------------------------ */
/* The job: its files, its limits, and the loop on a thread of its own                        */

static uint8_t *read_file(const char *path, size_t *len, int required) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) {
        if (!required && errno == ENOENT) return NULL;
        failf("executor error: cannot read %s: %s", path, strerror(errno));
    }
    struct stat st;
    if (fstat(fd, &st) < 0) failf("executor error: cannot read %s: %s", path, strerror(errno));
    uint8_t *buf = malloc((size_t)st.st_size + 1);
    if (!buf) failf("executor error: %s is too large to load", path);
    size_t got = 0;
    while (got < (size_t)st.st_size) {
        ssize_t n = read(fd, buf + got, (size_t)st.st_size - got);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        got += (size_t)n;
    }
    close(fd);
    *len = got;
    return buf;
}

static uint64_t record_number(Str v, const char *key) {
    uint64_t n = 0;
    if (!v.n || v.n > 18) failf("executor error: job file: %s is not a number", key);
    for (uint32_t i = 0; i < v.n; i++) {
        if (v.p[i] < '0' || v.p[i] > '9') failf("executor error: job file: %s is not a number", key);
        n = n * 10 + (v.p[i] - '0');
    }
    return n;
}

/* A "dir" record: MODE GUEST \0 HOST, MODE "r" or "w"; both paths non-empty, the host's a C
 * string (no second NUL) shorter than PATH_MAX. */
static void read_dir(Str v) {
    if (job.ndirs >= FS_MAX_DIRS)
        failf("executor error: job file: more than %d directories", FS_MAX_DIRS);
    const uint8_t *nul = v.n ? memchr(v.p, 0, v.n) : NULL;
    if (!nul || (v.p[0] != 'r' && v.p[0] != 'w'))
        fail("executor error: job file: a dir record is malformed");
    uint32_t guest_n = (uint32_t)(nul - v.p) - 1, host_n = v.n - guest_n - 2;
    if (!guest_n || !host_n || host_n >= PATH_MAX || memchr(nul + 1, 0, host_n))
        fail("executor error: job file: a dir record is malformed");
    char *host = malloc(host_n + 1);
    if (!host) fail("executor error: out of memory");
    memcpy(host, nul + 1, host_n);
    host[host_n] = 0;
    job.dirs = grow_array(job.dirs, job.ndirs, sizeof(Preopen));
    job.dirs[job.ndirs++] = (Preopen){{v.p + 1, guest_n}, host, v.p[0] == 'w'};
}

/* Records "KEY LEN\nBYTES\n"; a file the node wrote, so anything else is a bug to report. */
static void read_job(const uint8_t *b, size_t n) {
    size_t pos = 0;
    while (pos < n) {
        size_t key = pos;
        while (pos < n && b[pos] != ' ') pos++;
        size_t key_len = pos - key;
        uint64_t len = 0;
        pos++;
        while (pos < n && b[pos] >= '0' && b[pos] <= '9' && len < ((uint64_t)1 << 40))
            len = len * 10 + (b[pos++] - '0');
        /* compared with what is left (pos < n), not added to pos; a value is a Str: < 4 GiB */
        if (pos >= n || b[pos] != '\n' || len > UINT32_MAX || len + 2 > n - pos ||
            b[pos + 1 + len] != '\n')
            fail("executor error: job file is malformed");
        Str v = {b + pos + 1, (uint32_t)len};
        pos += len + 2;
        char k[16] = {0};
        memcpy(k, b + key, key_len < 15 ? key_len : 15);
        if (key_len > 15) k[0] = 0;
        if (!strcmp(k, "entry")) job.entry = v;
        else if (!strcmp(k, "job_id")) job.job_id = v;
        else if (!strcmp(k, "arg")) {
            job.args = grow_array(job.args, job.nargs, sizeof(Str));
            job.args[job.nargs++] = v;
        } else if (!strcmp(k, "env")) {
            job.env = grow_array(job.env, job.nenv, sizeof(Str));
            job.env[job.nenv++] = v;
        } else if (!strcmp(k, "timeout_ms")) job.timeout_ms = record_number(v, k);
        else if (!strcmp(k, "memory_mb")) job.memory_mb = record_number(v, k);
        else if (!strcmp(k, "stdout_cap")) job.stdout_cap = record_number(v, k);
        else if (!strcmp(k, "stderr_cap")) job.stderr_cap = record_number(v, k);
        else if (!strcmp(k, "gas")) job.gas = record_number(v, k);
        else if (!strcmp(k, "dir")) read_dir(v);
        else fail("executor error: job file has an unknown key");
    }
    if (!job.entry.n) job.entry = (Str){(const uint8_t *)"_start", 6};
    if (!job.job_id.n) job.job_id = (Str){(const uint8_t *)"job", 3};
    if (!job.memory_mb) job.memory_mb = 64;
    if (!job.timeout_ms) job.timeout_ms = 60000;
}

static uint64_t vm_bytes(void) {
    unsigned long long pages = 0;
    int fd = open("/proc/self/statm", O_RDONLY);
    if (fd < 0) return 0;
    char buf[64] = {0};
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0 || sscanf(buf, "%llu", &pages) != 1) return 0;
    return pages * (uint64_t)sysconf(_SC_PAGESIZE);
}

static void set_limits(uint64_t module_len, uint32_t cap_pages) {
    uint64_t vm = vm_bytes();
    if (vm) {
        uint64_t want = vm + 2 * (uint64_t)cap_pages * PAGE + 4 * module_len + AS_SLACK;
        struct rlimit rl;
        getrlimit(RLIMIT_AS, &rl);
        if (rl.rlim_max == RLIM_INFINITY || want < rl.rlim_max) {
            rl.rlim_cur = want;
            setrlimit(RLIMIT_AS, &rl);
        }
    }
    struct rlimit rl;
    getrlimit(RLIMIT_CPU, &rl);
    struct timespec cpu;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &cpu);
    rlim_t soft = (rlim_t)cpu.tv_sec + (rlim_t)((job.timeout_ms + 999) / 1000) + 2;
    if (rl.rlim_max == RLIM_INFINITY || soft < rl.rlim_max) {
        rl.rlim_cur = soft;
        setrlimit(RLIMIT_CPU, &rl);
    }
}

/* What wasm3-run gives a job that the boards' engine cannot: its directories, and limits on
 * the process (the job is all that runs in it). */
static void prepare(size_t module_len, uint32_t cap_pages) {
    fs_open_preopens(); /* before the address-space limit: a failure here is the node's */
    set_limits(module_len, cap_pages);
}

static const Runner PROCESS = {WASM_STACK_BYTES, "executor error: out of memory", prepare};

static const char *job_dir;

/* The job's clocks start here. The wall-clock time goes to JOBDIR/started first, so the node
 * can tell how much of a stop (SIGSTOP, which cannot be caught) fell after this point: it
 * writes that to JOBDIR/paused (see paused_ns). A stop before this point is not ours. */
static void mark_start(const char *dir) {
    char path[PATH_MAX], buf[32];
    struct timespec now;
    /* no system call between these three (vDSO): a stop is taken on the way out of one */
    clock_gettime(CLOCK_REALTIME, &now);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c0);
    start_real_ms = ns_of(&now) / 1000000;
    snprintf(buf, sizeof buf, "%lld\n", (long long)start_real_ms);
    snprintf(path, sizeof path, "%s/started", dir);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd >= 0) {
        (void)!write(fd, buf, strlen(buf));
        close(fd);
    }
}

static void *job_thread(void *arg) {
    (void)arg;
    /* the crash handler needs a stack of its own when the fault is a native stack overflow */
    static char alt[1 << 16];
    stack_t ss = {.ss_sp = alt, .ss_size = sizeof alt, .ss_flags = 0};
    sigaltstack(&ss, NULL);
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/module.wasm", job_dir);
    job.module = read_file(path, &job.module_len, 1);
    Outcome o = run_job(&PROCESS);
    runner_end(&o);
}

static int open_output(const char *dir, const char *name) {
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) failf("executor error: cannot write %s: %s", path, strerror(errno));
    return fd;
}

static void usage(void) {
    fputs("usage: wasm3-run [--parent PID] JOBDIR\n"
          "Runs the wasm job described in JOBDIR (see edge/native/wasm3run.c) and writes\n"
          "JOBDIR/stdout, JOBDIR/stderr and, last, JOBDIR/result.json.\n",
          stderr);
}

int main(int argc, char **argv) {
    int i = 1;
    for (; i < argc && argv[i][0] == '-'; i++) {
        if (!strcmp(argv[i], "--parent") && i + 1 < argc) {
            char *end;
            long v = strtol(argv[++i], &end, 10);
            if (*end || v < 0) {
                fprintf(stderr, "wasm3-run: --parent takes a process id, not %s\n", argv[i]);
                return 64;
            }
            parent_pid = (pid_t)v;
        } else if (!strcmp(argv[i], "--version")) {
            printf("wasm3-run 1 (wasm3 %s)\n", M3_VERSION);
            return 0;
        } else {
            usage();
            return strcmp(argv[i], "--help") && strcmp(argv[i], "-h") ? 64 : 0;
        }
    }
    if (i + 1 != argc) {
        usage();
        return 64;
    }
    job_dir = argv[i];
    struct stat st;
    if (stat(job_dir, &st) < 0 || !S_ISDIR(st.st_mode)) {
        fprintf(stderr, "wasm3-run: %s is not a directory\n", job_dir);
        return 66;
    }
    snprintf(path_paused, sizeof path_paused, "%s/paused", job_dir);
    mark_start(job_dir);
    if (snprintf(path_result, sizeof path_result, "%s/result.json", job_dir) >= (int)sizeof path_result ||
        snprintf(path_result_tmp, sizeof path_result_tmp, "%s/result.json.tmp", job_dir) >=
            (int)sizeof path_result_tmp) {
        fprintf(stderr, "wasm3-run: %s: path too long\n", job_dir);
        return 66;
    }
    setsid(); /* a terminal's Ctrl-C is for the node, which then stops its jobs itself */
    (void)!nice(19); /* as the CPython workers: the owner's programs always come first */
    mallopt(M_ARENA_MAX, 1); /* one arena: the address-space limit then measures the job */
    struct rlimit core = {0, 0};
    getrlimit(RLIMIT_CORE, &core);
    core.rlim_cur = 0;
    setrlimit(RLIMIT_CORE, &core);

    on(SIGALRM, on_alarm, SA_RESTART);
    on(SIGXCPU, on_xcpu, 0);
    int fatal[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT, SIGTERM, SIGINT, SIGHUP};
    for (size_t k = 0; k < sizeof fatal / sizeof fatal[0]; k++) on(fatal[k], on_fatal, SA_ONSTACK);
    signal(SIGPIPE, SIG_IGN);

    size_t job_len = 0;
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/job", job_dir);
    uint8_t *job_bytes = read_file(path, &job_len, 1);
    read_job(job_bytes, job_len);
    double timeout_s = (double)job.timeout_ms / 1000.0;
    snprintf(timeout_msg, sizeof timeout_msg, "timeout: job exceeded its %gs limit", timeout_s);
    snprintf(cpu_timeout_msg, sizeof cpu_timeout_msg,
             "timeout: job exceeded its %gs limit (CPU time)", timeout_s);
    deadline_ns = ns_of(&t0) + (int64_t)job.timeout_ms * 1000000LL;
    out_fd = open_output(job_dir, "stdout");
    err_fd = open_output(job_dir, "stderr");
    snprintf(path, sizeof path, "%s/stdin", job_dir);
    in_fd = open(path, O_RDONLY | O_CLOEXEC);
    arm_timer(deadline_ns - mono_ns() < TICK_NS ? deadline_ns - mono_ns() : TICK_NS);

    pthread_attr_t attr;
    pthread_t th;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, NATIVE_STACK_BYTES);
    if (pthread_create(&th, &attr, job_thread, NULL) != 0)
        fail("executor error: cannot start the job thread");
    pthread_join(th, NULL);
    fail("executor error: the job ended without a result");
    return 70;
}
