// The part of CUDA's <cuda_fp16.h> our kernels use, on the CPU for the kernel emulator: __half
// as its 16 bits, converted with the x86 F16C instructions (round to nearest even, as CUDA's
// __float2half_rn).
#pragma once
#include <immintrin.h>
#include <stdint.h>

struct __half {
  uint16_t bits;
};

inline float __half2float(__half h) { return _cvtsh_ss(h.bits); }

inline __half __float2half_rn(float x) {
  return __half{static_cast<uint16_t>(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT))};
}
