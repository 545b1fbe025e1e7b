/* wasm3-run, part four: WASI preview1's files, confined to the job's preopened directories.
 *
 * The node names the directories in the job file ("dir" records, see wasm3run.c); each is a
 * preopen, fd 3, 4, ... in that order, named by its guest path (as wasmtime's --dir). Every
 * path the job gives is resolved beneath the directory descriptor it names:
 *   - with openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS) (Linux 5.6+): the kernel refuses
 *     absolute paths, ".." past the top and symlinks that lead out, all as EXDEV;
 *   - without it (an older kernel, or DEPARROW_WASI_NO_OPENAT2 set, for the tests) component by
 *     component with openat(O_NOFOLLOW): ".." only back down a path walked here, no symlink
 *     followed at all.
 * Either way an escape is ENOTCAPABLE (76), what WASI has it for. Operations that name an entry
 * (mkdir, unlink, rmdir, rename, readlink, utimes) resolve its parent that way and then act on
 * the last component with the *at() call; that component may not be "..".
 * A directory given read-only ("write": false) refuses every change with EROFS (69), as a
 * read-only bind mount does under docker: path_open asking to write, create, truncate or append
 * (by its flags or by the FD_WRITE, FD_ALLOCATE or FD_FILESTAT_SET_SIZE rights wasi-libc asks
 * for with O_WRONLY/O_RDWR), mkdir, unlink, rmdir, rename from or into it, set times.
 * A job holds at most FS_MAX_FDS descriptors (stdio and preopens included): one more is EMFILE.
 * path_symlink and path_link are ENOTSUP: what a job leaves behind stays plain files and
 * directories, and a hard link cannot carry a read-only input into a writable directory. */

#include "wasm3run.h"

#ifndef DEPARROW_NO_FILES

#include <dirent.h>
#include <sys/syscall.h>
#if defined(__linux__) && defined(SYS_openat2) && __has_include(<linux/openat2.h>)
#include <linux/openat2.h>
#define HAVE_OPENAT2 1
#endif

/* errno values of the preview1 witx (wasi-libc's <wasi/api.h>) */
enum {
    W_E2BIG = 1, W_EACCES = 2, W_EAGAIN = 6, W_EBUSY = 10, W_EEXIST = 20, W_EFBIG = 22,
    W_EINTR = 27, W_EIO = 29, W_EISDIR = 31, W_ELOOP = 32, W_EMFILE = 33, W_EMLINK = 34,
    W_ENAMETOOLONG = 37, W_ENFILE = 41, W_ENODEV = 43, W_ENOENT = 44, W_ENOMEM = 48,
    W_ENOSPC = 51, W_ENOSYS = 52, W_ENOTDIR = 54, W_ENOTEMPTY = 55, W_ENOTSUP = 58, W_ENXIO = 60,
    W_EOVERFLOW = 61, W_EPERM = 63, W_EROFS = 69, W_ETXTBSY = 74, W_EXDEV = 75, W_ENOTCAPABLE = 76,
};

#define ESCAPE 100000 /* not a host errno: the path leads out of its directory */

/* rights (preview1 bit numbers) */
#define R_FD_READ (1ull << 1)
#define R_FD_WRITE (1ull << 6)
#define R_FD_ALLOCATE (1ull << 8)
#define R_FD_READDIR (1ull << 14)
#define R_FD_FILESTAT_SET_SIZE (1ull << 22)
#define R_ALL ((1ull << 28) - 1) /* everything but the sockets' */
#define R_WRITES (R_FD_WRITE | R_FD_ALLOCATE | R_FD_FILESTAT_SET_SIZE)

/* filetypes, oflags, fdflags, lookupflags */
enum { T_UNKNOWN, T_BLOCK, T_CHAR, T_DIR, T_FILE, T_DGRAM, T_STREAM, T_LINK };
#define O_W_CREAT 1
#define O_W_DIRECTORY 2
#define O_W_EXCL 4
#define O_W_TRUNC 8
#define FL_APPEND 1
#define FL_DSYNC 2
#define FL_NONBLOCK 4
#define FL_RSYNC 8
#define FL_SYNC 16
#define LOOKUP_FOLLOW 1

typedef struct {
    int host;      /* the host's descriptor; -1: the slot is free */
    uint8_t type;  /* WASI filetype */
    uint8_t write; /* in a directory the job may change */
    int preopen;   /* index in job.dirs for a preopen, else -1 */
    uint64_t base, inheriting;
    DIR *dir;        /* fd_readdir's stream, opened on first use */
    uint64_t dir_at; /* the cookie of the entry dir reads next */
} FsFd;

static FsFd fds[FS_MAX_FDS];
static int use_openat2 = 1;

