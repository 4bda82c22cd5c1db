// CPU attention kernels. The math is stated in common/attention.h.
//
// Layout of the work. Forward: OpenMP threads take (sequence, query head, tile of 64 query rows)
// units; a unit walks the keys its rows can see in tiles of 128 with the online softmax, so the
// largest temporary is one 64 x 128 score tile. When there are too few units to keep every thread
// busy (decoding: one query row, many keys), each unit's keys are split into ranges whose partial
// results are merged afterwards by their log-sum-exps. Backward: delta = rowsum(dO * O) first, then
// two passes that recompute P from the saved lse: one per (sequence, key/value head, key tile) for
// dK and dV (looping over the query heads that share the key head), one per (sequence, query head,
// query tile) for dQ and dbias. Every unit owns the rows it writes, so there are no races and no
// atomics. A sequence is a batch entry of the padded layout or one packed sequence of the varlen
// layout (see common/attention.h): a unit holds its sequence's SequenceSpan, works in positions
// local to the sequence and adds the span's start only to address rows of q, k, v, out and grads.
//
// Inner loops. Inputs of any dtype are converted into fp32 tiles (Q pre-multiplied by the scale,
// K and V transposed where a product needs them so); every product is one register-blocked
// micro-kernel, C (+)= A B with A, B, C row-major and fp32 accumulation, written with GCC vector
// types and compiled three times, for AVX-512 (16 lanes), AVX2 (8) and baseline (4), the best
// chosen at run time. exp is a vectorized polynomial (relative error ~2e-7 on [-87, 0]). Forward
// tiles of bf16 inputs (of kFewRows query rows or more) take the bf16 products of
// attention_bf16.h instead, on CPUs with AVX512_BF16: Q K^T and P V on vdpbf16ps from bf16 pairs.
#include "attention.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "attention_bf16.h"
#include "convert.h"
#include "threads.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include "transpose_avx512.h"
#endif

namespace transfuse::cpu {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kQueryTile = 64;      // query rows per forward / dQ unit
constexpr int64_t kKeyTile = 128;       // keys per forward / dQ step
constexpr int64_t kGradKeyTile = 64;    // keys per dK/dV unit
constexpr int64_t kPadFloats = 16;      // tile widths are padded to this many floats
constexpr int64_t kFewRows = 4;         // query tiles with fewer rows use dot products for q.k
constexpr float kExactLse = 1024.f;     // beyond, fp32 lse = m + log(l) may have lost log(l)

int64_t padded(int64_t n) { return (n + kPadFloats - 1) / kPadFloats * kPadFloats; }

bool is_packed(const AttentionParams& p) { return p.cu_seqlens_q != nullptr; }

SequenceSpan span_of(const AttentionParams& p, int64_t b) {
  return sequence_span(p.cu_seqlens_q, p.cu_seqlens_k, b, p.seq_q, p.seq_kv);
}

// Index in the lse (and in delta, same layout) of row 0 of sequence b and head h; row i is at + i.
int64_t first_row(const AttentionParams& p, const SequenceSpan& seq, int64_t b, int64_t h) {
  return lse_index(is_packed(p), b, h, seq.q_start, 0, p.heads_q, p.seq_q, p.total_q);
}

// Rows of the lse: [batch, heads_q, seq_q] padded, [heads_q, total_q] packed.
int64_t lse_rows(const AttentionParams& p) {
  return is_packed(p) ? p.heads_q * p.total_q : p.batch * p.heads_q * p.seq_q;
}

// ------------------------------------------------------------------------------------------------
// Element access
// ------------------------------------------------------------------------------------------------

const char* row_address(const void* base, DType dtype, const int64_t* strides, int64_t b,
                        int64_t h, int64_t row) {
  return static_cast<const char*>(base) +
         (b * strides[0] + h * strides[1] + row * strides[2]) * int64_t(dtype_size(dtype));
}

char* row_address(void* base, DType dtype, const int64_t* strides, int64_t b, int64_t h,
                  int64_t row) {
  return const_cast<char*>(row_address(static_cast<const void*>(base), dtype, strides, b, h, row));
}

// dst[r * ld + d] = scale * float(src row (row0 + r))[d] for d < head_dim; zero up to ld.
void load_rows(const void* base, const int64_t* strides, const AttentionParams& p, int64_t b,
               int64_t h, int64_t row0, int64_t rows, float scale, float* dst, int64_t ld) {
  if (scale == 1.f && ld == p.head_dim && strides[2] == p.head_dim)  // one block: one call
    return load_row(row_address(base, p.dtype, strides, b, h, row0), p.dtype, dst,
                    rows * p.head_dim);
  for (int64_t r = 0; r < rows; ++r) {
    float* out = dst + r * ld;
    const char* row = row_address(base, p.dtype, strides, b, h, row0 + r);
    if (p.dtype == DType::f32) {  // one pass, not a copy and then the scaling
      const float* in = reinterpret_cast<const float*>(row);
      for (int64_t d = 0; d < p.head_dim; ++d) out[d] = in[d] * scale;
    } else {
      load_row(row, p.dtype, out, p.head_dim);
      if (scale != 1.f)
        for (int64_t d = 0; d < p.head_dim; ++d) out[d] *= scale;
    }
    std::fill(out + p.head_dim, out + ld, 0.f);
  }
}

// Row `row` of bf16 q, k or v for (b, h).
const uint16_t* bf16_row(const void* base, const int64_t* strides, const AttentionParams& p,
                         int64_t b, int64_t h, int64_t row) {
  return reinterpret_cast<const uint16_t*>(row_address(base, p.dtype, strides, b, h, row));
}

// dst[r * ld + d] = bf16 src row (row0 + r)[d] for d < head_dim, zero up to ld (even): the rows as
// ld / 2 pairs each.
void copy_bf16_rows(const void* base, const int64_t* strides, const AttentionParams& p, int64_t b,
                    int64_t h, int64_t row0, int64_t rows, uint32_t* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    char* out = reinterpret_cast<char*>(dst + r * ld / 2);
    std::memcpy(out, bf16_row(base, strides, p, b, h, row0 + r), p.head_dim * sizeof(uint16_t));
    std::memset(out + p.head_dim * sizeof(uint16_t), 0, (ld - p.head_dim) * sizeof(uint16_t));
  }
}

// The fp32 rows [row0, row0 + rows) of k or v for (b, h), `*ld` floats apart: the input itself when
// it is fp32 with head_dim a multiple of the padding, else a converted copy in `scratch`.
const float* fp32_rows(const void* base, const int64_t* strides, const AttentionParams& p,
                       int64_t b, int64_t h, int64_t row0, int64_t rows, float* scratch,
                       int64_t* ld) {
  if (p.dtype == DType::f32 && p.head_dim == padded(p.head_dim)) {
    *ld = strides[2];
    return reinterpret_cast<const float*>(row_address(base, p.dtype, strides, b, h, row0));
  }
  *ld = padded(p.head_dim);
  load_rows(base, strides, p, b, h, row0, rows, 1.f, scratch, *ld);
  return scratch;
}

