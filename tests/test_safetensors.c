/* test_safetensors.c: the safetensors reader, sharded checkpoints and the atomic writer (core/safetensors.h),
 * plus `moerl inspect`. Round trips are byte-for-byte; the exact on-disk bytes of a tiny file are checked
 * against the format (MODEL-SPEC §10.1); every bad input is a hand-built file whose error text is asserted; the
 * writer is shown to leave its target untouched (and no temp files) when a write fails part-way; allocation
 * failure is injected at every allocation of st_open, st_model_open and the writer. */
#include <criterion/criterion.h>
#include <cjson/cJSON.h>
#include <dirent.h>
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "core/mem.h"
#include "core/safetensors.h"
#include "tests/testutil.h"

/* ---------------- helpers ---------------- */

/* A file: 8-byte little-endian header length, the header, then data_len bytes 0, 1, 2, ... */
static void raw_file_len(const char *path, uint64_t hlen, const char *header, size_t data_len) {
    size_t h = strlen(header);
    unsigned char *buf = malloc(8 + h + data_len + 1);
    for (int i = 0; i < 8; i++) buf[i] = (unsigned char)(hlen >> (8 * i));
    memcpy(buf + 8, header, h);
    for (size_t i = 0; i < data_len; i++) buf[8 + h + i] = (unsigned char)i;
    cr_assert_eq(tu_write(path, buf, 8 + h + data_len), 0);
    free(buf);
}
static void raw_file(const char *path, const char *header, size_t data_len) {
    raw_file_len(path, strlen(header), header, data_len);
}

static int count_temp_files(const char *dir) {
    DIR *d = opendir(dir);
    cr_assert(d != NULL, "opendir %s", dir);
    int n = 0;
    struct dirent *de;
    while ((de = readdir(d)))
        if (strstr(de->d_name, ".tmp-")) n++;
    closedir(d);
    return n;
}

static int exists(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0;
}

/* st_open must fail with code, and the message must start with the path and contain want. */
static void expect_open_error(const char *path, int code, const char *want) {
    st_file *f = (st_file *)1;
    mr_err e = {0};
    int rc = st_open(&f, path, &e);
    cr_expect_eq(rc, code, "want %s for \"%s\", got %d: %s", err_name(code), want, rc, e.msg);
    cr_expect_null(f, "a failed open must leave *out NULL");
    cr_expect(strncmp(e.msg, path, strlen(path)) == 0, "message must start with the path: %s", e.msg);
    cr_expect(strstr(e.msg, want) != NULL, "message\n  %s\nlacks\n  %s", e.msg, want);
    if (rc == 0) st_close(f);
}

typedef struct test_tensors {
    float f32[6];
    uint16_t bf16[4];
    uint16_t f16[3];
    uint8_t e4m3[5];
    int32_t i32[2];
    int64_t i64[3];
    float scalar;
} test_tensors;

static void fill(test_tensors *d) {
    for (int i = 0; i < 6; i++) d->f32[i] = 0.5f * (float)i - 1.0f;
    for (int i = 0; i < 4; i++) d->bf16[i] = f32_to_bf16(1.0f + (float)i);
    for (int i = 0; i < 3; i++) d->f16[i] = f32_to_f16(-0.25f * (float)i);
    for (int i = 0; i < 5; i++) d->e4m3[i] = (uint8_t)(0x30 + 9 * i);
    d->i32[0] = -7;
    d->i32[1] = 1 << 30;
    d->i64[0] = INT64_MIN;
    d->i64[1] = 0;
    d->i64[2] = 123456789012345LL;
    d->scalar = 3.25f;
}

static void add_all(st_writer *w, const test_tensors *d) {
    mr_err e = {0};
    cr_assert_eq(st_writer_add(w, "w.f32", DT_F32, 2, (int64_t[]){2, 3}, d->f32, &e), 0, "%s", e.msg);
    cr_assert_eq(st_writer_add(w, "w.bf16", DT_BF16, 1, (int64_t[]){4}, d->bf16, &e), 0, "%s", e.msg);
    cr_assert_eq(st_writer_add(w, "w.f16", DT_F16, 2, (int64_t[]){3, 1}, d->f16, &e), 0, "%s", e.msg);
    cr_assert_eq(st_writer_add(w, "w.e4m3", DT_F8_E4M3, 1, (int64_t[]){5}, d->e4m3, &e), 0, "%s", e.msg);
    cr_assert_eq(st_writer_add(w, "ids.i32", DT_I32, 1, (int64_t[]){2}, d->i32, &e), 0, "%s", e.msg);
    cr_assert_eq(st_writer_add(w, "ids.i64", DT_I64, 1, (int64_t[]){3}, d->i64, &e), 0, "%s", e.msg);
    cr_assert_eq(st_writer_add(w, "scalar", DT_F32, 0, NULL, &d->scalar, &e), 0, "%s", e.msg);
    cr_assert_eq(st_writer_add(w, "empty", DT_BF16, 2, (int64_t[]){0, 4}, NULL, &e), 0, "%s", e.msg);
    cr_assert_eq(st_writer_add(w, "odd \"name\"\\é", DT_F8_E4M3, 2, (int64_t[]){1, 1}, d->e4m3, &e), 0, "%s",
                 e.msg);
    cr_assert_eq(st_writer_set_meta(w, "format", "pt", &e), 0);
    cr_assert_eq(st_writer_set_meta(w, "note", "first", &e), 0);
    cr_assert_eq(st_writer_set_meta(w, "note", "a \"quoted\"\nline", &e), 0); /* replaces */
}

static void check_tensor(const st_tensor *t, mr_dtype dt, int ndim, const int64_t *shape, const void *data,
                         size_t nbytes) {
    cr_assert_not_null(t);
    cr_expect_eq(t->dtype, dt, "%s dtype", t->name);
    cr_assert_eq(t->ndim, ndim, "%s ndim", t->name);
    size_t numel = 1;
    for (int i = 0; i < ndim; i++) {
        cr_expect_eq(t->shape[i], shape[i], "%s shape[%d]", t->name, i);
        numel *= (size_t)shape[i];
    }
    cr_expect_eq(t->numel, numel, "%s numel", t->name);
    cr_assert_eq(t->nbytes, nbytes, "%s nbytes %zu want %zu", t->name, t->nbytes, nbytes);
    cr_expect_eq(t->end - t->begin, nbytes);
    if (nbytes) cr_expect(memcmp(t->data, data, nbytes) == 0, "%s bytes differ", t->name);
    cr_expect_eq((uintptr_t)t->data % dtype_size(dt), 0, "%s is not aligned to its element size", t->name);
}

