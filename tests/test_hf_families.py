"""The families of hf_models.MORE_FAMILIES under transfuse.patch, each on a tiny random model.

One forward of a padded batch (right padding; left padding for decoder-only models; Whisper: input
features and a padded decoder; ViT: a batch of images) gives every sequence what the unpatched
model gives it alone, and the same gradients. The kernels that run are counted, not assumed:
calls of the transfuse attention (padded or packed) and of the fused norm ops in that forward,
against the calls of the unpatched model's own attention and norm modules (BLOOM's and Falcon's
attention never goes through transformers' attention interface: 0 calls). patched_modules and
patch's warning say exactly that. Greedy generate() gives the unpatched tokens, with the
attention calls of every step counted."""
import copy
import inspect
import warnings
from collections import Counter

import pytest
import torch

import transfuse
from transfuse.hf import attention as hf_attention

transformers = pytest.importorskip("transformers")
from hf_models import (MORE_FAMILIES, VOCAB, assert_close_scaled, build_more,  # noqa: E402
                       computes_own_attention, run)

LENGTHS = (9, 5, 1)          # one sequence of length 1, one with no padding
DECODER_LENGTHS = (5, 3, 1)  # the decoder inputs of encoder-decoder families
NEW_TOKENS = 4

# model_type -> (attention module calls, norm module calls) of the unpatched model in one forward
# of the padded batch, counted by hand from the tiny configs, and the transfuse kernel calls the
# patched model makes instead: "attention" (padded) or "varlen_attention" (packed: padding
# removal), none where the family's attention does not go through transformers' interface (BLOOM,
# Falcon); "layer_norm" / "rms_norm" for every norm call; "linear+gelu" from the block rules (on
# CPU tensors the GEMM with bias and GELU in its epilogue; elsewhere GEMM, then "bias_gelu").
EXPECTED = {
    # ALBERT: one layer (one AlbertAttention, two LayerNorms) run at both layer positions
    "albert": (2, 5, dict(varlen_attention=2, layer_norm=5)),
    "electra": (2, 5, dict(varlen_attention=2, layer_norm=5, **{"linear+gelu": 2})),
    "clip_text_model": (2, 5, dict(varlen_attention=2, layer_norm=5)),
    "vit": (2, 5, dict(attention=2, layer_norm=5)),
    # encoder-decoders: 2 encoder self-attentions (packed where the encoder has a padding
    # removal rule), then 2 x (self + cross) in the decoder
    # mBART: + layernorm_embedding x2
    "mbart": (6, 14, dict(varlen_attention=2, attention=4, layer_norm=14)),
    "pegasus": (6, 12, dict(varlen_attention=2, attention=4, layer_norm=12)),
    "m2m_100": (6, 12, dict(varlen_attention=2, attention=4, layer_norm=12)),
    "mt5": (6, 12, dict(varlen_attention=2, attention=4, rms_norm=12)),
    "whisper": (6, 12, dict(attention=6, layer_norm=12)),
    # decoders: the forward fills a fresh DynamicCache, which a packed prefill can do; Gemma 2 / 3
    # have sliding-window cache layers, which keep the padded path (packed without a cache)
    "phi": (2, 3, dict(varlen_attention=2, layer_norm=3)),  # one norm per parallel block
    "gpt_neox": (2, 5, dict(varlen_attention=2, layer_norm=5)),
    "opt": (2, 5, dict(varlen_attention=2, layer_norm=5)),
    "qwen3": (2, 9, dict(varlen_attention=2, rms_norm=9)),  # + q_norm, k_norm per layer
    "smollm3": (2, 5, dict(varlen_attention=2, rms_norm=5)),
    "granite": (2, 5, dict(varlen_attention=2, rms_norm=5)),
    # 4 norms per layer (Gemma 3: + q_norm, k_norm); packed into a cache of sliding-window layers
    "gemma2": (2, 9, dict(varlen_attention=2, rms_norm=9)),
    "gemma3_text": (2, 13, dict(varlen_attention=2, rms_norm=13)),
    "bloom": (2, 6, dict(layer_norm=6)),  # + word_embeddings_layernorm
    # one norm per parallel block; the attention through the interface from transformers 5.25
    "falcon": (2, 3, dict(layer_norm=3, **({} if computes_own_attention("falcon")
                                           else dict(attention=2)))),
}
# families with a padding-removal rule (transfuse.hf.unpad.UNPAD_RULES)
UNPADDED = ["albert", "electra", "clip_text_model", "phi", "gpt_neox", "opt", "qwen3", "smollm3",
            "granite", "gemma2", "gemma3_text"]