float mask_value(const AttentionParams& p, const char* address) {
  switch (p.mask_dtype) {
    case DType::f32: return *reinterpret_cast<const float*>(address);
    case DType::bf16: {  // the top half of an fp32
      uint16_t bits;
      std::memcpy(&bits, address, sizeof(bits));
      return float_from_bits(uint32_t(bits) << 16);
    }
    default: {
      float value;
      load_row(address, p.mask_dtype, &value, 1);
      return value;
    }
  }
}

// The keys query row i sees through causal / window: [lo, hi) (empty when hi <= lo).
struct Range {
  int64_t lo, hi;
};

Range visible_keys(const AttentionParams& p, const SequenceSpan& seq, int64_t i) {
  const int64_t diagonal = i + seq.kv_len - seq.q_len;
  Range r{0, seq.kv_len};
  if (p.causal) r.hi = std::min(r.hi, diagonal + 1);
  if (p.window > 0) {
    r.lo = std::max(r.lo, diagonal - p.window + 1);
    r.hi = std::min(r.hi, diagonal + p.window);
  }
  return r;
}

// The query rows that see key j through causal / window: [lo, hi).
Range visible_queries(const AttentionParams& p, const SequenceSpan& seq, int64_t j) {
  const int64_t offset = seq.kv_len - seq.q_len;  // query i sits on the diagonal at key i + offset
  Range r{0, seq.q_len};
  if (p.causal) r.lo = std::max(r.lo, j - offset);
  if (p.window > 0) {
    r.lo = std::max(r.lo, j - offset - p.window + 1);
    r.hi = std::min(r.hi, j - offset + p.window);
  }
  return r;
}

// Where the scores of a tile sit: queries [q0, q0 + queries) x keys [k0, k0 + keys) of (b, h),
// positions local to sequence b (`seq`); stored as s[query * ld + key], or as s[key * ld + query]
// when keys_by_row. The other dimension is padded to `padded_width` entries.
struct TileSpan {
  int64_t b, h, q0, queries, k0, keys;
  bool keys_by_row;
  SequenceSpan seq;
};

// Turns the scaled products q.k of a tile into scores: softcap (its derivative 1 - tanh^2 into
// `softcap_grad` when not null), the additive or bool mask, -inf where the key is hidden by
// causal / window or is padding.
void finish_scores(const AttentionParams& p, const TileSpan& t, float* s, int64_t ld,
                   int64_t padded_width, float* softcap_grad) {
  const int64_t rows = t.keys_by_row ? t.keys : t.queries;
  const int64_t cols = t.keys_by_row ? t.queries : t.keys;
  const int64_t mask_size = p.mask_kind == MaskKind::boolean ? 1 : dtype_size(p.mask_dtype);
  const int64_t query_stride = p.mask_strides[2] * mask_size;
  const int64_t key_stride = p.mask_strides[3] * mask_size;
  const char* mask_base = p.mask_kind == MaskKind::none
                              ? nullptr
                              : static_cast<const char*>(p.mask) +
                                    (t.b * p.mask_strides[0] + t.h * p.mask_strides[1]) * mask_size;
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * ld;
    float* grad_row = softcap_grad ? softcap_grad + r * ld : nullptr;
    // Along the row: keys (visible range of query q0 + r) or queries (that see key k0 + r).
    const int64_t first = t.keys_by_row ? t.q0 : t.k0;
    const Range seen =
        t.keys_by_row ? visible_queries(p, t.seq, t.k0 + r) : visible_keys(p, t.seq, t.q0 + r);
    const int64_t lo = std::clamp<int64_t>(seen.lo - first, 0, cols);
    const int64_t hi = std::clamp<int64_t>(seen.hi - first, lo, cols);
    std::fill(row, row + lo, -kInf);
    std::fill(row + hi, row + padded_width, -kInf);
    if (p.softcap > 0) {
      const float inverse = 1.f / p.softcap;
      for (int64_t c = lo; c < hi; ++c) {
        const float tanh_value = std::tanh(row[c] * inverse);
        row[c] = p.softcap * tanh_value;
        grad_row[c] = 1.f - tanh_value * tanh_value;
      }
    }
    if (p.mask_kind == MaskKind::none) continue;
    const char* mask_row = mask_base + (t.keys_by_row ? (t.k0 + r) * key_stride + t.q0 * query_stride
                                                      : (t.q0 + r) * query_stride + t.k0 * key_stride);
    const int64_t step = t.keys_by_row ? query_stride : key_stride;
    if (p.mask_kind == MaskKind::boolean) {
      for (int64_t c = lo; c < hi; ++c)
        if (!mask_row[c * step]) row[c] = -kInf;
    } else if (step == mask_size) {  // a contiguous row of the mask: converted in one call
      float values[std::max(kKeyTile, kQueryTile)];  // a tile row: cols <= either
      load_row(mask_row + lo * step, p.mask_dtype, values, hi - lo);
      for (int64_t c = lo; c < hi; ++c) row[c] += values[c - lo];
    } else {
      for (int64_t c = lo; c < hi; ++c) row[c] += mask_value(p, mask_row + c * step);
    }
  }
}

