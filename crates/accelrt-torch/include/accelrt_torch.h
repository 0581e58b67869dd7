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
/* torch.cuda.set_per_process_memory_fraction(fraction, device); fraction in [0, 1] (0 allows nothing). */
int accelrt_torch_set_memory_fraction(double fraction, int device);
/* The fraction set on `device` (1.0 when none is set), or -1.0 on failure. */
double accelrt_torch_get_memory_fraction(int device);
/* torch.cuda.memory._set_allocator_settings's rounding knobs, for every device (also those first
 * used later): `divisions[i]` is roundup_power2_divisions for requests of 2^i MiB up to twice that
 * (the first entry also covers smaller requests, the last given covers every larger interval),
 * each 0 or a power of two; garbage_collection_threshold in (0, 1), or 0 for none. An error
 * changes nothing. */
int accelrt_torch_set_rounding(const uint32_t* divisions, size_t len, double garbage_collection_threshold);
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
/* Record, on every device from now on (on != 0) or no longer, where reserved memory is each
   time it reaches a new peak; 0, or -1. */
int accelrt_torch_record_peak_breakdown(int on);
/* Where the device's reserved memory was at its last new peak: a JSON object ("reserved",
   "allocated", "free_in_shared_pages", "free_in_used_chunks", "idle_chunks", "spare_chunks",
   "free_in_segments", "other": bytes), or "null" when none was recorded; the caller frees
   it with accelrt_torch_free_buffer. NULL on failure. */
char *accelrt_torch_peak_breakdown_json(int device);
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

/* ---- the full allocator interface (c10::cuda::CUDACachingAllocator::CUDAAllocator) ------- */

/* A live block of a private pool. */
typedef struct {
  uint64_t ptr;
  uint64_t size;      /* the block's (rounded) size */
  uint64_t requested; /* bytes the caller asked for */
} accelrt_torch_block;

/* The allocated blocks of private pool (id0, id1), by address: up to `cap` into `out`
 * (NULL with cap 0 to count); returns how many there are (call again with a larger array
 * when that exceeds cap), or -1 (no such pool). */
ssize_t accelrt_torch_pool_live_blocks(int device, uint64_t id0, uint64_t id1,
                                       accelrt_torch_block *out, size_t cap);
/* Make [ptr, ptr + size) of private pool (id0, id1) an allocated block again, as if the
 * allocator had just handed it out. 0 when the block is allocated afterwards (also when it
 * already was); -1 when the range is not one free piece of the pool (the message says why).
 * Whole checkpoints: accelrt_torch_pool_checkpoint / accelrt_torch_pool_restore. */
int accelrt_torch_pool_claim_block(int device, uint64_t id0, uint64_t id1, uint64_t ptr,
                                   uint64_t size, uint64_t requested);
/* Checkpoints of private pools (getCheckpointState / setCheckpointPoolState, used by CUDA
 * graph trees). accelrt_torch_pool_checkpoint records pool (id0, id1) of `device` (its
 * segments and every block in them) and returns a handle, never 0; 0 on error (no such pool,
 * or 65536 checkpoints alive: free each with accelrt_torch_checkpoint_free when its state is
 * dropped). accelrt_torch_checkpoint_blocks lists the blocks the checkpoint had allocated, by
 * address, as accelrt_torch_pool_live_blocks does (NULL with cap 0 to count; -1: unknown
 * handle). accelrt_torch_pool_restore puts the pool back: every block allocated in it now is
 * freed (frees waiting for other streams are waited for), then the checkpoint's allocated
 * blocks are allocated again at their addresses; 0, or -1 when the checkpoint no longer fits
 * the pool (a segment gone, memory lent away; the message says which), and then nothing
 * changed. accelrt_torch_checkpoint_free: 0, or -1 for an unknown handle. */
uint64_t accelrt_torch_pool_checkpoint(int device, uint64_t id0, uint64_t id1);
ssize_t accelrt_torch_checkpoint_blocks(uint64_t handle, accelrt_torch_block *out, size_t cap);
int accelrt_torch_pool_restore(int device, uint64_t handle);
int accelrt_torch_checkpoint_free(uint64_t handle);
/* emptyCache(mempool_id): give back cached memory of the device that holds pool (id0, id1)
 * (whole free segments of every pool of the device, that pool's included). */
int accelrt_torch_empty_pool_cache(int device, uint64_t id0, uint64_t id1);
/* Where `ptr` lives: device, segment base and size, whether the segment is expandable
 * (VMM), and the live block holding it (address and size; the segment when no live block
 * does). Out pointers may be NULL. 0, or -1 when accelrt does not hold `ptr`. */
int accelrt_torch_segment_of(const void *ptr, int *device, uint64_t *base, uint64_t *size,
                             int *expandable, uint64_t *block, uint64_t *block_size);

/* History with context ids: while history with context is on, the calling thread's next
 * allocations carry `id` (0: none), returned in structured snapshots, so a caller keeps its
 * own stack objects and finds them again. */
