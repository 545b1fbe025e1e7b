/* Shared by the three parts of wasm3-run: wasm3run.c (the job's life: job file, limits,
 * signals, the result), module.c (the module and the call's arguments, read before wasm3
 * sees them) and wasi.c (the host functions). What the program does: wasm3run.c. */

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

typedef struct {
    Str entry, job_id;
    Str *args;
    uint32_t nargs;
    Str *env;
    uint32_t nenv;
    uint64_t timeout_ms, memory_mb, stdout_cap, stderr_cap, gas;
} Job;

extern Job job;
extern int out_fd, err_fd, in_fd;
extern uint64_t out_size, err_size;
extern char errbuf[ERR_MAX];

/* wasm3run.c: text without malloc (signal handlers use it) and the ways out */
typedef struct {
    char *buf;
    size_t cap, len;
} Sb;

void sb_raw(Sb *b, const char *s, size_t n);
void sb_str(Sb *b, const char *s);
void sb_u64(Sb *b, uint64_t v);
void sb_i64(Sb *b, int64_t v);
void sb_json(Sb *b, const char *s, size_t n);
int64_t ns_of(const struct timespec *t);
int64_t mono_ns(void);
int write_all(int fd, const char *p, size_t n);
void finish(int completed, int64_t exit_code, const char *error, const char *returns,
            int from_signal);
void fail(const char *error) __attribute__((noreturn));
void failf(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

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

/* wasi.c */
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

#endif
