// prunejax CPU kernel cores (declared in kernels.h): CSR (rows = output units), dense rows and
// block-sparse x @ W in fp32.  Plain functions on raw pointers; ffi_bindings.cc binds them to XLA.
#include "kernels.h"

#include "simd.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>
#include <atomic>
#include <cstdlib>
#include <memory>
#include <thread>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace prunejax {

const char* isa_name() { return simd::kIsa; }

namespace {

using simd::vf;

// Run fn(0..n-1) on the pool's threads plus the calling thread.  Chunks are handed out
// dynamically, so a descheduled pool thread delays nothing: the caller finishes the work and
// tasks that start late find no chunk left (the shared state outlives the call).
struct Work {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t n = 0;
  std::function<void(int64_t)> fn;
};

inline void drain(Work* w) {
  for (int64_t i; (i = w->next.fetch_add(1, std::memory_order_relaxed)) < w->n;) {
    w->fn(i);
    w->done.fetch_add(1, std::memory_order_release);
  }
}

template <typename F>
void parallel_for(Pool& pool, int64_t n, F&& fn) {
  if (n <= 0) return;
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), n) - 1;
  if (helpers <= 0) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  auto w = std::make_shared<Work>();
  w->n = n;
  w->fn = std::forward<F>(fn);
  for (int64_t h = 0; h < helpers; ++h) pool.schedule([w] { drain(w.get()); });
  drain(w.get());
  for (int spin = 0; w->done.load(std::memory_order_acquire) < n; ++spin) {
    if (spin > 64) std::this_thread::yield();
  }
}

// Per-calling-thread scratch buffer, reused across calls, 2 MiB aligned and backed by huge pages
// where the kernel allows: the kernels read it at random rows, and 4 KiB pages would make most
// of those reads TLB misses.
struct Scratch {
  float* p = nullptr;
  size_t cap = 0;
  ~Scratch() { std::free(p); }
  float* get(size_t n) {
    if (n > cap) {
      std::free(p);
      constexpr size_t kAlign = size_t(2) << 20;
      const size_t bytes = (n * sizeof(float) + kAlign - 1) / kAlign * kAlign;
      p = static_cast<float*>(std::aligned_alloc(kAlign, bytes));
      if (p == nullptr) {
        cap = 0;
        return nullptr;
      }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      madvise(p, bytes, MADV_HUGEPAGE);
#endif
      cap = bytes / sizeof(float);
    }
    return p;
  }
};

inline float* scratch(size_t n) {
  thread_local Scratch s;
  return s.get(n);
}

inline int64_t num_threads(Pool& pool) {
  return std::max<int64_t>(pool.num_threads(), 1);
}

// Below this many multiply-adds a call runs on the calling thread alone: waking pool threads
// costs more than it saves.
constexpr int64_t kSerialWork = int64_t(1) << 17;

inline int64_t threads_for(Pool& pool, int64_t work) {
  return work < kSerialWork ? 1 : num_threads(pool);
}

// How many chunks to split n_out rows into: one (the calling thread alone, no pool thread
// woken) below kSerialWork, else 4 per thread for load balance.
inline int64_t split_parts(Pool& pool, int64_t work, int64_t n_out) {
  const int64_t nt = threads_for(pool, work);
  return nt == 1 ? 1 : std::min<int64_t>(4 * nt, std::max<int64_t>(n_out, 1));
}

// Split rows [0, n) into `parts` contiguous ranges of about equal nonzero count.
void balance(const int32_t* ptr, int64_t n, int64_t parts, std::vector<int64_t>* cuts) {
  cuts->assign(parts + 1, n);
  (*cuts)[0] = 0;
  const int64_t total = ptr[n] - ptr[0];
  int64_t r = 0;
  for (int64_t p = 1; p < parts; ++p) {
    const int64_t target = ptr[0] + total * p / parts;
    while (r < n && ptr[r] < target) ++r;
    (*cuts)[p] = r;
  }
}

