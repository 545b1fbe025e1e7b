/* wasm3-run, part three: the host functions. WASI preview1, the subset
 * edge/executors/wasi.py gives CPython nodes (the same calls, errno values and caps), and
 * gas metering as pywasm3 does it. Descriptors past stdio are files and directories in the
 * job's preopened directories: wasi_fs.c (not on boards, see wasm3run.h). */

#include "wasm3run.h"

/* ------------------------------------------------------------------------------------------ */
/* WASI preview1: the subset of wasi.py, over the instance's memory                            */

Str *argv_items; /* argv as the job sees it */
uint32_t argv_count;

/* The job's bytes [ptr, ptr + len), or NULL when any is outside its memory. Both numbers are
 * the job's: compared with the size, never added first (the sum could wrap). */
uint8_t *wasi_mem(IM3Runtime rt, uint64_t ptr, uint64_t len) {
    uint32_t size = 0;
    uint8_t *m = m3_GetMemory(rt, &size, 0);
    if (!m || len > size || ptr > size - len) return NULL;
    return m + ptr;
}

#define mem wasi_mem

static const void *sizes(IM3Runtime rt, uint64_t *ret, const Str *items, uint32_t count,
                         uint32_t count_ptr, uint32_t size_ptr) {
    uint64_t total = 0;
    for (uint32_t i = 0; i < count; i++) total += (uint64_t)items[i].n + 1;
    uint8_t *a = mem(rt, count_ptr, 4), *s = mem(rt, size_ptr, 4);
    if (!a || !s) RET32(W_EFAULT);
    put32(a, count);
    put32(s, (uint32_t)total);
    RET32(W_SUCCESS);
}

static const void *fill(IM3Runtime rt, uint64_t *ret, const Str *items, uint32_t count,
                        uint32_t ptrs, uint32_t buf) {
    uint64_t total = 0; /* in 64 bits: n + 1 of a 4 GiB item would wrap to 0 in 32 */
    for (uint32_t i = 0; i < count; i++) total += (uint64_t)items[i].n + 1;
    uint8_t *dst = mem(rt, buf, total), *tab = mem(rt, ptrs, 4 * (uint64_t)count);
    if (!dst || !tab) RET32(W_EFAULT);
    for (uint32_t i = 0; i < count; i++) {
        put32(tab + 4 * i, buf);
        memcpy(dst, items[i].p, items[i].n);
        dst[items[i].n] = 0;
        dst += items[i].n + 1;
        buf += items[i].n + 1;
    }
    RET32(W_SUCCESS);
}

m3ApiRawFunction(w_args_sizes_get) {
    uint64_t *ret = _sp++;
    ARG32(argc_ptr);
    ARG32(size_ptr);
    return sizes(runtime, ret, argv_items, argv_count, argc_ptr, size_ptr);
}

m3ApiRawFunction(w_args_get) {
    uint64_t *ret = _sp++;
    ARG32(argv_ptr);
    ARG32(buf_ptr);
    return fill(runtime, ret, argv_items, argv_count, argv_ptr, buf_ptr);
}

m3ApiRawFunction(w_environ_sizes_get) {
    uint64_t *ret = _sp++;
    ARG32(count_ptr);
    ARG32(size_ptr);
    return sizes(runtime, ret, job.env, job.nenv, count_ptr, size_ptr);
}

m3ApiRawFunction(w_environ_get) {
    uint64_t *ret = _sp++;
    ARG32(env_ptr);
    ARG32(buf_ptr);
    return fill(runtime, ret, job.env, job.nenv, env_ptr, buf_ptr);
}

/* Nanoseconds on a WASI clock, or -1 for a clock it does not have. */
static int64_t clock_now(uint32_t id) {
    struct timespec t;
    clockid_t c;
    if (id == 0) c = CLOCK_REALTIME;
    else if (id == 1) c = CLOCK_MONOTONIC;
    else if (id == 2 || id == 3) c = CLOCK_PROCESS_CPUTIME_ID;
    else return -1;
    clock_gettime(c, &t);
    return ns_of(&t);
}

m3ApiRawFunction(w_clock_res_get) {
    uint64_t *ret = _sp++;
    ARG32(id);
    ARG32(res_ptr);
    if (clock_now(id) < 0) RET32(W_EINVAL);
    uint8_t *p = mem(runtime, res_ptr, 8);
    if (!p) RET32(W_EFAULT);
    put64(p, 1000);
    RET32(W_SUCCESS);
}

