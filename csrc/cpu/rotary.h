// CPU kernel of the rotary position embedding. The math is stated in common/rotary.h.
#pragma once

#include "../common/rotary.h"

namespace transfuse::cpu {

// The longest head_dim the kernel takes (its fp32 scratch rows).
constexpr int64_t kRotaryMaxHeadDim = 1024;

// q_out, k_out = q, k rotated (p.inverse: by the transpose, the backward); head_dim <=
// kRotaryMaxHeadDim
void rotary(const RotaryParams& p);

}  // namespace transfuse::cpu
