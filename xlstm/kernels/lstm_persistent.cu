// xlstm: persistent LSTM kernels, all T steps of one layer-direction in one cooperative launch.
//
// The block/step schedule and its shared-memory layout are documented in lstm_persistent.cuh,
// whose phase functions these kernels call; here only the loop over steps and the barriers.
// Loaded by xlstm/backends/cupy_backend.py as its own cupy.RawModule with
// enable_cooperative_groups=True, so the launch is cuLaunchCooperativeKernel: the driver runs
// it only if all NB blocks are co-resident (the backend checks occupancy itself first and
// refuses a grid that does not fit, because CuPy shrinks an oversized cooperative grid).
//
// The grid barrier is written here rather than taken from <cooperative_groups.h>: NVRTC has no
// include path to the toolkit's headers in CI or in a pip-only install, and the algorithm is
// the one of cooperative_groups' grid sync (below). It needs a zeroed unsigned int in global
// memory per launch (`barrier`), and only thread 0 of each block touches it.
//
// Launch: grid (NB), block (nt), dynamic shared memory persistent_smem_elems(...) * sizeof(T)
// bytes (above 48 KB the backend raises the kernel's max-dynamic-shared-size attribute).
#include "lstm_persistent.cuh"

namespace {

// Grid-wide barrier for co-resident blocks. Block 0 adds 0x80000000 - (NB-1), the others 1, so
// one round adds exactly 2^31: bit 31 flips when the last block arrives, and the low bits are
// back to 0 for the next round. The fences order each block's global writes before its arrival
// and the other blocks' reads after the barrier.
//
// A wait longer than BARRIER_TIMEOUT_NS means a block that never arrives (a grid that is not
// co-resident, or a bug): the kernel traps, so the launch fails with an error instead of
// hanging the process and the GPU. A step takes microseconds, so 10 s is never a real wait.
#define BARRIER_TIMEOUT_NS 10000000000ull

__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ void grid_barrier(unsigned int* barrier) {
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned int add = blockIdx.x == 0 ? 0x80000000u - (gridDim.x - 1u) : 1u;
    __threadfence();
    const unsigned int old = atomicAdd(barrier, add);
    const unsigned long long start = global_ns();
    while (((old ^ *(volatile unsigned int*)barrier) & 0x80000000u) == 0u) {
      if (global_ns() - start > BARRIER_TIMEOUT_NS) __trap();
    }
    __threadfence();
  }
  __syncthreads();
}

template <typename T>
__device__ __forceinline__ T* shared_elems() {
  extern __shared__ __align__(16) unsigned char xlstm_persistent_smem[];
  return reinterpret_cast<T*>(xlstm_persistent_smem);
}

template <typename T>
__device__ __forceinline__ void persistent_forward_impl(const xlstm::PersistentArgs<T>& a,
                                                        unsigned int* barrier) {
  T* smem = shared_elems<T>();
  const xlstm::index_t k = blockIdx.x, tid = threadIdx.x, nt = blockDim.x;
  xlstm::persistent_forward_load<T>(a, k, tid, nt, smem);
  __syncthreads();
  for (xlstm::index_t t = 0; t < a.steps; ++t) {
    if (t > 0) grid_barrier(barrier);   // h_{t-1} of every block is written
    xlstm::persistent_forward_partial<T>(a, t, k, tid, nt, smem);
    __syncthreads();
    xlstm::persistent_forward_pointwise<T>(a, t, k, tid, nt, smem);
  }
}

template <typename T>
__device__ __forceinline__ void persistent_backward_impl(const xlstm::PersistentArgs<T>& a,
                                                         unsigned int* barrier) {
  T* smem = shared_elems<T>();
  const xlstm::index_t k = blockIdx.x, tid = threadIdx.x, nt = blockDim.x;
  xlstm::persistent_backward_load<T>(a, k, tid, nt, smem);
  __syncthreads();
  for (xlstm::index_t t = a.steps - 1; t >= 0; --t) {
    if (t < a.steps - 1) {
      grid_barrier(barrier);            // dz[t+1] of every block is written
      xlstm::persistent_backward_partial<T>(a, t + 1, k, tid, nt, smem);
      __syncthreads();
    }
    xlstm::persistent_backward_pointwise<T>(a, t, k, tid, nt, smem);
  }
  grid_barrier(barrier);                // dz[0] of every block is written
  xlstm::persistent_backward_partial<T>(a, 0, k, tid, nt, smem);
  __syncthreads();
  xlstm::persistent_backward_finish<T>(a, k, tid, nt, smem);
}

