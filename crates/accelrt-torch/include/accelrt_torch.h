/* accelrt_torch.h: the C ABI of libaccelrt_torch.so, accelrt's caching allocator as
 * PyTorch's CUDA allocator (torch.cuda.memory.CUDAPluggableAllocator).
 *
 * Conventions
 * - No call crashes or unwinds on bad input: each returns NULL, -1 (or the documented error
 *   value) and leaves a message in accelrt_torch_last_error() (per thread, valid until the
 *   next failing call on that thread). A panic inside the library is caught, logged to
 *   stderr and reported the same way.
 * - `stream` arguments are CUstream / cudaStream_t handles of the device's primary context
 *   (NULL is the legacy default stream). They are wrapped, never owned: the caller keeps
 *   them alive while memory allocated on them is live.
 * - Buffers returned by *_json / *_pickle are freed with accelrt_torch_free_buffer().
 * - ACCELRT_ALLOC_CONF configures the allocator (PyTorch's PYTORCH_CUDA_ALLOC_CONF syntax);
 *   ACCELRT_TORCH_BACKEND=host runs everything on accelrt's host backend (tests without a
 *   GPU; stream handles are then host stream ids).
 */
#ifndef ACCELRT_TORCH_H
#define ACCELRT_TORCH_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Values written by accelrt_torch_stats_array(): for each statistic in PyTorch's order
 * (allocation, segment, active, inactive_split, allocated_bytes, reserved_bytes,
 * active_bytes, inactive_split_bytes, requested_bytes), for each pool (all, small_pool,
 * large_pool): current, peak, allocated, freed (9 * 3 * 4 = 108 values); then
 * num_alloc_retries, num_ooms, num_sync_all_streams, num_device_alloc, num_device_free. */
#define ACCELRT_TORCH_STATS_LEN 113

/* ---- PyTorch's pluggable-allocator functions ------------------------------------------ */

/* `size` bytes on `device` for use on `stream`. NULL for size 0 (nothing to allocate; not
 * an error) and on failure: a negative size, an invalid device or stream, the backend being
 * unavailable, out of memory (accelrt_torch_last_oom() then says so). */
void *accelrt_torch_alloc(ssize_t size, int device, void *stream);
/* Free what accelrt_torch_alloc returned (size, device and stream are PyTorch's record of
 * the allocation; the block returns to the pool it came from). NULL is ignored; an unknown
 * pointer is refused (logged to stderr and kept in accelrt_torch_last_error()). */
void accelrt_torch_free(void *ptr, ssize_t size, int device, void *stream);

/* ---- optional hooks (0 on success, -1 on failure) ---------------------------------------- */

/* PyTorch's CUDA initialisation: checks that accelrt sees `device_count` devices too. */
int accelrt_torch_init(int device_count);
/* torch.cuda.empty_cache(): give every cached segment of every device back. */
int accelrt_torch_empty_cache(void);
/* torch.cuda.set_per_process_memory_fraction(fraction, device); fraction in (0, 1]. */
int accelrt_torch_set_memory_fraction(double fraction, int device);
/* The fraction set on `device` (1.0 when none is set), or -1.0 on failure. */
double accelrt_torch_get_memory_fraction(int device);
/* Tensor.record_stream(stream): the block is not reused until `stream` has passed its free. */
int accelrt_torch_record_stream(void *ptr, void *stream);

/* Private pools (CUDA graphs, torch.cuda.MemPool). A pool id is PyTorch's MempoolId_t
 * (id0, id1), never (0, 0). begin adds a use of the pool (creating it with one use) and
 * routes allocations on the streams `filter` accepts to it until end; release drops a use
 * and at zero gives the pool's memory back. `filter(ctx, stream)` returns non-zero to accept
 * a stream; it must be callable from any thread and must not unwind. The library owns `ctx`
 * from the call on (also when the call fails) and calls `drop_ctx(ctx)` (when not NULL) once
 * it no longer needs it. filter == NULL accepts every stream of the device. */
typedef int (*accelrt_torch_filter_fn)(void *ctx, void *stream);
typedef void (*accelrt_torch_drop_fn)(void *ctx);
int accelrt_torch_begin_allocate_to_pool(int device, uint64_t id0, uint64_t id1,
                                         accelrt_torch_filter_fn filter, void *ctx,
                                         accelrt_torch_drop_fn drop_ctx);
int accelrt_torch_end_allocate_to_pool(int device, uint64_t id0, uint64_t id1);
int accelrt_torch_release_pool(int device, uint64_t id0, uint64_t id1);
/* Add a use of a pool, creating it (torch.cuda.MemPool's constructor). */
int accelrt_torch_create_or_incref_pool(int device, uint64_t id0, uint64_t id1);
/* Uses of a pool (0 when there is no such pool), or -1 on failure. */
int accelrt_torch_pool_use_count(int device, uint64_t id0, uint64_t id1);

/* ---- statistics, snapshots, history -------------------------------------------------------- */

/* JSON object with PyTorch's flat memory_stats() keys ("allocated_bytes.all.current", ...). */
char *accelrt_torch_memory_stats_json(int device);
/* ACCELRT_TORCH_STATS_LEN values (see above) into out[0..len); returns the count or -1. */
int accelrt_torch_stats_array(int device, int64_t *out, size_t len);
int accelrt_torch_reset_peak_stats(int device);
int accelrt_torch_reset_accumulated_stats(int device);
/* An estimate of the largest block an allocation could get now without failing (cached
 * bytes plus what the device and the limits still allow), for cuDNN's workspace choice. */
int accelrt_torch_cache_info(int device, size_t *largest);
/* Snapshot in PyTorch's pickle layout (torch.cuda.memory._snapshot(), loadable by
 * https://pytorch.org/memory_viz); device -1: every device in use. *len gets the size. */
unsigned char *accelrt_torch_snapshot_pickle(int device, size_t *len);
/* Record allocator history (enabled != 0) into a ring of max_entries, or stop; device -1:
 * every device, including devices used later. */
int accelrt_torch_record_history(int device, int enabled, size_t max_entries);

/* ---- errors and buffers ---------------------------------------------------------------------- */

/* The calling thread's last error message ("" when none). */
const char *accelrt_torch_last_error(void);
/* 1 when the calling thread's last failure was an out-of-memory: out[0..4) = bytes
 * requested, device total, device free, bytes allocated by accelrt; else 0. */
int accelrt_torch_last_oom(int64_t *out);
/* Whether failed allocations are also logged to stderr (default 1). A caller that raises
 * them as exceptions (accelrt_torch.py's shim) turns this off. */
void accelrt_torch_set_log_alloc_failures(int enabled);
void accelrt_torch_free_buffer(void *buffer);
/* The library's version ("0.1.0"). */
const char *accelrt_torch_version(void);
/* Devices accelrt sees, or -1 when its backend is unavailable (last error says why). */
int accelrt_torch_device_count(void);

#ifdef __cplusplus
}
#endif

#endif /* ACCELRT_TORCH_H */
