/* wasm3-run, part two: the module and the call's arguments, read before wasm3 sees them
 * as edge/executors/wasmbin.py and runner.convert_args read them for the CPython
 * executor, so both refuse the same modules and arguments in the same words. */

#include "wasm3run.h"

/* ------------------------------------------------------------------------------------------ */
/* Reading the module before wasm3 sees it (edge/executors/wasmbin.py, in C)                   */

struct ModuleInfo info;

const char *const KINDS[4] = {"function", "table", "memory", "global"};

static void bad_section(void) { fail("invalid module: malformed section (index out of range)"); }

static uint8_t byte_at(size_t pos) {
    if (pos >= info.n) bad_section();
    return info.b[pos];
}

/* Every number below is the module's to choose, up to 2^64 - 1: a bounds check compares it
 * with what is left of the module (info.n - pos, pos <= info.n), never adds it to a position
 * first, where the sum could wrap past the end and let a name point anywhere. */

/* A number that needs more than 64 bits reads as UINT64_MAX, which every check then refuses as
 * the Python reader refuses its exact (unbounded) value; it is not cut to its low 64 bits. */
static uint64_t uleb(size_t *pos) {
    uint64_t result = 0;
    unsigned shift = 0;
    for (;;) {
        if (*pos >= info.n) fail("invalid module: truncated LEB128 number");
        uint8_t c = info.b[(*pos)++];
        uint64_t bits = c & 0x7F;
        if (shift < 64 && (bits << shift) >> shift == bits) result |= bits << shift;
        else if (bits) result = UINT64_MAX;
        shift += 7;
        if (!(c & 0x80)) return result;
    }
}

/* A number the module stores in 32 bits (an index, a limit): refused, not cut, when larger. */
static uint32_t uleb32(size_t *pos, const char *what) {
    uint64_t v = uleb(pos);
    if (v > UINT32_MAX) failf("invalid module: %s does not fit in 32 bits", what);
    return (uint32_t)v;
}

static Str read_name(size_t *pos) {
    uint64_t n = uleb(pos);
    if (*pos > info.n || n > info.n - *pos) fail("invalid module: truncated name");
    if (n > UINT32_MAX) fail("invalid module: a name does not fit in 32 bits");
    Str s = {info.b + *pos, (uint32_t)n};
    *pos += (size_t)n;
    return s;
}

static void read_limits(size_t *pos, uint32_t *lo, uint32_t *hi, int *has_hi) {
    uint8_t flags = byte_at((*pos)++);
    *lo = uleb32(pos, "a memory or table limit");
    *has_hi = flags & 1;
    if (*has_hi) *hi = uleb32(pos, "a memory or table limit");
}

/* Room for element `count` of an array grown one at a time. The counts come from modules (a
 * section's entries) and job files: neither the count nor the bytes may wrap, also where
 * size_t has 32 bits (the boards, firmware/wasm3). */
void *grow_array(void *p, uint32_t count, size_t size) {
    if ((count & (count - 1)) == 0) { /* 0, 1, 2, 4...: double */
        size_t want = count ? 2 * (size_t)count : 4;
        if (count > UINT32_MAX / 2 || want > SIZE_MAX / size) p = NULL;
        else p = realloc(p, want * size);
        if (!p) failf("memory limit: job exceeded %llu MiB (the host could not allocate more)",
                      (unsigned long long)job.memory_mb);
    }
    return p;
}

