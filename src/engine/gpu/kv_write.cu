// Writes a step's new K (or V) rows into a layer's f16 slab in one launch: step row r (token
// r / n_kv, KV head r % n_kv) goes to slab row rows[r], rounded to f16 on the way, and for K on a
// RoPE layer turned by its token's angles first (interleaved pairs, as rope.cu). candle's own
// scatter runs one thread per column and walks the rows one after another; here every value has
// its own thread. Built to PTX by build.rs when the `cuda` feature is on.
#include <cuda_fp16.h>

extern "C" __global__ void kv_write_f32(
    const float *src,          // t x src_stride, KV head h of token i at [i * src_stride + h * head_dim]
    const unsigned int *rows,  // t * n_kv slab rows
    __half *slab,              // slab rows of head_dim values
    const float *cos,          // t x head_dim / 2, when rotate
    const float *sin,
    const unsigned int n_rows,
    const unsigned int head_dim,
    const unsigned int n_kv,
    const unsigned int src_stride,
    const unsigned int rotate) {
  const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n_rows * head_dim) return;
  const unsigned int r = i / head_dim;
  const unsigned int c = i - r * head_dim;
  const unsigned int token = r / n_kv;
  const unsigned int head = r - token * n_kv;
  const float *row = src + (size_t)token * src_stride + head * head_dim;
  float x = row[c];
  if (rotate) {
    const float x0 = row[c & ~1u], x1 = row[c | 1u];
    const size_t pair = (size_t)token * (head_dim / 2) + c / 2;
    x = (c & 1u) ? x0 * sin[pair] + x1 * cos[pair] : x0 * cos[pair] - x1 * sin[pair];
  }
  slab[(size_t)rows[r] * head_dim + c] = __float2half_rn(x);
}
