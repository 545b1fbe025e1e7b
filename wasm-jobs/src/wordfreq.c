/* wordfreq: count the words in every file under a directory.
 *
 *   wordfreq [INPUTS [OUTPUTS]]      (defaults: /inputs and /outputs)
 *
 * Walks INPUTS recursively (opendir/readdir; each folder in byte order of its names, whatever
 * order the host lists them in), counts the words of every regular file, and writes
 *   OUTPUTS/counts.tsv     word<TAB>count, one a line, most frequent first, ties by word
 *   OUTPUTS/summary.json   {"files": F, "bytes": B, "words": W, "distinct": D}
 * then prints a one-line summary on stdout.
 *
 * A word is a run of ASCII letters and digits and of non-ASCII bytes (so UTF-8 words stay
 * whole), with ASCII letters lowered; an apostrophe between two word characters belongs to
 * the word ("don't"). Symbolic links and other non-regular entries are skipped.
 *
 * Exit codes: 0 done; 2 usage; 66 INPUTS cannot be opened or read; 73 OUTPUTS cannot be
 * written; 71 out of memory. Every failure says on stderr what went wrong and what to do.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define EX_USAGE 2
#define EX_NOINPUT 66
#define EX_OSERR 71
#define EX_CANTCREAT 73

static const char *inputs = "/inputs";
static const char *outputs = "/outputs";

static void die(int code, const char *what, const char *path, const char *hint) {
    fprintf(stderr, "wordfreq: %s %s: %s%s%s\n", what, path, strerror(errno), hint ? "; " : "",
            hint ? hint : "");
    exit(code);
}

static void out_of_memory(void) {
    fprintf(stderr, "wordfreq: out of memory; give the job more, e.g. edge-run job --memory 512\n");
    exit(EX_OSERR);
}

static void *xrealloc(void *p, size_t n) {
    p = realloc(p, n);
    if (p == NULL) out_of_memory();
    return p;
}

/* ---- the table of words: open addressing, FNV-1a, grown at 3/4 full ---- */

struct entry {
    char *word; /* NULL: empty slot */
    uint32_t len;
    uint64_t count;
};

static struct entry *table;
static size_t slots, distinct;
static uint64_t total_words, total_bytes, total_files;

static uint32_t hash(const char *s, size_t n) {
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)s[i]) * 16777619u;
    return h;
}

static struct entry *slot_for(struct entry *t, size_t size, const char *w, size_t n) {
    size_t i = hash(w, n) & (size - 1);
    while (t[i].word != NULL && !(t[i].len == n && memcmp(t[i].word, w, n) == 0))
        i = (i + 1) & (size - 1);
    return &t[i];
}

static void grow(void) {
    size_t size = slots ? slots * 2 : 1024;
    struct entry *t = xrealloc(NULL, size * sizeof *t);
    memset(t, 0, size * sizeof *t);
    for (size_t i = 0; i < slots; i++)
        if (table[i].word != NULL) *slot_for(t, size, table[i].word, table[i].len) = table[i];
    free(table);
    table = t;
    slots = size;
}

static void count_word(const char *w, size_t n) {
    if (n == 0) return;
    if ((distinct + 1) * 4 > slots * 3) grow();
    struct entry *e = slot_for(table, slots, w, n);
    if (e->word == NULL) {
        e->word = memcpy(xrealloc(NULL, n), w, n);
        e->len = (uint32_t)n;
        distinct++;
    }
    e->count++;
    total_words++;
}

/* ---- reading: a word may span read() chunks, never files ---- */

static char *word;
static size_t word_len, word_cap;

static int is_word_byte(unsigned char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c >= 0x80;
}

static void push(char c) {
    if (word_len == word_cap) {
        word_cap = word_cap ? word_cap * 2 : 64;
        word = xrealloc(word, word_cap);
    }
    word[word_len++] = c;
}

static void count_file(const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) die(EX_NOINPUT, "cannot open", path, NULL);
    static char buf[64 * 1024];
    int apostrophe = 0; /* a ' after a word character, kept if a word character follows */
    word_len = 0;
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n < 0) die(EX_NOINPUT, "cannot read", path, NULL);
        if (n == 0) break;
        total_bytes += (uint64_t)n;
        for (ssize_t i = 0; i < n; i++) {
            unsigned char c = (unsigned char)buf[i];
            if (is_word_byte(c)) {
                if (apostrophe) push('\'');
                apostrophe = 0;
                push((char)(c >= 'A' && c <= 'Z' ? c + ('a' - 'A') : c));
            } else if (c == '\'' && word_len > 0 && !apostrophe) {
                apostrophe = 1;
            } else {
                count_word(word, word_len);
                word_len = 0;
                apostrophe = 0;
            }
        }
    }
    count_word(word, word_len);
    close(fd);
    total_files++;
}

/* ---- walking the directory tree, in byte order of the names ---- */

