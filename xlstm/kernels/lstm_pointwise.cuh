// xlstm: the pointwise math of one LSTM time step, forward and backward, per element.
//
// This header is the single truth for the CUDA path. It is compiled three ways:
//   * by NVRTC (cupy.RawModule) into the kernels of lstm_kernels.cu, at run time on a GPU;
//   * by nvcc / NVRTC to PTX in CI (tests/test_kernels_compile.py), without a GPU;
//   * by g++ for the host (tests/support/kernels_host_shim.cpp), so CI checks these exact functions
//     against the NumPy backend on random and extreme inputs without a GPU.
// Hence: no CUDA-only constructs outside the XLSTM_HD macro, no standard headers under NVRTC.
//
// The equations are those of xlstm/ops/lstm_cell.py and ln_lstm_cell.py, with the seed's names
// (gates blocked i, f, g, o along 4H; kc, kh the carry fractions, one_minus_kc = 1 - kc the
// share of the new value):
//
//   forward   i = sigmoid(z_i)  f = sigmoid(z_f + forget_bias)  g = tanh(z_g)  o = sigmoid(z_o)
//             c_new = f * c_prev + i * (g * gmask)        h_new = o * tanh(c_new)
//             one_minus_kc = mask * (1 - zc)    one_minus_kh = mask * (1 - zh)
//             c = kc * c_prev + (1 - kc) * c_new          h = kh * h_prev + (1 - kh) * h_new
//
//   backward  dHt = mask * dy + dh_next            dHt_cell = (1 - kh) * dHt
//             dCt = (1 - kc) * dc_next + dHt_cell * o * (1 - tanh(c_new)^2)
//             dz_i = dCt * g * gmask * i (1 - i)     dz_f = dCt * c_prev * f (1 - f)
//             dz_g = dCt * i * gmask * (1 - g^2)     dz_o = dHt_cell * tanh(c_new) * o (1 - o)
//             dc_prev = kc * dc_next + dCt * f        dh_skip = kh * dHt
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

// f(x) in the precision of T, for f in tanh, sqrt (and exp, log in xent.cuh). On the device
// these are CUDA's libdevice functions (tanhf/tanh ...; no fast-math intrinsics: do not compile
// with -use_fast_math, whose tanh.approx is accurate to only ~1e-3 relative); on the host, the
// C library's.
#if defined(__CUDACC__)
#define XLSTM_MATH_T(name, f32_fn, f64_fn) \
  XLSTM_HD float name(float x) { return f32_fn(x); } \
  XLSTM_HD double name(double x) { return f64_fn(x); }
#else
#define XLSTM_MATH_T(name, f32_fn, f64_fn) \
  XLSTM_HD float name(float x) { return std::f64_fn(x); } \
  XLSTM_HD double name(double x) { return std::f64_fn(x); }
#endif
XLSTM_MATH_T(tanh_t, tanhf, tanh)
XLSTM_MATH_T(sqrt_t, sqrtf, sqrt)

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
  // 1 - k is the share of the new value. Written as k*prev + (1-k)*new, with k computed as
  // 1 - (1-k), rather than prev + (1-k)*(new-prev), so that 1-k = 0 gives exactly prev and
  // 1-k = 1 exactly new.
  const T one_minus_kc = m * (T(1) - zc);
  const T one_minus_kh = m * (T(1) - zh);
  c = (T(1) - one_minus_kc) * c_prev + one_minus_kc * c_new;
  h = (T(1) - one_minus_kh) * h_prev + one_minus_kh * h_new;
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
  const T one_minus_kc = m * (T(1) - zc);
  const T one_minus_kh = m * (T(1) - zh);
  const T dHt = m * dy + dh_next;            // output gradient plus dh_next from t+1
  const T dHt_cell = one_minus_kh * dHt;     // the part that reaches this step's cell
  const T dCt = one_minus_kc * dc_next + dHt_cell * o * (T(1) - tc * tc);
  dz_o = dHt_cell * tc * (o - o * o);        // dOt through the sigmoid: s' = s - s^2
  dz_i = dCt * gd * (i - i * i);             // dIt
  dz_g = dCt * i * gm * (T(1) - g * g);      // dCprojt through the tanh
  dz_f = dCt * c_prev * (f - f * f);         // dFt
  dc_prev = (T(1) - one_minus_kc) * dc_next + dCt * f;
  dh_skip = (T(1) - one_minus_kh) * dHt;
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

