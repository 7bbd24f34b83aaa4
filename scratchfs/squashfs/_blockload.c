/*
 * scratchfs block loader: read one data block of a squashfs image and decode it, in one call.
 *
 * The Python side (squashfs/image.py) otherwise makes two calls per block, os.pread and the
 * decompressor's do_block, and each gives up the GIL and takes it back. Decode workers do that
 * for every block while the FUSE thread runs Python; every contended hand-back is a round of
 * futex calls and a wait. One call per block halves that, and the raw bytes are read into a
 * buffer the thread keeps instead of a new bytes object.
 *
 * The decompressor is libsquashfs's, passed in as its object and do_block function pointer
 * (sqfs_compressor_t), so this file needs no libsquashfs headers and no linking.
 */
#include <errno.h>
#include <stdint.h>
#include <unistd.h>

typedef int32_t (*do_block_fn)(void *cmp, const uint8_t *in, uint32_t size, uint8_t *out, uint32_t outsize);

enum { LOAD_OK = 0, LOAD_IO = 1, LOAD_SHORT = 2, LOAD_DECODE = 3 };

/*
 * Read the *size* compressed bytes at *off* of *fd* into *in* (at least *size* bytes) and
 * decode them into *out* (*limit* bytes). Blocks stored as is need no decoding: the caller
 * reads them itself. Returns LOAD_OK with *length set, or a LOAD_* failure with *detail set
 * (errno for LOAD_IO, do_block's result for LOAD_DECODE, the bytes read for LOAD_SHORT).
 */
int scratchfs_load_block(int fd, int64_t off, uint32_t size, void *cmp, do_block_fn do_block,
                         uint8_t *in, uint8_t *out, uint32_t limit, int32_t *length, int32_t *detail)
{
    uint32_t got = 0;

    while (got < size) {
        ssize_t n = pread(fd, in + got, size - got, off + got);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            *detail = errno;
            return LOAD_IO;
        }
        if (n == 0) {
            *detail = (int32_t)got;
            return LOAD_SHORT;
        }
        got += (uint32_t)n;
    }
    int32_t r = do_block(cmp, in, size, out, limit);
    if (r <= 0) {
        *detail = r;
        return LOAD_DECODE;
    }
    *length = r;
    return LOAD_OK;
}
