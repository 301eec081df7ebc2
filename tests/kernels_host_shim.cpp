// Host build of xlstm/kernels/lstm_pointwise.cuh for tests/test_kernels_host.py.
//
// Compiled by g++ (-O2 -shared -fPIC, no fast-math) and loaded with ctypes. Each function runs
// the kernels' per-element code (forward_at / backward_at) over all n = b*H + j, i.e. exactly
// what one launch of lstm_{forward,backward}_step_{f32,f64} computes, so CI checks the CUDA
// math, indexing and nullptr handling against the NumPy backend without a GPU.
// Arguments and shapes: as the kernels in lstm_kernels.cu (null pointers for unused masks).
#include "lstm_pointwise.cuh"

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

}  // extern "C"
