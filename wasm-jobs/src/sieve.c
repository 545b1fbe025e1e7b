/* sieve.wasm: counts the primes below N (argv[1], default 100000) with the sieve
 * of Eratosthenes and prints "primes below N: COUNT". A CPU and memory benchmark:
 * it allocates N bytes. Exit 2 on a bad argument, 1 when N bytes can't be had. */
#include <stdint.h>
#include <stdlib.h>

#include "out.h"

#define DEFAULT_N 100000u
#define MAX_N 1000000000u

static int usage(const char *why, const char *arg) {
    put_str(2, "sieve: ");
    put_str(2, why);
    if (arg) {
        put_str(2, ", got '");
        put_str(2, arg);
        put_str(2, "'");
    }
    put_str(2, "\nusage: sieve [N]   (N a whole number from 0 to 1000000000)\n");
    return 2;
}

/* Strict decimal parse: digits only, no sign, no spaces, no overflow past MAX_N. */
static int parse_n(const char *s, uint32_t *out) {
    uint64_t v = 0;
    if (*s == '\0') return 0;
    for (; *s; s++) {
        if (*s < '0' || *s > '9') return 0;
        v = v * 10 + (uint64_t)(*s - '0');
        if (v > MAX_N) return 0;
    }
    *out = (uint32_t)v;
    return 1;
}

int main(int argc, char **argv) {
    uint32_t n = DEFAULT_N;
    if (argc > 2) return usage("too many arguments", NULL);
    if (argc == 2 && !parse_n(argv[1], &n))
        return usage("N must be a whole number from 0 to 1000000000", argv[1]);

    uint32_t count = 0;
    if (n > 2) {
        unsigned char *composite = calloc(n, 1);
        if (!composite) {
            put_str(2, "sieve: out of memory allocating ");
            put_u64(2, n);
            put_str(2, " bytes; try a smaller N\n");
            return 1;
        }
        for (uint32_t i = 2; (uint64_t)i * i < n; i++) {
            if (composite[i]) continue;
            for (uint32_t j = i * i; j < n; j += i) composite[j] = 1;
        }
        for (uint32_t i = 2; i < n; i++) count += !composite[i];
        free(composite);
    }

    put_str(1, "primes below ");
    put_u64(1, n);
    put_str(1, ": ");
    put_u64(1, count);
    put_str(1, "\n");
    return 0;
}
