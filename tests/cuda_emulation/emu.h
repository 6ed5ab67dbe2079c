// The CUDA execution model on the CPU, for tests/test_cuda_emulation.py: the project's CUDA
// kernels compiled as host C++ (their <<<...>>> launches rewritten to emu::launch) and run block
// after block, each CUDA thread of a block an OS thread: __syncthreads is a barrier of the block's threads,
// __shfl_xor_sync an exchange through a per-warp buffer between two barriers of the warp.
// __shared__ variables are function statics, shared by the block's threads (blocks run one at a
// time). What it checks: indexing, coverage of every element, barrier placement, reductions and
// the launch configuration (block sizes, warps); not timing, memory ordering or the hardware's
// rounding of intrinsics.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <thread>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__

namespace emu {

struct Index3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local Index3 thread_index, block_index;
inline Index3 block_dim, grid_dim;
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline std::vector<double> exchange;  // one slot per thread, wide enough for float and double
inline long long launches = 0;

template <typename T>
T shfl_xor(unsigned mask, T value, int offset) {
  if (mask != 0xffffffffu) {
    std::fprintf(stderr, "emu: partial shuffle masks are not emulated\n");
    std::abort();
  }
  const unsigned t = thread_index.x, warp = t / 32, lane = t % 32;
  exchange[t] = static_cast<double>(value);
  warp_barriers[warp]->arrive_and_wait();
  const T other = static_cast<T>(exchange[warp * 32 + (lane ^ static_cast<unsigned>(offset))]);
  warp_barriers[warp]->arrive_and_wait();  // nobody overwrites a slot before its reader has it
  return other;
}

inline void syncthreads() { block_barrier->arrive_and_wait(); }

template <typename Kernel, typename... Args>
cudaError_t launch(dim3 grid, dim3 block, size_t, cudaStream_t, Kernel kernel, Args... args) {
  ++launches;
  if (block.x == 0 || block.x > 1024 || block.x % 32 || block.y != 1 || block.z != 1 || grid.x == 0 ||
      grid.y != 1 || grid.z != 1) {
    std::fprintf(stderr, "emu: launch of grid %u x %u x %u, block %u x %u x %u not emulated or invalid\n",
                 grid.x, grid.y, grid.z, block.x, block.y, block.z);
    std::abort();
  }
  block_dim = {block.x, 1, 1};
  grid_dim = {grid.x, 1, 1};
  std::barrier<> barrier(block.x);
  block_barrier = &barrier;
  warp_barriers.clear();
  for (unsigned w = 0; w < block.x / 32; ++w) warp_barriers.emplace_back(std::make_unique<std::barrier<>>(32));
  exchange.assign(block.x, 0.0);
  // one OS thread per CUDA thread of a block, walking the blocks one after another: every thread
  // ends a block before any starts the next (the block's shared statics are then free)
  std::vector<std::thread> threads;
  threads.reserve(block.x);
  for (unsigned t = 0; t < block.x; ++t) {
    threads.emplace_back([&, t] {
      thread_index = {t, 0, 0};
      for (unsigned b = 0; b < grid.x; ++b) {
        block_index = {b, 0, 0};
        kernel(args...);
        barrier.arrive_and_wait();
      }
    });
  }
  for (auto& thread : threads) thread.join();
  return cudaSuccess;
}

}  // namespace emu

#define threadIdx emu::thread_index
#define blockIdx emu::block_index
#define blockDim emu::block_dim
#define gridDim emu::grid_dim
#define __syncthreads() emu::syncthreads()
#define __shfl_xor_sync(mask, value, offset) emu::shfl_xor(mask, value, offset)
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
