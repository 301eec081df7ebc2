// xlstm: softmax cross-entropy of one row of logits, for the kernel softmax_xent.
//
// The NumPy reference (xlstm/losses.py, cross_entropy without a mask), row by row:
//   s = x - max(x);  e = exp(s);  z = sum(e);  nll = log(z) - s[t]
//   dx = e / z;  dx[t] -= 1;  dx /= count        (count: the number of rows of the mean)
// A row is shared by the XENT_THREADS threads of one block: thread tid takes the columns
// tid, tid + XENT_THREADS, ...; their partial maxima and sums are combined by a fixed tree
// (pairs w apart, w = XENT_THREADS/2 ... 1), so the sum's order, and its bits, are fixed.
// exp and log are the accurate ones of the device (no fast math) and of the host, so the two
// agree with NumPy to rounding, not bit for bit.
#pragma once

#include "lstm_pointwise.cuh"

namespace xlstm {

constexpr int XENT_THREADS = 256;

// exp and log in the precision of T, as tanh_t (lstm_pointwise.cuh)
XLSTM_MATH_T(exp_t, expf, exp)
XLSTM_MATH_T(log_t, logf, log)

// thread tid's maximum over its columns (x[0] stands in for a thread without columns: it is
// in the row, so the row's maximum is unchanged)
template <typename T>
XLSTM_HD T xent_max_strided(const T* x, index_t V, int tid) {
  T m = x[0];
  for (index_t v = tid; v < V; v += XENT_THREADS) m = x[v] > m ? x[v] : m;
  return m;
}

// thread tid's sum of e = exp(x - mx) over its columns; e is stored in dx for the gradient
template <typename T>
XLSTM_HD T xent_sum_strided(const T* x, T* dx, index_t V, T mx, int tid) {
  T s = T(0);
  for (index_t v = tid; v < V; v += XENT_THREADS) {
    const T e = exp_t(x[v] - mx);
    dx[v] = e;
    s = s + e;
  }
  return s;
}

// the gradient of thread tid's columns, from e (in dx) and the row's sum z
template <typename T>
XLSTM_HD void xent_grad_strided(T* dx, index_t V, index_t t, T z, T count, int tid) {
  for (index_t v = tid; v < V; v += XENT_THREADS) {
    T d = dx[v] / z;
    if (v == t) d = d - T(1);
    dx[v] = d / count;
  }
}

// -log softmax at the target; NaN for a target outside [0, V) (never read out of bounds: the
// range check of the targets reports it)
template <typename T>
XLSTM_HD T xent_nll(const T* x, index_t V, index_t t, T mx, T z) {
  if (t < 0 || t >= V) return T(0) / T(0);
  return log_t(z) - (x[t] - mx);
}

}  // namespace xlstm
