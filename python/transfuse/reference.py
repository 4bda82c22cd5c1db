"""Plain-PyTorch definitions of every transfuse op: the ground truth of the tests and the
`reference` backend. Each function follows the math (and the casts) of the Hugging Face module it
stands for; called with float64 inputs it computes everything in float64.
"""
from __future__ import annotations

import functools
import math

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)
CASTING_MODES = ("llama", "gemma", "t5")


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _inverse_std(variance, eps):
    """rsqrt(variance + eps), NaN where that sum is not finite: a variance that overflows the
    accumulation dtype makes the row NaN (as eager F.layer_norm gives), never zeros (rsqrt(inf)
    = 0). Every backend computes this rule; it departs from HF's RMSNorm modules, which give
    zeros there."""
    v = variance + eps
    return torch.where(v < float("inf"), torch.rsqrt(v), torch.full_like(v, float("nan")))


def layer_norm(x, weight=None, bias=None, eps=1e-5, residual=None):
    """F.layer_norm(x + residual): statistics in fp32 (or wider), output in x's dtype; a row whose
    variance overflows (fp32 values near 1e19 and above) gives NaN, as eager does.

    Returns y, or (y, x + residual) when a residual is given.
    """
    h = x if residual is None else x + residual
    acc = _accumulate_dtype(h.dtype)
    hf = h.to(acc)
    mean = hf.mean(-1, keepdim=True)
    var = (hf - mean).pow(2).mean(-1, keepdim=True)
    y = (hf - mean) * _inverse_std(var, eps)
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
    A row whose mean square overflows gives NaN (where HF's modules give zeros).

    Returns y, or (y, x + residual) when a residual is given.
    """
    h = x if residual is None else x + residual
    acc = _accumulate_dtype(h.dtype)
    normalized_dtype, out_dtype = rms_norm_dtypes(h.dtype, weight.dtype, casting_mode)
    hf = h.to(acc)
    x_hat = hf * _inverse_std(hf.pow(2).mean(-1, keepdim=True), eps)
    x_hat = x_hat.to(normalized_dtype).to(acc)
    y = (x_hat * (weight.to(acc) + offset)).to(out_dtype)
    return y if residual is None else (y, h)


_UINT32 = 0xFFFFFFFF


def _mul32(x, c):
    """(x * c) mod 2**32 for int64 tensors holding uint32 values, without int64 overflow."""
    low = x * (c & 0xFFFF)
    high = ((x * (c >> 16)) & 0xFFFF) << 16
    return (low + high) & _UINT32


def _hash32(x):
    """common/attention.h's hash32 on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def dropout_keep(seed, batch, heads, seq_q, seq_kv, device=None):
    """The dropout mask [batch, heads, seq_q, seq_kv] (True = kept) every attention kernel draws
    for `seed`: keep iff hash bits >= round(p * 2**32); see common/attention.h. Returns the bits;
    compare with dropout_threshold(p)."""
    batch_head = torch.arange(batch * heads, device=device).view(batch, heads, 1, 1)
    rows = torch.arange(seq_q, device=device).view(1, 1, seq_q, 1)
    cols = torch.arange(seq_kv, device=device).view(1, 1, 1, seq_kv)
    row_key = _hash32((seed & _UINT32) ^ _hash32(batch_head ^ _hash32(rows)))
    return _hash32((row_key + _mul32(cols, 0x9E3779B9)) & _UINT32)


def dropout_threshold(p):
    return min(round(p * 2.0 ** 32), _UINT32)


def attention(q, k, v, mask=None, causal=False, scale=None, dropout_p=0.0, window=0, softcap=0.0,
              dropout_seed=0):
    """softmax(scale * q k^T [softcapped] + mask) v over [B, H, S, D] tensors, as
    common/attention.h states it: GQA by head groups, causal aligned bottom-right, a sliding
    `window` on both sides, bool masks (True = attend) or additive ones, rows with no visible key
    give zeros, dropout drawn with dropout_keep(dropout_seed, ...). Computes in fp32 (float64 for
    float64 inputs), returns q's dtype. Differentiable in q, k, v and an additive mask."""
    dtype = q.dtype
    acc = _accumulate_dtype(dtype)
    batch, heads_q, seq_q, head_dim = q.shape
    heads_kv, seq_kv = k.shape[1], k.shape[2]
    groups = heads_q // heads_kv
    scale = head_dim ** -0.5 if scale is None else scale
    k = k.to(acc).repeat_interleave(groups, dim=1)
    v = v.to(acc).repeat_interleave(groups, dim=1)
    s = (q.to(acc) @ k.transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    rows = torch.arange(seq_q, device=q.device).view(-1, 1) + (seq_kv - seq_q)
    cols = torch.arange(seq_kv, device=q.device).view(1, -1)
    visible = torch.ones(seq_q, seq_kv, dtype=torch.bool, device=q.device)
    if causal:
        visible = visible & (cols <= rows)
    if window:
        visible = visible & ((rows - cols).abs() < window)
    if mask is not None:
        if mask.dtype == torch.bool:
            visible = visible & mask
        else:
            s = s + mask.to(acc)
    s = s.masked_fill(~visible, float("-inf"))
    row_max = s.amax(-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(s - row_max)
    total = e.sum(-1, keepdim=True)
    p = e / torch.where(total == 0, torch.ones_like(total), total)
    if dropout_p:
        bits = dropout_keep(dropout_seed, batch, heads_q, seq_q, seq_kv, q.device)
        p = p * (bits >= dropout_threshold(dropout_p)) / (1.0 - dropout_p)
    return (p @ v).to(dtype)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, mask=None, causal=False, scale=None,
                     dropout_p=0.0, window=0, softcap=0.0, dropout_seed=0):
    """Attention over packed sequences (FlashAttention's varlen layout): q [total_q, Hq, D],
    k/v [total_kv, Hkv, D]; sequence b owns rows cu_seqlens_q[b]:cu_seqlens_q[b+1] of q and
    cu_seqlens_k[b]:cu_seqlens_k[b+1] of k/v. Each sequence is `attention` of that sequence
    alone, as batch entry b (its causal / window alignment, mask[b, :, :len_q, :len_kv] of a mask
    broadcastable to [B, Hq, max_len_q, max_len_kv], and the dropout draw of batch entry b).
    Returns [total_q, Hq, D]."""
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    batch = len(starts_q) - 1
    if mask is not None:
        mask = mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape))
    outs = []
    for b in range(batch):
        q0, q1, k0, k1 = starts_q[b], starts_q[b + 1], starts_k[b], starts_k[b + 1]
        if q1 == q0 or k1 == k0:  # no rows, or rows that see no key: zeros
            outs.append(q.new_zeros((q1 - q0,) + tuple(q.shape[1:])))
            continue
        qb, kb, vb = (t.transpose(0, 1).unsqueeze(0) for t in (q[q0:q1], k[k0:k1], v[k0:k1]))
        mb = None
        if mask is not None:
            mb = mask[b if mask.shape[0] > 1 else 0][None]
            mb = mb[..., :q1 - q0, :] if mb.shape[-2] > 1 else mb
            mb = mb[..., :k1 - k0] if mb.shape[-1] > 1 else mb
        # dropout of batch entry b: the draw for (b * Hq + h, i, j) comes from a batch of b + 1
        out = _attention_as_entry(qb, kb, vb, mb, causal, scale, dropout_p, window, softcap,
                                  dropout_seed, b)
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs) if outs else q.new_empty(q.shape)


