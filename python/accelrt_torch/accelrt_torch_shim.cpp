// accelrt_torch_shim.cpp: libaccelrt_torch.so as PyTorch's CUDA allocator, a complete
// c10::cuda::CUDACachingAllocator::CUDAAllocator (PyTorch 2.11's interface).
//
// PyTorch reaches its allocator through one pointer, c10::cuda::CUDACachingAllocator::allocator
// and the device-generic c10::GetAllocator(kCUDA) (torch.accelerator.*); install replaces both
// (changeCurrentAllocator, then c10::SetAllocator), before CUDA is initialised. Its own CUDAPluggableAllocator class implements
// only part of the interface ("pluggable does not yet support checkPoolLiveAllocations", which
// torch.compile(mode="reduce-overhead") calls); AccelrtAllocator below implements every virtual
// and is installed through the same door, so PyTorch treats it as it treats its own allocator:
// torch.cuda.memory_stats() and friends, graphs and cudagraph trees (pools, checkpoints),
// MemPool, memory history and snapshots with stack frames, OOM observers, trace trackers (NCCL
// registration), IPC (torch.multiprocessing), peer copies.
//
// accelrt_torch/__init__.py compiles this file at run time with torch.utils.cpp_extension
// against the installed PyTorch and calls accelrt_shim_install. The library is reached
// through dlsym (no link-time dependency); every call into it is C ABI and never unwinds.
// Every C++ exception this file throws goes to PyTorch, which expects them from its
// allocator; none crosses into the library. Hooks PyTorch calls from destructors never throw.
//
// PyTorch's own settings (PYTORCH_ALLOC_CONF, _set_allocator_settings) are followed where they
// mean the same on accelrt: roundup_power2_divisions, garbage_collection_threshold,
// per_process_memory_fraction. With caching turned off (enable(false)) memory comes straight
// from cudaMalloc, as with PyTorch's allocator.
//
// What cannot be done is refused with a message saying why and what to do instead:
// MemPool(use_on_oom=True) and no_split=True;
// a MemPool with an allocator of its own. Checkpoints of CUDA graph pools (getCheckpointState
// / setCheckpointPoolState) are the library's pool checkpoints; sharing expandable (VMM)
// memory between processes is the library's (accelrt_torch_ipc_share / _open / _close).

#include <c10/core/Allocator.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <c10/cuda/CUDAAllocatorConfig.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/ApproximateClock.h>
#include <c10/util/Exception.h>
#include <torch/csrc/cuda/CUDAPluggableAllocator.h>
#if __has_include(<c10/core/AllocatorConfig.h>)
#include <c10/core/AllocatorConfig.h>
#define ACCELRT_TORCH_ALLOCATOR_CONFIG 1
#endif

#include <cuda_runtime_api.h>
#include <dlfcn.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace {

namespace cca = c10::cuda::CUDACachingAllocator;
namespace cda = c10::CachingDeviceAllocator;
using c10::MempoolId_t;
using StreamFilter = std::function<bool(cudaStream_t)>;

constexpr size_t kStatsLen = 113;  // ACCELRT_TORCH_STATS_LEN

// ---- the library's C ABI (crates/accelrt-torch/include/accelrt_torch.h) ----------------------

struct BlockRecord {
  uint64_t ptr, size, requested;
};
struct SegmentRecord {
  uint64_t address, total_size, allocated_size, active_size, requested_size;
  uint64_t stream;
  uint64_t pool_id0, pool_id1;
  int32_t device, is_large, is_expandable;
  uint32_t first_block, block_count;
};
struct SnapshotBlock {
  uint64_t address, size, requested_size;
  int32_t state, reserved;
  uint64_t context;
};
struct TraceRecord {
  int32_t action, device;
  uint64_t addr, size, stream, time_us, context;
};
struct RawSnapshot {
  SegmentRecord* segments;
  size_t segment_count;
  SnapshotBlock* blocks;
  size_t block_count;
  TraceRecord* traces;
  size_t trace_count;
};
using TrackerFn = void (*)(void*, int, int, uint64_t, uint64_t);

struct Library {
  void* (*alloc)(ssize_t, int, void*) = nullptr;
  void (*free)(void*, ssize_t, int, void*) = nullptr;
  int (*init)(int) = nullptr;
  int (*empty_cache)() = nullptr;
  int (*set_memory_fraction)(double, int) = nullptr;
  double (*get_memory_fraction)(int) = nullptr;
  int (*record_stream)(void*, void*) = nullptr;
  int (*begin_pool)(int, uint64_t, uint64_t, int (*)(void*, void*), void*,
                    void (*)(void*)) = nullptr;
  int (*end_pool)(int, uint64_t, uint64_t) = nullptr;
  int (*release_pool)(int, uint64_t, uint64_t) = nullptr;
  int (*create_or_incref_pool)(int, uint64_t, uint64_t) = nullptr;
  int (*pool_use_count)(int, uint64_t, uint64_t) = nullptr;
  int (*stats_array)(int, int64_t*, size_t) = nullptr;
  int (*reset_peak_stats)(int) = nullptr;
  int (*reset_accumulated_stats)(int) = nullptr;
  int (*cache_info)(int, size_t*) = nullptr;
  const char* (*last_error)() = nullptr;
  int (*last_oom)(int64_t*) = nullptr;
  void (*set_log_alloc_failures)(int) = nullptr;
  ssize_t (*pool_live_blocks)(int, uint64_t, uint64_t, BlockRecord*, size_t) = nullptr;
  int (*pool_claim_block)(int, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t) = nullptr;
  uint64_t (*pool_checkpoint)(int, uint64_t, uint64_t) = nullptr;
  ssize_t (*checkpoint_blocks)(uint64_t, BlockRecord*, size_t) = nullptr;
  int (*pool_restore)(int, uint64_t) = nullptr;
  int (*checkpoint_free)(uint64_t) = nullptr;
  int (*empty_pool_cache)(int, uint64_t, uint64_t) = nullptr;
  int (*segment_of)(const void*, int*, uint64_t*, uint64_t*, int*, uint64_t*,
                    uint64_t*) = nullptr;
  void (*set_context_id)(uint64_t) = nullptr;
  int (*record_history_ex)(int, int, size_t, int, int) = nullptr;
  int (*snapshot_raw)(int, uint64_t, uint64_t, int, RawSnapshot*) = nullptr;
  void (*snapshot_free)(RawSnapshot*) = nullptr;
  int (*add_segment_tracker)(TrackerFn, void*) = nullptr;
  char* (*config_string)(int) = nullptr;
  void (*free_buffer)(void*) = nullptr;
  ssize_t (*ipc_share)(const void*, size_t, uint8_t*, size_t) = nullptr;
  void (*ipc_forget)(void*) = nullptr;
  int (*ipc_open)(int, const uint8_t*, size_t, void**) = nullptr;
  int (*ipc_close)(void*) = nullptr;
  int (*set_rounding)(const uint32_t*, size_t, double) = nullptr;
};

