// Rotary position embedding of a step's query rows, read straight from the fused projection's
// columns (rows may be strided) into contiguous f32 rows: one launch where candle's rope needs a
// contiguous copy first. Interleaved pairs (x[2i], x[2i+1]) turn by token t's angle i, as
// candle's rope_i and llama.cpp's GGUF layout have them. Built to PTX by build.rs under the
// `cuda` feature; `rope.rs` holds the same arithmetic for candle's CPU device.
#include <stdint.h>

extern "C" __global__ void rope_rows_f32(
    const float *src,          // t x src_stride, the heads at the start of each row
    const float *cos,          // t x head_dim / 2
    const float *sin,
    float *dst,                // t x heads * head_dim, contiguous
    const uint32_t t,
    const uint32_t heads,
    const uint32_t head_dim,
    const uint32_t src_stride) {
  const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  const uint32_t width = heads * head_dim;
  if (i >= t * width) return;
  const uint32_t token = i / width;
  const uint32_t col = i - token * width;
  const uint32_t c = col % head_dim;
  const float *row = src + (size_t)token * src_stride + (col - c);
  const float x0 = row[c & ~1u], x1 = row[c | 1u];
  const uint32_t pair = (size_t)token * (head_dim / 2) + c / 2;
  const float cs = cos[pair], sn = sin[pair];
  dst[i] = (c & 1u) ? x0 * sn + x1 * cs : x0 * cs - x1 * sn;
}
