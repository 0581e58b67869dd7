// accelrt_torch_shim.cpp: installs libaccelrt_torch.so as PyTorch's CUDA allocator with every
// hook PyTorch's pluggable allocator accepts.
//
// PyTorch's Python API (torch.cuda.memory.CUDAPluggableAllocator) only takes an alloc and a
// free function; the other hooks (init, empty cache, memory fraction, record_stream, and the
// private-pool trio that graph capture and MemPool use) are C++ setters taking C++ types
// (std::function, MempoolId_t). accelrt_torch.py compiles this file at run time with
// torch.utils.cpp_extension against the installed PyTorch and calls accelrt_shim_install.
//
// It also turns a failed allocation into PyTorch's exception (torch.OutOfMemoryError with
// accelrt's report; PyTorch's pluggable allocator does not check for NULL itself), and, built
// with ACCELRT_FULL, subclasses CUDAPluggableAllocator so that torch.cuda.memory_stats(),
// reset_peak_memory_stats(), OOM observers, cuDNN's cacheInfo and MemPool's pool
// bookkeeping answer from accelrt instead of raising "does not yet support". Optional
// overrides are switched on by accelrt_torch.py after it reads the installed headers
// (ACCELRT_HAS_* macros), so the file builds against the PyTorch versions it knows.
//
// The library is reached through dlsym (no link-time dependency); every call into it is
// C ABI and never unwinds. Every C++ exception this file throws goes to PyTorch, which
// expects them from its allocator; none crosses into the library.

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/util/Exception.h>
#include <torch/csrc/cuda/CUDAPluggableAllocator.h>

#include <dlfcn.h>
#include <sys/types.h>

#include <cstdint>
#include <cstdio>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace {

namespace pluggable = torch::cuda::CUDAPluggableAllocator;
namespace cca = c10::cuda::CUDACachingAllocator;
using c10::cuda::MempoolId_t;
using StreamFilter = std::function<bool(cudaStream_t)>;

constexpr size_t kStatsLen = 113;  // ACCELRT_TORCH_STATS_LEN

// The library's functions (see crates/accelrt-torch/include/accelrt_torch.h).
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
};

Library lib;
std::mutex observers_mutex;
std::vector<cca::OutOfMemoryObserver> observers;

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

[[noreturn]] void raise_alloc_failure(size_t size, int device) {
  std::string message = last_error();
  int64_t oom[4] = {0, 0, 0, 0};  // requested, device total, device free, allocated
  if (lib.last_oom(oom) == 1) {
    std::vector<cca::OutOfMemoryObserver> to_call;
    {
      std::lock_guard<std::mutex> guard(observers_mutex);
      to_call = observers;
    }
    for (auto& observer : to_call) {
      observer(device, oom[3], oom[1], oom[2]);
    }
    TORCH_CHECK_WITH(OutOfMemoryError, false,
                     "CUDA out of memory (accelrt allocator). ", message);
  }
  TORCH_CHECK(false, "accelrt allocator: cannot allocate ", size, " bytes on cuda:", device,
              ": ", message);
}

void* alloc_or_raise(size_t size, int device, cudaStream_t stream) {
  void* p = lib.alloc(static_cast<ssize_t>(size), device, stream);
  if (p == nullptr && size != 0) {
    raise_alloc_failure(size, device);
  }
  return p;
}

void free_block(void* ptr, size_t size, int device, cudaStream_t stream) {
  lib.free(ptr, static_cast<ssize_t>(size), device, stream);
}

// The library calls this for each stream while a route to a private pool is in force.
int filter_trampoline(void* ctx, void* stream) noexcept {
  try {
    return (*static_cast<StreamFilter*>(ctx))(static_cast<cudaStream_t>(stream)) ? 1 : 0;
  } catch (...) {
    return 0;  // PyTorch's capture filter throws only when the stream query fails
  }
}

void filter_drop(void* ctx) noexcept { delete static_cast<StreamFilter*>(ctx); }

void begin_allocate_to_pool(int device, MempoolId_t id, StreamFilter filter) {
  if (!filter) {
    check(lib.begin_pool(device, id.first, id.second, nullptr, nullptr, nullptr),
          "beginAllocateToPool");
    return;
  }
  auto* ctx = new StreamFilter(std::move(filter));  // owned by the library from here on
  check(lib.begin_pool(device, id.first, id.second, filter_trampoline, ctx, filter_drop),
        "beginAllocateToPool");
}

#ifdef ACCELRT_FULL
using DeviceStats = decltype(std::declval<cca::CUDAAllocator&>().getDeviceStats(
    c10::DeviceIndex{0}));

// CUDAPluggableAllocator with accelrt's statistics, cache info, OOM observers and pool
// bookkeeping instead of "does not yet support".
class AccelrtAllocator final : public pluggable::CUDAPluggableAllocator {
 public:
  AccelrtAllocator() : pluggable::CUDAPluggableAllocator(alloc_or_raise, free_block) {}

  DeviceStats getDeviceStats(c10::DeviceIndex device) override {
    int64_t v[kStatsLen];
    TORCH_CHECK(lib.stats_array(device, v, kStatsLen) == static_cast<int>(kStatsLen),
                "accelrt allocator: memory_stats failed: ", last_error());
    DeviceStats s;
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
#ifdef ACCELRT_HAS_NUM_SYNC_ALL_STREAMS
    s.num_sync_all_streams = v[110];
#endif
#ifdef ACCELRT_HAS_NUM_DEVICE_ALLOC
    s.num_device_alloc = v[111];
    s.num_device_free = v[112];
#endif
    return s;
  }

