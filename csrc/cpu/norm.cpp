// CPU kernels for fused (residual add +) LayerNorm / RMSNorm. The math is stated in common/norm.h.
//
// Layout of the work: OpenMP threads split the rows statically; each thread handles one row at a
// time from start to end (residual add, statistics, normalization, output) while the row sits in
// L1/L2, so every input is read from memory once and every output written once. All arithmetic is
// fp32: 16-bit rows are converted into per-thread fp32 scratch rows and back.
//
// The fp32 row loops are plain C++ loops that GCC vectorizes; GCC function multiversioning
// (target_clones) compiles each of them for AVX-512, AVX2 and baseline x86-64, and the best one is
// picked at load time. The 16-bit conversions are cpu/convert's; a bf16 x + residual takes one
// AVX-512 pass (add_bf16_rows) where the CPU has it. Calls whose tensors exceed
// the last-level cache write their outputs with non-temporal stores (explicit AVX-512 / AVX2 code
// for the fp32 rows), which takes the add + LayerNorm of large fp32 tensors close to the memory
// bandwidth floor of reading the inputs and writing the outputs once.
#include "norm.h"

#include "convert.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "multiversion.h"
#include "threads.h"

#ifdef TRANSFUSE_X86_MULTIVERSION
#include <immintrin.h>

#include "bf16_avx512.h"
#endif

namespace transfuse::cpu {
namespace {

// ------------------------------------------------------------------------------------------------
// Non-temporal (streaming) writes of finished rows
//
// When a call's tensors are larger than the last-level cache, its outputs cannot stay in cache for
// the next op anyway; writing them with non-temporal stores then skips reading every destination
// line before overwriting it (half the memory traffic of the writes) and does not evict the rows
// still being read.
// ------------------------------------------------------------------------------------------------

// Size of the highest-level cache of CPU 0 (one instance: what one core's working set can use), as
// Linux reports it in sysfs; 32 MiB where that is unavailable. (glibc's sysconf is no help here: on
// some AMD parts it reports the L3 of the whole package, several times what one core can use.)
int64_t last_level_cache_bytes() {
  int best_level = 0;
  int64_t best_bytes = 0;
  for (int index = 0; index < 8; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    std::ifstream level_file(dir + "level"), size_file(dir + "size");
    int level = 0;
    int64_t size = 0;
    std::string unit;
    if (!(level_file >> level) || !(size_file >> size)) continue;
    size_file >> unit;  // "K" or "M" follows the number
    if (!unit.empty() && unit[0] == 'K') size <<= 10;
    if (!unit.empty() && unit[0] == 'M') size <<= 20;
    if (level > best_level && size > 0) {
      best_level = level;
      best_bytes = size;
    }
  }
  return best_bytes > 0 ? best_bytes : int64_t(32) << 20;
}

// Whether a call that reads and writes `bytes_touched` bytes should write with non-temporal stores.
bool use_streaming_stores(int64_t bytes_touched) {
#ifdef TRANSFUSE_X86_MULTIVERSION
  static const int64_t cache_bytes = last_level_cache_bytes();
  return bytes_touched > cache_bytes;
#else
  (void)bytes_touched;
  return false;
#endif
}

#ifdef TRANSFUSE_X86_MULTIVERSION

// dst = src with non-temporal stores of whole aligned vectors; the unaligned head and the tail go
// through ordinary stores.
__attribute__((target("avx512f")))
void stream_bytes_avx512(const void* src, void* dst, int64_t bytes) {
  const char* from = static_cast<const char*>(src);
  char* to = static_cast<char*>(dst);
  const int64_t head = std::min<int64_t>(bytes, (64 - reinterpret_cast<uintptr_t>(to) % 64) % 64);
  std::memcpy(to, from, head);
  int64_t done = head;
  for (; done + 64 <= bytes; done += 64) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(to + done), _mm512_loadu_si512(from + done));
  }
  std::memcpy(to + done, from + done, bytes - done);
}

__attribute__((target("avx2")))
void stream_bytes_avx2(const void* src, void* dst, int64_t bytes) {
  const char* from = static_cast<const char*>(src);
  char* to = static_cast<char*>(dst);
  const int64_t head = std::min<int64_t>(bytes, (32 - reinterpret_cast<uintptr_t>(to) % 32) % 32);
  std::memcpy(to, from, head);
  int64_t done = head;
  for (; done + 32 <= bytes; done += 32) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(to + done),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(from + done)));
  }
  std::memcpy(to + done, from + done, bytes - done);
}