Library lib;

std::string last_error() {
  const char* e = lib.last_error();
  return e != nullptr ? e : "";
}

void check(int rc, const char* what) {
  TORCH_CHECK(rc == 0, "accelrt allocator: ", what, " failed: ", last_error());
}

// For hooks PyTorch calls from destructors (CUDAGraph::reset, ~MemPool): never throw.
void warn_unless_ok(int rc, const char* what) {
  if (rc != 0) {
    TORCH_WARN("accelrt allocator: ", what, " failed: ", last_error());
  }
}

// Numbers for messages, without iostreams. A C++ toolchain that links its own libstdc++
// statically into the shim (the GPU machine's CXX wrapper does) leaves two copies of the
// locale machinery in the process, and `c10::str(..., int, ...)` then crashed inside
// `ostream::_M_insert<long>` (every out-of-memory error was a segfault). Messages of this
// file pass numbers as strings made here; the build also asks for the shared libstdc++
// (see `_build_shim` in __init__.py).
std::string num(long long v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%lld", v);
  return buf;
}

std::string unum(unsigned long long v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%llu", v);
  return buf;
}

// PyTorch's way of printing sizes in out-of-memory messages (tests match on it).
std::string format_size(uint64_t size) {
  char buf[64];
  if (size <= 1024) {
    std::snprintf(buf, sizeof(buf), "%llu bytes", static_cast<unsigned long long>(size));
  } else if (size <= 1048576) {
    std::snprintf(buf, sizeof(buf), "%.2f KiB", size / 1024.0);
  } else if (size <= 1073741824ULL) {
    std::snprintf(buf, sizeof(buf), "%.2f MiB", size / 1048576.0);
  } else {
    std::snprintf(buf, sizeof(buf), "%.2f GiB", size / 1073741824.0);
  }
  return buf;
}

// The live blocks of a private pool.
std::vector<BlockRecord> pool_blocks(c10::DeviceIndex device, MempoolId_t id) {
  std::vector<BlockRecord> out(64);
  for (;;) {
    ssize_t n = lib.pool_live_blocks(device, id.first, id.second, out.data(), out.size());
    TORCH_CHECK(n >= 0, "accelrt allocator: the live blocks of pool (", unum(id.first), ", ",
                unum(id.second), ") failed: ", last_error());
    if (static_cast<size_t>(n) <= out.size()) {
      out.resize(static_cast<size_t>(n));
      return out;
    }
    out.resize(static_cast<size_t>(n));
  }
}

// A snapshot from the library, freed when this goes out of scope.
struct OwnedSnapshot {
  RawSnapshot raw{};
  OwnedSnapshot(int device, MempoolId_t pool, bool traces) {
    check(lib.snapshot_raw(device, pool.first, pool.second, traces ? 1 : 0, &raw), "snapshot");
  }
  ~OwnedSnapshot() { lib.snapshot_free(&raw); }
  OwnedSnapshot(const OwnedSnapshot&) = delete;
  OwnedSnapshot& operator=(const OwnedSnapshot&) = delete;
};

// The library calls this for each stream while a route to a private pool is in force.
int filter_trampoline(void* ctx, void* stream) noexcept {
  try {
    return (*static_cast<StreamFilter*>(ctx))(static_cast<cudaStream_t>(stream)) ? 1 : 0;
  } catch (...) {
    return 0;  // PyTorch's capture filter throws only when the stream query fails
  }
}

void filter_drop(void* ctx) noexcept { delete static_cast<StreamFilter*>(ctx); }

// ---- history contexts (stack frames) ----------------------------------------------------------

// PyTorch's context recorder gives a GatheredContext per allocation (a captured Python/C++
// stack, symbolized only when a snapshot is taken). The library carries an id per allocation
// through its history; this table maps the ids back to the contexts.
struct Contexts {
  std::mutex mutex;
  cda::CreateContextFn recorder = nullptr;
  cda::RecordContext when = cda::RecordContext::NEVER;
  std::atomic<bool> on{false};
  std::atomic<bool> history{false};
  size_t max_entries = 0;
  uint64_t next_id = 1;
  std::unordered_map<uint64_t, std::shared_ptr<c10::GatheredContext>> by_id;
  std::vector<std::string> skip_actions;
};
Contexts contexts;

std::shared_ptr<c10::GatheredContext> context_for(uint64_t id) {
  if (id == 0) {
    return nullptr;
  }
  std::lock_guard<std::mutex> guard(contexts.mutex);
  auto it = contexts.by_id.find(id);
  return it == contexts.by_id.end() ? nullptr : it->second;
}

// Drop contexts no block or history entry refers to any more (called when the table grows
// past twice the history's size).
void prune_contexts() {
  std::unordered_set<uint64_t> used;
  {
    OwnedSnapshot snap(-1, {0, 0}, true);
    for (size_t i = 0; i < snap.raw.block_count; ++i) {
      used.insert(snap.raw.blocks[i].context);
    }
    for (size_t i = 0; i < snap.raw.trace_count; ++i) {
      used.insert(snap.raw.traces[i].context);
    }
  }
  std::lock_guard<std::mutex> guard(contexts.mutex);
  for (auto it = contexts.by_id.begin(); it != contexts.by_id.end();) {
    it = used.count(it->first) ? std::next(it) : contexts.by_id.erase(it);
  }
}

// Before an allocation while history with context is on: gather the context, give the
// library its id.
void note_context() {
  cda::CreateContextFn recorder;
  {
    std::lock_guard<std::mutex> guard(contexts.mutex);
    recorder = contexts.recorder;
  }
  if (recorder == nullptr) {
    return;
  }
  std::shared_ptr<c10::GatheredContext> ctx = recorder();
  uint64_t id = 0;
  bool prune = false;
  {
    std::lock_guard<std::mutex> guard(contexts.mutex);
    id = contexts.next_id++;
    contexts.by_id.emplace(id, std::move(ctx));
    prune = contexts.by_id.size() > 2 * std::max<size_t>(contexts.max_entries, 50000);
  }
  lib.set_context_id(id);
  if (prune) {
    prune_contexts();
  }
}

// ---- segment trackers (attachAllocatorTraceTracker) ----------------------------------------

std::mutex trackers_mutex;
std::vector<cda::AllocatorTraceTracker> trackers;

void tracker_trampoline(void* /*ctx*/, int action, int device, uint64_t addr,
                        uint64_t size) noexcept {
  try {
    std::vector<cda::AllocatorTraceTracker> to_call;
    {
      std::lock_guard<std::mutex> guard(trackers_mutex);
      to_call = trackers;
    }
    cda::TraceEntry entry(static_cast<cda::TraceEntry::Action>(action),
                          static_cast<c10::DeviceIndex>(device), addr, size, nullptr, {0, 0},
                          c10::getApproximateTime());
    for (auto& t : to_call) {
      t(entry);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "accelrt allocator: a trace tracker threw: %s\n", e.what());
  } catch (...) {
    std::fprintf(stderr, "accelrt allocator: a trace tracker threw\n");
  }
}