void read_module(const uint8_t *b, size_t n) {
    info.b = b;
    info.n = n;
    if (n < 8 || memcmp(b, "\0asm", 4) != 0)
        fail("invalid module: not a WebAssembly binary (no \\0asm magic)");
    if (memcmp(b + 4, "\x01\0\0\0", 4) != 0)
        fail("invalid module: unsupported WebAssembly binary version");
    size_t pos = 8;
    while (pos < n) {
        uint8_t sid = b[pos];
        size_t start = pos + 1;
        uint64_t size = uleb(&start); /* start <= n: uleb reads no byte past the end */
        if (size > n - start) failf("invalid module: section %u runs past the end of the module", sid);
        size_t p = start;
        if (sid == 2) {
            uint64_t count = uleb(&p);
            for (uint64_t i = 0; i < count; i++) {
                Import im;
                im.mod = read_name(&p);
                im.name = read_name(&p);
                im.kind = byte_at(p++);
                uint32_t lo, hi;
                int has_hi;
                if (im.kind == 0) uleb(&p);
                else if (im.kind == 1) p++, read_limits(&p, &lo, &hi, &has_hi);
                else if (im.kind == 2) read_limits(&p, &lo, &hi, &has_hi);
                else if (im.kind == 3) p += 2;
                else failf("invalid module: unknown import kind %u", im.kind);
                info.imports = grow_array(info.imports, info.nimports, sizeof(Import));
                info.imports[info.nimports++] = im;
            }
        } else if (sid == 5) {
            if (uleb(&p)) {
                info.has_memory = 1;
                read_limits(&p, &info.mem_min, &info.mem_max, &info.has_max);
            }
        } else if (sid == 7) {
            uint64_t count = uleb(&p);
            for (uint64_t i = 0; i < count; i++) {
                Export ex;
                ex.name = read_name(&p);
                ex.kind = byte_at(p++);
                ex.index = uleb32(&p, "an export's index");
                /* a later export of the same name wins, as in the Python reader's dict */
                uint32_t j = 0;
                while (j < info.nexports && !(info.exports[j].name.n == ex.name.n &&
                                              !memcmp(info.exports[j].name.p, ex.name.p, ex.name.n)))
                    j++;
                if (j == info.nexports) {
                    info.exports = grow_array(info.exports, info.nexports, sizeof(Export));
                    info.nexports++;
                }
                info.exports[j] = ex;
            }
        }
        pos = start + (size_t)size;
    }
}

const Export *find_export(Str name) {
    for (uint32_t i = 0; i < info.nexports; i++)
        if (info.exports[i].name.n == name.n && !memcmp(info.exports[i].name.p, name.p, name.n))
            return &info.exports[i];
    return NULL;
}

int cmp_names(const void *a, const void *b) {
    const Str *x = *(const Str *const *)a, *y = *(const Str *const *)b;
    int c = memcmp(x->p, y->p, x->n < y->n ? x->n : y->n);
    return c ? c : (x->n > y->n) - (x->n < y->n);
}

/* Python's repr() of a string, for the messages that quote what the submitter gave. */
void repr(Sb *b, Str s) {
    static const char hex[] = "0123456789abcdef";
    int dq = memchr(s.p, '\'', s.n) && !memchr(s.p, '"', s.n);
    char q = dq ? '"' : '\'';
    sb_raw(b, &q, 1);
    for (uint32_t i = 0; i < s.n; i++) {
        unsigned c = s.p[i];
        if (c == '\\' || c == (unsigned)q) {
            char e[2] = {'\\', (char)c};
            sb_raw(b, e, 2);
        } else if (c == '\n') sb_str(b, "\\n");
        else if (c == '\r') sb_str(b, "\\r");
        else if (c == '\t') sb_str(b, "\\t");
        else if (c < 0x20 || c == 0x7f) {
            char e[4] = {'\\', 'x', hex[c >> 4], hex[c & 15]};
            sb_raw(b, e, 4);
        } else sb_raw(b, (const char *)&s.p[i], 1);
    }
    sb_raw(b, &q, 1);
}

/* ------------------------------------------------------------------------------------------ */
/* Arguments of an invoked function, as runner.convert_args reads them                          */

static int py_space(unsigned c) { return c == ' ' || (c >= 9 && c <= 13) || (c >= 0x1c && c <= 0x1f); }

static Str strip(Str s) {
    while (s.n && py_space(s.p[0])) s.p++, s.n--;
    while (s.n && py_space(s.p[s.n - 1])) s.n--;
    return s;
}

static int digit_value(unsigned c) {
    if (c >= '0' && c <= '9') return (int)(c - '0');
    if (c >= 'a' && c <= 'z') return (int)(c - 'a' + 10);
    if (c >= 'A' && c <= 'Z') return (int)(c - 'A' + 10);
    return 99;
}

/* int(text, 0), falling back to int(text, 10) (which allows leading zeros): 0 when it is not
 * an integer. *big is set when the magnitude is 2^64 or more (past any wasm integer); 64-bit
 * arithmetic only, so 32-bit targets (the firmware's, firmware/wasm3) build this too. */
