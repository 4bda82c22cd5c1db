"""MPNet's block rules (transfuse.hf.blocks, RELATIVE_BIAS_*): its attention, outside transformers'
attention interface, runs transfuse's with the relative position bias, padded batches run packed,
and a layer runs as one transfuse._C.encoder_layer call, with what the unpatched model gives."""
import copy
import importlib
import warnings

import pytest
import torch

import transfuse
from transfuse.hf import blocks, unpad

pytest.importorskip("transformers")
from transformers import MPNetConfig, MPNetModel  # noqa: E402

LAYERS = 2


def build(seed=0):
    """A tiny random MPNet (fp32, eval), its norms not ones / zeros, its position bias not zero."""
    config = MPNetConfig(vocab_size=100, hidden_size=32, num_hidden_layers=LAYERS,
                         num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = MPNetModel(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if "Norm" in type(module).__name__:
                for param in module.parameters(recurse=False):
                    param.add_(torch.randn_like(param) * 0.1)
        model.encoder.relative_attention_bias.weight.normal_()
    return model


def padded_batch(padding=True):
    """Three sequences of 11 tokens, the second padded after 7, the third after 2 (pad id 1)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 99, (3, 11), generator=g)
    mask = torch.ones(3, 11, dtype=torch.long)
    if padding:
        mask[1, 7:] = 0
        mask[2, 2:] = 0
        ids[mask == 0] = 1
    return ids, mask


def last_hidden_state(model, ids, mask, **kwargs):
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask, **kwargs).last_hidden_state


@pytest.fixture
def fused_layer_calls(monkeypatch):
    """The bias each transfuse._C.encoder_layer call got, with the tiny model's float GEMMs
    transfuse's own (where the CPU has them)."""
    monkeypatch.setattr(importlib.import_module("transfuse.ops.linear"), "MIN_WORK", 0)
    module = transfuse.backends.extension()[0]
    calls = []
    original = module.encoder_layer

    def spy(*args):
        calls.append(args[-1])
        return original(*args)
    monkeypatch.setattr(module, "encoder_layer", spy)
    return calls


def module_by_module(monkeypatch, model, ids, mask):
    """The patched model with the fused layer turned off: each module and its rule."""
    with monkeypatch.context() as m:
        rules = blocks.relative_bias
        m.setattr(rules, "_relative_bias_layer_arguments", lambda *args: None)
        m.setitem(blocks.encoder_layer.OTHER_FUSED_LAYERS, rules._relative_bias_layer_forward,
                  lambda *args: None)
        return last_hidden_state(model, ids, mask)


def test_patch_runs_mpnet_attention_through_its_rules_without_a_warning():
    model = build()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        transfuse.patch(model)
    assert not [w for w in caught if "MPNet" in str(w.message)]
    rules = transfuse.patched_modules(model)
    assert rules["<model><unpad>"].startswith("padding removal")
    assert rules["encoder<block>"] == "block rule 'relative_bias_stack'"
    for kind, name in [("layer", ""), ("container", ".attention"),
                       ("attention", ".attention.attn")]:
        assert rules[f"encoder.layer.1{name}<block>"] == f"block rule 'relative_bias_{kind}'"
    assert rules["encoder.layer.0.intermediate<block>"] == "block rule 'bias_gelu'"
    assert rules["encoder.layer.0.output<block>"] == "block rule 'residual_norm'"
    assert rules["encoder.layer.0.attention.attn.q<block>"] == "block rule 'linear'"

    plain = transfuse.patch(build(), attention=False)
    assert not any("relative_bias" in rule for rule in transfuse.patched_modules(plain).values())


@pytest.mark.parametrize("padding", [True, False], ids=["packed", "unpadded"])
@pytest.mark.parametrize("mode", ["fp32", "bf16", "w8a8", "w8a16"])
def test_a_layer_in_one_call_with_the_bias_equals_the_modules_bit_for_bit(mode, padding,
                                                                          fused_layer_calls,
                                                                          monkeypatch):
    """Packed tokens (a padded batch) and an unmasked batch: each layer in one call given the
    [1, heads, L, L] bias of the longest sequence, exactly what the modules and their rules give;
    fp32 as the unpatched model, zeros at pads."""
    model = build()
    ids, mask = padded_batch(padding)
    expected = last_hidden_state(model, ids, mask)
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    patched = transfuse.patch(copy.deepcopy(model).to(dtype),
                              int8=mode if mode.startswith("w8") else None)
    fused = last_hidden_state(patched, ids, mask)
    longest = int(mask.sum(1).max())
    assert [tuple(bias.shape) for bias in fused_layer_calls] == [(1, 2, longest, longest)] * LAYERS
    assert torch.equal(fused, module_by_module(monkeypatch, patched, ids, mask))
    real = mask.bool()
    assert not fused[~real].any()
    if mode == "fp32":
        torch.testing.assert_close(fused[real], expected[real], rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(fused[real].float(), expected[real], rtol=0.1, atol=0.1)


def test_the_relative_position_bias_counts():
    """The bias is in the result: a changed bias table changes the fused and the module outputs
    alike (the kernels read it, and read it at each packed sequence's own positions)."""
    model = build()
    ids, mask = padded_batch()
    patched = transfuse.patch(copy.deepcopy(model))
    with torch.no_grad():
        for m in (model, patched):
            m.encoder.relative_attention_bias.weight.mul_(3)
    torch.testing.assert_close(last_hidden_state(patched, ids, mask)[mask.bool()],
                               last_hidden_state(model, ids, mask)[mask.bool()],
                               rtol=1e-5, atol=1e-5)


def test_padding_removal_off_runs_transfuse_attention_on_the_padded_batch(fused_layer_calls):
    model = build()
    ids, mask = padded_batch()
    patched = transfuse.patch(copy.deepcopy(model), unpad=False)
    out = last_hidden_state(patched, ids, mask)
    assert fused_layer_calls == []  # (a padding mask: the modules, the mask added to the bias)
    torch.testing.assert_close(out[mask.bool()], last_hidden_state(model, ids, mask)[mask.bool()],
                               rtol=1e-5, atol=1e-5)


def test_gradients_equal_the_unpatched_model_bias_table_included(fused_layer_calls):
    """Autograd (packed tokens: the varlen attention's bias gradient, summed over the sequences
    that share the bias) gives the unpatched model's gradients."""
    model = build()
    ids, mask = padded_batch()
    patched = transfuse.patch(copy.deepcopy(model))
    probe = torch.randn(3, 11, 32, generator=torch.Generator().manual_seed(2))
    grads = []
    for m in (model, patched):
        out = m(input_ids=ids, attention_mask=mask).last_hidden_state
        (out * probe * mask[..., None]).sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert fused_layer_calls == []
    assert grads[1]["encoder.relative_attention_bias.weight"].abs().sum() > 0
    for name, want in grads[0].items():
        if want is None:  # (the pooler's)
            continue
        torch.testing.assert_close(grads[1][name], want, rtol=1e-4, atol=1e-5, msg=name)


def test_recorded_outputs_hooks_and_a_removed_rule_step_aside(fused_layer_calls):
    """output_attentions / output_hidden_states (the classes' forwards), a hooked self-attention
    (that layer's modules run, the hook sees the call) and a self-attention without its rule
    (padding removal keeps the padded batch): each as the unpatched model."""
    model = build()
    ids, mask = padded_batch()
    real = mask.bool()
    expected = model(input_ids=ids, attention_mask=mask, output_attentions=True,
                     output_hidden_states=True)
    patched = transfuse.patch(copy.deepcopy(model))
    with torch.no_grad():
        got = patched(input_ids=ids, attention_mask=mask, output_attentions=True,
                      output_hidden_states=True)
    assert fused_layer_calls == []
    for want, have in zip(expected.attentions + expected.hidden_states,
                          got.attentions + got.hidden_states):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5)

    seen = []
    patched.encoder.layer[0].attention.attn.register_forward_hook(lambda *args: seen.append(1))
    out = last_hidden_state(patched, ids, mask)
    assert seen == [1] and len(fused_layer_calls) == LAYERS - 1
    torch.testing.assert_close(out[real], expected.last_hidden_state[real], rtol=1e-5, atol=1e-5)

    del patched.encoder.layer[1].attention.attn.forward  # (the class's forward: kwargs dropped)
    assert not blocks.relative_bias._relative_bias_takes_packed(patched.encoder)
    out = last_hidden_state(patched, ids, mask)
    assert out[~real].any()  # the padded batch, not packed
    torch.testing.assert_close(out[real], expected.last_hidden_state[real], rtol=1e-5, atol=1e-5)


def test_copies_unpatch_and_patching_twice():
    patched = transfuse.patch(build())
    copied = copy.deepcopy(patched)
    for model in (patched, copied):
        encoder = model.encoder
        stack_forward = blocks.relative_bias._relative_bias_stack_forward
        assert encoder.__dict__[unpad.INNER_ATTR].__func__ is stack_forward
        assert encoder.__dict__[unpad.INNER_ATTR].__self__ is encoder
        assert blocks.relative_bias._relative_bias_takes_packed(encoder)
    transfuse.patch(patched)
    assert transfuse.patched_modules(patched) == transfuse.patched_modules(copied)
    transfuse.unpatch(copied)
    assert not any(key.startswith("_transfuse") or key == "forward"
                   for m in copied.modules() for key in m.__dict__)
    ids, mask = padded_batch()
    reference = build()
    torch.testing.assert_close(last_hidden_state(copied, ids, mask),
                               last_hidden_state(reference, ids, mask))


def test_a_class_whose_forward_reads_otherwise_is_left_alone(monkeypatch):
    from transformers.models.mpnet import modeling_mpnet

    def compute_position_bias(self, x, position_ids=None, num_buckets=32):
        return torch.zeros(x.shape[0], self.n_heads, x.shape[1], x.shape[1])
    monkeypatch.setattr(modeling_mpnet.MPNetEncoder, "compute_position_bias",
                        compute_position_bias)
    blocks.sources._forward_reads_as.cache_clear()
    try:
        with pytest.warns(UserWarning, match="MPNetEncoder"):
            patched = transfuse.patch(build())
        assert "encoder<block>" not in transfuse.patched_modules(patched)
        assert not blocks.relative_bias._relative_bias_takes_packed(patched.encoder)
    finally:
        blocks.sources._forward_reads_as.cache_clear()


@pytest.mark.parametrize("side", ["right", "left", "mixed"])
def test_every_packed_sequence_gets_what_it_gets_alone(side, fused_layer_calls):
    """Right, left and mixed padding, a sequence of one token, one without padding: each real
    token as in the unpatched padded batch and as its sequence alone (MPNet numbers positions
    from the non-pad ids, and the relative bias does not see where a sequence starts)."""
    lengths = (12, 1, 7, 10, 3)
    model = build()
    patched = transfuse.patch(copy.deepcopy(model))
    ids = torch.randint(3, 99, (len(lengths), 12), generator=torch.Generator().manual_seed(3))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        left = side == "left" or (side == "mixed" and row % 2 == 0)
        mask[row, slice(12 - n, 12) if left else slice(0, n)] = 1
    ids[mask == 0] = 1
    real = mask.bool()
    out = last_hidden_state(patched, ids, mask)
    assert len(fused_layer_calls) == LAYERS
    torch.testing.assert_close(out[real], last_hidden_state(model, ids, mask)[real],
                               rtol=1e-5, atol=1e-5)
    for row in range(len(lengths)):
        alone = last_hidden_state(model, ids[row:row + 1, real[row]], mask[row:row + 1, real[row]])
        torch.testing.assert_close(out[row, real[row]], alone[0], rtol=1e-5, atol=1e-5)