/* ---------------- round trips ---------------- */

Test(safetensors, round_trip_all_dtypes) {
    char *dir = tu_tmpdir(), *path = tu_path(dir, "x.safetensors");
    test_tensors d;
    fill(&d);
    st_writer *w;
    mr_err e = {0};
    cr_assert_eq(st_writer_init(&w, &e), 0);
    add_all(w, &d);
    cr_assert_eq(st_writer_write(w, path, &e), 0, "%s", e.msg);
    st_writer_free(w);
    cr_expect_eq(count_temp_files(dir), 0);

    st_file *f;
    cr_assert_eq(st_open(&f, path, &e), 0, "%s", e.msg);
    cr_assert_eq(st_count(f), 9);
    check_tensor(st_find(f, "w.f32"), DT_F32, 2, (int64_t[]){2, 3}, d.f32, 24);
    check_tensor(st_find(f, "w.bf16"), DT_BF16, 1, (int64_t[]){4}, d.bf16, 8);
    check_tensor(st_find(f, "w.f16"), DT_F16, 2, (int64_t[]){3, 1}, d.f16, 6);
    check_tensor(st_find(f, "w.e4m3"), DT_F8_E4M3, 1, (int64_t[]){5}, d.e4m3, 5);
    check_tensor(st_find(f, "ids.i32"), DT_I32, 1, (int64_t[]){2}, d.i32, 8);
    check_tensor(st_find(f, "ids.i64"), DT_I64, 1, (int64_t[]){3}, d.i64, 24);
    check_tensor(st_find(f, "scalar"), DT_F32, 0, NULL, &d.scalar, 4);
    check_tensor(st_find(f, "empty"), DT_BF16, 2, (int64_t[]){0, 4}, NULL, 0);
    check_tensor(st_find(f, "odd \"name\"\\é"), DT_F8_E4M3, 2, (int64_t[]){1, 1}, d.e4m3, 1);
    cr_expect_eq(st_find(f, "w.f3"), NULL);
    cr_expect_eq(st_find(f, "zzz"), NULL);
    cr_expect_eq(st_find(f, ""), NULL);

    /* File order: ascending offsets, and the data section is exactly covered (no holes, no overlap). */
    uint64_t at = 0;
    for (size_t i = 0; i < st_count(f); i++) {
        const st_tensor *t = st_tensor_at(f, i);
        cr_expect_eq(t->begin, at, "tensor %zu (%s) starts at %llu, want %llu", i, t->name,
                     (unsigned long long)t->begin, (unsigned long long)at);
        at = t->end;
    }
    cr_expect_eq(at, st_data_size(f));
    cr_expect_null(st_tensor_at(f, 9));

    cr_assert_eq(st_meta_count(f), 2);
    cr_expect_str_eq(st_meta_get(f, "format"), "pt");
    cr_expect_str_eq(st_meta_get(f, "note"), "a \"quoted\"\nline");
    cr_expect_null(st_meta_get(f, "nope"));
    const char *k, *v;
    st_meta_at(f, 0, &k, &v);
    cr_expect_str_eq(k, "format");

    float out[6];
    cr_assert_eq(st_read_f32(f, st_find(f, "w.bf16"), out, 6, &e), 0);
    for (int i = 0; i < 4; i++) cr_expect_eq(out[i], 1.0f + (float)i);
    cr_assert_eq(st_read_f32(f, st_find(f, "w.e4m3"), out, 5, &e), 0);
    for (int i = 0; i < 5; i++) cr_expect_eq(out[i], e4m3_to_f32(d.e4m3[i]));
    cr_assert_eq(st_read_f32(f, st_find(f, "ids.i64"), out, 3, &e), 0);
    cr_expect_eq(out[2], (float)123456789012345LL);
    cr_expect_eq(st_read_f32(f, st_find(f, "w.f32"), out, 5, &e), MR_ERANGE);
    cr_expect(strstr(e.msg, "tensor \"w.f32\": buffer holds 5 floats, the tensor has 6"), "%s", e.msg);
    st_close(f);

    /* The header: length so that data starts at a multiple of 8, keys sorted with __metadata__ first. */
    size_t n;
    unsigned char *raw = (unsigned char *)tu_read(path, &n);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | raw[i];
    cr_expect_eq((8 + hlen) % 8, 0);
    cJSON *j = cJSON_ParseWithLength((const char *)raw + 8, hlen);
    cr_assert_not_null(j, "header must be JSON");
    const char *prev = NULL;
    int i = 0;
    for (cJSON *c = j->child; c; c = c->next, i++) {
        if (i == 0) cr_expect_str_eq(c->string, "__metadata__");
        else if (prev && strcmp(prev, "__metadata__")) cr_expect(strcmp(prev, c->string) < 0, "%s then %s", prev, c->string);
        prev = c->string;
    }
    cJSON_Delete(j);
    free(raw);
    tu_rmtree(dir);
    free(path);
    free(dir);
}