// Dropout of a tile in place, per element (query i, key j): x = keep ? x / (1 - p) : 0.
void drop_tile(const AttentionParams& p, const TileSpan& t, float* x, int64_t ld) {
  const uint32_t threshold = dropout_threshold(p.dropout_p);
  const float keep_scale = 1.f / (1.f - p.dropout_p);
  const uint32_t batch_head = uint32_t(t.b * p.heads_q + t.h);
  for (int64_t a = 0; a < t.queries; ++a) {
    const uint32_t row_key = dropout_row_key(p.dropout_seed, batch_head, uint32_t(t.q0 + a));
    for (int64_t c = 0; c < t.keys; ++c) {
      float& value = t.keys_by_row ? x[c * ld + a] : x[a * ld + c];
      value = dropout_bits(row_key, uint32_t(t.k0 + c)) >= threshold ? value * keep_scale : 0.f;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Vector code, compiled once per instruction set (see the entry points below)
// ------------------------------------------------------------------------------------------------

#define TRANSFUSE_INLINE inline __attribute__((always_inline))
// The vector helpers are always inlined into the entry points compiled for their instruction set,
// so the ABI of passing wide vectors between functions (what -Wpsabi warns about) never arises.
#pragma GCC diagnostic ignored "-Wpsabi"

typedef float Floats16 __attribute__((vector_size(64)));
typedef float Floats8 __attribute__((vector_size(32)));
typedef float Floats4 __attribute__((vector_size(16)));

// dst[d * ld + r] = rows[r * rows_ld + d]: the transpose of `rows` fp32 rows, zero for r in
// [rows, ld).
template <class V>
void transpose_rows(const float* rows_data, int64_t rows, int64_t rows_ld, int64_t head_dim,
                    float* dst, int64_t ld) {
  for (int64_t d = 0; d < head_dim; ++d) {
    float* out = dst + d * ld;
    for (int64_t r = 0; r < rows; ++r) out[r] = rows_data[r * rows_ld + d];
    std::fill(out + rows, out + ld, 0.f);
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// The same on AVX-512, in 16 x 16 blocks through registers (ld a multiple of 16: a padded tile
// width). Element by element, this loop took 16% of MiniLM's attention (head_dim 32).
template <>
__attribute__((target("avx512f"))) void transpose_rows<Floats16>(
    const float* rows_data, int64_t rows, int64_t rows_ld, int64_t head_dim, float* dst,
    int64_t ld) {
  for (int64_t d0 = 0; d0 < head_dim; d0 += 16) {
    const int64_t columns = std::min<int64_t>(16, head_dim - d0);
    const __mmask16 inside = __mmask16((1u << columns) - 1);
    for (int64_t r0 = 0; r0 < ld; r0 += 16) {
      __m512i block[16], transposed[16];
      for (int64_t i = 0; i < 16; ++i)
        block[i] = r0 + i < rows
                       ? _mm512_maskz_loadu_epi32(inside, rows_data + (r0 + i) * rows_ld + d0)
                       : _mm512_setzero_si512();
      transpose16(block, transposed);
      for (int64_t i = 0; i < columns; ++i)
        _mm512_storeu_si512(dst + (d0 + i) * ld + r0, transposed[i]);
    }
  }
}
#endif

template <class V>
constexpr int kLanes = sizeof(V) / sizeof(float);

template <class V>
struct SameSizeInts {
  typedef int32_t type __attribute__((vector_size(sizeof(V))));
};

// Register blocking of the micro-kernel: rows x vectors accumulators (24 of AVX-512's 32
// registers; 12 of AVX2's and SSE's 16).
template <class V>
struct Blocking {
  static constexpr int rows = 6, vectors = 2;
};
template <>
struct Blocking<Floats16> {
  static constexpr int rows = 6, vectors = 4;
};

template <class V>
TRANSFUSE_INLINE V load(const float* address) {
  V v;
  std::memcpy(&v, address, sizeof(V));
  return v;
}

template <class V>
TRANSFUSE_INLINE void store(float* address, const V& v) {
  std::memcpy(address, &v, sizeof(V));
}

template <class V>
TRANSFUSE_INLINE V splat(float x) {
  return V{} + x;
}

// exp(x) for x <= 88: x = n ln2 + r with |r| <= ln2/2 (n by the round-to-nearest "magic number"
// trick, ln2 split in two for an exact product), e^r by its degree-6 Taylor polynomial, 2^n put
// into the exponent bits. Inputs below -87 (including -inf) give 0.
template <class V>
TRANSFUSE_INLINE V exp_vector(const V& x) {
  using Ints = typename SameSizeInts<V>::type;
  const V magic = splat<V>(12582912.f);  // 1.5 * 2^23
  const V clamped = x < -87.f ? splat<V>(-87.f) : x;
  const V shifted = clamped * 1.44269504f + magic;
  const V n = shifted - magic;
  const V r = clamped - n * 0.693145751953125f - n * 1.428606765330187e-6f;
  const V poly = 1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 +
                 r * (1.f / 720))))));
  const Ints exponent = ((Ints)shifted - (Ints)magic + 127) << 23;  // casts reinterpret the bits
  const V result = poly * (V)exponent;
  return x < -87.f ? V{} : result;
}

template <class V>
TRANSFUSE_INLINE float horizontal_sum(const V& v) {
  if constexpr (kLanes<V> > 4) {  // add the two halves, then reduce the half-width vector
    using Half = std::conditional_t<kLanes<V> == 16, Floats8, Floats4>;
    Half low, high;
    std::memcpy(&low, &v, sizeof(Half));
    std::memcpy(&high, reinterpret_cast<const char*>(&v) + sizeof(Half), sizeof(Half));
    return horizontal_sum<Half>(low + high);
  }
  return (v[0] + v[2]) + (v[1] + v[3]);
}

// max over x[0, n), n a multiple of the lane count.
template <class V>
TRANSFUSE_INLINE float max_of(const float* x, int64_t n) {
  V best = splat<V>(-kInf);
  for (int64_t j = 0; j < n; j += kLanes<V>) {
    const V v = load<V>(x + j);
    best = v > best ? v : best;
  }
  float result = -kInf;
  for (int lane = 0; lane < kLanes<V>; ++lane) result = std::max(result, best[lane]);
  return result;
}

// x[j] = exp(x[j] - shift[j]) (shift a row of per-entry values) or exp(x[j] - shift_value);
// returns the sum. n a multiple of the lane count.
template <class V>
TRANSFUSE_INLINE float exp_minus(float* x, int64_t n, const float* shift, float shift_value) {
  V total{};
  for (int64_t j = 0; j < n; j += kLanes<V>) {
    const V s = shift ? load<V>(shift + j) : splat<V>(shift_value);
    const V e = exp_vector<V>(load<V>(x + j) - s);
    store<V>(x + j, e);
    total += e;
  }
  return horizontal_sum<V>(total);
}

template <class V>
TRANSFUSE_INLINE void scale_row(float* x, int64_t n, float factor) {
  for (int64_t j = 0; j < n; j += kLanes<V>) store<V>(x + j, load<V>(x + j) * factor);
}

// ds[j] = p[j] * (dp[j] - delta) in place of dp, delta per entry (a row) or one value.
template <class V>
TRANSFUSE_INLINE void score_gradient(const float* p, float* dp, int64_t n, const float* delta,
                                     float delta_value, const float* softcap_grad) {
  for (int64_t j = 0; j < n; j += kLanes<V>) {
    const V d = delta ? load<V>(delta + j) : splat<V>(delta_value);
    V ds = load<V>(p + j) * (load<V>(dp + j) - d);
    if (softcap_grad) ds *= load<V>(softcap_grad + j);
    store<V>(dp + j, ds);
  }
}

// C[R x VECTORS*lanes] (+)= A[R x depth] B[depth x VECTORS*lanes]: R x VECTORS accumulators kept
// in registers, one broadcast of A and VECTORS loads of B per step of the depth.
template <class V, int R, int VECTORS>
TRANSFUSE_INLINE void product_block(int64_t depth, const float* a, int64_t lda, const float* b,
                                    int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  constexpr int lanes = kLanes<V>;
  V acc[R][VECTORS];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < VECTORS; ++v) acc[r][v] = accumulate ? load<V>(c + r * ldc + v * lanes) : V{};
  for (int64_t k = 0; k < depth; ++k) {
    V row[VECTORS];
#pragma GCC unroll 8
    for (int v = 0; v < VECTORS; ++v) row[v] = load<V>(b + k * ldb + v * lanes);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float scalar = a[r * lda + k];
#pragma GCC unroll 8
      for (int v = 0; v < VECTORS; ++v) acc[r][v] += scalar * row[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < VECTORS; ++v) store<V>(c + r * ldc + v * lanes, acc[r][v]);
}

