// CPU attention kernels: tiles of queries against tiles of keys with the online softmax, OpenMP
// over (batch, head, query tile), register-blocked inner products chosen at run time for
// AVX-512 / AVX2 / scalar. The math is stated in common/attention.h.
#pragma once

#include "../common/attention.h"

namespace transfuse::cpu {

// Writes p.out and, when p.lse is not null, p.lse.
void attention_forward(const AttentionParams& p);

// Reads p.forward.out and p.forward.lse; writes dq, dk, dv and, when not null, dbias.
void attention_backward(const AttentionBackwardParams& p);

}  // namespace transfuse::cpu
