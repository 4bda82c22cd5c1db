// CPU kernel of the rotary position embedding. The math is stated in common/rotary.h.
//
// Layout of the work: one task per output row (b, head, s) of q_out then k_out, in the outputs'
// memory order; OpenMP threads take contiguous runs of tasks (static schedule), a tiny call (a
// decoding step: 12 rows of 64) runs on the calling thread alone (threads.h). A row reads its D
// elements of q or k and the D of cos and sin at (b, s), and writes D: fp32 rows go straight
// from the inputs to the output in one vectorized loop per half; fp16 / bf16 rows are converted
// into fp32 scratch first and back once (cpu/convert).
#include "rotary.h"

#include "convert.h"
#include "multiversion.h"
#include "threads.h"


namespace transfuse::cpu {
namespace {

// forward:  lo = x_lo c_lo - x_hi n_lo,  hi = x_hi c_hi + x_lo n_hi
// inverse:  lo = x_lo c_lo + x_hi n_hi,  hi = x_hi c_hi - x_lo n_lo
// Each product rounded, then the sum (no fused multiply-add): in fp32 bit for bit what
// transformers' q * cos + rotate_half(q) * sin computes.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
TRANSFUSE_MULTIVERSION
void rotary_row(const float* __restrict x, const float* __restrict c, const float* __restrict n,
                float* __restrict out, int64_t half, bool inverse) {
  const float* x_hi = x + half;
  const float* c_hi = c + half;
  const float* n_hi = n + half;
  float* out_hi = out + half;
  if (inverse) {
    for (int64_t i = 0; i < half; ++i) {
      out[i] = x[i] * c[i] + x_hi[i] * n_hi[i];
      out_hi[i] = x_hi[i] * c_hi[i] - x[i] * n[i];
    }
  } else {
    for (int64_t i = 0; i < half; ++i) {
      out[i] = x[i] * c[i] - x_hi[i] * n[i];
      out_hi[i] = x_hi[i] * c_hi[i] + x[i] * n_hi[i];
    }
  }
}
#pragma GCC pop_options

}  // namespace

void rotary(const RotaryParams& p) {
  const int64_t q_rows = p.batch * p.q_heads * p.seq;
  const int64_t rows = q_rows + p.batch * p.k_heads * p.seq;
  const int64_t d = p.head_dim;
  if (rows == 0 || d == 0) return;
  const int threads = threads_for(p.num_threads, rows, rows * d, 16384);
  in_team(threads, [&] {
    alignas(64) float x[kRotaryMaxHeadDim];
    alignas(64) float c[kRotaryMaxHeadDim];
    alignas(64) float n[kRotaryMaxHeadDim];
    alignas(64) float out[kRotaryMaxHeadDim];
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      const bool is_q = row < q_rows;
      const int64_t heads = is_q ? p.q_heads : p.k_heads;
      const int64_t r = is_q ? row : row - q_rows;  // [b, head, s] in the output
      const int64_t s = r % p.seq, head = (r / p.seq) % heads, b = r / (p.seq * heads);
      const int64_t* strides = is_q ? p.q_strides : p.k_strides;
      const void* src = element_address(is_q ? p.q : p.k, p.dtype,
                                        b * strides[0] + head * strides[1] + s * strides[2]);
      const void* cos =
          element_address(p.cos, p.dtype, b * p.cos_strides[0] + s * p.cos_strides[1]);
      const void* sin =
          element_address(p.sin, p.dtype, b * p.sin_strides[0] + s * p.sin_strides[1]);
      void* dst = element_address(is_q ? p.q_out : p.k_out, p.dtype, r * d);
      if (p.dtype == DType::f32) {
        rotary_row(static_cast<const float*>(src), static_cast<const float*>(cos),
                   static_cast<const float*>(sin), static_cast<float*>(dst), d / 2, p.inverse);
        continue;
      }
      load_row(src, p.dtype, x, d);
      load_row(cos, p.dtype, c, d);
      load_row(sin, p.dtype, n, d);
      rotary_row(x, c, n, out, d / 2, p.inverse);
      store_row(out, p.dtype, dst, d);
    }
  });
}

}  // namespace transfuse::cpu
