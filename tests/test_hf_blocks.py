"""Block rules (transfuse.hf.blocks): fused Q/K/V projections and residual-fused LayerNorms equal
the unpatched model, keep its parameters and state dict, and step aside when they do not fit;
the decoders' and ModernBERT's attention and MLP rules. (The encoder_layer, encoder_stack and
embeddings rules: test_hf_blocks_encoder_layer.py; the decoder layers', MPNet's and the seq2seq
decoder layers': test_hf_blocks_decoder_layer.py, _relative_bias.py, _seq2seq_decoder_layer.py.)"""
import copy
import importlib
import threading

import pytest
import torch
import torch.nn.functional as F

import transfuse
from transfuse.hf import blocks

from hf_models import assert_close_scaled, build, build_more, padded_batch, real_tokens

ENCODERS = ["bert", "roberta"]


@pytest.fixture(autouse=True)
def joined_gemm_on_cpu(monkeypatch):
    """The joint projection GEMMs run on CUDA only (they measured slower on the CPU); the tests
    run them on CPU tensors too."""
    monkeypatch.setattr(blocks.common, "JOINED_GEMM_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(blocks.common, "JOINED_INT8_DEVICES", ("cuda", "cpu"))


@pytest.fixture
def decoder_layers_module_by_module(monkeypatch):
    """Decoder layers through their modules' rules, not the two transfuse._C calls that compute
    the same (tests/test_hf_blocks_decoder_layer.py): for the tests that count the rules' ops."""
    monkeypatch.setattr(blocks.decoder_layer, "_decoder_layer_fused", lambda *args: None)


@pytest.fixture
def linear_calls(monkeypatch):
    """How many GEMMs a forward runs from Python: F.linear's, and transfuse._C.linear's that took
    the call (transfuse.ops.linear on the CPU: the GEMMs, or the GEMV where it takes one row)."""
    count = [0]
    original = F.linear

    def counting(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)
    monkeypatch.setattr(F, "linear", counting)
    module = transfuse.backends.extension()[0]
    if module is not None:
        own = module.linear

        def counting_own(*args):
            out = own(*args)
            count[0] += out is not None
            return out
        monkeypatch.setattr(module, "linear", counting_own)
    return count


@pytest.mark.parametrize("model_type", ENCODERS)
def test_blocks_equal_the_unpatched_model_with_one_gemm_for_qkv(model_type, linear_calls):
    model = build(model_type)
    ids, mask = padded_batch()
    expected = real_tokens(model, ids, mask)
    patched = transfuse.patch(copy.deepcopy(model))
    rules = {name: rule for name, rule in transfuse.patched_modules(patched).items()
             if "<block" in name}
    expected_rules = ["bias_gelu", "encoder_layer", "encoder_stack", "linear", "projections",
                      "residual_norm"]
    if model_type == "bert":  # (RoBERTa's embeddings read otherwise)
        expected_rules.insert(1, "embeddings")
    assert sorted(set(rules.values())) == [f"block rule '{rule}'" for rule in expected_rules]
    linear_calls[0] = 0
    torch.testing.assert_close(real_tokens(patched, ids, mask), expected, rtol=1e-5, atol=1e-5)
    layers = model.config.num_hidden_layers
    # per layer QKV, attention output, intermediate, output (unpatched: 6); then the pooler
    assert linear_calls[0] == 4 * layers + 1
    self_attention = patched.encoder.layer[0].attention.self
    storages = {m.weight.untyped_storage().data_ptr()
                for m in (self_attention.query, self_attention.key, self_attention.value)}
    assert len(storages) == 1
    assert patched.state_dict().keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        assert torch.equal(patched.state_dict()[name], value), name


@pytest.mark.parametrize("hidden_act", ["gelu_pytorch_tanh", "gelu_new"])
def test_intermediate_gelu_runs_bias_gelu_where_it_is_f_gelu(hidden_act, monkeypatch):
    model = build("bert")
    for layer in model.encoder.layer:  # the activation module transformers builds for hidden_act
        layer.intermediate.intermediate_act_fn = type(model.encoder.layer[0].intermediate)(
            model.config.__class__(**{**model.config.to_dict(), "hidden_act": hidden_act})
        ).intermediate_act_fn
    ids, mask = padded_batch()
    expected = real_tokens(model, ids, mask)
    calls = []
    original = transfuse.ops.linear
    monkeypatch.setattr(transfuse.ops, "linear", lambda *a, **k: calls.append(
        k.get("activation")) or original(*a, **k))
    patched = transfuse.patch(copy.deepcopy(model))
    torch.testing.assert_close(real_tokens(patched, ids, mask), expected, rtol=1e-5, atol=1e-5)
    # on CPU tensors one linear with the GELU in its epilogue; gelu_new is GPT's tanh formula
    # written out (not F.gelu): the class's forward runs it
    gelus = [a for a in calls if a is not None]
    assert gelus == (["gelu_tanh"] * model.config.num_hidden_layers if hidden_act != "gelu_new"
                     else [])


@pytest.mark.parametrize("joined", [False, True], ids=["one-by-one", "joined"])
def test_the_float_gemms_of_the_rules_run_transfuse_linear_on_the_cpu(joined, monkeypatch):
    """On CPU tensors the rules' GEMMs go through transfuse.ops.linear (thresholds lowered so that
    a tiny model's GEMMs take transfuse's kernel where the CPU has it), equal to the unpatched
    model per sequence. (The layers' modules: the fused layer, which calls the same kernels from
    C++, is tested below.)"""
    if not joined:
        monkeypatch.setattr(blocks.common, "JOINED_GEMM_DEVICES", ("cuda",))
    monkeypatch.setattr(blocks.encoder_layer, "_fused_layer_arguments", lambda *args: None)
    linear_module = importlib.import_module("transfuse.ops.linear")
    monkeypatch.setattr(linear_module, "MIN_WORK", 0)
    calls = []
    original = transfuse.ops.linear
    monkeypatch.setattr(transfuse.ops, "linear",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    model = build("bert")
    ids, mask = padded_batch()
    expected = real_tokens(model, ids, mask)
    patched = transfuse.patch(copy.deepcopy(model))
    torch.testing.assert_close(real_tokens(patched, ids, mask), expected, rtol=1e-5, atol=1e-5)
    # per layer Q, K, V (or their joint GEMM), the attention output, intermediate and output;
    # the pooler (the linear rule)
    assert len(calls) == (4 if joined else 6) * model.config.num_hidden_layers + 1


@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
def test_an_int8_intermediate_runs_bias_gelu_on_its_product_without_bias(mode, monkeypatch):
    model = transfuse.patch(build("bert"), int8=mode)
    intermediate = model.encoder.layer[0].intermediate
    assert isinstance(intermediate.dense, transfuse.nn.Int8Linear)
    calls = []
    original = transfuse.ops.bias_gelu
    monkeypatch.setattr(transfuse.ops, "bias_gelu",
                        lambda *a, **k: calls.append(a[2]) or original(*a, **k))
    h = torch.randn(2, 5, model.config.hidden_size)
    out = intermediate(h)
    assert calls == ["none"]
    # the class's forward: the int8 layer with its bias, then F.gelu
    torch.testing.assert_close(out, type(intermediate).forward(intermediate, h), rtol=1e-5,
                               atol=1e-6)


def test_the_cpu_runs_the_projections_one_by_one_by_default(monkeypatch, linear_calls):
    """(The layers' modules, whose F.linear calls Python sees; the fused layer calls the same
    GEMMs from C++, tested below.)"""
    monkeypatch.setattr(blocks.common, "JOINED_GEMM_DEVICES", ("cuda",))
    monkeypatch.setattr(blocks.encoder_layer, "_fused_layer_arguments", lambda *args: None)
    model = build("bert")
    ids, mask = padded_batch()
    expected = real_tokens(model, ids, mask)
    patched = transfuse.patch(copy.deepcopy(model))
    linear_calls[0] = 0
    torch.testing.assert_close(real_tokens(patched, ids, mask), expected, rtol=1e-5, atol=1e-5)
    assert linear_calls[0] == 6 * model.config.num_hidden_layers + 1  # and the pooler


def test_unpatch_restores_the_class_forwards_and_separate_storages():
    model = transfuse.patch(build("bert"))
    transfuse.unpatch(model)
    for module in model.modules():
        assert "forward" not in module.__dict__, type(module).__name__
    attention = model.encoder.layer[0].attention.self
    storages = {m.weight.untyped_storage().data_ptr()
                for m in (attention.query, attention.key, attention.value)}
    assert len(storages) == 3


@pytest.mark.parametrize("int8", [None, "w8a8"])
@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_a_model_built_under_inference_mode_patches_and_runs_as_one_built_outside(model_type,
                                                                                   int8):
    """Weights that are inference tensors (a model built under torch.inference_mode) keep working
    through the joined projections' shared storage and the CPU GEMMs' packed-weight cache (which
    does not keep them): the same outputs as the same model built outside inference mode, patched
    and unpatched again."""
    with torch.inference_mode():
        inside = build(model_type)
    outside, plain = build(model_type), build(model_type)
    assert inside.get_input_embeddings().weight.is_inference()
    for model in (inside, outside):
        transfuse.patch(model, int8=int8)
    ids, mask = padded_batch()

    def run(model):
        with torch.inference_mode():
            return model(input_ids=ids, attention_mask=mask)[0][mask.bool()]
    torch.testing.assert_close(run(inside), run(outside), rtol=0, atol=0)
    transfuse.unpatch(inside)
    torch.testing.assert_close(run(inside), run(plain), rtol=0, atol=0)


def test_training_gradients_equal_the_unpatched_model():
    model = build("bert").train()  # training mode: every layer runs on its own, unfused
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # (the packed and padded runs would draw differently)
    patched = transfuse.patch(copy.deepcopy(model))
    ids, mask = padded_batch()
    for m in (model, patched):
        out = m(input_ids=ids, attention_mask=mask).last_hidden_state
        out[mask.bool()].square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), patched.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_a_dtype_change_and_a_state_dict_load_keep_the_fusion_exact():
    model = build("bert")
    ids, mask = padded_batch()
    patched = transfuse.patch(copy.deepcopy(model)).double()  # new, separate storages
    other = build("bert", seed=5)
    patched.load_state_dict({k: v.double() for k, v in other.state_dict().items()})
    torch.testing.assert_close(real_tokens(patched, ids, mask),
                               real_tokens(other.double(), ids, mask), rtol=1e-9, atol=1e-9)
    attention = patched.encoder.layer[0].attention.self
    assert len({m.weight.untyped_storage().data_ptr()
                for m in (attention.query, attention.key, attention.value)}) == 1  # shared again


def test_save_pretrained_of_a_patched_model_loads_as_the_unpatched_one(tmp_path):
    from transformers import AutoModel
    model = build("bert")
    ids, mask = padded_batch()
    transfuse.patch(copy.deepcopy(model)).save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(real_tokens(loaded, ids, mask), real_tokens(model, ids, mask),
                               rtol=0, atol=0)


def test_swapped_siblings_and_unfused_norms_fall_back_to_the_class_forward(linear_calls):
    model = build("bert")
    ids, mask = padded_batch()
    expected = real_tokens(model, ids, mask)
    patched = transfuse.patch(copy.deepcopy(model), norm=False)  # LayerNorms stay nn.LayerNorm
    attention = patched.encoder.layer[0].attention.self
    replacement = torch.nn.Linear(attention.key.in_features, attention.key.out_features)
    replacement.load_state_dict(attention.key.state_dict())
    attention.key = replacement  # no longer the fused layer: its siblings run on their own
    torch.testing.assert_close(real_tokens(patched, ids, mask), expected, rtol=1e-5, atol=1e-5)


def test_a_forward_that_reads_otherwise_is_left_alone(monkeypatch):
    monkeypatch.setattr(blocks.sources, "RESIDUAL_NORM_SOURCE", ("self.something_else(",))
    blocks.sources._forward_reads_as.cache_clear()
    try:
        with pytest.warns(UserWarning, match="BertOutput"):
            patched = transfuse.patch(build("bert"))
    finally:
        blocks.sources._forward_reads_as.cache_clear()
    assert "forward" not in patched.encoder.layer[0].output.__dict__
    assert "forward" in patched.encoder.layer[0].attention.self.query.__dict__


def test_threads_sharing_a_patched_model_get_their_own_results():
    patched = transfuse.patch(build("bert"))
    batches = [padded_batch(seed) for seed in range(4)]
    expected = [real_tokens(patched, *batch) for batch in batches]
    results = [[] for _ in batches]

    def work(i):
        for _ in range(5):
            results[i].append(real_tokens(patched, *batches[i]))
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        for g in got:
            torch.testing.assert_close(g, want, rtol=0, atol=0)


def test_blocks_false_leaves_the_block_modules_alone():
    patched = transfuse.patch(build("bert"), blocks=False)
    assert not any(blocks.FORWARD_ATTR in m.__dict__ for m in patched.encoder.modules())
    assert not any("forward" in m.__dict__ for m in patched.encoder.modules()
                   if type(m).__name__ in blocks.BLOCK_RULES and m is not patched.encoder)


DECODERS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "smollm3", "granite"]


