"""The encoder_layer, encoder_stack and embeddings block rules (transfuse.hf.blocks.encoder_layer
and .embeddings): a BERT-style layer (and DistilBERT's block) in one transfuse._C.encoder_layer
call, the stack making those calls itself, the embeddings in one call; each equal to what the
modules and their rules give, bit for bit, and stepping aside where they would compute something
else."""
import copy
import importlib
import inspect

import pytest
import torch

import transfuse
from transfuse.hf import blocks

from hf_models import build, padded_batch, real_tokens

ENCODERS = ["bert", "roberta"]


@pytest.fixture(params=["own GEMMs", "torch GEMMs"])
def fused_layer_calls(request, monkeypatch):
    """The calls of transfuse._C.encoder_layer, with the Q / K / V projections one by one, as on
    the CPU; the tiny models' float GEMMs transfuse's own (thresholds lowered: where the CPU has
    them) or, at the thresholds as they are, torch's (which the fused layer then calls too)."""
    if request.param == "own GEMMs":
        linear_module = importlib.import_module("transfuse.ops.linear")
        monkeypatch.setattr(linear_module, "MIN_WORK", 0)
    monkeypatch.setattr(blocks.common, "JOINED_GEMM_DEVICES", ("cuda",))
    monkeypatch.setattr(blocks.common, "JOINED_INT8_DEVICES", ("cuda",))
    module = transfuse.backends.extension()[0]
    calls = []
    original = module.encoder_layer
    monkeypatch.setattr(module, "encoder_layer",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def module_by_module(monkeypatch, model, ids, mask, arguments="_fused_layer_arguments"):
    """The patched model's output with the fused layer turned off (the modules' rules;
    arguments: the layer kind's check, DistilBERT's _distilbert_layer_arguments)."""
    with monkeypatch.context() as m:
        m.setattr(blocks.encoder_layer, arguments, lambda *args: None)
        with torch.inference_mode():
            return model(input_ids=ids, attention_mask=mask).last_hidden_state


def patched_copy(model_type, mode, padding):
    """(unpatched model, ids, mask, the unpatched real tokens' states, a patched copy in mode:
    fp32, bf16 or an int8 mode); the mask all ones without padding."""
    model = build(model_type)
    ids, mask = padded_batch()
    if not padding:
        mask = torch.ones_like(mask)
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    patched = transfuse.patch(copy.deepcopy(model).to(dtype),
                              int8=mode if mode.startswith("w8") else None)
    return model, ids, mask, real_tokens(model, ids, mask), patched


@pytest.mark.parametrize("padding", [True, False], ids=["packed", "unpadded"])
@pytest.mark.parametrize("mode", ["fp32", "bf16", "w8a8", "w8a16"])
@pytest.mark.parametrize("model_type", ENCODERS)
def test_encoder_layer_in_one_call_equals_the_modules_bit_for_bit(model_type, mode, padding,
                                                                  fused_layer_calls, monkeypatch):
    """Over packed tokens (a padded batch) and an unmasked batch, the fused layer gives exactly
    what the layer's modules and their rules give, and the fp32 model equals the unpatched one."""
    model, ids, mask, expected, patched = patched_copy(model_type, mode, padding)
    with torch.inference_mode():
        fused = patched(input_ids=ids, attention_mask=mask).last_hidden_state
    assert len(fused_layer_calls) == model.config.num_hidden_layers
    assert torch.equal(fused, module_by_module(monkeypatch, patched, ids, mask))
    if mode == "fp32":
        torch.testing.assert_close(fused[mask.bool()], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["bert", "distilbert"])
def test_encoder_layer_steps_aside_for_hooks_training_gradients_and_weights(model_type,
                                                                           fused_layer_calls):
    """A hooked linear of one layer (that layer runs its modules and the hook, the others still
    fuse), training (dropout), autograd and output_attentions run the modules, with what the
    unpatched model gives."""
    model = build(model_type)
    ids, mask = padded_batch()
    expected = real_tokens(model, ids, mask)
    patched = transfuse.patch(copy.deepcopy(model))
    bert = model_type == "bert"
    first = (patched.encoder if bert else patched.transformer).layer[0]
    hooked = first.output.dense if bert else first.ffn.lin2
    seen = []
    handle = hooked.register_forward_hook(lambda *args: seen.append(1))
    with torch.inference_mode():
        out = patched(input_ids=ids, attention_mask=mask).last_hidden_state
    handle.remove()
    assert seen == [1] and len(fused_layer_calls) == model.config.num_hidden_layers - 1
    torch.testing.assert_close(out[mask.bool()], expected, rtol=1e-5, atol=1e-5)

    fused_layer_calls.clear()
    out = patched(input_ids=ids, attention_mask=mask).last_hidden_state  # autograd records
    out[mask.bool()].sum().backward()
    assert fused_layer_calls == [] and hooked.weight.grad is not None
    torch.testing.assert_close(out[mask.bool()].detach(), expected, rtol=1e-5, atol=1e-5)

    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")  # (SDPA records no attention weights)
    with torch.inference_mode():
        attentions = patched(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        reference = eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        patched.train()
        patched(input_ids=ids, attention_mask=mask)
    assert fused_layer_calls == []
    assert len(attentions) == len(reference) == model.config.num_hidden_layers
    for got, want in zip(attentions, reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def relative_error(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("padding", [True, False], ids=["packed", "unpadded"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("model_type", ENCODERS)
def test_encoder_layer_in_one_call_on_cuda_equals_the_modules_bit_for_bit(model_type, dtype,
                                                                          padding, monkeypatch):
    """On CUDA tensors BERT's layers make one fused call each (Q, K and V one GEMM, as the
    projections rule runs them there), giving exactly what the modules' rules give; and the model
    stays as close to the float32 one as the unpatched model in that dtype (2x its error)."""
    module = transfuse.backends.extension()[0]
    calls, original = [], module.encoder_layer
    monkeypatch.setattr(module, "encoder_layer",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    model = build(model_type).cuda()
    ids, mask = (t.cuda() for t in padded_batch())
    if not padding:
        mask = torch.ones_like(mask)
    unpatched = copy.deepcopy(model).to(dtype)
    patched = transfuse.patch(copy.deepcopy(model).to(dtype))
    with torch.inference_mode():
        fused = patched(input_ids=ids, attention_mask=mask).last_hidden_state
    assert len(calls) == model.config.num_hidden_layers
    assert torch.equal(fused, module_by_module(monkeypatch, patched, ids, mask))
    want = real_tokens(model, ids, mask)
    bound = 2 * relative_error(real_tokens(unpatched, ids, mask), want) + 1e-3
    assert relative_error(fused[mask.bool()], want) <= bound


def test_cuda_call_takes_query_key_value_joined_in_order():
    """The CUDA call runs Q, K and V as one GEMM over their rows joined: only where the
    projections rule holds them so, in that order, in one storage (here checked on CPU
    modules: the rule is device-blind)."""
    patched = transfuse.patch(build("bert"))
    inner = patched.encoder.layer[0].attention.self
    qkv = [inner.query, inner.key, inner.value]
    assert blocks.encoder_layer._cuda_projections(qkv)
    assert not blocks.encoder_layer._cuda_projections([qkv[1], qkv[0], qkv[2]])
    inner.value.bias = torch.nn.Parameter(inner.value.bias.detach().clone())  # its own storage
    assert not blocks.encoder_layer._cuda_projections(qkv)


@pytest.fixture
def fused_stacks(monkeypatch):
    """What the encoder_stack rule's check returned, call by call (None: the class's forward)."""
    seen = []
    original = blocks.encoder_layer._fused_layers
    monkeypatch.setattr(blocks.encoder_layer, "_fused_layers",
                        lambda *args: seen.append(original(*args)) or seen[-1])
    return seen


@pytest.mark.parametrize("padding", [True, False], ids=["packed", "unpadded"])
@pytest.mark.parametrize("mode", ["fp32", "w8a8"])
def test_encoder_stack_runs_the_fused_layers_without_their_modules(mode, padding, fused_stacks,
                                                                   fused_layer_calls, monkeypatch):
    """The stack (inside padding removal, or on an unmasked batch) makes every layer's fused
    call itself, with what the layers' own rules give bit for bit; a layer with a hook of its own
    makes it run the class's forward, where each layer still fuses and the hook runs."""
    model = build("bert")
    ids, mask = padded_batch()
    if not padding:
        mask = torch.ones_like(mask)
    patched = transfuse.patch(copy.deepcopy(model), int8=mode if mode != "fp32" else None)
    layers = model.config.num_hidden_layers
    with torch.inference_mode():
        fused = patched(input_ids=ids, attention_mask=mask).last_hidden_state
    assert [len(arguments) for arguments in fused_stacks] == [layers]
    assert len(fused_layer_calls) == layers
    with monkeypatch.context() as m:  # each layer's rule on its own
        m.setattr(blocks.encoder_layer, "_fused_layers", lambda *args: None)
        with torch.inference_mode():
            one_by_one = patched(input_ids=ids, attention_mask=mask).last_hidden_state
    assert len(fused_layer_calls) == 2 * layers
    assert torch.equal(fused, one_by_one)

    fused_stacks.clear()
    seen = []
    patched.encoder.layer[1].register_forward_hook(lambda *args: seen.append(1))
    with torch.inference_mode():
        hooked = patched(input_ids=ids, attention_mask=mask).last_hidden_state
    # (checked twice: by the model's rule, hf/encoder_model.py, then by the stack's)
    assert fused_stacks == [None, None] and seen == [1]
    assert len(fused_layer_calls) == 3 * layers
    assert torch.equal(hooked, fused)


def test_encoder_stack_keeps_the_hidden_states_that_transformers_records(fused_stacks,
                                                                         fused_layer_calls):
    """output_hidden_states=True (transformers records each layer's output): every layer's
    hidden state is there, as the unpatched model gives it."""
    model = build("bert")
    patched = transfuse.patch(copy.deepcopy(model))
    ids, _ = padded_batch()
    with torch.inference_mode():
        expected = model(input_ids=ids, output_hidden_states=True).hidden_states
        actual = patched(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(actual) == len(expected) == model.config.num_hidden_layers + 1
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert all(arguments is None for arguments in fused_stacks)

    # transformers leaves its capturing hooks on the layers: inert while nothing records, so
    # the next plain call fuses again (it ran the modules for good before)
    assert any(layer._forward_hooks for layer in patched.encoder.layer)
    fused_stacks.clear()
    with torch.inference_mode():
        plain = patched(input_ids=ids).last_hidden_state
    assert fused_stacks and all(arguments is not None for arguments in fused_stacks)
    torch.testing.assert_close(plain, expected[-1], rtol=1e-5, atol=1e-5)
    seen = []
    patched.encoder.layer[0].register_forward_hook(lambda *args: seen.append(1))
    fused_stacks.clear()
    with torch.inference_mode():
        patched(input_ids=ids)
    assert seen == [1] and all(arguments is None for arguments in fused_stacks)


def test_encoder_stack_sits_inside_padding_removal_in_copies_and_until_unpatched():
    from transfuse.hf import unpad
    stack_forward = blocks.encoder_layer._encoder_stack_forward
    patched = transfuse.patch(build("bert"))
    copied = copy.deepcopy(patched)
    for model in (patched, copied):
        encoder = model.encoder
        forward = encoder.forward
        assert forward.__func__ is unpad._stack_forward and forward.__self__ is encoder
        inner = encoder.__dict__[unpad.INNER_ATTR]
        assert inner.__func__ is stack_forward and inner.__self__ is encoder
    transfuse.unpatch(copied)
    assert not {"forward", unpad.INNER_ATTR} & copied.encoder.__dict__.keys()
    transfuse.patch(patched)  # twice: unchanged
    assert patched.encoder.forward.__func__ is unpad._stack_forward
    assert patched.encoder.__dict__[unpad.INNER_ATTR].__func__ is stack_forward


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("model_type", ["bert", "electra"])
def test_embeddings_in_one_call_equal_the_modules_bit_for_bit(model_type, dtype, monkeypatch):
    """Given ids and token types (positions given or not, after a cache or not), one
    embeddings_forward call gives exactly what the modules give; elsewhere the class's forward
    runs: no token types, input embeddings, autograd, a hooked table, dropout in training."""
    from hf_models import build_more
    model = build_more(model_type).to(dtype) if model_type == "electra" else build(
        model_type).to(dtype)
    patched = transfuse.patch(copy.deepcopy(model))
    embeddings = patched.embeddings
    assert embeddings.__dict__[blocks.FORWARD_ATTR] == "embeddings"
    module = transfuse.backends.extension()[0]
    calls = []
    original = module.embeddings_forward
    monkeypatch.setattr(module, "embeddings_forward",
                        lambda *a: calls.append(1) or original(*a))
    ids, mask = padded_batch()
    types = (torch.arange(ids.numel()).reshape(ids.shape) % 2)
    positions = torch.arange(ids.shape[1]).flip(0).unsqueeze(0)
    length = "cache_length" if "cache_length" in str(
        inspect.signature(type(embeddings).forward)) else "past_key_values_length"
    with torch.inference_mode():
        for kwargs in (dict(token_type_ids=types), dict(token_type_ids=types,
                                                        position_ids=positions),
                       {"token_type_ids": types, length: 3}):
            expected = type(embeddings).forward(embeddings, input_ids=ids, **kwargs)
            assert torch.equal(embeddings(input_ids=ids, **kwargs), expected)
        assert len(calls) == 3
        expected = type(embeddings).forward(embeddings, input_ids=ids)
        assert torch.equal(embeddings(input_ids=ids), expected) and len(calls) == 3
        inputs_embeds = embeddings.word_embeddings(ids)
        embeddings(inputs_embeds=inputs_embeds, token_type_ids=types)
        assert len(calls) == 3
    embeddings(input_ids=ids, token_type_ids=types).float().sum().backward()
    assert embeddings.word_embeddings.weight.grad is not None and len(calls) == 3
    wide = copy.deepcopy(embeddings).double()  # (the norm kernels' dtypes: not float64)
    with torch.inference_mode():
        assert torch.equal(wide(input_ids=ids, token_type_ids=types),
                           type(wide).forward(wide, input_ids=ids, token_type_ids=types))
    assert len(calls) == 3
    seen = []
    handle = embeddings.position_embeddings.register_forward_hook(lambda *a: seen.append(1))
    with torch.inference_mode():
        embeddings(input_ids=ids, token_type_ids=types)
    handle.remove()
    embeddings.train()
    with torch.inference_mode():
        embeddings(input_ids=ids, token_type_ids=types)
    assert seen == [1] and len(calls) == 3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embeddings_in_one_call_on_cuda_equal_the_modules_bit_for_bit(dtype, monkeypatch):
    module = transfuse.backends.extension()[0]
    calls, original = [], module.embeddings_forward
    monkeypatch.setattr(module, "embeddings_forward",
                        lambda *args: calls.append(1) or original(*args))
    embeddings = transfuse.patch(build("bert").to("cuda", dtype)).embeddings
    ids = padded_batch()[0].cuda()
    with torch.inference_mode():
        fused = embeddings(input_ids=ids, token_type_ids=ids % 2)
        modules = type(embeddings).forward(embeddings, input_ids=ids, token_type_ids=ids % 2)
    assert calls == [1] and torch.equal(fused, modules)


def test_embeddings_call_names_a_wrong_argument():
    module = transfuse.backends.extension()[0]
    ids, table = torch.zeros(1, 3, dtype=torch.long), torch.randn(10, 8)
    arguments = [ids, ids, ids, table, table, table, torch.ones(8), torch.zeros(8), 1e-5]
    with pytest.raises(TypeError, match="token_type_ids"):
        module.embeddings_forward(ids, ids.float(), *arguments[2:])
    with pytest.raises(ValueError, match="position must be a 2-D table"):
        module.embeddings_forward(*arguments[:5], torch.randn(10, 4), *arguments[6:])
    with pytest.raises(TypeError, match="token_type must be"):
        module.embeddings_forward(*arguments[:4], table.double(), *arguments[5:])


def test_encoder_layer_call_names_a_wrong_argument():
    module = transfuse.backends.extension()[0]
    x, w = torch.randn(1, 4, 8), torch.randn(8, 8)
    arguments = dict(x=x, cu_seqlens=None, max_seqlen=0, heads=2, scale=0.5, weights=[w] * 5,
                     weight_scales=[], biases=[torch.zeros(8)] * 6, torch_linears=[False] * 6,
                     int8_mode="",
                     norm_weights=[torch.ones(8)] * 2, norm_biases=[torch.zeros(8)] * 2,
                     eps=[1e-5] * 2, activation="gelu")
    with pytest.raises(ValueError, match="weights and biases"):
        module.encoder_layer(**arguments)
    with pytest.raises(ValueError, match="heads"):
        module.encoder_layer(**{**arguments, "weights": [w] * 6, "heads": 3})
    with pytest.raises(ValueError, match="activation"):
        module.encoder_layer(**{**arguments, "weights": [w] * 6, "activation": "relu"})
    with pytest.raises(ValueError, match="torch_linears"):
        module.encoder_layer(**{**arguments, "weights": [w] * 6, "torch_linears": [True]})


# ------------------------------------------------------------------------------------------------
# DistilBERT's block and stack: the encoder_layer and encoder_stack rules under its names
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("padding", [True, False], ids=["packed", "unpadded"])
@pytest.mark.parametrize("mode", ["fp32", "bf16", "w8a8"])
def test_distilbert_blocks_run_one_call_each_from_the_stack(mode, padding, fused_stacks,
                                                            fused_layer_calls, monkeypatch):
    """DistilBERT's stack makes every block's transfuse._C.encoder_layer call itself, over packed
    tokens (a padded batch) or an unmasked batch: what its modules give, up to the GELU (on
    transfuse's GEMMs the call takes it into the epilogue, in fp32 and rounded once, where the
    modules run torch's after the GEMM: bf16 then differs by an ulp of the output, w8a8 by an
    int8 rounding of the output layer's input that the GELU's last bits may flip), and in fp32
    what the unpatched model gives."""
    model, ids, mask, expected, patched = patched_copy("distilbert", mode, padding)
    rules = transfuse.patched_modules(patched)
    layers = model.config.n_layers
    assert rules["transformer<block>"] == "block rule 'encoder_stack'"
    assert [rules[f"transformer.layer.{i}<block>"] for i in range(layers)] == [
        "block rule 'encoder_layer'"] * layers
    with torch.inference_mode():
        fused = patched(input_ids=ids, attention_mask=mask).last_hidden_state
    assert [len(arguments) for arguments in fused_stacks] == [layers]
    assert len(fused_layer_calls) == layers
    modules = module_by_module(monkeypatch, patched, ids, mask, "_distilbert_layer_arguments")
    assert len(fused_layer_calls) == layers  # (the modules: no fused call)
    tolerance = {"fp32": 1e-5, "bf16": 1.6e-2, "w8a8": 1e-3}[mode]
    torch.testing.assert_close(fused, modules, rtol=tolerance, atol=tolerance)
    if mode == "fp32":
        torch.testing.assert_close(fused[mask.bool()], expected, rtol=1e-5, atol=1e-5)


def test_distilbert_rules_leave_a_block_that_reads_otherwise_alone(monkeypatch):
    monkeypatch.setattr(blocks.encoder_layer, "DISTILBERT_FFN_CHUNK_SOURCE",
                        ("x = self.something_else(",))
    patched = transfuse.patch(build("distilbert"))
    rules = transfuse.patched_modules(patched)
    assert "transformer.layer.0<block>" not in rules
    assert "forward" not in patched.transformer.layer[0].__dict__


def test_a_class_named_like_distilberts_elsewhere_is_not_a_distilbert_block():
    """A user's own Transformer / TransformerBlock classes are neither patched nor warned of."""
    class TransformerBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.attention(x)

    class Transformer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.ModuleList([TransformerBlock()])

        def forward(self, x):
            return self.layer[0](x)

    model = Transformer()
    done, unexpected = blocks.patch_blocks(model)
    assert set(done) == {"layer.0.attention"} and unexpected == []
    assert "forward" not in model.__dict__ and "forward" not in model.layer[0].__dict__
