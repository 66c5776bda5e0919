/* sha256.h: SHA-256 (FIPS 180-4) for checkpoint fingerprints in the run store.
 * Incremental (init/update/final) so a multi-gigabyte safetensors file is hashed in fixed memory. */
#ifndef MOERL_SHA256_H
#define MOERL_SHA256_H

#include <stddef.h>
#include <stdint.h>

#include "core/err.h"

typedef struct sha256_ctx {
    uint32_t h[8];
    uint64_t nbytes;     /* message length so far */
    uint8_t buf[64];     /* partial block */
    size_t nbuf;
} sha256_ctx;

void sha256_init(sha256_ctx *c);
void sha256_update(sha256_ctx *c, const void *data, size_t n);
void sha256_final(sha256_ctx *c, uint8_t digest[32]);

/* One-shot digest of a buffer. */
void sha256(const void *data, size_t n, uint8_t digest[32]);
/* Lower-case hex of a digest: 64 characters and a NUL. */
void sha256_hex(const uint8_t digest[32], char hex[65]);
/* Hex digest of a whole file, read in 1 MiB pieces. MR_EIO (naming the file and errno's text) on failure. */
int sha256_file(const char *path, char hex[65], mr_err *e);

#endif