def logits_of_real_tokens(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[mask.bool()]


@pytest.mark.parametrize("model_type", DECODERS)
def test_decoder_layers_add_the_attention_residual_inside_the_rms_norm(model_type, monkeypatch):
    """residual_rms_norm: per layer one fused RMSNorm takes h + attn(...) (no separate add), equal
    to the unpatched model per sequence and token for token in greedy generation; in bf16 bitwise
    equal to the same patch without block rules (the sum rounds as eager's add does)."""
    model = build(model_type)
    ids, mask = padded_batch()
    patched = transfuse.patch(copy.deepcopy(model))
    layers = model.config.num_hidden_layers
    rules = [rule for name, rule in transfuse.patched_modules(patched).items()
             if rule == "block rule 'residual_rms_norm'"]
    assert len(rules) == layers
    with_residual = []
    original = transfuse.ops.rms_norm
    monkeypatch.setattr(transfuse.ops, "rms_norm", lambda x, w, eps, residual=None, *a, **k: (
        with_residual.append(residual is not None) or original(x, w, eps, residual, *a, **k)))
    torch.testing.assert_close(logits_of_real_tokens(patched, ids, mask),
                               logits_of_real_tokens(model, ids, mask), rtol=1e-5, atol=1e-5)
    assert sum(with_residual) == layers
    with torch.no_grad():
        prompt = ids[:1, :6]
        assert torch.equal(patched.generate(prompt, max_new_tokens=6, do_sample=False),
                           model.generate(prompt, max_new_tokens=6, do_sample=False))
    # bf16, the attention and MLP rules aside (they round once where eager rounds each op)
    for name in (f"{type(model.model.layers[0]).__name__[:-len('DecoderLayer')]}{part}"
                 for part in ("Attention", "MLP")):
        monkeypatch.setitem(blocks.BLOCK_RULES, name, ("projections", ()))
    bf16 = [transfuse.patch(copy.deepcopy(model).to(torch.bfloat16), blocks=blocks)
            for blocks in (True, False)]
    torch.testing.assert_close(logits_of_real_tokens(bf16[0], ids, mask),
                               logits_of_real_tokens(bf16[1], ids, mask), rtol=0, atol=0)


def test_decoder_gradients_and_fallbacks_equal_the_unpatched_model():
    """Training through the fused residual norm gives the unpatched gradients; with norm=False
    (post_attention_layernorm stays the family's) the rule is not installed; a norm swapped after
    patching sends the layer to the class's forward; unpatch restores it."""
    model = build("llama").train()
    patched = transfuse.patch(copy.deepcopy(model))
    ids, mask = padded_batch()
    for m in (model, patched):
        m(input_ids=ids, attention_mask=mask).logits[mask.bool()].square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), patched.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    model.eval()
    unfused = transfuse.patch(copy.deepcopy(model), norm=False)
    assert "forward" not in unfused.model.layers[0].__dict__
    swapped = transfuse.patch(copy.deepcopy(model))
    layer = swapped.model.layers[0]
    assert "forward" in layer.__dict__
    layer.post_attention_layernorm = copy.deepcopy(model.model.layers[0].post_attention_layernorm)
    torch.testing.assert_close(logits_of_real_tokens(swapped, ids, mask),
                               logits_of_real_tokens(model, ids, mask), rtol=1e-5, atol=1e-5)
    transfuse.unpatch(swapped)
    assert "forward" not in layer.__dict__


