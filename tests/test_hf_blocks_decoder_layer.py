"""The decoder layer in two transfuse._C calls around its cache's update
(blocks.decoder_layer._decoder_layer_fused, csrc/bindings/decoder_layer.cpp): on CPU tensors in
inference, each Llama, Mistral, Qwen2, Qwen3 and Gemma layer whose modules carry the rules
computes what the rules compute module by module, bit for bit, at prefill and at every decoding
step, and leaves the call to them wherever they would compute something else."""
import copy
import importlib

import pytest
import torch

import transfuse
from transfuse.hf import blocks

from helpers import count_results, returning_none
from hf_models import MORE_FAMILIES, assert_close_scaled, build, build_more

pytestmark = pytest.mark.skipif(transfuse.backends.extension()[0] is None,
                                reason="transfuse._C not built")

# (Mistral: sliding_window 4; Qwen2: q, k, v biases; Qwen3: head norms of the query and key;
# Gemma: GELU (tanh) in its MLP, RMSNorm weights offset by 1; Gemma 2 and 3: norms after the
# attention and the MLP too, windows of 4, Gemma 2's attention softcap, Gemma 3's head norms;
# SmolLM3: a layer without rotary embedding, and windowed; Granite: scaled residual branches)
DECODERS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "smollm3",
            "granite"]
SIDES = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None),
         "w8a8": (torch.float32, "w8a8"), "bf16 w8a16": (torch.bfloat16, "w8a16")}


@pytest.fixture(params=["own GEMMs", "torch GEMMs"])
def fused(request, monkeypatch):
    """How many layer calls the two transfuse._C calls took; the tiny models' float GEMMs
    transfuse's own (thresholds lowered) or, at the thresholds as they are, torch's at prefill
    (which the fused calls then make too)."""
    if request.param == "own GEMMs":
        monkeypatch.setattr(importlib.import_module("transfuse.ops.linear"), "MIN_WORK", 0)
    return count_results(monkeypatch, blocks.decoder_layer, "_decoder_layer_fused")


def module_by_module():
    """The rules' modules, not the fused calls."""
    return returning_none(blocks.decoder_layer, "_decoder_layer_fused")


def decoder(model_type, seed=0):
    """A tiny random causal LM whose attention is far from uniform (its projections scaled up)
    and whose biases (Qwen2's q, k, v) are not zero, so that a dropped mask or bias shows in the
    logits."""
    model = (build_more if model_type in MORE_FAMILIES else build)(model_type, seed)
    with torch.no_grad():
        for layer in model.model.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                projection.weight.mul_(8)
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.5)
    return model


def generated(model, prompt, **kwargs):
    """Greedy tokens and each step's logits."""
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=6, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0, **kwargs)
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("model_type", DECODERS)
def test_fused_layers_equal_the_modules_bit_for_bit(model_type, side, fused):
    """Prefill and every decoding step of greedy generation: the fused calls ran for every layer,
    and the tokens and each step's logits are those of the same patched model run module by
    module (in fp32: also the unpatched model's tokens, its logits within 1e-5)."""
    dtype, int8 = SIDES[side]
    model = decoder(model_type).to(dtype)
    patched = transfuse.patch(copy.deepcopy(model), int8=int8)
    layers = model.config.num_hidden_layers
    prompt = {"input_ids": torch.randint(3, 99, (2, 5), generator=torch.Generator().manual_seed(1))}
    with torch.no_grad():
        logits = patched(**prompt).logits
    assert fused[0] == layers
    with module_by_module(), torch.no_grad():
        assert torch.equal(patched(**prompt).logits, logits)
    fused[0] = 0
    tokens, step_logits = generated(patched, prompt)
    assert fused[0] == layers * 6  # (the prefill and five steps; Mistral's past its window of 4)
    with module_by_module():
        expected_tokens, expected_logits = generated(patched, prompt)
    assert torch.equal(tokens, expected_tokens)
    assert torch.equal(step_logits, expected_logits)
    if side == "fp32":
        unpatched_tokens, unpatched_logits = generated(model, prompt)
        assert torch.equal(tokens, unpatched_tokens)
        assert_close_scaled(step_logits, unpatched_logits)


@pytest.mark.parametrize("model_type", DECODERS)
def test_fused_steps_of_a_padded_batch_read_its_mask(model_type, fused):
    """A left-padded batch: the prefill runs fused on the tokens padding removal packed (per
    sequence: varlen attention; Mistral's sliding-window cache keeps it padded, with the mask),
    then each decoding step with transformers' mask; tokens and logits equal the module path's
    and the unpatched model's (within 1e-5). A mask or sequence bounds the fused call dropped
    would change them."""
    model = decoder(model_type)
    patched = transfuse.patch(copy.deepcopy(model))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :4] = 0
    prompt = {"input_ids": torch.randint(3, 99, (2, 7), generator=torch.Generator().manual_seed(2))
              * mask, "attention_mask": mask}
    tokens, logits = generated(patched, prompt)
    assert fused[0] == model.config.num_hidden_layers * 6
    with module_by_module():
        expected_tokens, expected_logits = generated(patched, prompt)
    assert torch.equal(tokens, expected_tokens) and torch.equal(logits, expected_logits)
    unpatched_tokens, unpatched_logits = generated(model, prompt)
    assert torch.equal(tokens, unpatched_tokens)
    assert_close_scaled(logits, unpatched_logits)


