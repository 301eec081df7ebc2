// xlstm: float32 -> bfloat16 rounding for the bf16 GEMM operands (xlstm/precision.py).
//
// cublasGemmEx reads bf16 operands from memory, so the CuPy backend casts each float32 operand
// once before its product (weights once per call, h and dz once per step). The rounding is
// round-to-nearest, ties to even, on the bits, which is what ml_dtypes.bfloat16, CUDA's
// __float2bfloat16_rn and xlstm.precision.round_bf16 do (tests/test_precision.py holds the
// host build of this function to ml_dtypes on random bit patterns, NaN and Inf included).
// Written on the bits rather than with cuda_bf16.h so that NVRTC needs no include path and g++
// compiles the same function for the host checks.
#pragma once

#ifndef XLSTM_HD
#if defined(__CUDACC__)
#define XLSTM_HD __host__ __device__ __forceinline__
#else
#define XLSTM_HD inline
#endif
#endif

namespace xlstm {

XLSTM_HD unsigned int float_bits(float x) {
#if defined(__CUDACC__)
  return __float_as_uint(x);
#else
  unsigned int u;
  __builtin_memcpy(&u, &x, sizeof u);
  return u;
#endif
}

// The bfloat16 nearest to x (ties to even), as its 16 bits. Adding 0x7fff plus the lowest kept
// bit rounds half-way cases to the even neighbour; a carry into the exponent is the correct
// rounding (up to Inf past the largest finite value). NaN stays a quiet NaN of the same sign.
XLSTM_HD unsigned short f32_to_bf16_bits(float x) {
  unsigned int u = float_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x0040u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (unsigned short)(u >> 16);
}

}  // namespace xlstm
