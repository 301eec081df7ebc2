// Host build of xlstm/kernels/lstm_pointwise.cuh for tests/test_kernels_host.py.
//
// Compiled by g++ (-O2 -shared -fPIC, no fast-math) and loaded with ctypes. For every kernel K
// of lstm_kernels.cu, host_K has K's exact parameter list and computes what one launch of K
// computes: the kernels' per-element code (forward_at / backward_at) over all n = b*H + j, the
// LayerNorm row code over all rows with one serial worker per row, the column sums over all
// columns. So CI checks the CUDA math, indexing and nullptr handling against the NumPy backend
// without a GPU, and tests/support/standin.py can run CupyBackend's launches on the host.
// Arguments and shapes: as the kernels in lstm_kernels.cu (null pointers for unused masks).
//
// The persistent kernels of lstm_persistent.cu get host twins that run their phase functions
// (lstm_persistent.cuh) in the kernel's block/step schedule, with three extra trailing
// parameters that a launch supplies: NB (grid), nt (block) and the dynamic shared-memory bytes.
// Blocks run in ascending order on even steps and descending on odd ones, threads likewise, so
// a phase that read what another block or thread writes in the same phase would differ.
#include <limits>
#include <vector>

#include "lstm_persistent.cuh"
#include "lstm_pointwise.cuh"
#include "optim.cuh"
#include "xent.cuh"
#include "precision.cuh"