// ---- IPC ---------------------------------------------------------------------------------------

// Handles this allocator writes: "ACRT" + kind, then the fields below. Handles from PyTorch's
// own allocator for plain memory (a cudaIpcMemHandle_t, bare or after two format bytes) open
// too.
constexpr char kIpcMagic[4] = {'A', 'C', 'R', 'T'};
constexpr char kIpcPlain = 'P';
constexpr char kIpcPages = 'V';

struct PlainHandle {
  int32_t device;
  uint64_t segment_size;
  cudaIpcMemHandle_t handle;
};
template <typename T>
void put(std::string& s, const T& v) {
  s.append(reinterpret_cast<const char*>(&v), sizeof(T));
}

template <typename T>
T take(const std::string& s, size_t& at) {
  TORCH_CHECK(at + sizeof(T) <= s.size(), "accelrt allocator: a truncated IPC handle (",
              unum(s.size()), " bytes)");
  T v;
  std::memcpy(&v, s.data() + at, sizeof(T));
  at += sizeof(T);
  return v;
}

// Blocks shared as expandable memory: the library keeps their exported descriptors until the
// block is freed (close_exported, from the free path).
std::atomic<bool> any_exported{false};

void close_exported(void* block) { lib.ipc_forget(block); }

// Opened handles: one mapping per handle in a process (CUDA refuses to open a handle twice).
std::mutex opened_mutex;
std::unordered_map<std::string, std::weak_ptr<void>> opened;

// ---- the allocator ------------------------------------------------------------------------------

void local_raw_delete(void* ptr);

// A checkpoint of a private pool: the library's handle (its segments and every block in
// them, kept in Rust) and the blocks it had allocated. Freed with the state.
struct CheckpointState final : public cca::AllocatorState {
  c10::DeviceIndex device = 0;
  MempoolId_t pool{0, 0};
  uint64_t handle = 0;
  std::vector<BlockRecord> blocks;
  CheckpointState() = default;
  CheckpointState(const CheckpointState&) = delete;
  CheckpointState& operator=(const CheckpointState&) = delete;
  ~CheckpointState() {
    if (handle != 0 && lib.checkpoint_free != nullptr) {
      lib.checkpoint_free(handle);  // cannot fail for a handle we own; never throws
    }
  }
};

// ---- caching turned off (torch.cuda.caching_allocator_enable(False)) ----
// PyTorch's allocator then hands out plain cudaMalloc memory, outside its pools and statistics,
// and cudaFree's it when it is freed, whenever caching was turned back on in between. So does
// this one: such blocks are remembered here, and the free path looks here only while some are
// live (one relaxed load otherwise).
std::atomic<bool> caching_enabled{true};
std::atomic<size_t> uncached_live{0};
std::mutex uncached_mutex;
std::unordered_set<void*> uncached;

void* uncached_alloc(size_t size, c10::DeviceIndex device) {
  c10::cuda::CUDAGuard guard(device);
  void* p = nullptr;
  cudaError_t rc = cudaMalloc(&p, size);
  if (rc == cudaErrorMemoryAllocation) {
    (void)cudaGetLastError();
    TORCH_CHECK_WITH(OutOfMemoryError, false, "CUDA out of memory. Tried to allocate ",
                     format_size(size), " on GPU ", num(device),
                     " with caching turned off (torch.cuda.caching_allocator_enable(False)): "
                     "cudaMalloc refused it. Turn caching back on, or free memory first.");
  }
  C10_CUDA_CHECK(rc);
  std::lock_guard<std::mutex> lock(uncached_mutex);
  uncached.insert(p);
  uncached_live.fetch_add(1, std::memory_order_relaxed);
  return p;
}

// True when `p` was allocated with caching off (and is now given back to the device).
bool uncached_free(void* p) {
  if (uncached_live.load(std::memory_order_relaxed) == 0) {
    return false;
  }
  {
    std::lock_guard<std::mutex> lock(uncached_mutex);
    if (uncached.erase(p) == 0) {
      return false;
    }
    uncached_live.fetch_sub(1, std::memory_order_relaxed);
  }
  C10_CUDA_CHECK_WARN(cudaFree(p));
  return true;
}

// ---- PyTorch's own allocator settings ----
// PYTORCH_ALLOC_CONF / PYTORCH_CUDA_ALLOC_CONF and torch.cuda.memory._set_allocator_settings
// are parsed by PyTorch's config classes whatever allocator is installed; the settings that
// mean the same on accelrt are read back from them and applied (ACCELRT_ALLOC_CONF configures
// everything else): roundup_power2_divisions and garbage_collection_threshold (at start-up when
// PyTorch's environment variable names them, and at each _set_allocator_settings call), and
// per_process_memory_fraction (at start-up).
bool names_rounding(const std::string& settings) {
  return settings.find("roundup_power2_divisions") != std::string::npos ||
         settings.find("garbage_collection_threshold") != std::string::npos;
}

void apply_torch_rounding() {
#ifdef ACCELRT_TORCH_ALLOCATOR_CONFIG
  using AC = c10::CachingAllocator::AcceleratorAllocatorConfig;
  uint32_t table[32];
  for (size_t i = 0; i < 32; ++i) {
    // Interval i holds requests of 2^i MiB up to twice that, as in PyTorch's table.
    table[i] = static_cast<uint32_t>(AC::roundup_power2_divisions(size_t(1) << (20 + i)));
  }
  check(lib.set_rounding(table, 32, AC::garbage_collection_threshold()),
        "applying PyTorch's roundup_power2_divisions / garbage_collection_threshold");
#endif
}

std::string torch_settings_env() {
  for (const char* name : {"PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"}) {
    const char* v = std::getenv(name);
    if (v != nullptr) {
      return v;
    }
  }
  return "";
}

void follow_torch_settings() {
#ifdef ACCELRT_TORCH_ALLOCATOR_CONFIG
  // Replaces the hook through which PyTorch's CUDA config parses _set_allocator_settings (it
  // still does, first), adding no keys of its own.
  c10::CachingAllocator::AcceleratorAllocatorConfig::registerDeviceConfigParserHook(
      [](const std::string& env) {
        cca::CUDAAllocatorConfig::instance().parseArgs(env);
        // Each call sets PyTorch's whole configuration (a setting left out takes its
        // default again), so its values are applied whatever the string names.
        apply_torch_rounding();
      },
      {});
#endif
}

class AccelrtAllocator final : public cca::CUDAAllocator {
 public:
  // ---- allocation ----

