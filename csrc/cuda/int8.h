// CUDA kernels of the int8 quantized matmul; the math is stated in common/int8.h.
//   quantize_per_token_launch   per-row symmetric quantization of x to int8 plus the fp32 scales.
//   int8_linear_launch          w8a8 (x_q set): int8 tensor-core GEMM (mma.sync, sm_80+) with the
//                               dequantizing epilogue fused, or the raw int32 product (acc set);
//                               w8a16 (x set): a GEMV that streams w once for m <= 16 (decoding),
//                               a tiled fp32 kernel for larger m.
// Every shape is taken (any m, n, k, including tails and unaligned rows); 16-byte vector paths
// are used where the sizes and pointers allow them.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common/int8.h"

namespace transfuse::cuda {

// The w8a8 product is accumulated in int32, exact while no sum can overflow: with operands in
// [-127, 127] (the symmetric range quantize produces), k * 127 * 127 < 2^31, so k <= 133144.
// Larger k is refused. (An operand of -128 is outside that range: a row of -128 against a row of
// -128 could overflow from k = 131072 on.)
constexpr int64_t kInt8LinearMaxExactK = 133144;

// Empty when int8_linear_launch takes these params; else why not (the binding raises it): sizes
// in [0, 2^30], k <= kInt8LinearMaxExactK for w8a8, and the pointers of one mode. The mode is
// w8a8 when any of x_q, x_scale, acc is set (empty tensors may have null data pointers), else
// w8a16; a non-empty output needs its inputs (x_q / x and w unless k is 0) and scales.
const char* int8_linear_unsupported(const Int8LinearParams& p);

// Writes q [rows, cols] and scale [rows]; rows with cols == 0 get scale 1.
void quantize_per_token_launch(const QuantizeParams& p, cudaStream_t stream);

// Writes out [m, n] (or acc [m, n] for the raw w8a8 product). Does nothing when
// int8_linear_unsupported(p) is not empty.
void int8_linear_launch(const Int8LinearParams& p, cudaStream_t stream);

}  // namespace transfuse::cuda
