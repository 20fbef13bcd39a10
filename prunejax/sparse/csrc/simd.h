// The portable SIMD layer of the prunejax kernels: one fp32 vector type, `vf`, whose width is
// chosen at compile time from the target the compiler was given (-march=...), and the five
// operations the kernels need (load, store, splat, multiply-add, horizontal sum).
//
// Built on GCC/Clang vector extensions (__attribute__((vector_size(N)))): the compiler lowers
// the same source to AVX-512 zmm, AVX2+FMA ymm, SSE2 xmm or aarch64 NEON q registers, and
// `a * b + c` to one FMA instruction (-ffp-contract=fast).  The kernels need nothing beyond
// element-wise arithmetic on full vectors (no gathers, masks, shuffles), so a header-only
// library such as Google Highway would add a build dependency (libhwy-dev, its headers on every
// user's machine at first use) for no instruction the vector extensions cannot emit.
//
// PRUNEJAX_NO_SIMD (set by PRUNEJAX_ISA=scalar) makes `vf` a one-lane vector: the same kernels
// then run as plain scalar loops, the reference path every CPU can execute.
#ifndef PRUNEJAX_SPARSE_CSRC_SIMD_H_
#define PRUNEJAX_SPARSE_CSRC_SIMD_H_

#include <cstring>

namespace prunejax {
namespace simd {

// kLanes: floats per vector; kRegs: architectural vector registers (the register-blocking
// budget); kIsa: the path's name, reported by isa_name().
#if defined(PRUNEJAX_NO_SIMD)
inline constexpr int kLanes = 1;
inline constexpr int kRegs = 16;
inline constexpr const char* kIsa = "scalar";
#elif defined(__AVX512F__)
inline constexpr int kLanes = 16;
inline constexpr int kRegs = 32;
inline constexpr const char* kIsa = "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
inline constexpr int kLanes = 8;
inline constexpr int kRegs = 16;
inline constexpr const char* kIsa = "avx2";
#elif defined(__AVX__)
inline constexpr int kLanes = 8;
inline constexpr int kRegs = 16;
inline constexpr const char* kIsa = "avx";
#elif defined(__aarch64__) && defined(__ARM_NEON)
inline constexpr int kLanes = 4;
inline constexpr int kRegs = 32;
inline constexpr const char* kIsa = "neon";
#elif defined(__SSE2__)
inline constexpr int kLanes = 4;
inline constexpr int kRegs = 16;
inline constexpr const char* kIsa = "sse2";
#else
inline constexpr int kLanes = 1;
inline constexpr int kRegs = 16;
inline constexpr const char* kIsa = "scalar";
#endif

typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));

// Unaligned load / store of kLanes floats (one vmovups / ldr q on the vector paths).
inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

// Every lane s: one vbroadcastss / dup.  (s - 0 is s for every s, so the compiler drops the
// subtraction; `vf{} + s` would keep an add, as 0 + -0 is +0.)
inline vf splat(float s) { return s - vf{}; }

inline vf zero() { return vf{}; }

// a * b + c; contracted to one fused multiply-add where the target has one.
inline vf madd(vf a, vf b, vf c) { return a * b + c; }

// The sum of the lanes, pairwise.
inline float hsum(vf v) {
  float t[kLanes];
  std::memcpy(t, &v, sizeof v);
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) t[i] += t[i + w];
  return t[0];
}

// Largest power of two <= n (n >= 1), else 1.
constexpr int pow2_floor(int n) {
  int p = 1;
  while (2 * p <= n) p *= 2;
  return p;
}

// Rows of a register block whose per-row accumulators are `v` vectors, keeping `v` more vectors
// (the loaded operand) and one broadcast register live: in [1, cap] (6 rows of 2 ymm on AVX2,
// the 6x16 register block of BLIS's Haswell kernel).
constexpr int block_rows(int v, int cap) {
  const int fit = (kRegs - 1 - v) / v;
  return fit < 1 ? 1 : (fit < cap ? fit : cap);
}

}  // namespace simd
}  // namespace prunejax

#endif  // PRUNEJAX_SPARSE_CSRC_SIMD_H_
