"""transfuse.nn.FusedLayerNorm / FusedRMSNorm against the modules they replace: state dicts load
both ways, from_module shares the parameters, forward (and its residual form) and gradients
match."""
import pytest
import torch
from torch import nn

from transfuse.nn import FusedLayerNorm, FusedRMSNorm

transformers = pytest.importorskip("transformers")
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402
from transformers.models.t5.modeling_t5 import T5LayerNorm  # noqa: E402

HIDDEN = 48


def randomize(module):
    """Random parameters (fresh ones are ones / zeros, which hide mistakes); weights near the
    identity (1, or 0 where the module adds an offset of 1 as Gemma does)."""
    offset = getattr(module, "offset", 1.0 if isinstance(module, GemmaRMSNorm) else 0.0)
    with torch.no_grad():
        for name, param in module.named_parameters():
            center = 1.0 - offset if name == "weight" else 0.0
            param.copy_(torch.randn_like(param) * 0.3 + center)
    return module


# name -> (original factory, fused factory with the same configuration[, from_module kwargs])
LAYER_NORMS = {
    "affine": (lambda: nn.LayerNorm(HIDDEN, eps=1e-6), lambda: FusedLayerNorm(HIDDEN, eps=1e-6)),
    "no-bias": (lambda: nn.LayerNorm(HIDDEN, bias=False),
                lambda: FusedLayerNorm(HIDDEN, bias=False)),
    "no-affine": (lambda: nn.LayerNorm(HIDDEN, elementwise_affine=False),
                  lambda: FusedLayerNorm(HIDDEN, elementwise_affine=False)),
}
RMS_NORMS = {
    "llama": (lambda: LlamaRMSNorm(HIDDEN, eps=1e-5),
              lambda: FusedRMSNorm(HIDDEN, eps=1e-5, casting_mode="llama"),
              dict(eps=1e-5, casting_mode="llama")),
    "gemma": (lambda: GemmaRMSNorm(HIDDEN, eps=1e-5),
              lambda: FusedRMSNorm(HIDDEN, eps=1e-5, offset=1.0, casting_mode="gemma"),
              dict(eps=1e-5, offset=1.0, casting_mode="gemma")),
    "t5": (lambda: T5LayerNorm(HIDDEN, eps=1e-5),
           lambda: FusedRMSNorm(HIDDEN, eps=1e-5, casting_mode="t5"),
           dict(eps=1e-5, casting_mode="t5")),
}


# (original factory, function making the fused module from an original) for every kind
PAIRS = [pytest.param(make, FusedLayerNorm.from_module, id=f"layer_norm-{name}")
         for name, (make, _) in LAYER_NORMS.items()] + \
        [pytest.param(make, lambda m, kw=kwargs: FusedRMSNorm.from_module(m, **kw),
                      id=f"rms_norm-{name}") for name, (make, _, kwargs) in RMS_NORMS.items()]
# (original factory, fused factory with the same configuration) for every kind
TWINS = [pytest.param(make, make_fused, id=f"layer_norm-{name}")
         for name, (make, make_fused) in LAYER_NORMS.items()] + \
        [pytest.param(make, make_fused, id=f"rms_norm-{name}")
         for name, (make, make_fused, _) in RMS_NORMS.items()]


def assert_close_scaled(actual, expected, tol=1e-5):
    scale = expected.detach().abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)


def inputs(*shape):
    return torch.randn(*shape) * 2 + 0.5


@pytest.mark.parametrize("make,make_fused", TWINS)
def test_state_dict_loads_both_ways(make, make_fused):
    original, fused = randomize(make()), make_fused()
    assert list(fused.state_dict()) == list(original.state_dict())
    fused.load_state_dict(original.state_dict(), strict=True)
    for key, value in original.state_dict().items():
        assert torch.equal(fused.state_dict()[key], value)
    randomize(fused)
    original.load_state_dict(fused.state_dict(), strict=True)
    for key, value in fused.state_dict().items():
        assert torch.equal(original.state_dict()[key], value)
    x = inputs(3, HIDDEN)
    with torch.no_grad():
        assert_close_scaled(fused(x), original(x))


@pytest.mark.parametrize("make,make_fused", TWINS)
def test_fresh_modules_initialize_like_the_originals(make, make_fused):
    fused_state = make_fused().state_dict()
    for key, value in make().state_dict().items():
        assert torch.equal(fused_state[key], value), key


@pytest.mark.parametrize("make,from_module", PAIRS)
def test_from_module_shares_parameters_and_matches_forward(make, from_module):
    original = randomize(make()).eval()
    fused = from_module(original)
    assert not fused.training
    assert [id(p) for p in fused.parameters()] == [id(p) for p in original.parameters()]
    assert list(fused.state_dict()) == list(original.state_dict())
    x = inputs(2, 5, HIDDEN)
    with torch.no_grad():
        assert_close_scaled(fused(x), original(x))


@pytest.mark.parametrize("make,from_module", PAIRS)
def test_residual_form(make, from_module):
    original = randomize(make())
    fused = from_module(original)
    x, residual = inputs(2, 5, HIDDEN), inputs(2, 5, HIDDEN)
    with torch.no_grad():
        y, h = fused(x, residual)
        assert_close_scaled(h, x + residual)
        assert_close_scaled(y, original(x + residual))
        assert_close_scaled(fused(x, residual=residual)[0], y)


@pytest.mark.parametrize("make,from_module", PAIRS)
def test_gradients_match(make, from_module):
    original = randomize(make())
    x, probe = inputs(3, 4, HIDDEN), torch.randn(3, 4, HIDDEN)

    def grads(module):
        module.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_()
        (module(xr) * probe).sum().backward()
        return [xr.grad] + [p.grad.clone() for p in module.parameters()]

    expected = grads(original)
    for actual, want in zip(grads(from_module(original)), expected, strict=True):
        assert_close_scaled(actual, want, tol=2e-5)


def test_training_one_trains_the_other():
    original = randomize(LlamaRMSNorm(HIDDEN))
    fused = FusedRMSNorm.from_module(original, eps=original.variance_epsilon)
    optimizer = torch.optim.SGD(fused.parameters(), lr=0.1)
    before = original.weight.detach().clone()
    fused(inputs(3, HIDDEN)).square().mean().backward()
    optimizer.step()
    assert not torch.equal(original.weight, before)
    assert fused.weight is original.weight


def test_layer_norm_must_be_one_dimensional():
    with pytest.raises(ValueError, match="normalized_shape"):
        FusedLayerNorm((4, 8))
