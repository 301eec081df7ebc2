// xlstm: the pointwise math of one LSTM time step, forward and backward, per element.
//
// This header is the single truth for the CUDA path. It is compiled three ways:
//   * by NVRTC (cupy.RawModule) into the kernels of lstm_kernels.cu, at run time on a GPU;
//   * by nvcc / NVRTC to PTX in CI (tests/test_kernels_compile.py), without a GPU;
//   * by g++ for the host (tests/kernels_host_shim.cpp), so CI checks these exact functions
//     against the NumPy backend on random and extreme inputs without a GPU.
// Hence: no CUDA-only constructs outside the XLSTM_HD macro, no standard headers under NVRTC.
//
// The equations are those of xlstm/backends/base.py (gates blocked i, f, g, o along 4H):
//
//   forward   i = sigmoid(z_i)  f = sigmoid(z_f + forget_bias)  g = tanh(z_g)  o = sigmoid(z_o)
//             c_new = f * c_prev + i * (g * gmask)        h_new = o * tanh(c_new)
//             wc = mask * (1 - zc)    wh = mask * (1 - zh)    (w = 1 - k, the "take new" share)
//             c = (1 - wc) * c_prev + wc * c_new          h = (1 - wh) * h_prev + wh * h_new
//
//   backward  dh = mask * dy + dh_next            dh_new = wh * dh
//             dc_new = wc * dc_next + dh_new * o * (1 - tanh(c_new)^2)
//             dz_i = dc_new * g * gmask * i (1 - i)     dz_f = dc_new * c_prev * f (1 - f)
//             dz_g = dc_new * i * gmask * (1 - g^2)     dz_o = dh_new * tanh(c_new) * o (1 - o)
//             dc_prev = (1 - wc) * dc_next + dc_new * f        dh_skip = (1 - wh) * dh
//
// Unused modifiers are passed as nullptr and read as their neutral value
// (mask = 1, zc = zh = 0, gmask = 1), which reduces the equations to the plain cell.
#pragma once

#if defined(__CUDACC__)
// nvcc and NVRTC: callable from kernels and (with nvcc) from host code alike.
#define XLSTM_HD __host__ __device__ __forceinline__
#else
// g++/clang for the host checks: plain inline C++.
#include <cmath>
#define XLSTM_HD inline
#endif