  void* malloc(size_t size, c10::DeviceIndex device, cudaStream_t stream) {
    if (size == 0) {
      return nullptr;
    }
    constexpr size_t kOneExaByte = 1152921504606846976ULL;
    TORCH_CHECK_WITH(OutOfMemoryError, size < kOneExaByte,
                     "CUDA out of memory. Tried to allocate more than 1EB memory.");
    if (!caching_enabled.load(std::memory_order_relaxed)) {
      return uncached_alloc(size, device);
    }
    if (contexts.on.load(std::memory_order_relaxed)) {
      note_context();
    }
    void* p = lib.alloc(static_cast<ssize_t>(size), device, stream);
    if (p == nullptr) {
      raise_alloc_failure(size, device);
    }
    return p;
  }

  [[noreturn]] void raise_alloc_failure(size_t size, c10::DeviceIndex device) {
    std::string message = last_error();
    int64_t oom[4] = {0, 0, 0, 0};  // requested, device total, device free, allocated
    bool is_oom = lib.last_oom(oom) == 1;
    if (!is_oom) {
      size_t free_b = 0, total_b = 0;
      c10::cuda::CUDAGuard guard(device);
      if (cudaMemGetInfo(&free_b, &total_b) == cudaSuccess && size > total_b) {
        is_oom = true;  // more than the device has: an out-of-memory, whatever refused it
        oom[1] = static_cast<int64_t>(total_b);
        oom[2] = static_cast<int64_t>(free_b);
      } else {
        (void)cudaGetLastError();
      }
    }
    if (is_oom) {
      std::vector<cca::OutOfMemoryObserver> to_call;
      {
        std::lock_guard<std::mutex> guard(observers_mutex_);
        to_call = observers_;
      }
      for (auto& observer : to_call) {
        observer(device, static_cast<size_t>(oom[3]), static_cast<size_t>(oom[1]),
                 static_cast<size_t>(oom[2]));
      }
      TORCH_CHECK_WITH(OutOfMemoryError, false, "CUDA out of memory. Tried to allocate ",
                       format_size(size), ". GPU ", num(device),
                       " has a total capacity of ", format_size(oom[1]), " of which ",
                       format_size(oom[2]), " is free. Of the allocated memory ",
                       format_size(oom[3]),
                       " is allocated by accelrt's caching allocator (PyTorch on accelrt: "
                       "ACCELRT_ALLOC_CONF configures it). ",
                       message);
    }
    TORCH_CHECK(false, "accelrt allocator: cannot allocate ", unum(size), " bytes on cuda:",
                num(device), ": ", message);
  }

