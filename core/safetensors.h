/* safetensors.h: reading and writing checkpoints in the safetensors format (MODEL-SPEC §10.1, §10.2).
 *
 * The one idea: a file is opened by mmap and its header is validated completely up front (lengths, JSON, every
 * dtype, shape and data_offsets, overlaps, metadata), after which tensors are plain non-owning views into the
 * mapping: nothing is copied until a caller asks (st_read_f32). A checkpoint ("model") is either one
 * model.safetensors or a directory of shards named by model.safetensors.index.json; shards are opened lazily,
 * once each. The writer lays tensors out aligned, sorts header keys, and replaces its target atomically
 * (temp file in the same directory, fsync, rename, fsync of the directory).
 *
 * Owns: the mapping, the parsed header, names. Borrows: the writer's tensor data (it must stay valid until the
 * write call returns). Every error message starts with the file's path and names the tensor or key. */
#ifndef MOERL_SAFETENSORS_H
#define MOERL_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "core/dtype.h"
#include "core/err.h"

#define ST_MAX_DIMS 8
/* Largest header accepted (the reference implementation uses the same 100 MB cap). */
#define ST_MAX_HEADER ((uint64_t)100000000)

/* A tensor: a view into an open file's mapping. data may be unaligned for files not written by st_writer. */
typedef struct st_tensor {
    const char *name;
    mr_dtype dtype;
    int ndim;                     /* 0 = scalar */
    int64_t shape[ST_MAX_DIMS];   /* shape[0..ndim) */
    size_t numel;                 /* product of shape (1 for a scalar, 0 when a dim is 0) */
    size_t nbytes;                /* numel * dtype_size(dtype) */
    uint64_t begin, end;          /* data_offsets, relative to the data section */
    const void *data;             /* (numel) elements of dtype, little-endian, row-major */
} st_tensor;

/* ---------------- one file ---------------- */
typedef struct st_file st_file;

/* Maps path and validates its header. On failure *out is NULL and e holds "path: reason". */
int st_open(st_file **out, const char *path, mr_err *e);
void st_close(st_file *f); /* accepts NULL */

const char *st_path(const st_file *f);
/* Tensors in file order (ascending data_offsets; empty tensors at equal offsets by name). */
size_t st_count(const st_file *f);
const st_tensor *st_tensor_at(const st_file *f, size_t i);
/* Lookup by name (binary search); NULL when absent. */
const st_tensor *st_find(const st_file *f, const char *name);
/* Bytes of the data section (file size - 8 - header length). */
size_t st_data_size(const st_file *f);

/* "__metadata__" entries, sorted by key. */
size_t st_meta_count(const st_file *f);
void st_meta_at(const st_file *f, size_t i, const char **key, const char **value);
const char *st_meta_get(const st_file *f, const char *key); /* NULL when absent */

/* Converts tensor t of file f to f32 into dst, which holds cap floats (cap >= t->numel, else MR_ERANGE). */
int st_read_f32(const st_file *f, const st_tensor *t, float *dst, size_t cap, mr_err *e);

/* ---------------- a checkpoint: one file or an index of shards ---------------- */
typedef struct st_model st_model;

/* path is a .safetensors file, a model.safetensors.index.json (any *.json is read as an index), or a directory
 * holding exactly one of model.safetensors.index.json / model.safetensors. For an index: weight_map must map
 * every name to a plain file name (no "/" or ".."; refused as hostile), and every shard must exist; shard
 * headers are read lazily (st_model_get) or all at once (st_model_check). */
int st_model_open(st_model **out, const char *path, mr_err *e);
void st_model_close(st_model *m); /* accepts NULL */

/* The index file for a sharded model, else the single .safetensors file. */
const char *st_model_path(const st_model *m);
int st_model_is_sharded(const st_model *m);
/* Shard file names (relative to the checkpoint directory), sorted; 1 for a single file. */
size_t st_model_shard_count(const st_model *m);
const char *st_model_shard_name(const st_model *m, size_t i);
/* The shard's open file (for its metadata), or NULL while it has not been opened (see st_model_check). */
const st_file *st_model_shard_file(const st_model *m, size_t i);
/* The index's "metadata": {"total_size": N}, when present as a non-negative integer; else -1. */
int64_t st_model_declared_total_size(const st_model *m);

/* Tensor names, sorted; count and i-th name. */
size_t st_model_count(const st_model *m);
const char *st_model_name_at(const st_model *m, size_t i);
/* Index of the shard that holds tensor i. */
size_t st_model_shard_of(const st_model *m, size_t i);
/* Opens the tensor's shard if needed and returns the view. MR_ENOTFOUND when the name is not in the model,
 * MR_EFORMAT when the index names a shard that lacks it. The view lives until st_model_close. */
int st_model_get(st_model *m, const char *name, const st_tensor **t, mr_err *e);
int st_model_get_at(st_model *m, size_t i, const st_tensor **t, mr_err *e);
/* st_model_get + st_read_f32. */
int st_model_read_f32(st_model *m, const char *name, float *dst, size_t cap, mr_err *e);
/* Opens every shard and checks that each tensor is present in the shard the index names. st_model_get opens
 * shards lazily and so is not thread-safe; after st_model_check succeeds every lookup is read-only. */
int st_model_check(st_model *m, mr_err *e);

/* ---------------- writer ---------------- */
typedef struct st_writer st_writer;

int st_writer_init(st_writer **out, mr_err *e);
void st_writer_free(st_writer *w); /* accepts NULL */
/* Adds a tensor: name is copied, data (numel * dtype_size bytes) is borrowed until the write call returns.
 * Checks the name (non-empty, not "__metadata__"; a name added twice is reported by the write call), ndim <= ST_MAX_DIMS, dims >= 0, no overflow. */
int st_writer_add(st_writer *w, const char *name, mr_dtype dtype, int ndim, const int64_t *shape,
                  const void *data, mr_err *e);
/* Adds (or replaces) a "__metadata__" entry; both strings are copied. */
int st_writer_set_meta(st_writer *w, const char *key, const char *value, mr_err *e);
/* Writes every tensor to one file at path, atomically. The header's keys are sorted ("__metadata__" first),
 * tensors are laid out by element size (largest first) then name so each is aligned to its element size, and
 * the header is padded with spaces so the data section starts at a multiple of 8. */
int st_writer_write(st_writer *w, const char *path, mr_err *e);
/* Writes a checkpoint directory (which must exist). When the tensor bytes fit in max_shard_bytes (or it is 0):
 * dir/model.safetensors. Otherwise shards dir/model-0000i-of-0000N.safetensors, each at most max_shard_bytes of
 * tensor data unless a single tensor is larger, then dir/model.safetensors.index.json last ("metadata":
 * {"total_size": ...}). Each file is replaced atomically; the layout not written (an older index, or an older
 * model.safetensors) is removed afterwards so st_model_open does not see two checkpoints. */
int st_writer_write_dir(st_writer *w, const char *dir, size_t max_shard_bytes, mr_err *e);

#endif
