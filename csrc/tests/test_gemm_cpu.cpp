// Torch-free unit test of the CPU GEMV (cpu/gemv.cpp) and GEMMs (cpu/gemm.cpp, gemm_bf16.cpp) on
// few rows, against a double-precision reference written out here: every row count from 1 to
// kGemvMaxRows and some more for the GEMMs (up to 200: three blocks of rows on AVX2), fp32 and
// bf16, with and without bias, GELU and per-row scales (w8a8's x scales; not the bf16 GEMM's), n
// and k tails, 1 and 2 threads, the GEMMs' weights packed per call and packed before, and the fp32
// GEMM on int8 weights (their int8 strips packed before on AVX2). (transfuse.ops.linear runs the
// GEMV's multi-row tiles for inference tensors' weights and for bf16 without AVX512_BF16.) On a CPU
// with AVX2 but not AVX-512 the GEMV and the fp32 GEMM run. Every output buffer is filled with NaN
// before the kernel runs, so an element the kernel forgets to write fails. Exits 77 (skipped) on a
// CPU with neither AVX-512 nor AVX2 and FMA.
//
//   g++ -std=c++17 -O3 -fopenmp -I csrc csrc/tests/test_gemm_cpu.cpp csrc/cpu/*.cpp \
//       -o test_gemm_cpu
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "cpu/gemm.h"

using transfuse::DType;
using transfuse::GemmParams;
using transfuse::GeluApproximation;

namespace {

// A bf16 value's bits: the upper half of a float's (the test's inputs are made bf16-exact first).
uint16_t bf16_bits_of(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  return uint16_t(bits >> 16);
}

float float_of_bf16(uint16_t bits) {
  const uint32_t widened = uint32_t(bits) << 16;
  float value;
  std::memcpy(&value, &widened, 4);
  return value;
}

double gelu(double z) { return 0.5 * z * (1.0 + std::erf(z / std::sqrt(2.0))); }

// gemm_int8: the fp32 GEMM on int8 weights (w8a16, and w8a8 where the CPU has no int8 dot
// product) with per-column scales; packed before: as int8 strips, on AVX2 only.
enum class Kernel { gemv, gemm, gemm_packed_before, gemm_int8, gemm_int8_packed_before };

// One call of `kernel` on fresh inputs; returns the number of elements outside the bound: fp32
// accumulation over k terms (through GELU, slope <= 1.13), GELU's own error, one rounding.
int check(Kernel kernel, DType dtype, int64_t m, int64_t n, int64_t k, bool bias, bool act,
          bool scale_rows, int threads, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<float> uniform(0.5f, 2.f);
  const bool bf16 = dtype == DType::bf16;
  const bool int8 = kernel == Kernel::gemm_int8 || kernel == Kernel::gemm_int8_packed_before;
  std::uniform_int_distribution<int> integer(-127, 127);
  std::vector<float> x(m * k), w(n * k), b(n), x_scale(m), w_scale(n, 1.f);
  std::vector<int8_t> w8(n * k);
  for (float& v : x_scale) v = uniform(rng);
  for (float& v : x) v = bf16 ? float_of_bf16(bf16_bits_of(normal(rng))) : normal(rng);
  for (float& v : w) v = bf16 ? float_of_bf16(bf16_bits_of(normal(rng))) : normal(rng);
  for (float& v : b) v = normal(rng);
  if (int8) {
    for (int64_t e = 0; e < n * k; ++e) w[e] = float(w8[e] = int8_t(integer(rng)));
    for (float& v : w_scale) v = uniform(rng) / 127;
  }
  std::vector<uint16_t> x16(m * k), w16(n * k), out16(m * n, 0x7FC0);  // out: NaN
  for (size_t i = 0; i < x.size(); ++i) x16[i] = bf16_bits_of(x[i]);
  for (size_t i = 0; i < w.size(); ++i) w16[i] = bf16_bits_of(w[i]);
  std::vector<float> out(m * n, std::numeric_limits<float>::quiet_NaN());

  GemmParams p;
  p.x = bf16 ? static_cast<const void*>(x16.data()) : x.data();
  p.w = bf16 ? static_cast<const void*>(w16.data()) : int8 ? static_cast<const void*>(w8.data())
                                                           : w.data();
  p.w_int8 = int8;
  p.w_scale = int8 ? w_scale.data() : nullptr;
  p.bias = bias ? b.data() : nullptr;
  p.x_scale = scale_rows ? x_scale.data() : nullptr;
  p.out = bf16 ? static_cast<void*>(out16.data()) : out.data();
  p.m = m, p.n = n, p.k = k, p.dtype = dtype, p.gelu = act, p.num_threads = threads;
  std::vector<char> packed;
  if (kernel == Kernel::gemm_packed_before) {
    using namespace transfuse::cpu;
    packed.resize(bf16 ? packed_weight_bytes_bf16(n, k) : packed_weight_bytes_fp32(n, k));
    const bool ok = bf16 ? pack_weight_bf16(w16.data(), n, k, packed.data(), threads)
                         : pack_weight_fp32(w.data(), n, k, packed.data(), threads);
    if (!ok) return 1;
    p.w_packed = packed.data();
  }
  if (kernel == Kernel::gemm_int8_packed_before) {
    using namespace transfuse::cpu;
    packed.resize(packed_weight_bytes_int8_strips(n, k));
    if (!pack_weight_int8_strips(w8.data(), n, k, packed.data(), threads)) return 1;
    p.w_packed = packed.data();
  }
  const bool ran = kernel == Kernel::gemv ? transfuse::cpu::gemv(p)
                   : bf16                 ? transfuse::cpu::gemm_bf16(p)
                                          : transfuse::cpu::gemm(p);
  if (!ran) return 1;

  const double eps32 = std::ldexp(1.0, -24), eps_out = bf16 ? std::ldexp(1.0, -8) : eps32;
  int bad = 0;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double sum = 0.0, magnitude = 0.0;
      for (int64_t t = 0; t < k; ++t) {
        sum += double(x[i * k + t]) * w[j * k + t];
        magnitude += std::fabs(double(x[i * k + t]) * w[j * k + t]);
      }
      const double scale = (scale_rows ? x_scale[i] : 1.0) * w_scale[j];
      const double z = sum * scale + (bias ? b[j] : 0.0);
      magnitude = magnitude * scale + (bias ? std::fabs(b[j]) : 0.0);
      const double expected = act ? gelu(z) : z;
      const double got = bf16 ? float_of_bf16(out16[i * n + j]) : out[i * n + j];
      const double bound = 1.2 * 2 * (k + 1) * eps32 * magnitude +
                           3e-7 * std::fmax(1.0, std::fabs(z)) + std::fabs(expected) * eps_out +
                           1e-30;
      if (!(std::fabs(got - expected) <= bound)) ++bad;  // NaN fails too
    }
  return bad;
}

}  // namespace

