// xlstm: the Adam / AdamW update of one element, for the fused multi-tensor kernel adam_step.
//
// The same IEEE operations, in the same order, each rounded to T on its own, as the NumPy
// backend's update over the flat buffers (xlstm/optim.py, Adam._moments, then p -= d):
//
//   p = p * decay                      decay = 1 - lr*wd (AdamW), 1 without weight decay
//   m = m * b1 + g * c1                c1 = 1 - b1
//   v = v * b2 + (g * g) * c2          c2 = 1 - b2
//   d = m / (sqrt(v) / bc2 + eps)      bc2 = sqrt(1 - b2^t)
//   p = p - d * step                   step = lr / (1 - b1^t)
//
// Every scalar arrives already rounded to T, as NumPy rounds a Python float operand to the
// array's dtype. Multiplying by decay = 1 changes no bit, so one kernel serves both. On the
// device each operation is an explicit round-to-nearest intrinsic: NVRTC would otherwise
// contract a*b + c into one FMA (one rounding instead of two) and the bits would differ from
// NumPy's. The host build (g++ -ffp-contract=off) evaluates the plain expressions.
#pragma once

#include "lstm_pointwise.cuh"

namespace xlstm {

#if defined(__CUDA_ARCH__)
XLSTM_HD float mul_rn(float a, float b) { return __fmul_rn(a, b); }
XLSTM_HD float add_rn(float a, float b) { return __fadd_rn(a, b); }
XLSTM_HD float sub_rn(float a, float b) { return __fsub_rn(a, b); }
XLSTM_HD float div_rn(float a, float b) { return __fdiv_rn(a, b); }
XLSTM_HD float sqrt_rn(float a) { return __fsqrt_rn(a); }
XLSTM_HD double mul_rn(double a, double b) { return __dmul_rn(a, b); }
XLSTM_HD double add_rn(double a, double b) { return __dadd_rn(a, b); }
XLSTM_HD double sub_rn(double a, double b) { return __dsub_rn(a, b); }
XLSTM_HD double div_rn(double a, double b) { return __ddiv_rn(a, b); }
XLSTM_HD double sqrt_rn(double a) { return __dsqrt_rn(a); }
#else
template <typename T> XLSTM_HD T mul_rn(T a, T b) { return a * b; }
template <typename T> XLSTM_HD T add_rn(T a, T b) { return a + b; }
template <typename T> XLSTM_HD T sub_rn(T a, T b) { return a - b; }
template <typename T> XLSTM_HD T div_rn(T a, T b) { return a / b; }
template <typename T> XLSTM_HD T sqrt_rn(T a) { return std::sqrt(a); }
#endif

// Element k of the flat buffers p, g, m, v (all [n]): p, m, v updated in place, g read.
template <typename T>
XLSTM_HD void adam_at(index_t k, T* p, const T* g, T* m, T* v, T decay, T b1, T c1, T b2, T c2,
                      T bc2, T eps, T step) {
  const T gk = g[k];
  const T pk = mul_rn(p[k], decay);
  const T mk = add_rn(mul_rn(m[k], b1), mul_rn(gk, c1));
  const T vk = add_rn(mul_rn(v[k], b2), mul_rn(mul_rn(gk, gk), c2));
  const T d = div_rn(mk, add_rn(div_rn(sqrt_rn(vk), bc2), eps));
  m[k] = mk;
  v[k] = vk;
  p[k] = sub_rn(pk, mul_rn(d, step));
}

// -- global-norm clipping (kernels grad_norm and clip_by_norm) -------------------------------
// One block of NORM_THREADS threads sums g^2 over the flat gradient buffer in double: thread
// tid takes k = tid, tid + NORM_THREADS, ... in order, then a fixed tree adds the partial sums
// (pairs w apart, w = NORM_THREADS/2 ... 1). No atomics: the same buffer gives the same bits.
constexpr int NORM_THREADS = 256;

template <typename T>
XLSTM_HD double sumsq_strided(const T* g, index_t n, int tid) {
  double s = 0.0;
  for (index_t k = tid; k < n; k += NORM_THREADS) {
    const double x = (double)g[k];
    s = add_rn(s, mul_rn(x, x));
  }
  return s;
}

// The clip factor: max_norm / total where total is finite and above max_norm, else 1 (a NaN
// or infinite norm leaves the gradients unchanged, as xlstm.optim.clip_grad_norm).
XLSTM_HD double clip_scale(double total, double max_norm) {
  return (total > max_norm && total <= 1.7976931348623157e308) ? div_rn(max_norm, total) : 1.0;
}

}  // namespace xlstm