template <typename T>
__device__ __forceinline__ xlstm::PersistentArgs<T> make_args(
    T* gates, T* hs, T* cs, const T* W, const T* dy, T* dh, T* dc, T* dz, T forget_bias,
    const T* mask, const T* zc, const T* zh, const T* gmask, long long steps, long long B,
    long long H, long long KS) {
  xlstm::PersistentArgs<T> a;
  a.gates = gates; a.hs = hs; a.cs = cs; a.W = W; a.dy = dy; a.dh = dh; a.dc = dc; a.dz = dz;
  a.forget_bias = forget_bias;
  a.mask = mask; a.zc = zc; a.zh = zh; a.gmask = gmask;
  a.steps = steps; a.B = B; a.H = H; a.NB = gridDim.x; a.KS = KS;
  return a;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// lstm_persistent_forward_{f32,f64}: the plain LSTM forward over all T steps.
//
//   gates  [T,B,4H]  in: x@W + b for every step (the layer's input GEMM), blocked i, f, g, o;
//                    out: post-activation gates i, f, g, o (g before dropout), for backward.
//   hs     [T+1,B,H] in: hs[0] = h0; out: hs[1..T], the hidden state after each step.
//   cs     [T+1,B,H] in: cs[0] = c0; out: cs[1..T].
//   U      [H,4H]    recurrent weights.
//   forget_bias      scalar of the dtype.
//   mask   [T,B]     or null: 1 inside the sequence, 0 past its end.
//   zc, zh [T,B,H]   or null: zoneout carry fractions of c and h.
//   gmask  [T,B,H]   or null: recurrent-dropout multiplier of the candidate g.
//   barrier [1]      a zeroed unsigned int (the grid barrier's counter).
//   T, B, H          sizes; KS the K-split (threads per unit dot product), >= 1.
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(512, 1) lstm_persistent_forward_f32(
    float* gates, float* hs, float* cs, const float* U, float forget_bias, const float* mask,
    const float* zc, const float* zh, const float* gmask, unsigned int* barrier, long long T,
    long long B, long long H, long long KS) {
  persistent_forward_impl<float>(
      make_args<float>(gates, hs, cs, U, nullptr, nullptr, nullptr, nullptr, forget_bias, mask,
                       zc, zh, gmask, T, B, H, KS), barrier);
}

extern "C" __global__ void __launch_bounds__(512, 1) lstm_persistent_forward_f64(
    double* gates, double* hs, double* cs, const double* U, double forget_bias,
    const double* mask, const double* zc, const double* zh, const double* gmask,
    unsigned int* barrier, long long T, long long B, long long H, long long KS) {
  persistent_forward_impl<double>(
      make_args<double>(gates, hs, cs, U, nullptr, nullptr, nullptr, nullptr, forget_bias, mask,
                        zc, zh, gmask, T, B, H, KS), barrier);
}

// ---------------------------------------------------------------------------------------------
// lstm_persistent_backward_{f32,f64}: BPTT of the pointwise steps and the recurrent products
// over all T steps (what Backend.lstm_backward_sequence computes).
//
//   gates  [T,B,4H]  post-activation i, f, g, o of every step.
//   cs     [T+1,B,H] cell states (cs[0] the initial one).
//   dy     [T,B,H]   gradient w.r.t. each step's output (masked inside).
//   dh     [B,H]     in: dL/dh_T (dh_n); out: dL/dh_0 (dh0).
//   dc     [B,H]     in: dc_n; out: dc0.
//   dz     [T,B,4H]  out: gradient w.r.t. the pre-activations of every step.
//   UT     [4H,H]    U^T, contiguous.
//   mask [T,B], zc, zh, gmask [T,B,H]: or null, as the forward.   barrier [1]: zeroed.
//   T, B, H, KS      as the forward.
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(512, 1) lstm_persistent_backward_f32(
    const float* gates, const float* cs, const float* dy, float* dh, float* dc, float* dz,
    const float* UT, const float* mask, const float* zc, const float* zh, const float* gmask,
    unsigned int* barrier, long long T, long long B, long long H, long long KS) {
  persistent_backward_impl<float>(
      make_args<float>(const_cast<float*>(gates), nullptr, const_cast<float*>(cs), UT, dy, dh,
                       dc, dz, 0.0f, mask, zc, zh, gmask, T, B, H, KS), barrier);
}

extern "C" __global__ void __launch_bounds__(512, 1) lstm_persistent_backward_f64(
    const double* gates, const double* cs, const double* dy, double* dh, double* dc,
    double* dz, const double* UT, const double* mask, const double* zc, const double* zh,
    const double* gmask, unsigned int* barrier, long long T, long long B, long long H,
    long long KS) {
  persistent_backward_impl<double>(
      make_args<double>(const_cast<double*>(gates), nullptr, const_cast<double*>(cs), UT, dy,
                        dh, dc, dz, 0.0, mask, zc, zh, gmask, T, B, H, KS), barrier);
}