namespace {

template <typename T>
void forward_loop(T* z, const T* c_prev, const T* h_prev, T* c, T* h, T forget_bias,
                  const T* mask, const T* zc, const T* zh, const T* gmask,
                  long long B, long long H) {
  for (long long n = 0; n < B * H; ++n)
    xlstm::forward_at<T>(n, H, z, c_prev, h_prev, c, h, forget_bias, mask, zc, zh, gmask);
}

template <typename T>
void backward_loop(const T* gates, const T* c_prev, const T* dy, const T* dh_next,
                   const T* dc_next, T* dz, T* dc_prev, T* dh_skip,
                   const T* mask, const T* zc, const T* zh, const T* gmask,
                   long long B, long long H) {
  for (long long n = 0; n < B * H; ++n)
    xlstm::backward_at<T>(n, H, gates, c_prev, dy, dh_next, dc_next, dz, dc_prev, dh_skip,
                          mask, zc, zh, gmask);
}

template <typename T>
void ln_forward_loop(T* z, T* zhat, T* rstd, T* chat, T* rstd_c, const T* c_prev,
                     const T* h_prev, T* c, T* h, const T* gain, const T* shift, const T* c_gain,
                     const T* c_shift, T forget_bias, T eps, const T* mask, const T* zc,
                     const T* zh, const T* gmask, long long B, long long H) {
  xlstm::SerialRows r;
  for (long long b = 0; b < B; ++b)
    xlstm::ln_forward_row<T>(r, b, H, z, zhat, rstd, chat, rstd_c, c_prev, h_prev, c, h, gain,
                             shift, c_gain, c_shift, forget_bias, eps, mask, zc, zh, gmask);
}

template <typename T>
void ln_backward_loop(const T* gates, const T* zhat, const T* rstd, const T* chat,
                      const T* rstd_c, const T* c_prev, const T* gain, const T* c_gain,
                      const T* c_shift, const T* dy, const T* dh_next, const T* dc_next, T* dz,
                      T* dc_prev, T* dh_skip, T* part, const T* mask, const T* zc, const T* zh,
                      const T* gmask, long long B, long long H) {
  xlstm::SerialRows r;
  for (long long b = 0; b < B; ++b)
    xlstm::ln_backward_row<T>(r, b, H, gates, zhat, rstd, chat, rstd_c, c_prev, gain, c_gain,
                              c_shift, dy, dh_next, dc_next, dz, dc_prev, dh_skip, part, mask,
                              zc, zh, gmask);
}

template <typename T>
void ln_accumulate_loop(const T* part, T* dgain, T* dshift, T* dc_gain, T* dc_shift,
                        long long B, long long H) {
  for (long long n = 0; n < 10 * H; ++n)
    xlstm::ln_accumulate_column<T>(n, B, H, part, dgain, dshift, dc_gain, dc_shift);
}

// One block's shared memory per block, poisoned with NaN so a read before a write shows.
// Returns false (and leaves the outputs alone) when the launch's shared memory is too small
// or the barrier is not a zeroed counter: the caller then poisons an output.
template <typename T>
bool persistent_setup(const xlstm::PersistentArgs<T>& a, int backward, long long smem_bytes,
                      const unsigned int* barrier, std::vector<std::vector<T>>& smem) {
  const long long need = xlstm::persistent_smem_elems(backward, a.B, a.H, a.NB, a.KS);
  if (barrier == nullptr || *barrier != 0u || smem_bytes < need * (long long)sizeof(T) ||
      a.KS < 1 || a.NB < 1 || a.NB > a.H)
    return false;
  smem.assign(a.NB, std::vector<T>(need, std::numeric_limits<T>::quiet_NaN()));
  return true;
}

// Index of the i-th of n blocks or threads at step t: ascending on even steps, else descending.
inline long long nth(long long i, long long n, long long t) { return t % 2 ? n - 1 - i : i; }

template <typename T>
void persistent_forward_host(xlstm::PersistentArgs<T> a, const unsigned int* barrier,
                             long long nt, long long smem_bytes) {
  std::vector<std::vector<T>> sm;
  if (!persistent_setup(a, 0, smem_bytes, barrier, sm)) {
    for (long long n = 0; n < a.steps * a.B * 4 * a.H; ++n) a.gates[n] = std::numeric_limits<T>::quiet_NaN();
    return;
  }
  for (long long k = 0; k < a.NB; ++k)
    for (long long tid = 0; tid < nt; ++tid) xlstm::persistent_forward_load<T>(a, k, tid, nt, sm[k].data());
  for (long long t = 0; t < a.steps; ++t)          // a grid barrier between steps
    for (long long i = 0; i < a.NB; ++i) {
      const long long k = nth(i, a.NB, t);
      for (long long x = 0; x < nt; ++x)
        xlstm::persistent_forward_partial<T>(a, t, k, nth(x, nt, t), nt, sm[k].data());
      for (long long x = 0; x < nt; ++x)            // a block barrier between the phases
        xlstm::persistent_forward_pointwise<T>(a, t, k, nth(x, nt, t), nt, sm[k].data());
    }
}

template <typename T>
void persistent_backward_host(xlstm::PersistentArgs<T> a, const unsigned int* barrier,
                              long long nt, long long smem_bytes) {
  std::vector<std::vector<T>> sm;
  if (!persistent_setup(a, 1, smem_bytes, barrier, sm)) {
    for (long long n = 0; n < a.B * a.H; ++n) a.dh[n] = std::numeric_limits<T>::quiet_NaN();
    return;
  }
  for (long long k = 0; k < a.NB; ++k)
    for (long long tid = 0; tid < nt; ++tid) xlstm::persistent_backward_load<T>(a, k, tid, nt, sm[k].data());
  for (long long t = a.steps - 1; t >= -1; --t)    // t = -1: the finish after step 0
    for (long long i = 0; i < a.NB; ++i) {
      const long long k = nth(i, a.NB, t + 1);
      if (t < a.steps - 1)
        for (long long x = 0; x < nt; ++x)
          xlstm::persistent_backward_partial<T>(a, t + 1, k, nth(x, nt, t), nt, sm[k].data());
      for (long long x = 0; x < nt; ++x) {
        if (t >= 0)
          xlstm::persistent_backward_pointwise<T>(a, t, k, nth(x, nt, t + 1), nt, sm[k].data());
        else
          xlstm::persistent_backward_finish<T>(a, k, nth(x, nt, t + 1), nt, sm[k].data());
      }
    }
}

template <typename T>
xlstm::PersistentArgs<T> persistent_args(T* gates, T* hs, T* cs, const T* W, const T* dy, T* dh,
                                         T* dc, T* dz, T forget_bias, const T* mask, const T* zc,
                                         const T* zh, const T* gmask, long long steps,
                                         long long B, long long H, long long NB, long long KS) {
  xlstm::PersistentArgs<T> a;
  a.gates = gates; a.hs = hs; a.cs = cs; a.W = W; a.dy = dy; a.dh = dh; a.dc = dc; a.dz = dz;
  a.forget_bias = forget_bias;
  a.mask = mask; a.zc = zc; a.zh = zh; a.gmask = gmask;
  a.steps = steps; a.B = B; a.H = H; a.NB = NB; a.KS = KS;
  return a;
}

}  // namespace

