// The tensor functions behind some of transfuse._C's Python functions, for bindings that compose
// them (encoder_layer.cpp, decoder_layer.cpp). Each checks its arguments, as when Python calls it.
#pragma once

#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include "../common/activation.h"

namespace transfuse {

// linear.cpp: act(x @ w^T + bias), or nothing where transfuse's GEMMs do not take the call.
std::optional<at::Tensor> linear(const at::Tensor& x, const at::Tensor& w,
                                 const std::optional<at::Tensor>& bias,
                                 c10::string_view activation);

// int8.cpp: x @ (w * w_scale[:, None])^T + bias in x's dtype (w8a8 or w8a16), or nothing where
// the Python op computes it.
std::optional<at::Tensor> int8_linear(const at::Tensor& x, const at::Tensor& w,
                                      const at::Tensor& w_scale,
                                      const std::optional<at::Tensor>& bias,
                                      c10::string_view mode);
// The same for several weights of one x (on the CPU in w8a8: x quantized once for all).
std::vector<std::optional<at::Tensor>> int8_linears(
    const at::Tensor& x, const std::vector<at::Tensor>& ws, const std::vector<at::Tensor>& w_scales,
    const std::vector<std::optional<at::Tensor>>& biases, c10::string_view mode);

// attention.cpp: (out, lse), padded [B, H, S, D] and packed [T, H, D] (FlashAttention's varlen).
std::tuple<at::Tensor, at::Tensor> attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, bool causal, double scale, int64_t window,
    double softcap, double dropout_p, int64_t seed);
std::tuple<at::Tensor, at::Tensor> varlen_attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const std::optional<at::Tensor>& mask, bool causal, double scale, int64_t window,
    double softcap, double dropout_p, int64_t seed);

// norm.cpp: (y, x + residual, mean, rstd) of a LayerNorm or RMSNorm of x (+ residual).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_forward(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual, double eps,
    double weight_offset, bool rms, at::ScalarType normalized_dtype, at::ScalarType out_dtype,
    bool save_stats);
// norm.cpp: y of a LayerNorm of x (+ residual) as transfuse.ops.layer_norm (the norm rules'
// FusedLayerNorm) runs it: statistics in fp32, y in x's dtype, no statistics kept.
at::Tensor layer_norm_forward(const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& bias, const std::optional<at::Tensor>& residual,
                              double eps);

// activation.cpp: gelu(x + bias) over a contiguous [rows, cols] x; act(gate) * up, act named
// "silu", "gelu" or "gelu_tanh" (a ValueError otherwise).
at::Tensor bias_gelu_forward(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                             c10::string_view approximate);
GatedActivation to_gated_activation(std::string_view activation);
at::Tensor gated_mul_forward(const at::Tensor& gate, const at::Tensor& up,
                             GatedActivation activation);

// rotary.cpp: (q, k) rotated (rotate half) by cos and sin, new contiguous tensors.
std::tuple<at::Tensor, at::Tensor> rotary(const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& cos, const at::Tensor& sin,
                                          bool inverse);

}  // namespace transfuse