Test(safetensors, exact_bytes_of_a_small_file) {
    /* An independent statement of the format: 8-byte LE length, compact JSON, spaces to an 8-byte boundary. */
    char *dir = tu_tmpdir(), *path = tu_path(dir, "a.safetensors");
    st_writer *w;
    mr_err e = {0};
    const float one[2] = {1.0f, -2.0f};
    const uint16_t h = 0x3F80;
    cr_assert_eq(st_writer_init(&w, &e), 0);
    cr_assert_eq(st_writer_add(w, "b", DT_BF16, 1, (int64_t[]){1}, &h, &e), 0);
    cr_assert_eq(st_writer_add(w, "a", DT_F32, 2, (int64_t[]){1, 2}, one, &e), 0);
    cr_assert_eq(st_writer_write(w, path, &e), 0, "%s", e.msg);
    st_writer_free(w);
    const char *json = "{\"a\":{\"dtype\":\"F32\",\"shape\":[1,2],\"data_offsets\":[0,8]},"
                       "\"b\":{\"dtype\":\"BF16\",\"shape\":[1],\"data_offsets\":[8,10]}}";
    size_t jl = strlen(json), padded = jl;
    while ((8 + padded) % 8) padded++;
    unsigned char want[512];
    for (int i = 0; i < 8; i++) want[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    memcpy(want + 8, json, jl);
    memset(want + 8 + jl, ' ', padded - jl);
    memcpy(want + 8 + padded, one, 8);
    memcpy(want + 8 + padded + 8, &h, 2);
    size_t n;
    char *got = tu_read(path, &n);
    cr_assert_eq(n, 8 + padded + 10, "file is %zu bytes", n);
    cr_expect(memcmp(got, want, n) == 0, "bytes differ; header: %.*s", (int)padded, got + 8);
    struct stat sb;
    cr_assert_eq(stat(path, &sb), 0);
    cr_expect_eq(sb.st_mode & 0777, 0644, "mode %o", sb.st_mode & 0777);
    free(got);
    tu_rmtree(dir);
    free(path);
    free(dir);
}

Test(safetensors, reads_files_from_other_writers) {
    /* No padding, unsorted keys, extra keys, an unaligned BF16 tensor, a hole and trailing spaces in the header. */
    char *dir = tu_tmpdir(), *path = tu_path(dir, "o.safetensors");
    const char *hdr = "{\"z\":{\"data_offsets\":[1,5],\"shape\":[2],\"dtype\":\"BF16\",\"extra\":true},"
                      "\"__metadata__\":{},\"a\":{\"dtype\":\"F8_E4M3\",\"shape\":[1],\"data_offsets\":[0,1]},"
                      "\"e\":{\"dtype\":\"I64\",\"shape\":[0],\"data_offsets\":[3,3]}}  \n";
    raw_file(path, hdr, 9); /* bytes 0..8; byte 5..8 are an unused tail */
    st_file *f;
    mr_err e = {0};
    cr_assert_eq(st_open(&f, path, &e), 0, "%s", e.msg);
    cr_assert_eq(st_count(f), 3);
    cr_expect_str_eq(st_tensor_at(f, 0)->name, "a");
    cr_expect_str_eq(st_tensor_at(f, 1)->name, "z");
    cr_expect_str_eq(st_tensor_at(f, 2)->name, "e"); /* empty at offset 3, after z's begin */
    cr_expect_eq(st_meta_count(f), 0);
    float v[2];
    cr_assert_eq(st_read_f32(f, st_find(f, "z"), v, 2, &e), 0);
    /* data bytes are 0,1,2,...: z holds bytes 1,2 and 3,4 as little-endian bf16 */
    cr_expect_eq(v[0], bf16_to_f32(0x0201));
    cr_expect_eq(v[1], bf16_to_f32(0x0403));
    cr_assert_eq(st_read_f32(f, st_find(f, "a"), v, 1, &e), 0);
    cr_expect_eq(v[0], 0.0f);
    st_close(f);
    tu_rmtree(dir);
    free(path);
    free(dir);
}

/* ---------------- bad files ---------------- */

typedef struct bad_case {
    const char *header;
    size_t data_len;
    const char *want;
} bad_case;

Test(safetensors, bad_headers_table) {
    static const bad_case cases[] = {
        {"{\"a\": ", 0, "header is not valid JSON (at byte"},
        {"", 0, "header is not valid JSON"},
        {"[1, 2]", 0, "header must be a JSON object, got an array"},
        {"\"str\"", 0, "header must be a JSON object, got \"str\""},
        {"{} x", 0, "header has bytes after its JSON object (at byte 3; only spaces may pad it)"},
        {"{\"a\": 3}", 0, "tensor \"a\": expected an object {dtype, shape, data_offsets}, got 3"},
        {"{\"a\": {\"shape\": [1], \"data_offsets\": [0, 4]}}", 4, "tensor \"a\": missing \"dtype\""},
        {"{\"a\": {\"dtype\": 5, \"shape\": [1], \"data_offsets\": [0, 4]}}", 4,
         "tensor \"a\": \"dtype\" must be a string, got 5"},
        {"{\"a\": {\"dtype\": \"Q4\", \"shape\": [1], \"data_offsets\": [0, 4]}}", 4,
         "tensor \"a\": unknown dtype \"Q4\" (expected one of F32, BF16, F16, F8_E4M3, I32, I64)"},
        {"{\"a\": {\"dtype\": \"F32\", \"data_offsets\": [0, 4]}}", 4, "tensor \"a\": missing \"shape\""},
        {"{\"a\": {\"dtype\": \"F32\", \"shape\": {}, \"data_offsets\": [0, 4]}}", 4,
         "tensor \"a\": \"shape\" must be an array of non-negative integers, got an object"},
        {"{\"a\": {\"dtype\": \"F32\", \"shape\": [2, -3], \"data_offsets\": [0, 4]}}", 4,
         "tensor \"a\": shape[1] must be a non-negative integer, got -3"},
        {"{\"a\": {\"dtype\": \"F32\", \"shape\": [1.5], \"data_offsets\": [0, 4]}}", 4,
         "tensor \"a\": shape[0] must be a non-negative integer, got 1.5"},
        {"{\"a\": {\"dtype\": \"F32\", \"shape\": [\"2\"], \"data_offsets\": [0, 4]}}", 4,
         "tensor \"a\": shape[0] must be a non-negative integer, got \"2\""},
        {"{\"a\": {\"dtype\": \"F32\", \"shape\": [1e20], \"data_offsets\": [0, 4]}}", 4,
         "tensor \"a\": shape[0] = 1e+20 is too large (limit 2^53)"},
        {"{\"a\": {\"dtype\": \"F32\", \"shape\": [4294967296, 4294967296, 2], \"data_offsets\": [0, 4]}}", 4,
         "tensor \"a\": shape [4294967296, 4294967296, 2] has more elements than fit in 64 bits"},
        {"{\"a\": {\"dtype\": \"F32\", \"shape\": [2147483648, 2147483648], \"data_offsets\": [0, 4]}}", 4,
         "tensor \"a\": F32 shape [2147483648, 2147483648] has more bytes than fit in 64 bits"},
        {"{\"a\": {\"dtype\": \"F32\", \"shape\": [1,1,1,1,1,1,1,1,1], \"data_offsets\": [0, 4]}}", 4,
         "tensor \"a\": shape has 9 dims, at most 8 are supported"},
        {"{\"a\": {\"dtype\": \"F32\", \"shape\": [1]}}", 4, "tensor \"a\": missing \"data_offsets\""},
        {"{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": 4}}", 4,
         "tensor \"a\": \"data_offsets\" must be [begin, end], got 4"},
        {"{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4, 8]}}", 8,
         "tensor \"a\": \"data_offsets\" must be [begin, end], got 3 values"},
        {"{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [-1, 4]}}", 4,
         "tensor \"a\": data_offsets[0] must be a non-negative integer, got -1"},
        {"{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [8, 4]}}", 8,
         "tensor \"a\": data_offsets [8, 4]: begin is after end"},
        {"{\"a\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0, 16]}}", 8,
         "tensor \"a\": data_offsets [0, 16] run past the end of the data section (8 bytes)"},
        {"{\"model.layers.0.mlp.gate.weight\": {\"dtype\": \"BF16\", \"shape\": [7, 8], \"data_offsets\": [0, 100]}}",
         112, "tensor \"model.layers.0.mlp.gate.weight\": data_offsets [0, 100] hold 100 bytes, but BF16 shape [7, 8] needs 112"},
        {"{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]},"
         " \"b\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [4, 12]}}",
         12, "tensors \"a\" data_offsets [0, 8] and \"b\" data_offsets [4, 12] overlap"},
        /* c overlaps a across an empty tensor e between them: the check must remember the furthest end */
        {"{\"a\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0, 16]},"
         " \"e\": {\"dtype\": \"F32\", \"shape\": [0], \"data_offsets\": [4, 4]}, "
         " \"c\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [8, 12]}}",
         16, "tensors \"a\" data_offsets [0, 16] and \"c\" data_offsets [8, 12] overlap"},
        {"{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 16]},"
         " \"b\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [8, 12]}}",
         16, "tensor \"a\": data_offsets [0, 16] hold 16 bytes, but F32 shape [2] needs 8"},
        {"{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]},"
         " \"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 8]}}",
         8, "tensor \"a\" appears twice in the header"},
        {"{\"__metadata__\": [1]}", 0, "\"__metadata__\" must be an object of strings, got an array"},
        {"{\"__metadata__\": {\"format\": 1}}", 0, "__metadata__ \"format\" must be a string, got 1"},
        {"{\"__metadata__\": {\"format\": \"pt\", \"format\": \"np\"}}", 0, "__metadata__ key \"format\" appears twice"},
        {"{\"__metadata__\": {}, \"__metadata__\": {}}", 0, "\"__metadata__\" appears twice in the header"},
    };
    char *dir = tu_tmpdir(), *path = tu_path(dir, "bad.safetensors");
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        raw_file(path, cases[i].header, cases[i].data_len);
        expect_open_error(path, MR_EFORMAT, cases[i].want);
    }
    tu_rmtree(dir);
    free(path);
    free(dir);
}

