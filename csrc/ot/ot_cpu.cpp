// CPU driver of the batched OT solvers: each problem runs the functions of
// ot_math.cuh over whole row/column ranges (OpenMP over the batch), the same math the
// CUDA kernel runs with a thread per row or column.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

#include "ot.h"
#include "ot_math.cuh"

namespace vlfast {
namespace ot {
namespace {

struct Problem {
  const float* cost;  // (Lx, Ly)
  const uint8_t* xm;  // (Lx)
  const uint8_t* ym;  // (Ly)
  float* plan;        // (Lx, Ly)
  int Lx, Ly;
  int nx = 0, ny = 0;
  float cmin = 0.0f, cmax = 0.0f;

  // Counts and cost range over real pairs; false when the problem is empty (the
  // plan is then zeroed).
  bool prepare() {
    for (int i = 0; i < Lx; ++i) nx += xm[i] != 0;
    for (int j = 0; j < Ly; ++j) ny += ym[j] != 0;
    if (nx == 0 || ny == 0) {
      std::fill(plan, plan + static_cast<int64_t>(Lx) * Ly, 0.0f);
      return false;
    }
    float mn = FLT_MAX, mx = -FLT_MAX;
    for (int i = 0; i < Lx; ++i) {
      if (!xm[i]) continue;
      const float* row = cost + static_cast<int64_t>(i) * Ly;
      for (int j = 0; j < Ly; ++j) {
        if (ym[j]) {
          mn = std::min(mn, row[j]);
          mx = std::max(mx, row[j]);
        }
      }
    }
    cmin = mn;
    cmax = mx;
    return true;
  }
  bool real(int i, int j) const { return xm[i] && ym[j]; }
};

// Per-thread scratch, reused across the problems a thread solves.
struct Scratch {
  std::vector<float> a, q, rows, cols, tmp;
  void resize(int Lx, int Ly, int tiles) {
    const size_t n = static_cast<size_t>(Lx) * Ly;
    a.resize(n);
    if (tiles > 1) q.resize(n);
    rows.resize(Lx);
    cols.resize(Ly);
    tmp.resize(Ly);
  }
};

void ipot_one(Problem& p, Scratch& w, float beta, int n_iters, int k) {
  if (!p.prepare()) return;
  const int Lx = p.Lx, Ly = p.Ly, ld = Ly;
  const float inv_beta = 1.0f / beta, nx = static_cast<float>(p.nx), ny = static_cast<float>(p.ny);
  w.resize(Lx, Ly, 2);
  float *A = w.a.data(), *Q = w.q.data(), *s = w.rows.data(), *d = w.cols.data(), *dots = w.tmp.data();
  for (int i = 0; i < Lx; ++i)
    for (int j = 0; j < Ly; ++j) {
      const int64_t e = static_cast<int64_t>(i) * ld + j;
      A[e] = kernel_entry(p.cost[e], p.cmin, inv_beta, p.real(i, j));
      Q[e] = A[e];
    }
  for (int i = 0; i < Lx; ++i) s[i] = p.xm[i] ? 1.0f / nx : 0.0f;
  if (n_iters == 0) {  // the initial T: ones on real pairs
    for (int i = 0; i < Lx; ++i)
      for (int j = 0; j < Ly; ++j) p.plan[static_cast<int64_t>(i) * Ly + j] = p.real(i, j) ? 1.0f : 0.0f;
    return;
  }
  for (int t = 0; t < n_iters; ++t) {
    for (int kk = 0; kk < k; ++kk) {
      col_dots(Q, ld, s, Lx, 0, Ly, dots);
      for (int j = 0; j < Ly; ++j) d[j] = ipot_scaling(dots[j], ny, p.ym[j] != 0);
      for (int i = 0; i < Lx; ++i) s[i] = ipot_scaling(row_dot(Q + static_cast<int64_t>(i) * ld, d, Ly), nx, p.xm[i] != 0);
    }
    if (t + 1 < n_iters) {
      for (int i = 0; i < Lx; ++i) {
        float* __restrict__ qr = Q + static_cast<int64_t>(i) * ld;
        const float* __restrict__ ar = A + static_cast<int64_t>(i) * ld;
        const float si = s[i];
        for (int j = 0; j < Ly; ++j) qr[j] = ipot_next_q(qr[j], ar[j], si, d[j]);
      }
    }
  }
  for (int i = 0; i < Lx; ++i)
    for (int j = 0; j < Ly; ++j) {
      const int64_t e = static_cast<int64_t>(i) * ld + j;
      p.plan[e] = p.real(i, j) ? scaled_entry(Q[e], s[i], d[j]) : 0.0f;
    }
}

void sinkhorn_one(Problem& p, Scratch& w, float eps, int n_iters, int log_mode) {
  if (!p.prepare()) return;
  const int Lx = p.Lx, Ly = p.Ly, ld = Ly;
  const float inv_eps = 1.0f / eps;
  const float a = 1.0f / static_cast<float>(p.nx), b = 1.0f / static_cast<float>(p.ny);
  w.resize(Lx, Ly, 1);
  float *K = w.a.data(), *u = w.rows.data(), *v = w.cols.data(), *dots = w.tmp.data();
  if (!use_log_domain(log_mode, p.cmin, p.cmax, eps)) {
    for (int i = 0; i < Lx; ++i)
      for (int j = 0; j < Ly; ++j) {
        const int64_t e = static_cast<int64_t>(i) * ld + j;
        K[e] = kernel_entry(p.cost[e], p.cmin, inv_eps, p.real(i, j));
      }
    for (int i = 0; i < Lx; ++i) u[i] = p.xm[i] ? a : 0.0f;  // POT starts from u = 1/n_x
    for (int j = 0; j < Ly; ++j) v[j] = p.ym[j] ? b : 0.0f;
    for (int t = 0; t < n_iters; ++t) {
      col_dots(K, ld, u, Lx, 0, Ly, dots);
      for (int j = 0; j < Ly; ++j) v[j] = sinkhorn_scaling(b, dots[j], p.ym[j] != 0);
      for (int i = 0; i < Lx; ++i) u[i] = sinkhorn_scaling(a, row_dot(K + static_cast<int64_t>(i) * ld, v, Ly), p.xm[i] != 0);
    }
    for (int i = 0; i < Lx; ++i)
      for (int j = 0; j < Ly; ++j) {
        const int64_t e = static_cast<int64_t>(i) * ld + j;
        p.plan[e] = p.real(i, j) ? scaled_entry(K[e], u[i], v[j]) : 0.0f;
      }
    return;
  }
  // Log domain: potentials f (rows) and g (columns); C with padding zeroed.
  float *Cz = K, *f = u, *g = v;
  for (int i = 0; i < Lx; ++i)
    for (int j = 0; j < Ly; ++j) {
      const int64_t e = static_cast<int64_t>(i) * ld + j;
      Cz[e] = p.real(i, j) ? p.cost[e] : 0.0f;
    }
  const float log_a = logf(a), log_b = logf(b);
  for (int i = 0; i < Lx; ++i) f[i] = p.xm[i] ? eps * log_a : -INFINITY;
  for (int j = 0; j < Ly; ++j) g[j] = -INFINITY;
  for (int t = 0; t < n_iters; ++t) {
    for (int j = 0; j < Ly; ++j) g[j] = log_potential(log_b, col_lse(Cz, ld, f, Lx, j, inv_eps), eps, p.ym[j] != 0);
    for (int i = 0; i < Lx; ++i)
      f[i] = log_potential(log_a, row_lse(Cz + static_cast<int64_t>(i) * ld, g, Ly, inv_eps), eps, p.xm[i] != 0);
  }
  for (int i = 0; i < Lx; ++i)
    for (int j = 0; j < Ly; ++j) {
      const int64_t e = static_cast<int64_t>(i) * ld + j;
      p.plan[e] = log_plan_entry(f[i], g[j], Cz[e], inv_eps, p.real(i, j));
    }
}

// Below this much work (elements x iterations) a call runs on one thread: waking the
// OpenMP team costs more than it saves, and a descheduled worker stalls the barrier.
constexpr int64_t kParallelWork = int64_t{1} << 17;

template <typename Solve>
void for_each_problem(const float* cost, const uint8_t* xm, const uint8_t* ym, float* plan, int64_t B, int Lx, int Ly,
                      int n_iters, Solve solve) {
  const int64_t tile = static_cast<int64_t>(Lx) * Ly;
  const bool parallel = B > 1 && B * tile * (n_iters + 1) >= kParallelWork;
  (void)parallel;
#if defined(VLFAST_WITH_OPENMP)
#pragma omp parallel if (parallel)
#endif
  {
    Scratch scratch;
#if defined(VLFAST_WITH_OPENMP)
#pragma omp for schedule(dynamic, 4)
#endif
    for (int64_t b = 0; b < B; ++b) {
      Problem p{cost + b * tile, xm + b * Lx, ym + b * Ly, plan + b * tile, Lx, Ly};
      solve(p, scratch);
    }
  }
}

}  // namespace

void ipot_cpu(const float* cost, const uint8_t* x_mask, const uint8_t* y_mask, float* plan, int64_t B, int Lx, int Ly,
              float beta, int n_iters, int k) {
  for_each_problem(cost, x_mask, y_mask, plan, B, Lx, Ly, n_iters * k,
                   [&](Problem& p, Scratch& w) { ipot_one(p, w, beta, n_iters, k); });
}

void sinkhorn_cpu(const float* cost, const uint8_t* x_mask, const uint8_t* y_mask, float* plan, int64_t B, int Lx,
                  int Ly, float eps, int n_iters, int log_mode) {
  for_each_problem(cost, x_mask, y_mask, plan, B, Lx, Ly, n_iters,
                   [&](Problem& p, Scratch& w) { sinkhorn_one(p, w, eps, n_iters, log_mode); });
}

}  // namespace ot
}  // namespace vlfast