namespace xlstm {

// Index type for element offsets: B*4H can pass 2^31 for large batches and widths.
typedef long long index_t;

// tanh in the precision of T. On the device these are CUDA's libdevice tanhf/tanh (no fast-math
// intrinsics: do not compile with -use_fast_math, whose tanh.approx is accurate to only ~1e-3
// relative); on the host, the C library's.
XLSTM_HD float tanh_t(float x) {
#if defined(__CUDACC__)
  return tanhf(x);
#else
  return std::tanh(x);
#endif
}
XLSTM_HD double tanh_t(double x) {
#if defined(__CUDACC__)
  return tanh(x);
#else
  return std::tanh(x);
#endif
}

// sigmoid(x) = 1 / (1 + exp(-x)) written as 0.5 * tanh(0.5 x) + 0.5: it never overflows
// (exp(-x) does for x < -88 in float32) and it matches the NumPy backend operation for operation.
template <typename T>
XLSTM_HD T sigmoid(T x) {
  return T(0.5) * tanh_t(T(0.5) * x) + T(0.5);
}

// Value of an optional per-row or per-element input: p[k] when given, `neutral` when p is null.
template <typename T>
XLSTM_HD T load_or(const T* p, index_t k, T neutral) {
  return p ? p[k] : neutral;
}

// ---------------------------------------------------------------------------------------------
// Forward, one element (b, j) of one time step; all arguments are scalars.
//
//   z_i, z_f, z_g, z_o: pre-activations of unit j (input and recurrent products plus bias).
//   c_prev, h_prev:     state of unit j at step t-1.
//   forget_bias:        constant added to z_f.
//   m:   sequence mask of row b (1 inside the sequence, 0 past its end).
//   zc, zh: zoneout carry fractions of c and h (0 = no zoneout).
//   gm:  recurrent-dropout multiplier of the candidate g (1 = no dropout).
// Outputs: i, f, g, o the post-activation gates (g before dropout, as backward expects),
//          c, h the state of step t.
// ---------------------------------------------------------------------------------------------
template <typename T>
XLSTM_HD void forward_element(T z_i, T z_f, T z_g, T z_o, T c_prev, T h_prev, T forget_bias,
                              T m, T zc, T zh, T gm,
                              T& i, T& f, T& g, T& o, T& c, T& h) {
  i = sigmoid(z_i);
  f = sigmoid(z_f + forget_bias);
  g = tanh_t(z_g);
  o = sigmoid(z_o);
  const T c_new = f * c_prev + i * (g * gm);
  const T h_new = o * tanh_t(c_new);
  // w = 1 - k is the share of the new value. Written as (1-w)*prev + w*new rather than
  // prev + w*(new-prev) so that w = 0 gives exactly prev and w = 1 exactly new.
  const T wc = m * (T(1) - zc);
  const T wh = m * (T(1) - zh);
  c = (T(1) - wc) * c_prev + wc * c_new;
  h = (T(1) - wh) * h_prev + wh * h_new;
}

// ---------------------------------------------------------------------------------------------
// Backward, one element (b, j) of one time step; all arguments are scalars.
//
//   i, f, g, o:  post-activation gates stored by the forward step (g before dropout).
//   c_prev:      cell state of unit j at step t-1.
//   dy:          gradient of the loss w.r.t. the step's output h_t (unmasked; m masks it).
//   dh_next, dc_next: gradients w.r.t. h_t and c_t arriving from step t+1.
//   m, zc, zh, gm: as forward_element.
// Outputs: dz_i, dz_f, dz_g, dz_o gradients w.r.t. the pre-activations; dc_prev w.r.t. c_{t-1};
//          dh_skip the part of dL/dh_{t-1} that bypasses the gates (the caller adds dz @ U^T).
// All inputs are read before any output is written by the caller, so outputs may alias inputs.
// ---------------------------------------------------------------------------------------------
template <typename T>
XLSTM_HD void backward_element(T i, T f, T g, T o, T c_prev, T dy, T dh_next, T dc_next,
                               T m, T zc, T zh, T gm,
                               T& dz_i, T& dz_f, T& dz_g, T& dz_o, T& dc_prev, T& dh_skip) {
  const T gd = g * gm;                       // the candidate after dropout
  const T tc = tanh_t(f * c_prev + i * gd);  // tanh(c_new), recomputed rather than stored
  const T wc = m * (T(1) - zc);
  const T wh = m * (T(1) - zh);
  const T dh = m * dy + dh_next;             // dHt: output gradient plus dh_next from t+1
  const T dh_new = wh * dh;                  // the part that reaches this step's cell
  const T dc_new = wc * dc_next + dh_new * o * (T(1) - tc * tc);   // dCt
  dz_o = dh_new * tc * (o - o * o);          // dOt through the sigmoid: s' = s - s^2
  dz_i = dc_new * gd * (i - i * i);          // dIt
  dz_g = dc_new * i * gm * (T(1) - g * g);   // dCprojt through the tanh
  dz_f = dc_new * c_prev * (f - f * f);      // dFt
  dc_prev = (T(1) - wc) * dc_next + dc_new * f;
  dh_skip = (T(1) - wh) * dh;
}

// ---------------------------------------------------------------------------------------------
// The same two steps addressed through arrays, for element n = b*H + j of a [B,H] step.
// Shared by the CUDA kernels (one thread per n) and the host shim (a loop over n), so the
// host checks also cover the indexing and the nullptr handling of the kernels.
//
// Shapes (all C-contiguous, row-major):
//   z, gates, dz [B,4H]   gate blocks i, f, g, o at columns [0,H), [H,2H), [2H,3H), [3H,4H)
//   c_prev, h_prev, c, h, dy, dh_next, dc_next, dc_prev, dh_skip [B,H]
//   mask [B] or nullptr;  zc, zh, gmask [B,H] or nullptr
// ---------------------------------------------------------------------------------------------
template <typename T>
XLSTM_HD void forward_at(index_t n, index_t H,
                         T* z, const T* c_prev, const T* h_prev, T* c, T* h, T forget_bias,
                         const T* mask, const T* zc, const T* zh, const T* gmask) {
  const index_t b = n / H;
  const index_t j = n - b * H;
  T* zr = z + b * 4 * H + j;  // unit j of row b in gate block i; the others are H apart
  T gi, gf, gg, go;
  forward_element<T>(zr[0], zr[H], zr[2 * H], zr[3 * H], c_prev[n], h_prev[n], forget_bias,
                     load_or(mask, b, T(1)), load_or(zc, n, T(0)), load_or(zh, n, T(0)),
                     load_or(gmask, n, T(1)), gi, gf, gg, go, c[n], h[n]);
  zr[0] = gi;
  zr[H] = gf;
  zr[2 * H] = gg;
  zr[3 * H] = go;
}

template <typename T>
XLSTM_HD void backward_at(index_t n, index_t H,
                          const T* gates, const T* c_prev, const T* dy, const T* dh_next,
                          const T* dc_next, T* dz, T* dc_prev, T* dh_skip,
                          const T* mask, const T* zc, const T* zh, const T* gmask) {
  const index_t b = n / H;
  const index_t j = n - b * H;
  const T* gr = gates + b * 4 * H + j;
  T* dzr = dz + b * 4 * H + j;
  T dc_prev_n, dh_skip_n;
  // every input of element n is loaded into registers before dc_prev[n] / dh_skip[n] are
  // written, which is what makes dc_prev == dc_next and dh_skip == dh_next aliasing safe
  backward_element<T>(gr[0], gr[H], gr[2 * H], gr[3 * H], c_prev[n], dy[n], dh_next[n],
                      dc_next[n], load_or(mask, b, T(1)), load_or(zc, n, T(0)),
                      load_or(zh, n, T(0)), load_or(gmask, n, T(1)),
                      dzr[0], dzr[H], dzr[2 * H], dzr[3 * H], dc_prev_n, dh_skip_n);
  dc_prev[n] = dc_prev_n;
  dh_skip[n] = dh_skip_n;
}

}  // namespace xlstm