m3ApiRawFunction(w_clock_time_get) {
    uint64_t *ret = _sp++;
    ARG32(id);
    ARG64(precision);
    ARG32(time_ptr);
    (void)precision;
    int64_t now = clock_now(id);
    if (now < 0) RET32(W_EINVAL);
    uint8_t *p = mem(runtime, time_ptr, 8);
    if (!p) RET32(W_EFAULT);
    put64(p, (uint64_t)now);
    RET32(W_SUCCESS);
}

m3ApiRawFunction(w_random_get) {
    uint64_t *ret = _sp++;
    ARG32(buf);
    ARG32(len);
    uint8_t *p = mem(runtime, buf, len);
    if (!p) RET32(W_EFAULT);
    size_t got = 0;
    while (got < len) {
#if defined(__linux__)
        ssize_t n = getrandom(p + got, len - got, 0);
#else
        ssize_t n = (getentropy(p + got, len - got > 256 ? 256 : len - got) == 0)
                        ? (ssize_t)(len - got > 256 ? 256 : len - got)
                        : -1;
#endif
        if (n < 0) {
            if (errno == EINTR) continue;
            RET32(W_EFAULT);
        }
        got += (size_t)n;
    }
    RET32(W_SUCCESS);
}

/* Keeps cap + 1 bytes of a stream; the node reads the extra byte as "truncated". */
static void capped_write(int fd, uint64_t *size, uint64_t cap, const uint8_t *p, uint64_t n) {
    if (*size > cap) return;
    uint64_t room = cap + 1 - *size;
    if (n > room) n = room;
    if (write_all(fd, (const char *)p, n) == 0) *size += n;
}

m3ApiRawFunction(w_fd_write) {
    uint64_t *ret = _sp++;
    ARG32(fd);
    ARG32(iovs);
    ARG32(iovs_len);
    ARG32(nwritten_ptr);
#ifndef DEPARROW_NO_FILES
    if (fd > 2) RET32(fs_write(runtime, fd, iovs, iovs_len, nwritten_ptr));
#endif
    if (fd != 1 && fd != 2) RET32(W_EBADF);
    uint8_t *vec = mem(runtime, iovs, 8 * (uint64_t)iovs_len);
    if (!vec) RET32(W_EFAULT);
    uint64_t total = 0;
    for (uint32_t i = 0; i < iovs_len; i++) {
        uint32_t buf = get32(vec + 8 * i), len = get32(vec + 8 * i + 4);
        if (!mem(runtime, buf, len)) RET32(W_EFAULT);
    }
    for (uint32_t i = 0; i < iovs_len; i++) {
        uint32_t buf = get32(vec + 8 * i), len = get32(vec + 8 * i + 4);
        if (!len) continue;
        if (fd == 1) capped_write(out_fd, &out_size, job.stdout_cap, mem(runtime, buf, len), len);
        else capped_write(err_fd, &err_size, job.stderr_cap, mem(runtime, buf, len), len);
        total += len;
    }
    /* a capped stream still reports everything as written: the job runs on unaware */
    uint8_t *nw = mem(runtime, nwritten_ptr, 4);
    if (!nw) RET32(W_EFAULT);
    put32(nw, (uint32_t)total);
    RET32(W_SUCCESS);
}

m3ApiRawFunction(w_fd_read) {
    uint64_t *ret = _sp++;
    ARG32(fd);
    ARG32(iovs);
    ARG32(iovs_len);
    ARG32(nread_ptr);
#ifndef DEPARROW_NO_FILES
    if (fd > 2) RET32(fs_read(runtime, fd, iovs, iovs_len, nread_ptr));
#endif
    if (fd != 0) RET32(W_EBADF);
    uint8_t *vec = mem(runtime, iovs, 8 * (uint64_t)iovs_len);
    if (!vec) RET32(W_EFAULT);
    for (uint32_t i = 0; i < iovs_len; i++)
        if (!mem(runtime, get32(vec + 8 * i), get32(vec + 8 * i + 4))) RET32(W_EFAULT);
    uint64_t total = 0;
    for (uint32_t i = 0; i < iovs_len; i++) {
        uint32_t buf = get32(vec + 8 * i), len = get32(vec + 8 * i + 4);
        uint8_t *p = mem(runtime, buf, len);
        uint32_t got = 0;
        while (in_fd >= 0 && got < len) {
            ssize_t n = read(in_fd, p + got, len - got);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) break;
            got += (uint32_t)n;
        }
        total += got;
        if (got < len) break;
    }
    uint8_t *nr = mem(runtime, nread_ptr, 4);
    if (!nr) RET32(W_EFAULT);
    put32(nr, (uint32_t)total);
    RET32(W_SUCCESS);
}