@pytest.mark.parametrize("model_type", DECODERS)
def test_fused_layers_run_the_packed_tokens_of_a_padded_batch(model_type, fused):
    """A padded batch without a cache: padding removal packs it and every layer runs fused over
    the packed tokens (causal per sequence; Mistral's window of 4 inside sequences of 7); each
    sequence's logits equal the module path's bit for bit and the unpatched model's within 1e-5."""
    model = decoder(model_type)
    patched = transfuse.patch(copy.deepcopy(model))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 1:] = 0
    ids = torch.randint(3, 99, (3, 7), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        logits = patched(ids, attention_mask=mask, use_cache=False).logits[mask.bool()]
        assert fused[0] == model.config.num_hidden_layers
        with module_by_module():
            expected = patched(ids, attention_mask=mask, use_cache=False).logits[mask.bool()]
        unpatched = model(ids, attention_mask=mask, use_cache=False).logits[mask.bool()]
    assert torch.equal(logits, expected)
    assert_close_scaled(logits, unpatched)


def test_fused_layers_update_a_static_cache_through_its_own_update(fused):
    """The cache is updated by its own update(): a static cache too (the attention then drops its
    unwritten slots at prefill, as the transfuse attention function does)."""
    model = decoder("llama")
    patched = transfuse.patch(copy.deepcopy(model))
    prompt = {"input_ids": torch.randint(3, 99, (1, 5), generator=torch.Generator().manual_seed(3))}
    tokens, logits = generated(patched, prompt, cache_implementation="static")
    assert fused[0] == model.config.num_hidden_layers * 6
    with module_by_module():
        expected_tokens, expected_logits = generated(patched, prompt, cache_implementation="static")
    assert torch.equal(tokens, expected_tokens) and torch.equal(logits, expected_logits)


def hook_on_down_proj(model):
    calls = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda *args: calls.append(1))
    return calls


def swap_act_fn(model):
    model.model.layers[0].mlp.act_fn = torch.nn.GELU()


def reference_norm(model):
    model.model.layers[0].post_attention_layernorm.backend = "reference"


def hook_on_k_norm(model):
    calls = []
    model.model.layers[0].self_attn.k_norm.register_forward_hook(lambda *args: calls.append(1))
    return calls


@pytest.mark.parametrize("model_type, change", [
    ("llama", hook_on_down_proj), ("llama", swap_act_fn), ("llama", reference_norm),
    ("qwen3", hook_on_k_norm)])
def test_a_layer_the_fused_calls_do_not_fit_runs_its_modules(model_type, change, fused):
    """A hook on one of its linear layers or head norms (which then runs), a swapped activation,
    a norm on another backend: that layer runs module by module, the others fused; the logits
    equal the unpatched model's given the same change."""
    model = decoder(model_type)
    patched = transfuse.patch(copy.deepcopy(model))
    hooked = [change(m) for m in (model, patched)][1]
    ids = torch.randint(3, 99, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert_close_scaled(patched(ids).logits, model(ids).logits)
    assert fused[0] == model.config.num_hidden_layers - 1
    assert hooked is None or hooked == [1]


def test_recorded_outputs_autograd_and_autocast_run_the_modules(fused):
    """Attention weights asked for, autograd and autocast: the module path (none fused), with
    the unpatched model's outputs and gradients."""
    model = decoder("llama")
    patched = transfuse.patch(copy.deepcopy(model))
    ids = torch.randint(3, 99, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = patched(ids, output_attentions=True)
        assert len(out.attentions) == model.config.num_hidden_layers
        assert_close_scaled(out.logits, model(ids).logits)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            patched(ids)
    for m in (model, patched):
        m(ids).logits.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), patched.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert fused[0] == 0


def test_a_smollm3_layer_rotates_as_its_use_rope_says_at_call_time(fused):
    """SmolLM3's NoPE layers: the fused calls read use_rope at each call (flipped here on both
    layers, the logits still the unpatched model's given the same flip), and the binding takes
    the angles both or neither."""
    model = decoder("smollm3")
    patched = transfuse.patch(copy.deepcopy(model))
    ids = torch.randint(3, 99, (1, 6), generator=torch.Generator().manual_seed(6))
    for m in (model, patched):
        for layer in m.model.layers:
            layer.self_attn.use_rope = not layer.self_attn.use_rope
    with torch.no_grad():
        assert_close_scaled(patched(ids).logits, model(ids).logits)
    assert fused[0] == model.config.num_hidden_layers
    layer = patched.model.layers[0]
    x = torch.randn(1, 3, model.config.hidden_size)
    angles = torch.zeros(1, 3, layer.self_attn.head_dim)
    qkv_arguments, _ = blocks.decoder_layer._decoder_layer_arguments(
        layer, layer.self_attn, False, x, angles, angles)
    with pytest.raises(ValueError, match="cos and sin"):
        transfuse.backends.extension()[0].decoder_layer_qkv(x, *qkv_arguments, angles, None)