// The last rows (fewer than the block's) of a column block.
template <class V, int R, int VECTORS>
TRANSFUSE_INLINE void product_tail_rows(int64_t rows, int64_t depth, const float* a, int64_t lda,
                                        const float* b, int64_t ldb, float* c, int64_t ldc,
                                        bool accumulate) {
  if constexpr (R > 0) {
    if (rows == R) return product_block<V, R, VECTORS>(depth, a, lda, b, ldb, c, ldc, accumulate);
    product_tail_rows<V, R - 1, VECTORS>(rows, depth, a, lda, b, ldb, c, ldc, accumulate);
  }
}

template <class V, int VECTORS>
TRANSFUSE_INLINE void product_columns(int64_t m, int64_t depth, const float* a, int64_t lda,
                                      const float* b, int64_t ldb, float* c, int64_t ldc,
                                      bool accumulate) {
  constexpr int R = Blocking<V>::rows;
  int64_t i = 0;
  for (; i + R <= m; i += R)
    product_block<V, R, VECTORS>(depth, a + i * lda, lda, b, ldb, c + i * ldc, ldc, accumulate);
  product_tail_rows<V, R - 1, VECTORS>(m - i, depth, a + i * lda, lda, b, ldb, c + i * ldc, ldc,
                                       accumulate);
}

// C[m x n] (+)= A[m x depth] B[depth x n], row-major fp32, n a multiple of the lane count.
template <class V>
TRANSFUSE_INLINE void product(int64_t m, int64_t n, int64_t depth, const float* a, int64_t lda,
                              const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  constexpr int lanes = kLanes<V>, wide = Blocking<V>::vectors * lanes;
  int64_t j = 0;
  for (; j + wide <= n; j += wide)
    product_columns<V, Blocking<V>::vectors>(m, depth, a, lda, b + j, ldb, c + j, ldc, accumulate);
  if constexpr (Blocking<V>::vectors > 2)  // (head_dim 32, 32 keys: a broadcast per 2 vectors)
    for (; j + 2 * lanes <= n; j += 2 * lanes)
      product_columns<V, 2>(m, depth, a, lda, b + j, ldb, c + j, ldc, accumulate);
  for (; j < n; j += lanes)
    product_columns<V, 1>(m, depth, a, lda, b + j, ldb, c + j, ldc, accumulate);
}

// C[r * ldc + c] = <A row r, B row c> for few rows of A (decoding), rows of `depth` floats (a
// multiple of the lane count): cheaper than transposing B for a product when A has a row or two.
template <class V>
TRANSFUSE_INLINE void dot_products(int64_t m, int64_t n, int64_t depth, const float* a,
                                   const float* b, int64_t ldb, float* c, int64_t ldc) {
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t i = 0; i < m; ++i) {
      V acc{};
      for (int64_t k = 0; k < depth; k += kLanes<V>)
        acc += load<V>(a + i * depth + k) * load<V>(b + j * ldb + k);
      c[i * ldc + j] = horizontal_sum<V>(acc);
    }
  }
}

// An fp32 tile of Scratch: zero-filled for the backward passes; for the forward, whose code writes
// every element of a tile before it reads it, left uninitialized (zero-filling the tiles, 0.25 MB
// a thread at head_dim 32, cost a decoding step's attention call more than its work).
template <class T = float>
class Tile {
 public:
  Tile(int64_t size, bool zeroed) : values_(zeroed ? new T[size]() : new T[size]) {}
  T* data() { return values_.get(); }
  T* begin() { return values_.get(); }

 private:
  std::unique_ptr<T[]> values_;
};

// The bf16 products (attention_bf16.h) take the forward's tiles of at least kFewRows query rows
// when the inputs are bf16 and the CPU has the instructions.
bool bf16_products(const AttentionParams& p) {
  return p.dtype == DType::bf16 && has_attention_bf16();
}

// Per-thread fp32 tiles, sized for the largest tiles of either pass; the backward's own tiles are
// empty in the forward.
struct Scratch {
  Scratch(const AttentionParams& p, bool backward)
      : dim(padded(p.head_dim)), pairs(!backward && bf16_products(p)),
        q(kQueryTile * dim, backward), dout(backward ? kQueryTile * dim : 0, backward),
        keys(kKeyTile * dim, backward), keys_t(dim * kKeyTile, backward),
        values(kKeyTile * dim, backward), values_t(backward ? dim * kKeyTile : 0, backward),
        q_t(backward ? dim * kQueryTile : 0, backward),
        dout_t(backward ? dim * kQueryTile : 0, backward), s(kQueryTile * kKeyTile, backward),
        dp(backward ? kQueryTile * kKeyTile : 0, backward),
        dropped(backward ? kQueryTile * kKeyTile : 0, backward),
        softcap_grad(kQueryTile * kKeyTile, backward), acc(kQueryTile * dim, backward),
        acc2(backward ? kQueryTile * dim : 0, backward), rows(4 * kQueryTile, backward),
        q_pairs(pairs ? kQueryTile * dim / 2 : 0, false),
        key_pairs(pairs ? dim / 2 * kKeyTile : 0, false),
        value_pairs(pairs ? kKeyTile / 2 * dim : 0, false),
        probability_pairs(pairs ? kQueryTile * kKeyTile / 2 : 0, false) {}
  int64_t dim;  // padded head_dim
  bool pairs;   // the forward's bf16 products
  Tile<> q, dout, keys, keys_t, values, values_t, q_t, dout_t, s, dp, dropped, softcap_grad, acc,
      acc2, rows;
  Tile<uint32_t> q_pairs, key_pairs, value_pairs, probability_pairs;  // bf16 pairs
};

// One forward unit: query rows [q0, q0 + rows) of (b, h) against keys [k_begin, k_end), positions
// local to sequence b (`seq`). Writes the finished rows to out / lse, or (split) the unnormalized
// accumulator and its m, l to `partial`.
struct ForwardUnit {
  SequenceSpan seq;
  int64_t b, h, q0, rows, k_begin, k_end;
  float* partial;  // null, or [rows][dim + 2]: accumulator, running max m, running sum l
};