m3ApiRawFunction(w_fd_close) {
    uint64_t *ret = _sp++;
    ARG32(fd);
#ifndef DEPARROW_NO_FILES
    if (fd > 2) RET32(fs_close(fd));
#endif
    RET32(fd <= 2 ? W_SUCCESS : W_EBADF);
}

m3ApiRawFunction(w_fd_seek) {
    uint64_t *ret = _sp++;
    ARG32(fd);
    ARG64(offset);
    ARG32(whence);
    ARG32(out_ptr);
#ifndef DEPARROW_NO_FILES
    if (fd > 2) RET32(fs_seek(runtime, fd, offset, whence, out_ptr));
#endif
    (void)offset, (void)whence, (void)out_ptr;
    RET32(fd <= 2 ? W_ESPIPE : W_EBADF);
}

m3ApiRawFunction(w_fd_fdstat_get) {
    uint64_t *ret = _sp++;
    ARG32(fd);
    ARG32(stat_ptr);
#ifndef DEPARROW_NO_FILES
    if (fd > 2) RET32(fs_fdstat_get(runtime, fd, stat_ptr));
#endif
    if (fd > 2) RET32(W_EBADF);
    uint8_t *p = mem(runtime, stat_ptr, 24);
    if (!p) RET32(W_EFAULT);
    memset(p, 0, 24);
    p[0] = 2; /* character device */
    put64(p + 8, fd == 0 ? RIGHTS_STDIN : RIGHTS_STDOUT);
    RET32(W_SUCCESS);
}

m3ApiRawFunction(w_fd_fdstat_set_flags) {
    uint64_t *ret = _sp++;
    ARG32(fd);
    ARG32(flags);
#ifndef DEPARROW_NO_FILES
    if (fd > 2) RET32(fs_fdstat_set_flags(fd, flags));
#endif
    (void)flags;
    RET32(fd <= 2 ? W_SUCCESS : W_EBADF);
}

/* The job's preopened directories (wasi_fs.c); a board has none. */
m3ApiRawFunction(w_fd_prestat_get) {
    uint64_t *ret = _sp++;
    ARG32(fd);
    ARG32(buf);
#ifndef DEPARROW_NO_FILES
    if (fd > 2) RET32(fs_prestat_get(runtime, fd, buf));
#endif
    (void)fd, (void)buf;
    RET32(W_EBADF);
}

m3ApiRawFunction(w_fd_prestat_dir_name) {
    uint64_t *ret = _sp++;
    ARG32(fd);
    ARG32(path);
    ARG32(len);
#ifndef DEPARROW_NO_FILES
    if (fd > 2) RET32(fs_prestat_dir_name(runtime, fd, path, len));
#endif
    (void)fd, (void)path, (void)len;
    RET32(W_EBADF);
}

m3ApiRawFunction(w_proc_exit) {
    ARG32(code);
    finish(1, code, NULL, NULL);
    return m3Err_trapExit;
}

m3ApiRawFunction(w_sched_yield) {
    uint64_t *ret = _sp++;
    RET32(W_SUCCESS);
}

static void sleep_ns(int64_t ns) {
    struct timespec t = {ns / 1000000000LL, ns % 1000000000LL};
    while (nanosleep(&t, &t) == -1 && errno == EINTR) {
    }
}

/* Clocks sleep (the job's deadline still applies); file descriptors are always ready. The
 * subscriptions that fire are the fd ones, or else every clock due at the earliest time. */
