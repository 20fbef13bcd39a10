// Checks every prunejax kernel core (prunejax/sparse/csrc/kernels.h) against a naive dense
// reference, at awkward shapes, batches, densities and thread counts, with no JAX: the same
// driver runs on every ISA path (built per path by tests/test_kernels_isa.py, the aarch64 one
// under qemu-user).
//
// Prints "isa=<path>" first, one line per failed case, then "checks=<n> failures=<m>"; exits 1
// on any failure.
#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <deque>
#include <functional>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "kernels.h"

namespace {

// A plain thread pool: `workers` threads beside the calling one.
class TestPool final : public prunejax::Pool {
 public:
  explicit TestPool(int workers) {
    for (int i = 0; i < workers; ++i) threads_.emplace_back([this] { loop(); });
  }
  ~TestPool() override {
    {
      std::lock_guard<std::mutex> g(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }
  int64_t num_threads() const override { return int64_t(threads_.size()) + 1; }
  void schedule(std::function<void()> task) override {
    {
      std::lock_guard<std::mutex> g(mu_);
      queue_.push_back(std::move(task));
    }
    cv_.notify_one();
  }

 private:
  void loop() {
    for (;;) {
      std::function<void()> task;
      {
        std::unique_lock<std::mutex> l(mu_);
        cv_.wait(l, [this] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;
        task = std::move(queue_.front());
        queue_.pop_front();
      }
      task();
    }
  }
  std::vector<std::thread> threads_;
  std::deque<std::function<void()>> queue_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
};

int g_checks = 0, g_failures = 0;
std::mt19937 g_rng(12345);

float uniform() { return std::uniform_real_distribution<float>(-1.f, 1.f)(g_rng); }

std::vector<float> random_vec(int64_t n) {
  std::vector<float> v(n);
  for (auto& e : v) e = uniform();
  return v;
}

// W (n_in, n_out) with random pattern at `density`; output column 0 fully dense, column
// n_out / 2 fully pruned (when n_out > 1), so both edge rows of the CSR of W.T occur.
std::vector<float> random_sparse(int64_t n_in, int64_t n_out, double density) {
  std::vector<float> w(n_in * n_out, 0.f);
  std::bernoulli_distribution keep(density);
  for (int64_t i = 0; i < n_in; ++i)
    for (int64_t j = 0; j < n_out; ++j) {
      const bool dense_col = j == 0, pruned_col = n_out > 1 && j == n_out / 2;
      if (dense_col || (!pruned_col && keep(g_rng))) w[i * n_out + j] = uniform();
    }
  return w;
}

// y = x @ w (double accumulation) and, per entry, sum |x| |w| (the scale of the rounding error).
void reference(const std::vector<float>& x, const std::vector<float>& w, int64_t batch,
               int64_t n_in, int64_t n_out, std::vector<double>* y, std::vector<double>* mag) {
  y->assign(batch * n_out, 0.0);
  mag->assign(batch * n_out, 0.0);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t i = 0; i < n_in; ++i) {
      const double xv = x[b * n_in + i];
      for (int64_t j = 0; j < n_out; ++j) {
        const double wv = w[i * n_out + j];
        if (wv == 0.0) continue;
        (*y)[b * n_out + j] += xv * wv;
        (*mag)[b * n_out + j] += std::fabs(xv * wv);
      }
    }
}

void compare(const char* kernel, const char* detail, int64_t batch, int64_t n_in, int64_t n_out,
             int threads, const std::vector<float>& got, const std::vector<double>& want,
             const std::vector<double>& mag) {
  ++g_checks;
  for (int64_t e = 0; e < batch * n_out; ++e) {
    const double err = std::fabs(double(got[e]) - want[e]);
    if (!(err <= 1e-5 * mag[e] + 1e-6)) {
      ++g_failures;
      std::printf("FAIL %s %s batch=%lld in=%lld out=%lld threads=%d entry=%lld got=%.8g want=%.8g\n",
                  kernel, detail, (long long)batch, (long long)n_in, (long long)n_out, threads,
                  (long long)e, double(got[e]), want[e]);
      return;
    }
  }
}

struct Shape {
  int64_t n_in, n_out;
};

// Batches 0/1/3 (gather-dot), 8 and 16 (16-row tiles, partial and full), 37 (a full 32-row
// tile and a partial one) and 64; slices of 4096x4096 layers skip 3 and 16 (kept fast under
// qemu).
std::vector<int64_t> batches(const Shape& s) {
  if (s.n_in * s.n_out > 100000) return {0, 1, 8, 37, 64};
  return {0, 1, 3, 8, 16, 37, 64};
}

struct Pools {
  TestPool one{0}, three{2};  // the calling thread alone; it and two pool threads
  std::vector<std::pair<prunejax::Pool*, int>> all() { return {{&one, 1}, {&three, 3}}; }
};

template <typename I>
struct Csr {
  std::vector<int32_t> ptr{0};
  std::vector<I> idx;
  std::vector<float> val;
  Csr(const std::vector<float>& w, const Shape& s) {
    for (int64_t j = 0; j < s.n_out; ++j) {
      for (int64_t i = 0; i < s.n_in; ++i)
        if (w[i * s.n_out + j] != 0.f) {
          idx.push_back(I(i));
          val.push_back(w[i * s.n_out + j]);
        }
      ptr.push_back(int32_t(idx.size()));
    }
  }
  void check(Pools& pools, const Shape& s, const std::vector<float>& x, int64_t batch,
             const std::vector<double>& want, const std::vector<double>& mag,
             const char* detail) const {
    for (auto [pool, threads] : pools.all())
      for (int64_t tiled_from : {int64_t(8), int64_t(1)}) {  // 1: the tiled path at every batch
        std::vector<float> y(batch * s.n_out, NAN);
        prunejax::csr_matmul(*pool, x.data(), ptr.data(), idx.data(), val.data(), y.data(),
                             batch, s.n_in, s.n_out, tiled_from);
        compare(tiled_from == 1 ? "csr(tiled)" : "csr", detail, batch, s.n_in, s.n_out,
                threads, y, want, mag);
      }
  }
};

void check_csr(Pools& pools, const Shape& s, double density) {
  const std::vector<float> w = random_sparse(s.n_in, s.n_out, density);
  const Csr<int32_t> c32(w, s);
  const bool narrow = s.n_in <= 65536;
  const Csr<uint16_t> c16(narrow ? w : std::vector<float>(), narrow ? s : Shape{0, 0});
  for (int64_t batch : batches(s)) {
    const std::vector<float> x = random_vec(batch * s.n_in);
    std::vector<double> want, mag;
    reference(x, w, batch, s.n_in, s.n_out, &want, &mag);
    c32.check(pools, s, x, batch, want, mag, "int32");
    if (narrow) c16.check(pools, s, x, batch, want, mag, "uint16");
  }
}

void check_dense_rows(Pools& pools, const Shape& s) {
  const std::vector<float> w = random_sparse(s.n_in, s.n_out, 1.0);
  std::vector<float> wt(s.n_in * s.n_out);
  for (int64_t i = 0; i < s.n_in; ++i)
    for (int64_t j = 0; j < s.n_out; ++j) wt[j * s.n_in + i] = w[i * s.n_out + j];
  for (int64_t batch : batches(s)) {
    const std::vector<float> x = random_vec(batch * s.n_in);
    std::vector<double> want, mag;
    reference(x, w, batch, s.n_in, s.n_out, &want, &mag);
    for (auto [pool, threads] : pools.all()) {
      std::vector<float> y(batch * s.n_out, NAN);
      prunejax::dense_rows_matmul(*pool, x.data(), wt.data(), y.data(), batch, s.n_in, s.n_out);
      compare("dense_rows", "", batch, s.n_in, s.n_out, threads, y, want, mag);
    }
  }
}

// Blocks of (bh, bw) kept at random with probability `coverage`; block column 0 complete and
// the last block column empty (when there are two or more).
void check_block(Pools& pools, const Shape& s, int64_t bh, int64_t bw,
                 double coverage) {
  const int64_t nrb = s.n_in / bh, ncb = s.n_out / bw;
  std::vector<float> w(s.n_in * s.n_out, 0.f);
  std::vector<int32_t> colptr(1, 0), rowb;
  std::vector<float> blocks;
  std::bernoulli_distribution keep(coverage);
  for (int64_t jb = 0; jb < ncb; ++jb) {
    for (int64_t ib = 0; ib < nrb; ++ib) {
      if (!(jb == 0 || (!(ncb > 1 && jb == ncb - 1) && keep(g_rng)))) continue;
      rowb.push_back(int32_t(ib));
      for (int64_t k = 0; k < bh; ++k)
        for (int64_t c = 0; c < bw; ++c) {
          const float v = uniform();
          blocks.push_back(v);
          w[(ib * bh + k) * s.n_out + jb * bw + c] = v;
        }
    }
    colptr.push_back(int32_t(rowb.size()));
  }
  char detail[64];
  std::snprintf(detail, sizeof detail, "block=%lldx%lld", (long long)bh, (long long)bw);
  for (int64_t batch : batches(s)) {
    const std::vector<float> x = random_vec(batch * s.n_in);
    std::vector<double> want, mag;
    reference(x, w, batch, s.n_in, s.n_out, &want, &mag);
    for (auto [pool, threads] : pools.all()) {
      std::vector<float> y(batch * s.n_out, NAN);
      prunejax::block_matmul(*pool, x.data(), colptr.data(), rowb.data(), blocks.data(),
                             y.data(), batch, s.n_in, s.n_out, bh, bw);
      compare("block", detail, batch, s.n_in, s.n_out, threads, y, want, mag);
    }
  }
}

void run_all(Pools& pools) {
  const Shape csr_shapes[] = {{1, 1}, {7, 13}, {13, 7}, {64, 4096}, {4096, 64}, {300, 100}};
  for (const Shape& s : csr_shapes)
    for (double density : {0.1, 1.0, 0.0}) check_csr(pools, s, density);
  check_csr(pools, {70000, 3}, 0.01);  // indices beyond uint16: int32 only
  const Shape rows_shapes[] = {{1, 1}, {7, 13}, {13, 7}, {64, 4096}, {4096, 64}, {129, 33}};
  for (const Shape& s : rows_shapes) check_dense_rows(pools, s);
  const Shape block16[] = {{16, 16}, {48, 80}, {64, 4096}, {4096, 64}};
  for (const Shape& s : block16)
    for (double coverage : {0.1, 0.5, 1.0}) check_block(pools, s, 16, 16, coverage);
  check_block(pools, {8192, 32}, 16, 16, 0.1);  // x re-laid out beyond 1 MiB at batch 37
  check_block(pools, {64, 96}, 16, 32, 0.5);
  check_block(pools, {96, 64}, 32, 32, 0.5);
  check_block(pools, {12, 10}, 4, 2, 0.5);  // generic block widths
  check_block(pools, {24, 24}, 8, 8, 0.5);
}

}  // namespace

int main() {
  std::printf("isa=%s\n", prunejax::isa_name());
  Pools pools;
  run_all(pools);
  std::printf("checks=%d failures=%d\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
