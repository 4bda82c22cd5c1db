"""Shared test utilities: the backends testable here, poisoning, the half-precision error rule."""
import contextlib

import pytest
import torch

from transfuse import backends


def cpu_backends():
    """Backends that run on CPU tensors in this process (Triton under TRITON_INTERPRET=1)."""
    return [b for b in ("cpu", "triton") if not backends.missing_reason(b, "cpu")]


def backend_params():
    """(backend, device) pytest params: the CPU-tensor backends here, cuda and triton on a GPU."""
    params = [pytest.param(b, "cpu", id=f"{b}-cpu") for b in cpu_backends()]
    params += [pytest.param(b, "cuda", id=f"{b}-cuda", marks=pytest.mark.gpu)
               for b in ("cuda", "triton")]
    return params


def cpu_only_unless(keep, device):
    """Skips a gpu run of a parameter set outside the GPU_* lists (it runs on CPU only): the gpu
    tests keep the parameter sets that build distinct Triton variants, so that their JIT compiles
    fit a short GPU lease (tests/triton_variants.py counts them)."""
    if device != "cpu" and not keep:
        pytest.skip("on CPU only: its Triton builds differ from the gpu runs' in combination only")


def assert_close_to_reference(out, exact, plain, *, atol, name):
    """The FlashAttention rule: |out - exact| <= 2 |plain - exact| + atol, elementwise maxima.

    exact: float64 reference; plain: the reference computed at out's precision (what plain PyTorch
    gets). For fp32 outputs pass plain=None and a tolerance scaled by the output."""
    out64, exact64 = out.double(), exact.double()
    assert out.shape == exact.shape, f"{name}: shape {tuple(out.shape)} != {tuple(exact.shape)}"
    assert torch.isfinite(out64).all(), f"{name}: non-finite values (unwritten output?)"
    err = (out64 - exact64).abs().max().item() if out.numel() else 0.0
    bound = atol if plain is None else 2 * (plain.double() - exact64).abs().max().item() + atol
    assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g}"


def count_results(monkeypatch, owner, name):
    """A one-item list counting the calls of owner.name (a function of the module `owner`,
    patched here) that returned something other than None."""
    count, original = [0], getattr(owner, name)

    def counting(*args):
        out = original(*args)
        count[0] += out is not None
        return out
    monkeypatch.setattr(owner, name, counting)
    return count


@contextlib.contextmanager
def returning_none(owner, name):
    """owner.name returns None (a fused path declines every call) inside the block."""
    original = getattr(owner, name)
    setattr(owner, name, lambda *args: None)
    try:
        yield
    finally:
        setattr(owner, name, original)