void stream_bytes(const void* src, void* dst, int64_t bytes) {
  switch (vector_isa()) {
    case VectorIsa::avx512: return stream_bytes_avx512(src, dst, bytes);
    case VectorIsa::avx2: return stream_bytes_avx2(src, dst, bytes);
    case VectorIsa::baseline: std::memcpy(dst, src, bytes); return;
  }
}

// Orders this thread's non-temporal stores before whatever it does next (the OpenMP barrier).
void finish_streaming_stores() { _mm_sfence(); }
#else
void stream_bytes(const void* src, void* dst, int64_t bytes) { std::memcpy(dst, src, bytes); }
void finish_streaming_stores() {}
#endif

// dst = dtype(values), with non-temporal stores when `streaming` (`staging`: n 16-bit scratch
// values for the converted row of a 16-bit dtype).
void write_row(const float* values, DType dtype, void* dst, int64_t n, bool streaming, uint16_t* staging) {
  if (!streaming) return store_row(values, dtype, dst, n);
  if (dtype == DType::f32) return stream_bytes(values, dst, n * int64_t(sizeof(float)));
  store_row(values, dtype, staging, n);
  stream_bytes(staging, dst, n * int64_t(sizeof(uint16_t)));
}

// Address of row `row` of a contiguous [rows, cols] matrix of `dtype`.
template <typename Pointer>
Pointer row_address(Pointer base, DType dtype, int64_t row, int64_t cols) {
  using Byte = std::conditional_t<std::is_const_v<std::remove_pointer_t<Pointer>>, const char, char>;
  return static_cast<Byte*>(base) + row * cols * dtype_size(dtype);
}

// ------------------------------------------------------------------------------------------------
// Forward row kernels (fp32)
// ------------------------------------------------------------------------------------------------

// Row reductions keep kPartialSums independent running sums (a few vector registers' worth, one
// per column modulo kPartialSums): consecutive vector adds do not wait on each other, and the fp32
// rounding error grows with cols / kPartialSums instead of cols, whatever instruction set runs.
constexpr int64_t kPartialSums = 64;

// Sum of the kPartialSums partial sums, as a tree of halvings (vectorizable, short dependency chain).
inline float sum_partials(float* partial) {
  for (int64_t width = kPartialSums / 2; width >= 1; width /= 2) {
    for (int64_t k = 0; k < width; ++k) partial[k] += partial[k + width];
  }
  return partial[0];
}

// h = x + residual; returns sum(h).
TRANSFUSE_MULTIVERSION
float add_rows_and_sum(const float* __restrict x, const float* __restrict residual,
                       float* __restrict h, int64_t n) {
  float partial[kPartialSums] = {};
  int64_t start = 0;
  for (; start + kPartialSums <= n; start += kPartialSums) {
    for (int64_t k = 0; k < kPartialSums; ++k) {
      const float value = x[start + k] + residual[start + k];
      h[start + k] = value;
      partial[k] += value;
    }
  }
  for (int64_t k = 0; start + k < n; ++k) {
    const float value = x[start + k] + residual[start + k];
    h[start + k] = value;
    partial[k] += value;
  }
  return sum_partials(partial);
}

// total += addend, in place (x + residual of 16-bit inputs; the dweight / dbias thread reduction).
TRANSFUSE_MULTIVERSION
void add_row_in_place(float* __restrict total, const float* __restrict addend, int64_t n) {
  for (int64_t j = 0; j < n; ++j) total[j] += addend[j];
}

// h = bf16(x + residual) for bf16 rows, in one pass: to h_out, and in fp32 to h.
#ifdef TRANSFUSE_X86_MULTIVERSION
#define TRANSFUSE_ADD_BF16 __attribute__((target("avx512f,avx512bw,avx512vl")))

TRANSFUSE_ADD_BF16 void add_bf16_rows(const uint16_t* x, const uint16_t* residual, float* h,
                                      uint16_t* h_out, int64_t n) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 inside = n - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - j)) - 1);
    const __m512i bits =
        bf16_bits(_mm512_add_ps(float_of_bf16(_mm256_maskz_loadu_epi16(inside, x + j)),
                                float_of_bf16(_mm256_maskz_loadu_epi16(inside, residual + j))));
    const __m512 rounded = float_of_bf16_bits(bits);
    if (inside == 0xffff) {  // unmasked stores: masked ones are slow on Zen 4
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(h_out + j), _mm512_cvtepi32_epi16(bits));
      _mm512_storeu_ps(h + j, rounded);
    } else {
      store_bf16(h_out + j, inside, bits);
      _mm512_mask_storeu_ps(h + j, inside, rounded);
    }
  }
}
#else
void add_bf16_rows(const uint16_t*, const uint16_t*, float*, uint16_t*, int64_t) {}
#endif