void accelrt_torch_set_context_id(uint64_t id);
/* Start (enabled != 0; at most max_entries events; context ids when context != 0) or stop
 * history on `device` (-1: every device, now and later); clear != 0 forgets what was
 * recorded. */
int accelrt_torch_record_history_ex(int device, int enabled, size_t max_entries, int context,
                                    int clear);

/* A structured snapshot (PyTorch's SnapshotInfo). Blocks of segment i are
 * blocks[first_block .. first_block + block_count). */
typedef struct {
  uint64_t address, total_size, allocated_size, active_size, requested_size;
  uint64_t stream; /* native handle of the owning stream (0: default stream or private pool) */
  uint64_t pool_id0, pool_id1;
  int32_t device, is_large, is_expandable;
  uint32_t first_block, block_count;
} accelrt_torch_segment;
typedef struct {
  uint64_t address, size, requested_size;
  int32_t state; /* 0 inactive, 1 active_allocated, 2 active_pending_free */
  int32_t reserved;
  uint64_t context; /* context id at allocation (0: none) */
} accelrt_torch_snapshot_block;
typedef struct {
  int32_t action; /* PyTorch's TraceEntry::Action: 0 alloc, 1 free_requested, 2 free_completed,
                     3 segment_alloc, 4 segment_free, 5 segment_map, 6 segment_unmap,
                     7 snapshot, 8 oom */
  int32_t device;
  uint64_t addr, size;
  uint64_t stream;  /* native handle */
  uint64_t time_us; /* microseconds since the Unix epoch */
  uint64_t context;
} accelrt_torch_trace_entry;
typedef struct {
  accelrt_torch_segment *segments;
  size_t segment_count;
  accelrt_torch_snapshot_block *blocks;
  size_t block_count;
  accelrt_torch_trace_entry *traces;
  size_t trace_count;
} accelrt_torch_snapshot;
/* Fill `out` for `device` (-1: every device in use); only pool (id0, id1)'s segments unless
 * it is (0, 0); history entries when include_traces != 0. Free with
 * accelrt_torch_snapshot_free. */
int accelrt_torch_snapshot_raw(int device, uint64_t id0, uint64_t id1, int include_traces,
                               accelrt_torch_snapshot *out);
void accelrt_torch_snapshot_free(accelrt_torch_snapshot *snap);

/* Segment events (attachAllocatorTraceTracker, NCCL registration): tracker(ctx, action,
 * device, addr, size) with action 3 segment_alloc, 4 segment_free (plain segments), 5
 * segment_map (pages mapped into an expandable segment). Called from any thread, with no
 * allocator lock held; it must not unwind; ctx must live for the rest of the process. */
typedef void (*accelrt_torch_tracker_fn)(void *ctx, int action, int device, uint64_t addr,
                                         uint64_t size);
int accelrt_torch_add_segment_tracker(accelrt_torch_tracker_fn tracker, void *ctx);
/* The allocator configuration of `device` (accelrt's key:value syntax); free the buffer. */
char *accelrt_torch_config_string(int device);

/* ---- IPC of expandable (VMM) memory --------------------------------------------------------- */

/* Share the expandable memory [ptr, ptr + len) (one live block) with another process: the
 * chunks under it are exported as POSIX file descriptors (kept open until
 * accelrt_torch_ipc_forget for the block) and a handle is written to `out` when `cap` is
 * large enough: "ACRT" 'V', version, device, the sender's pid, where the shared bytes lie,
 * and per chunk its descriptor number, size and offset. Returns the handle's length (call
 * again with a larger buffer when it exceeds cap: the export is reused), or -1 (a plain
 * segment: share it with cudaIpcGetMemHandle on the segment base; memory that is not
 * exportable: the message says why). */
ssize_t accelrt_torch_ipc_share(const void *ptr, size_t len, uint8_t *out, size_t cap);
/* The block at ptr is being freed: close the descriptors exported for it (if any). */
void accelrt_torch_ipc_forget(void *ptr);
/* Map the memory a handle from accelrt_torch_ipc_share (in another process) names, on
 * `device`, without copying: the descriptors are taken from the sender with pidfd_open +
 * pidfd_getfd (Linux 5.6+, the same user, ptrace allowed), imported and mapped at a new
 * range; the shared bytes' address goes to *out. 0, or -1 (a malformed handle is rejected
 * before anything is opened; the message says what is wrong). */
int accelrt_torch_ipc_open(int device, const uint8_t *bytes, size_t len, void **out);
/* Unmap and release what accelrt_torch_ipc_open mapped at ptr (after the device's queued
 * work). */
int accelrt_torch_ipc_close(void *ptr);

/* ---- trace recorder (format v2, traces/FORMAT.md) ---------------------------------------------- */

/* Record every alloc / free / record_stream made through this library, with CPU times and
 * completion markers from accelrt's pooled events, to `path` (gzip when it ends in .gz);
 * `workload` names it (NULL: the file name). The file is written at stop (or process exit). */
int accelrt_torch_record_trace_start(const char *path, const char *workload);
int accelrt_torch_record_trace_stop(void);
/* 1 while recording, else 0. */
int accelrt_torch_record_trace_active(void);

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