template <class V>
TRANSFUSE_INLINE void forward_unit(const AttentionParams& p, const ForwardUnit& u, Scratch& s) {
  const int64_t dim = s.dim, kv_head = u.h / (p.heads_q / p.heads_kv);
  float* running_max = s.rows.data();
  float* running_sum = running_max + kQueryTile;
  const bool pairs = kLanes<V> == 16 && s.pairs && u.rows >= kFewRows;
  if (pairs)
    copy_bf16_rows(p.q, p.q_strides, p, u.b, u.h, u.seq.q_start + u.q0, u.rows, s.q_pairs.data(),
                   dim);
  else
    load_rows(p.q, p.q_strides, p, u.b, u.h, u.seq.q_start + u.q0, u.rows, p.scale, s.q.data(),
              dim);
  std::fill(s.acc.begin(), s.acc.begin() + u.rows * dim, 0.f);
  std::fill(running_max, running_max + u.rows, -kInf);
  std::fill(running_sum, running_sum + u.rows, 0.f);

  // The keys any of the rows sees (the ranges move right with the row).
  const int64_t k_lo = std::max(u.k_begin, visible_keys(p, u.seq, u.q0).lo);
  const int64_t k_hi = std::min(u.k_end, visible_keys(p, u.seq, u.q0 + u.rows - 1).hi);
  for (int64_t k0 = k_lo; k0 < k_hi; k0 += kKeyTile) {
    const int64_t keys = std::min(kKeyTile, k_hi - k0), width = padded(keys);
    const TileSpan span{u.b, u.h, u.q0, u.rows, k0, keys, false, u.seq};
    const int64_t key_row = u.seq.kv_start + k0;
    int64_t v_ld = 0;
    const float* v_rows = nullptr;  // fp32, or packed later as pairs
    if (pairs) {
      pack_key_pairs(bf16_row(p.k, p.k_strides, p, u.b, kv_head, key_row), p.k_strides[2], keys,
                     p.head_dim, dim / 2, s.key_pairs.data(), width);
      product_pairs(u.rows, width, dim / 2, s.q_pairs.data(), dim / 2, s.key_pairs.data(), width,
                    s.s.data(), kKeyTile, false, p.scale);
    } else {
      int64_t k_ld;
      const float* k_rows = fp32_rows(p.k, p.k_strides, p, u.b, kv_head, key_row, keys,
                                      s.keys.data(), &k_ld);
      v_rows = fp32_rows(p.v, p.v_strides, p, u.b, kv_head, key_row, keys, s.values.data(), &v_ld);
      if (u.rows < kFewRows) {
        dot_products<V>(u.rows, keys, dim, s.q.data(), k_rows, k_ld, s.s.data(), kKeyTile);
      } else {
        transpose_rows<V>(k_rows, keys, k_ld, p.head_dim, s.keys_t.data(), width);
        product<V>(u.rows, width, p.head_dim, s.q.data(), dim, s.keys_t.data(), width,
                   s.s.data(), kKeyTile, false);
      }
    }
    finish_scores(p, span, s.s.data(), kKeyTile, width, s.softcap_grad.data());
    for (int64_t r = 0; r < u.rows; ++r) {
      float* row = s.s.data() + r * kKeyTile;
      const float new_max = std::max(running_max[r], max_of<V>(row, width));
      if (new_max == -kInf) {  // nothing visible yet: p = 0
        std::fill(row, row + width, 0.f);
        continue;
      }
      const float rescale = std::exp(running_max[r] - new_max);  // 0 on the first visible tile
      if (rescale != 1.f) scale_row<V>(s.acc.data() + r * dim, dim, rescale);
      running_sum[r] = running_sum[r] * rescale + exp_minus<V>(row, width, nullptr, new_max);
      running_max[r] = new_max;
    }
    if (p.dropout_p > 0) drop_tile(p, span, s.s.data(), kKeyTile);
    if (pairs) {
      probability_pairs(s.s.data(), kKeyTile, u.rows, width, s.probability_pairs.data(),
                        kKeyTile / 2);
      pack_value_pairs(bf16_row(p.v, p.v_strides, p, u.b, kv_head, key_row), p.v_strides[2], keys,
                       p.head_dim, s.value_pairs.data(), dim);
      product_pairs(u.rows, dim, (keys + 1) / 2, s.probability_pairs.data(), kKeyTile / 2,
                    s.value_pairs.data(), dim, s.acc.data(), dim, true, 1.f);
    } else {
      product<V>(u.rows, dim, keys, s.s.data(), kKeyTile, v_rows, v_ld, s.acc.data(), dim, true);
    }
  }

  for (int64_t r = 0; r < u.rows; ++r) {
    const float* acc = s.acc.data() + r * dim;
    if (u.partial) {
      float* slot = u.partial + r * (dim + 2);
      std::memcpy(slot, acc, dim * sizeof(float));
      slot[dim] = running_max[r];
      slot[dim + 1] = running_sum[r];
      continue;
    }
    float* row = s.acc.data() + r * dim;
    const float sum = running_sum[r];
    scale_row<V>(row, dim, sum > 0 ? 1.f / sum : 0.f);
    const int64_t i = u.q0 + r;
    store_row(row, p.dtype,
              row_address(p.out, p.dtype, p.out_strides, u.b, u.h, u.seq.q_start + i), p.head_dim);
    if (p.lse) p.lse[first_row(p, u.seq, u.b, u.h) + i] =
        sum > 0 ? running_max[r] + std::log(sum) : kInf;
  }
}

// What the backward knows per query row besides the forward's outputs: delta = <dO, out>, and
// (null when every row's is 1) a factor that corrects P = exp(s - lse). A row whose scores all carry
// a huge additive mask (finfo.min, as transformers writes it) has |lse| so large that fp32 dropped
// log(l) from lse = m + log(l); there P is recomputed as exp(s - lse) * e^(lse - m) / l from the
// row's m and l (lse - m is exact, the two being that close).
// It also carries the layout of the gradients, contiguous: dq [batch, heads_q, seq_q, head_dim] or
// [total_q, heads_q, head_dim] packed, dk / dv likewise with heads_kv; strides as the inputs'.
struct RowStats {
  const float* delta;
  const float* norm;
  int64_t dq_strides[3];
  int64_t dkv_strides[3];
};

// dK and dV of keys [k0, k0 + keys) of (b, kv_head), summed over the query heads sharing it. Scores
// are held transposed (a row per key) so that dV += P^T dO and dK += dS^T (scale Q) are plain
// products.
struct KeyUnit {
  SequenceSpan seq;
  int64_t b, kv_head, k0, keys;
};