PACKED_ENCODERS = ["mbart", "pegasus", "m2m_100", "mt5"]  # seq2seq: the encoder runs packed
OWN_ATTENTION = {m: f"{m.capitalize()}Attention" for m in ("bloom", "falcon")
                 if computes_own_attention(m)}
GENERATING = [m for m, (kind, _, _) in MORE_FAMILIES.items()
              if kind in ("causal", "seq2seq", "speech")]
assert EXPECTED.keys() == MORE_FAMILIES.keys()


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls of the transfuse attention kernels (as the attention function reaches
    them) and of the fused norm / activation ops and linear layers with an activation (as
    transfuse.nn and the block rules reach them, or the fused encoder layer runs them)."""
    seen = Counter()

    def spy(owner, name):
        original = getattr(owner, name)

        def counting(*args, **kwargs):
            seen[name] += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(owner, name, counting)
    for name in ("attention", "varlen_attention"):
        spy(hf_attention, name)
    for name in ("layer_norm", "rms_norm", "bias_gelu"):
        spy(transfuse.ops, name)
    linear = transfuse.ops.linear

    def linear_gelu(*args, **kwargs):
        if kwargs.get("activation"):
            seen["linear+gelu"] += 1
        return linear(*args, **kwargs)
    monkeypatch.setattr(transfuse.ops, "linear", linear_gelu)
    module = transfuse.backends.extension()[0]
    encoder_layer = module.encoder_layer

    def fused_layer(x, cu_seqlens, *args, **kwargs):  # the kernels of one BERT-style layer
        seen["attention" if cu_seqlens is None else "varlen_attention"] += 1
        seen["layer_norm"] += 2
        seen["bias_gelu" if args[7] else "linear+gelu"] += 1  # int8_mode
        return encoder_layer(x, cu_seqlens, *args, **kwargs)
    monkeypatch.setattr(module, "encoder_layer", fused_layer)
    decoder_layer_qkv, decoder_layer_out = module.decoder_layer_qkv, module.decoder_layer_out

    def fused_qkv(x, *args):  # a decoder layer's input norm and head norms (args[11])
        seen["rms_norm"] += 1 + len(args[11])
        return decoder_layer_qkv(x, *args)

    def fused_out(x, q, k, v, mask, cu_seqlens_q, *args):  # its attention and second norm (and
        seen["attention" if cu_seqlens_q is None else "varlen_attention"] += 1  # Gemma 2 / 3's
        seen["rms_norm"] += 1 + len(args[-2])  # sandwich norms, before the multiplier)
        return decoder_layer_out(x, q, k, v, mask, cu_seqlens_q, *args)
    monkeypatch.setattr(module, "decoder_layer_qkv", fused_qkv)
    monkeypatch.setattr(module, "decoder_layer_out", fused_out)
    seq2seq_qkv, seq2seq_out = module.seq2seq_decoder_layer_qkv, module.seq2seq_decoder_layer_out

    def fused_seq2seq_qkv(x, norm_weight, *args):  # a BART-like decoder step: pre-norm's first
        seen["layer_norm"] += norm_weight is not None  # norm
        return seq2seq_qkv(x, norm_weight, *args)

    def fused_seq2seq_out(*args):  # its self- and cross-attention, the other norms
        seen["attention"] += 2
        seen["layer_norm"] += 2 if args[-1] else 3  # pre_norm
        return seq2seq_out(*args)
    monkeypatch.setattr(module, "seq2seq_decoder_layer_qkv", fused_seq2seq_qkv)
    monkeypatch.setattr(module, "seq2seq_decoder_layer_out", fused_seq2seq_out)
    return seen


def module_calls(model, batch):
    """Calls of the unpatched model's attention modules and norm-like modules in one forward."""
    seen = Counter()
    attention = set(map(id, hf_attention.attention_modules(model)))
    handles = [m.register_forward_hook(
        lambda *_, kind="attention" if id(m) in attention else "norm": seen.update([kind]))
        for m in model.modules() if id(m) in attention or "Norm" in type(m).__name__]
    try:
        with torch.no_grad():
            run(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def token_batch(lengths, side, seed, pad_id):
    """Random ids padded on `side` ("left", "right" or "mixed": even rows left) to max(lengths)
    with pad_id, and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, VOCAB - 1, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        left = side == "left" or (side == "mixed" and row % 2 == 0)
        mask[row, slice(width - n, width) if left else slice(0, n)] = 1
    return ids.masked_fill(mask == 0, pad_id), mask


def left_positions(mask):
    """The positions generate() gives a left-padded row: its real tokens counted from 0."""
    return (mask.cumsum(1) - 1).clamp(min=0)


def accepts(model, argument):
    return argument in inspect.signature(type(model).forward).parameters


def padded_batch(model_type, model, seed=1):
    """(batch, sequences): the padded batch the family takes, and for each sequence (its input
    alone, unpadded; the index of its output positions in the batch's output)."""
    kind = MORE_FAMILIES[model_type][0]
    pad_id = getattr(model.config, "pad_token_id", None) or 0
    rows = range(len(LENGTHS))
    if kind == "image":
        pixels = torch.randn(len(LENGTHS), 3, 16, 16, generator=torch.Generator().manual_seed(seed))
        return {"pixel_values": pixels}, [({"pixel_values": pixels[i:i + 1]}, (i, slice(None)))
                                          for i in rows]
    if kind in ("seq2seq", "speech"):
        if kind == "speech":
            features = torch.randn(len(LENGTHS), model.config.num_mel_bins,
                                   2 * model.config.max_source_positions,
                                   generator=torch.Generator().manual_seed(seed))
            batch = {"input_features": features}
            encoder = [{"input_features": features[i:i + 1]} for i in rows]
        else:
            ids, mask = token_batch(LENGTHS, "right", seed, pad_id)
            batch = {"input_ids": ids, "attention_mask": mask}
            encoder = [{"input_ids": ids[i:i + 1, :n], "attention_mask": mask[i:i + 1, :n]}
                       for i, n in enumerate(LENGTHS)]
        ids, mask = token_batch(DECODER_LENGTHS, "right", seed + 1, pad_id)
        batch.update(decoder_input_ids=ids, decoder_attention_mask=mask)
        return batch, [(dict(encoder[i], decoder_input_ids=ids[i:i + 1, :n],
                             decoder_attention_mask=mask[i:i + 1, :n]), (i, slice(0, n)))
                       for i, n in enumerate(DECODER_LENGTHS)]
    side = "left" if kind == "causal" else "right"
    ids, mask = token_batch(LENGTHS, side, seed, pad_id)
    batch = {"input_ids": ids, "attention_mask": mask}
    if side == "left" and accepts(model, "position_ids"):  # positions as generate() gives them
        batch["position_ids"] = left_positions(mask)
    width = ids.shape[1]
    sequences = []
    for i, n in enumerate(LENGTHS):
        real = slice(width - n, width) if side == "left" else slice(0, n)
        sequences.append(({"input_ids": ids[i:i + 1, real], "attention_mask": mask[i:i + 1, real]},
                          (i, real)))
    return batch, sequences


def real_outputs(out, sequences):
    """[B, S, ...] -> bool [B, S]: the output positions of real tokens."""
    real = torch.zeros(out.shape[:2], dtype=torch.bool)
    for _, index in sequences:
        real[index] = True
    return real


def gradients(model, batch, real):
    """d(sum(output * fixed random probe at real positions)) / d(parameter), by name."""
    model.zero_grad(set_to_none=True)
    out = run(model, batch)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)) * real[..., None]
    (out * probe).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def patched_copy(model):
    patched = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BLOOM / Falcon: the warning test_family checks
        return transfuse.patch(patched)