static uint32_t werr(int e) {
    switch (e) {
    case ESCAPE: return W_ENOTCAPABLE;
    case E2BIG: return W_E2BIG;
    case EACCES: return W_EACCES;
    case EAGAIN: return W_EAGAIN;
    case EBADF: return W_EBADF;
    case EBUSY: return W_EBUSY;
    case EEXIST: return W_EEXIST;
    case EFAULT: return W_EFAULT;
    case EFBIG: return W_EFBIG;
    case EINTR: return W_EINTR;
    case EINVAL: return W_EINVAL;
    case EISDIR: return W_EISDIR;
    case ELOOP: return W_ELOOP;
    case EMFILE: return W_EMFILE;
    case EMLINK: return W_EMLINK;
    case ENAMETOOLONG: return W_ENAMETOOLONG;
    case ENFILE: return W_ENFILE;
    case ENODEV: return W_ENODEV;
    case ENOENT: return W_ENOENT;
    case ENOMEM: return W_ENOMEM;
    case ENOSPC: return W_ENOSPC;
    case EDQUOT: return W_ENOSPC;
    case ENOSYS: return W_ENOSYS;
    case ENOTDIR: return W_ENOTDIR;
    case ENOTEMPTY: return W_ENOTEMPTY;
    case EOPNOTSUPP: return W_ENOTSUP;
    case ENXIO: return W_ENXIO;
    case EOVERFLOW: return W_EOVERFLOW;
    case EPERM: return W_EPERM;
    case EROFS: return W_EROFS;
    case ESPIPE: return W_ESPIPE;
    case ETXTBSY: return W_ETXTBSY;
    case EXDEV: return W_EXDEV;
    default: return W_EIO;
    }
}

static FsFd *get(uint32_t fd) {
    if (fd < 3 || fd >= FS_MAX_FDS || fds[fd].host < 0) return NULL;
    return &fds[fd];
}

static uint8_t type_of(mode_t m) {
    if (S_ISDIR(m)) return T_DIR;
    if (S_ISREG(m)) return T_FILE;
    if (S_ISLNK(m)) return T_LINK;
    if (S_ISCHR(m)) return T_CHAR;
    if (S_ISBLK(m)) return T_BLOCK;
    if (S_ISSOCK(m)) return T_STREAM;
    return T_UNKNOWN;
}