  void resetPeakStats(c10::DeviceIndex device) override {
    check(lib.reset_peak_stats(device), "reset_peak_memory_stats");
  }

  void resetAccumulatedStats(c10::DeviceIndex device) override {
    check(lib.reset_accumulated_stats(device), "reset_accumulated_memory_stats");
  }

  void cacheInfo(c10::DeviceIndex device, size_t* largest) override {
    check(lib.cache_info(device, largest), "cacheInfo");
  }

  void attachOutOfMemoryObserver(cca::OutOfMemoryObserver observer) override {
    std::lock_guard<std::mutex> guard(observers_mutex);
    observers.push_back(std::move(observer));
  }

#ifdef ACCELRT_HAS_GET_MEMORY_FRACTION
  double getMemoryFraction(c10::DeviceIndex device) override {
    double f = lib.get_memory_fraction(device);
    TORCH_CHECK(f >= 0, "accelrt allocator: get_per_process_memory_fraction failed: ",
                last_error());
    return f;
  }
#endif

#ifdef ACCELRT_HAS_CREATE_OR_INCREF_POOL
  // torch.cuda.MemPool's constructor (PyTorch 2.8 and later).
  void createOrIncrefPool(c10::DeviceIndex device, MempoolId_t id,
                          std::shared_ptr<cca::CUDAAllocator> allocator) override {
    TORCH_CHECK(allocator == nullptr || allocator.get() == this,
                "accelrt allocator: a MemPool with an allocator of its own is not supported "
                "while accelrt is PyTorch's allocator; create the MemPool without one");
    check(lib.create_or_incref_pool(device, id.first, id.second), "createOrIncrefPool");
  }
#endif

#ifdef ACCELRT_HAS_SET_USE_ON_OOM
  // ~MemPool calls this with false whatever the pool was created with: it must not throw
  // then (a destructor that throws ends the process).
  void setUseOnOOM(c10::DeviceIndex /*device*/, MempoolId_t /*id*/, bool use_on_oom) override {
    TORCH_CHECK(!use_on_oom,
                "accelrt allocator: MemPool(use_on_oom=True) is not supported (accelrt does "
                "not fall back to a private pool when the device is full); create the "
                "MemPool without it");
  }
#endif

#ifdef ACCELRT_HAS_SET_NO_SPLIT
  void setNoSplit(c10::DeviceIndex /*device*/, MempoolId_t /*id*/) override {
    TORCH_CHECK(false,
                "accelrt allocator: MemPool(no_split=True) is not supported; create the "
                "MemPool without it");
  }
#endif

#ifdef ACCELRT_HAS_GET_POOL_USE_COUNT
  int getPoolUseCount(c10::DeviceIndex device, MempoolId_t id) override {
    int uses = lib.pool_use_count(device, id.first, id.second);
    TORCH_CHECK(uses >= 0, "accelrt allocator: getPoolUseCount failed: ", last_error());
    return uses;
  }
#endif
};
#endif  // ACCELRT_FULL

template <typename T>
void resolve(void* handle, const char* name, T& slot) {
  void* sym = dlsym(handle, name);
  if (sym == nullptr) {
    throw std::runtime_error(std::string("the library has no ") + name +
                             ": it is older than this shim; rebuild it with `cargo build "
                             "--release -p accelrt-torch`");
  }
  slot = reinterpret_cast<T>(sym);
}

}  // namespace

// 1 when built with the overrides (torch.cuda.memory_stats() etc. answer from accelrt).
extern "C" int accelrt_shim_is_full() noexcept {
#ifdef ACCELRT_FULL
  return 1;
#else
  return 0;
#endif
}

// Load the library at `library_path` (already loaded by the caller), make it PyTorch's CUDA
// allocator with every hook, before CUDA is initialised. 0, or -1 with the reason in err.
extern "C" int accelrt_shim_install(const char* library_path, char* err,
                                    size_t err_len) noexcept {
  try {
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

#ifdef ACCELRT_FULL
    auto allocator = std::make_shared<AccelrtAllocator>();
#else
    auto created = pluggable::createCustomAllocator(alloc_or_raise, free_block);
    auto allocator = std::static_pointer_cast<pluggable::CUDAPluggableAllocator>(created);
#endif
    allocator->set_init_fn([](int device_count) { check(lib.init(device_count), "init"); });
    allocator->set_reset_fn([]() { warn_unless_ok(lib.empty_cache(), "empty_cache"); });
    allocator->set_memory_fraction_fn([](double fraction, int device) {
      check(lib.set_memory_fraction(fraction, device), "set_per_process_memory_fraction");
    });
    allocator->set_record_stream_fn([](void* ptr, cudaStream_t stream) {
      check(lib.record_stream(ptr, stream), "record_stream");
    });
    allocator->set_begin_allocate_to_pool(begin_allocate_to_pool);
    allocator->set_end_allocate_to_pool_fn([](int device, MempoolId_t id) {
      check(lib.end_pool(device, id.first, id.second), "endAllocateToPool");
    });
    allocator->set_release_pool([](int device, MempoolId_t id) {
      warn_unless_ok(lib.release_pool(device, id.first, id.second), "releasePool");
    });
    pluggable::changeCurrentAllocator(allocator);
    // Failures now reach Python as exceptions with the library's message.
    lib.set_log_alloc_failures(0);
    return 0;
  } catch (const std::exception& e) {
    if (err != nullptr && err_len > 0) {
      std::snprintf(err, err_len, "%s", e.what());
    }
    return -1;
  }
}