template <class V>
TRANSFUSE_INLINE void key_unit(const AttentionBackwardParams& bp, const RowStats& stats,
                               const KeyUnit& u, Scratch& s) {
  const AttentionParams& p = bp.forward;
  const int64_t dim = s.dim, group = p.heads_q / p.heads_kv;
  float* lse_row = s.rows.data();
  float* delta_row = lse_row + kQueryTile;
  float* norm_row = delta_row + kQueryTile;
  float* dk = s.acc.data();
  float* dv = s.acc2.data();
  std::fill(dk, dk + u.keys * dim, 0.f);
  std::fill(dv, dv + u.keys * dim, 0.f);
  const int64_t key_row = u.seq.kv_start + u.k0;
  load_rows(p.k, p.k_strides, p, u.b, u.kv_head, key_row, u.keys, 1.f, s.keys.data(), dim);
  load_rows(p.v, p.v_strides, p, u.b, u.kv_head, key_row, u.keys, 1.f, s.values.data(), dim);
  const int64_t q_lo = visible_queries(p, u.seq, u.k0).lo;
  const int64_t q_hi = visible_queries(p, u.seq, u.k0 + u.keys - 1).hi;
  for (int64_t h = u.kv_head * group; h < (u.kv_head + 1) * group; ++h) {
    const int64_t row0 = first_row(p, u.seq, u.b, h);
    for (int64_t q0 = q_lo; q0 < q_hi; q0 += kQueryTile) {
      const int64_t queries = std::min(kQueryTile, q_hi - q0), width = padded(queries);
      const TileSpan span{u.b, h, q0, queries, u.k0, u.keys, true, u.seq};
      const int64_t query_row = u.seq.q_start + q0;
      load_rows(p.q, p.q_strides, p, u.b, h, query_row, queries, p.scale, s.q.data(), dim);
      transpose_rows<V>(s.q.data(), queries, dim, p.head_dim, s.q_t.data(), width);
      load_rows(bp.dout, bp.dout_strides, p, u.b, h, query_row, queries, 1.f, s.dout.data(), dim);
      transpose_rows<V>(s.dout.data(), queries, dim, p.head_dim, s.dout_t.data(), width);
      std::fill(lse_row, lse_row + width, kInf);
      std::fill(delta_row, delta_row + width, 0.f);
      std::memcpy(lse_row, p.lse + row0 + q0, queries * sizeof(float));
      std::memcpy(delta_row, stats.delta + row0 + q0, queries * sizeof(float));
      if (stats.norm) std::memcpy(norm_row, stats.norm + row0 + q0, queries * sizeof(float));

      // S^T = K (scale Q)^T, P^T = exp(S^T - lse), dP^T = V dO^T.
      product<V>(u.keys, width, p.head_dim, s.keys.data(), dim, s.q_t.data(), width, s.s.data(),
                 kQueryTile, false);
      finish_scores(p, span, s.s.data(), kQueryTile, width, s.softcap_grad.data());
      for (int64_t c = 0; c < u.keys; ++c) {
        float* p_row = s.s.data() + c * kQueryTile;
        exp_minus<V>(p_row, width, lse_row, 0.f);
        if (stats.norm)
          for (int64_t r = 0; r < queries; ++r) p_row[r] *= norm_row[r];
      }
      product<V>(u.keys, width, p.head_dim, s.values.data(), dim, s.dout_t.data(), width,
                 s.dp.data(), kQueryTile, false);
      const float* p_used = s.s.data();
      if (p.dropout_p > 0) {
        std::memcpy(s.dropped.data(), s.s.data(), u.keys * kQueryTile * sizeof(float));
        drop_tile(p, span, s.dropped.data(), kQueryTile);
        drop_tile(p, span, s.dp.data(), kQueryTile);
        p_used = s.dropped.data();
      }
      // dV += P_drop^T dO;  dS^T = P^T (dP^T - delta) (times tanh' with softcap);  dK += dS^T (scale Q)
      product<V>(u.keys, dim, queries, p_used, kQueryTile, s.dout.data(), dim, dv, dim, true);
      for (int64_t c = 0; c < u.keys; ++c)
        score_gradient<V>(s.s.data() + c * kQueryTile, s.dp.data() + c * kQueryTile, width,
                          delta_row, 0.f,
                          p.softcap > 0 ? s.softcap_grad.data() + c * kQueryTile : nullptr);
      product<V>(u.keys, dim, queries, s.dp.data(), kQueryTile, s.q.data(), dim, dk, dim, true);
    }
  }
  for (int64_t c = 0; c < u.keys; ++c) {
    const int64_t row = key_row + c;
    const int64_t* strides = stats.dkv_strides;
    store_row(dk + c * dim, p.dtype, row_address(bp.dk, p.dtype, strides, u.b, u.kv_head, row),
              p.head_dim);
    store_row(dv + c * dim, p.dtype, row_address(bp.dv, p.dtype, strides, u.b, u.kv_head, row),
              p.head_dim);
  }
}

// dQ (and dbias = dS) of query rows [q0, q0 + rows) of (b, h).
template <class V>
TRANSFUSE_INLINE void query_unit(const AttentionBackwardParams& bp, const RowStats& stats,
                                 const ForwardUnit& u, Scratch& s) {
  const AttentionParams& p = bp.forward;
  const int64_t dim = s.dim, kv_head = u.h / (p.heads_q / p.heads_kv);
  const int64_t row0 = first_row(p, u.seq, u.b, u.h) + u.q0;      // of lse, delta, norm
  const int64_t bias_row0 = (u.b * p.heads_q + u.h) * p.seq_q + u.q0;  // of dbias (local rows)
  const int64_t query_row = u.seq.q_start + u.q0;
  float* dq = s.acc.data();
  std::fill(dq, dq + u.rows * dim, 0.f);
  // Here K carries the scale (dQ = dS (scale K)); S = Q (scale K)^T equals the forward's
  // (scale Q) K^T up to rounding.
  load_rows(p.q, p.q_strides, p, u.b, u.h, query_row, u.rows, 1.f, s.q.data(), dim);
  load_rows(bp.dout, bp.dout_strides, p, u.b, u.h, query_row, u.rows, 1.f, s.dout.data(), dim);
  if (bp.dbias)
    std::fill(bp.dbias + bias_row0 * p.seq_kv, bp.dbias + (bias_row0 + u.rows) * p.seq_kv, 0.f);

  const int64_t k_lo = visible_keys(p, u.seq, u.q0).lo;
  const int64_t k_hi = visible_keys(p, u.seq, u.q0 + u.rows - 1).hi;
  for (int64_t k0 = k_lo; k0 < k_hi; k0 += kKeyTile) {
    const int64_t keys = std::min(kKeyTile, k_hi - k0), width = padded(keys);
    const TileSpan span{u.b, u.h, u.q0, u.rows, k0, keys, false, u.seq};
    const int64_t key_row = u.seq.kv_start + k0;
    load_rows(p.k, p.k_strides, p, u.b, kv_head, key_row, keys, p.scale, s.keys.data(), dim);
    transpose_rows<V>(s.keys.data(), keys, dim, p.head_dim, s.keys_t.data(), width);
    load_rows(p.v, p.v_strides, p, u.b, kv_head, key_row, keys, 1.f, s.values.data(), dim);
    transpose_rows<V>(s.values.data(), keys, dim, p.head_dim, s.values_t.data(), width);
    // S = Q (scale K)^T (the same products as the forward's), P = exp(S - lse), dP = dO V^T.
    product<V>(u.rows, width, p.head_dim, s.q.data(), dim, s.keys_t.data(), width, s.s.data(),
               kKeyTile, false);
    finish_scores(p, span, s.s.data(), kKeyTile, width, s.softcap_grad.data());
    product<V>(u.rows, width, p.head_dim, s.dout.data(), dim, s.values_t.data(), width,
               s.dp.data(), kKeyTile, false);
    if (p.dropout_p > 0) drop_tile(p, span, s.dp.data(), kKeyTile);
    for (int64_t r = 0; r < u.rows; ++r) {
      float* p_row = s.s.data() + r * kKeyTile;
      float* ds_row = s.dp.data() + r * kKeyTile;
      exp_minus<V>(p_row, width, nullptr, p.lse[row0 + r]);
      if (stats.norm) scale_row<V>(p_row, width, stats.norm[row0 + r]);
      score_gradient<V>(p_row, ds_row, width, nullptr, stats.delta[row0 + r], nullptr);
      if (bp.dbias)
        std::memcpy(bp.dbias + (bias_row0 + r) * p.seq_kv + k0, ds_row, keys * sizeof(float));
      if (p.softcap > 0) {
        const float* grad = s.softcap_grad.data() + r * kKeyTile;
        for (int64_t c = 0; c < keys; ++c) ds_row[c] *= grad[c];
      }
    }
    // dQ += dS (scale K)
    product<V>(u.rows, dim, keys, s.dp.data(), kKeyTile, s.keys.data(), dim, dq, dim, true);
  }
  for (int64_t r = 0; r < u.rows; ++r)
    store_row(dq + r * dim, p.dtype,
              row_address(bp.dq, p.dtype, stats.dq_strides, u.b, u.h, query_row + r), p.head_dim);
}

