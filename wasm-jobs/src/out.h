/* Tiny output helpers shared by the C jobs. They use write(2) instead of stdio
 * because printf drags in fd_seek, fd_close and fd_fdstat_get imports (and ~20 KB)
 * that every executor would then have to provide. */
#ifndef WASM_JOBS_OUT_H
#define WASM_JOBS_OUT_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

/* Write all of buf; a short write is retried, an error gives up. */
static inline void put_bytes(int fd, const char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n <= 0) return;
        buf += n;
        len -= (size_t)n;
    }
}

static inline void put_str(int fd, const char *s) { put_bytes(fd, s, strlen(s)); }

static inline void put_u64(int fd, uint64_t v) {
    char digits[20];
    size_t i = sizeof digits;
    do {
        digits[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v != 0);
    put_bytes(fd, digits + i, sizeof digits - i);
}

#endif
