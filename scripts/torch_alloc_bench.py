"""Time PyTorch's CUDA caching allocator the way `accelrt bench` times accelrt's.

Runs on the GPU machine (python3 with torch). Calls the C++ allocator directly through a
small inline extension, so Python is not in the timed loop:
  - cached raw_alloc + raw_delete pairs per size (median of batches, ns per pair);
  - RMM-style random workload: N live allocations, sizes uniform in [1, max], free a random
    live one and allocate another (ns per call, and peak reserved / peak allocated).
Prints one JSON object per line, prefixed with `torch `.

  python3 scripts/torch_alloc_bench.py [--ops N]
--ops: operations per random workload (default 200000, as `accelrt bench`; 20000 matches
`accelrt bench --quick`, whose short runs are mostly growth).
"""
import json
import os
import sys

import torch
from torch.utils.cpp_extension import load_inline

SOURCE = r"""
#include <torch/extension.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <algorithm>
#include <chrono>
#include <random>
#include <vector>

using Clock = std::chrono::steady_clock;

double median_pair_ns(int64_t size, int64_t batch, int64_t batches) {
  auto* a = c10::cuda::CUDACachingAllocator::get();
  a->raw_delete(a->raw_alloc(size));  // warm the cache
  std::vector<double> per_pair;
  for (int64_t b = 0; b < batches; ++b) {
    auto t0 = Clock::now();
    for (int64_t i = 0; i < batch; ++i) a->raw_delete(a->raw_alloc(size));
    auto t1 = Clock::now();
    per_pair.push_back(std::chrono::duration<double, std::nano>(t1 - t0).count() / batch);
  }
  std::sort(per_pair.begin(), per_pair.end());
  return per_pair[per_pair.size() / 2];
}

double random_ns(int64_t ops, int64_t live, int64_t max_size, int64_t seed) {
  auto* a = c10::cuda::CUDACachingAllocator::get();
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int64_t> size(1, max_size);
  std::vector<void*> held;
  for (int64_t i = 0; i < live; ++i) held.push_back(a->raw_alloc(size(rng)));
  auto t0 = Clock::now();
  for (int64_t i = 0; i < ops; ++i) {
    size_t k = rng() % held.size();
    a->raw_delete(held[k]);
    held[k] = a->raw_alloc(size(rng));
  }
  auto t1 = Clock::now();
  for (void* p : held) a->raw_delete(p);
  return std::chrono::duration<double, std::nano>(t1 - t0).count() / (2.0 * ops);
}
"""


def main():
    ops = 200000
    args = sys.argv[1:]
    if args:
        if len(args) != 2 or args[0] != "--ops" or not args[1].isdigit() or int(args[1]) < 1:
            print(f"usage: torch_alloc_bench.py [--ops N] (N a positive integer), got {' '.join(args)!r}",
                  file=sys.stderr)
            return 2
        ops = int(args[1])
    ext = load_inline("accelrt_torch_bench", cpp_sources=SOURCE, functions=["median_pair_ns", "random_ns"],
                      extra_cflags=["-O2"], with_cuda=True, verbose=False)
    torch.empty(1, device="cuda")
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "native")
    sizes = [512, 4096, 1 << 20, 2 << 20, 20 << 20, 64 << 20, 1 << 30]
    pairs = {str(s): round(ext.median_pair_ns(s, 2000 if s < (1 << 30) else 200, 25), 1) for s in sizes}
    print("torch " + json.dumps({"conf": conf, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                  "fast_path_pair_ns": pairs}), flush=True)
    for live, max_size in [(1000, 1 << 20), (1000, 64 << 20), (200, 256 << 20)]:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        ns = ext.random_ns(ops, live, max_size, 42)
        reserved, allocated = torch.cuda.max_memory_reserved(), torch.cuda.max_memory_allocated()
        print("torch " + json.dumps({"conf": conf, "random": {"live": live, "max_size": max_size, "ops": ops, "ns_per_call": round(ns, 1),
                                                              "peak_reserved": reserved, "peak_allocated": allocated,
                                                              "ratio": round(reserved / max(1, allocated), 3)}}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
