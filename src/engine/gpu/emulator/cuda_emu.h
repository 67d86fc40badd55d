// A CUDA emulator for our kernels on the CPU, so that the .cu sources themselves run in the tests
// on machines without a GPU. Every thread of a block is an OS thread; blocks run one after
// another, so a kernel's `__shared__` arrays become function statics (one copy, as one block
// sees). `__syncthreads` waits on a barrier of the whole block, `__shfl_xor_sync` on one of its
// warp. What it catches: index arithmetic, reads and writes outside the buffers (the harness is
// built with AddressSanitizer and the buffers are allocated to their exact sizes), a shuffle
// that reads a lane which has already returned, and barriers not reached by every thread (the
// run hangs; the Rust side kills it). What it cannot: timing, occupancy, launch limits.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __shared__ static
#define __restrict__ __restrict

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
};

namespace emu {
constexpr unsigned int WARP = 32;

struct Block {
  std::barrier<> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<uint32_t> exchange;  // a value per thread, for the shuffles
  std::vector<char> returned;      // per thread: left the kernel
  explicit Block(unsigned int threads)
      : all(threads), exchange(threads), returned(threads, 0) {
    for (unsigned int w = 0; w * WARP < threads; ++w) {
      const unsigned int n = std::min(WARP, threads - w * WARP);
      warps.push_back(std::make_unique<std::barrier<>>(n));
    }
  }
};

inline thread_local Block *block = nullptr;
}  // namespace emu

inline dim3 gridDim, blockDim;
inline thread_local dim3 blockIdx, threadIdx;

inline unsigned int emu_thread() {
  return (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
}

inline void __syncthreads() { emu::block->all.arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned int mask, float v, int lane_mask) {
  const unsigned int t = emu_thread(), lane = t % emu::WARP, base = t - lane;
  if (mask != 0xffffffffu) {
    std::fprintf(stderr, "emulator: shuffle masks other than the full warp are not emulated\n");
    std::abort();
  }
  const unsigned int from = base + (lane ^ static_cast<unsigned int>(lane_mask));
  auto &warp = *emu::block->warps[t / emu::WARP];
  std::memcpy(&emu::block->exchange[t], &v, sizeof v);
  warp.arrive_and_wait();
  if (from >= emu::block->exchange.size() || emu::block->returned[from]) {
    std::fprintf(stderr, "emulator: thread %u shuffles with lane %u, which has returned\n", t,
                 from);
    std::abort();
  }
  float r;
  std::memcpy(&r, &emu::block->exchange[from], sizeof r);
  warp.arrive_and_wait();
  return r;
}

inline float __expf(float x) { return std::exp(x); }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }

namespace emu {
// Runs `kernel` over the grid: a block at a time, each of its threads an OS thread.
template <class F>
void launch(dim3 grid, dim3 threads, F kernel) {
  gridDim = grid;
  blockDim = threads;
  const unsigned int n = threads.x * threads.y * threads.z;
  for (unsigned int bz = 0; bz < grid.z; ++bz)
    for (unsigned int by = 0; by < grid.y; ++by)
      for (unsigned int bx = 0; bx < grid.x; ++bx) {
        Block b(n);
        std::vector<std::thread> pool;
        pool.reserve(n);
        for (unsigned int t = 0; t < n; ++t) {
          pool.emplace_back([&, t] {
            block = &b;
            blockIdx = dim3{bx, by, bz};
            threadIdx = dim3{t % threads.x, t / threads.x % threads.y, t / (threads.x * threads.y)};
            kernel();
            // A returned thread no longer holds up the others' barriers.
            b.returned[t] = 1;
            b.warps[t / WARP]->arrive_and_drop();
            b.all.arrive_and_drop();
          });
        }
        for (auto &th : pool) th.join();
      }
}
}  // namespace emu