Test(safetensors, bad_lengths_and_paths) {
    char *dir = tu_tmpdir(), *path = tu_path(dir, "bad.safetensors");
    cr_assert_eq(tu_write(path, "abcde", 5), 0);
    expect_open_error(path, MR_EFORMAT, "file is 5 bytes, too short for the 8-byte header length");
    cr_assert_eq(tu_write(path, "", 0), 0);
    expect_open_error(path, MR_EFORMAT, "file is 0 bytes, too short");
    raw_file_len(path, 1000, "{}", 0);
    expect_open_error(path, MR_EFORMAT, "header length 1000 runs past the end of the file (2 bytes after the length)");
    raw_file_len(path, 200000000, "{}", 0);
    expect_open_error(path, MR_EFORMAT, "header length 200000000 exceeds the 100000000-byte limit");
    raw_file_len(path, UINT64_MAX, "{}", 0);
    expect_open_error(path, MR_EFORMAT, "header length 18446744073709551615 exceeds");
    char *missing = tu_path(dir, "nope.safetensors");
    expect_open_error(missing, MR_ENOTFOUND, "cannot open: No such file or directory");
    expect_open_error(dir, MR_EIO, "not a regular file");
    /* An empty header object is a valid file with no tensors. */
    raw_file(path, "{}      ", 0);
    st_file *f;
    mr_err e = {0};
    cr_assert_eq(st_open(&f, path, &e), 0, "%s", e.msg);
    cr_expect_eq(st_count(f), 0);
    cr_expect_null(st_find(f, "a"));
    st_close(f);
    st_close(NULL);
    free(missing);
    tu_rmtree(dir);
    free(path);
    free(dir);
}

/* ---------------- sharded checkpoints ---------------- */

#define NT 10
static unsigned char blob[NT][1000];

static st_writer *ten_tensors(void) {
    st_writer *w;
    mr_err e = {0};
    cr_assert_eq(st_writer_init(&w, &e), 0);
    for (int i = 0; i < NT; i++) {
        for (int j = 0; j < 1000; j++) blob[i][j] = (unsigned char)(i * 31 + j);
        char name[64];
        snprintf(name, sizeof name, "model.layers.%d.weight", i);
        cr_assert_eq(st_writer_add(w, name, i % 2 ? DT_BF16 : DT_F8_E4M3, 2,
                                   (int64_t[]){10, i % 2 ? 50 : 100}, blob[i], &e), 0, "%s", e.msg);
    }
    return w;
}

static void check_ten(st_model *m) {
    mr_err e = {0};
    cr_assert_eq(st_model_count(m), NT);
    for (int i = 0; i < NT; i++) {
        char name[64];
        snprintf(name, sizeof name, "model.layers.%d.weight", i);
        const st_tensor *t;
        cr_assert_eq(st_model_get(m, name, &t, &e), 0, "%s", e.msg);
        cr_expect_eq(t->dtype, i % 2 ? DT_BF16 : DT_F8_E4M3);
        cr_expect_eq(t->nbytes, 1000);
        cr_expect(memcmp(t->data, blob[i], 1000) == 0, "%s differs", name);
    }
    const st_tensor *t = (const st_tensor *)1;
    cr_expect_eq(st_model_get(m, "model.layers.10.weight", &t, &e), MR_ENOTFOUND);
    cr_expect_null(t);
    cr_expect(strstr(e.msg, "no tensor \"model.layers.10.weight\""), "%s", e.msg);
    cr_expect_eq(st_model_check(m, &e), 0, "%s", e.msg);
}