extern "C" {

// The shared-memory size the host twins require, for the launch code's own formula to match.
long long host_persistent_smem_elems(int backward, long long B, long long H, long long NB,
                                     long long KS) {
  return xlstm::persistent_smem_elems(backward, B, H, NB, KS);
}

#define XLSTM_PERSISTENT_SHIM(T, SFX)                                                          \
  void host_lstm_persistent_forward_##SFX(                                                      \
      T* gates, T* hs, T* cs, const T* U, T forget_bias, const T* mask, const T* zc,            \
      const T* zh, const T* gmask, unsigned int* barrier, long long steps, long long B,         \
      long long H, long long KS, long long NB, long long nt, long long smem_bytes) {            \
    persistent_forward_host<T>(persistent_args<T>(gates, hs, cs, U, nullptr, nullptr, nullptr,  \
                                                  nullptr, forget_bias, mask, zc, zh, gmask,    \
                                                  steps, B, H, NB, KS),                         \
                               barrier, nt, smem_bytes);                                        \
  }                                                                                             \
  void host_lstm_persistent_backward_##SFX(                                                     \
      const T* gates, const T* cs, const T* dy, T* dh, T* dc, T* dz, const T* UT, const T* mask, \
      const T* zc, const T* zh, const T* gmask, unsigned int* barrier, long long steps,          \
      long long B, long long H, long long KS, long long NB, long long nt, long long smem_bytes) { \
    persistent_backward_host<T>(persistent_args<T>(const_cast<T*>(gates), nullptr,              \
                                                   const_cast<T*>(cs), UT, dy, dh, dc, dz, T(0), \
                                                   mask, zc, zh, gmask, steps, B, H, NB, KS),   \
                                barrier, nt, smem_bytes);                                       \
  }

XLSTM_PERSISTENT_SHIM(float, f32)
XLSTM_PERSISTENT_SHIM(double, f64)

void host_lstm_forward_step_f32(float* z, const float* c_prev, const float* h_prev, float* c,
                                float* h, float forget_bias, const float* mask, const float* zc,
                                const float* zh, const float* gmask, long long B, long long H) {
  forward_loop<float>(z, c_prev, h_prev, c, h, forget_bias, mask, zc, zh, gmask, B, H);
}

void host_lstm_forward_step_f64(double* z, const double* c_prev, const double* h_prev,
                                double* c, double* h, double forget_bias, const double* mask,
                                const double* zc, const double* zh, const double* gmask,
                                long long B, long long H) {
  forward_loop<double>(z, c_prev, h_prev, c, h, forget_bias, mask, zc, zh, gmask, B, H);
}

void host_lstm_backward_step_f32(const float* gates, const float* c_prev, const float* dy,
                                 const float* dh_next, const float* dc_next, float* dz,
                                 float* dc_prev, float* dh_skip, const float* mask,
                                 const float* zc, const float* zh, const float* gmask,
                                 long long B, long long H) {
  backward_loop<float>(gates, c_prev, dy, dh_next, dc_next, dz, dc_prev, dh_skip, mask, zc, zh,
                       gmask, B, H);
}

void host_lstm_backward_step_f64(const double* gates, const double* c_prev, const double* dy,
                                 const double* dh_next, const double* dc_next, double* dz,
                                 double* dc_prev, double* dh_skip, const double* mask,
                                 const double* zc, const double* zh, const double* gmask,
                                 long long B, long long H) {
  backward_loop<double>(gates, c_prev, dy, dh_next, dc_next, dz, dc_prev, dh_skip, mask, zc, zh,
                        gmask, B, H);
}

#define XLSTM_LN_SHIM(T, SFX)                                                                \
  void host_ln_lstm_forward_step_##SFX(                                                       \
      T* z, T* zhat, T* rstd, T* chat, T* rstd_c, const T* c_prev, const T* h_prev, T* c, T* h, \
      const T* gain, const T* shift, const T* c_gain, const T* c_shift, T forget_bias, T eps,  \
      const T* mask, const T* zc, const T* zh, const T* gmask, long long B, long long H) {     \
    ln_forward_loop<T>(z, zhat, rstd, chat, rstd_c, c_prev, h_prev, c, h, gain, shift, c_gain, \
                       c_shift, forget_bias, eps, mask, zc, zh, gmask, B, H);                  \
  }                                                                                            \
  void host_ln_lstm_backward_step_##SFX(                                                      \
      const T* gates, const T* zhat, const T* rstd, const T* chat, const T* rstd_c,            \
      const T* c_prev, const T* gain, const T* c_gain, const T* c_shift, const T* dy,          \
      const T* dh_next, const T* dc_next, T* dz, T* dc_prev, T* dh_skip, T* part,              \
      const T* mask, const T* zc, const T* zh, const T* gmask, long long B, long long H) {     \
    ln_backward_loop<T>(gates, zhat, rstd, chat, rstd_c, c_prev, gain, c_gain, c_shift, dy,    \
                        dh_next, dc_next, dz, dc_prev, dh_skip, part, mask, zc, zh, gmask, B,  \
                        H);                                                                    \
  }                                                                                            \
  void host_ln_accumulate_##SFX(const T* part, T* dgain, T* dshift, T* dc_gain, T* dc_shift,  \
                                long long B, long long H) {                                    \
    ln_accumulate_loop<T>(part, dgain, dshift, dc_gain, dc_shift, B, H);                       \
  }