def _attention_as_entry(q, k, v, mask, causal, scale, dropout_p, window, softcap, seed, b):
    """`attention` of a one-sequence batch that draws its dropout as batch entry b would."""
    if not dropout_p or b == 0:
        return attention(q, k, v, mask, causal, scale, dropout_p, window, softcap, seed)
    pad = lambda t: torch.cat([t.new_zeros((b,) + t.shape[1:]), t])  # noqa: E731
    mask = None if mask is None else (mask if mask.shape[0] == 1 else pad(mask))
    return attention(pad(q), pad(k), pad(v), mask, causal, scale, dropout_p, window, softcap,
                     seed)[b:]


# ------------------------------------------------------------------------------------------ int8

INT8_MAX = 127


def quantize_per_token(x):
    """Symmetric per-row int8: scale = absmax / 127 in fp32 (1 where that is 0: a row of zeros,
    or of values so small that the scale underflows),
    q = clamp(round_half_even(x / scale), -127, 127). A row holding NaN or inf gets scale NaN
    and q = 0, so that its w8a8 outputs are NaN. Returns (q int8, scale fp32 [...])."""
    xf = x.float()
    absmax = xf.abs().amax(-1) if x.shape[-1] else xf.new_zeros(x.shape[:-1])  # NaN propagates
    finite = torch.isfinite(absmax)
    # the float64 quotient rounded to fp32 is fp32's correctly rounded one (53 >= 2 * 24 + 2 bits);
    # fp32 absmax / 127 would not be on CUDA, where torch multiplies by a scalar's reciprocal
    scale = (absmax.double() / INT8_MAX).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    q = torch.round(xf / scale.unsqueeze(-1)).clamp(-INT8_MAX, INT8_MAX)
    q = torch.where(finite.unsqueeze(-1), q, torch.zeros_like(q)).to(torch.int8)
    return q, scale


