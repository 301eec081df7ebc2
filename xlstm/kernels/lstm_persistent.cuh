// xlstm: the per-block, per-step work of the persistent LSTM kernels (lstm_persistent.cu).
//
// A persistent kernel runs all T steps of one layer-direction in one launch. The grid has NB
// co-resident blocks; block k owns the hidden units [j0, j1) = [k*H/NB, (k+1)*H/NB) (at most
// hs_max = ceil(H/NB) units; H need not divide by NB) and keeps the part of U those units need
// in shared memory for all steps. Per step the block runs two phases separated by a block
// barrier, and the steps are separated by one grid-wide barrier:
//
//   forward step t    partial:   part[u][g][r] = sum_{k = r, r+KS, ...} h_{t-1}[b,k] U[k, gH+j]
//                     pointwise: z_g = gates[t][b, gH+j] + sum_r part[u][g][r]; forward_element
//   backward step t   partial:   part[u][r] = sum_{c = r, r+KS, ...} dz_{t+1}[b,c] U[j,c]
//                     pointwise: dh_next = dh_skip(t+1) + sum_r part[u][r]; backward_element
//   (after step 0 one more partial and dh0 = dh_skip(0) + sum_r part: the finish phase)
//
// for the units u = (b, jj) of the block, j = j0 + jj, g the gate (i, f, g, o). Each sum is
// taken by one thread in a fixed order (no atomics), so a launch is bitwise repeatable. KS
// threads share one unit's dot product (the K-split); their partial sums meet in shared memory.
//
// Every phase is a __host__ __device__ function of (block k, thread tid of nt, shared memory),
// so tests/support/kernels_host_shim.cpp runs the very same code on the CPU in the kernel's schedule
// (for each step: for each block: all threads' partial, then all threads' pointwise), and the
// host checks prove the indexing of the tiling without a GPU. Within a phase no thread reads
// what another thread of the same phase writes; that is what makes the barriers sufficient.
//
// Shared memory of a block (elements of T; see persistent_smem_elems):
//   forward   Us [4*hs_max][H+1]   Us[(g*hs + jj)*(H+1) + k] = U[k, g*H + j0 + jj]
//             part [B*hs_max][4][KS]
//   backward  Ur [hs_max][4H+1]    Ur[jj*(4H+1) + c] = U[j0 + jj, c] = UT[c, j0 + jj]
//             part [B*hs_max][KS]
// Rows are padded by one element so that the KS threads of consecutive units read different
// banks. Layout of the global arrays: as lstm_kernels.cu, time-major, C-contiguous.
#pragma once

#include "lstm_pointwise.cuh"

