// Attention for a step's decode rows, straight from the KV slabs through each sequence's block
// table: one thread block per (sequence, KV head) serves the `group` query heads that share it,
// its warps take every WARPS-th cache position and keep an online softmax each, and the warps
// are merged at the end. Replaces gathering each sequence's cache into a padded copy plus two
// batched matmuls and four softmax kernels. Built to PTX by build.rs under the `cuda` feature;
// `decode_attention.rs` holds the same arithmetic for candle's CPU device.
#include <cuda_fp16.h>
#include <stdint.h>

#define WARPS 8
#define MAX_GROUP 8
#define BLOCK_LEN 32

template <int HD>
__device__ void decode_attention(
    const float *__restrict__ q,         // row s: query heads of sequence s, head h at h * HD
    const __half *__restrict__ slab_k,   // rows of HD
    const __half *__restrict__ slab_v,
    const uint32_t *__restrict__ table,  // row s: [cache length, block ids...]
    float *__restrict__ out,             // row s: n_kv * group * HD, contiguous
    const uint32_t n_kv, const uint32_t group, const uint32_t q_stride,
    const uint32_t table_stride, const float scale) {
  constexpr int PER = (HD + 31) / 32;  // values of a row per lane: d = i * 32 + lane, so a
                                       // warp reads (and stores) 32 neighbours at a time
  const uint32_t seq = blockIdx.x, kh = blockIdx.y;
  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t *row = table + (size_t)seq * table_stride;
  const uint32_t len = row[0];
  const uint32_t *blocks = row + 1;

  float qr[MAX_GROUP][PER], acc[MAX_GROUP][PER], m[MAX_GROUP], l[MAX_GROUP];
#pragma unroll
  for (int g = 0; g < MAX_GROUP; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      const int d = i * 32 + lane;
      acc[g][i] = 0.f;
      qr[g][i] = (g < group && d < HD)
                     ? q[(size_t)seq * q_stride + (kh * group + g) * HD + d] * scale
                     : 0.f;
    }
  }

  for (uint32_t p = warp; p < len; p += WARPS) {
    const size_t r = ((size_t)blocks[p / BLOCK_LEN] * n_kv + kh) * BLOCK_LEN + p % BLOCK_LEN;
    float kf[PER], vf[PER];
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      const int d = i * 32 + lane;
      kf[i] = d < HD ? __half2float(slab_k[r * HD + d]) : 0.f;
      vf[i] = d < HD ? __half2float(slab_v[r * HD + d]) : 0.f;
    }
#pragma unroll
    for (int g = 0; g < MAX_GROUP; ++g) {
      if (g < group) {  // the same for every lane: the shuffles below see the whole warp
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < PER; ++i) s += qr[g][i] * kf[i];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        const float mn = fmaxf(m[g], s);
        const float c = __expf(m[g] - mn);  // 0 on the first position (m = -inf)
        const float e = __expf(s - mn);
        l[g] = l[g] * c + e;
#pragma unroll
        for (int i = 0; i < PER; ++i) acc[g][i] = acc[g][i] * c + e * vf[i];
        m[g] = mn;
      }
    }
  }

  // Merge the warps: each one's sums rescaled to the largest maximum.
  __shared__ float sm[WARPS][MAX_GROUP], sl[WARPS][MAX_GROUP];
  __shared__ float sacc[WARPS][MAX_GROUP][PER * 32];
#pragma unroll
  for (int g = 0; g < MAX_GROUP; ++g) {
    if (lane == 0) {
      sm[warp][g] = m[g];
      sl[warp][g] = l[g];
    }
#pragma unroll
    for (int i = 0; i < PER; ++i) sacc[warp][g][i * 32 + lane] = acc[g][i];
  }
  __syncthreads();
  for (uint32_t idx = threadIdx.x; idx < group * HD; idx += blockDim.x) {
    const uint32_t g = idx / HD, d = idx % HD;
    float mx = -INFINITY;
    for (int w = 0; w < WARPS; ++w) mx = fmaxf(mx, sm[w][g]);
    float sum = 0.f, val = 0.f;
    for (int w = 0; w < WARPS; ++w) {
      if (sm[w][g] == -INFINITY) continue;  // a warp that saw no position
      const float f = __expf(sm[w][g] - mx);
      sum += sl[w][g] * f;
      val += sacc[w][g][d] * f;
    }
    out[((size_t)seq * n_kv + kh) * group * HD + g * HD + d] = sum > 0.f ? val / sum : 0.f;
  }
}

#define DECODE_ATTENTION(HD)                                                                  \
  extern "C" __global__ void decode_attention_##HD(                                           \
      const float *q, const __half *slab_k, const __half *slab_v, const uint32_t *table,      \
      float *out, const uint32_t n_kv, const uint32_t group, const uint32_t q_stride,         \
      const uint32_t table_stride, const float scale) {                                       \
    decode_attention<HD>(q, slab_k, slab_v, table, out, n_kv, group, q_stride, table_stride, \
                         scale);                                                              \
  }

DECODE_ATTENTION(16)
DECODE_ATTENTION(32)
DECODE_ATTENTION(64)
DECODE_ATTENTION(80)
DECODE_ATTENTION(96)
DECODE_ATTENTION(128)