Test(safetensors, sharded_write_and_read) {
    char *dir = tu_tmpdir();
    st_writer *w = ten_tensors();
    mr_err e = {0};
    cr_assert_eq(st_writer_set_meta(w, "format", "pt", &e), 0);
    /* 2500-byte shards hold two 1000-byte tensors each: 5 shards, in name order. */
    cr_assert_eq(st_writer_write_dir(w, dir, 2500, &e), 0, "%s", e.msg);
    char *idx = tu_path(dir, "model.safetensors.index.json"), *one = tu_path(dir, "model.safetensors");
    cr_expect(exists(idx));
    cr_expect(!exists(one));
    cr_expect_eq(count_temp_files(dir), 0);
    for (int s = 1; s <= 5; s++) {
        char name[64];
        snprintf(name, sizeof name, "model-%05d-of-00005.safetensors", s);
        char *p = tu_path(dir, name);
        st_file *f;
        cr_assert_eq(st_open(&f, p, &e), 0, "%s", e.msg);
        cr_expect_eq(st_count(f), 2, "%s", name);
        cr_expect_str_eq(st_meta_get(f, "format"), "pt");
        st_close(f);
        free(p);
    }
    char *index = tu_read(idx, NULL);
    cJSON *j = cJSON_Parse(index);
    cr_assert_not_null(j, "index is JSON");
    cJSON *ts = cJSON_GetObjectItem(cJSON_GetObjectItem(j, "metadata"), "total_size");
    cr_expect(cJSON_IsNumber(ts) && ts->valuedouble == 10000.0);
    cJSON *wm = cJSON_GetObjectItem(j, "weight_map");
    cr_expect_eq(cJSON_GetArraySize(wm), NT);
    /* name order: layers.0, layers.1, layers.2 ... layers.9 (byte order puts 1 then 2 ...) */
    cr_expect_str_eq(cJSON_GetObjectItem(wm, "model.layers.0.weight")->valuestring, "model-00001-of-00005.safetensors");
    cr_expect_str_eq(cJSON_GetObjectItem(wm, "model.layers.9.weight")->valuestring, "model-00005-of-00005.safetensors");
    cJSON_Delete(j);
    free(index);

    st_model *m;
    cr_assert_eq(st_model_open(&m, dir, &e), 0, "%s", e.msg);
    cr_expect(st_model_is_sharded(m));
    cr_expect_eq(st_model_shard_count(m), 5);
    cr_expect_str_eq(st_model_shard_name(m, 0), "model-00001-of-00005.safetensors");
    cr_expect_eq(st_model_declared_total_size(m), 10000);
    cr_expect_null(st_model_shard_file(m, 4), "shards open lazily");
    check_ten(m);
    cr_expect_not_null(st_model_shard_file(m, 4));
    float out[1000];
    cr_expect_eq(st_model_read_f32(m, "model.layers.1.weight", out, 500, &e), 0, "%s", e.msg);
    uint16_t h0;
    memcpy(&h0, blob[1], 2);
    cr_expect_eq(out[0], bf16_to_f32(h0));
    st_model_close(m);
    cr_assert_eq(st_model_open(&m, idx, &e), 0, "%s", e.msg);
    check_ten(m);
    st_model_close(m);

    /* Rewriting the same directory as one file removes the stale index. */
    cr_assert_eq(st_writer_write_dir(w, dir, 0, &e), 0, "%s", e.msg);
    cr_expect(exists(one));
    cr_expect(!exists(idx));
    cr_assert_eq(st_model_open(&m, dir, &e), 0, "%s", e.msg);
    cr_expect(!st_model_is_sharded(m));
    cr_expect_eq(st_model_shard_count(m), 1);
    cr_expect_str_eq(st_model_shard_name(m, 0), "model.safetensors");
    cr_expect_eq(st_model_declared_total_size(m), -1);
    check_ten(m);
    st_model_close(m);
    cr_assert_eq(st_model_open(&m, one, &e), 0, "%s", e.msg);
    check_ten(m);
    st_model_close(m);
    /* ...and back to shards removes the stale single file; a limit below one tensor gives one per shard. */
    cr_assert_eq(st_writer_write_dir(w, dir, 10, &e), 0, "%s", e.msg);
    cr_expect(!exists(one));
    cr_assert_eq(st_model_open(&m, dir, &e), 0, "%s", e.msg);
    cr_expect_eq(st_model_shard_count(m), NT);
    check_ten(m);
    st_model_close(m);
    st_model_close(NULL);
    st_writer_free(w);
    free(idx);
    free(one);
    tu_rmtree(dir);
    free(dir);
}

/* Writes two shards (a, b) and an index with the given weight_map body. */
static void make_sharded(const char *dir, const char *weight_map) {
    char *s1 = tu_path(dir, "model-00001-of-00002.safetensors"), *s2 = tu_path(dir, "model-00002-of-00002.safetensors");
    raw_file(s1, "{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}}", 4);
    raw_file(s2, "{\"b\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}}", 8);
    char body[1024];
    snprintf(body, sizeof body, "{\"metadata\": {\"total_size\": 12}, \"weight_map\": %s}", weight_map);
    char *idx = tu_path(dir, "model.safetensors.index.json");
    cr_assert_eq(tu_write(idx, body, (size_t)-1), 0);
    free(s1);
    free(s2);
    free(idx);
}

static void expect_model_error(const char *path, int code, const char *want) {
    st_model *m = (st_model *)1;
    mr_err e = {0};
    int rc = st_model_open(&m, path, &e);
    cr_expect_eq(rc, code, "want %s for \"%s\", got %d: %s", err_name(code), want, rc, e.msg);
    cr_expect_null(m);
    cr_expect(strstr(e.msg, want) != NULL, "message\n  %s\nlacks\n  %s", e.msg, want);
    if (rc == 0) st_model_close(m);
}