XLSTM_LN_SHIM(float, f32)
XLSTM_LN_SHIM(double, f64)

#define XLSTM_ADAM_SHIM(T, SFX)                                                               \
  void host_adam_step_##SFX(T* p, const T* g, T* m, T* v, T decay, T b1, T c1, T b2, T c2,      \
                            T bc2, T eps, T step, long long n) {                                \
    for (long long k = 0; k < n; ++k)                                                         \
      xlstm::adam_at<T>(k, p, g, m, v, decay, b1, c1, b2, c2, bc2, eps, step);                 \
  }

XLSTM_ADAM_SHIM(float, f32)
XLSTM_ADAM_SHIM(double, f64)

// grad_norm: the block's threads in order, then the same tree over their partial sums
#define XLSTM_CLIP_SHIM(T, SFX)                                                               \
  void host_grad_norm_##SFX(const T* g, long long n, double* total) {                         \
    double part[xlstm::NORM_THREADS];                                                         \
    for (int tid = 0; tid < xlstm::NORM_THREADS; ++tid)                                       \
      part[tid] = xlstm::sumsq_strided<T>(g, n, tid);                                         \
    for (int w = xlstm::NORM_THREADS / 2; w > 0; w >>= 1)                                     \
      for (int tid = 0; tid < w; ++tid) part[tid] = xlstm::add_rn(part[tid], part[tid + w]);  \
    total[0] = xlstm::sqrt_rn(part[0]);                                                       \
  }                                                                                           \
  void host_clip_by_norm_##SFX(T* g, long long n, const double* total, double max_norm) {     \
    const T s = (T)xlstm::clip_scale(total[0], max_norm);                                     \
    for (long long k = 0; k < n; ++k) g[k] = xlstm::mul_rn(g[k], s);                          \
  }

XLSTM_CLIP_SHIM(float, f32)
XLSTM_CLIP_SHIM(double, f64)

// softmax_xent: per row, the block's threads in order, then the kernel's trees
#define XLSTM_XENT_SHIM(T, SFX)                                                               \
  void host_softmax_xent_##SFX(const T* x, const long long* t, T* dx, T* nll, long long N,     \
                               long long V, T count) {                                        \
    T part[xlstm::XENT_THREADS];                                                              \
    for (long long r = 0; r < N; ++r) {                                                       \
      const T* xr = x + r * V;                                                                \
      T* dr = dx + r * V;                                                                     \
      for (int tid = 0; tid < xlstm::XENT_THREADS; ++tid)                                     \
        part[tid] = xlstm::xent_max_strided<T>(xr, V, tid);                                   \
      for (int w = xlstm::XENT_THREADS / 2; w > 0; w >>= 1)                                   \
        for (int tid = 0; tid < w; ++tid)                                                     \
          part[tid] = part[tid + w] > part[tid] ? part[tid + w] : part[tid];                  \
      const T mx = part[0];                                                                   \
      for (int tid = 0; tid < xlstm::XENT_THREADS; ++tid)                                     \
        part[tid] = xlstm::xent_sum_strided<T>(xr, dr, V, mx, tid);                           \
      for (int w = xlstm::XENT_THREADS / 2; w > 0; w >>= 1)                                   \
        for (int tid = 0; tid < w; ++tid) part[tid] = part[tid] + part[tid + w];              \
      const T z = part[0];                                                                    \
      for (int tid = 0; tid < xlstm::XENT_THREADS; ++tid)                                     \
        xlstm::xent_grad_strided<T>(dr, V, t[r], z, count, tid);                              \
      nll[r] = xlstm::xent_nll<T>(xr, V, t[r], mx, z);                                        \
    }                                                                                         \
  }

XLSTM_XENT_SHIM(float, f32)
XLSTM_XENT_SHIM(double, f64)

void host_f32_to_bf16(const float* x, unsigned short* y, long long n) {
  for (long long k = 0; k < n; ++k) y[k] = xlstm::f32_to_bf16_bits(x[k]);
}

}  // extern "C"
