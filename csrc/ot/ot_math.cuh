// The arithmetic of vlfast's batched optimal-transport solvers (IPOT, Sinkhorn in the
// scaling and the log domain), shared by the CUDA kernel (ot.cu: one thread block per
// problem, a thread per row or per column) and the C++ CPU driver (ot_cpu.cpp: the
// same functions over whole ranges), so the CPU tests run the GPU's math.
//
// A problem is a tile of Lx rows (text) x Ly columns (regions), row-major with leading
// dimension `ld` >= Ly.  Padded rows/columns have zero scalings (or -inf potentials in
// the log domain) and zero kernel entries, so they never contribute to a sum.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace vlfast {
namespace ot {

// A problem switches Sinkhorn to the log domain when (max - min real cost) / eps
// exceeds this (kept equal to kernels/ot/reference.py's LOG_DOMAIN_RANGE).
constexpr float kLogDomainRange = 50.0f;

// exp(-(c - cmin) * inv_temp) on a real pair, 0 on padding.  Subtracting the
// problem's smallest cost scales the kernel by a constant, which the scalings absorb
// (IPOT and Sinkhorn plans are unchanged) and which keeps exp() from underflowing.
VLFAST_HD inline float kernel_entry(float c, float cmin, float inv_temp, bool real) {
  return real ? expf(-(c - cmin) * inv_temp) : 0.0f;
}

// out[j - j0] = sum_i M[i, j] * w[i] for j in [j0, j1), summed in increasing i.
// The GPU calls it with one column per thread (j1 = j0 + 1); the CPU with all
// columns at once, so the inner loop over j is contiguous and vectorises.
VLFAST_HD inline void col_dots(const float* __restrict__ M, int ld, const float* __restrict__ w, int rows,
                               int j0, int j1, float* __restrict__ out) {
  for (int j = j0; j < j1; ++j) out[j - j0] = 0.0f;
  for (int i = 0; i < rows; ++i) {
    const float wi = w[i];
    const float* __restrict__ row = M + static_cast<int64_t>(i) * ld;
    for (int j = j0; j < j1; ++j) out[j - j0] += row[j] * wi;
  }
}

// sum_j row[j] * w[j] with four interleaved partial sums (j mod 4), combined as
// (s0 + s1) + (s2 + s3): the same order on GPU and CPU, and no serial add chain.
VLFAST_HD inline float row_dot(const float* __restrict__ row, const float* __restrict__ w, int cols) {
  float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
  int j = 0;
  for (; j + 4 <= cols; j += 4) {
    s0 += row[j] * w[j];
    s1 += row[j + 1] * w[j + 1];
    s2 += row[j + 2] * w[j + 2];
    s3 += row[j + 3] * w[j + 3];
  }
  if (j < cols) s0 += row[j] * w[j];
  if (j + 1 < cols) s1 += row[j + 1] * w[j + 1];
  if (j + 2 < cols) s2 += row[j + 2] * w[j + 2];
  return (s0 + s1) + (s2 + s3);
}

// IPOT's scalings: 1 / (n * dot) on a real row/column, 0 on padding.
VLFAST_HD inline float ipot_scaling(float dot, float n, bool real) { return real ? 1.0f / (n * dot) : 0.0f; }

// Sinkhorn's scalings: marginal / dot on a real row/column, 0 on padding.
VLFAST_HD inline float sinkhorn_scaling(float marginal, float dot, bool real) { return real ? marginal / dot : 0.0f; }

// Plan entry diag(s) Q diag(d), multiplied in the reference's order ((s * q) * d).
VLFAST_HD inline float scaled_entry(float q, float s, float d) { return (s * q) * d; }

// IPOT's next Q = A * T with T = diag(s) Q diag(d).
VLFAST_HD inline float ipot_next_q(float q, float a, float s, float d) { return a * scaled_entry(q, s, d); }

// Log domain.  z_i = (pot_i - C[i, j]) * inv_eps; returns log sum_i exp(z_i) over rows
// (column j), -inf when every term is -inf (padded potentials are -inf).
VLFAST_HD inline float col_lse(const float* __restrict__ Cm, int ld, const float* __restrict__ pot, int rows, int j,
                               float inv_eps) {
  float m = -INFINITY;
  for (int i = 0; i < rows; ++i) m = fmaxf(m, (pot[i] - Cm[static_cast<int64_t>(i) * ld + j]) * inv_eps);
  if (m == -INFINITY) return -INFINITY;
  float s = 0.0f;
  for (int i = 0; i < rows; ++i) s += expf((pot[i] - Cm[static_cast<int64_t>(i) * ld + j]) * inv_eps - m);
  return m + logf(s);
}

// log sum_j exp((pot_j - row[j]) * inv_eps), -inf when every term is -inf.
VLFAST_HD inline float row_lse(const float* __restrict__ row, const float* __restrict__ pot, int cols,
                               float inv_eps) {
  float m = -INFINITY;
  for (int j = 0; j < cols; ++j) m = fmaxf(m, (pot[j] - row[j]) * inv_eps);
  if (m == -INFINITY) return -INFINITY;
  float s = 0.0f;
  for (int j = 0; j < cols; ++j) s += expf((pot[j] - row[j]) * inv_eps - m);
  return m + logf(s);
}

// A potential update eps * (log marginal - lse) on a real entry, -inf on padding.
VLFAST_HD inline float log_potential(float log_marginal, float lse, float eps, bool real) {
  return real ? eps * (log_marginal - lse) : -INFINITY;
}

// Plan entry of the log domain: exp((f_i + g_j - C_ij) / eps) on a real pair, else 0.
VLFAST_HD inline float log_plan_entry(float f, float g, float c, float inv_eps, bool real) {
  return real ? expf((f + g - c) * inv_eps) : 0.0f;
}

// Whether Sinkhorn runs a problem in the log domain: mode 1 = yes, 0 = no, -1 = when
// the cost range / eps exceeds kLogDomainRange.
VLFAST_HD inline bool use_log_domain(int mode, float cmin, float cmax, float eps) {
  return mode == 1 || (mode < 0 && (cmax - cmin) / eps > kLogDomainRange);
}

}  // namespace ot
}  // namespace vlfast