// sum(h)
TRANSFUSE_MULTIVERSION
float row_sum(const float* __restrict h, int64_t n) {
  float partial[kPartialSums] = {};
  int64_t start = 0;
  for (; start + kPartialSums <= n; start += kPartialSums) {
    for (int64_t k = 0; k < kPartialSums; ++k) partial[k] += h[start + k];
  }
  for (int64_t k = 0; start + k < n; ++k) partial[k] += h[start + k];
  return sum_partials(partial);
}

// sum((h - mean)^2); with mean = 0 the sum of squares of RMSNorm.
TRANSFUSE_MULTIVERSION
float row_sum_squared_deviations(const float* __restrict h, float mean, int64_t n) {
  float partial[kPartialSums] = {};
  int64_t start = 0;
  for (; start + kPartialSums <= n; start += kPartialSums) {
    for (int64_t k = 0; k < kPartialSums; ++k) {
      const float deviation = h[start + k] - mean;
      partial[k] += deviation * deviation;
    }
  }
  for (int64_t k = 0; start + k < n; ++k) {
    const float deviation = h[start + k] - mean;
    partial[k] += deviation * deviation;
  }
  return sum_partials(partial);
}

// y = ((h - mean) * rstd) * scale + shift, where scale / shift may be null (then 1 / 0).
TRANSFUSE_MULTIVERSION
void normalize_row(const float* __restrict h, float mean, float rstd, const float* __restrict scale,
                   const float* __restrict shift, float* __restrict y, int64_t n) {
  if (scale && shift) {
    for (int64_t j = 0; j < n; ++j) y[j] = ((h[j] - mean) * rstd) * scale[j] + shift[j];
  } else if (scale) {
    for (int64_t j = 0; j < n; ++j) y[j] = ((h[j] - mean) * rstd) * scale[j];
  } else if (shift) {
    for (int64_t j = 0; j < n; ++j) y[j] = ((h[j] - mean) * rstd) + shift[j];
  } else {
    for (int64_t j = 0; j < n; ++j) y[j] = (h[j] - mean) * rstd;
  }
}

// y = y * scale + shift, in place; scale / shift may be null (then 1 / 0).
TRANSFUSE_MULTIVERSION
void scale_shift_row(float* __restrict y, const float* __restrict scale, const float* __restrict shift,
                     int64_t n) {
  if (scale && shift) {
    for (int64_t j = 0; j < n; ++j) y[j] = y[j] * scale[j] + shift[j];
  } else if (scale) {
    for (int64_t j = 0; j < n; ++j) y[j] = y[j] * scale[j];
  } else if (shift) {
    for (int64_t j = 0; j < n; ++j) y[j] = y[j] + shift[j];
  }
}

// ------------------------------------------------------------------------------------------------
// Forward row kernels that write with non-temporal stores (fp32 outputs of large calls)
//
// The rows are written straight from registers (no staging copy), so these take explicit AVX-512 /
// AVX2 code; the part of a row before the first vector-aligned address and the leftover tail go
// through the ordinary kernels above.
// ------------------------------------------------------------------------------------------------

#ifdef TRANSFUSE_X86_MULTIVERSION
// h = x + residual, into `h` (scratch) and, non-temporally, into `h_out`; returns sum(h).
// count: a multiple of 16; h_out: 64-byte aligned.
__attribute__((target("avx512f")))
float add_rows_and_sum_streaming_avx512(const float* x, const float* residual, float* h, float* h_out,
                                        int64_t count) {
  __m512 sum_even = _mm512_setzero_ps();
  __m512 sum_odd = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= count; j += 32) {
    const __m512 even = _mm512_add_ps(_mm512_loadu_ps(x + j), _mm512_loadu_ps(residual + j));
    const __m512 odd = _mm512_add_ps(_mm512_loadu_ps(x + j + 16), _mm512_loadu_ps(residual + j + 16));
    _mm512_storeu_ps(h + j, even);
    _mm512_storeu_ps(h + j + 16, odd);
    _mm512_stream_ps(h_out + j, even);
    _mm512_stream_ps(h_out + j + 16, odd);
    sum_even = _mm512_add_ps(sum_even, even);
    sum_odd = _mm512_add_ps(sum_odd, odd);
  }
  if (j < count) {
    const __m512 last = _mm512_add_ps(_mm512_loadu_ps(x + j), _mm512_loadu_ps(residual + j));
    _mm512_storeu_ps(h + j, last);
    _mm512_stream_ps(h_out + j, last);
    sum_even = _mm512_add_ps(sum_even, last);
  }
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, _mm512_add_ps(sum_even, sum_odd));
  for (int width = 8; width >= 1; width /= 2) {
    for (int k = 0; k < width; ++k) lanes[k] += lanes[k + width];
  }
  return lanes[0];
}