  c10::DataPtr allocate(size_t size) override {
    c10::DeviceIndex device = c10::cuda::current_device();
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
    void* p = malloc(size, device, stream);
    return {p, p, &local_raw_delete, c10::Device(c10::DeviceType::CUDA, device)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &local_raw_delete; }

  void* raw_alloc(size_t nbytes) override {
    c10::DeviceIndex device = c10::cuda::current_device();
    return malloc(nbytes, device, c10::cuda::getCurrentCUDAStream(device));
  }

  void* raw_alloc_with_stream(size_t nbytes, cudaStream_t stream) override {
    return malloc(nbytes, c10::cuda::current_device(), stream);
  }

  void raw_delete(void* ptr) override {
    if (ptr == nullptr) {
      return;
    }
    if (any_exported.load(std::memory_order_relaxed)) {
      close_exported(ptr);
    }
    if (uncached_free(ptr)) {
      return;
    }
    // The library finds the block's device itself; the current device is a hint.
    lib.free(ptr, 0, c10::cuda::current_device(), nullptr);
  }

  void copy_data(void* dest, const void* src, std::size_t count) const final {
    C10_CUDA_CHECK(cudaMemcpy(dest, src, count, cudaMemcpyDeviceToDevice));
  }

  // ---- set-up ----

  void init(int device_count) override {
    check(lib.init(device_count), "init");
    // PyTorch's settings: parsing them here reports their errors as PyTorch does
    // ("per_process_memory_fraction is invalid", ...), at CUDA initialisation.
    double fraction = cca::CUDAAllocatorConfig::per_process_memory_fraction();
    if (fraction != 1.0) {
      for (int d = 0; d < device_count; ++d) {
        check(lib.set_memory_fraction(fraction, d), "per_process_memory_fraction");
      }
    }
    if (names_rounding(torch_settings_env())) {
      apply_torch_rounding();
    }
    device_count_ = device_count;
    initialized_.store(true);
  }

  bool initialized() override { return initialized_.load(); }

  void enable(bool value) override { caching_enabled.store(value); }

  bool isEnabled() const override { return caching_enabled.load(); }

  std::string name() override { return "accelrt"; }

  // ---- limits, cache ----

  double getMemoryFraction(c10::DeviceIndex device) override {
    double f = lib.get_memory_fraction(device);
    TORCH_CHECK(f >= 0, "accelrt allocator: get_per_process_memory_fraction failed: ",
                last_error());
    return f;
  }

  void setMemoryFraction(double fraction, c10::DeviceIndex device) override {
    check(lib.set_memory_fraction(fraction, device), "set_per_process_memory_fraction");
  }

  void emptyCache(MempoolId_t mempool_id) override {
    if (mempool_id.first == 0 && mempool_id.second == 0) {
      warn_unless_ok(lib.empty_cache(), "empty_cache");
      return;
    }
    for (int d = 0; d < device_count(); ++d) {
      if (lib.pool_use_count(d, mempool_id.first, mempool_id.second) > 0) {
        check(lib.empty_pool_cache(d, mempool_id.first, mempool_id.second),
              "empty_cache(mempool_id)");
      }
    }
  }

  void cacheInfo(c10::DeviceIndex device, size_t* largest) override {
    check(lib.cache_info(device, largest), "cacheInfo");
  }

  void* getBaseAllocation(void* ptr, size_t* size) override {
    int device = 0, expandable = 0;
    uint64_t base = 0, seg_size = 0, block = 0, block_size = 0;
    check(lib.segment_of(ptr, &device, &base, &seg_size, &expandable, &block, &block_size),
          "getBaseAllocation");
    // A plain segment is one device allocation (what CUDA IPC shares); an expandable one
    // is a large address range, of which the block is what is shared.
    uint64_t b = expandable ? block : base;
    if (size != nullptr) {
      *size = static_cast<size_t>(expandable ? block_size : seg_size);
    }
    return reinterpret_cast<void*>(b);
  }

  std::vector<cca::StreamSegmentSize> getExpandableSegmentSizes(
      c10::DeviceIndex device) override {
    std::vector<cca::StreamSegmentSize> out;
    OwnedSnapshot snap(device, {0, 0}, false);
    for (size_t i = 0; i < snap.raw.segment_count; ++i) {
      const SegmentRecord& s = snap.raw.segments[i];
      if (s.is_expandable) {
        out.emplace_back(reinterpret_cast<cudaStream_t>(s.stream), !s.is_large,
                         static_cast<size_t>(s.total_size));
      }
    }
    return out;
  }

  // ---- streams ----

  void recordStream(const c10::DataPtr& ptr, c10::cuda::CUDAStream stream) override {
    if (ptr.get() == nullptr || ptr.get_deleter() != &local_raw_delete) {
      return;  // not memory of this allocator (as PyTorch's own allocator does)
    }
    check(lib.record_stream(ptr.get(), stream.stream()), "record_stream");
  }

  // ---- statistics ----

  cda::DeviceStats getDeviceStats(c10::DeviceIndex device) override {
    int64_t v[kStatsLen];
    TORCH_CHECK(lib.stats_array(device, v, kStatsLen) == static_cast<int>(kStatsLen),
                "accelrt allocator: memory_stats failed: ", last_error());
    cda::DeviceStats s;
    auto fill = [&v](auto& array, size_t stat) {
      for (size_t pool = 0; pool < 3; ++pool) {  // all, small_pool, large_pool
        const int64_t* x = &v[(stat * 3 + pool) * 4];
        array[pool].current = x[0];
        array[pool].peak = x[1];
        array[pool].allocated = x[2];
        array[pool].freed = x[3];
      }
    };
    fill(s.allocation, 0);
    fill(s.segment, 1);
    fill(s.active, 2);
    fill(s.inactive_split, 3);
    fill(s.allocated_bytes, 4);
    fill(s.reserved_bytes, 5);
    fill(s.active_bytes, 6);
    fill(s.inactive_split_bytes, 7);
    fill(s.requested_bytes, 8);
    s.num_alloc_retries = v[108];
    s.num_ooms = v[109];
    s.num_sync_all_streams = v[110];
    s.num_device_alloc = v[111];
    s.num_device_free = v[112];
    return s;
  }

  void resetAccumulatedStats(c10::DeviceIndex device) override {
    check(lib.reset_accumulated_stats(device), "reset_accumulated_memory_stats");
  }

  void resetPeakStats(c10::DeviceIndex device) override {
    check(lib.reset_peak_stats(device), "reset_peak_memory_stats");
  }

  // ---- private pools (graphs, MemPool, cudagraph trees) ----

  void beginAllocateToPool(c10::DeviceIndex device, MempoolId_t id,
                           StreamFilter filter) override {
    if (!filter) {
      check(lib.begin_pool(device, id.first, id.second, nullptr, nullptr, nullptr),
            "beginAllocateToPool");
      return;
    }
    auto* ctx = new StreamFilter(std::move(filter));  // owned by the library from here on
    check(lib.begin_pool(device, id.first, id.second, filter_trampoline, ctx, filter_drop),
          "beginAllocateToPool");
  }

  void endAllocateToPool(c10::DeviceIndex device, MempoolId_t id) override {
    check(lib.end_pool(device, id.first, id.second), "endAllocateToPool");
  }

  void releasePool(c10::DeviceIndex device, MempoolId_t id) override {
    warn_unless_ok(lib.release_pool(device, id.first, id.second), "releasePool");
  }

  int getPoolUseCount(c10::DeviceIndex device, MempoolId_t id) override {
    int uses = lib.pool_use_count(device, id.first, id.second);
    TORCH_CHECK(uses >= 0, "accelrt allocator: getPoolUseCount failed: ", last_error());
    return uses;
  }

  void createOrIncrefPool(c10::DeviceIndex device, MempoolId_t id,
                          std::shared_ptr<cca::CUDAAllocator> allocator) override {
    TORCH_CHECK(allocator == nullptr || allocator.get() == this,
                "accelrt allocator: a MemPool with an allocator of its own is not supported "
                "while accelrt is PyTorch's allocator; create the MemPool without one");
    check(lib.create_or_incref_pool(device, id.first, id.second), "createOrIncrefPool");
  }

  // ~MemPool calls this with false whatever the pool was created with: no throw then.
  void setUseOnOOM(c10::DeviceIndex /*device*/, MempoolId_t /*id*/, bool use_on_oom) override {
    TORCH_CHECK(!use_on_oom,
                "accelrt allocator: MemPool(use_on_oom=True) is not supported (accelrt does "
                "not fall back to a private pool when the device is full); create the "
                "MemPool without it");
  }

  void setNoSplit(c10::DeviceIndex /*device*/, MempoolId_t /*id*/) override {
    TORCH_CHECK(false,
                "accelrt allocator: MemPool(no_split=True) is not supported (accelrt's "
                "private pools split blocks); create the MemPool without it");
  }

  bool checkPoolLiveAllocations(c10::DeviceIndex device, MempoolId_t id,
                                const std::unordered_set<void*>& expected) override {
    size_t count = 0;
    for (const BlockRecord& b : pool_blocks(device, id)) {
      if (!expected.count(reinterpret_cast<void*>(b.ptr))) {
        return false;
      }
      ++count;
    }
    return count == expected.size();
  }

  std::shared_ptr<cca::AllocatorState> getCheckpointState(c10::DeviceIndex device,
                                                          MempoolId_t id) override {
    auto state = std::make_shared<CheckpointState>();
    state->device = device;
    state->pool = id;
    state->handle = lib.pool_checkpoint(device, id.first, id.second);
    TORCH_CHECK(state->handle != 0, "accelrt allocator: getCheckpointState of pool (", unum(id.first),
                ", ", unum(id.second), ") failed: ", last_error());
    std::vector<BlockRecord> out(64);
    for (;;) {
      ssize_t n = lib.checkpoint_blocks(state->handle, out.data(), out.size());
      TORCH_CHECK(n >= 0, "accelrt allocator: the checkpoint's blocks: ", last_error());
      if (static_cast<size_t>(n) <= out.size()) {
        out.resize(static_cast<size_t>(n));
        break;
      }
      out.resize(static_cast<size_t>(n));
    }
    state->blocks = std::move(out);
    return state;
  }

  // Put the pool back to the checkpoint (the library's restore_pool): every block allocated
  // now is freed, then every block of the checkpoint is allocated again at its address; the
  // segments are tiled as at the checkpoint. Every block allocated before the call is
  // reported freed and every checkpointed block allocated, as PyTorch's own allocator does.
  // A checkpoint that no longer fits is refused before anything changes.
  cca::CheckpointDelta setCheckpointPoolState(
      c10::DeviceIndex device, std::shared_ptr<cca::AllocatorState> pps) override {
    auto state = std::dynamic_pointer_cast<CheckpointState>(pps);
    TORCH_CHECK(state != nullptr,
                "accelrt allocator: setCheckpointPoolState got a state from another "
                "allocator; take it with getCheckpointState of the current allocator");
    TORCH_CHECK(state->device == device, "accelrt allocator: the checkpoint is of cuda:",
                num(state->device), ", not cuda:", num(device));
    cca::CheckpointDelta delta;
    for (const BlockRecord& b : pool_blocks(device, state->pool)) {
      delta.ptrs_freed.push_back(reinterpret_cast<void*>(b.ptr));
    }
    check(lib.pool_restore(device, state->handle), "setCheckpointPoolState");
    for (const BlockRecord& b : state->blocks) {
      void* p = reinterpret_cast<void*>(b.ptr);
      delta.dataptrs_allocd.emplace_back(p, p, &local_raw_delete,
                                         c10::Device(c10::DeviceType::CUDA, device));
    }
    return delta;
  }

  // ---- history, snapshots, annotations ----

  bool isHistoryEnabled() override { return contexts.history.load(); }

  void recordHistory(bool enabled, cda::CreateContextFn context_recorder,
                     size_t alloc_trace_max_entries, cda::RecordContext when,
                     bool clearHistory, const std::vector<std::string>& skip_actions) override {
    bool with_context = enabled && context_recorder != nullptr && when != cda::RecordContext::NEVER;
    {
      std::lock_guard<std::mutex> guard(contexts.mutex);
      contexts.recorder = with_context ? context_recorder : nullptr;
      contexts.when = when;
      contexts.max_entries = alloc_trace_max_entries;
      contexts.skip_actions = skip_actions;
      if (clearHistory) {
        contexts.by_id.clear();
      }
    }
    check(lib.record_history_ex(-1, enabled ? 1 : 0, std::max<size_t>(alloc_trace_max_entries, 1),
                                with_context ? 1 : 0, clearHistory ? 1 : 0),
          "recordHistory");
    contexts.on.store(with_context);
    contexts.history.store(enabled);
    if (!with_context) {
      lib.set_context_id(0);
    }
  }

  void recordAnnotation(const std::vector<std::pair<std::string, std::string>>& md) override {
    if (!contexts.history.load()) {
      return;
    }
    cda::AnnotationEntry entry(c10::cuda::current_device(), c10::getApproximateTime());
    for (const auto& [k, v] : md) {
      entry.recordUserMetadata(k, v);
    }
    entry.time_.t_ = static_cast<time_t>(now_us());
    std::lock_guard<std::mutex> guard(meta_mutex_);
    annotations_.push_back(std::move(entry));
    if (annotations_.size() > std::max<size_t>(contexts.max_entries, 1)) {
      annotations_.pop_front();
    }
  }

  void pushCompileContext(std::string& md) override {
    std::lock_guard<std::mutex> guard(meta_mutex_);
    compile_context_.push_back(md);
  }

  void popCompileContext() override {
    std::lock_guard<std::mutex> guard(meta_mutex_);
    if (!compile_context_.empty()) {
      compile_context_.pop_back();
    }
  }

  void setUserMetadata(const std::string& metadata) override {
    std::lock_guard<std::mutex> guard(meta_mutex_);
    user_metadata_ = metadata;
  }

  std::string getUserMetadata() override {
    std::lock_guard<std::mutex> guard(meta_mutex_);
    return user_metadata_;
  }

  cca::SnapshotInfo snapshot(MempoolId_t mempool_id, bool include_traces) override {
    cca::SnapshotInfo info;
    std::unordered_set<int> skip;
    {
      std::lock_guard<std::mutex> guard(contexts.mutex);
      for (const auto& name : contexts.skip_actions) {
        skip.insert(static_cast<int>(cda::parseTraceEntryAction(name)));
      }
    }
    OwnedSnapshot snap(-1, mempool_id, include_traces);
    for (size_t i = 0; i < snap.raw.segment_count; ++i) {
      const SegmentRecord& s = snap.raw.segments[i];
      cda::SegmentInfo seg;
      seg.device = static_cast<c10::DeviceIndex>(s.device);
      seg.address = static_cast<size_t>(s.address);
      seg.total_size = static_cast<size_t>(s.total_size);
      seg.requested_size = static_cast<size_t>(s.requested_size);
      seg.allocated_size = static_cast<size_t>(s.allocated_size);
      seg.active_size = static_cast<size_t>(s.active_size);
      seg.stream = reinterpret_cast<void*>(s.stream);
      seg.is_large = s.is_large != 0;
      seg.is_expandable = s.is_expandable != 0;
      seg.owner_private_pool_id = {s.pool_id0, s.pool_id1};
      for (uint32_t b = s.first_block; b < s.first_block + s.block_count; ++b) {
        const SnapshotBlock& r = snap.raw.blocks[b];
        cda::BlockInfo block;
        block.size = static_cast<size_t>(r.size);
        block.requested_size = static_cast<size_t>(r.requested_size);
        block.allocated = r.state == 1;
        block.active = r.state != 0;
        block.context_when_allocated = context_for(r.context);
        if (!seg.context_when_allocated && block.context_when_allocated) {
          seg.context_when_allocated = block.context_when_allocated;
        }
        seg.blocks.push_back(std::move(block));
      }
      info.segments.push_back(std::move(seg));
    }
    info.device_traces.resize(static_cast<size_t>(std::max(device_count(), 1)));
    for (size_t i = 0; i < snap.raw.trace_count; ++i) {
      const TraceRecord& t = snap.raw.traces[i];
      if (skip.count(t.action) || t.device < 0 ||
          static_cast<size_t>(t.device) >= info.device_traces.size()) {
        continue;
      }
      cda::TraceEntry entry(static_cast<cda::TraceEntry::Action>(t.action),
                            static_cast<c10::DeviceIndex>(t.device),
                            static_cast<size_t>(t.addr), static_cast<size_t>(t.size),
                            reinterpret_cast<void*>(t.stream), {0, 0}, 0,
                            context_for(t.context));
      // Snapshots carry microseconds since the epoch (PyTorch converts its clock ticks to
      // them in its own snapshot(); accelrt records them directly).
      entry.time_.t_ = static_cast<time_t>(t.time_us);
      info.device_traces[static_cast<size_t>(t.device)].push_back(std::move(entry));
    }
    {
      std::lock_guard<std::mutex> guard(meta_mutex_);
      info.external_annotations.assign(annotations_.begin(), annotations_.end());
    }
    info.config_metadata = config_info();
    return info;
  }

  // ---- observers, trackers ----

  void attachOutOfMemoryObserver(cca::OutOfMemoryObserver observer) override {
    std::lock_guard<std::mutex> guard(observers_mutex_);
    observers_.push_back(std::move(observer));
  }

  void attachAllocatorTraceTracker(cda::AllocatorTraceTracker tracker) override {
    bool first = false;
    {
      std::lock_guard<std::mutex> guard(trackers_mutex);
      first = trackers.empty();
      trackers.push_back(std::move(tracker));
    }
    if (first) {
      check(lib.add_segment_tracker(tracker_trampoline, nullptr), "attachAllocatorTraceTracker");
    }
  }

  // ---- IPC ----

  cca::ShareableHandle shareIpcHandle(void* ptr) override {
    int device = 0, expandable = 0;
    uint64_t base = 0, seg_size = 0, block = 0, block_size = 0;
    check(lib.segment_of(ptr, &device, &base, &seg_size, &expandable, &block, &block_size),
          "shareIpcHandle");
    uint64_t p = reinterpret_cast<uint64_t>(ptr);
    std::string handle(kIpcMagic, sizeof(kIpcMagic));
    if (!expandable) {
      handle.push_back(kIpcPlain);
      PlainHandle h{};
      h.device = device;
      h.segment_size = seg_size;
      c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
      C10_CUDA_CHECK(cudaIpcGetMemHandle(&h.handle, reinterpret_cast<void*>(base)));
      put(handle, h);
      return {static_cast<ptrdiff_t>(p - base), handle};
    }
    // Expandable memory: the library exports the chunks under the block and writes the whole
    // handle ("ACRT" 'V' ...).
    std::string bytes(256, '\0');
    for (;;) {
      ssize_t n = lib.ipc_share(reinterpret_cast<void*>(block), block_size,
                                reinterpret_cast<uint8_t*>(bytes.data()), bytes.size());
      TORCH_CHECK(n >= 0, "accelrt allocator: shareIpcHandle failed: ", last_error());
      if (static_cast<size_t>(n) <= bytes.size()) {
        bytes.resize(static_cast<size_t>(n));
        break;
      }
      bytes.resize(static_cast<size_t>(n));
    }
    any_exported.store(true);
    return {static_cast<ptrdiff_t>(p - block), bytes};
  }

  std::shared_ptr<void> getIpcDevPtr(std::string handle) override {
    std::lock_guard<std::mutex> guard(opened_mutex);
    auto it = opened.find(handle);
    if (it != opened.end()) {
      if (auto live = it->second.lock()) {
        return live;
      }
    }
    std::shared_ptr<void> mapping = open_handle(handle);
    opened[handle] = mapping;
    return mapping;
  }

  // ---- devices ----

  void enablePeerAccess(c10::DeviceIndex dev, c10::DeviceIndex dev_to_access) override {
    // Plain segments are cuMemAlloc memory, which peer access covers. Pages of expandable
    // segments are mapped for their own device only: copies between devices go through
    // memcpyAsync below, which uses the peer copy when peer access is not enabled.
    c10::cuda::CUDAGuard guard(dev);
    cudaError_t err = cudaDeviceEnablePeerAccess(dev_to_access, 0);
    if (err == cudaErrorPeerAccessAlreadyEnabled) {
      (void)cudaGetLastError();
      return;
    }
    C10_CUDA_CHECK(err);
  }

  cudaError_t memcpyAsync(void* dst, int dstDevice, const void* src, int srcDevice,
                          size_t count, cudaStream_t stream, bool p2p_enabled) override {
    if (p2p_enabled || dstDevice == srcDevice) {
      return cudaMemcpyAsync(dst, src, count, cudaMemcpyDeviceToDevice, stream);
    }
    return cudaMemcpyPeerAsync(dst, dstDevice, src, srcDevice, count, stream);
  }

 private:
  static uint64_t now_us() {
    return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(
                                     std::chrono::system_clock::now().time_since_epoch())
                                     .count());
  }

