/*
 * scratchfs FUSE request hook: lets a pyfuse3 server use the kernel's no-open mode.
 *
 * A read-only server that answers OPEN and OPENDIR with ENOSYS makes the kernel stop sending
 * OPEN, RELEASE, OPENDIR and RELEASEDIR for good, keep file pages across opens and cache
 * directory listings (FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR are the no-open defaults). Reads
 * then arrive with file handle 0. pyfuse3 hands its read() and readdir() handlers only the
 * file handle, not the inode, so on its own it cannot serve them.
 *
 * This library, loaded with RTLD_GLOBAL before pyfuse3, interposes libfuse's
 * fuse_session_process_buf(), through which pyfuse3 passes every request. For READ, READDIR
 * and READDIRPLUS requests carrying file handle 0 it writes SCRATCHFS_FH_INODE | nodeid into
 * the file handle field, then calls the real function. Nothing else is touched.
 *
 * It also interposes fuse_session_receive_buf(), to make the session's /dev/fuse descriptor
 * non-blocking and remember it (the Python side polls it to take the next request without a
 * trip through trio's scheduler) and to turn EAGAIN, "nothing to read after all", into EINTR,
 * which pyfuse3's loop retries instead of ending the session. Nothing may be waiting after
 * all when another task took the request first, or its caller was interrupted meanwhile.
 *
 * The request layout is the kernel's FUSE ABI (include/uapi/linux/fuse.h), stable since
 * protocol 7.9; the structures are repeated here so the build needs no kernel headers.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>

#define FUSE_USE_VERSION 31
#include <fuse_lowlevel.h>

#define SCRATCHFS_FH_INODE (1ULL << 62)

enum { OP_READ = 15, OP_INIT = 26, OP_READDIR = 28, OP_READDIRPLUS = 44 };

struct in_header { /* struct fuse_in_header */
    uint32_t len;
    uint32_t opcode;
    uint64_t unique;
    uint64_t nodeid;
    uint32_t uid, gid, pid;
    uint16_t total_extlen;
    uint16_t padding;
};

struct read_in { /* struct fuse_read_in: only fh is used */
    uint64_t fh;
    uint64_t offset;
    uint32_t size;
};

typedef void (*process_buf_fn)(struct fuse_session *, const struct fuse_buf *);

typedef int (*receive_buf_fn)(struct fuse_session *, struct fuse_buf *);
typedef int (*session_fd_fn)(struct fuse_session *);

static process_buf_fn real_process_buf;
static receive_buf_fn real_receive_buf;
static session_fd_fn real_session_fd;
static volatile int session_fd = -1;
struct init_in { /* struct fuse_init_in: the kernel's capability flags */
    uint32_t major;
    uint32_t minor;
    uint32_t max_readahead;
    uint32_t flags;
};

static volatile uint64_t seen, rewritten, unreadable;
static volatile uint32_t kernel_flags;

static process_buf_fn real(void)
{
    if (!real_process_buf) {
        /* The libfuse pyfuse3 is linked with (same soname, so the same loaded copy). */
        void *lib = dlopen("libfuse3.so.3", RTLD_LAZY | RTLD_LOCAL);
        if (lib) {
            real_receive_buf = (receive_buf_fn)dlvsym(lib, "fuse_session_receive_buf", "FUSE_3.0");
            real_session_fd = (session_fd_fn)dlvsym(lib, "fuse_session_fd", "FUSE_3.0");
            real_process_buf = (process_buf_fn)dlvsym(lib, "fuse_session_process_buf", "FUSE_3.0");
        }
    }
    return real_process_buf;
}

int fuse_session_receive_buf(struct fuse_session *se, struct fuse_buf *buf)
{
    int res;

    if (!real() || !real_receive_buf)
        return -ENOSYS;
    if (session_fd < 0 && real_session_fd) {
        /* Published only once reads of it cannot block: a task woken by epoll for a request
         * that another took at once must get EAGAIN (retried), not sleep in read() with the
         * whole event loop. */
        int fd = real_session_fd(se);
        int fl = fd >= 0 ? fcntl(fd, F_GETFL) : -1;
        if (fl >= 0 && (fl & O_NONBLOCK || fcntl(fd, F_SETFL, fl | O_NONBLOCK) == 0))
            session_fd = fd;
    }
    res = real_receive_buf(se, buf);
    return res == -EAGAIN ? -EINTR : res;
}

void fuse_session_process_buf(struct fuse_session *se, const struct fuse_buf *buf)
{
    seen++;
    if (buf->flags & FUSE_BUF_IS_FD) {
        unreadable++; /* spliced request: not in memory, left alone */
    } else if (buf->size >= sizeof(struct in_header) + sizeof(struct read_in)) {
        struct in_header *h = (struct in_header *)buf->mem;
        if (h->opcode == OP_INIT && buf->size >= sizeof(*h) + sizeof(struct init_in))
            kernel_flags = ((struct init_in *)((char *)buf->mem + sizeof(*h)))->flags;
        else if (h->opcode == OP_READ || h->opcode == OP_READDIR || h->opcode == OP_READDIRPLUS) {
            struct read_in *r = (struct read_in *)((char *)buf->mem + sizeof(*h));
            if (r->fh == 0) {
                r->fh = SCRATCHFS_FH_INODE | h->nodeid;
                rewritten++;
            }
        }
    }
    real()(se, buf);
}

/* For the Python side: is the hook resolvable, and what has it done. */
int scratchfs_hook_ready(void) { return real() != NULL && real_receive_buf != NULL; }
int scratchfs_hook_session_fd(void) { return session_fd; }
void scratchfs_hook_forget_session(void) { session_fd = -1; }
uint64_t scratchfs_hook_seen(void) { return seen; }
uint64_t scratchfs_hook_rewritten(void) { return rewritten; }
uint64_t scratchfs_hook_unreadable(void) { return unreadable; }
uint32_t scratchfs_hook_kernel_flags(void) { return kernel_flags; }
