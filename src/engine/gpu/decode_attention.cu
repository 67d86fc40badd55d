// Attention for a step's decode rows, straight from the KV slabs through each sequence's block
// table: one thread block per (sequence, KV head, split) serves the `group` query heads that
// share the KV head, its warps take every WARPS-th cache position of the split's `chunk` and
// keep an online softmax each, and the warps are merged at the end. With one split the block
// writes the result; with several (a few long sequences, which would leave most of a big GPU
// idle) each writes its unnormalised partial sums, and `decode_attention_merge` combines them. Replaces gathering each sequence's cache into a padded copy plus two
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
    float *__restrict__ part,            // with splits: per (s, KV head, split, g) m, l, acc[HD]
    const uint32_t n_kv, const uint32_t group, const uint32_t q_stride,
    const uint32_t table_stride, const uint32_t chunk, const float scale) {
  constexpr int PER = (HD + 31) / 32;  // values of a row per lane: d = i * 32 + lane, so a
                                       // warp reads (and stores) 32 neighbours at a time
  const uint32_t seq = blockIdx.x, kh = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t *row = table + (size_t)seq * table_stride;
  const uint32_t len = row[0];
  // This split's positions: [begin, end); with one split, chunk is the u32 maximum.
  const uint32_t begin = min(len, split * chunk);
  const uint32_t end = begin + min(chunk, len - begin);
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

  for (uint32_t p = begin + warp; p < end; p += WARPS) {
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
    if (splits == 1) {
      out[((size_t)seq * n_kv + kh) * group * HD + g * HD + d] = sum > 0.f ? val / sum : 0.f;
    } else {
      float *rec = part + ((((size_t)seq * n_kv + kh) * splits + split) * group + g) * (HD + 2);
      if (d == 0) {
        rec[0] = mx;  // -inf for a split past the sequence's end
        rec[1] = sum;
      }
      rec[2 + d] = val;
    }
  }
}

// Combines the splits' partial sums of one (sequence, KV head) per block, each rescaled to the
// largest maximum, as the warps are merged above.
extern "C" __global__ void decode_attention_merge(const float *__restrict__ part,
                                                  float *__restrict__ out, const uint32_t n_kv,
                                                  const uint32_t group, const uint32_t head_dim,
                                                  const uint32_t splits) {
  const uint32_t seq = blockIdx.x, kh = blockIdx.y;
  const size_t rec = head_dim + 2;
  const float *recs = part + ((size_t)seq * n_kv + kh) * splits * group * rec;
  for (uint32_t idx = threadIdx.x; idx < group * head_dim; idx += blockDim.x) {
    const uint32_t g = idx / head_dim, d = idx % head_dim;
    float mx = -INFINITY;
    for (uint32_t s = 0; s < splits; ++s) mx = fmaxf(mx, recs[(s * group + g) * rec]);
    float sum = 0.f, val = 0.f;
    for (uint32_t s = 0; s < splits; ++s) {
      const float *r = recs + (s * group + g) * rec;
      if (r[0] == -INFINITY) continue;
      const float f = __expf(r[0] - mx);
      sum += r[1] * f;
      val += r[2 + d] * f;
    }
    out[((size_t)seq * n_kv + kh) * group * head_dim + idx] = sum > 0.f ? val / sum : 0.f;
  }
}

#define DECODE_ATTENTION(HD)                                                                  \
  extern "C" __global__ void decode_attention_##HD(                                           \
      const float *q, const __half *slab_k, const __half *slab_v, const uint32_t *table,      \
      float *out, float *part, const uint32_t n_kv, const uint32_t group,                     \
      const uint32_t q_stride, const uint32_t table_stride, const uint32_t chunk,             \
      const float scale) {                                                                    \
    decode_attention<HD>(q, slab_k, slab_v, table, out, part, n_kv, group, q_stride,         \
                         table_stride, chunk, scale);                                         \
  }

DECODE_ATTENTION(16)
DECODE_ATTENTION(32)
DECODE_ATTENTION(64)
DECODE_ATTENTION(80)
DECODE_ATTENTION(96)
DECODE_ATTENTION(128)
