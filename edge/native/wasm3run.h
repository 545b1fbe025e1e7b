/* Shared by the parts of wasm3-run: wasm3run.c (the job's life: job file, limits, signals,
 * the result), wasm3loop.c (the job in wasm3, from the module's bytes to its outcome),
 * module.c (the module and the call's arguments, read before wasm3 sees them), wasi.c (the
 * host functions) and wasi_fs.c (WASI's files, confined to the job's preopened directories).
 * The boards' engine (firmware/wasm3/dp_engine.c) is built from the same files but wasm3run.c
 * and wasi_fs.c. What the program does: wasm3run.c. */

#ifndef DEPARROW_WASM3RUN_H
#define DEPARROW_WASM3RUN_H

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <malloc.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>
#if defined(__linux__)
#include <sys/random.h>
#endif

#include "wasm3.h"
#include "m3_env.h"
#include "m3_compile.h"

#define WASM_STACK_BYTES (1u << 20)
#define NATIVE_STACK_BYTES ((size_t)64 << 20)
#define PAGE 65536u
#define AS_SLACK ((uint64_t)64 << 20)
#define TICK_NS 250000000LL /* the timer looks at the deadline and the node this often */
#define MAX_VALUES 64       /* parameters or results of an invoked function */
#define ERR_MAX 8192
#define WASI "wasi_snapshot_preview1"

/* errno values from the preview1 witx, as in wasi.py */
#define W_SUCCESS 0
#define W_EBADF 8
#define W_EFAULT 21
#define W_EINVAL 28
#define W_ESPIPE 70
#define RIGHTS_STDIN ((1ull << 1) | (1ull << 3) | (1ull << 27))
#define RIGHTS_STDOUT ((1ull << 6) | (1ull << 3) | (1ull << 27))

typedef struct {
    const uint8_t *p;
    uint32_t n;
} Str;

/* A directory the job sees (a WASI preopen): the host's path, the name the guest sees it by,
 * and whether the job may change what is in it. */
typedef struct {
    Str guest;
    char *host;
    int write;
} Preopen;

typedef struct {
    const uint8_t *module;
    size_t module_len;
    Str entry, job_id;
    Str *args;
    uint32_t nargs;
    Str *env;
    uint32_t nenv;
    Preopen *dirs;
    uint32_t ndirs;
    uint64_t timeout_ms, memory_mb, stdout_cap, stderr_cap, gas;
} Job;

extern Job job;
extern int out_fd, err_fd, in_fd;
extern uint64_t out_size, err_size;
extern char errbuf[ERR_MAX];

/* textbuf.c: text without malloc (signal handlers use it) and the clock */
typedef struct {
    char *buf;
    size_t cap, len;
} Sb;

void sb_raw(Sb *b, const char *s, size_t n);
void sb_str(Sb *b, const char *s);
void sb_u64(Sb *b, uint64_t v);
void sb_i64(Sb *b, int64_t v);
int64_t ns_of(const struct timespec *t);
int64_t mono_ns(void);

/* wasm3loop.c: one job in wasm3, from `job` to how it ended. A runner (wasm3run.c, a process
 * per job; firmware/wasm3/dp_engine.c, a job at a time in a process that lives on) fills in
 * `job`, calls run_job() and reports the outcome its own way. */
typedef struct {
    int completed;       /* 1: "completed", 0: "failed" */
    int64_t exit_code;   /* -1: none */
    const char *error;   /* the executor's error words, or NULL */
    const char *returns; /* a JSON array, or NULL */
    int64_t wall_ns;     /* run_job's, from its start to the job's end */
} Outcome;

/* What differs between the runners. */
typedef struct {
    uint32_t wasm_stack;           /* bytes of wasm stack */
    const char *no_memory_for_argv; /* the error when even the job's argv cannot be allocated */
    /* Called once the module and the job have passed the checks, before wasm3 starts; may
     * fail(). NULL: nothing to do. */
    void (*prepare)(size_t module_len, uint32_t cap_pages);
} Runner;

