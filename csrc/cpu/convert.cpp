// Row conversions between fp32 and the storage dtypes; see convert.h. The fp32 <-> bf16 rows use
// AVX-512 (BW, VL) intrinsics where the CPU has them, else plain C++ loops that GCC vectorizes,
// compiled for AVX-512, AVX2 and baseline x86-64 (target_clones); fp16 uses F16C when the CPU has
// it.
#include "convert.h"

#include <cmath>
#include <cstring>

#include "multiversion.h"

#ifdef TRANSFUSE_X86_MULTIVERSION
#include <immintrin.h>

#include "bf16_avx512.h"
#endif

namespace transfuse::cpu {
namespace {

// ------------------------------------------------------------------------------------------------
// Scalar dtype conversions
// ------------------------------------------------------------------------------------------------

// bf16 -> f32 is exact: the bf16 bits are the top half of the f32 bits.
inline float bf16_to_float(uint16_t value) { return float_from_bits(uint32_t(value) << 16); }

// f32 -> bf16, round to nearest even; a NaN stays a NaN (quieted, sign and top payload kept).
// Branch-free so the row loops that call it vectorize.
inline uint16_t float_to_bf16(float value) {
  const uint32_t bits = bits_of(value);
  const bool is_nan = (bits & 0x7fffffffu) > 0x7f800000u;
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (bits >> 16) | 0x0040u;
  return uint16_t(is_nan ? quiet_nan : rounded);
}

// f16 -> f32, exact for every input (normals, subnormals, inf, NaN). The bit trick of the FP16
// library (fp16_ieee_to_fp32_value), which is also what c10::Half uses.
inline float f16_to_float(uint16_t value) {
  const uint32_t w = uint32_t(value) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  // Normal (and inf/NaN) inputs: move exponent and mantissa into place, rebias by a multiply.
  const uint32_t exponent_offset = 0xE0u << 23;
  const float normalized = float_from_bits((two_w >> 4) + exponent_offset) * 0x1.0p-112f;
  // Subnormal inputs: mantissa as the low bits of 0.5f's significand, then subtract 0.5f.
  const uint32_t magic_mask = 126u << 23;
  const float denormalized = float_from_bits((two_w >> 17) | magic_mask) - 0.5f;
  const uint32_t denormalized_cutoff = 1u << 27;
  const uint32_t magnitude = two_w < denormalized_cutoff ? bits_of(denormalized) : bits_of(normalized);
  return float_from_bits(sign | magnitude);
}

// f32 -> f16, IEEE round to nearest even with subnormals, overflow to inf, NaN -> quiet NaN.
// The FP16 library's fp16_ieee_from_fp32_value (c10::Half's scalar conversion): the float adds
// below do the rounding in hardware. Bit-exact with F16C's vcvtps2ph for every non-NaN input.
inline uint16_t float_to_f16(float value) {
  const float scale_to_inf = 0x1.0p+112f;
  const float scale_to_zero = 0x1.0p-110f;
  float base = (std::fabs(value) * scale_to_inf) * scale_to_zero;
  const uint32_t w = bits_of(value);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = float_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = bits_of(base);
  const uint32_t exponent_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exponent_bits + mantissa_bits;
  return uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

// ------------------------------------------------------------------------------------------------
// Row conversions between a dtype and fp32
// ------------------------------------------------------------------------------------------------

TRANSFUSE_MULTIVERSION
void bf16_row_to_float_portable(const uint16_t* __restrict src, float* __restrict dst,
                                 int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = bf16_to_float(src[j]);
}

TRANSFUSE_MULTIVERSION
void float_row_to_bf16_portable(const float* __restrict src, uint16_t* __restrict dst,
                                 int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = float_to_bf16(src[j]);
}

// v = float(bf16(v)), in place.
TRANSFUSE_MULTIVERSION
void round_row_to_bf16_portable(float* __restrict values, int64_t n) {
  for (int64_t j = 0; j < n; ++j) values[j] = bf16_to_float(float_to_bf16(values[j]));
}

void f16_row_to_float_scalar(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = f16_to_float(src[j]);
}

void float_row_to_f16_scalar(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = float_to_f16(src[j]);
}

void round_row_to_f16_scalar(float* values, int64_t n) {
  for (int64_t j = 0; j < n; ++j) values[j] = f16_to_float(float_to_f16(values[j]));
}

#ifdef TRANSFUSE_X86_MULTIVERSION
// F16C versions: 8 values per instruction; the last n % 8 go through a padded 8-wide block so
// they get exactly the same conversion as the rest.
constexpr int kRoundToNearestEven = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

__attribute__((target("avx2,f16c")))
void f16_row_to_float_f16c(const uint16_t* src, float* dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j));
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(halves));
  }
  if (j < n) {
    alignas(16) uint16_t block_in[8] = {};
    alignas(32) float block_out[8];
    std::memcpy(block_in, src + j, (n - j) * sizeof(uint16_t));
    _mm256_store_ps(block_out, _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(block_in))));
    std::memcpy(dst + j, block_out, (n - j) * sizeof(float));
  }
}

__attribute__((target("avx2,f16c")))
void float_row_to_f16_f16c(const float* src, uint16_t* dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m128i halves = _mm256_cvtps_ph(_mm256_loadu_ps(src + j), kRoundToNearestEven);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j), halves);
  }
  if (j < n) {
    alignas(32) float block_in[8] = {};
    alignas(16) uint16_t block_out[8];
    std::memcpy(block_in, src + j, (n - j) * sizeof(float));
    _mm_store_si128(reinterpret_cast<__m128i*>(block_out),
                    _mm256_cvtps_ph(_mm256_load_ps(block_in), kRoundToNearestEven));
    std::memcpy(dst + j, block_out, (n - j) * sizeof(uint16_t));
  }
}