// =============================================================================================
// LayerNorm LSTM step (TensorFlow's LayerNormBasicLSTMCell), equations in xlstm/ops/ln_lstm_cell.py
// and xlstm/layernorm.py. Per batch row b, each gate block z_k [H] and c_new [H] is normalised
// on its own: vhat = (v - mean) * rstd, rstd = 1/sqrt(biased var + eps), two passes (mean, then
// the variance of the centred values), as the NumPy backend computes them.
//
// A row needs sums over its H units, so these functions run per row and take a Rows policy R
// that says which units the caller handles and how partial sums are combined:
//   r.first(), r.stride(): this worker's units are j = first, first+stride, ... < H
//   r.leader():            true for the one worker that writes per-row scalars (rstd)
//   r.sum(v):              v[0..N) <- the sum of v over all workers of the row (T (&v)[N])
// The CUDA kernels use one thread block per row (a block reduction, lstm_kernels.cu); the host
// checks use one worker per row (SerialRows below), so both run this very code. Between two
// sums a worker only touches its own units, which is why no other synchronisation is needed.
// =============================================================================================

// One worker for the whole row: the host build (and any sequential caller).
struct SerialRows {
  XLSTM_HD index_t first() const { return 0; }
  XLSTM_HD index_t stride() const { return 1; }
  XLSTM_HD bool leader() const { return true; }
  template <typename T, int N>
  XLSTM_HD void sum(T (&)[N]) const {}
};

// ---------------------------------------------------------------------------------------------
// Forward of row b of one LayerNorm LSTM step.
//
//   z       [B,4H]  in: raw pre-activations x@W + h_prev@U (no bias), blocked i, f, g, o;
//                   out: post-activation gates i, f, g, o (g before dropout).
//   zhat    [B,4H]  out: normalised pre-activations (before gain/shift).
//   rstd    [B,4]   out: 1/sqrt(var + eps) per row and gate.
//   chat    [B,H]   out: normalised c_new (before c_gain/c_shift); scratch for c_new meanwhile.
//   rstd_c  [B]     out: 1/sqrt(var(c_new) + eps) per row.
//   c_prev, h_prev [B,H]  state of step t-1.   c, h [B,H]  out: state of step t.
//   gain, shift [4H]  per-gate LN gain and shift (blocked i, f, g, o).
//   c_gain, c_shift [H]  LN gain and shift of the cell state.
//   forget_bias, eps  scalars.   mask [B], zc, zh, gmask [B,H]: as forward_at (null = unused).
// ---------------------------------------------------------------------------------------------
template <typename T, class R>
XLSTM_HD void ln_forward_row(R& r, index_t b, index_t H, T* z, T* zhat, T* rstd, T* chat,
                             T* rstd_c, const T* c_prev, const T* h_prev, T* c, T* h,
                             const T* gain, const T* shift, const T* c_gain, const T* c_shift,
                             T forget_bias, T eps, const T* mask, const T* zc, const T* zh,
                             const T* gmask) {
  T* zr = z + b * 4 * H;
  T* zhr = zhat + b * 4 * H;
  const T inv_H = T(1) / T(H);
  // pass 1 and 2: mean, then biased variance, of each gate block
  T s[4] = {T(0), T(0), T(0), T(0)};
  for (index_t j = r.first(); j < H; j += r.stride())
    for (int k = 0; k < 4; ++k) s[k] += zr[k * H + j];
  r.sum(s);
  T mean[4];
  for (int k = 0; k < 4; ++k) { mean[k] = s[k] * inv_H; s[k] = T(0); }
  for (index_t j = r.first(); j < H; j += r.stride())
    for (int k = 0; k < 4; ++k) { const T d = zr[k * H + j] - mean[k]; s[k] += d * d; }
  r.sum(s);
  T rs[4];
  for (int k = 0; k < 4; ++k) rs[k] = T(1) / sqrt_t(s[k] * inv_H + eps);
  if (r.leader())
    for (int k = 0; k < 4; ++k) rstd[b * 4 + k] = rs[k];
  // pass 3: gates and c_new (kept in chat until its own mean and variance are known)
  const T m = load_or(mask, b, T(1));
  T sc[1] = {T(0)};
  for (index_t j = r.first(); j < H; j += r.stride()) {
    T a[4];
    for (int k = 0; k < 4; ++k) {
      const T zh_k = (zr[k * H + j] - mean[k]) * rs[k];
      zhr[k * H + j] = zh_k;
      a[k] = zh_k * gain[k * H + j] + shift[k * H + j];
    }
    const T i = sigmoid(a[0]), f = sigmoid(a[1] + forget_bias), g = tanh_t(a[2]), o = sigmoid(a[3]);
    zr[j] = i; zr[H + j] = f; zr[2 * H + j] = g; zr[3 * H + j] = o;
    const index_t n = b * H + j;
    const T c_new = f * c_prev[n] + i * (g * load_or(gmask, n, T(1)));
    chat[n] = c_new;
    sc[0] += c_new;
  }
  r.sum(sc);
  const T mean_c = sc[0] * inv_H;
  sc[0] = T(0);
  for (index_t j = r.first(); j < H; j += r.stride()) {
    const T d = chat[b * H + j] - mean_c;
    sc[0] += d * d;
  }
  r.sum(sc);
  const T rc = T(1) / sqrt_t(sc[0] * inv_H + eps);
  if (r.leader()) rstd_c[b] = rc;
  // pass 4: normalise c_new, the new state, and the carry (mask / zoneout) as the plain step
  for (index_t j = r.first(); j < H; j += r.stride()) {
    const index_t n = b * H + j;
    const T ch = (chat[n] - mean_c) * rc;
    chat[n] = ch;
    const T cn = ch * c_gain[j] + c_shift[j];
    const T h_new = zr[3 * H + j] * tanh_t(cn);
    const T one_minus_kc = m * (T(1) - load_or(zc, n, T(0)));
    const T one_minus_kh = m * (T(1) - load_or(zh, n, T(0)));
    c[n] = (T(1) - one_minus_kc) * c_prev[n] + one_minus_kc * cn;
    h[n] = (T(1) - one_minus_kh) * h_prev[n] + one_minus_kh * h_new;
  }
}