def int8_matmul(a, b):
    """a [m, k] int8 times b [n, k] int8 transposed, as int32. Summed in float64, exact while
    k * 127^2 < 2^53 (and torch has no int32 matmul on CUDA)."""
    return (a.double() @ b.double().T).to(torch.int32)


def int8_linear(x, w_int8, w_scale, bias=None, mode="w8a8"):
    """x [..., k] times the dequantized weight (w_int8 [n, k] * w_scale [n]) transposed, + bias.

    w8a8: x is quantized per token first (in fp32, as the kernels do), then acc * s_x * s_w + bias.
    w8a16: (x @ w_int8^T) * s_w + bias with x as it is. Computed in float64 (the kernels' fp32
    epilogue is within a few ulps of it), rounded once to x's dtype."""
    wide = torch.float64
    x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    if mode == "w8a8":
        x_q, x_scale = quantize_per_token(x2)
        out = int8_matmul(x_q, w_int8).to(wide) * x_scale.to(wide)[:, None]
    else:
        out = x2.to(wide) @ w_int8.to(wide).T
    out = out * w_scale.to(wide)
    if bias is not None:
        out = out + bias.to(wide)
    return out.to(x.dtype).reshape(*x.shape[:-1], w_int8.shape[0])


def linear(x, weight, bias=None, activation=None):
    """act(x @ weight^T + bias), act None or "gelu" / "gelu_tanh" (F.gelu, approximate "none" /
    "tanh"), computed in float64 and rounded once to x's dtype."""
    out = x.double() @ weight.double().T
    if bias is not None:
        out = out + bias.double()
    if activation is not None:
        out = torch.nn.functional.gelu(out, approximate="tanh" if activation == "gelu_tanh"
                                       else "none")
    return out.to(x.dtype)


def bias_gelu(x, bias=None, approximate="none"):
    """F.gelu(x + bias, approximate=...): z = x + bias in x's dtype (as eager adds), GELU in fp32
    (or wider), rounded once to x's dtype, as eager's half-precision GELU does (within an ulp
    on AVX-512)."""
    z = x if bias is None else x + bias
    acc = _accumulate_dtype(z.dtype)
    return torch.nn.functional.gelu(z.to(acc), approximate=approximate).to(z.dtype)


_GATED_ACTIVATIONS = {
    "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": functools.partial(torch.nn.functional.gelu, approximate="tanh"),
}


def gated_mul(gate, up, activation):
    """act(gate) * up in fp32 (or wider), rounded once to the inputs' dtype; act "silu", "gelu" or
    "gelu_tanh"."""
    acc = _accumulate_dtype(gate.dtype)
    return (_GATED_ACTIVATIONS[activation](gate.to(acc)) * up.to(acc)).to(gate.dtype)


def silu_mul(gate, up):
    """F.silu(gate) * up in fp32 (or wider), rounded once to the inputs' dtype."""
    return gated_mul(gate, up, "silu")


def gelu_mul(gate, up, approximate="none"):
    """F.gelu(gate, approximate=approximate) * up in fp32 (or wider), rounded once."""
    return gated_mul(gate, up, "gelu" if approximate == "none" else "gelu_tanh")


def rotary(q, k, cos, sin):
    """transformers' apply_rotary_pos_emb (rotate half) over q [B, Hq, S, D] and k [B, Hk, S, D]
    with cos, sin [1 or B, S, D], in fp32 (or wider), rounded once: (q_out, k_out)."""
    acc = _accumulate_dtype(q.dtype)
    cos, sin = cos.to(acc).unsqueeze(1), sin.to(acc).unsqueeze(1)

    def rotate(x):
        x = x.to(acc)
        lo, hi = x.chunk(2, dim=-1)
        return (x * cos + torch.cat((-hi, lo), dim=-1) * sin).to(q.dtype)
    return rotate(q), rotate(k)