Test(safetensors, bad_indexes) {
    char *dir = tu_tmpdir(), *idx = tu_path(dir, "model.safetensors.index.json");
    make_sharded(dir, "{\"a\": \"model-00001-of-00002.safetensors\", \"b\": \"model-00002-of-00002.safetensors\"}");
    st_model *m;
    mr_err e = {0};
    cr_assert_eq(st_model_open(&m, dir, &e), 0, "%s", e.msg);
    cr_expect_eq(st_model_check(m, &e), 0, "%s", e.msg);
    cr_expect_eq(st_model_count(m), 2);
    st_model_close(m);

    static const struct { const char *wm; int code; const char *want; } cases[] = {
        {"{\"a\": \"model-00001-of-00002.safetensors\", \"b\": \"model-00003-of-00003.safetensors\"}", MR_ENOTFOUND,
         "model.safetensors.index.json: shard \"model-00003-of-00003.safetensors\" (holding tensor \"b\") is missing"},
        {"{\"a\": \"../model-00001-of-00002.safetensors\"}", MR_EFORMAT,
         "weight_map \"a\" names shard \"../model-00001-of-00002.safetensors\", which is not a plain file name"},
        {"{\"a\": \"..\"}", MR_EFORMAT, "names shard \"..\", which is not a plain file name"},
        {"{\"a\": \"/etc/passwd\"}", MR_EFORMAT, "names shard \"/etc/passwd\", which is not a plain file name"},
        {"{\"a\": \"sub/x.safetensors\"}", MR_EFORMAT, "names shard \"sub/x.safetensors\", which is not a plain"},
        {"{\"a\": \"\"}", MR_EFORMAT, "names shard \"\", which is not a plain file name"},
        {"{\"a\": 3}", MR_EFORMAT, "weight_map \"a\" must name a shard file, got 3"},
        {"[]", MR_EFORMAT, "\"weight_map\" must be an object, got an array"},
        {"{\"a\": \"model-00001-of-00002.safetensors\", \"a\": \"model-00001-of-00002.safetensors\"}", MR_EFORMAT,
         "weight_map lists tensor \"a\" twice"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        make_sharded(dir, cases[i].wm);
        expect_model_error(dir, cases[i].code, cases[i].want);
    }
    cr_assert_eq(tu_write(idx, "{\"metadata\": {}}", (size_t)-1), 0);
    expect_model_error(dir, MR_EFORMAT, "missing \"weight_map\" (tensor name -> shard file)");
    cr_assert_eq(tu_write(idx, "{\"metadata\": 1, \"weight_map\": {}}", (size_t)-1), 0);
    expect_model_error(dir, MR_EFORMAT, "\"metadata\" must be an object, got 1");
    cr_assert_eq(tu_write(idx, "{\"weight_map\": {", (size_t)-1), 0);
    expect_model_error(idx, MR_EFORMAT, "model.safetensors.index.json: not valid JSON (at byte");
    cr_assert_eq(tu_write(idx, "7", (size_t)-1), 0);
    expect_model_error(idx, MR_EFORMAT, "index must be a JSON object, got 7");

    /* Listed in the index but absent from its shard: found when the tensor is resolved. */
    make_sharded(dir, "{\"a\": \"model-00001-of-00002.safetensors\", \"b\": \"model-00002-of-00002.safetensors\","
                      " \"c\": \"model-00001-of-00002.safetensors\"}");
    cr_assert_eq(st_model_open(&m, dir, &e), 0, "%s", e.msg);
    const st_tensor *t;
    cr_expect_eq(st_model_get(m, "a", &t, &e), 0);
    cr_expect_eq(st_model_get(m, "c", &t, &e), MR_EFORMAT);
    cr_expect(strstr(e.msg, "model.safetensors.index.json: tensor \"c\" is mapped to shard "
                            "\"model-00001-of-00002.safetensors\", which does not contain it"), "%s", e.msg);
    cr_expect_eq(st_model_check(m, &e), MR_EFORMAT);
    cr_expect(strstr(e.msg, "tensor \"c\" is mapped to shard"), "%s", e.msg);
    st_model_close(m);

    /* A corrupt shard is reported with the shard's own path. */
    make_sharded(dir, "{\"a\": \"model-00001-of-00002.safetensors\", \"b\": \"model-00002-of-00002.safetensors\"}");
    char *s2 = tu_path(dir, "model-00002-of-00002.safetensors");
    raw_file(s2, "{\"b\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}}", 4);
    cr_assert_eq(st_model_open(&m, dir, &e), 0, "%s", e.msg);
    cr_expect_eq(st_model_check(m, &e), MR_EFORMAT);
    cr_expect(strstr(e.msg, "model-00002-of-00002.safetensors: tensor \"b\": data_offsets [0, 8] run past"), "%s",
              e.msg);
    st_model_close(m);

    /* Both layouts in one directory, neither, and no such path. */
    char *one = tu_path(dir, "model.safetensors");
    raw_file(one, "{}", 0);
    expect_model_error(dir, MR_EFORMAT, "holds both model.safetensors and model.safetensors.index.json");
    unlink(one);
    unlink(idx);
    expect_model_error(dir, MR_ENOTFOUND, "no model.safetensors or model.safetensors.index.json in this directory");
    char *nope = tu_path(dir, "nope");
    expect_model_error(nope, MR_ENOTFOUND, "nope: no such file or directory");
    free(nope);
    free(one);
    free(s2);
    free(idx);
    tu_rmtree(dir);
    free(dir);
}

/* ---------------- atomic writes ---------------- */

Test(safetensors, writer_rejects_bad_entries) {
    st_writer *w;
    mr_err e = {0};
    float x = 1;
    cr_assert_eq(st_writer_init(&w, &e), 0);
    cr_expect_eq(st_writer_add(w, "", DT_F32, 0, NULL, &x, &e), MR_EINVAL);
    cr_expect_eq(st_writer_add(w, "__metadata__", DT_F32, 0, NULL, &x, &e), MR_EINVAL);
    cr_expect_eq(st_writer_add(w, "a", DT_COUNT, 0, NULL, &x, &e), MR_EINVAL);
    cr_expect_eq(st_writer_add(w, "a", DT_F32, 9, (int64_t[9]){1}, &x, &e), MR_EINVAL);
    cr_expect_eq(st_writer_add(w, "a", DT_F32, 1, (int64_t[]){-1}, &x, &e), MR_EINVAL);
    cr_expect_eq(st_writer_add(w, "a", DT_F32, 2, (int64_t[]){1LL << 40, 1LL << 40}, &x, &e), MR_EINVAL);
    cr_expect_eq(st_writer_add(w, "a", DT_F32, 1, (int64_t[]){1}, NULL, &e), MR_EINVAL);
    /* A name added twice is caught when writing, and nothing is written. */
    char *dir = tu_tmpdir(), *path = tu_path(dir, "d.safetensors");
    cr_assert_eq(st_writer_add(w, "a", DT_F32, 0, NULL, &x, &e), 0);
    cr_assert_eq(st_writer_add(w, "a", DT_F32, 0, NULL, &x, &e), 0);
    cr_expect_eq(st_writer_write(w, path, &e), MR_EINVAL);
    cr_expect(strstr(e.msg, "d.safetensors: tensor \"a\" was added twice"), "%s", e.msg);
    cr_expect(!exists(path));
    cr_expect_eq(st_writer_write_dir(w, dir, 1, &e), MR_EINVAL);
    cr_expect(strstr(e.msg, "tensor \"a\" was added twice"), "%s", e.msg);
    cr_expect_eq(count_temp_files(dir), 0);
    DIR *d = opendir(dir);
    int entries = 0;
    for (struct dirent *de; (de = readdir(d));) entries += de->d_name[0] != '.';
    closedir(d);
    cr_expect_eq(entries, 0, "a failed write leaves no files");
    st_writer_free(w);
    st_writer_free(NULL);
    free(path);
    tu_rmtree(dir);
    free(dir);
}

Test(safetensors, failed_writes_leave_the_target_untouched) {
    char *dir = tu_tmpdir(), *target = tu_path(dir, "model.safetensors");
    cr_assert_eq(tu_write(target, "old content", (size_t)-1), 0);
    st_writer *w;
    mr_err e = {0};
    static float big[256 * 1024]; /* 1 MiB */
    for (size_t i = 0; i < sizeof big / sizeof big[0]; i++) big[i] = (float)i;
    cr_assert_eq(st_writer_init(&w, &e), 0);
    cr_assert_eq(st_writer_add(w, "big", DT_F32, 1, (int64_t[]){256 * 1024}, big, &e), 0);

    /* 1. The directory does not exist: nothing can be created. */
    char *nodir = tu_path(dir, "no/such/dir/x.safetensors");
    cr_expect_eq(st_writer_write(w, nodir, &e), MR_EIO);
    cr_expect(strstr(e.msg, "x.safetensors: cannot create a temporary file beside it: No such file"), "%s", e.msg);
    free(nodir);

    /* 2. The disk "fills" part-way (RLIMIT_FSIZE in a child): the write fails after bytes went to the temp file. */
    pid_t pid = fork();
    cr_assert_neq(pid, -1);
    if (pid == 0) {
        signal(SIGXFSZ, SIG_IGN);
        struct rlimit rl = {65536, 65536};
        setrlimit(RLIMIT_FSIZE, &rl);
        mr_err ce = {0};
        int rc = st_writer_write(w, target, &ce);
        _exit(rc == MR_EIO && strstr(ce.msg, "model.safetensors: write failed: File too large") ? 0 : 1);
    }
    int status;
    waitpid(pid, &status, 0);
    cr_expect(WIFEXITED(status) && WEXITSTATUS(status) == 0, "the child's write must fail with EFBIG");
    char *now = tu_read(target, NULL);
    cr_expect_str_eq(now, "old content");
    free(now);
    cr_expect_eq(count_temp_files(dir), 0, "the temp file must be removed");

    /* 3. The rename fails: the target is a non-empty directory. */
    char *as_dir = tu_path(dir, "taken"), *inside = tu_path(dir, "taken/keep");
    cr_assert_eq(mkdir(as_dir, 0755), 0);
    cr_assert_eq(tu_write(inside, "keep", (size_t)-1), 0);
    cr_expect_eq(st_writer_write(w, as_dir, &e), MR_EIO);
    cr_expect(strstr(e.msg, "taken: cannot move the temporary file into place"), "%s", e.msg);
    cr_expect(exists(inside));
    cr_expect_eq(count_temp_files(dir), 0);

    /* 4. Allocation failure at every point: MR_ENOMEM, target untouched, no temp file; finally success. */
    int ok = 0;
    for (long n = 1; n < 200 && !ok; n++) {
        long before = mem_injected_failures();
        mem_fail_after(n);
        int rc = st_writer_write(w, target, &e);
        int injected = mem_injected_failures() > before;
        mem_fail_after(0);
        if (!injected) {
            cr_assert_eq(rc, 0, "%s", e.msg);
            ok = 1;
            break;
        }
        cr_assert_eq(rc, MR_ENOMEM, "n=%ld: rc %d: %s", n, rc, e.msg);
        now = tu_read(target, NULL);
        cr_assert_str_eq(now, "old content", "n=%ld", n);
        free(now);
        cr_assert_eq(count_temp_files(dir), 0);
    }
    cr_expect(ok);
    st_file *f;
    cr_assert_eq(st_open(&f, target, &e), 0, "%s", e.msg);
    cr_expect(memcmp(st_find(f, "big")->data, big, sizeof big) == 0);
    st_close(f);
    cr_expect_eq(count_temp_files(dir), 0);
    st_writer_free(w);
    free(as_dir);
    free(inside);
    free(target);
    tu_rmtree(dir);
    free(dir);
}

/* ---------------- allocation failure injection ---------------- */

Test(safetensors, alloc_failure_in_open) {
    char *dir = tu_tmpdir(), *path = tu_path(dir, "x.safetensors");
    test_tensors d;
    fill(&d);
    st_writer *w;
    mr_err e = {0};
    cr_assert_eq(st_writer_init(&w, &e), 0);
    add_all(w, &d);
    cr_assert_eq(st_writer_write(w, path, &e), 0, "%s", e.msg);
    st_writer_free(w);
    long fails = 0;
    int done = 0;
    for (long n = 1; n < 10000 && !done; n++) {
        st_file *f = NULL;
        long before = mem_injected_failures();
        mem_fail_after(n);
        int rc = st_open(&f, path, &e);
        int injected = mem_injected_failures() > before;
        mem_fail_after(0);
        if (rc == 0) {
            cr_assert_eq(st_count(f), 9);
            cr_expect_str_eq(st_meta_get(f, "format"), "pt");
            st_close(f);
            done = !injected;
            continue;
        }
        cr_assert(injected, "n=%ld: failed without an injected failure: %s", n, e.msg);
        cr_assert_eq(rc, MR_ENOMEM, "n=%ld: %d %s", n, rc, e.msg);
        cr_assert_null(f);
        cr_assert(strstr(e.msg, "out of memory"), "%s", e.msg);
        fails++;
    }
    cr_expect(done);
    cr_expect_gt(fails, 20, "cJSON's allocations must be reached too (only %ld)", fails);
    free(path);
    tu_rmtree(dir);
    free(dir);
}

Test(safetensors, alloc_failure_in_sharded_model_and_writer) {
    char *dir = tu_tmpdir();
    st_writer *w = ten_tensors();
    mr_err e = {0};
    int done = 0;
    for (long n = 1; n < 10000 && !done; n++) {
        long before = mem_injected_failures();
        mem_fail_after(n);
        int rc = st_writer_write_dir(w, dir, 2500, &e);
        int injected = mem_injected_failures() > before;
        mem_fail_after(0);
        if (!injected) done = 1;
        else cr_assert(rc == MR_ENOMEM || rc == 0, "n=%ld: %d %s", n, rc, e.msg);
        cr_assert_eq(count_temp_files(dir), 0);
        if (!injected) cr_assert_eq(rc, 0, "%s", e.msg);
    }
    cr_assert(done);
    done = 0;
    for (long n = 1; n < 10000 && !done; n++) {
        st_model *m = NULL;
        long before = mem_injected_failures();
        mem_fail_after(n);
        int rc = st_model_open(&m, dir, &e);
        if (rc == 0) rc = st_model_check(m, &e);
        int injected = mem_injected_failures() > before;
        mem_fail_after(0);
        if (rc == 0) {
            check_ten(m);
            done = !injected;
        } else {
            cr_assert(injected, "n=%ld: %s", n, e.msg);
            cr_assert_eq(rc, MR_ENOMEM, "n=%ld: %d %s", n, rc, e.msg);
        }
        st_model_close(m);
    }
    cr_expect(done);
    st_writer_free(w);
    tu_rmtree(dir);
    free(dir);
}

/* ---------------- moerl inspect ---------------- */

Test(safetensors, cli_inspect) {
    char *dir = tu_tmpdir(), *path = tu_path(dir, "x.safetensors"), cmd[8192], *out = NULL;
    test_tensors d;
    fill(&d);
    st_writer *w;
    mr_err e = {0};
    cr_assert_eq(st_writer_init(&w, &e), 0);
    add_all(w, &d);
    cr_assert_eq(st_writer_write(w, path, &e), 0, "%s", e.msg);
    st_writer_free(w);

    snprintf(cmd, sizeof cmd, "'%s' inspect '%s'", tu_bin(), path);
    int rc = tu_run(cmd, &out);
    cr_expect_eq(rc, 0, "%s", out);
    /* 6+4+3+5+2+3+1+0+1 = 25 parameters; 24+8+6+5+8+24+4+0+1 = 80 bytes */
    cr_expect(strstr(out, "x.safetensors: 9 tensors in 1 file\n"), "%s", out);
    cr_expect(strstr(out, "total: 9 tensors, 25 parameters, 80 bytes\n"), "%s", out);
    cr_expect(strstr(out, "w.f32          F32      [2, 3]\n"), "%s", out);
    cr_expect(strstr(out, "scalar         F32      []\n"), "%s", out);
    cr_expect(strstr(out, "empty          BF16     [0, 4]\n"), "%s", out);
    cr_expect(strstr(out, "metadata: format = pt\n"), "%s", out);
    cr_expect(strstr(out, "ids.i32") < strstr(out, "w.bf16"), "sorted by name: %s", out);
    free(out);

    snprintf(cmd, sizeof cmd, "'%s' inspect --json '%s'", tu_bin(), path);
    rc = tu_run(cmd, &out);
    cr_expect_eq(rc, 0, "%s", out);
    cJSON *j = cJSON_Parse(out);
    cr_assert_not_null(j, "--json output must be JSON: %s", out);
    cJSON *tot = cJSON_GetObjectItem(j, "total");
    cr_expect_eq(cJSON_GetObjectItem(tot, "tensors")->valuedouble, 9);
    cr_expect_eq(cJSON_GetObjectItem(tot, "parameters")->valuedouble, 25);
    cr_expect_eq(cJSON_GetObjectItem(tot, "bytes")->valuedouble, 80);
    cJSON *ts = cJSON_GetObjectItem(j, "tensors");
    cr_assert_eq(cJSON_GetArraySize(ts), 9);
    int found = 0;
    for (cJSON *t = ts->child; t; t = t->next) {
        if (strcmp(cJSON_GetObjectItem(t, "name")->valuestring, "odd \"name\"\\é")) continue;
        found = 1;
        cr_expect_str_eq(cJSON_GetObjectItem(t, "dtype")->valuestring, "F8_E4M3");
        cr_expect_eq(cJSON_GetArraySize(cJSON_GetObjectItem(t, "shape")), 2);
    }
    cr_expect(found, "escaped names survive the JSON round trip");
    cr_expect_str_eq(cJSON_GetObjectItem(cJSON_GetObjectItem(j, "metadata"), "note")->valuestring,
                     "a \"quoted\"\nline");
    cJSON_Delete(j);
    free(out);

    /* A sharded directory. */
    char *sdir = tu_path(dir, "ckpt");
    cr_assert_eq(mkdir(sdir, 0755), 0);
    st_writer *w10 = ten_tensors();
    cr_assert_eq(st_writer_write_dir(w10, sdir, 2500, &e), 0, "%s", e.msg);
    st_writer_free(w10);
    snprintf(cmd, sizeof cmd, "'%s' inspect '%s'", tu_bin(), sdir);
    rc = tu_run(cmd, &out);
    cr_expect_eq(rc, 0, "%s", out);
    cr_expect(strstr(out, "10 tensors in 5 files\n"), "%s", out);
    cr_expect(strstr(out, "model.layers.3.weight  BF16     [10, 50]  model-00002-of-00005.safetensors\n"), "%s", out);
    cr_expect(strstr(out, "total: 10 tensors, 7500 parameters, 10000 bytes\n"), "%s", out);
    free(out);

    /* A corrupt file: one line on stderr, exit 1. */
    raw_file(path, "{\"a\": {\"dtype\": \"F32\", \"shape\": [3], \"data_offsets\": [0, 8]}}", 8);
    snprintf(cmd, sizeof cmd, "'%s' inspect '%s'", tu_bin(), path);
    rc = tu_run(cmd, &out);
    cr_expect_eq(rc, 1, "%s", out);
    char want[4400];
    snprintf(want, sizeof want,
             "moerl inspect: %s: tensor \"a\": data_offsets [0, 8] hold 8 bytes, but F32 shape [3] needs 12\n", path);
    cr_expect_str_eq(out, want);
    free(out);

    snprintf(cmd, sizeof cmd, "'%s' inspect --help", tu_bin());
    cr_expect_eq(tu_run(cmd, &out), 0);
    cr_expect(strstr(out, "usage: moerl inspect PATH [--json]"), "%s", out);
    free(out);
    snprintf(cmd, sizeof cmd, "'%s' inspect", tu_bin());
    cr_expect_eq(tu_run(cmd, &out), 2);
    cr_expect(strstr(out, "moerl inspect: missing PATH"), "%s", out);
    free(out);
    snprintf(cmd, sizeof cmd, "'%s' inspect --bogus x", tu_bin());
    cr_expect_eq(tu_run(cmd, &out), 2);
    free(out);
    free(sdir);
    free(path);
    tu_rmtree(dir);
    free(dir);
}
