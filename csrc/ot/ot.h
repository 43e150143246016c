// Batched optimal-transport drivers (IPOT with UNITER's semantics, Sinkhorn with POT's
// update order): one call solves B problems of Lx x Ly.
//
// Inputs are contiguous: cost (B, Lx, Ly) fp32, x_mask (B, Lx) and y_mask (B, Ly) as
// bytes (a torch.bool buffer; nonzero = real).  The plan (B, Lx, Ly) fp32 is written
// whole: exactly 0 on padding and for problems with no real row or column.
#pragma once

#include <cstdint>

namespace vlfast {
namespace ot {

// CPU drivers (OpenMP over the batch when built with it).
void ipot_cpu(const float* cost, const uint8_t* x_mask, const uint8_t* y_mask, float* plan, int64_t B, int Lx,
              int Ly, float beta, int n_iters, int k);
// log_mode: 1 = log domain, 0 = scaling domain, -1 = per problem by cost range.
void sinkhorn_cpu(const float* cost, const uint8_t* x_mask, const uint8_t* y_mask, float* plan, int64_t B, int Lx,
                  int Ly, float eps, int n_iters, int log_mode);

#if defined(VLFAST_WITH_CUDA)
// Floats of global workspace the CUDA solver needs for B problems of Lx x Ly on
// `device` ("ipot" or "sinkhorn"): 0 when a problem's tiles fit in shared memory.
int64_t workspace_floats(const char* solver, int64_t B, int Lx, int Ly, int device);

// CUDA: one launch for the whole batch, a thread block per problem, every iteration
// inside the kernel.  `workspace` (device memory of workspace_floats(...) floats, or
// null when that is 0) holds the tiles that do not fit in shared memory.  Runs on the
// device owning `plan`, asynchronously on `stream` (a cudaStream_t as an integer).
void ipot_cuda(const float* cost, const uint8_t* x_mask, const uint8_t* y_mask, float* plan, float* workspace,
               int64_t B, int Lx, int Ly, float beta, int n_iters, int k, uintptr_t stream);
void sinkhorn_cuda(const float* cost, const uint8_t* x_mask, const uint8_t* y_mask, float* plan, float* workspace,
                   int64_t B, int Lx, int Ly, float eps, int n_iters, int log_mode, uintptr_t stream);
#endif

}  // namespace ot
}  // namespace vlfast