// ---------------------------------------------------------------------------------------------
// Backward of row b of one LayerNorm LSTM step.
//
//   gates, zhat [B,4H], rstd [B,4], chat [B,H], rstd_c [B]: stored by ln_forward_row.
//   c_prev [B,H]  the (carried) cell state of step t-1.
//   gain [4H], c_gain, c_shift [H]: the LN parameters.
//   dy, dh_next, dc_next [B,H]: as backward_at.
//   dz      [B,4H]  out: gradient w.r.t. the raw pre-activations z.
//   dc_prev [B,H]   out (may alias dc_next).   dh_skip [B,H]  out, kh*dHt (may alias dh_next).
//   part    [B,10H] out: this row's contributions to the parameter gradients, summed over the
//                   rows afterwards by ln_accumulate_column (deterministically, no atomics):
//                   [0,4H) dzn*zhat (dgain), [4H,8H) dzn (dshift), [8H,9H) dCnorm*chat (dc_gain),
//                   [9H,10H) dCnorm (dc_shift).
//   mask [B], zc, zh, gmask [B,H]: as backward_at (null = unused).
// ---------------------------------------------------------------------------------------------
template <typename T, class R>
XLSTM_HD void ln_backward_row(R& r, index_t b, index_t H, const T* gates, const T* zhat,
                              const T* rstd, const T* chat, const T* rstd_c, const T* c_prev,
                              const T* gain, const T* c_gain, const T* c_shift, const T* dy,
                              const T* dh_next, const T* dc_next, T* dz, T* dc_prev, T* dh_skip,
                              T* part, const T* mask, const T* zc, const T* zh, const T* gmask) {
  const T* gr = gates + b * 4 * H;
  const T* zhr = zhat + b * 4 * H;
  T* dzr = dz + b * 4 * H;
  T* pr = part + b * 10 * H;
  const T inv_H = T(1) / T(H);
  const T m = load_or(mask, b, T(1));
  const T rc = rstd_c[b];
  // pass 1: dCnorm (gradient w.r.t. cn = LN(c_new)), dzn_o, and the sums of the c layer norm
  // backward. dCnorm waits in pr[9H+j] (its dc_shift slot) and dzn_o in dzr[3H+j] until pass 2.
  T s2[2] = {T(0), T(0)};
  for (index_t j = r.first(); j < H; j += r.stride()) {
    const index_t n = b * H + j;
    const T o = gr[3 * H + j];
    const T one_minus_kh = m * (T(1) - load_or(zh, n, T(0)));
    const T one_minus_kc = m * (T(1) - load_or(zc, n, T(0)));
    const T dHt_cell = one_minus_kh * (m * dy[n] + dh_next[n]);
    const T ch = chat[n];
    const T tc = tanh_t(ch * c_gain[j] + c_shift[j]);
    const T dCnorm = one_minus_kc * dc_next[n] + dHt_cell * o * (T(1) - tc * tc);
    dzr[3 * H + j] = dHt_cell * tc * (o - o * o);
    pr[8 * H + j] = dCnorm * ch;
    pr[9 * H + j] = dCnorm;
    const T dchat = dCnorm * c_gain[j];
    s2[0] += dchat;
    s2[1] += dchat * ch;
  }
  r.sum(s2);
  const T mc1 = s2[0] * inv_H, mc2 = s2[1] * inv_H;
  // pass 2: dCt, the gate gradients dzn w.r.t. LN(z), dc_prev, dh_skip, and the gate sums
  T s8[8] = {T(0), T(0), T(0), T(0), T(0), T(0), T(0), T(0)};
  for (index_t j = r.first(); j < H; j += r.stride()) {
    const index_t n = b * H + j;
    const T i = gr[j], f = gr[H + j], g = gr[2 * H + j];
    const T gm = load_or(gmask, n, T(1));
    const T dCt = rc * (pr[9 * H + j] * c_gain[j] - mc1 - chat[n] * mc2);
    T dzn[4];
    dzn[0] = dCt * (g * gm) * (i - i * i);
    dzn[1] = dCt * c_prev[n] * (f - f * f);
    dzn[2] = dCt * i * gm * (T(1) - g * g);
    dzn[3] = dzr[3 * H + j];
    // read dh_next / dc_next of element n before writing dh_skip / dc_prev (they may alias)
    const T one_minus_kh = m * (T(1) - load_or(zh, n, T(0)));
    const T one_minus_kc = m * (T(1) - load_or(zc, n, T(0)));
    const T dHt = m * dy[n] + dh_next[n];
    const T dcp = (T(1) - one_minus_kc) * dc_next[n] + dCt * f;
    dh_skip[n] = (T(1) - one_minus_kh) * dHt;
    dc_prev[n] = dcp;
    for (int k = 0; k < 4; ++k) {
      const T zh_k = zhr[k * H + j];
      pr[k * H + j] = dzn[k] * zh_k;
      pr[4 * H + k * H + j] = dzn[k];
      const T dzhat = dzn[k] * gain[k * H + j];
      dzr[k * H + j] = dzhat;
      s8[2 * k] += dzhat;
      s8[2 * k + 1] += dzhat * zh_k;
    }
  }
  r.sum(s8);
  // pass 3: layer norm backward of each gate block, dz = rstd * (dzhat - mean - zhat * mean2)
  T rs[4];
  for (int k = 0; k < 4; ++k) rs[k] = rstd[b * 4 + k];
  for (index_t j = r.first(); j < H; j += r.stride())
    for (int k = 0; k < 4; ++k)
      dzr[k * H + j] = rs[k] * (dzr[k * H + j] - s8[2 * k] * inv_H - zhr[k * H + j] * s8[2 * k + 1] * inv_H);
}

// ---------------------------------------------------------------------------------------------
// Column n in [0,10H) of the parameter-gradient sums: acc += sum over the B rows of part[:, n],
// where acc is dgain [4H] (n < 4H), dshift [4H] (n < 8H), dc_gain [H] (n < 9H), dc_shift [H].
// Rows are added in order b = 0..B-1, so the result does not depend on the launch.
// ---------------------------------------------------------------------------------------------
template <typename T>
XLSTM_HD void ln_accumulate_column(index_t n, index_t B, index_t H, const T* part, T* dgain,
                                   T* dshift, T* dc_gain, T* dc_shift) {
  T s = T(0);
  for (index_t b = 0; b < B; ++b) s += part[b * 10 * H + n];
  if (n < 4 * H) dgain[n] += s;
  else if (n < 8 * H) dshift[n - 4 * H] += s;
  else if (n < 9 * H) dc_gain[n - 8 * H] += s;
  else dc_shift[n - 9 * H] += s;
}

}  // namespace xlstm