// ------------------------------------------------------------------------------------------------
// Entry points per instruction set
// ------------------------------------------------------------------------------------------------

struct Kernels {
  void (*forward)(const AttentionParams&, const ForwardUnit&, Scratch&);
  void (*keys)(const AttentionBackwardParams&, const RowStats&, const KeyUnit&, Scratch&);
  void (*queries)(const AttentionBackwardParams&, const RowStats&, const ForwardUnit&, Scratch&);
};

#define TRANSFUSE_ATTENTION_KERNELS(name, V)                                                    \
  void forward_##name(const AttentionParams& p, const ForwardUnit& u, Scratch& s) {            \
    forward_unit<V>(p, u, s);                                                                  \
  }                                                                                            \
  void keys_##name(const AttentionBackwardParams& p, const RowStats& r, const KeyUnit& u,     \
                   Scratch& s) {                                                               \
    key_unit<V>(p, r, u, s);                                                                   \
  }                                                                                            \
  void queries_##name(const AttentionBackwardParams& p, const RowStats& r,                     \
                      const ForwardUnit& u, Scratch& s) {                                      \
    query_unit<V>(p, r, u, s);                                                                 \
  }                                                                                            \
  constexpr Kernels kernels_##name{forward_##name, keys_##name, queries_##name};

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
TRANSFUSE_ATTENTION_KERNELS(avx512, Floats16)
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
TRANSFUSE_ATTENTION_KERNELS(avx2, Floats8)
#pragma GCC pop_options
#endif
TRANSFUSE_ATTENTION_KERNELS(baseline, Floats4)

// The widest instruction set this CPU has; TRANSFUSE_CPU_ISA=avx2 or =baseline picks a narrower one
// (so that the tests exercise every variant on any machine).
const Kernels& kernels() {
  const char* forced = std::getenv("TRANSFUSE_CPU_ISA");
  const std::string isa = forced ? forced : "";
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool has_avx512 = __builtin_cpu_supports("avx512f");
  static const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (has_avx512 && isa.empty()) return kernels_avx512;
  if (has_avx2 && isa != "baseline") return kernels_avx2;
#endif
  return kernels_baseline;
}