  int device_count() {
    if (device_count_ <= 0) {
      int n = 0;
      if (cudaGetDeviceCount(&n) == cudaSuccess) {
        device_count_ = n;
      } else {
        (void)cudaGetLastError();
      }
    }
    return device_count_;
  }

  cca::AllocatorConfigInfo config_info() {
    cca::AllocatorConfigInfo c{};
    char* conf = lib.config_string(0);
    std::string s = conf != nullptr ? conf : "";
    if (conf != nullptr) {
      lib.free_buffer(conf);
    }
    c.last_allocator_settings = "accelrt " + s;
    c.expandable_segments = s.find("expandable_segments:true") != std::string::npos;
    c.garbage_collection_threshold = 0;
    c.max_split_size = SIZE_MAX;
    return c;
  }

  std::shared_ptr<void> open_handle(const std::string& handle) {
    // PyTorch's own allocator sent it: a bare handle (older versions), or a version byte,
    // 'c' (a cudaMalloc segment) and the handle.
    if (handle.size() == CUDA_IPC_HANDLE_SIZE ||
        (handle.size() == 2 + CUDA_IPC_HANDLE_SIZE && handle[1] == 'c')) {
      cudaIpcMemHandle_t h;
      std::memcpy(&h, handle.data() + (handle.size() - CUDA_IPC_HANDLE_SIZE), sizeof(h));
      return open_plain(h, c10::cuda::current_device());
    }
    TORCH_CHECK(handle.size() > sizeof(kIpcMagic) &&
                    std::memcmp(handle.data(), kIpcMagic, sizeof(kIpcMagic)) == 0,
                "accelrt allocator: getIpcDevPtr got a handle of ", unum(handle.size()),
                " bytes that is neither accelrt's nor a CUDA IPC handle (sent by an "
                "allocator this process cannot open)");
    size_t at = sizeof(kIpcMagic);
    char kind = take<char>(handle, at);
    if (kind == kIpcPlain) {
      PlainHandle h = take<PlainHandle>(handle, at);
      return open_plain(h.handle, static_cast<c10::DeviceIndex>(h.device));
    }
    TORCH_CHECK(kind == kIpcPages, "accelrt allocator: unknown IPC handle kind ",
                num(static_cast<unsigned char>(kind)));
    // The device is the handle's (bytes 8..12, checked again by the library).
    TORCH_CHECK(handle.size() >= 12, "accelrt allocator: a truncated IPC handle (",
                unum(handle.size()), " bytes)");
    int32_t device = 0;
    std::memcpy(&device, handle.data() + 8, sizeof(device));
    void* mapped = nullptr;
    check(lib.ipc_open(device, reinterpret_cast<const uint8_t*>(handle.data()), handle.size(),
                       &mapped),
          "getIpcDevPtr");
    return std::shared_ptr<void>(mapped, [](void* q) {
      warn_unless_ok(lib.ipc_close(q), "closing shared expandable memory");
    });
  }