// count: a multiple of 8; h_out: 32-byte aligned.
__attribute__((target("avx2")))
float add_rows_and_sum_streaming_avx2(const float* x, const float* residual, float* h, float* h_out,
                                      int64_t count) {
  __m256 sum_even = _mm256_setzero_ps();
  __m256 sum_odd = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= count; j += 16) {
    const __m256 even = _mm256_add_ps(_mm256_loadu_ps(x + j), _mm256_loadu_ps(residual + j));
    const __m256 odd = _mm256_add_ps(_mm256_loadu_ps(x + j + 8), _mm256_loadu_ps(residual + j + 8));
    _mm256_storeu_ps(h + j, even);
    _mm256_storeu_ps(h + j + 8, odd);
    _mm256_stream_ps(h_out + j, even);
    _mm256_stream_ps(h_out + j + 8, odd);
    sum_even = _mm256_add_ps(sum_even, even);
    sum_odd = _mm256_add_ps(sum_odd, odd);
  }
  if (j < count) {
    const __m256 last = _mm256_add_ps(_mm256_loadu_ps(x + j), _mm256_loadu_ps(residual + j));
    _mm256_storeu_ps(h + j, last);
    _mm256_stream_ps(h_out + j, last);
    sum_even = _mm256_add_ps(sum_even, last);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(sum_even, sum_odd));
  for (int width = 4; width >= 1; width /= 2) {
    for (int k = 0; k < width; ++k) lanes[k] += lanes[k + width];
  }
  return lanes[0];
}

// y_out = ((h - mean) * rstd) * scale + shift, non-temporally (scale / shift may be null).
// count: a multiple of 16; y_out: 64-byte aligned. One rounding for "* scale + shift" (an FMA), as
// GCC contracts the AVX-512 clone of normalize_row.
__attribute__((target("avx512f")))
void normalize_row_streaming_avx512(const float* h, float mean, float rstd, const float* scale,
                                    const float* shift, float* y_out, int64_t count) {
  const __m512 mean_vector = _mm512_set1_ps(mean);
  const __m512 rstd_vector = _mm512_set1_ps(rstd);
  for (int64_t j = 0; j < count; j += 16) {
    __m512 y = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(h + j), mean_vector), rstd_vector);
    if (scale && shift) {
      y = _mm512_fmadd_ps(y, _mm512_loadu_ps(scale + j), _mm512_loadu_ps(shift + j));
    } else if (scale) {
      y = _mm512_mul_ps(y, _mm512_loadu_ps(scale + j));
    } else if (shift) {
      y = _mm512_add_ps(y, _mm512_loadu_ps(shift + j));
    }
    _mm512_stream_ps(y_out + j, y);
  }
}

// count: a multiple of 8; y_out: 32-byte aligned. Separate multiply and add, as in the AVX2 clone.
__attribute__((target("avx2")))
void normalize_row_streaming_avx2(const float* h, float mean, float rstd, const float* scale,
                                  const float* shift, float* y_out, int64_t count) {
  const __m256 mean_vector = _mm256_set1_ps(mean);
  const __m256 rstd_vector = _mm256_set1_ps(rstd);
  for (int64_t j = 0; j < count; j += 8) {
    __m256 y = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(h + j), mean_vector), rstd_vector);
    if (scale) y = _mm256_mul_ps(y, _mm256_loadu_ps(scale + j));
    if (shift) y = _mm256_add_ps(y, _mm256_loadu_ps(shift + j));
    _mm256_stream_ps(y_out + j, y);
  }
}
#endif

// A row of n floats at dst, split for vector non-temporal stores: [0, head) before the first
// vector-aligned address, [head, head + body) whole aligned vectors, the rest a tail.
struct StreamingSplit {
  int64_t head = 0;
  int64_t body = 0;
};

StreamingSplit split_for_streaming(const float* dst, int64_t n) {
  int64_t vector_floats = 0;
#ifdef TRANSFUSE_X86_MULTIVERSION
  if (vector_isa() == VectorIsa::avx512) vector_floats = 16;
  if (vector_isa() == VectorIsa::avx2) vector_floats = 8;
#endif
  const uintptr_t address = reinterpret_cast<uintptr_t>(dst);
  if (vector_floats == 0 || address % sizeof(float) != 0) return {n, 0};
  const uintptr_t vector_bytes = uintptr_t(vector_floats) * sizeof(float);
  const int64_t head = std::min<int64_t>(n, int64_t((vector_bytes - address % vector_bytes) % vector_bytes / sizeof(float)));
  return {head, (n - head) / vector_floats * vector_floats};
}