// Threads for `units` independent tasks of a call (threads.h): one per 64K multiply-adds of its
// scores (batch x heads x seq_q x seq_kv x head_dim) at most.
int score_threads(const AttentionParams& p, int64_t units) {
  return threads_for(p.num_threads, units, p.batch * p.heads_q * p.seq_q * p.seq_kv * p.head_dim,
                     65536);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The packed layout addresses row i of sequence b at h * strides[1] + (start + i) * strides[2]:
// strides[0] is unused there, so it is zeroed, and b * strides[0] adds nothing.
void drop_batch_strides(AttentionParams& p, int64_t* dout_strides = nullptr) {
  if (!is_packed(p)) return;
  p.q_strides[0] = p.k_strides[0] = p.v_strides[0] = p.out_strides[0] = 0;
  if (dout_strides) dout_strides[0] = 0;
}

// Strides of a contiguous gradient of `heads` heads: [batch, heads, seq, head_dim], or packed
// [total, heads, head_dim] (no batch stride).
void gradient_strides(const AttentionParams& p, int64_t heads, int64_t seq, int64_t* strides) {
  strides[0] = is_packed(p) ? 0 : heads * seq * p.head_dim;
  strides[1] = is_packed(p) ? p.head_dim : seq * p.head_dim;
  strides[2] = is_packed(p) ? heads * p.head_dim : p.head_dim;
}

// The work lists. Sequence b has query rows i in [0, len_q) and keys j in [0, len_kv), local
// positions: padded, len_q = seq_q and len_kv = seq_kv for every b; packed, its rows are
// cu_seqlens_q[b] + i of q / out and its keys cu_seqlens_k[b] + j of k / v. A query unit is
// (b, query head h, up to kQueryTile rows of b), a key unit (b, key/value head, up to kGradKeyTile
// keys of b): no unit spans two sequences, a sequence of length 0 has none, and one dynamic list
// over all sequences keeps the threads busy whatever the mix of lengths.
std::vector<ForwardUnit> query_units(const AttentionParams& p) {
  const int64_t rows = is_packed(p) ? p.total_q : p.batch * p.seq_q;
  std::vector<ForwardUnit> units;
  units.reserve(p.heads_q * (ceil_div(rows, kQueryTile) + p.batch));
  for (int64_t b = 0; b < p.batch; ++b) {
    const SequenceSpan seq = span_of(p, b);
    for (int64_t h = 0; h < p.heads_q; ++h)
      for (int64_t q0 = 0; q0 < seq.q_len; q0 += kQueryTile)
        units.push_back({seq, b, h, q0, std::min(kQueryTile, seq.q_len - q0), 0, seq.kv_len,
                         nullptr});
  }
  return units;
}

std::vector<KeyUnit> key_units(const AttentionParams& p) {
  const int64_t keys = is_packed(p) ? p.total_kv : p.batch * p.seq_kv;
  std::vector<KeyUnit> units;
  units.reserve(p.heads_kv * (ceil_div(keys, kGradKeyTile) + p.batch));
  for (int64_t b = 0; b < p.batch; ++b) {
    const SequenceSpan seq = span_of(p, b);
    for (int64_t h = 0; h < p.heads_kv; ++h)
      for (int64_t k0 = 0; k0 < seq.kv_len; k0 += kGradKeyTile)
        units.push_back({seq, b, h, k0, std::min(kGradKeyTile, seq.kv_len - k0)});
  }
  return units;
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Forward: the query units, each with its keys split into ranges when the units alone leave threads
// idle; split ranges merged at the end by
//   m = max_s m_s,  l = sum_s l_s e^(m_s - m),  out = sum_s acc_s e^(m_s - m) / l,  lse = m + log l.
// ------------------------------------------------------------------------------------------------

void attention_forward(const AttentionParams& params) {
  if (params.batch <= 0 || params.heads_q <= 0 || params.seq_q <= 0) return;
  AttentionParams p = params;
  drop_batch_strides(p);
  const Kernels& k = kernels();
  const int64_t dim = padded(p.head_dim);
  const std::vector<ForwardUnit> units = query_units(p);
  const int64_t count = int64_t(units.size());
  if (count == 0) return;
  // Split the keys when the units alone leave threads idle, keeping >= 2 key tiles per range.
  const int64_t splits = std::max<int64_t>(1, std::min(ceil_div(2 * p.num_threads, count),
                                                       p.seq_kv / (2 * kKeyTile)));
  const int64_t keys_per_split = ceil_div(ceil_div(p.seq_kv, splits), kKeyTile) * kKeyTile;
  // partial holds, per query tile, `splits` blocks of [rows][dim + 2], at the tile's lse rows.
  std::vector<float> partial(splits > 1 ? lse_rows(p) * splits * (dim + 2) : 0);
  auto partial_of = [&](const ForwardUnit& u, int64_t split) {
    return partial.data() +
           ((first_row(p, u.seq, u.b, u.h) + u.q0) * splits + split * u.rows) * (dim + 2);
  };

  in_team(score_threads(p, count * splits), [&] {
    Scratch scratch(p, false);
#pragma omp for schedule(dynamic, 1)
    for (int64_t index = 0; index < count * splits; ++index) {
      const int64_t split = index % splits;
      ForwardUnit u = units[index / splits];
      u.k_begin = split * keys_per_split;
      u.k_end = std::min(u.seq.kv_len, (split + 1) * keys_per_split);
      if (splits > 1) u.partial = partial_of(u, split);
      k.forward(p, u, scratch);
    }
  });
  if (splits == 1) return;

  in_team(score_threads(p, count), [&] {
    std::vector<float> total(dim);
#pragma omp for schedule(dynamic, 1)
    for (int64_t index = 0; index < count; ++index) {
      const ForwardUnit& u = units[index];
      for (int64_t r = 0; r < u.rows; ++r) {
        auto slot = [&](int64_t split) { return partial_of(u, split) + r * (dim + 2); };
        float best = -kInf;
        for (int64_t split = 0; split < splits; ++split) best = std::max(best, slot(split)[dim]);
        std::fill(total.begin(), total.end(), 0.f);
        float sum = 0.f;
        if (best > -kInf) {
          for (int64_t split = 0; split < splits; ++split) {
            const float* part = slot(split);
            if (part[dim] == -kInf) continue;
            const float weight = std::exp(part[dim] - best);
            sum += part[dim + 1] * weight;
            for (int64_t d = 0; d < p.head_dim; ++d) total[d] += part[d] * weight;
          }
        }
        const float inverse = sum > 0 ? 1.f / sum : 0.f;
        for (int64_t d = 0; d < p.head_dim; ++d) total[d] *= inverse;
        const int64_t i = u.q0 + r;
        store_row(total.data(), p.dtype,
                  row_address(p.out, p.dtype, p.out_strides, u.b, u.h, u.seq.q_start + i),
                  p.head_dim);
        if (p.lse) p.lse[first_row(p, u.seq, u.b, u.h) + i] = sum > 0 ? best + std::log(sum) : kInf;
      }
    }
  });
}

// ------------------------------------------------------------------------------------------------
// Backward: delta, then the dK/dV units, then the dQ/dbias units.
// ------------------------------------------------------------------------------------------------

void attention_backward(const AttentionBackwardParams& params) {
  AttentionBackwardParams bp = params;
  drop_batch_strides(bp.forward, bp.dout_strides);
  const AttentionParams& p = bp.forward;
  const Kernels& k = kernels();
  const int64_t rows = lse_rows(p);
  // An lse row is (b, h, i) padded, (h, start + i) packed, whose rows need no batch index.
  const int64_t rows_per_head = is_packed(p) ? p.total_q : p.seq_q;
  std::vector<float> delta(std::max<int64_t>(rows, 0));

  in_team(score_threads(p, rows / 64 + 1), [&] {
    std::vector<float> out_row(p.head_dim), dout_row(p.head_dim);
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t bh = row / rows_per_head, i = row % rows_per_head;
      const int64_t b = bh / p.heads_q, h = bh % p.heads_q;
      load_row(row_address(p.out, p.dtype, p.out_strides, b, h, i), p.dtype, out_row.data(),
               p.head_dim);
      load_row(row_address(bp.dout, p.dtype, bp.dout_strides, b, h, i), p.dtype,
               dout_row.data(), p.head_dim);
      float total = 0.f;
      for (int64_t d = 0; d < p.head_dim; ++d) total += out_row[d] * dout_row[d];
      delta[row] = total;
    }
  });

  const std::vector<KeyUnit> key_work = key_units(p);
  const std::vector<ForwardUnit> query_work = query_units(p);
  const int64_t key_count = int64_t(key_work.size()), query_count = int64_t(query_work.size());
  RowStats stats{delta.data(), nullptr, {}, {}};
  gradient_strides(p, p.heads_q, p.seq_q, stats.dq_strides);
  gradient_strides(p, p.heads_kv, p.seq_kv, stats.dkv_strides);
  // Rows whose lse lost log(l) to rounding (see RowStats): only a huge additive mask gets there.
  auto inexact = [](float lse) { return std::abs(lse) > kExactLse && lse != kInf; };
  std::vector<float> norm;
  if (p.mask_kind == MaskKind::additive)
    for (int64_t row = 0; row < rows && norm.empty(); ++row)
      if (inexact(p.lse[row])) norm.assign(rows, 1.f);
  stats.norm = norm.empty() ? nullptr : norm.data();
  // dbias rows past a packed sequence's length are in no unit: their gradient is 0.
  if (bp.dbias && is_packed(p))
    for (int64_t b = 0; b < p.batch; ++b)
      for (int64_t h = 0; h < p.heads_q; ++h) {
        float* first = bp.dbias + ((b * p.heads_q + h) * p.seq_q + span_of(p, b).q_len) * p.seq_kv;
        std::fill(first, bp.dbias + (b * p.heads_q + h + 1) * p.seq_q * p.seq_kv, 0.f);
      }

  in_team(score_threads(p, std::max(key_count, query_count)), [&] {
    Scratch scratch(p, true);
    if (stats.norm) {
      std::vector<float> partial(scratch.dim + 2);
#pragma omp for schedule(dynamic, 1)
      for (int64_t index = 0; index < query_count; ++index) {
        const ForwardUnit& tile = query_work[index];
        const int64_t row0 = first_row(p, tile.seq, tile.b, tile.h) + tile.q0;
        for (int64_t r = 0; r < tile.rows; ++r) {
          if (!inexact(p.lse[row0 + r])) continue;
          ForwardUnit u = tile;
          u.q0 += r;
          u.rows = 1;
          u.partial = partial.data();
          k.forward(p, u, scratch);
          const float m = partial[scratch.dim], l = partial[scratch.dim + 1];
          norm[row0 + r] = std::exp(p.lse[row0 + r] - m) / l;
        }
      }
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t index = 0; index < key_count; ++index) k.keys(bp, stats, key_work[index], scratch);
#pragma omp for schedule(dynamic, 1)
    for (int64_t index = 0; index < query_count; ++index)
      k.queries(bp, stats, query_work[index], scratch);
  });
}

}  // namespace transfuse::cpu