extern int job_running; /* inside run_job: an ending goes back to it */
Outcome run_job(const Runner *runner);
/* Frees what wasm3 and the checks allocated for the last job (a runner that lives on). */
void end_job(void);
/* The job ends: inside run_job, by a longjmp back to it; before or after (a runner's own
 * checks), by the runner's runner_end(). Called by the loop, module.c and the host functions
 * (proc_exit, a cap). */
void finish(int completed, int64_t exit_code, const char *error, const char *returns)
    __attribute__((noreturn));
void fail(const char *error) __attribute__((noreturn));
void failf(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

/* The runner's: its output streams, and its way out for an ending outside run_job. */
int write_all(int fd, const char *p, size_t n);
void runner_end(const Outcome *o) __attribute__((noreturn));

/* module.c */
typedef struct {
    Str mod, name;
    uint8_t kind;
} Import;

typedef struct {
    Str name;
    uint8_t kind;
    uint32_t index;
} Export;

struct ModuleInfo {
    const uint8_t *b;
    size_t n;
    Import *imports;
    uint32_t nimports;
    Export *exports;
    uint32_t nexports;
    int has_memory, has_max;
    uint32_t mem_min, mem_max;
};

extern struct ModuleInfo info;
extern const char *const KINDS[4];
void *grow_array(void *p, uint32_t count, size_t size);
void read_module(const uint8_t *b, size_t n);
const Export *find_export(Str name);
int cmp_names(const void *a, const void *b);
void repr(Sb *b, Str s);
void convert_args(IM3Function f, uint64_t *vals);
void sb_double(Sb *b, double d);

/* wasi.c: the host functions, and what wasi_fs.c shares of them */
#define ARG32(name) uint32_t name = (uint32_t) * (_sp++)
#define ARG64(name) uint64_t name = *(_sp++)
#define RET32(v)                                                                                  \
    do {                                                                                          \
        *(uint32_t *)ret = (uint32_t)(v);                                                         \
        return m3Err_none;                                                                        \
    } while (0)

uint8_t *wasi_mem(IM3Runtime rt, uint64_t ptr, uint64_t len);

static inline void put32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static inline void put64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static inline uint32_t get32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline uint64_t get64(const uint8_t *p) { return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32; }

typedef struct {
    const char *name, *sig;
    M3RawCall fn;
} WasiFn;

extern Str *argv_items;
extern uint32_t argv_count;
extern int64_t gas_left;
const WasiFn *wasi_fn(Str mod, Str name);
int is_gas_import(Str mod, Str name);
m3ApiRawFunction(metering_usegas);

/* wasi_fs.c: WASI's files, in wasm3-run only. A board (firmware/wasm3, DEPARROW_NO_FILES) has no
 * directories to give a job: there wasm3-run's file imports stay unknown, and refused. */
#ifndef DEPARROW_NO_FILES
#define FS_MAX_FDS 128   /* open descriptors per job: stdio, preopens and files together */
#define FS_MAX_DIRS 32   /* preopened directories per job */
void fs_open_preopens(void);
extern const WasiFn FS_FNS[]; /* the host functions only files have */
extern const size_t N_FS_FNS;
uint32_t fs_read(IM3Runtime rt, uint32_t fd, uint32_t iovs, uint32_t n, uint32_t nread_ptr);
uint32_t fs_write(IM3Runtime rt, uint32_t fd, uint32_t iovs, uint32_t n, uint32_t nwritten_ptr);
uint32_t fs_close(uint32_t fd);
uint32_t fs_seek(IM3Runtime rt, uint32_t fd, uint64_t offset, uint32_t whence, uint32_t out_ptr);
uint32_t fs_fdstat_get(IM3Runtime rt, uint32_t fd, uint32_t stat_ptr);
uint32_t fs_fdstat_set_flags(uint32_t fd, uint32_t flags);
uint32_t fs_prestat_get(IM3Runtime rt, uint32_t fd, uint32_t buf);
uint32_t fs_prestat_dir_name(IM3Runtime rt, uint32_t fd, uint32_t path, uint32_t len);
#endif

#endif
