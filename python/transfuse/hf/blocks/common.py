"""What every rule uses: the marks a rule leaves on a module instance, the checks that its
modules are still unhooked and under the forwards it was written for, and its installation.
"""
from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from ..unpad import _outputs_recorded

FORWARD_ATTR = "_transfuse_block_forward"
PROJECTION_ATTR = "_transfuse_projection"
BACKEND_ATTR = "_transfuse_block_backend"
FACTS_ATTR = "_transfuse_block_facts"  # what a rule read from the module's class at patch time

# Devices whose tensors run fused projections as one GEMM. Not the CPU: on all-MiniLM-L6-v2
# (2 threads, AVX2, fp32, real sentences, batch 8) the joint Q/K/V GEMM measured 0.97x the three
# separate ones, model-level (benchmarks/results/block-rules/); there each layer runs on its own.
JOINED_GEMM_DEVICES = ("cuda",)
# Devices whose tensors run int8 siblings as one int8 GEMM (w8a8: one quantization of the input).
# Not the CPU either: w8a8 there (AMD EPYC, 2 threads, one interleaved A/B) read 1.01x on
# MiniLM's real sentences, 1.00x at 8 x 128, and 0.84x decoding the SmolLM-135M shape (the
# joint call's Python bookkeeping costs more than two quantizations of one token).
JOINED_INT8_DEVICES = ("cuda",)
PLAIN_TENSORS = (torch.Tensor, nn.Parameter)  # (not a subclass such as tensor parallel's DTensor)

# The varlen kwargs that padding removal passes each layer (hf/unpad.py)
PACKED_KWARGS = frozenset(("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"))


def _rule_forward(module):
    """The function of the forward installed on the instance (a rule's), or None."""
    return getattr(module.__dict__.get("forward"), "__func__", None)


def _own_hooks(module):
    """The module's own hooks (nn.Module.__call__ would run them around its forward), but for
    transformers' output-capturing hooks while nothing is being recorded: one call with
    output_hidden_states or output_attentions leaves them on the layers for good, and they return
    at once unless a forward records (_capturing_hook)."""
    if module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks:
        return True
    hooks = module._forward_hooks
    return bool(hooks) and (torch.compiler.is_compiling()  # (which cannot read the recording)
                            or not all(map(_capturing_hook, hooks.values()))
                            or _outputs_recorded())


def _capturing_hook(hook):
    """Whether the hook is transformers' output-capturing one (utils/output_capturing.py, its
    install_output_capuring_hook: it returns at once unless its model's forward records)."""
    return (getattr(hook, "__module__", None) == "transformers.utils.output_capturing"
            and getattr(hook, "__qualname__", "").endswith(".output_capturing_hook"))


def _global_hooks():
    return (_torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks
            or _torch_module._global_backward_hooks or _torch_module._global_backward_pre_hooks)


def _install(module, forward):
    module.forward = types.MethodType(forward, module)
    module.__dict__[FORWARD_ATTR] = True
    return True