def test_the_other_linear_layers_run_transfuse_linear(monkeypatch):
    """linear: each nn.Linear that no other rule takes (a decoder's o_proj and down_proj, its
    head) runs through transfuse.ops.linear, so that a decoding step's few rows run transfuse's
    GEMV where the CPU has it; logits equal the unpatched model's, also under autocast (F.linear
    there, within bf16's rounding); a hooked layer keeps its class's forward; unpatch removes
    the rule."""
    model = build("llama")
    model.model.layers[1].mlp.down_proj.register_forward_hook(lambda *args: None)
    patched = transfuse.patch(copy.deepcopy(model))
    names = sorted(name for name, rule in transfuse.patched_modules(patched).items()
                   if rule == "block rule 'linear'")
    assert names == ["lm_head<block>", "model.layers.0.mlp.down_proj<block>",
                     "model.layers.0.self_attn.o_proj<block>",
                     "model.layers.1.self_attn.o_proj<block>"]
    module = transfuse.backends.extension()[0]
    ran, original = [], module.linear
    monkeypatch.setattr(module, "linear", lambda *a: ran.append(original(*a)) or ran[-1])
    ids = torch.randint(3, 60, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(patched(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
        # per layer Q/K/V as one GEMM (joined_gemm_on_cpu), o_proj, gate/up, down_proj; the head
        expected = 4 * model.config.num_hidden_layers + 1 - 1  # (one down_proj hooked)
        assert sum(out is not None for out in ran) == (expected if module.cpu_gemv else 0)
        o_proj, h = patched.model.layers[0].self_attn.o_proj, torch.randn(1, 5, 32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(o_proj(h), torch.nn.Linear.forward(o_proj, h))
            torch.testing.assert_close(patched(ids).logits, model(ids).logits, rtol=0.02,
                                       atol=0.02)
    transfuse.unpatch(patched)
    assert not any("forward" in m.__dict__ for m in patched.modules())


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_sandwich_layers_add_the_attention_residual_inside_the_pre_mlp_norm(model_type,
                                                                           monkeypatch):
    """sandwich_rms_norm (Gemma 2 / 3, norms after the attention and the MLP too): per layer the
    pre-feedforward norm takes the attention's residual in its pass, the attention rotates q and
    k in one call (Gemma 3: after its head norms), the MLP gates with one gated_mul (tanh GELU);
    module by module and as the layer call, equal to the unpatched model per sequence of a padded
    batch and token for token in greedy generation; training gradients equal."""
    model = build_more(model_type)
    patched = transfuse.patch(copy.deepcopy(model))
    layers = model.config.num_hidden_layers
    rules = sorted(rule for name, rule in transfuse.patched_modules(patched).items()
                   if name.endswith((".self_attn<block>", ".mlp<block>"))
                   or name.endswith(tuple(f".{i}<block>" for i in range(layers))))
    assert rules == sorted(["block rule 'gated_mlp'", "block rule 'rotary_attention'",
                            "block rule 'sandwich_rms_norm'"] * layers)
    ids, mask = padded_batch()
    expected = logits_of_real_tokens(model, ids, mask)
    with_residual, activations = [], []
    original_norm, original_gated_mul = transfuse.ops.rms_norm, blocks.mlp.gated_mul
    with monkeypatch.context() as m:
        m.setattr(blocks.decoder_layer, "_decoder_layer_fused", lambda *args: None)
        m.setattr(transfuse.ops, "rms_norm", lambda x, w, eps, residual=None, *a, **k: (
            with_residual.append(residual is not None) or original_norm(x, w, eps, residual, *a,
                                                                        **k)))
        m.setattr(blocks.mlp, "gated_mul", lambda *a, **k: activations.append(a[2])
                  or original_gated_mul(*a, **k))
        assert_close_scaled(logits_of_real_tokens(patched, ids, mask), expected)
    assert sum(with_residual) == layers and activations == ["gelu_tanh"] * layers
    assert_close_scaled(logits_of_real_tokens(patched, ids, mask), expected)  # the layer call
    with torch.no_grad():
        prompt = ids[:1, :6]
        assert torch.equal(patched.generate(prompt, max_new_tokens=6, do_sample=False),
                           model.generate(prompt, max_new_tokens=6, do_sample=False))
    for m in (model.train(), patched.train()):  # (the config's dropouts are 0)
        m(input_ids=ids, attention_mask=mask).logits[mask.bool()].square().sum().backward()
    scale = max(p.grad.abs().max().item() for p in model.parameters())  # (test_hf_families')
    for (name, p), q in zip(model.named_parameters(), patched.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("model_type", ENCODERS + DECODERS)
def test_patched_models_run_under_cpu_autocast(model_type):
    """Under torch.autocast (bf16 on the CPU) the linear layers return bf16 while residuals stay
    fp32: the residual rules add them as the class's forward does (promoting) and the attention
    takes its inputs in autocast's dtype; the real tokens equal the unpatched model's under the
    same autocast within bf16's rounding."""
    model = build(model_type)
    patched = transfuse.patch(copy.deepcopy(model))
    ids, mask = padded_batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(input_ids=ids, attention_mask=mask)[0][mask.bool()]
        actual = patched(input_ids=ids, attention_mask=mask)[0][mask.bool()]
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual.float(), expected.float(), rtol=0.02,
                               atol=0.02 * expected.abs().max().item())


@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_int8_siblings_run_as_one_int8_linear(model_type, mode, monkeypatch):
    """projections over Int8Linear siblings (after patch(int8=...)): their int8 weights, scales and
    biases share one storage and run as one transfuse.ops.int8_linear (w8a8: one quantization of
    the shared input); per sequence what the int8 patch without block rules
    gives (the same int8 products and epilogue, rounding aside), the state dict unchanged."""
    # (float layers: not joined)
    monkeypatch.setattr(blocks.common, "JOINED_GEMM_DEVICES", ("cuda",))
    model = build(model_type)
    ids, mask = padded_batch()
    unjoined = transfuse.patch(copy.deepcopy(model), int8=mode, blocks=False)
    joined = transfuse.patch(copy.deepcopy(model), int8=mode)
    calls = []
    original = transfuse.ops.int8_linear
    monkeypatch.setattr(transfuse.ops, "int8_linear",
                        lambda *a, **k: calls.append(a[1].shape[0]) or original(*a, **k))
    outputs = []
    for patched in (unjoined, joined):
        calls.clear()
        with torch.no_grad():
            outputs.append(patched(input_ids=ids, attention_mask=mask)[0][mask.bool()])
        outputs.append(list(calls))
    expected, separate, actual, together = outputs
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    # Q, K and V (and a gated MLP's gate and up) as one call each
    assert len(together) == len(separate) - layers * (2 if model_type == "bert" else 3)
    if model_type == "bert":
        assert together.count(3 * hidden) == layers
    assert joined.state_dict().keys() == unjoined.state_dict().keys()
    for name, value in unjoined.state_dict().items():
        assert torch.equal(joined.state_dict()[name], value), name


def test_the_cpu_runs_int8_siblings_one_by_one_by_default(monkeypatch,
                                                          decoder_layers_module_by_module):
    monkeypatch.setattr(blocks.common, "JOINED_INT8_DEVICES", ("cuda",))
    patched = transfuse.patch(build("llama"), int8="w8a8")
    calls = []
    original = transfuse.ops.int8_linear
    monkeypatch.setattr(transfuse.ops, "int8_linear",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    with torch.no_grad():
        patched(input_ids=torch.randint(3, 60, (1, 4)))
    assert len(calls) == 7 * patched.config.num_hidden_layers  # q k v o, gate up down


@pytest.mark.parametrize("model_type", DECODERS)
def test_decoder_attention_rotates_q_and_k_in_one_call_and_mlps_gate_in_one_call(
        model_type, monkeypatch):
    """rotary_attention: per layer and forward one transfuse.ops.rotary over q and k (none in
    SmolLM3's NoPE layers); gated_mlp:
    one gated_mul (silu_mul; gelu_mul's tanh form for Gemma's GELU);
    per sequence of a padded batch and token for token in greedy generation (the cache filled
    through the rule) equal to the unpatched model; in bf16 within twice eager bf16's error to
    the fp32 model."""
    model = build(model_type)
    patched = transfuse.patch(copy.deepcopy(model))
    layers = model.config.num_hidden_layers
    rules = sorted(rule for name, rule in transfuse.patched_modules(patched).items()
                   if ".self_attn<" in name or ".mlp<" in name)
    assert rules == sorted(["block rule 'gated_mlp'", "block rule 'rotary_attention'"] * layers)
    calls = []
    original_rotary, original_gated_mul = transfuse.ops.rotary, blocks.mlp.gated_mul
    monkeypatch.setattr(transfuse.ops, "rotary",
                        lambda *a, **k: calls.append("rotary") or original_rotary(*a, **k))
    monkeypatch.setattr(blocks.mlp, "gated_mul",
                        lambda *a, **k: calls.append(a[2]) or original_gated_mul(*a, **k))
    ids, mask = padded_batch()
    torch.testing.assert_close(logits_of_real_tokens(patched, ids, mask),
                               logits_of_real_tokens(model, ids, mask), rtol=1e-5, atol=1e-5)
    # (SmolLM3: its layers' use_rope flags)
    rotating = sum(getattr(model.config, "no_rope_layers", None) or [1] * layers)
    assert 0 < rotating == sum(bool(layer.self_attn.__dict__.get("use_rope", True))
                               for layer in model.model.layers)
    assert calls.count("rotary") == rotating
    assert calls.count("gelu_tanh" if model_type == "gemma" else "silu") == layers
    with torch.no_grad():
        prompt = ids[:2, :5]
        assert torch.equal(patched.generate(prompt, max_new_tokens=6, do_sample=False),
                           model.generate(prompt, max_new_tokens=6, do_sample=False))
    assert calls.count("rotary") == rotating * (1 + 6)  # the prefill and each new token
    exact = logits_of_real_tokens(model, ids, mask).double()
    errors = [(logits_of_real_tokens(m, ids, mask).double() - exact).abs().max().item()
              for m in (transfuse.patch(copy.deepcopy(model).to(torch.bfloat16)),
                        copy.deepcopy(model).to(torch.bfloat16))]
    assert errors[0] <= 2 * errors[1] + 1e-3, errors


def test_decoder_attention_and_mlp_fall_back_to_the_class_forward():
    """A positional cache argument, a cache passed by transformers 5.24's deprecated name, a
    swapped act_fn and angles that require a gradient run the class's code; unpatch removes the
    rules."""
    model = build("llama")
    patched = transfuse.patch(copy.deepcopy(model))
    attention, mlp = patched.model.layers[0].self_attn, patched.model.layers[0].mlp
    reference_attention = model.model.layers[0].self_attn
    h = torch.randn(2, 5, model.config.hidden_size)
    position_ids = torch.arange(5).expand(2, 5)
    cos, sin = model.model.rotary_emb(h, position_ids)
    with torch.no_grad():
        expected = reference_attention(h, (cos, sin), None)[0]
        torch.testing.assert_close(attention(h, (cos, sin), None)[0], expected, rtol=1e-5,
                                   atol=1e-6)
        torch.testing.assert_close(attention(h, (cos, sin), None, None)[0], expected, rtol=1e-5,
                                   atol=1e-6)
        mlp.act_fn = torch.nn.Tanh()
        torch.testing.assert_close(mlp(h), type(mlp).forward(mlp, h), rtol=0, atol=0)
    angle = cos.clone().requires_grad_(True)
    torch.testing.assert_close(attention(h, (angle, sin), None)[0], expected, rtol=1e-5, atol=1e-6)
    attention(h, (angle, sin), None)[0].sum().backward()
    assert angle.grad is not None and angle.grad.abs().sum() > 0
    transfuse.unpatch(patched)
    assert "forward" not in attention.__dict__ and "forward" not in mlp.__dict__


def test_modernbert_attention_rotates_q_and_k_in_one_call(monkeypatch):
    """joint_rotary_attention: per layer and forward one transfuse.ops.rotary over q and k, the
    model equal to the unpatched one per real token of a padded batch (local and global layers,
    padding removal packing the tokens); in bf16 the same values as the modules with
    apply_rotary_pos_emb (both fp32 math rounded once); angles that require a gradient run the
    class's code, which gives them one; training gradients equal the unpatched model's."""
    model = build("modernbert")
    patched = transfuse.patch(copy.deepcopy(model))
    layers = model.config.num_hidden_layers
    rules = [rule for name, rule in transfuse.patched_modules(patched).items()
             if name.endswith(".attn<block>")]
    assert rules == ["block rule 'joint_rotary_attention'"] * layers
    calls = []
    original = transfuse.ops.rotary
    monkeypatch.setattr(transfuse.ops, "rotary",
                        lambda *a, **k: calls.append(a[0].shape) or original(*a, **k))
    ids, mask = padded_batch()
    torch.testing.assert_close(real_tokens(patched, ids, mask), real_tokens(model, ids, mask),
                               rtol=1e-5, atol=1e-5)
    assert len(calls) == layers
    bf16 = transfuse.patch(copy.deepcopy(model).to(torch.bfloat16))
    rule_off = copy.deepcopy(bf16)
    for module in rule_off.modules():
        if module.__dict__.get(blocks.FORWARD_ATTR) == "joint_rotary_attention":
            del module.forward
    assert torch.equal(real_tokens(bf16, ids, mask), real_tokens(rule_off, ids, mask))

    attention = patched.layers[1].attn  # (a local layer)
    h = torch.randn(2, 5, model.config.hidden_size)
    cos, sin = model.rotary_emb(h, torch.arange(5).expand(2, 5), "sliding_attention")
    with torch.no_grad():
        expected = type(attention).forward(attention, h, (cos, sin), None)[0]
        assert torch.equal(attention(h, (cos, sin), None)[0], expected)
    angle = cos.clone().requires_grad_(True)
    torch.testing.assert_close(attention(h, (angle, sin), None)[0], expected, rtol=1e-5,
                               atol=1e-6)  # (torch's GEMMs record the graph)
    attention(h, (angle, sin), None)[0].sum().backward()
    assert angle.grad is not None and angle.grad.abs().sum() > 0

    patched.zero_grad()
    for m in (model.train(), patched.train()):  # (the config's dropouts are 0)
        out = m(input_ids=ids, attention_mask=mask).last_hidden_state
        out[mask.bool()].square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), patched.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_modernbert_mlp_gates_with_one_gelu_mul(monkeypatch):
    """joint_gated_mlp: per layer one gated_mul (exact GELU) over the halves of Wi's output, the
    model equal to the unpatched one per real token of a padded batch; in bf16 within twice eager
    bf16's error to the fp32 model (the product rounded once, not twice); an active dropout draws
    what the class's forward draws; a swapped act runs the class's forward; training gradients
    equal the unpatched model's."""
    model = build("modernbert")
    patched = transfuse.patch(copy.deepcopy(model))
    layers = model.config.num_hidden_layers
    rules = [rule for name, rule in transfuse.patched_modules(patched).items()
             if name.endswith(".mlp<block>")]
    assert rules == ["block rule 'joint_gated_mlp'"] * layers
    calls = []
    original = blocks.mlp.gated_mul
    monkeypatch.setattr(blocks.mlp, "gated_mul",
                        lambda *a, **k: calls.append((a[2], a[0].stride())) or original(*a, **k))
    ids, mask = padded_batch()
    expected = real_tokens(model, ids, mask)
    torch.testing.assert_close(real_tokens(patched, ids, mask), expected, rtol=1e-5, atol=1e-5)
    intermediate = model.config.intermediate_size
    assert [c[0] for c in calls] == ["gelu"] * layers
    assert all(c[1][-2] == 2 * intermediate for c in calls)  # (the halves read in place)
    errors = [(real_tokens(m, ids, mask).double() - expected.double()).abs().max().item()
              for m in (transfuse.patch(copy.deepcopy(model).to(torch.bfloat16)),
                        copy.deepcopy(model).to(torch.bfloat16))]
    assert errors[0] <= 2 * errors[1] + 1e-3, errors

    mlp = patched.layers[0].mlp
    h = torch.randn(2, 5, model.config.hidden_size)
    mlp.drop.p = 0.5
    mlp.train()
    torch.manual_seed(3)
    dropped = mlp(h)
    torch.manual_seed(3)
    torch.testing.assert_close(dropped, type(mlp).forward(mlp, h), rtol=1e-5, atol=1e-6)
    mlp.drop.p = 0.0
    mlp.act = torch.nn.Tanh()
    calls.clear()
    torch.testing.assert_close(mlp(h), type(mlp).forward(mlp, h), rtol=0, atol=0)
    assert not calls
    mlp.act = copy.deepcopy(model.layers[0].mlp.act)

    patched.zero_grad()
    for m in (model.train(), patched.train()):  # (the config's dropouts are 0)
        out = m(input_ids=ids, attention_mask=mask).last_hidden_state
        out[mask.bool()].square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), patched.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
