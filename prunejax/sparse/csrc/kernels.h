// prunejax CPU kernel cores: y = x @ W in fp32, x of shape (batch, n_in) and y of shape
// (batch, n_out), both row-major.  Plain functions on raw pointers (kernels.cc); the XLA FFI
// handlers that call them are in ffi_bindings.cc.
#ifndef PRUNEJAX_SPARSE_CSRC_KERNELS_H_
#define PRUNEJAX_SPARSE_CSRC_KERNELS_H_

#include <cstdint>
#include <functional>

namespace prunejax {

// The threads a kernel call may use.  The calling thread always works; num_threads() - 1 tasks
// are scheduled beside it, and work is handed out in dynamically assigned chunks, so the
// calling thread finishes it even when a scheduled task starts late.
class Pool {
 public:
  virtual ~Pool() = default;
  // Threads working on one call, the calling thread included (<= 1: the calling thread alone,
  // schedule is never called).
  virtual int64_t num_threads() const = 0;
  // Run task on another thread of the pool.
  virtual void schedule(std::function<void()> task) = 0;
};

// The vector path this build runs ("avx512", "avx2", "avx", "sse2", "neon" or "scalar"; see
// simd.h), fixed when it was compiled.
const char* isa_name();

// W (n_in, n_out) stored as CSR of W.T: ptr (n_out + 1), idx (nnz) input indices in each row,
// val (nnz).  batch < tiled_from: one gather-dot per output and batch row; from tiled_from on,
// x transposed into tiles of 16 (batch < 32) or 32 batch rows, each nonzero multiplied into a
// whole tile row held in vector registers (16 / 32 floats: 1-2 zmm, 2-4 ymm, 4-8 NEON q).
void csr_matmul(Pool& pool, const float* x, const int32_t* ptr, const uint16_t* idx,
                const float* val, float* y, int64_t batch, int64_t n_in, int64_t n_out,
                int64_t tiled_from);
void csr_matmul(Pool& pool, const float* x, const int32_t* ptr, const int32_t* idx,
                const float* val, float* y, int64_t batch, int64_t n_in, int64_t n_out,
                int64_t tiled_from);

// Dense W stored transposed, wt (n_out, n_in) row-major: one contiguous dot product per output,
// W streamed once front to back (each loaded W vector serves up to 4 batch rows).
// batch may be 0 for every kernel (nothing is written).
void dense_rows_matmul(Pool& pool, const float* x, const float* wt, float* y, int64_t batch,
                       int64_t n_in, int64_t n_out);

// Block-sparse W (n_in, n_out): blocks (nb, bh, bw) row-major, grouped by block column;
// rowb (nb) each block's block row; colptr (n_out / bw + 1), colptr[jb]..colptr[jb + 1] the
// blocks of block column jb.  n_in and n_out are multiples of bh and bw.
void block_matmul(Pool& pool, const float* x, const int32_t* colptr, const int32_t* rowb,
                  const float* blocks, float* y, int64_t batch, int64_t n_in, int64_t n_out,
                  int64_t bh, int64_t bw);

}  // namespace prunejax

#endif  // PRUNEJAX_SPARSE_CSRC_KERNELS_H_