  static std::shared_ptr<void> open_plain(const cudaIpcMemHandle_t& h, c10::DeviceIndex device) {
    c10::cuda::CUDAGuard guard(device);
    void* p = nullptr;
    C10_CUDA_CHECK(cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess));
    return std::shared_ptr<void>(p, [device](void* q) {
      c10::cuda::CUDAGuard g(device);
      cudaError_t err = cudaIpcCloseMemHandle(q);
      if (err != cudaSuccess) {
        (void)cudaGetLastError();
        TORCH_WARN("accelrt allocator: cudaIpcCloseMemHandle failed: ", cudaGetErrorString(err));
      }
    });
  }

  std::atomic<bool> initialized_{false};
  int device_count_ = 0;
  std::mutex observers_mutex_;
  std::vector<cca::OutOfMemoryObserver> observers_;
  std::mutex meta_mutex_;
  std::deque<cda::AnnotationEntry> annotations_;
  std::vector<std::string> compile_context_;
  std::string user_metadata_;
};

std::shared_ptr<AccelrtAllocator> installed;

void local_raw_delete(void* ptr) { installed->raw_delete(ptr); }

template <typename T>
void resolve(void* handle, const char* name, T& slot) {
  void* sym = dlsym(handle, name);
  if (sym == nullptr) {
    throw std::runtime_error(std::string("the library has no ") + name +
                             ": it is older than this shim; rebuild and reinstall it "
                             "(pip install ./python, or cargo build --release -p accelrt-torch)");
  }
  slot = reinterpret_cast<T>(sym);
}

}  // namespace

