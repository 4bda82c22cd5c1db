// The bf16 products of the CPU attention forward (attention.cpp) on AVX512_BF16: vdpbf16ps takes
// 16 lanes of pairs of bf16 (a 32-bit word each) and adds each lane's two products to an fp32 sum,
// so both operands come as pairs along the product's depth:
//   scores S = scale * Q K^T: Q rows as they are (pairs of head_dim), K^T packed as key_pairs;
//   output  O += P V: P rounded to bf16 (probability_pairs, pairs of keys), V packed as value_pairs.
// The products of bf16 values are exact in fp32 and summed in fp32, as in the fp32 tiles; the one
// new rounding is P's to bf16 (relative 2^-9, as FlashAttention's bf16 kernels do), while the
// softmax's running sum l is taken from the fp32 P. The instruction treats subnormal inputs as zero
// and flushes subnormal sums to zero.
#pragma once

#include <cstdint>

namespace transfuse::cpu {

// Whether this CPU has the instructions (AVX-512 BW and BF16).
bool has_attention_bf16();

// out[g * ld + j] = the pair (k[j][2 g], k[j][2 g + 1]) for key rows j < keys (`stride` bf16
// apart), g < groups; zero for j in [keys, ld) and for elements past head_dim. ld a multiple of 16.
void pack_key_pairs(const uint16_t* k, int64_t stride, int64_t keys, int64_t head_dim,
                    int64_t groups, uint32_t* out, int64_t ld);

// out[t * ld + d] = the pair (v[2 t][d], v[2 t + 1][d]) for t < ceil(keys / 2), d < ld (a multiple
// of 16); zero for rows >= keys and d >= head_dim.
void pack_value_pairs(const uint16_t* v, int64_t stride, int64_t keys, int64_t head_dim,
                      uint32_t* out, int64_t ld);

// out[r * ld_out + t] = the pair (bf16(p[r][2 t]), bf16(p[r][2 t + 1])), rounded to nearest even,
// for r < rows, t < width / 2 (width a multiple of 16).
void probability_pairs(const float* p, int64_t ld_p, int64_t rows, int64_t width, uint32_t* out,
                       int64_t ld_out);

// C[m x n] = scale * A B, or (accumulate) C += A B, where A [m x pairs] and B [pairs x n] hold
// pairs of bf16 (row-major, lda / ldb words apart) and C is fp32; n a multiple of 16.
void product_pairs(int64_t m, int64_t n, int64_t pairs, const uint32_t* a, int64_t lda,
                   const uint32_t* b, int64_t ldb, float* c, int64_t ldc, bool accumulate,
                   float scale);

}  // namespace transfuse::cpu
