/* The bounded string builder (Sb) and the monotonic clock that wasm3-run (wasm3run.c) and
 * the boards' engine (firmware/wasm3/dp_engine.c) both build their results with. */
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "wasm3run.h"

void sb_raw(Sb *b, const char *s, size_t n) {
    while (n-- && b->len + 1 < b->cap) b->buf[b->len++] = *s++;
}

void sb_str(Sb *b, const char *s) { sb_raw(b, s, strlen(s)); }

void sb_u64(Sb *b, uint64_t v) {
    char tmp[24];
    int i = 0;
    do {
        tmp[i++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (i) sb_raw(b, &tmp[--i], 1);
}

void sb_i64(Sb *b, int64_t v) {
    if (v < 0) {
        sb_raw(b, "-", 1);
        sb_u64(b, (uint64_t)0 - (uint64_t)v);
    } else {
        sb_u64(b, (uint64_t)v);
    }
}

int64_t ns_of(const struct timespec *t) { return (int64_t)t->tv_sec * 1000000000LL + t->tv_nsec; }

int64_t mono_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return ns_of(&t);
}