// The interface this shim implements (PyTorch's CUDAAllocator of 2.11).
extern "C" const char* accelrt_shim_build() noexcept {
  return "full CUDAAllocator (PyTorch 2.11 interface), built " __DATE__ " " __TIME__;
}

// Load the library at `library_path` (already loaded by the caller), make it PyTorch's CUDA
// allocator, before CUDA is initialised. 0, or -1 with the reason in err.
extern "C" int accelrt_shim_install(const char* library_path, char* err,
                                    size_t err_len) noexcept {
  try {
    if (installed != nullptr) {
      return 0;
    }
    void* handle = dlopen(library_path, RTLD_NOW | RTLD_NOLOAD);
    if (handle == nullptr) {
      handle = dlopen(library_path, RTLD_NOW);
    }
    if (handle == nullptr) {
      const char* why = dlerror();
      throw std::runtime_error(std::string("cannot load ") + library_path + ": " +
                               (why != nullptr ? why : "unknown dlopen error"));
    }
    resolve(handle, "accelrt_torch_alloc", lib.alloc);
    resolve(handle, "accelrt_torch_free", lib.free);
    resolve(handle, "accelrt_torch_init", lib.init);
    resolve(handle, "accelrt_torch_empty_cache", lib.empty_cache);
    resolve(handle, "accelrt_torch_set_memory_fraction", lib.set_memory_fraction);
    resolve(handle, "accelrt_torch_get_memory_fraction", lib.get_memory_fraction);
    resolve(handle, "accelrt_torch_record_stream", lib.record_stream);
    resolve(handle, "accelrt_torch_begin_allocate_to_pool", lib.begin_pool);
    resolve(handle, "accelrt_torch_end_allocate_to_pool", lib.end_pool);
    resolve(handle, "accelrt_torch_release_pool", lib.release_pool);
    resolve(handle, "accelrt_torch_create_or_incref_pool", lib.create_or_incref_pool);
    resolve(handle, "accelrt_torch_pool_use_count", lib.pool_use_count);
    resolve(handle, "accelrt_torch_stats_array", lib.stats_array);
    resolve(handle, "accelrt_torch_reset_peak_stats", lib.reset_peak_stats);
    resolve(handle, "accelrt_torch_reset_accumulated_stats", lib.reset_accumulated_stats);
    resolve(handle, "accelrt_torch_cache_info", lib.cache_info);
    resolve(handle, "accelrt_torch_last_error", lib.last_error);
    resolve(handle, "accelrt_torch_last_oom", lib.last_oom);
    resolve(handle, "accelrt_torch_set_log_alloc_failures", lib.set_log_alloc_failures);
    resolve(handle, "accelrt_torch_pool_live_blocks", lib.pool_live_blocks);
    resolve(handle, "accelrt_torch_pool_claim_block", lib.pool_claim_block);
    resolve(handle, "accelrt_torch_pool_checkpoint", lib.pool_checkpoint);
    resolve(handle, "accelrt_torch_checkpoint_blocks", lib.checkpoint_blocks);
    resolve(handle, "accelrt_torch_pool_restore", lib.pool_restore);
    resolve(handle, "accelrt_torch_checkpoint_free", lib.checkpoint_free);
    resolve(handle, "accelrt_torch_empty_pool_cache", lib.empty_pool_cache);
    resolve(handle, "accelrt_torch_segment_of", lib.segment_of);
    resolve(handle, "accelrt_torch_set_context_id", lib.set_context_id);
    resolve(handle, "accelrt_torch_record_history_ex", lib.record_history_ex);
    resolve(handle, "accelrt_torch_snapshot_raw", lib.snapshot_raw);
    resolve(handle, "accelrt_torch_snapshot_free", lib.snapshot_free);
    resolve(handle, "accelrt_torch_add_segment_tracker", lib.add_segment_tracker);
    resolve(handle, "accelrt_torch_config_string", lib.config_string);
    resolve(handle, "accelrt_torch_free_buffer", lib.free_buffer);
    resolve(handle, "accelrt_torch_ipc_share", lib.ipc_share);
    resolve(handle, "accelrt_torch_ipc_forget", lib.ipc_forget);
    resolve(handle, "accelrt_torch_ipc_open", lib.ipc_open);
    resolve(handle, "accelrt_torch_ipc_close", lib.ipc_close);
    resolve(handle, "accelrt_torch_set_rounding", lib.set_rounding);

    auto allocator = std::make_shared<AccelrtAllocator>();
    installed = allocator;
    // PyTorch's door for replacing its allocator: c10::cuda::CUDACachingAllocator::allocator
    // and c10::GetAllocator(kCUDA) now point at accelrt (refused once CUDA is initialised).
    torch::cuda::CUDAPluggableAllocator::changeCurrentAllocator(allocator);
    if (cca::get() != allocator.get()) {
      throw std::runtime_error(
          "changeCurrentAllocator did not install accelrt as c10::cuda::CUDACachingAllocator "
          "(another extension replaced the allocator?)");
    }
    // The device-generic door too (torch.accelerator.memory_stats, empty_cache, ... and code
    // that allocates through c10::GetAllocator(kCUDA)), ahead of any registration.
    c10::SetAllocator(c10::DeviceType::CUDA, allocator.get(), UINT8_MAX);
    if (c10::GetAllocator(c10::DeviceType::CUDA) != allocator.get()) {
      throw std::runtime_error(
          "c10::SetAllocator(kCUDA) did not install accelrt as the device allocator");
    }
    follow_torch_settings();
    // Failures now reach Python as exceptions with the library's message.
    lib.set_log_alloc_failures(0);
    return 0;
  } catch (const std::exception& e) {
    installed = nullptr;
    if (err != nullptr && err_len > 0) {
      std::snprintf(err, err_len, "%s", e.what());
    }
    return -1;
  }
}