void fs_open_preopens(void) {
    for (uint32_t i = 0; i < FS_MAX_FDS; i++) fds[i].host = -1;
    const char *no2 = getenv("DEPARROW_WASI_NO_OPENAT2"); /* the fallback, for the tests */
    if (no2 && *no2 && strcmp(no2, "0")) use_openat2 = 0;
    for (uint32_t i = 0; i < job.ndirs; i++) {
        int h = open(job.dirs[i].host, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (h < 0)
            failf("executor error: cannot open the job's directory %s: %s", job.dirs[i].host,
                  strerror(errno));
        FsFd *f = &fds[3 + i];
        f->host = h;
        f->type = T_DIR;
        f->write = (uint8_t)job.dirs[i].write;
        f->preopen = (int)i;
        f->base = R_ALL & ~(R_FD_READ | R_FD_WRITE);
        f->inheriting = R_ALL;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Paths: copied out of the job's memory, resolved beneath a directory descriptor              */

/* The job's path as a C string in out (PATH_MAX + 1 bytes), or a WASI errno. */
static uint32_t copy_path(IM3Runtime rt, uint32_t ptr, uint32_t len, char *out) {
    if (len > PATH_MAX) return W_ENAMETOOLONG;
    const uint8_t *p = wasi_mem(rt, ptr, len);
    if (!p) return W_EFAULT;
    if (memchr(p, 0, len)) return W_EINVAL;
    memcpy(out, p, len);
    out[len] = 0;
    return len ? W_SUCCESS : W_ENOENT;
}

#define MAX_DEPTH 128

static int is_link(int dirfd, const char *name) {
    struct stat st;
    return !fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) && S_ISLNK(st.st_mode);
}

/* The fallback: one component at a time, no symlink followed, ".." only back down the walk. */
static int walk_open(int dirfd, const char *path, int flags, mode_t mode) {
    if (path[0] == '/') return -ESCAPE;
    int follow = !(flags & O_NOFOLLOW);
    int stack[MAX_DEPTH], depth = 0, r = -ENOENT;
    const char *s = path;
    for (;;) {
        while (*s == '/') s++;
        const char *e = s;
        while (*e && *e != '/') e++;
        const char *rest = e;
        while (*rest == '/') rest++;
        int last = !*rest, slash = *e == '/';
        size_t n = (size_t)(e - s);
        if (n > NAME_MAX) {
            r = -ENAMETOOLONG;
            break;
        }
        char name[NAME_MAX + 1];
        memcpy(name, s, n);
        name[n] = 0;
        int cur = depth ? stack[depth - 1] : dirfd;
        if (!strcmp(name, "..")) {
            if (!depth) {
                r = -ESCAPE;
                break;
            }
            close(stack[--depth]);
            cur = depth ? stack[depth - 1] : dirfd;
            strcpy(name, ".");
        }
        if (!n) strcpy(name, ".");
        if (last) {
            int f = flags | O_NOFOLLOW | (slash ? O_DIRECTORY : 0);
            r = openat(cur, name, f, mode);
            if (r < 0) r = -errno;
            /* a symlink is ELOOP whatever else was asked (O_DIRECTORY says ENOTDIR); O_PATH
               opens the link itself, refused too when it was to be followed */
            if (r == -ENOTDIR && is_link(cur, name)) r = -ELOOP;
            struct stat st;
            if (r >= 0 && follow && !fstat(r, &st) && S_ISLNK(st.st_mode)) close(r), r = -ELOOP;
            break;
        }
        if (!strcmp(name, ".")) {
            s = rest;
            continue;
        }
        if (depth == MAX_DEPTH) {
            r = -ENAMETOOLONG;
            break;
        }
        int d = openat(cur, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (d < 0) { /* a symlink on the way is ELOOP, as at the end */
            r = errno == ENOTDIR && is_link(cur, name) ? -ELOOP : -errno;
            break;
        }
        stack[depth++] = d;
        s = rest;
    }
    while (depth) close(stack[--depth]);
    return r;
}

/* A host descriptor for path beneath dirfd, or -errno (-ESCAPE for a way out). */
static int open_beneath(int dirfd, const char *path, int flags, mode_t mode, int follow) {
    flags |= O_CLOEXEC | (follow ? 0 : O_NOFOLLOW);
#ifdef HAVE_OPENAT2
    if (use_openat2) {
        struct open_how how;
        memset(&how, 0, sizeof how);
        how.flags = (uint64_t)flags;
        how.mode = (flags & O_CREAT) ? mode : 0;
        how.resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS;
        long r;
        do r = syscall(SYS_openat2, dirfd, path, &how, sizeof how);
        while (r < 0 && (errno == EINTR || errno == EAGAIN));
        if (r >= 0) return (int)r;
        if (errno == EXDEV) return -ESCAPE;
        if (errno != ENOSYS && errno != EPERM) return -errno; /* EPERM: a seccomp filter */
        use_openat2 = 0;
    }
#endif
    return walk_open(dirfd, path, flags, mode);
}

/* The directory holding path's last component (opened beneath dir) in *parent and that
 * component in *name (a pointer into path, which loses its trailing slashes), or a WASI
 * errno. *dir_only: the path ended in a slash. */
static uint32_t open_parent(const FsFd *dir, char *path, int *parent, char **name, int *dir_only) {
    size_t n = strlen(path);
    *dir_only = 0;
    while (n > 1 && path[n - 1] == '/') path[--n] = 0, *dir_only = 1;
    if (path[0] == '/') return W_ENOTCAPABLE;
    char *slash = strrchr(path, '/');
    const char *up = ".";
    if (slash) {
        *slash = 0;
        up = path;
        *name = slash + 1;
    } else *name = path;
    if (!strcmp(*name, "..")) return W_ENOTCAPABLE;
    int fd = open_beneath(dir->host, up, O_RDONLY | O_DIRECTORY, 0, 1);
    if (fd < 0) return werr(-fd);
    *parent = fd;
    return W_SUCCESS;
}

/* ------------------------------------------------------------------------------------------ */
/* Descriptors                                                                                 */

static void write_filestat(uint8_t *p, const struct stat *st) {
    memset(p, 0, 64);
    put64(p, (uint64_t)st->st_dev);
    put64(p + 8, (uint64_t)st->st_ino);
    p[16] = type_of(st->st_mode);
    put64(p + 24, (uint64_t)st->st_nlink);
    put64(p + 32, (uint64_t)st->st_size);
    put64(p + 40, (uint64_t)ns_of(&st->st_atim));
    put64(p + 48, (uint64_t)ns_of(&st->st_mtim));
    put64(p + 56, (uint64_t)ns_of(&st->st_ctim));
}

uint32_t fs_prestat_get(IM3Runtime rt, uint32_t fd, uint32_t buf) {
    FsFd *f = get(fd);
    if (!f || f->preopen < 0) return W_EBADF;
    uint8_t *p = wasi_mem(rt, buf, 8);
    if (!p) return W_EFAULT;
    memset(p, 0, 8);
    put32(p + 4, job.dirs[f->preopen].guest.n);
    return W_SUCCESS;
}

uint32_t fs_prestat_dir_name(IM3Runtime rt, uint32_t fd, uint32_t path, uint32_t len) {
    FsFd *f = get(fd);
    if (!f || f->preopen < 0) return W_EBADF;
    Str g = job.dirs[f->preopen].guest;
    if (len < g.n) return W_ENAMETOOLONG;
    uint8_t *p = wasi_mem(rt, path, g.n);
    if (!p) return W_EFAULT;
    memcpy(p, g.p, g.n);
    return W_SUCCESS;
}

/* The iovecs of a read or write, checked whole before any byte moves. */
static uint8_t *iovecs(IM3Runtime rt, uint32_t iovs, uint32_t n) {
    uint8_t *vec = wasi_mem(rt, iovs, 8 * (uint64_t)n);
    for (uint32_t i = 0; vec && i < n; i++)
        if (!wasi_mem(rt, get32(vec + 8 * i), get32(vec + 8 * i + 4))) return NULL;
    return vec;
}

/* read, write, pread or pwrite over the iovecs: what moved goes to *done; an error only when
 * nothing did. */
static uint32_t transfer(IM3Runtime rt, uint32_t fd, uint32_t iovs, uint32_t n, int writing,
                         int positioned, uint64_t offset, uint32_t done_ptr) {
    FsFd *f = get(fd);
    if (!f) return W_EBADF;
    if (f->type == T_DIR) return W_EISDIR;
    uint8_t *vec = iovecs(rt, iovs, n);
    uint8_t *out = wasi_mem(rt, done_ptr, 4);
    if (!vec || !out) return W_EFAULT;
    if (positioned && offset > (uint64_t)INT64_MAX) return W_EINVAL;
    uint64_t total = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t len = get32(vec + 8 * i + 4);
        uint8_t *p = wasi_mem(rt, get32(vec + 8 * i), len);
        uint32_t got = 0;
        while (got < len) {
            ssize_t k;
            off_t at = (off_t)(offset + total + got);
            if (writing) k = positioned ? pwrite(f->host, p + got, len - got, at) : write(f->host, p + got, len - got);
            else k = positioned ? pread(f->host, p + got, len - got, at) : read(f->host, p + got, len - got);
            if (k < 0 && errno == EINTR) continue;
            if (k < 0) {
                if (total + got == 0) return werr(errno);
                break;
            }
            if (k == 0) break;
            got += (uint32_t)k;
        }
        total += got;
        if (got < len) break;
    }
    put32(out, (uint32_t)total);
    return W_SUCCESS;
}

uint32_t fs_read(IM3Runtime rt, uint32_t fd, uint32_t iovs, uint32_t n, uint32_t nread_ptr) {
    return transfer(rt, fd, iovs, n, 0, 0, 0, nread_ptr);
}

uint32_t fs_write(IM3Runtime rt, uint32_t fd, uint32_t iovs, uint32_t n, uint32_t nwritten_ptr) {
    return transfer(rt, fd, iovs, n, 1, 0, 0, nwritten_ptr);
}

uint32_t fs_close(uint32_t fd) {
    FsFd *f = get(fd);
    if (!f) return W_EBADF;
    if (f->dir) closedir(f->dir);
    close(f->host);
    memset(f, 0, sizeof *f);
    f->host = -1;
    return W_SUCCESS;
}

uint32_t fs_seek(IM3Runtime rt, uint32_t fd, uint64_t offset, uint32_t whence, uint32_t out_ptr) {
    FsFd *f = get(fd);
    if (!f) return W_EBADF;
    if (f->type == T_DIR) return W_EISDIR;
    if (whence > 2) return W_EINVAL;
    uint8_t *out = wasi_mem(rt, out_ptr, 8);
    if (!out) return W_EFAULT;
    off_t r = lseek(f->host, (off_t)(int64_t)offset, whence == 0 ? SEEK_SET : whence == 1 ? SEEK_CUR : SEEK_END);
    if (r < 0) return werr(errno);
    put64(out, (uint64_t)r);
    return W_SUCCESS;
}

uint32_t fs_fdstat_get(IM3Runtime rt, uint32_t fd, uint32_t stat_ptr) {
    FsFd *f = get(fd);
    if (!f) return W_EBADF;
    uint8_t *p = wasi_mem(rt, stat_ptr, 24);
    if (!p) return W_EFAULT;
    int fl = fcntl(f->host, F_GETFL);
    uint16_t flags = 0;
    if (fl >= 0) {
        if (fl & O_APPEND) flags |= FL_APPEND;
        if (fl & O_NONBLOCK) flags |= FL_NONBLOCK;
        if ((fl & O_SYNC) == O_SYNC) flags |= FL_SYNC;
        else if (fl & O_DSYNC) flags |= FL_DSYNC;
    }
    memset(p, 0, 24);
    p[0] = f->type;
    p[2] = (uint8_t)flags;
    p[3] = (uint8_t)(flags >> 8);
    put64(p + 8, f->base);
    put64(p + 16, f->inheriting);
    return W_SUCCESS;
}

uint32_t fs_fdstat_set_flags(uint32_t fd, uint32_t flags) {
    FsFd *f = get(fd);
    if (!f) return W_EBADF;
    if (flags & (FL_DSYNC | FL_RSYNC | FL_SYNC)) return W_ENOTSUP;
    int fl = fcntl(f->host, F_GETFL);
    if (fl < 0) return werr(errno);
    if ((flags & FL_APPEND) && !f->write) return W_EROFS;
    fl = (fl & ~(O_APPEND | O_NONBLOCK)) | ((flags & FL_APPEND) ? O_APPEND : 0) |
         ((flags & FL_NONBLOCK) ? O_NONBLOCK : 0);
    return fcntl(f->host, F_SETFL, fl) < 0 ? werr(errno) : W_SUCCESS;
}

/* ------------------------------------------------------------------------------------------ */
/* The host functions only files have                                                          */

m3ApiRawFunction(w_fd_pread) {
    uint64_t *ret = _sp++;
    ARG32(fd);
    ARG32(iovs);
    ARG32(n);
    ARG64(offset);
    ARG32(done);
    RET32(transfer(runtime, fd, iovs, n, 0, 1, offset, done));
}

m3ApiRawFunction(w_fd_pwrite) {
    uint64_t *ret = _sp++;
    ARG32(fd);
    ARG32(iovs);
    ARG32(n);
    ARG64(offset);
    ARG32(done);
    RET32(transfer(runtime, fd, iovs, n, 1, 1, offset, done));
}

m3ApiRawFunction(w_fd_tell) {
    uint64_t *ret = _sp++;
    ARG32(fd);
    ARG32(out_ptr);
    RET32(fs_seek(runtime, fd, 0, 1, out_ptr));
}

m3ApiRawFunction(w_fd_filestat_get) {
    uint64_t *ret = _sp++;
    ARG32(fd);
    ARG32(buf);
    struct stat st;
    uint8_t *p = wasi_mem(runtime, buf, 64);
    if (fd <= 2) { /* stdio: a character device, as fd_fdstat_get says */
        if (!p) RET32(W_EFAULT);
        memset(p, 0, 64);
        p[16] = T_CHAR;
        RET32(W_SUCCESS);
    }
    FsFd *f = get(fd);
    if (!f) RET32(W_EBADF);
    if (!p) RET32(W_EFAULT);
    if (fstat(f->host, &st) < 0) RET32(werr(errno));
    write_filestat(p, &st);
    RET32(W_SUCCESS);
}

m3ApiRawFunction(w_fd_filestat_set_size) {
    uint64_t *ret = _sp++;
    ARG32(fd);
    ARG64(size);
    FsFd *f = get(fd);
    if (!f) RET32(W_EBADF);
    if (!f->write) RET32(W_EROFS);
    if (size > (uint64_t)INT64_MAX) RET32(W_EINVAL);
    RET32(ftruncate(f->host, (off_t)size) < 0 ? werr(errno) : W_SUCCESS);
}

/* Times for futimens/utimensat from WASI's fst_flags: ATIM 1, ATIM_NOW 2, MTIM 4, MTIM_NOW 8. */
static uint32_t times_of(uint64_t atim, uint64_t mtim, uint32_t fl, struct timespec t[2]) {
    if (((fl & 1) && (fl & 2)) || ((fl & 4) && (fl & 8)) || fl > 15) return W_EINVAL;
    uint64_t v[2] = {atim, mtim};
    for (int i = 0; i < 2; i++) {
        uint32_t set = fl >> (2 * i);
        if (set & 2) t[i].tv_sec = 0, t[i].tv_nsec = UTIME_NOW;
        else if (set & 1) t[i].tv_sec = (time_t)(v[i] / 1000000000u), t[i].tv_nsec = (long)(v[i] % 1000000000u);
        else t[i].tv_sec = 0, t[i].tv_nsec = UTIME_OMIT;
    }
    return W_SUCCESS;
}

m3ApiRawFunction(w_fd_filestat_set_times) {
    uint64_t *ret = _sp++;
    ARG32(fd);
    ARG64(atim);
    ARG64(mtim);
    ARG32(fl);
    FsFd *f = get(fd);
    if (!f) RET32(W_EBADF);
    if (!f->write) RET32(W_EROFS);
    struct timespec t[2];
    uint32_t e = times_of(atim, mtim, fl, t);
    if (e) RET32(e);
    RET32(futimens(f->host, t) < 0 ? werr(errno) : W_SUCCESS);
}

m3ApiRawFunction(w_fd_fdstat_set_rights) {
    uint64_t *ret = _sp++;
    ARG32(fd);
    ARG64(base);
    ARG64(inheriting);
    FsFd *f = get(fd);
    if (!f) RET32(W_EBADF);
    if ((base & ~f->base) || (inheriting & ~f->inheriting)) RET32(W_ENOTCAPABLE);
    f->base = base;
    f->inheriting = inheriting;
    RET32(W_SUCCESS);
}

m3ApiRawFunction(w_fd_sync) {
    uint64_t *ret = _sp++;
    ARG32(fd);
    FsFd *f = get(fd);
    if (!f) RET32(W_EBADF);
    RET32(fsync(f->host) < 0 ? werr(errno) : W_SUCCESS);
}

m3ApiRawFunction(w_fd_datasync) {
    uint64_t *ret = _sp++;
    ARG32(fd);
    FsFd *f = get(fd);
    if (!f) RET32(W_EBADF);
    RET32(fdatasync(f->host) < 0 ? werr(errno) : W_SUCCESS);
}

m3ApiRawFunction(w_fd_advise) {
    uint64_t *ret = _sp++;
    ARG32(fd);
    ARG64(offset);
    ARG64(len);
    ARG32(advice);
    (void)offset, (void)len;
    FsFd *f = get(fd);
    if (!f) RET32(W_EBADF);
    if (advice > 5) RET32(W_EINVAL);
    RET32(f->type == T_DIR ? W_EISDIR : W_SUCCESS); /* advice, taken as such */
}

m3ApiRawFunction(w_fd_allocate) {
    uint64_t *ret = _sp++;
    ARG32(fd);
    ARG64(offset);
    ARG64(len);
    FsFd *f = get(fd);
    if (!f) RET32(W_EBADF);
    if (!f->write) RET32(W_EROFS);
    if (offset > (uint64_t)INT64_MAX || len > (uint64_t)INT64_MAX - offset) RET32(W_EINVAL);
    int e = posix_fallocate(f->host, (off_t)offset, (off_t)len);
    RET32(e ? werr(e) : W_SUCCESS);
}

m3ApiRawFunction(w_fd_renumber) {
    uint64_t *ret = _sp++;
    ARG32(from);
    ARG32(to);
    FsFd *a = get(from), *b = get(to);
    if (!a || !b) RET32(W_EBADF); /* stdio is not renumbered */
    if (from == to) RET32(W_SUCCESS);
    fs_close(to);
    fds[to] = *a;
    memset(a, 0, sizeof *a);
    a->host = -1;
    RET32(W_SUCCESS);
}

/* Entries from the cookie on: d_next u64, d_ino u64, d_namlen u32, d_type u8, then the name.
 * A cookie is an entry's index; the stream is rewound only when the job goes back (or skips),
 * and an entry cut short by the end of the buffer is read again next time. */
m3ApiRawFunction(w_fd_readdir) {
    uint64_t *ret = _sp++;
    ARG32(fd);
    ARG32(buf);
    ARG32(buf_len);
    ARG64(cookie);
    ARG32(used_ptr);
    FsFd *f = get(fd);
    if (!f) RET32(W_EBADF);
    if (f->type != T_DIR) RET32(W_ENOTDIR);
    uint8_t *p = wasi_mem(runtime, buf, buf_len), *used = wasi_mem(runtime, used_ptr, 4);
    if (!p || !used) RET32(W_EFAULT);
    if (!f->dir) {
        int d = openat(f->host, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (d < 0) RET32(werr(errno));
        f->dir = fdopendir(d);
        if (!f->dir) {
            int e = errno;
            close(d);
            RET32(werr(e));
        }
        f->dir_at = 0;
    }
    if (cookie != f->dir_at) {
        rewinddir(f->dir);
        f->dir_at = 0;
        while (f->dir_at < cookie && readdir(f->dir)) f->dir_at++;
    }
    uint32_t n = 0;
    while (n < buf_len) {
        long here = telldir(f->dir);
        errno = 0;
        struct dirent *e = readdir(f->dir);
        if (!e) {
            if (errno) RET32(werr(errno));
            break;
        }
        uint8_t head[24];
        size_t len = strlen(e->d_name);
        memset(head, 0, sizeof head);
        put64(head, f->dir_at + 1);
        put64(head + 8, (uint64_t)e->d_ino);
        put32(head + 16, (uint32_t)len);
        head[20] = type_of(DTTOIF(e->d_type));
        uint32_t room = buf_len - n;
        if (sizeof head + len > room) { /* as much as fits; the job asks again with more room */
            size_t k = room < sizeof head ? room : sizeof head;
            memcpy(p + n, head, k);
            if (room > sizeof head) memcpy(p + n + sizeof head, e->d_name, room - sizeof head);
            n = buf_len;
            seekdir(f->dir, here);
            break;
        }
        memcpy(p + n, head, sizeof head);
        memcpy(p + n + sizeof head, e->d_name, len);
        n += (uint32_t)(sizeof head + len);
        f->dir_at++;
    }
    put32(used, n);
    RET32(W_SUCCESS);
}

/* ------------------------------------------------------------------------------------------ */
/* Paths                                                                                       */

m3ApiRawFunction(w_path_open) {
    uint64_t *ret = _sp++;
    ARG32(dirfd);
    ARG32(dirflags);
    ARG32(path_ptr);
    ARG32(path_len);
    ARG32(oflags);
    ARG64(base);
    ARG64(inheriting);
    ARG32(fdflags);
    ARG32(fd_out);
    FsFd *d = get(dirfd);
    if (!d) RET32(W_EBADF);
    if (d->type != T_DIR) RET32(W_ENOTDIR);
    char path[PATH_MAX + 1];
    uint32_t e = copy_path(runtime, path_ptr, path_len, path);
    if (e) RET32(e);
    uint8_t *out = wasi_mem(runtime, fd_out, 4);
    if (!out) RET32(W_EFAULT);
    int writes = (base & R_WRITES) != 0;
    if ((writes || (oflags & (O_W_CREAT | O_W_TRUNC)) || (fdflags & FL_APPEND)) && !d->write)
        RET32(W_EROFS);
    uint32_t slot = 3;
    while (slot < FS_MAX_FDS && fds[slot].host >= 0) slot++;
    if (slot == FS_MAX_FDS) RET32(W_EMFILE);
    int reads = (base & (R_FD_READ | R_FD_READDIR)) != 0 || !writes;
    int flags = O_NOCTTY | O_NONBLOCK;
    if (oflags & O_W_DIRECTORY) flags |= O_DIRECTORY | O_RDONLY;
    else flags |= writes ? (reads ? O_RDWR : O_WRONLY) : O_RDONLY;
    if (oflags & O_W_CREAT) flags |= O_CREAT;
    if (oflags & O_W_EXCL) flags |= O_EXCL;
    if (oflags & O_W_TRUNC) flags |= O_TRUNC;
    if (fdflags & FL_APPEND) flags |= O_APPEND;
    if (fdflags & (FL_SYNC | FL_RSYNC)) flags |= O_SYNC;
    else if (fdflags & FL_DSYNC) flags |= O_DSYNC;
    int h = open_beneath(d->host, path, flags, 0666, dirflags & LOOKUP_FOLLOW);
    if (h < 0) RET32(werr(-h));
    struct stat st;
    if (fstat(h, &st) < 0 || (!(fdflags & FL_NONBLOCK) && fcntl(h, F_SETFL, fcntl(h, F_GETFL) & ~O_NONBLOCK) < 0)) {
        int er = errno;
        close(h);
        RET32(werr(er));
    }
    FsFd *f = &fds[slot];
    memset(f, 0, sizeof *f);
    f->host = h;
    f->type = type_of(st.st_mode);
    f->write = d->write;
    f->preopen = -1;
    f->base = base & d->inheriting;
    f->inheriting = inheriting & d->inheriting;
    put32(out, slot);
    RET32(W_SUCCESS);
}

m3ApiRawFunction(w_path_filestat_get) {
    uint64_t *ret = _sp++;
    ARG32(dirfd);
    ARG32(flags);
    ARG32(path_ptr);
    ARG32(path_len);
    ARG32(buf);
    FsFd *d = get(dirfd);
    if (!d) RET32(W_EBADF);
    char path[PATH_MAX + 1];
    uint32_t e = copy_path(runtime, path_ptr, path_len, path);
    if (e) RET32(e);
    uint8_t *p = wasi_mem(runtime, buf, 64);
    if (!p) RET32(W_EFAULT);
#ifdef O_PATH
    int h = open_beneath(d->host, path, O_PATH, 0, flags & LOOKUP_FOLLOW);
#else
    int h = open_beneath(d->host, path, O_RDONLY | O_NONBLOCK, 0, flags & LOOKUP_FOLLOW);
#endif
    if (h < 0) RET32(werr(-h));
    struct stat st;
    int r = fstat(h, &st), er = errno;
    close(h);
    if (r < 0) RET32(werr(er));
    write_filestat(p, &st);
    RET32(W_SUCCESS);
}

/* What the path calls that change a directory share: the directory fd, its path from the job
 * and, resolved, the parent and the last component. */
typedef struct {
    FsFd *dir;
    char path[PATH_MAX + 1];
    int parent;
    char *name;
    int dir_only;
} Entry;

static uint32_t entry(IM3Runtime rt, Entry *en, uint32_t dirfd, uint32_t ptr, uint32_t len, int change) {
    en->parent = -1;
    en->dir = get(dirfd);
    if (!en->dir) return W_EBADF;
    if (en->dir->type != T_DIR) return W_ENOTDIR;
    uint32_t e = copy_path(rt, ptr, len, en->path);
    if (e) return e;
    if (change && !en->dir->write) return W_EROFS;
    return open_parent(en->dir, en->path, &en->parent, &en->name, &en->dir_only);
}

static uint32_t done(Entry *en, int r) {
    int er = errno;
    if (en->parent >= 0) close(en->parent);
    return r < 0 ? werr(er) : W_SUCCESS;
}

m3ApiRawFunction(w_path_create_directory) {
    uint64_t *ret = _sp++;
    ARG32(dirfd);
    ARG32(ptr);
    ARG32(len);
    Entry en;
    uint32_t e = entry(runtime, &en, dirfd, ptr, len, 1);
    if (e) RET32(e); /* entry() leaves nothing open on failure */
    RET32(done(&en, mkdirat(en.parent, en.name, 0777)));
}

m3ApiRawFunction(w_path_remove_directory) {
    uint64_t *ret = _sp++;
    ARG32(dirfd);
    ARG32(ptr);
    ARG32(len);
    Entry en;
    uint32_t e = entry(runtime, &en, dirfd, ptr, len, 1);
    if (e) RET32(e);
    if (!strcmp(en.name, ".")) { done(&en, 0); RET32(W_EINVAL); }
    RET32(done(&en, unlinkat(en.parent, en.name, AT_REMOVEDIR)));
}

m3ApiRawFunction(w_path_unlink_file) {
    uint64_t *ret = _sp++;
    ARG32(dirfd);
    ARG32(ptr);
    ARG32(len);
    Entry en;
    uint32_t e = entry(runtime, &en, dirfd, ptr, len, 1);
    if (e) RET32(e);
    struct stat st;
    if (en.dir_only) { /* "file/": not a directory; "dir/": a directory, not for unlink */
        if (fstatat(en.parent, en.name, &st, AT_SYMLINK_NOFOLLOW) < 0) RET32(done(&en, -1));
        done(&en, 0);
        RET32(S_ISDIR(st.st_mode) ? W_EISDIR : W_ENOTDIR);
    }
    RET32(done(&en, unlinkat(en.parent, en.name, 0)));
}

m3ApiRawFunction(w_path_rename) {
    uint64_t *ret = _sp++;
    ARG32(fd1);
    ARG32(ptr1);
    ARG32(len1);
    ARG32(fd2);
    ARG32(ptr2);
    ARG32(len2);
    Entry a, b;
    b.parent = -1;
    uint32_t e = entry(runtime, &a, fd1, ptr1, len1, 1);
    if (!e) e = entry(runtime, &b, fd2, ptr2, len2, 1);
    if (!e && (!strcmp(a.name, ".") || !strcmp(b.name, "."))) e = W_EINVAL;
    if (!e && renameat(a.parent, a.name, b.parent, b.name) < 0) e = werr(errno);
    done(&b, 0);
    done(&a, 0);
    RET32(e);
}

m3ApiRawFunction(w_path_readlink) {
    uint64_t *ret = _sp++;
    ARG32(dirfd);
    ARG32(ptr);
    ARG32(len);
    ARG32(buf);
    ARG32(buf_len);
    ARG32(used_ptr);
    Entry en;
    uint32_t e = entry(runtime, &en, dirfd, ptr, len, 0);
    if (e) RET32(e);
    uint8_t *p = wasi_mem(runtime, buf, buf_len), *used = wasi_mem(runtime, used_ptr, 4);
    if (!p || !used) { done(&en, 0); RET32(W_EFAULT); }
    ssize_t n = readlinkat(en.parent, en.name, (char *)p, buf_len);
    if (n < 0) RET32(done(&en, -1));
    put32(used, (uint32_t)n);
    RET32(done(&en, 0));
}

m3ApiRawFunction(w_path_filestat_set_times) {
    uint64_t *ret = _sp++;
    ARG32(dirfd);
    ARG32(flags);
    ARG32(ptr);
    ARG32(len);
    ARG64(atim);
    ARG64(mtim);
    ARG32(fl);
    Entry en;
    struct timespec t[2];
    uint32_t e = times_of(atim, mtim, fl, t);
    if (e) RET32(e);
    e = entry(runtime, &en, dirfd, ptr, len, 1);
    if (e) RET32(e);
    /* a symlink is followed only beneath the directory: resolved first, then set by fd */
    if (flags & LOOKUP_FOLLOW) {
        int h = open_beneath(en.parent, en.name, O_RDONLY | O_NONBLOCK, 0, 1);
        if (h < 0) { done(&en, 0); RET32(werr(-h)); }
        int r = futimens(h, t), er = errno;
        close(h);
        errno = er;
        RET32(done(&en, r));
    }
    RET32(done(&en, utimensat(en.parent, en.name, t, AT_SYMLINK_NOFOLLOW)));
}

m3ApiRawFunction(w_path_symlink) {
    uint64_t *ret = _sp++;
    RET32(W_ENOTSUP);
}

m3ApiRawFunction(w_path_link) {
    uint64_t *ret = _sp++;
    RET32(W_ENOTSUP);
}

const WasiFn FS_FNS[] = {
    {"fd_pread", "i(iiiIi)", w_fd_pread},
    {"fd_pwrite", "i(iiiIi)", w_fd_pwrite},
    {"fd_tell", "i(ii)", w_fd_tell},
    {"fd_filestat_get", "i(ii)", w_fd_filestat_get},
    {"fd_filestat_set_size", "i(iI)", w_fd_filestat_set_size},
    {"fd_filestat_set_times", "i(iIIi)", w_fd_filestat_set_times},
    {"fd_fdstat_set_rights", "i(iII)", w_fd_fdstat_set_rights},
    {"fd_sync", "i(i)", w_fd_sync},
    {"fd_datasync", "i(i)", w_fd_datasync},
    {"fd_advise", "i(iIIi)", w_fd_advise},
    {"fd_allocate", "i(iII)", w_fd_allocate},
    {"fd_renumber", "i(ii)", w_fd_renumber},
    {"fd_readdir", "i(iiiIi)", w_fd_readdir},
    {"path_open", "i(iiiiiIIii)", w_path_open},
    {"path_filestat_get", "i(iiiii)", w_path_filestat_get},
    {"path_filestat_set_times", "i(iiiiIIi)", w_path_filestat_set_times},
    {"path_create_directory", "i(iii)", w_path_create_directory},
    {"path_remove_directory", "i(iii)", w_path_remove_directory},
    {"path_unlink_file", "i(iii)", w_path_unlink_file},
    {"path_rename", "i(iiiiii)", w_path_rename},
    {"path_readlink", "i(iiiiii)", w_path_readlink},
    {"path_symlink", "i(iiiii)", w_path_symlink},
    {"path_link", "i(iiiiiii)", w_path_link},
};

const size_t N_FS_FNS = sizeof FS_FNS / sizeof FS_FNS[0];

#endif