int main() {
  if (!transfuse::cpu::has_gemv()) {
    std::printf("skipped: neither AVX-512 nor AVX2 with FMA\n");
    return 77;
  }
  using transfuse::cpu::gemm_max_rows;
  std::mt19937 rng(2026);
  const int64_t shapes[][2] = {{1, 1}, {17, 300}, {33, 16}, {64, 17}, {130, 513}, {70, 1600}};
  std::vector<int64_t> rows;
  for (int64_t m = 1; m <= transfuse::cpu::kGemvMaxRows; ++m) rows.push_back(m);
  int failures = 0, cases = 0;
  for (Kernel kernel : {Kernel::gemv, Kernel::gemm, Kernel::gemm_packed_before, Kernel::gemm_int8,
                        Kernel::gemm_int8_packed_before})
    for (DType dtype : {DType::f32, DType::bf16}) {
      const bool bf16 = dtype == DType::bf16;
      const bool int8 = kernel == Kernel::gemm_int8 || kernel == Kernel::gemm_int8_packed_before;
      if (kernel != Kernel::gemv &&
          (bf16 && !int8 ? !transfuse::cpu::has_gemm_bf16() : gemm_max_rows() == 0))
        continue;
      if ((int8 && bf16) || (kernel == Kernel::gemm_int8_packed_before &&
                             transfuse::cpu::packed_weight_bytes_int8_strips(1, 1) == 0))
        continue;  // (x and out fp32; int8 strips kept on AVX2 only)
      std::vector<int64_t> counts = rows;
      if (kernel != Kernel::gemv)
        for (int64_t m : {16, 23, 41, 64, 96, 97, 200})
          if (bf16 || m <= gemm_max_rows()) counts.push_back(m);
      for (int64_t m : counts)
        for (const auto& shape : shapes) {
          const bool bias = (m + shape[0]) % 2 == 0, act = (m + shape[1]) % 3 == 0;
          const bool scale_rows = (m + shape[1]) % 2 == 1 && !(bf16 && kernel != Kernel::gemv);
          const int threads = 1 + int(m % 2);
          const int bad =
              check(kernel, dtype, m, shape[0], shape[1], bias, act, scale_rows, threads, rng);
          ++cases;
          if (bad) {
            ++failures;
            std::printf("FAIL kernel %d dtype %s m %lld n %lld k %lld bias %d gelu %d scaled %d: "
                        "%d bad\n", int(kernel), dtype == DType::bf16 ? "bf16" : "fp32",
                        (long long)m, (long long)shape[0], (long long)shape[1], bias, act,
                        scale_rows, bad);
          }
        }
    }
  std::printf("%d of %d cases passed\n", cases - failures, cases);
  return failures ? 1 : 0;
}