// ---------------------------------------------------------------- CSR, small batch: gather-dot
// Scalar loads with 8 independent sums: on Zen 4 this issues faster than AVX-512 gathers
// (measured ~0.42 vs ~0.45 ns per nonzero on one core); bound by load issue and by streaming
// the 6 bytes per nonzero.
template <typename I>
inline float dot_gather(const float* x, const I* idx, const float* val, int64_t k0, int64_t k1) {
  float a[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t k = k0;
  for (; k + 8 <= k1; k += 8) {
    for (int u = 0; u < 8; ++u) a[u] += val[k + u] * x[idx[k + u]];
  }
  for (; k < k1; ++k) a[0] += val[k] * x[idx[k]];
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

template <typename I>
void csr_small(Pool& pool, const float* x, const int32_t* ptr, const I* idx, const float* val,
               float* y, int64_t batch, int64_t n_in, int64_t n_out) {
  std::vector<int64_t> cuts;
  const int64_t work = batch * (ptr[n_out] - ptr[0]);
  const int64_t parts = split_parts(pool, work, n_out);
  balance(ptr, n_out, parts, &cuts);
  parallel_for(pool, parts, [&](int64_t p) {
    for (int64_t b = 0; b < batch; ++b) {
      const float* xb = x + b * n_in;
      float* yb = y + b * n_out;
      for (int64_t j = cuts[p]; j < cuts[p + 1]; ++j)
        yb[j] = dot_gather(xb, idx, val, ptr[j], ptr[j + 1]);
    }
  });
}

// ---------------------------------------------------------------- CSR, large batch: x tiles
// xt holds x transposed in tiles of T batch rows: xt[tile][i][l] = x[tile*T + l][i], 64-byte
// aligned, so each nonzero is T/16 aligned 16-wide loads and FMAs.
template <int T, typename I>
void csr_tiled(Pool& pool, const float* x, const int32_t* ptr, const I* idx, const float* val,
               float* y, int64_t batch, int64_t n_in, int64_t n_out) {
  // V vectors per tile row; U nonzeros in flight, so U * V independent multiply-add chains
  // (8 hide the FMA latency on the x86 and NEON cores) while U * V accumulators and the V
  // loaded vectors fit the register file.
  constexpr int V = T / simd::kLanes;
  constexpr int U = simd::block_rows(V, 8 / V > 1 ? 8 / V : 1);
  const int64_t tiles = (batch + T - 1) / T;
  std::vector<float> fallback;
  float* xt = scratch(static_cast<size_t>(tiles * n_in * T));
  if (xt == nullptr) {
    fallback.resize(static_cast<size_t>(tiles * n_in * T) + 16);
    xt = fallback.data();
    xt += (16 - (reinterpret_cast<uintptr_t>(xt) / sizeof(float)) % 16) % 16;
  }
  const int64_t nnz = ptr[n_out] - ptr[0];
  const int64_t nt = threads_for(pool, batch * nnz);
  parallel_for(pool, nt == 1 ? 1 : tiles, [&](int64_t c) {
   for (int64_t t = (nt == 1 ? 0 : c); t < (nt == 1 ? tiles : c + 1); ++t) {
    float* dst = xt + t * n_in * T;
    const int64_t rows = std::min<int64_t>(T, batch - t * T);
    for (int64_t i0 = 0; i0 < n_in; i0 += 64) {
      const int64_t i1 = std::min<int64_t>(n_in, i0 + 64);
      for (int64_t l = 0; l < T; ++l) {
        if (l < rows) {
          const float* src = x + (t * T + l) * n_in;
          for (int64_t i = i0; i < i1; ++i) dst[i * T + l] = src[i];
        } else {
          for (int64_t i = i0; i < i1; ++i) dst[i * T + l] = 0.f;
        }
      }
    }
   }
  });
  // Chunks of output rows holding ~kChunkNnz nonzeros: a chunk's part of W stays in L2 while
  // every x tile streams past it.
  constexpr int64_t kChunkNnz = 1 << 15;
  const int64_t parts =
      nt == 1 ? 1
              : std::max<int64_t>(
                    std::min<int64_t>(n_out, std::max<int64_t>(nnz / kChunkNnz, 4 * nt)), 1);
  std::vector<int64_t> cuts;
  balance(ptr, n_out, parts, &cuts);
  parallel_for(pool, parts, [&](int64_t p) {
    alignas(64) float out[T];
    for (int64_t t = 0; t < tiles; ++t) {
      const float* xtt = xt + t * n_in * T;
      const int64_t rows = std::min<int64_t>(T, batch - t * T);
      float* yt = y + t * T * n_out;
      for (int64_t j = cuts[p]; j < cuts[p + 1]; ++j) {
        const int64_t k0 = ptr[j], k1 = ptr[j + 1];
        vf acc[U][V];
        for (int u = 0; u < U; ++u)
          for (int v = 0; v < V; ++v) acc[u][v] = simd::zero();
        int64_t k = k0;
        for (; k + U <= k1; k += U) {
          for (int u = 0; u < U; ++u) {
            const vf s = simd::splat(val[k + u]);
            const float* row = xtt + int64_t(idx[k + u]) * T;
            for (int v = 0; v < V; ++v)
              acc[u][v] = simd::madd(s, simd::load(row + simd::kLanes * v), acc[u][v]);
          }
        }
        for (; k < k1; ++k) {
          const vf s = simd::splat(val[k]);
          const float* row = xtt + int64_t(idx[k]) * T;
          for (int v = 0; v < V; ++v)
            acc[0][v] = simd::madd(s, simd::load(row + simd::kLanes * v), acc[0][v]);
        }
        for (int v = 0; v < V; ++v) {
          vf t = acc[0][v];
          for (int u = 1; u < U; ++u) t += acc[u][v];
          simd::store(out + simd::kLanes * v, t);
        }
        for (int64_t l = 0; l < rows; ++l) yt[l * n_out + j] = out[l];
      }
    }
  });
}

template <typename I>
void csr_dispatch(Pool& pool, const float* x, const int32_t* ptr, const I* idx,
                  const float* val, float* y, int64_t batch, int64_t n_in, int64_t n_out,
                  int64_t tiled_from) {
  if (batch >= 32) {
    csr_tiled<32>(pool, x, ptr, idx, val, y, batch, n_in, n_out);
  } else if (batch >= tiled_from) {
    csr_tiled<16>(pool, x, ptr, idx, val, y, batch, n_in, n_out);
  } else {
    csr_small(pool, x, ptr, idx, val, y, batch, n_in, n_out);
  }
}

}  // namespace

void csr_matmul(Pool& pool, const float* x, const int32_t* ptr, const uint16_t* idx,
                const float* val, float* y, int64_t batch, int64_t n_in, int64_t n_out,
                int64_t tiled_from) {
  csr_dispatch(pool, x, ptr, idx, val, y, batch, n_in, n_out, tiled_from);
}

void csr_matmul(Pool& pool, const float* x, const int32_t* ptr, const int32_t* idx,
                const float* val, float* y, int64_t batch, int64_t n_in, int64_t n_out,
                int64_t tiled_from) {
  csr_dispatch(pool, x, ptr, idx, val, y, batch, n_in, n_out, tiled_from);
}

namespace {

// ---------------------------------------------------------------- dense rows, small batch
// W stored transposed, (n_out, n_in) row-major: every output is one contiguous dot product, so
// W streams once, front to back, and each loaded W vector serves R batch rows.  Bound by
// streaming the 4 bytes per weight (batch 1).
template <int R>
inline void dense_rows_dot(const float* x, int64_t n_in, const float* w, float* y,
                           int64_t n_out) {
  constexpr int L = simd::kLanes;
  constexpr int U = R == 1 ? 4 : 2;  // R * U accumulators, U loaded W vectors
  vf acc[R][U];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < U; ++u) acc[r][u] = simd::zero();
  int64_t k = 0;
  for (; k + L * U <= n_in; k += L * U)
    for (int u = 0; u < U; ++u) {
      const vf wv = simd::load(w + k + L * u);
      for (int r = 0; r < R; ++r)
        acc[r][u] = simd::madd(simd::load(x + r * n_in + k + L * u), wv, acc[r][u]);
    }
  for (; k + L <= n_in; k += L) {
    const vf wv = simd::load(w + k);
    for (int r = 0; r < R; ++r)
      acc[r][0] = simd::madd(simd::load(x + r * n_in + k), wv, acc[r][0]);
  }
  for (int r = 0; r < R; ++r) {
    vf t = acc[r][0];
    for (int u = 1; u < U; ++u) t += acc[r][u];
    float tail = 0.f;
    for (int64_t kk = k; kk < n_in; ++kk) tail += w[kk] * x[r * n_in + kk];
    y[r * n_out] = simd::hsum(t) + tail;
  }
}

}  // namespace