__attribute__((target("avx2,f16c")))
void round_row_to_f16_f16c(float* values, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m128i halves = _mm256_cvtps_ph(_mm256_loadu_ps(values + j), kRoundToNearestEven);
    _mm256_storeu_ps(values + j, _mm256_cvtph_ps(halves));
  }
  if (j < n) {
    alignas(32) float block[8] = {};
    std::memcpy(block, values + j, (n - j) * sizeof(float));
    _mm256_store_ps(block, _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_load_ps(block), kRoundToNearestEven)));
    std::memcpy(values + j, block, (n - j) * sizeof(float));
  }
}

bool cpu_has_f16c() {
  static const bool has_f16c = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return has_f16c;
}

// AVX-512 versions of the bf16 rows: 16 values a step (unmasked: masked stores are slow on Zen 4
// and do not forward to the loads that follow), the last ones under a mask, the rounding
// of float_to_bf16 (bf16_bits): GCC's vectorization of the portable loops above takes 256-bit
// steps and 3-4x the instructions (37% of a bf16 add + LayerNorm's time was float_row_to_bf16).
#define TRANSFUSE_BF16_ROWS __attribute__((target("avx512f,avx512bw,avx512vl")))

TRANSFUSE_BF16_ROWS void bf16_row_to_float_avx512(const uint16_t* src, float* dst, int64_t n) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    _mm512_storeu_ps(dst + j,
                     float_of_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + j))));
  const __mmask16 tail = __mmask16((1u << (n - j)) - 1);
  if (tail)
    _mm512_mask_storeu_ps(dst + j, tail, float_of_bf16(_mm256_maskz_loadu_epi16(tail, src + j)));
}

TRANSFUSE_BF16_ROWS void float_row_to_bf16_avx512(const float* src, uint16_t* dst, int64_t n) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j),
                        _mm512_cvtepi32_epi16(bf16_bits(_mm512_loadu_ps(src + j))));
  const __mmask16 tail = __mmask16((1u << (n - j)) - 1);
  if (tail) store_bf16(dst + j, tail, bf16_bits(_mm512_maskz_loadu_ps(tail, src + j)));
}

TRANSFUSE_BF16_ROWS void round_row_to_bf16_avx512(float* values, int64_t n) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    _mm512_storeu_ps(values + j, float_of_bf16_bits(bf16_bits(_mm512_loadu_ps(values + j))));
  const __mmask16 tail = __mmask16((1u << (n - j)) - 1);
  if (tail)
    _mm512_mask_storeu_ps(values + j, tail,
                          float_of_bf16_bits(bf16_bits(_mm512_maskz_loadu_ps(tail, values + j))));
}
#endif

void bf16_row_to_float(const uint16_t* src, float* dst, int64_t n) {
#ifdef TRANSFUSE_X86_MULTIVERSION
  if (has_avx512bw_vl()) return bf16_row_to_float_avx512(src, dst, n);
#endif
  bf16_row_to_float_portable(src, dst, n);
}

void float_row_to_bf16(const float* src, uint16_t* dst, int64_t n) {
#ifdef TRANSFUSE_X86_MULTIVERSION
  if (has_avx512bw_vl()) return float_row_to_bf16_avx512(src, dst, n);
#endif
  float_row_to_bf16_portable(src, dst, n);
}

void round_row_to_bf16(float* values, int64_t n) {
#ifdef TRANSFUSE_X86_MULTIVERSION
  if (has_avx512bw_vl()) return round_row_to_bf16_avx512(values, n);
#endif
  round_row_to_bf16_portable(values, n);
}

void f16_row_to_float(const uint16_t* src, float* dst, int64_t n) {
#ifdef TRANSFUSE_X86_MULTIVERSION
  if (cpu_has_f16c()) return f16_row_to_float_f16c(src, dst, n);
#endif
  f16_row_to_float_scalar(src, dst, n);
}

void float_row_to_f16(const float* src, uint16_t* dst, int64_t n) {
#ifdef TRANSFUSE_X86_MULTIVERSION
  if (cpu_has_f16c()) return float_row_to_f16_f16c(src, dst, n);
#endif
  float_row_to_f16_scalar(src, dst, n);
}

void round_row_to_f16(float* values, int64_t n) {
#ifdef TRANSFUSE_X86_MULTIVERSION
  if (cpu_has_f16c()) return round_row_to_f16_f16c(values, n);
#endif
  round_row_to_f16_scalar(values, n);
}

}  // namespace

// dst = float(src), src of dtype `dtype`.
void load_row(const void* src, DType dtype, float* dst, int64_t n) {
  switch (dtype) {
    case DType::f32: std::memcpy(dst, src, n * sizeof(float)); break;
    case DType::f16: f16_row_to_float(static_cast<const uint16_t*>(src), dst, n); break;
    case DType::bf16: bf16_row_to_float(static_cast<const uint16_t*>(src), dst, n); break;
  }
}

// dst = dtype(src), rounded to nearest even.
void store_row(const float* src, DType dtype, void* dst, int64_t n) {
  switch (dtype) {
    case DType::f32: std::memcpy(dst, src, n * sizeof(float)); break;
    case DType::f16: float_row_to_f16(src, static_cast<uint16_t*>(dst), n); break;
    case DType::bf16: float_row_to_bf16(src, static_cast<uint16_t*>(dst), n); break;
  }
}

// values = round_dtype(values): converted to `dtype` and back (a no-op for f32).
void round_row(float* values, DType dtype, int64_t n) {
  switch (dtype) {
    case DType::f32: break;
    case DType::f16: round_row_to_f16(values, n); break;
    case DType::bf16: round_row_to_bf16(values, n); break;
  }
}

}  // namespace transfuse::cpu
