// XLA FFI handlers for the prunejax CPU kernels: the FFI binding checks the buffers' dtypes and
// ranks, then the handlers run the kernel cores of kernels.h. Shapes and index arrays (column
// indices, row pointers, block coordinates) are trusted: they come from prunejax.sparse's
// converters, which build them in range; a kernel object assembled by hand from other arrays is
// outside that contract. The cores run on XLA's intra-op thread pool (the FFI ThreadPool
// context), so the kernels use the cores XLA's dense matmul uses and never oversubscribe.
#include <cstdint>
#include <functional>
#include <utility>

#include "kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// XLA's intra-op thread pool as the kernels' Pool.
class XlaPool final : public prunejax::Pool {
 public:
  explicit XlaPool(ffi::ThreadPool& pool) : pool_(pool) {}
  int64_t num_threads() const override { return pool_.num_threads(); }
  void schedule(std::function<void()> task) override { pool_.Schedule(std::move(task)); }

 private:
  ffi::ThreadPool& pool_;
};

ffi::Error CsrMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> ptr,
                         ffi::AnyBuffer idx, ffi::Buffer<ffi::F32> val,
                         ffi::ResultBuffer<ffi::F32> y,
                         int64_t tiled_from) {
  const auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("x must be 2-D");
  const int64_t batch = xd[0], n_in = xd[1];
  const int64_t n_out = ptr.element_count() - 1;
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  const int32_t* pp = ptr.typed_data();
  XlaPool xla_pool(pool);
  if (idx.element_type() == ffi::DataType::U16) {
    prunejax::csr_matmul(xla_pool, xp, pp, reinterpret_cast<const uint16_t*>(idx.untyped_data()),
                         val.typed_data(), yp, batch, n_in, n_out, tiled_from);
  } else if (idx.element_type() == ffi::DataType::S32) {
    prunejax::csr_matmul(xla_pool, xp, pp, reinterpret_cast<const int32_t*>(idx.untyped_data()),
                         val.typed_data(), yp, batch, n_in, n_out, tiled_from);
  } else {
    return ffi::Error::InvalidArgument("indices must be uint16 or int32");
  }
  return ffi::Error::Success();
}

ffi::Error DenseRowsMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                               ffi::Buffer<ffi::F32> wt, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto wd = wt.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1])
    return ffi::Error::InvalidArgument("x must be (batch, in) and wt (out, in)");
  XlaPool xla_pool(pool);
  prunejax::dense_rows_matmul(xla_pool, x.typed_data(), wt.typed_data(), y->typed_data(), xd[0],
                              xd[1], wd[0]);
  return ffi::Error::Success();
}

ffi::Error BlockMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::S32> colptr, ffi::Buffer<ffi::S32> rowb,
                           ffi::Buffer<ffi::F32> blocks,
                           ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto bd = blocks.dimensions();
  if (xd.size() != 2 || bd.size() != 3) return ffi::Error::InvalidArgument("bad ranks");
  const int64_t batch = xd[0], n_in = xd[1];
  const int64_t bh = bd[1], bw = bd[2];
  const int64_t n_out = (colptr.element_count() - 1) * bw;
  XlaPool xla_pool(pool);
  prunejax::block_matmul(xla_pool, x.typed_data(), colptr.typed_data(), rowb.typed_data(),
                         blocks.typed_data(), y->typed_data(), batch, n_in, n_out, bh, bw);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PrunejaxCsrMatmul, CsrMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("tiled_from"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(PrunejaxDenseRowsMatmul, DenseRowsMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PrunejaxBlockMatmul, BlockMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// The vector path this library was compiled for (prunejax.sparse.ffi.isa()).
extern "C" const char* prunejax_isa() { return prunejax::isa_name(); }