static int by_name(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static void walk(const char *dir) {
    DIR *d = opendir(dir);
    if (d == NULL) die(EX_NOINPUT, "cannot open directory", dir, NULL);
    char **names = NULL;
    size_t count = 0;
    struct dirent *e;
    errno = 0;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        names = xrealloc(names, (count + 1) * sizeof *names);
        names[count++] = strdup(e->d_name);
        if (names[count - 1] == NULL) out_of_memory();
        errno = 0;
    }
    if (errno != 0) die(EX_NOINPUT, "cannot list", dir, NULL);
    closedir(d);
    qsort(names, count, sizeof *names, by_name);
    size_t dir_len = strlen(dir);
    for (size_t i = 0; i < count; i++) {
        size_t n = dir_len + 1 + strlen(names[i]) + 1;
        char *path = xrealloc(NULL, n);
        snprintf(path, n, "%s/%s", dir, names[i]);
        struct stat st;
        if (lstat(path, &st) != 0) die(EX_NOINPUT, "cannot stat", path, NULL);
        if (S_ISDIR(st.st_mode))
            walk(path);
        else if (S_ISREG(st.st_mode))
            count_file(path);
        free(path);
        free(names[i]);
    }
    free(names);
}

/* ---- writing the results ---- */

static int by_count_then_word(const void *a, const void *b) {
    const struct entry *x = a, *y = b;
    if (x->count != y->count) return x->count > y->count ? -1 : 1;
    int c = memcmp(x->word, y->word, x->len < y->len ? x->len : y->len);
    if (c != 0) return c;
    return (x->len > y->len) - (x->len < y->len);
}

static FILE *create(const char *name, char **path) {
    size_t n = strlen(outputs) + 1 + strlen(name) + 1;
    *path = xrealloc(NULL, n);
    snprintf(*path, n, "%s/%s", outputs, name);
    FILE *f = fopen(*path, "w");
    if (f == NULL)
        die(EX_CANTCREAT, "cannot write", *path,
            "give the job a writable directory there, e.g. edge-run job --dir OUT::/outputs");
    return f;
}

/* The job was given no directory at all there (wasi-libc: ENOTCAPABLE, no preopen holds
 * the path) or its parent has none (ENOENT): the usual mistake, so say how to give one. */
static void need_dir(const char *dir, int code, const char *kind, const char *flag) {
    DIR *d = opendir(dir);
    if (d != NULL) {
        closedir(d);
        return;
    }
    if (errno == ENOTCAPABLE || errno == ENOENT) {
        fprintf(stderr,
                "wordfreq: no %s directory %s: the job was given none there; give it one, "
                "e.g. edge-run job %s\n",
                kind, dir, flag);
        exit(code);
    }
    die(code, "cannot open the directory", dir, NULL);
}

static void finish(FILE *f, char *path) {
    if (ferror(f) | fclose(f)) die(EX_CANTCREAT, "cannot write", path, NULL);
    free(path);
}

int main(int argc, char **argv) {
    const char *usage = "usage: wordfreq [INPUTS [OUTPUTS]]   (defaults: /inputs /outputs)\n";
    if (argc == 2 && (strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0)) {
        fputs(usage, stdout);
        return 0;
    }
    if (argc > 3 || (argc > 1 && argv[1][0] == '-')) {
        fputs(usage, stderr);
        return EX_USAGE;
    }
    if (argc > 1) inputs = argv[1];
    if (argc > 2) outputs = argv[2];

    /* Both directories must be there before any work: say at once what is missing. */
    need_dir(inputs, EX_NOINPUT, "input", "--dir DATA::/inputs");
    need_dir(outputs, EX_CANTCREAT, "output", "--dir OUT::/outputs");

    walk(inputs);

    /* Pack the used slots to the front and sort them. */
    size_t n = 0;
    for (size_t i = 0; i < slots; i++)
        if (table[i].word != NULL) table[n++] = table[i];
    qsort(table, n, sizeof *table, by_count_then_word);

    char *path;
    FILE *f = create("counts.tsv", &path);
    for (size_t i = 0; i < n; i++) {
        fwrite(table[i].word, 1, table[i].len, f);
        fprintf(f, "\t%llu\n", (unsigned long long)table[i].count);
    }
    finish(f, path);

    f = create("summary.json", &path);
    fprintf(f, "{\"files\": %llu, \"bytes\": %llu, \"words\": %llu, \"distinct\": %llu}\n",
            (unsigned long long)total_files, (unsigned long long)total_bytes,
            (unsigned long long)total_words, (unsigned long long)distinct);
    finish(f, path);

    printf("wordfreq: %llu files, %llu bytes, %llu words, %llu distinct",
           (unsigned long long)total_files, (unsigned long long)total_bytes,
           (unsigned long long)total_words, (unsigned long long)distinct);
    if (n > 0) {
        printf("; most frequent: %.*s (%llu)", (int)table[0].len, table[0].word,
               (unsigned long long)table[0].count);
    }
    printf(" -> %s/counts.tsv, %s/summary.json\n", outputs, outputs);
    return 0;
}