def patch_recording(model):
    """patch(model) and the transfuse warnings it emitted."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        transfuse.patch(model)
    return [str(w.message) for w in record if "transfuse" in str(w.message)]


@pytest.mark.parametrize("model_type", list(MORE_FAMILIES))
def test_family(model_type, kernel_calls):
    """(d) patch's warning and patched_modules; (a) each sequence of the padded batch; (c) the
    kernels that run, counted; gradients."""
    norm_class = MORE_FAMILIES[model_type][2]
    model = build_more(model_type)
    implementation = model.config._attn_implementation
    norms = {n for n, m in model.named_modules() if "Norm" in type(m).__name__}
    assert {type(model.get_submodule(n)).__name__ for n in norms} == {norm_class}
    batch, sequences = padded_batch(model_type, model)
    unpatched_calls = module_calls(model, batch)

    # (d) what patch did, and what it says it did
    patched = copy.deepcopy(model)
    messages = patch_recording(patched)
    listed = transfuse.patched_modules(patched)
    own = OWN_ATTENTION.get(model_type)
    if own:
        assert len(messages) == 1 and f"{own} x2 (its forward does not go through" in messages[0], \
            messages
        assert "<attention>" not in listed
        assert patched.config._attn_implementation == implementation
    else:
        assert messages == []
        attention_classes = {type(m).__name__ for m in hf_attention.attention_modules(patched)}
        assert all(f"{c} x" in listed["<attention>"] for c in attention_classes), listed
    assert {n for n in listed if "<" not in n} == norms
    fused, norm_op = (("FusedLayerNorm", "layer_norm") if norm_class == "LayerNorm"
                      else ("FusedRMSNorm", "rms_norm"))
    assert all(listed[n].startswith(fused) and listed[n].endswith(f"replacing {norm_class}")
               for n in norms), listed
    unpadded = model_type in UNPADDED + PACKED_ENCODERS
    assert any(n.endswith("<unpad>") for n in listed) == unpadded

    # (a) + (c): every sequence of the padded batch equals its run alone through the unpatched
    # model; the kernels that ran, counted
    with torch.no_grad():
        kernel_calls.clear()
        out = patched(**batch)
        counted = dict(kernel_calls)
        for alone, index in sequences:
            expected_out = model(**alone)
            for field in ("logits", "last_hidden_state"):
                if getattr(expected_out, field, None) is not None:
                    assert_close_scaled(out[field][index], expected_out[field][0],
                                        name=f"{model_type} {field} {index[0]}")
                    break
            if getattr(expected_out, "pooler_output", None) is not None:
                assert_close_scaled(out.pooler_output[index[0]], expected_out.pooler_output[0],
                                    name=f"{model_type} pooler_output {index[0]}")
    attention_calls, norm_calls, kernels = EXPECTED[model_type]
    assert unpatched_calls == Counter(attention=attention_calls, norm=norm_calls)
    assert counted == kernels, counted
    out = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state

    # gradients at the real positions equal the unpatched model's
    real = real_outputs(out, sequences)
    grads, patched_grads = gradients(model, batch, real), gradients(patched, batch, real)
    assert grads.keys() == patched_grads.keys()
    # as tests/test_hf_attention.py: atol at 1e-5 of the model's largest gradient (a gradient that
    # is 0 in exact arithmetic, a key bias's, is rounding noise at the scale of its terms)
    scale = max(g.abs().max().item() for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(patched_grads[name], grad, rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m, name=name: f"{model_type} grad {name}: {m}")


UNPAD_LENGTHS = (12, 1, 7, 10, 3)  # one sequence of length 1, one with no padding


def hidden(model, ids, mask, **kwargs):
    return model.base_model(input_ids=ids, attention_mask=mask, **kwargs).last_hidden_state


@pytest.mark.parametrize("model_type", UNPADDED)
def test_padding_removal_gives_real_tokens_the_unpatched_values(model_type, kernel_calls):
    """Right, left and mixed padding, one sequence of length 1, no KV cache: every layer's
    attention runs once over the packed tokens; each real token gets what the unpatched model
    gives it in the padded batch and alone (right padding; left padding for decoders, with the
    positions generate() gives); pad positions hold zeros (CLIP text: its final norm of zeros,
    which is that norm's bias: the norm runs after the packed encoder)."""
    model = build_more(model_type)
    model.config.use_cache = False
    patched = patched_copy(model)
    decoder = MORE_FAMILIES[model_type][0] == "causal"
    pad_id = model.config.pad_token_id or 0
    for side in ("right", "left", "mixed"):
        ids, mask = token_batch(UNPAD_LENGTHS, side, 1, pad_id)
        real = mask.bool()
        with torch.no_grad():
            kernel_calls.clear()
            actual = hidden(patched, ids, mask)
            assert {k: v for k, v in kernel_calls.items() if k.endswith("attention")} == \
                {"varlen_attention": model.config.num_hidden_layers}, (side, kernel_calls)
            expected = hidden(model, ids, mask)
            assert_close_scaled(actual[real], expected[real], name=f"{model_type} {side}")
            pad = actual[~real]
            if model_type == "clip_text_model":
                assert torch.equal(pad, patched.final_layer_norm.bias.expand_as(pad))
            else:
                assert torch.equal(pad, torch.zeros_like(pad)), f"{model_type} {side}: pads"
            if side == "mixed" or (side == "left" and not decoder):
                continue
            kwargs = {}
            if side == "left":
                kwargs["position_ids"] = left_positions(mask)
                actual = hidden(patched, ids, mask, **kwargs)
            for row, n in enumerate(UNPAD_LENGTHS):
                tokens = slice(0, n) if side == "right" else slice(ids.shape[1] - n, None)
                alone = hidden(model, ids[row:row + 1, tokens], mask[row:row + 1, tokens])
                assert_close_scaled(actual[row, tokens], alone[0],
                                    name=f"{model_type} {side} row {row}")


@pytest.mark.parametrize("model_type", GENERATING)
def test_greedy_generate_same_tokens(model_type, kernel_calls):
    """Decoder-only families from left-padded prompts, encoder-decoders from a right-padded
    encoder input (Whisper from input features); every step's attention calls counted."""
    kind = MORE_FAMILIES[model_type][0]
    model = build_more(model_type)
    patched = patched_copy(model)
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    if kind == "speech":
        inputs = {"input_features": padded_batch(model_type, model)[0]["input_features"]}
    else:
        lengths = (7, 4, 1)
        side = "left" if kind == "causal" else "right"
        ids, mask = token_batch(lengths, side, 3, model.config.pad_token_id or 0)
        inputs = {"input_ids": ids, "attention_mask": mask}
        if kind == "seq2seq":
            kwargs["decoder_start_token_id"] = model.config.decoder_start_token_id or 0
    expected = model.generate(**inputs, **kwargs)
    steps = Counter()  # forward calls of the patched model's encoder and decoder
    parts = {"decoder": patched.get_decoder()}
    if kind != "causal":
        parts["encoder"] = patched.get_encoder()
    hooks = [module.register_forward_hook(lambda *_, part=part: steps.update([part]))
             for part, module in parts.items()]
    kernel_calls.clear()
    actual = patched.generate(**inputs, **kwargs)
    for hook in hooks:
        hook.remove()
    assert torch.equal(actual, expected)
    config = model.config
    if model_type in OWN_ATTENTION:
        expected_calls = {}
    elif kind == "causal":
        assert steps["decoder"] == actual.shape[1] - inputs["input_ids"].shape[1] > 1
        layers = config.num_hidden_layers
        expected_calls = {"attention": layers * steps["decoder"]}
        if model_type in UNPADDED:  # the prefill packed (Gemma's sliding-window layers too)
            expected_calls = {"varlen_attention": layers,
                              "attention": layers * (steps["decoder"] - 1)}
    else:  # the encoder once (packed), then each step's self- and cross-attention
        layers = (getattr(config, "encoder_layers", None) or config.num_layers,
                  getattr(config, "decoder_layers", None) or config.num_decoder_layers)
        assert steps["encoder"] == 1 and steps["decoder"] > 1, steps
        expected_calls = {"attention": layers[0] + 2 * layers[1] * steps["decoder"]}
        if model_type in PACKED_ENCODERS:
            expected_calls = {"varlen_attention": layers[0],
                              "attention": 2 * layers[1] * steps["decoder"]}
    attention_calls = {k: v for k, v in kernel_calls.items() if k.endswith("attention")}
    assert attention_calls == expected_calls, (attention_calls, steps)
