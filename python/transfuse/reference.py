"""Plain-PyTorch definitions of every transfuse op: the ground truth of the tests and the
`reference` backend. Each function follows the math (and the casts) of the Hugging Face module it
stands for; called with float64 inputs it computes everything in float64.
"""
from __future__ import annotations

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)
CASTING_MODES = ("llama", "gemma", "t5")


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def layer_norm(x, weight=None, bias=None, eps=1e-5, residual=None):
    """F.layer_norm(x + residual): statistics in fp32 (or wider), output in x's dtype.

    Returns y, or (y, x + residual) when a residual is given.
    """
    h = x if residual is None else x + residual
    acc = _accumulate_dtype(h.dtype)
    hf = h.to(acc)
    mean = hf.mean(-1, keepdim=True)
    var = (hf - mean).pow(2).mean(-1, keepdim=True)
    y = (hf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    y = y.to(h.dtype)
    return y if residual is None else (y, h)


def rms_norm_dtypes(x_dtype, weight_dtype, casting_mode):
    """(dtype the normalized x is rounded to before the weight multiply, output dtype).

    llama  (LlamaRMSNorm, Mistral, Qwen2): weight * x_hat.to(x.dtype), so the output dtype is
           the promotion of weight and x.
    gemma  (GemmaRMSNorm): (x_hat * (1 + weight)) in fp32, cast to x.dtype at the end.
    t5     (T5LayerNorm): x_hat cast to the weight's dtype if that is half, then weight * x_hat.
    """
    acc = _accumulate_dtype(x_dtype)
    if casting_mode == "llama":
        return x_dtype, torch.promote_types(weight_dtype, x_dtype)
    if casting_mode == "gemma":
        return acc, x_dtype
    if casting_mode == "t5":
        if weight_dtype in HALF_DTYPES:
            return weight_dtype, weight_dtype
        return acc, torch.promote_types(acc, weight_dtype)
    raise ValueError(f"casting_mode must be one of {CASTING_MODES}, got {casting_mode!r}")


def rms_norm(x, weight, eps=1e-6, residual=None, offset=0.0, casting_mode="llama"):
    """RMSNorm of x + residual, y = x_hat * (offset + weight), with the casts of `casting_mode`.

    Returns y, or (y, x + residual) when a residual is given.
    """
    h = x if residual is None else x + residual
    acc = _accumulate_dtype(h.dtype)
    normalized_dtype, out_dtype = rms_norm_dtypes(h.dtype, weight.dtype, casting_mode)
    hf = h.to(acc)
    x_hat = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    x_hat = x_hat.to(normalized_dtype).to(acc)
    y = (x_hat * (weight.to(acc) + offset)).to(out_dtype)
    return y if residual is None else (y, h)
