// xlstm: fused CUDA kernels of one LSTM time step (forward and backward), float and double.
//
// Loaded at run time by xlstm/backends/cupy_backend.py with cupy.RawModule (NVRTC). The math
// lives in lstm_pointwise.cuh, shared with the host checks; this file only maps threads to
// elements. The kernels are extern "C" with the dtype in the name so that RawModule finds
// them by a plain name, without C++ name mangling or name_expressions.
//
// Launch: 1-D grid of 1-D blocks, any size; each thread handles elements n = b*H + j of the
// [B,H] step in a grid-stride loop, so the host may cap the grid (a few waves of blocks per SM)
// and the same launch works for any B*H. Within a warp consecutive threads take consecutive j,
// so every load and store of a gate block is coalesced.
//
// Optional inputs (mask, zc, zh, gmask) are null pointers when unused; the branch on them is
// uniform across the grid and costs nothing measurable next to the memory traffic.
#include "lstm_pointwise.cuh"
#include "precision.cuh"
#include "optim.cuh"
#include "xent.cuh"

namespace {

template <typename T>
__device__ __forceinline__ void lstm_forward_step_impl(
    T* __restrict__ z, const T* __restrict__ c_prev, const T* __restrict__ h_prev,
    T* __restrict__ c, T* __restrict__ h, T forget_bias,
    const T* __restrict__ mask, const T* __restrict__ zc, const T* __restrict__ zh,
    const T* __restrict__ gmask, xlstm::index_t B, xlstm::index_t H) {
  const xlstm::index_t total = B * H;
  const xlstm::index_t stride = (xlstm::index_t)gridDim.x * blockDim.x;
  for (xlstm::index_t n = (xlstm::index_t)blockIdx.x * blockDim.x + threadIdx.x; n < total;
       n += stride) {
    xlstm::forward_at<T>(n, H, z, c_prev, h_prev, c, h, forget_bias, mask, zc, zh, gmask);
  }
}

// No __restrict__ on dh_next/dc_next/dc_prev/dh_skip: the layer passes dc_prev == dc_next and
// dh_skip == dh_next (it updates its running gradients in place). Each element reads its own
// inputs before writing its own outputs (see backward_at), and no element touches another's.
template <typename T>
__device__ __forceinline__ void lstm_backward_step_impl(
    const T* __restrict__ gates, const T* __restrict__ c_prev, const T* __restrict__ dy,
    const T* dh_next, const T* dc_next, T* __restrict__ dz, T* dc_prev, T* dh_skip,
    const T* __restrict__ mask, const T* __restrict__ zc, const T* __restrict__ zh,
    const T* __restrict__ gmask, xlstm::index_t B, xlstm::index_t H) {
  const xlstm::index_t total = B * H;
  const xlstm::index_t stride = (xlstm::index_t)gridDim.x * blockDim.x;
  for (xlstm::index_t n = (xlstm::index_t)blockIdx.x * blockDim.x + threadIdx.x; n < total;
       n += stride) {
    xlstm::backward_at<T>(n, H, gates, c_prev, dy, dh_next, dc_next, dz, dc_prev, dh_skip,
                          mask, zc, zh, gmask);
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// lstm_forward_step_{f32,f64}: gate activations and state update of one time step.
//
//   z      [B,4H]  in: pre-activations x@W + h_prev@U + b, blocked i, f, g, o;
//                  out: post-activation gates i, f, g, o (g before dropout), for backward.
//   c_prev [B,H]   cell state of step t-1.
//   h_prev [B,H]   hidden state of step t-1.
//   c      [B,H]   out: cell state of step t (must not alias c_prev).
//   h      [B,H]   out: hidden state of step t (must not alias h_prev).
//   forget_bias    scalar of the array dtype, added to the forget pre-activation.
//   mask   [B]     or null: 1 inside the sequence, 0 past its end (state carried unchanged).
//   zc     [B,H]   or null: zoneout carry fraction of c (1 keeps c_prev).
//   zh     [B,H]   or null: zoneout carry fraction of h (1 keeps h_prev).
//   gmask  [B,H]   or null: recurrent-dropout multiplier of the candidate g.
//   B, H           batch size and hidden size.
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void lstm_forward_step_f32(
    float* z, const float* c_prev, const float* h_prev, float* c, float* h, float forget_bias,
    const float* mask, const float* zc, const float* zh, const float* gmask,
    long long B, long long H) {
  lstm_forward_step_impl<float>(z, c_prev, h_prev, c, h, forget_bias, mask, zc, zh, gmask, B, H);
}

extern "C" __global__ void lstm_forward_step_f64(
    double* z, const double* c_prev, const double* h_prev, double* c, double* h,
    double forget_bias, const double* mask, const double* zc, const double* zh,
    const double* gmask, long long B, long long H) {
  lstm_forward_step_impl<double>(z, c_prev, h_prev, c, h, forget_bias, mask, zc, zh, gmask, B, H);
}

// ---------------------------------------------------------------------------------------------
// lstm_backward_step_{f32,f64}: gate gradients of one time step (BPTT).
//
//   gates   [B,4H]  post-activation i, f, g, o stored by the forward step.
//   c_prev  [B,H]   cell state of step t-1.
//   dy      [B,H]   gradient of the loss w.r.t. the step's output (masked inside).
//   dh_next [B,H]   gradient w.r.t. h_t arriving from step t+1.
//   dc_next [B,H]   gradient w.r.t. c_t arriving from step t+1.
//   dz      [B,4H]  out: gradient w.r.t. the pre-activations, blocked i, f, g, o.
//   dc_prev [B,H]   out: gradient w.r.t. c_{t-1}; may alias dc_next.
//   dh_skip [B,H]   out: the part of dL/dh_{t-1} that bypasses the gates (kh * dh; the caller
//                   adds dz @ U^T); may alias dh_next.
//   mask [B], zc, zh, gmask [B,H], B, H: as in the forward step (null when unused).
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void lstm_backward_step_f32(
    const float* gates, const float* c_prev, const float* dy, const float* dh_next,
    const float* dc_next, float* dz, float* dc_prev, float* dh_skip,
    const float* mask, const float* zc, const float* zh, const float* gmask,
    long long B, long long H) {
  lstm_backward_step_impl<float>(gates, c_prev, dy, dh_next, dc_next, dz, dc_prev, dh_skip,
                                 mask, zc, zh, gmask, B, H);
}

extern "C" __global__ void lstm_backward_step_f64(
    const double* gates, const double* c_prev, const double* dy, const double* dh_next,
    const double* dc_next, double* dz, double* dc_prev, double* dh_skip,
    const double* mask, const double* zc, const double* zh, const double* gmask,
    long long B, long long H) {
  lstm_backward_step_impl<double>(gates, c_prev, dy, dh_next, dc_next, dz, dc_prev, dh_skip,
                                  mask, zc, zh, gmask, B, H);
}

// =============================================================================================
// LayerNorm LSTM step: one thread block per batch row (the row's layer-norm sums are block
// reductions), plus one column kernel that adds the rows' parameter-gradient contributions.
// =============================================================================================
namespace {

// The Rows policy of ln_forward_row / ln_backward_row for one thread block per row: thread t
// handles units j = t, t + blockDim.x, ...; sums are warp shuffles, then one warp over the
// per-warp partials in shared memory. blockDim.x must be a multiple of 32 (at most 1024).
// Each sum is deterministic for a given blockDim.
struct BlockRows {
  __device__ xlstm::index_t first() const { return threadIdx.x; }
  __device__ xlstm::index_t stride() const { return blockDim.x; }
  __device__ bool leader() const { return threadIdx.x == 0; }

  template <typename T, int N>
  __device__ void sum(T (&v)[N]) const {
    __shared__ T partial[N][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = (blockDim.x + 31) >> 5;
#pragma unroll
    for (int k = 0; k < N; ++k)
      for (int off = 16; off > 0; off >>= 1) v[k] += __shfl_down_sync(0xffffffffu, v[k], off);
    __syncthreads();  // the previous sum's readers are done with `partial`
    if (lane == 0)
      for (int k = 0; k < N; ++k) partial[k][warp] = v[k];
    __syncthreads();
    if (warp == 0) {
#pragma unroll
      for (int k = 0; k < N; ++k) {
        T x = lane < warps ? partial[k][lane] : T(0);
        for (int off = 16; off > 0; off >>= 1) x += __shfl_down_sync(0xffffffffu, x, off);
        if (lane == 0) partial[k][0] = x;
      }
    }
    __syncthreads();
    for (int k = 0; k < N; ++k) v[k] = partial[k][0];
  }
};

template <typename T>
__device__ __forceinline__ void ln_lstm_forward_step_impl(
    T* z, T* zhat, T* rstd, T* chat, T* rstd_c, const T* c_prev, const T* h_prev, T* c, T* h,
    const T* gain, const T* shift, const T* c_gain, const T* c_shift, T forget_bias, T eps,
    const T* mask, const T* zc, const T* zh, const T* gmask, xlstm::index_t B, xlstm::index_t H) {
  BlockRows r;
  for (xlstm::index_t b = blockIdx.x; b < B; b += gridDim.x)   // uniform per block
    xlstm::ln_forward_row<T>(r, b, H, z, zhat, rstd, chat, rstd_c, c_prev, h_prev, c, h, gain,
                             shift, c_gain, c_shift, forget_bias, eps, mask, zc, zh, gmask);
}

template <typename T>
__device__ __forceinline__ void ln_lstm_backward_step_impl(
    const T* gates, const T* zhat, const T* rstd, const T* chat, const T* rstd_c,
    const T* c_prev, const T* gain, const T* c_gain, const T* c_shift, const T* dy,
    const T* dh_next, const T* dc_next, T* dz, T* dc_prev, T* dh_skip, T* part,
    const T* mask, const T* zc, const T* zh, const T* gmask, xlstm::index_t B, xlstm::index_t H) {
  BlockRows r;
  for (xlstm::index_t b = blockIdx.x; b < B; b += gridDim.x)
    xlstm::ln_backward_row<T>(r, b, H, gates, zhat, rstd, chat, rstd_c, c_prev, gain, c_gain,
                              c_shift, dy, dh_next, dc_next, dz, dc_prev, dh_skip, part, mask,
                              zc, zh, gmask);
}

template <typename T>
__device__ __forceinline__ void ln_accumulate_impl(const T* part, T* dgain, T* dshift,
                                                   T* dc_gain, T* dc_shift, xlstm::index_t B,
                                                   xlstm::index_t H) {
  const xlstm::index_t total = 10 * H;
  const xlstm::index_t stride = (xlstm::index_t)gridDim.x * blockDim.x;
  for (xlstm::index_t n = (xlstm::index_t)blockIdx.x * blockDim.x + threadIdx.x; n < total;
       n += stride)
    xlstm::ln_accumulate_column<T>(n, B, H, part, dgain, dshift, dc_gain, dc_shift);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// ln_lstm_forward_step_{f32,f64}: one LayerNorm LSTM step forward. Launch: one block per row
// (grid.x <= B; extra rows are taken in a block-stride loop), blockDim.x a multiple of 32.
//
//   z [B,4H] in: x@W + h_prev@U (no bias); out: gates i, f, g, o.   zhat [B,4H] out.
//   rstd [B,4] out.   chat [B,H] out.   rstd_c [B] out.
//   c_prev, h_prev [B,H] in.   c, h [B,H] out (must not alias c_prev/h_prev).
//   gain, shift [4H];  c_gain, c_shift [H];  forget_bias, eps: scalars of the dtype.
//   mask [B], zc, zh, gmask [B,H]: or null.   B, H: sizes.
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void ln_lstm_forward_step_f32(
    float* z, float* zhat, float* rstd, float* chat, float* rstd_c, const float* c_prev,
    const float* h_prev, float* c, float* h, const float* gain, const float* shift,
    const float* c_gain, const float* c_shift, float forget_bias, float eps, const float* mask,
    const float* zc, const float* zh, const float* gmask, long long B, long long H) {
  ln_lstm_forward_step_impl<float>(z, zhat, rstd, chat, rstd_c, c_prev, h_prev, c, h, gain, shift,
                                   c_gain, c_shift, forget_bias, eps, mask, zc, zh, gmask, B, H);
}

extern "C" __global__ void ln_lstm_forward_step_f64(
    double* z, double* zhat, double* rstd, double* chat, double* rstd_c, const double* c_prev,
    const double* h_prev, double* c, double* h, const double* gain, const double* shift,
    const double* c_gain, const double* c_shift, double forget_bias, double eps,
    const double* mask, const double* zc, const double* zh, const double* gmask, long long B,
    long long H) {
  ln_lstm_forward_step_impl<double>(z, zhat, rstd, chat, rstd_c, c_prev, h_prev, c, h, gain,
                                    shift, c_gain, c_shift, forget_bias, eps, mask, zc, zh, gmask,
                                    B, H);
}

// ---------------------------------------------------------------------------------------------
// ln_lstm_backward_step_{f32,f64}: one LayerNorm LSTM step backward, per row (launch as the
// forward). Follow it with ln_accumulate_{f32,f64} to add `part` into the parameter gradients.
//
//   gates, zhat [B,4H], rstd [B,4], chat [B,H], rstd_c [B]: stored by the forward step.
//   c_prev [B,H].   gain [4H], c_gain, c_shift [H].
//   dy, dh_next, dc_next [B,H] in.   dz [B,4H] out.
//   dc_prev [B,H] out (may alias dc_next).   dh_skip [B,H] out (may alias dh_next).
//   part [B,10H] out: per-row gradient contributions (see ln_backward_row).
//   mask [B], zc, zh, gmask [B,H]: or null.   B, H: sizes.
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void ln_lstm_backward_step_f32(
    const float* gates, const float* zhat, const float* rstd, const float* chat,
    const float* rstd_c, const float* c_prev, const float* gain, const float* c_gain,
    const float* c_shift, const float* dy, const float* dh_next, const float* dc_next, float* dz,
    float* dc_prev, float* dh_skip, float* part, const float* mask, const float* zc,
    const float* zh, const float* gmask, long long B, long long H) {
  ln_lstm_backward_step_impl<float>(gates, zhat, rstd, chat, rstd_c, c_prev, gain, c_gain, c_shift,
                                    dy, dh_next, dc_next, dz, dc_prev, dh_skip, part, mask, zc, zh,
                                    gmask, B, H);
}

extern "C" __global__ void ln_lstm_backward_step_f64(
    const double* gates, const double* zhat, const double* rstd, const double* chat,
    const double* rstd_c, const double* c_prev, const double* gain, const double* c_gain,
    const double* c_shift, const double* dy, const double* dh_next, const double* dc_next,
    double* dz, double* dc_prev, double* dh_skip, double* part, const double* mask,
    const double* zc, const double* zh, const double* gmask, long long B, long long H) {
  ln_lstm_backward_step_impl<double>(gates, zhat, rstd, chat, rstd_c, c_prev, gain, c_gain,
                                     c_shift, dy, dh_next, dc_next, dz, dc_prev, dh_skip, part,
                                     mask, zc, zh, gmask, B, H);
}

// ---------------------------------------------------------------------------------------------
// ln_accumulate_{f32,f64}: dgain [4H], dshift [4H], dc_gain [H], dc_shift [H] += the column
// sums of part [B,10H] over its B rows. One thread per column (grid-stride), coalesced reads.
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void ln_accumulate_f32(const float* part, float* dgain, float* dshift,
                                             float* dc_gain, float* dc_shift, long long B,
                                             long long H) {
  ln_accumulate_impl<float>(part, dgain, dshift, dc_gain, dc_shift, B, H);
}

extern "C" __global__ void ln_accumulate_f64(const double* part, double* dgain, double* dshift,
                                             double* dc_gain, double* dc_shift, long long B,
                                             long long H) {
  ln_accumulate_impl<double>(part, dgain, dshift, dc_gain, dc_shift, B, H);
}

// ---------------------------------------------------------------------------------------------
// f32_to_bf16: y = bfloat16(x), round to nearest even (precision.cuh), element by element.
// The bf16 GEMM operands of cublasGemmEx (precision="bf16"; xlstm/backends/cupy_gemm.py).
//
//   x  [n]  float32 in (any contiguous buffer: a C-contiguous operand or a transposed one).
//   y  [n]  out: the bfloat16 bits (uint16), same element order as x.
//   n       number of elements.
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void f32_to_bf16(const float* __restrict__ x, unsigned short* __restrict__ y,
                                       long long n) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < n; k += stride)
    y[k] = xlstm::f32_to_bf16_bits(x[k]);
}

// ---------------------------------------------------------------------------------------------
// adam_step_{f32,f64}: one Adam/AdamW step of every parameter at once (a multi-tensor update):
// the parameters, gradients and both moments are flat buffers of n elements in the same order
// (xlstm/optim.py: Adam over the flat buffers of xlstm/flat.py). Math and rounding: optim.cuh.
//
//   p      [n]  in/out: parameters.        g  [n]  gradients (after clipping).
//   m      [n]  in/out: first moment.      v  [n]  in/out: second moment.
//   decay       1 - lr*wd (AdamW; 1 without weight decay).
//   b1, c1      beta1 and 1 - beta1.       b2, c2   beta2 and 1 - beta2.
//   bc2         sqrt(1 - beta2^t).         eps      Adam's epsilon.
//   step        lr / (1 - beta1^t).        n        number of elements.
// ---------------------------------------------------------------------------------------------
namespace {
template <typename T>
__device__ __forceinline__ void adam_step_impl(T* p, const T* g, T* m, T* v, T decay, T b1, T c1,
                                               T b2, T c2, T bc2, T eps, T step, long long n) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < n; k += stride)
    xlstm::adam_at<T>(k, p, g, m, v, decay, b1, c1, b2, c2, bc2, eps, step);
}
}  // namespace

extern "C" __global__ void adam_step_f32(float* p, const float* g, float* m, float* v, float decay,
                                         float b1, float c1, float b2, float c2, float bc2,
                                         float eps, float step, long long n) {
  adam_step_impl<float>(p, g, m, v, decay, b1, c1, b2, c2, bc2, eps, step, n);
}

extern "C" __global__ void adam_step_f64(double* p, const double* g, double* m, double* v,
                                         double decay, double b1, double c1, double b2, double c2,
                                         double bc2, double eps, double step, long long n) {
  adam_step_impl<double>(p, g, m, v, decay, b1, c1, b2, c2, bc2, eps, step, n);
}

// ---------------------------------------------------------------------------------------------
// grad_norm_{f32,f64}: total = sqrt(sum of g^2) over the flat gradient buffer, in double, in a
// fixed order (optim.cuh). Launch: ONE block of xlstm::NORM_THREADS (256) threads.
//
//   g      [n]  gradients.            n       number of elements.
//   total  [1]  out: the global L2 norm (double), read by clip_by_norm and, later, the log.
// ---------------------------------------------------------------------------------------------
namespace {
template <typename T>
__device__ __forceinline__ void grad_norm_impl(const T* g, long long n, double* total) {
  __shared__ double part[xlstm::NORM_THREADS];
  const int tid = threadIdx.x;
  part[tid] = xlstm::sumsq_strided<T>(g, n, tid);
  __syncthreads();
  for (int w = xlstm::NORM_THREADS / 2; w > 0; w >>= 1) {
    if (tid < w) part[tid] = xlstm::add_rn(part[tid], part[tid + w]);
    __syncthreads();
  }
  if (tid == 0) total[0] = xlstm::sqrt_rn(part[0]);
}

template <typename T>
__device__ __forceinline__ void clip_by_norm_impl(T* g, long long n, const double* total,
                                                  double max_norm) {
  const T s = (T)xlstm::clip_scale(total[0], max_norm);
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < n; k += stride)
    g[k] = xlstm::mul_rn(g[k], s);
}
}  // namespace

extern "C" __global__ void grad_norm_f32(const float* g, long long n, double* total) {
  grad_norm_impl<float>(g, n, total);
}

extern "C" __global__ void grad_norm_f64(const double* g, long long n, double* total) {
  grad_norm_impl<double>(g, n, total);
}

// ---------------------------------------------------------------------------------------------
// clip_by_norm_{f32,f64}: g *= clip_scale(total, max_norm) rounded to T (optim.cuh), so the
// clipped norm is max_norm; a norm at most max_norm, NaN or infinite leaves g unchanged.
//
//   g         [n]  in/out: gradients.      n  number of elements.
//   total     [1]  the norm from grad_norm (double, on the device: no host read).
//   max_norm       the clipping threshold.
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void clip_by_norm_f32(float* g, long long n, const double* total,
                                            double max_norm) {
  clip_by_norm_impl<float>(g, n, total, max_norm);
}

extern "C" __global__ void clip_by_norm_f64(double* g, long long n, const double* total,
                                            double max_norm) {
  clip_by_norm_impl<double>(g, n, total, max_norm);
}

// ---------------------------------------------------------------------------------------------
// softmax_xent_{f32,f64}: softmax cross-entropy and its gradient, one block of
// xlstm::XENT_THREADS (256) threads per row (grid-stride over rows). Math: xent.cuh.
//
//   x      [N,V]  logits (C-contiguous).       t    [N]  target class ids (int64).
//   dx     [N,V]  out: (softmax(x) - onehot(t)) / count.
//   nll    [N]    out: -log softmax(x)[t] per row (the loss is their sum / count).
//   N, V          rows and classes.            count     the mean's divisor (N without a mask).
// ---------------------------------------------------------------------------------------------
namespace {
template <typename T>
__device__ __forceinline__ void softmax_xent_impl(const T* x, const long long* t, T* dx, T* nll,
                                                  long long N, long long V, T count) {
  __shared__ T part[xlstm::XENT_THREADS];
  const int tid = threadIdx.x;
  for (long long r = blockIdx.x; r < N; r += gridDim.x) {
    const T* xr = x + r * V;
    T* dr = dx + r * V;
    part[tid] = xlstm::xent_max_strided<T>(xr, V, tid);
    __syncthreads();
    for (int w = xlstm::XENT_THREADS / 2; w > 0; w >>= 1) {
      if (tid < w) part[tid] = part[tid + w] > part[tid] ? part[tid + w] : part[tid];
      __syncthreads();
    }
    const T mx = part[0];
    __syncthreads();
    part[tid] = xlstm::xent_sum_strided<T>(xr, dr, V, mx, tid);
    __syncthreads();
    for (int w = xlstm::XENT_THREADS / 2; w > 0; w >>= 1) {
      if (tid < w) part[tid] = part[tid] + part[tid + w];
      __syncthreads();
    }
    const T z = part[0];
    xlstm::xent_grad_strided<T>(dr, V, t[r], z, count, tid);
    if (tid == 0) nll[r] = xlstm::xent_nll<T>(xr, V, t[r], mx, z);
    __syncthreads();    // part is reused by the next row
  }
}
}  // namespace

extern "C" __global__ void softmax_xent_f32(const float* logits, const long long* targets,
                                            float* dx, float* nll, long long N, long long V,
                                            float count) {
  softmax_xent_impl<float>(logits, targets, dx, nll, N, V, count);
}

extern "C" __global__ void softmax_xent_f64(const double* logits, const long long* targets,
                                            double* dx, double* nll, long long N, long long V,
                                            double count) {
  softmax_xent_impl<double>(logits, targets, dx, nll, N, V, count);
}