namespace xlstm {

// Batch rows per work item of the partial phases (register blocking: one shared-memory read
// of U serves this many rows). The launch plan (xlstm/backends/persistent.py) sizes KS by it.
#define PERSIST_RB 4

// Row groups of PERSIST_RB rows covering B rows.
XLSTM_HD index_t persistent_row_groups(index_t B) { return (B + PERSIST_RB - 1) / PERSIST_RB; }

// Rows of row group bg: p[q] = base + b*stride for b = bg*PERSIST_RB + q, rows past B pointing
// at row B-1 (read, never written, so every work item runs the same unrolled loop).
template <typename T>
XLSTM_HD void row_group_rows(const T* base, index_t bg, index_t B, index_t stride,
                             const T* (&p)[PERSIST_RB]) {
  for (int q = 0; q < PERSIST_RB; ++q) {
    const index_t b = bg * PERSIST_RB + q;
    p[q] = base + (b < B ? b : B - 1) * stride;
  }
}

// First unit of block k when H units are split over NB blocks (k = NB gives H).
XLSTM_HD index_t unit_begin(index_t k, index_t H, index_t NB) { return k * H / NB; }

// Elements of T of a block's shared memory (forward: backward = 0; backward: backward = 1).
XLSTM_HD index_t persistent_smem_elems(int backward, index_t B, index_t H, index_t NB, index_t KS) {
  const index_t hs = (H + NB - 1) / NB;
  return backward ? hs * (4 * H + 1) + B * hs * KS : 4 * hs * (H + 1) + B * hs * 4 * KS;
}

// Arguments of one persistent launch (forward or backward), as the kernels receive them.
//   gates [T,B,4H]  forward: in x@W+b, out post-activation gates; backward: in the gates.
//   hs, cs [T+1,B,H] forward: in hs[0], cs[0], out the rest; backward: cs in (hs unused).
//   U [H,4H] (forward) or UT [4H,H] (backward, U^T contiguous): the recurrent weights.
//   dy [T,B,H], dh, dc [B,H] (in dh_n, dc_n; out dh0, dc0), dz [T,B,4H] out: backward only.
//   mask [T,B], zc, zh, gmask [T,B,H]: or null (as the per-step kernels, one slice per step).
template <typename T>
struct PersistentArgs {
  T* gates;
  T* hs;
  T* cs;
  const T* W;        // U (forward) or UT (backward)
  const T* dy;
  T* dh;
  T* dc;
  T* dz;
  T forget_bias;
  const T* mask;
  const T* zc;
  const T* zh;
  const T* gmask;
  index_t steps, B, H, NB, KS;
};

// The block's slice of units: [j0, j0 + n).
struct UnitSlice {
  index_t j0, n, hs_max;
};

XLSTM_HD UnitSlice unit_slice(index_t k, index_t H, index_t NB) {
  UnitSlice s;
  s.j0 = unit_begin(k, H, NB);
  s.n = unit_begin(k + 1, H, NB) - s.j0;
  s.hs_max = (H + NB - 1) / NB;
  return s;
}

// ---------------------------------------------------------------------------------------------
// Forward phases
// ---------------------------------------------------------------------------------------------

// Once per launch: the block's gate columns of U into Us (coalesced along the rows of U).
template <typename T>
XLSTM_HD void persistent_forward_load(const PersistentArgs<T>& a, index_t k, index_t tid,
                                      index_t nt, T* smem) {
  const UnitSlice s = unit_slice(k, a.H, a.NB);
  const index_t H = a.H, ncol = 4 * s.n;
  for (index_t idx = tid; idx < H * ncol; idx += nt) {
    const index_t kk = idx / ncol, col = idx - kk * ncol;   // col = g*n + jj
    const index_t g = col / s.n, jj = col - g * s.n;
    smem[(g * s.hs_max + jj) * (H + 1) + kk] = a.W[kk * 4 * H + g * H + s.j0 + jj];
  }
}

// Step t, phase 1: the K-split partial products h_{t-1} @ U for the block's units. A work item
// is (row group, unit jj, split r): PERSIST_RB batch rows at once, so each U value read from
// shared memory serves PERSIST_RB rows (rows past B repeat row B-1 and are not written).
template <typename T>
XLSTM_HD void persistent_forward_partial(const PersistentArgs<T>& a, index_t t, index_t k,
                                         index_t tid, index_t nt, T* smem) {
  const UnitSlice s = unit_slice(k, a.H, a.NB);
  const index_t B = a.B, H = a.H, KS = a.KS, ld = H + 1;
  const T* h_prev = a.hs + t * B * H;
  T* part = smem + 4 * s.hs_max * ld;
  for (index_t w = tid; w < persistent_row_groups(B) * s.n * KS; w += nt) {
    const index_t u = w / KS, r = w - u * KS;
    const index_t bg = u / s.n, jj = u - bg * s.n;
    const T* hr[PERSIST_RB];
    row_group_rows(h_prev, bg, B, H, hr);
    const T* u0 = smem + jj * ld;                      // gate g's column at u0 + g*hs_max*ld
    const index_t gs = s.hs_max * ld;
    T acc[PERSIST_RB][4];
    for (int q = 0; q < PERSIST_RB; ++q)
      for (int g = 0; g < 4; ++g) acc[q][g] = T(0);
    for (index_t kk = r; kk < H; kk += KS) {
      const T w0 = u0[kk], w1 = u0[gs + kk], w2 = u0[2 * gs + kk], w3 = u0[3 * gs + kk];
      for (int q = 0; q < PERSIST_RB; ++q) {
        const T hk = hr[q][kk];
        acc[q][0] += hk * w0;
        acc[q][1] += hk * w1;
        acc[q][2] += hk * w2;
        acc[q][3] += hk * w3;
      }
    }
    for (int q = 0; q < PERSIST_RB; ++q) {
      const index_t b = bg * PERSIST_RB + q;
      if (b < B)
        for (int g = 0; g < 4; ++g) part[((b * s.hs_max + jj) * 4 + g) * KS + r] = acc[q][g];
    }
  }
}

// Step t, phase 2: z = x@W + b + h_{t-1}@U and the pointwise step for the block's units.
template <typename T>
XLSTM_HD void persistent_forward_pointwise(const PersistentArgs<T>& a, index_t t, index_t k,
                                           index_t tid, index_t nt, const T* smem) {
  const UnitSlice s = unit_slice(k, a.H, a.NB);
  const index_t B = a.B, H = a.H, KS = a.KS;
  const T* part = smem + 4 * s.hs_max * (H + 1);
  T* z = a.gates + t * B * 4 * H;
  const T* c_prev = a.cs + t * B * H;
  const T* h_prev = a.hs + t * B * H;
  T* c = a.cs + (t + 1) * B * H;
  T* h = a.hs + (t + 1) * B * H;
  for (index_t u = tid; u < B * s.n; u += nt) {
    const index_t b = u / s.n, jj = u - b * s.n, j = s.j0 + jj;
    const index_t n = b * H + j, tn = t * B * H + n;
    T* zr = z + b * 4 * H + j;
    T zg[4];
    for (int g = 0; g < 4; ++g) {
      const T* p = part + ((b * s.hs_max + jj) * 4 + g) * KS;
      T rec = T(0);
      for (index_t r = 0; r < KS; ++r) rec += p[r];
      zg[g] = zr[g * H] + rec;
    }
    T gi, gf, gg, go;
    forward_element<T>(zg[0], zg[1], zg[2], zg[3], c_prev[n], h_prev[n], a.forget_bias,
                       load_or(a.mask, t * B + b, T(1)), load_or(a.zc, tn, T(0)),
                       load_or(a.zh, tn, T(0)), load_or(a.gmask, tn, T(1)),
                       gi, gf, gg, go, c[n], h[n]);
    zr[0] = gi;
    zr[H] = gf;
    zr[2 * H] = gg;
    zr[3 * H] = go;
  }
}

// ---------------------------------------------------------------------------------------------
// Backward phases
// ---------------------------------------------------------------------------------------------

// Once per launch: the block's rows of U (columns of UT) into Ur.
template <typename T>
XLSTM_HD void persistent_backward_load(const PersistentArgs<T>& a, index_t k, index_t tid,
                                       index_t nt, T* smem) {
  const UnitSlice s = unit_slice(k, a.H, a.NB);
  const index_t H = a.H;
  for (index_t idx = tid; idx < 4 * H * s.n; idx += nt) {
    const index_t c = idx / s.n, jj = idx - c * s.n;
    smem[jj * (4 * H + 1) + c] = a.W[c * H + s.j0 + jj];
  }
}

// Phase 1 of step t (t < T-1) and of the finish: partial products dz[src] @ U^T for the units,
// work items (row group, unit jj, split r) as the forward's, so each U value serves PERSIST_RB rows.
template <typename T>
XLSTM_HD void persistent_backward_partial(const PersistentArgs<T>& a, index_t src, index_t k,
                                          index_t tid, index_t nt, T* smem) {
  const UnitSlice s = unit_slice(k, a.H, a.NB);
  const index_t B = a.B, H4 = 4 * a.H, KS = a.KS, ld = H4 + 1;
  const T* dzs = a.dz + src * B * H4;
  T* part = smem + s.hs_max * ld;
  for (index_t w = tid; w < persistent_row_groups(B) * s.n * KS; w += nt) {
    const index_t u = w / KS, r = w - u * KS;
    const index_t bg = u / s.n, jj = u - bg * s.n;
    const T* dr[PERSIST_RB];
    row_group_rows(dzs, bg, B, H4, dr);
    const T* ur = smem + jj * ld;
    T acc[PERSIST_RB];
    for (int q = 0; q < PERSIST_RB; ++q) acc[q] = T(0);
    for (index_t c = r; c < H4; c += KS) {
      const T uc = ur[c];
      for (int q = 0; q < PERSIST_RB; ++q) acc[q] += dr[q][c] * uc;
    }
    for (int q = 0; q < PERSIST_RB; ++q) {
      const index_t b = bg * PERSIST_RB + q;
      if (b < B) part[(b * s.hs_max + jj) * KS + r] = acc[q];
    }
  }
}

// The recurrent share of dh for unit (b, jj): sum_r part, in order.
template <typename T>
XLSTM_HD T persistent_backward_recurrent(const T* smem, const UnitSlice& s, index_t H, index_t KS,
                                         index_t b, index_t jj) {
  const T* p = smem + s.hs_max * (4 * H + 1) + (b * s.hs_max + jj) * KS;
  T rec = T(0);
  for (index_t r = 0; r < KS; ++r) rec += p[r];
  return rec;
}

// Phase 2 of step t: dh_next = dh_skip(t+1) [+ dz[t+1] @ U^T when t < T-1], the pointwise
// backward; writes dz[t] and the running dc (dc_prev) and dh (dh_skip) of the block's units.
template <typename T>
XLSTM_HD void persistent_backward_pointwise(const PersistentArgs<T>& a, index_t t, index_t k,
                                            index_t tid, index_t nt, const T* smem) {
  const UnitSlice s = unit_slice(k, a.H, a.NB);
  const index_t B = a.B, H = a.H;
  const bool last = t == a.steps - 1;       // dh holds dh_n itself: no recurrent share yet
  const T* gr0 = a.gates + t * B * 4 * H;
  T* dz = a.dz + t * B * 4 * H;
  const T* c_prev = a.cs + t * B * H;
  const T* dy = a.dy + t * B * H;
  for (index_t u = tid; u < B * s.n; u += nt) {
    const index_t b = u / s.n, jj = u - b * s.n, j = s.j0 + jj;
    const index_t n = b * H + j, tn = t * B * H + n;
    const T* gr = gr0 + b * 4 * H + j;
    T* dzr = dz + b * 4 * H + j;
    const T dh_next = last ? a.dh[n] : a.dh[n] + persistent_backward_recurrent(smem, s, H, a.KS, b, jj);
    T dc_prev, dh_skip;
    backward_element<T>(gr[0], gr[H], gr[2 * H], gr[3 * H], c_prev[n], dy[n], dh_next, a.dc[n],
                        load_or(a.mask, t * B + b, T(1)), load_or(a.zc, tn, T(0)),
                        load_or(a.zh, tn, T(0)), load_or(a.gmask, tn, T(1)),
                        dzr[0], dzr[H], dzr[2 * H], dzr[3 * H], dc_prev, dh_skip);
    a.dc[n] = dc_prev;
    a.dh[n] = dh_skip;
  }
}

// After step 0 (and its partial of dz[0]): dh0 = dh_skip(0) + dz[0] @ U^T.
template <typename T>
XLSTM_HD void persistent_backward_finish(const PersistentArgs<T>& a, index_t k, index_t tid,
                                         index_t nt, const T* smem) {
  const UnitSlice s = unit_slice(k, a.H, a.NB);
  for (index_t u = tid; u < a.B * s.n; u += nt) {
    const index_t b = u / s.n, jj = u - b * s.n;
    a.dh[b * a.H + s.j0 + jj] += persistent_backward_recurrent(smem, s, a.H, a.KS, b, jj);
  }
}

}  // namespace xlstm