static int parse_int(Str text, int *neg, uint64_t *mag, int *big) {
    Str s = strip(text);
    size_t i = 0;
    int base = 10;
    *neg = 0;
    *mag = 0;
    *big = 0;
    if (i < s.n && (s.p[i] == '+' || s.p[i] == '-')) *neg = s.p[i++] == '-';
    if (i + 1 < s.n && s.p[i] == '0') {
        unsigned c = s.p[i + 1] | 0x20;
        base = c == 'x' ? 16 : c == 'o' ? 8 : c == 'b' ? 2 : 10;
        if (base != 10) {
            i += 2;
            if (i < s.n && s.p[i] == '_') i++; /* Python allows 0x_1f */
        }
    }
    if (i >= s.n) return 0;
    int prev_digit = 0;
    for (; i < s.n; i++) {
        unsigned c = s.p[i];
        if (c == '_') {
            if (!prev_digit || i + 1 >= s.n) return 0;
            prev_digit = 0;
            continue;
        }
        int d = digit_value(c);
        if (d >= base) return 0;
        if (*mag > (UINT64_MAX - (unsigned)d) / (unsigned)base) *big = 1;
        else *mag = *mag * (unsigned)base + (unsigned)d;
        prev_digit = 1;
    }
    return prev_digit;
}

static int parse_float(Str text, double *out) {
    Str s = strip(text);
    char buf[512];
    size_t n = 0;
    if (!s.n || s.n >= sizeof buf) return 0;
    for (size_t i = 0; i < s.n; i++) {
        unsigned c = s.p[i];
        if (c == 'x' || c == 'X' || c == '(' || c == 0) return 0; /* no hex floats, no nan(...) */
        if (c == '_') {                                            /* only between digits */
            if (!i || i + 1 >= s.n || digit_value(s.p[i - 1]) > 9 || digit_value(s.p[i + 1]) > 9)
                return 0;
            continue;
        }
        buf[n++] = (char)c;
    }
    buf[n] = 0;
    char *end;
    errno = 0;
    *out = strtod(buf, &end);
    return end == buf + n;
}

static const char *type_name(M3ValueType t) {
    return t == c_m3Type_i32 ? "i32" : t == c_m3Type_i64 ? "i64" : t == c_m3Type_f32 ? "f32" : "f64";
}

static void arg_error(Str text, const char *fname, const char *what, uint32_t i, M3ValueType t) {
    Sb b = {errbuf, sizeof errbuf, 0};
    sb_str(&b, "invalid argument: ");
    repr(&b, text);
    snprintf(errbuf + b.len, sizeof errbuf - b.len, ": %s expects %s for parameter %u (%s)", fname,
             what, i + 1, type_name(t));
    fail(errbuf);
}

void convert_args(IM3Function f, uint64_t *vals) {
    const char *fname = m3_GetFunctionName(f);
    uint32_t want = m3_GetArgCount(f);
    if (want != job.nargs)
        failf("invalid argument: %s expects %u argument(s), got %u", fname, want, job.nargs);
    if (want > MAX_VALUES) failf("invalid module: %s takes more than %d parameters", fname, MAX_VALUES);
    for (uint32_t i = 0; i < want; i++) {
        M3ValueType t = m3_GetArgType(f, i);
        Str text = job.args[i];
        vals[i] = 0;
        if (t == c_m3Type_f32 || t == c_m3Type_f64) {
            double d = 0;
            if (!parse_float(text, &d)) arg_error(text, fname, "a number", i, t);
            if (t == c_m3Type_f32) {
                float fl = (float)d;
                memcpy(&vals[i], &fl, sizeof fl);
            } else memcpy(&vals[i], &d, sizeof d);
            continue;
        }
        int neg, big, bits = t == c_m3Type_i32 ? 32 : 64;
        uint64_t mag;
        if (!parse_int(text, &neg, &mag, &big)) arg_error(text, fname, "an integer", i, t);
        uint64_t half = (uint64_t)1 << (bits - 1); /* fits: -half .. 2 * half - 1 */
        int too_big = neg ? mag > half : (mag >= half && mag - half >= half); /* no overflow */
        if (big || too_big) arg_error(text, fname, "an integer that fits", i, t);
        uint64_t v = neg ? (uint64_t)(0 - (uint64_t)mag) : (uint64_t)mag;
        vals[i] = bits == 32 ? (uint64_t)(uint32_t)v : v;
    }
}

void sb_double(Sb *b, double d) {
    char tmp[40];
    if (isnan(d)) sb_str(b, "NaN");
    else if (isinf(d)) sb_str(b, d > 0 ? "Infinity" : "-Infinity");
    else {
        snprintf(tmp, sizeof tmp, "%.17g", d);
        sb_str(b, tmp);
        if (!strpbrk(tmp, ".e")) sb_str(b, ".0"); /* stays a float when read back */
    }
}