void dense_rows_matmul(Pool& pool, const float* x, const float* wt, float* y, int64_t batch,
                       int64_t n_in, int64_t n_out) {
  const int64_t parts = split_parts(pool, batch * n_in * n_out, n_out);
  const int64_t per = (n_out + parts - 1) / std::max<int64_t>(parts, 1);
  parallel_for(pool, parts, [&](int64_t p) {
    const int64_t j1 = std::min(n_out, (p + 1) * per);
    for (int64_t j = p * per; j < j1; ++j) {
      const float* w = wt + j * n_in;
      int64_t b = 0;
      for (; b + 4 <= batch; b += 4)
        dense_rows_dot<4>(x + b * n_in, n_in, w, y + b * n_out + j, n_out);
      for (; b + 2 <= batch; b += 2)
        dense_rows_dot<2>(x + b * n_in, n_in, w, y + b * n_out + j, n_out);
      for (; b < batch; ++b) dense_rows_dot<1>(x + b * n_in, n_in, w, y + b * n_out + j, n_out);
    }
  });
}

namespace {

// ---------------------------------------------------------------- block-sparse
// Blocks of W (in, out) grouped by block column jb: blocks[p] is (bh, bw) row-major,
// rowb[p] its block row, colptr[jb]..colptr[jb+1] the blocks of block column jb.
template <int BW, int R>
inline void block_rows(const float* x, int64_t row_stride, int64_t ib_stride, const int32_t* rowb,
                       const float* blocks, int64_t p0, int64_t p1, int64_t bh, float* y,
                       int64_t n_out, int64_t col0) {
  constexpr int L = simd::kLanes;
  constexpr int V = BW / L;
  vf acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = simd::zero();
  for (int64_t p = p0; p < p1; ++p) {
    const float* blk = blocks + p * bh * BW;
    const float* xb = x + int64_t(rowb[p]) * ib_stride;
    for (int64_t k = 0; k < bh; ++k) {
      vf w[V];
      for (int v = 0; v < V; ++v) w[v] = simd::load(blk + k * BW + L * v);
      for (int r = 0; r < R; ++r) {
        const vf xs = simd::splat(xb[r * row_stride + k]);
        for (int v = 0; v < V; ++v) acc[r][v] = simd::madd(xs, w[v], acc[r][v]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) simd::store(y + r * n_out + col0 + L * v, acc[r][v]);
}

// acc[r][:] += x rows r of one block times the block, for R batch rows: xb holds the block's
// R x bh slice of x contiguously (the re-laid-out x), acc R rows of BW floats.
template <int BW, int R>
inline void block_tile(const float* xb, int64_t bh, const float* blk, float* acc) {
  constexpr int L = simd::kLanes;
  constexpr int V = BW / L;
  vf a[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) a[r][v] = simd::load(acc + r * BW + L * v);
  for (int64_t k = 0; k < bh; ++k) {
    vf w[V];
    for (int v = 0; v < V; ++v) w[v] = simd::load(blk + k * BW + L * v);
    for (int r = 0; r < R; ++r) {
      const vf xs = simd::splat(xb[r * bh + k]);
      for (int v = 0; v < V; ++v) a[r][v] = simd::madd(xs, w[v], a[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) simd::store(acc + r * BW + L * v, a[r][v]);
}

template <int BW, int R>
inline void block_tiles_from(int64_t b, int64_t batch, const float* xb, int64_t bh,
                             const float* blk, float* acc) {
  for (; b + R <= batch; b += R) block_tile<BW, R>(xb + b * bh, bh, blk, acc + b * BW);
  if constexpr (R > 1) block_tiles_from<BW, R / 2>(b, batch, xb, bh, blk, acc);
}

// One block column for a re-laid-out x (xr[ib][b][k]): block by block, each block times the
// whole batch (its block row of xr, batch * bh floats, read front to back), accumulated into
// acc (batch x BW, in L1/L2) and then written to y.
template <int BW, int R>
void block_column_streamed(const float* xr, int64_t batch, int64_t bh, const int32_t* rowb,
                           const float* blocks, int64_t p0, int64_t p1, float* acc, float* y,
                           int64_t n_out, int64_t col0) {
  std::fill(acc, acc + batch * BW, 0.f);
  for (int64_t p = p0; p < p1; ++p)
    block_tiles_from<BW, R>(0, batch, xr + int64_t(rowb[p]) * batch * bh, bh,
                            blocks + p * bh * BW, acc);
  for (int64_t b = 0; b < batch; ++b)
    std::memcpy(y + b * n_out + col0, acc + b * BW, BW * sizeof(float));
}

// Batch rows [b, batch) of one block column: register blocks of R rows, the rest with R / 2, ...
template <int BW, int R>
inline void block_rows_from(int64_t b, int64_t batch, const float* xs, int64_t row_stride,
                            int64_t ib_stride, const int32_t* rowb, const float* blocks,
                            int64_t p0, int64_t p1, int64_t bh, float* y, int64_t n_out,
                            int64_t col0) {
  for (; b + R <= batch; b += R)
    block_rows<BW, R>(xs + b * row_stride, row_stride, ib_stride, rowb, blocks, p0, p1, bh,
                      y + b * n_out, n_out, col0);
  if constexpr (R > 1)
    block_rows_from<BW, R / 2>(b, batch, xs, row_stride, ib_stride, rowb, blocks, p0, p1, bh, y,
                               n_out, col0);
}

// batch-1 block kernel: split the k loop over independent accumulators.
template <int BW>
inline void block_vec(const float* x, const int32_t* rowb, const float* blocks, int64_t p0,
                      int64_t p1, int64_t bh, float* y, int64_t col0) {
  constexpr int L = simd::kLanes;
  constexpr int V = BW / L;
  constexpr int U = simd::block_rows(V, 4);  // independent k accumulators
  vf acc[U][V];
  for (int u = 0; u < U; ++u)
    for (int v = 0; v < V; ++v) acc[u][v] = simd::zero();
  for (int64_t p = p0; p < p1; ++p) {
    const float* blk = blocks + p * bh * BW;
    const float* xb = x + int64_t(rowb[p]) * bh;
    int64_t k = 0;
    for (; k + U <= bh; k += U)
      for (int u = 0; u < U; ++u) {
        const vf xs = simd::splat(xb[k + u]);
        for (int v = 0; v < V; ++v)
          acc[u][v] = simd::madd(xs, simd::load(blk + (k + u) * BW + L * v), acc[u][v]);
      }
    for (; k < bh; ++k) {
      const vf xs = simd::splat(xb[k]);
      for (int v = 0; v < V; ++v)
        acc[0][v] = simd::madd(xs, simd::load(blk + k * BW + L * v), acc[0][v]);
    }
  }
  for (int v = 0; v < V; ++v) {
    vf t = acc[0][v];
    for (int u = 1; u < U; ++u) t += acc[u][v];
    simd::store(y + col0 + L * v, t);
  }
}

template <int BW>
void block_matmul_bw(Pool& pool, const float* x, const int32_t* colptr, const int32_t* rowb,
                     const float* blocks, float* y, int64_t batch, int64_t n_in, int64_t n_out,
                     int64_t bh) {
  const int64_t ncb = n_out / BW;
  // R batch rows per register block: R * (BW / kLanes) accumulators (8 rows of one zmm on
  // AVX-512, 6 rows of two ymm on AVX2, 6 rows of four q registers on NEON).
    constexpr int R = simd::block_rows(BW / simd::kLanes, 8);
  // For batches of 2R rows and more, x is re-laid out block row by block row,
  // xr[ib][b][k] = x[b][ib * bh + k], so the R rows a block multiplies are one contiguous run.
  // When xr outgrows L2, each block column is computed block by block, every block times the
  // whole batch (block_column_streamed): the block stays in L1 and its block row of xr is read
  // front to back (prefetched) instead of as R-row pieces scattered over xr.
  const int64_t nt = threads_for(pool, batch * (colptr[ncb] - colptr[0]) * bh * BW);
  const float* xs = x;
  int64_t row_stride = n_in, ib_stride = bh;
  float* xr = batch >= 2 * R ? scratch(static_cast<size_t>(batch * n_in)) : nullptr;
  if (xr != nullptr) {
    const int64_t nrb = n_in / bh;
    parallel_for(pool, nt == 1 ? 1 : nrb, [&](int64_t c) {
     for (int64_t ib = (nt == 1 ? 0 : c); ib < (nt == 1 ? nrb : c + 1); ++ib)
      for (int64_t b = 0; b < batch; ++b)
        std::memcpy(xr + (ib * batch + b) * bh, x + b * n_in + ib * bh, bh * sizeof(float));
    });
    xs = xr;
    row_stride = bh;
    ib_stride = batch * bh;
  }
  // While the re-laid-out x fits in L2 (1 MiB), its R-row slices are read straight into
  // register blocks that live across a whole block column; beyond, those reads miss to L3 and
  // the column is streamed block by block (block_column_streamed).
  const bool stream = xr != nullptr && batch * n_in * int64_t(sizeof(float)) > (int64_t(1) << 20);
  const int64_t per = nt == 1 ? ncb : std::max<int64_t>(1, ncb / (8 * nt));
  parallel_for(pool, (ncb + per - 1) / per, [&](int64_t c) {
    for (int64_t jb = c * per; jb < std::min(ncb, (c + 1) * per); ++jb) {
      const int64_t p0 = colptr[jb], p1 = colptr[jb + 1];
      const int64_t col0 = jb * BW;
      if (batch == 1) {
        block_vec<BW>(x, rowb, blocks, p0, p1, bh, y, col0);
        continue;
      }
      if (stream) {
        thread_local std::vector<float> acc;
        if (acc.size() < size_t(batch * BW)) acc.resize(batch * BW);
        block_column_streamed<BW, R>(xr, batch, bh, rowb, blocks, p0, p1, acc.data(), y, n_out,
                                     col0);
        continue;
      }
      block_rows_from<BW, R>(0, batch, xs, row_stride, ib_stride, rowb, blocks, p0, p1, bh, y,
                             n_out, col0);
    }
  });
}

// Generic block width (not a multiple of 16): plain loops the compiler vectorises.
void block_matmul_generic(Pool& pool, const float* x, const int32_t* colptr,
                          const int32_t* rowb, const float* blocks, float* y, int64_t batch,
                          int64_t n_in, int64_t n_out, int64_t bh, int64_t bw) {
  const int64_t ncb = n_out / bw;
  parallel_for(pool, ncb, [&](int64_t jb) {
    std::vector<float> acc(bw);
    for (int64_t b = 0; b < batch; ++b) {
      std::fill(acc.begin(), acc.end(), 0.f);
      const float* xr = x + b * n_in;
      for (int64_t p = colptr[jb]; p < colptr[jb + 1]; ++p) {
        const float* blk = blocks + p * bh * bw;
        const float* xb = xr + int64_t(rowb[p]) * bh;
        for (int64_t k = 0; k < bh; ++k) {
          const float xs = xb[k];
          for (int64_t c = 0; c < bw; ++c) acc[c] += xs * blk[k * bw + c];
        }
      }
      std::copy(acc.begin(), acc.end(), y + b * n_out + jb * bw);
    }
  });
}

}  // namespace

void block_matmul(Pool& pool, const float* x, const int32_t* colptr, const int32_t* rowb,
                  const float* blocks, float* y, int64_t batch, int64_t n_in, int64_t n_out,
                  int64_t bh, int64_t bw) {
  if (bw == 16) {
    block_matmul_bw<16>(pool, x, colptr, rowb, blocks, y, batch, n_in, n_out, bh);
  } else if (bw == 32) {
    block_matmul_bw<32>(pool, x, colptr, rowb, blocks, y, batch, n_in, n_out, bh);
  } else {
    block_matmul_generic(pool, x, colptr, rowb, blocks, y, batch, n_in, n_out, bh, bw);
  }
}

}  // namespace prunejax
