// Host build of xlstm/kernels/lstm_pointwise.cuh for tests/test_kernels_host.py.
//
// Compiled by g++ (-O2 -shared -fPIC, no fast-math) and loaded with ctypes. For every kernel K
// of lstm_kernels.cu, host_K has K's exact parameter list and computes what one launch of K
// computes: the kernels' per-element code (forward_at / backward_at) over all n = b*H + j, the
// LayerNorm row code over all rows with one serial worker per row, the column sums over all
// columns. So CI checks the CUDA math, indexing and nullptr handling against the NumPy backend
// without a GPU, and tests/test_cupy_backend.py can run CupyBackend's launches on the host.
// Arguments and shapes: as the kernels in lstm_kernels.cu (null pointers for unused masks).
#include "lstm_pointwise.cuh"
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

}  // namespace

extern "C" {

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

void host_f32_to_bf16(const float* x, unsigned short* y, long long n) {
  for (long long k = 0; k < n; ++k) y[k] = xlstm::f32_to_bf16_bits(x[k]);
}

}  // extern "C"