m3ApiRawFunction(w_poll_oneoff) {
    uint64_t *ret = _sp++;
    ARG32(in_ptr);
    ARG32(out_ptr);
    ARG32(nsubs);
    ARG32(nevents_ptr);
    if (nsubs == 0) RET32(W_EINVAL);
    uint8_t *in = mem(runtime, in_ptr, 48 * (uint64_t)nsubs);
    if (!in) RET32(W_EFAULT);
    int64_t *due = calloc(nsubs, sizeof(int64_t)); /* calloc: the product cannot wrap */
    if (!due) RET32(W_EFAULT);
    uint32_t nready = 0;
    for (uint32_t i = 0; i < nsubs; i++)
        if (in[48 * i + 8] == 1 || in[48 * i + 8] == 2) nready++;
    int64_t wake = INT64_MAX;
    int any_clock = 0;
    if (!nready) {
        for (uint32_t i = 0; i < nsubs; i++) {
            const uint8_t *s = in + 48 * i;
            if (s[8] != 0) continue;
            int64_t now = clock_now(get32(s + 16));
            if (now < 0) now = mono_ns();
            uint64_t timeout = get64(s + 24);
            int abstime = (s[40] | s[41] << 8) & 1;
            due[i] = abstime ? (int64_t)(timeout - (uint64_t)now) : (int64_t)timeout;
            if (!any_clock || due[i] < wake) wake = due[i];
            any_clock = 1;
        }
        if (!any_clock) {
            free(due);
            RET32(W_EINVAL);
        }
        if (wake > 0) sleep_ns(wake);
    }
    uint8_t *out = mem(runtime, out_ptr, 32 * (uint64_t)nsubs);
    uint8_t *ne = mem(runtime, nevents_ptr, 4);
    uint32_t n = 0;
    for (uint32_t i = 0; out && i < nsubs; i++) {
        const uint8_t *s = in + 48 * i;
        uint8_t tag = s[8];
        if (nready ? !(tag == 1 || tag == 2) : (tag != 0 || due[i] != wake)) continue;
        uint8_t *e = out + 32 * n++; /* event: userdata u64 @0, error u16 @8, type u8 @10 */
        memset(e, 0, 32);
        put64(e, get64(s));
        e[10] = tag;
    }
    free(due);
    if (!out || !ne) RET32(W_EFAULT);
    put32(ne, n);
    RET32(W_SUCCESS);
}

/* Gas metering, as pywasm3 does it: a module instrumented to import metering.usegas (as
 * wasm-instrument's gas-metering pass emits) reports its cost as it runs; past the job's gas
 * budget it traps. Without a budget it runs unmetered. */
int64_t gas_left = INT64_MAX;

m3ApiRawFunction(metering_usegas) {
    int32_t gas = (int32_t) * (_sp++);
    /* a negative cost (the module's to report) is a refund: at most back to unmetered, since
       INT64_MAX - (-1) would overflow */
    if (gas < 0 && gas_left > INT64_MAX + gas) gas_left = INT64_MAX;
    else gas_left -= gas;
    if (gas_left < 0) return "[trap] Out of gas";
    return m3Err_none;
}

int is_gas_import(Str mod, Str name) {
    return mod.n == 8 && !memcmp(mod.p, "metering", 8) && name.n == 6 && !memcmp(name.p, "usegas", 6);
}

static const WasiFn WASI_FNS[] = {
    {"args_get", "i(ii)", w_args_get},
    {"args_sizes_get", "i(ii)", w_args_sizes_get},
    {"environ_get", "i(ii)", w_environ_get},
    {"environ_sizes_get", "i(ii)", w_environ_sizes_get},
    {"clock_res_get", "i(ii)", w_clock_res_get},
    {"clock_time_get", "i(iIi)", w_clock_time_get},
    {"random_get", "i(ii)", w_random_get},
    {"fd_write", "i(iiii)", w_fd_write},
    {"fd_read", "i(iiii)", w_fd_read},
    {"fd_close", "i(i)", w_fd_close},
    {"fd_seek", "i(iIii)", w_fd_seek},
    {"fd_fdstat_get", "i(ii)", w_fd_fdstat_get},
    {"fd_fdstat_set_flags", "i(ii)", w_fd_fdstat_set_flags},
    {"fd_prestat_get", "i(ii)", w_fd_prestat_get},
    {"fd_prestat_dir_name", "i(iii)", w_fd_prestat_dir_name},
    {"proc_exit", "v(i)", w_proc_exit},
    {"sched_yield", "i()", w_sched_yield},
    {"poll_oneoff", "i(iiii)", w_poll_oneoff},
};
#define N_WASI (sizeof WASI_FNS / sizeof WASI_FNS[0])

static const WasiFn *find_fn(const WasiFn *fns, size_t n, Str name) {
    for (size_t i = 0; i < n; i++)
        if (strlen(fns[i].name) == name.n && !memcmp(fns[i].name, name.p, name.n)) return &fns[i];
    return NULL;
}

const WasiFn *wasi_fn(Str mod, Str name) {
    if (mod.n != strlen(WASI) || memcmp(mod.p, WASI, mod.n)) return NULL;
    const WasiFn *f = find_fn(WASI_FNS, N_WASI, name);
#ifndef DEPARROW_NO_FILES
    if (!f) f = find_fn(FS_FNS, N_FS_FNS, name);
#endif
    return f;
}