// h = x + residual, into `h` (scratch) and into `h_out` with non-temporal stores; returns sum(h).
float add_rows_and_sum_streaming(const float* x, const float* residual, float* h, float* h_out, int64_t n) {
  const StreamingSplit split = split_for_streaming(h_out, n);
  const int64_t tail = split.head + split.body;
  float sum = add_rows_and_sum(x, residual, h, split.head);
#ifdef TRANSFUSE_X86_MULTIVERSION
  const int64_t at = split.head;
  if (split.body > 0 && vector_isa() == VectorIsa::avx512) {
    sum += add_rows_and_sum_streaming_avx512(x + at, residual + at, h + at, h_out + at, split.body);
  } else if (split.body > 0) {
    sum += add_rows_and_sum_streaming_avx2(x + at, residual + at, h + at, h_out + at, split.body);
  }
#endif
  sum += add_rows_and_sum(x + tail, residual + tail, h + tail, n - tail);
  std::memcpy(h_out, h, split.head * sizeof(float));
  std::memcpy(h_out + tail, h + tail, (n - tail) * sizeof(float));
  return sum;
}

// y_out = ((h - mean) * rstd) * scale + shift with non-temporal stores (scale / shift may be null).
void normalize_row_streaming(const float* h, float mean, float rstd, const float* scale,
                             const float* shift, float* y_out, int64_t n) {
  const StreamingSplit split = split_for_streaming(y_out, n);
  const int64_t tail = split.head + split.body;
  normalize_row(h, mean, rstd, scale, shift, y_out, split.head);
#ifdef TRANSFUSE_X86_MULTIVERSION
  const int64_t at = split.head;
  const float* scale_at = scale ? scale + at : nullptr;
  const float* shift_at = shift ? shift + at : nullptr;
  if (split.body > 0 && vector_isa() == VectorIsa::avx512) {
    normalize_row_streaming_avx512(h + at, mean, rstd, scale_at, shift_at, y_out + at, split.body);
  } else if (split.body > 0) {
    normalize_row_streaming_avx2(h + at, mean, rstd, scale_at, shift_at, y_out + at, split.body);
  }
#endif
  normalize_row(h + tail, mean, rstd, scale ? scale + tail : nullptr, shift ? shift + tail : nullptr,
                y_out + tail, n - tail);
}

// ------------------------------------------------------------------------------------------------
// Backward row kernels (fp32)
// ------------------------------------------------------------------------------------------------

// The two row sums of the input gradient, with g = dy * scale and x_hat = (h - mean) * rstd:
//   sum_g = sum(g),  sum_g_xhat = sum(g * x_hat)
TRANSFUSE_MULTIVERSION
void backward_row_sums(const float* __restrict h, const float* __restrict dy,
                       const float* __restrict scale, float mean, float rstd, int64_t n,
                       float* sum_g_out, float* sum_g_xhat_out) {
  float partial_g[kPartialSums] = {};
  float partial_g_xhat[kPartialSums] = {};
  int64_t start = 0;
  for (; start + kPartialSums <= n; start += kPartialSums) {
    for (int64_t k = 0; k < kPartialSums; ++k) {
      const int64_t j = start + k;
      const float x_hat = (h[j] - mean) * rstd;
      const float g = dy[j] * scale[j];
      partial_g[k] += g;
      partial_g_xhat[k] += g * x_hat;
    }
  }
  for (int64_t k = 0; start + k < n; ++k) {
    const int64_t j = start + k;
    const float x_hat = (h[j] - mean) * rstd;
    const float g = dy[j] * scale[j];
    partial_g[k] += g;
    partial_g_xhat[k] += g * x_hat;
  }
  *sum_g_out = sum_partials(partial_g);
  *sum_g_xhat_out = sum_partials(partial_g_xhat);
}

// dweight += dy * x_hat,  dbias += dy   (this thread's fp32 partial sums; either may be null)
TRANSFUSE_MULTIVERSION
void accumulate_weight_grads(const float* __restrict h, const float* __restrict dy, float mean,
                             float rstd, float* __restrict dweight, float* __restrict dbias,
                             int64_t n) {
  if (dweight) {
    for (int64_t j = 0; j < n; ++j) dweight[j] += dy[j] * ((h[j] - mean) * rstd);
  }
  if (dbias) {
    for (int64_t j = 0; j < n; ++j) dbias[j] += dy[j];
  }
}

// dx = rstd * (g - mean_g - x_hat * mean_g_xhat) + dresidual_out, g = dy * scale
// (mean_g = 0 for RMSNorm; dresidual_out may be null).
TRANSFUSE_MULTIVERSION
void input_grad_row(const float* __restrict h, const float* __restrict dy,
                    const float* __restrict scale, const float* __restrict dresidual_out, float mean,
                    float rstd, float mean_g, float mean_g_xhat, float* __restrict dx, int64_t n) {
  if (dresidual_out) {
    for (int64_t j = 0; j < n; ++j) {
      const float x_hat = (h[j] - mean) * rstd;
      const float g = dy[j] * scale[j];
      dx[j] = rstd * (g - mean_g - x_hat * mean_g_xhat) + dresidual_out[j];
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const float x_hat = (h[j] - mean) * rstd;
      const float g = dy[j] * scale[j];
      dx[j] = rstd * (g - mean_g - x_hat * mean_g_xhat);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Helpers shared by forward and backward
// ------------------------------------------------------------------------------------------------

// fp32 copy of a [cols] parameter (weight or bias) of `dtype`, plus `offset`; empty if null.
std::vector<float> parameter_as_float(const void* parameter, DType dtype, int64_t cols, float offset) {
  std::vector<float> values;
  if (!parameter) return values;
  values.resize(cols);
  load_row(parameter, dtype, values.data(), cols);
  if (offset != 0.f) {
    for (float& value : values) value += offset;
  }
  return values;
}

// Threads for a call over rows: one per row at most and one per ~16K elements.
int row_threads(int num_threads, int64_t rows, int64_t cols) {
  return threads_for(num_threads, rows, rows * std::max<int64_t>(cols, 0), 16384);
}

int current_thread() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

int team_size() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------

// 1 / sqrt(v), or NaN where v = variance + eps is not finite: a variance that overflows fp32
// makes the row's output NaN (as eager layer_norm gives), not zeros (1 / sqrt(inf) = 0).
inline float inverse_std(float v) {
  return v < std::numeric_limits<float>::infinity() ? 1.0f / std::sqrt(v)
                                                     : std::numeric_limits<float>::quiet_NaN();
}

// Per row:  h = round_x(x + residual),  mean = sum(h) / cols (LayerNorm; 0 for RMSNorm),
//           rstd = 1 / sqrt(sum((h - mean)^2) / cols + eps)   (NaN where that sum overflows),
//           y = round_out(round_normalized((h - mean) * rstd) * (weight_offset + weight) + bias)
void norm_forward(const NormForwardParams& p) {
  const int64_t rows = p.rows;
  const int64_t cols = p.cols;
  if (rows <= 0 || cols <= 0) return;

  const std::vector<float> scale = parameter_as_float(p.weight, p.weight_dtype, cols, p.weight_offset);
  const std::vector<float> shift = p.rms ? std::vector<float>() : parameter_as_float(p.bias, p.weight_dtype, cols, 0.f);
  const float* scale_or_null = scale.empty() ? nullptr : scale.data();
  const float* shift_or_null = shift.empty() ? nullptr : shift.data();

  const bool has_residual = p.residual != nullptr;
  const bool x_is_f32 = p.x_dtype == DType::f32;
  const bool out_is_f32 = p.out_dtype == DType::f32;
  const bool normalized_is_f32 = p.normalized_dtype == DType::f32;
  const float inv_cols = 1.f / float(cols);
  const int64_t x_bytes = rows * cols * dtype_size(p.x_dtype);
  const bool streaming = use_streaming_stores(x_bytes * (has_residual ? 3 : 1) +
                                              rows * cols * dtype_size(p.out_dtype));
  // fp32 outputs are computed straight into the output tensor (with non-temporal stores when
  // streaming); the others go through fp32 scratch rows.
  const bool y_straight_fp32 = out_is_f32 && normalized_is_f32;
  const bool y_in_place = out_is_f32 && !streaming;  // y scratch not needed

  // bf16 x + residual in one pass (AVX-512): the four passes of the other 16-bit rows took an
  // add + LayerNorm of 4096 x 1024 to 0.65x eager's
  const bool one_pass_bf16_sum = p.x_dtype == DType::bf16 && !streaming && has_avx512bw_vl();
  in_team(row_threads(p.num_threads, rows, cols), [&] {
    // Per-thread scratch rows, only those this dtype combination needs.
    std::vector<float> h_scratch(x_is_f32 && (!has_residual || !streaming) ? 0 : cols);
    std::vector<float> residual_scratch(!x_is_f32 && has_residual ? cols : 0);
    std::vector<float> y_scratch(y_straight_fp32 || y_in_place ? 0 : cols);
    std::vector<uint16_t> staging(streaming ? cols : 0);

#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      const void* x_row = row_address(p.x, p.x_dtype, row, cols);
      const void* residual_row = has_residual ? row_address(p.residual, p.x_dtype, row, cols) : nullptr;
      void* residual_out_row = has_residual ? row_address(p.residual_out, p.x_dtype, row, cols) : nullptr;

      // h in fp32, and its sum when it comes for free.
      const float* h = nullptr;
      float h_sum = 0.f;
      bool have_h_sum = false;
      if (x_is_f32 && !has_residual) {
        h = static_cast<const float*>(x_row);
      } else if (x_is_f32) {
        const float* x_fp32 = static_cast<const float*>(x_row);
        const float* residual_fp32 = static_cast<const float*>(residual_row);
        float* residual_out_fp32 = static_cast<float*>(residual_out_row);
        if (streaming) {  // h kept in scratch for the passes below, streamed to residual_out
          h_sum = add_rows_and_sum_streaming(x_fp32, residual_fp32, h_scratch.data(), residual_out_fp32, cols);
          h = h_scratch.data();
        } else {
          h_sum = add_rows_and_sum(x_fp32, residual_fp32, residual_out_fp32, cols);
          h = residual_out_fp32;
        }
        have_h_sum = true;
      } else if (has_residual && one_pass_bf16_sum) {
        add_bf16_rows(static_cast<const uint16_t*>(x_row),
                      static_cast<const uint16_t*>(residual_row), h_scratch.data(),
                      static_cast<uint16_t*>(residual_out_row), cols);
        h = h_scratch.data();
      } else {
        load_row(x_row, p.x_dtype, h_scratch.data(), cols);
        if (has_residual) {
          load_row(residual_row, p.x_dtype, residual_scratch.data(), cols);
          add_row_in_place(h_scratch.data(), residual_scratch.data(), cols);
          write_row(h_scratch.data(), p.x_dtype, residual_out_row, cols, streaming, staging.data());
          round_row(h_scratch.data(), p.x_dtype, cols);  // statistics see the rounded h
        }
        h = h_scratch.data();
      }

      float mean = 0.f;
      if (!p.rms) mean = (have_h_sum ? h_sum : row_sum(h, cols)) * inv_cols;
      const float variance = row_sum_squared_deviations(h, mean, cols) * inv_cols;
      const float rstd = inverse_std(variance + p.eps);
      if (p.mean) p.mean[row] = mean;
      if (p.rstd) p.rstd[row] = rstd;

      void* y_row = row_address(p.y, p.out_dtype, row, cols);
      if (y_straight_fp32 && streaming) {
        normalize_row_streaming(h, mean, rstd, scale_or_null, shift_or_null, static_cast<float*>(y_row), cols);
      } else if (y_straight_fp32) {
        normalize_row(h, mean, rstd, scale_or_null, shift_or_null, static_cast<float*>(y_row), cols);
      } else {
        float* y = y_in_place ? static_cast<float*>(y_row) : y_scratch.data();
        if (normalized_is_f32) {
          normalize_row(h, mean, rstd, scale_or_null, shift_or_null, y, cols);
        } else {
          normalize_row(h, mean, rstd, nullptr, nullptr, y, cols);
          round_row(y, p.normalized_dtype, cols);
          scale_shift_row(y, scale_or_null, shift_or_null, cols);
        }
        if (!y_in_place) write_row(y, p.out_dtype, y_row, cols, streaming, staging.data());
      }
    }
    if (streaming) finish_streaming_stores();
  });
}

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------

int64_t norm_backward_workspace_floats(const NormBackwardParams& p) {
  if (!p.dweight && !p.dbias) return 0;
  return int64_t(row_threads(p.num_threads, p.rows, p.cols)) * 2 * std::max<int64_t>(p.cols, 0);
}

// Per row, with g = dy * (weight_offset + weight) and x_hat = (h - mean) * rstd:
//   dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)) + dresidual_out   (no mean(g) for RMSNorm)
// and over rows: dweight = sum(dy * x_hat), dbias = sum(dy), in fp32 per-thread partial sums
// (workspace slice t = [dweight partial | dbias partial]) reduced at the end.
void norm_backward(const NormBackwardParams& p, float* workspace) {
  const int64_t rows = std::max<int64_t>(p.rows, 0);
  const int64_t cols = p.cols;
  if (cols <= 0) return;

  std::vector<float> scale = parameter_as_float(p.weight, p.weight_dtype, cols, p.weight_offset);
  if (scale.empty()) scale.assign(cols, 1.f);  // no weight: g = dy (dy * 1 is exact)

  const bool want_weight_grads = p.dweight || p.dbias;
  const bool x_is_f32 = p.x_dtype == DType::f32;
  const bool dy_is_f32 = p.out_dtype == DType::f32;
  const float inv_cols = 1.f / float(cols);
  const int64_t x_bytes = rows * cols * dtype_size(p.x_dtype);
  const bool streaming = use_streaming_stores(x_bytes * (p.dresidual_out ? 3 : 2) +
                                              rows * cols * dtype_size(p.out_dtype));
  const bool dx_in_place = x_is_f32 && !streaming;  // fp32 dx computed straight into the output
  int threads_used = 1;

  if (rows > 0) {
    in_team(row_threads(p.num_threads, rows, cols), [&] {
#pragma omp single
      threads_used = team_size();

      float* dweight_partial = nullptr;
      float* dbias_partial = nullptr;
      if (want_weight_grads) {
        float* slice = workspace + int64_t(current_thread()) * 2 * cols;
        std::fill(slice, slice + 2 * cols, 0.f);
        if (p.dweight) dweight_partial = slice;
        if (p.dbias) dbias_partial = slice + cols;
      }

      std::vector<float> h_scratch(x_is_f32 ? 0 : cols);
      std::vector<float> dresidual_scratch(!x_is_f32 && p.dresidual_out ? cols : 0);
      std::vector<float> dx_scratch(dx_in_place ? 0 : cols);
      std::vector<uint16_t> staging(streaming ? cols : 0);
      std::vector<float> dy_scratch(dy_is_f32 ? 0 : cols);

#pragma omp for schedule(static)
      for (int64_t row = 0; row < rows; ++row) {
        const void* h_row = row_address(p.h, p.x_dtype, row, cols);
        const void* dy_row = row_address(p.dy, p.out_dtype, row, cols);
        const float* h = static_cast<const float*>(h_row);
        if (!x_is_f32) {
          load_row(h_row, p.x_dtype, h_scratch.data(), cols);
          h = h_scratch.data();
        }
        const float* dy = static_cast<const float*>(dy_row);
        if (!dy_is_f32) {
          load_row(dy_row, p.out_dtype, dy_scratch.data(), cols);
          dy = dy_scratch.data();
        }
        const float* dresidual_out = nullptr;
        if (p.dresidual_out) {
          const void* dresidual_row = row_address(p.dresidual_out, p.x_dtype, row, cols);
          dresidual_out = static_cast<const float*>(dresidual_row);
          if (!x_is_f32) {
            load_row(dresidual_row, p.x_dtype, dresidual_scratch.data(), cols);
            dresidual_out = dresidual_scratch.data();
          }
        }

        const float mean = (p.rms || !p.mean) ? 0.f : p.mean[row];
        const float rstd = p.rstd[row];
        float sum_g = 0.f;
        float sum_g_xhat = 0.f;
        backward_row_sums(h, dy, scale.data(), mean, rstd, cols, &sum_g, &sum_g_xhat);
        const float mean_g = p.rms ? 0.f : sum_g * inv_cols;
        const float mean_g_xhat = sum_g_xhat * inv_cols;

        if (want_weight_grads) accumulate_weight_grads(h, dy, mean, rstd, dweight_partial, dbias_partial, cols);

        void* dx_row = row_address(p.dx, p.x_dtype, row, cols);
        float* dx = dx_in_place ? static_cast<float*>(dx_row) : dx_scratch.data();
        input_grad_row(h, dy, scale.data(), dresidual_out, mean, rstd, mean_g, mean_g_xhat, dx, cols);
        if (!dx_in_place) write_row(dx, p.x_dtype, dx_row, cols, streaming, staging.data());
      }
      if (streaming) finish_streaming_stores();
    });
  }

  // Reduce the per-thread partial sums into slice 0 and convert to the weight dtype.
  if (!want_weight_grads) return;
  std::vector<float> zeros;
  if (rows == 0) zeros.assign(cols, 0.f);
  for (int part = 0; part < 2; ++part) {
    void* grad = part == 0 ? p.dweight : p.dbias;
    if (!grad) continue;
    if (rows == 0) {
      store_row(zeros.data(), p.weight_dtype, grad, cols);
      continue;
    }
    float* total = workspace + int64_t(part) * cols;
    for (int thread = 1; thread < threads_used; ++thread) {
      add_row_in_place(total, workspace + int64_t(thread) * 2 * cols + int64_t(part) * cols, cols);
    }
    store_row(total, p.weight_dtype, grad, cols);
  }
}

}  // namespace transfuse::cpu
