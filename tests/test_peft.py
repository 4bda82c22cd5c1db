"""peft LoRA through peft's public API, trained with transformers.Trainer: over an int8 base
(transfuse.quantize / patch(int8=...), via transfuse.hf.lora) it trains as the same adapter over
the dequantized float weights, leaves the base alone, merges as bitsandbytes does (dequantize, add
B @ A * scaling, quantize again) and saves / reloads as peft does; over a transfuse.patch-ed float
model it trains as over the unpatched one."""
import copy
import json
import os
import tempfile

import pytest
import torch
from torch import nn

import transfuse

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("peft")
from hf_models import ENCODER, VOCAB, build  # noqa: E402
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import (AutoConfig, AutoModelForCausalLM,  # noqa: E402
                          AutoModelForSequenceClassification, Trainer, TrainerCallback,
                          TrainingArguments)

from transfuse.hf.lora import Int8LoraLinear, int8_layers, lora_config  # noqa: E402
from transfuse.nn import Int8Linear  # noqa: E402

STEPS = 8
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: every op is a thread synchronization, and on a shared 2-core machine
    two spinning threads made this file 4x slower (62 s against 15 s). Restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def causal_rows():
    """Token rows for a causal LM; every third one padded after 8 tokens (labels -100 there)."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(4 * STEPS):
        ids = torch.randint(3, VOCAB, (12,), generator=g)
        mask = torch.ones(12, dtype=torch.long)
        if i % 3 == 0:
            mask[8:] = 0
        rows.append({"input_ids": ids, "attention_mask": mask,
                     "labels": ids.masked_fill(mask == 0, -100)})
    return rows


def classifier_rows():
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, VOCAB, (12,), generator=g),
             "attention_mask": torch.ones(12, dtype=torch.long), "labels": torch.tensor(i % 2)}
            for i in range(4 * STEPS)]
    for row in rows[::3]:
        row["attention_mask"][8:] = 0
    return rows


class _Losses(TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def train(model, rows, **arguments):
    """Per-step training losses of STEPS Trainer steps (fp32, CPU, seed 0)."""
    record = _Losses()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(out, max_steps=STEPS, per_device_train_batch_size=4,
                                 logging_steps=1, learning_rate=5e-3, seed=0, data_seed=0,
                                 report_to=[], save_strategy="no", use_cpu=True,
                                 disable_tqdm=True, dataloader_num_workers=0, **arguments)
        Trainer(model, args, train_dataset=rows, callbacks=[record]).train()
    assert len(record.losses) == STEPS
    return record.losses


def with_lora(model, config):
    torch.manual_seed(1)  # the same lora_A initialization on both sides
    return get_peft_model(model, config)


def assert_losses_equal(actual, expected, tol=1e-4):
    assert max(abs(a - e) for a, e in zip(actual, expected)) < tol, (actual, expected)
    assert actual[-1] != actual[0]


def dequantized_float_model(int8_model):
    """build("llama") with each Int8Linear's place holding nn.Linear(weight=dequantized)."""
    model = build("llama")
    with torch.no_grad():
        for name, module in int8_model.named_modules():
            if isinstance(module, Int8Linear):
                model.get_submodule(name).weight.copy_(module.dequantized_weight())
    return model


def int8_llama(how, mode="w8a16"):
    """A tiny Llama with int8 layers: transfuse.quantize, or transfuse.patch(int8=) (fused norms
    and attention too; the padded batch kept, so that LoRA dropout draws the RNG stream of the
    unpatched run)."""
    if how == "quantize":
        return transfuse.quantize(build("llama"), mode)
    return transfuse.patch(build("llama"), int8=mode, unpad=False)


def logits(model, seed=5):
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(seed))
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def int8_lora_config():
    return lora_config(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS)


def quantized(weight):
    """Int8Linear.from_float of an nn.Linear holding `weight`: transfuse.quantize's rounding."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return Int8Linear.from_float(linear)


_TRAINED = {}


def trained(how):
    """(peft model trained STEPS steps, its losses, its state dict before training), once per
    session: `how` "quantize" / "patch" (int8_llama), or "dequantized" (the same adapter over
    nn.Linear layers holding the dequantized int8 weights, which both ways give alike)."""
    if how not in _TRAINED:
        base = int8_llama("quantize" if how == "dequantized" else how)
        if how == "dequantized":
            base = dequantized_float_model(base)
        model = with_lora(base, int8_lora_config())
        before = {k: v.clone() for k, v in model.state_dict().items()}
        _TRAINED[how] = model, train(model, causal_rows()), before
    return _TRAINED[how]


@pytest.mark.parametrize("how", ["quantize", "patch"])
def test_lora_over_int8_trains_like_over_the_dequantized_weights(how):
    model, actual, before = trained(how)
    assert_losses_equal(actual, trained("dequantized")[1])

    adapted = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(adapted) == 2 * len(TARGETS) and all(type(m) is Int8LoraLinear for m in adapted)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    for name, value in model.state_dict().items():  # the int8 base (and all else) frozen
        changed = not torch.equal(value, before[name])
        assert changed == (name in trainable), name
    assert any(".weight" in n and before[n].dtype == torch.int8 for n in before)


def test_qlora_style_checkpointed_training_over_int8_trains_alike():
    """peft's k-bit preparation (freezes the base, casts half-precision parameters to fp32) and
    Trainer's gradient checkpointing: the same losses as the plain run (the recomputed forward
    is the same computation)."""
    model = with_lora(prepare_model_for_kbit_training(int8_llama("quantize")), int8_lora_config())
    name = "activation_checkpointing"  # (transformers 5.24; gradient_checkpointing before)
    if name not in TrainingArguments.__dataclass_fields__:
        name = "gradient_checkpointing"
    losses = train(model, causal_rows(), **{name: True})
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert_losses_equal(losses, trained("quantize")[1], tol=1e-6)


def test_lora_over_w8a8_trains_the_adapter_only():
    model = with_lora(int8_llama("quantize", "w8a8"), lora_config(r=4, target_modules=TARGETS))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = train(model, causal_rows())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] != losses[0]
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]) != (".lora_" in name), name
    merged = model.merge_and_unload()
    assert {m.mode for m in merged.modules() if isinstance(m, Int8Linear)} == {"w8a8"}


def test_merge_and_unload_requantizes_dequantized_weight_plus_delta():
    model, _, _ = trained("quantize")
    model = copy.deepcopy(model)
    unmerged = logits(model)
    expected = {}  # layer name -> (W0 + delta, its quantization)
    for name, module in model.get_base_model().named_modules():
        if isinstance(module, Int8LoraLinear):
            target = module.get_base_layer().dequantized_weight() + module.get_delta_weight(
                "default").detach()
            expected[name] = target, quantized(target)
    assert len(expected) == 2 * len(TARGETS)
    assert any(not torch.equal(q.weight, model.get_base_model().get_submodule(n).base_layer.weight)
               for n, (_, q) in expected.items())  # the trained adapter moves the int8 weights

    merged = model.merge_and_unload()
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    for name, (target, rounded) in expected.items():
        layer = merged.get_submodule(name)
        assert type(layer) is Int8Linear, name
        assert torch.equal(layer.weight, rounded.weight), name  # = transfuse.quantize's rounding
        assert torch.equal(layer.weight_scale, rounded.weight_scale), name
        error = (layer.dequantized_weight() - target).abs()
        assert (error <= layer.weight_scale[:, None] * (0.5 + 1e-5)).all(), name
    # the merged model against the adapter it came from differs by the int8 rounding of the
    # merged weights only (measured: 0.6% of the largest logit)
    torch.testing.assert_close(logits(merged), unmerged, rtol=0, atol=2e-2 * unmerged.abs().max())

    # and it is a transfuse int8 model: save_pretrained / from_pretrained give it back
    with tempfile.TemporaryDirectory() as out:
        merged.save_pretrained(out)
        loaded = AutoModelForCausalLM.from_pretrained(out)
    assert set(int8_layers(loaded)) == set(int8_layers(merged))
    assert torch.equal(logits(loaded), logits(merged))


def test_merge_adds_the_lora_bias_and_safe_merge_refuses_non_finite_sums():
    model = with_lora(transfuse.quantize(bert_classifier(), "w8a16"),
                      lora_config(r=2, target_modules=["query"], lora_bias=True,
                                  init_lora_weights=False))  # B and its bias not zero
    layer = model.get_base_model().bert.encoder.layer[0].attention.self.query
    base = layer.get_base_layer()
    before = [t.detach().clone() for t in (base.weight, base.weight_scale, base.bias)]
    with torch.no_grad():
        kept = layer.lora_A["default"].weight[0, 0].item()
        layer.lora_A["default"].weight[0, 0] = float("nan")
        with pytest.raises(ValueError, match="NaN"):
            layer.merge(safe_merge=True)
        layer.lora_A["default"].weight[0, 0] = kept
    assert not layer.merged
    assert all(torch.equal(t, b) for t, b in zip((base.weight, base.weight_scale, base.bias),
                                                  before))
    with torch.no_grad():
        expected = quantized(base.dequantized_weight() + layer.get_delta_weight("default"))
        bias = base.bias + layer.lora_B["default"].bias * layer.scaling["default"]
    merged = model.merge_and_unload().bert.encoder.layer[0].attention.self.query
    assert merged is base
    assert torch.equal(merged.weight, expected.weight)
    assert torch.equal(merged.weight_scale, expected.weight_scale)
    torch.testing.assert_close(merged.bias.detach(), bias)


def test_unmerge_takes_the_adapter_out_within_two_roundings():
    model, _, _ = trained("quantize")
    model = copy.deepcopy(model)
    layers = [m for m in model.modules() if isinstance(m, Int8LoraLinear)]
    original = [m.get_base_layer().dequantized_weight() for m in layers]
    unmerged = logits(model)
    model.merge_adapter()
    merged_scales = [m.get_base_layer().weight_scale.clone() for m in layers]
    assert all(m.merged for m in layers)
    torch.testing.assert_close(logits(model), unmerged, rtol=0, atol=2e-2 * unmerged.abs().max())
    model.unmerge_adapter()
    assert not any(m.merged for m in layers)
    for layer, weight, s1 in zip(layers, original, merged_scales):
        s2 = layer.get_base_layer().weight_scale
        bound = (s1 + s2)[:, None] * (0.5 + 1e-5)
        assert ((layer.get_base_layer().dequantized_weight() - weight).abs() <= bound).all()


def test_adapter_saves_and_reloads_as_peft_does():
    model, _, _ = trained("quantize")
    expected = logits(model)
    with tempfile.TemporaryDirectory() as out:
        model.save_pretrained(out)
        assert set(os.listdir(out)) - {"README.md"} == {"adapter_config.json",
                                                        "adapter_model.safetensors"}
        with open(os.path.join(out, "adapter_config.json")) as f:
            saved = json.load(f)
        assert saved["peft_type"] == "LORA" and sorted(saved["target_modules"]) == sorted(TARGETS)
        with safe_open(os.path.join(out, "adapter_model.safetensors"), "pt") as f:
            keys = sorted(f.keys())
        # the adapter only, under peft's names: no int8 base tensors
        assert len(keys) == 2 * 2 * len(TARGETS), keys
        assert all(k.startswith("base_model.model.") and (".lora_A.weight" in k or ".lora_B.weight"
                                                          in k) for k in keys), keys
        base = int8_llama("quantize")
        loaded = PeftModel.from_pretrained(base, out, config=lora_config(out))
    assert sum(isinstance(m, Int8LoraLinear) for m in loaded.modules()) == 2 * len(TARGETS)
    assert torch.equal(logits(loaded), expected)


def bert_classifier():
    torch.manual_seed(0)
    config = AutoConfig.for_model("bert", vocab_size=VOCAB, num_labels=2,
                                  attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.1,
                                  **ENCODER)
    return AutoModelForSequenceClassification.from_config(config)


# family -> (model builder, rows, patch arguments, LoRA targets, LoRA dropout). Llama runs padding
# removal (LoRA dropout off: its masks over packed tokens cannot equal the padded run's); BERT
# keeps the padded batch, so hidden and LoRA dropout draw the same RNG stream on both sides, and
# its LoRA layers sit where block rules run (Q/K/V projections, residual norm, bias + GELU).
PATCHED = {
    "llama": (lambda: build("llama"), causal_rows, {}, ["q_proj", "v_proj", "gate_proj"], 0.0),
    "bert": (bert_classifier, classifier_rows, {"unpad": False}, ["query", "value", "dense"], 0.1),
}


@pytest.mark.parametrize("family", PATCHED)
def test_lora_on_a_patched_model_trains_like_on_the_unpatched_one(family):
    make, rows, patch_args, targets, dropout = PATCHED[family]
    config = dict(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets)
    expected = train(with_lora(make(), lora_config(**config)), rows())
    patched = transfuse.patch(make(), **patch_args)
    assert transfuse.patched_modules(patched)
    model = with_lora(patched, lora_config(**config))
    actual = train(model, rows())
    assert_losses_equal(actual, expected)
    assert transfuse.patched_modules(model)  # still patched under peft


def test_int8_layers_names_every_int8_layer():
    model = int8_llama("quantize")
    names = int8_layers(model)
    assert len(names) == 2 * 7 and "lm_head" not in names
    peft_model = with_lora(model, lora_config(r=2, target_modules=names))
    assert sum(isinstance(m, Int8LoraLinear) for m in peft_model.modules()) == len(names)


@pytest.mark.parametrize("config,match", [(dict(use_dora=True), "plain LoRA"),
                                          (dict(init_lora_weights="pissa"), "init_lora_weights"),
                                          (dict(init_lora_weights="olora"), "init_lora_weights")])
def test_unsupported_lora_kinds_over_int8_raise(config, match):
    with pytest.raises(ValueError, match=match):
        get_peft_model(int8_llama("quantize"), lora_config(r=2, target_modules=TARGETS, **config))


def test_lora_config_arguments():
    with pytest.raises(TypeError, match="config"):
        lora_config(3)
    config = lora_config(r=2, target_modules=["q_proj"])
    assert lora_config(config) is config
    assert transfuse.hf.lora.lora_config is lora_config  # (imported on first use)
    with pytest.raises(TypeError):
        lora_config(config, r=3)


def test_quantizing_a_model_with_adapters():
    """Adapters over int8: quantizing again (the other mode) leaves lora_A / lora_B float and
    trainable. Adapters over float layers: quantizing raises (quantize first)."""
    model = with_lora(int8_llama("quantize"), lora_config(r=2, target_modules=TARGETS))
    transfuse.patch(model, int8="w8a8")
    assert {m.mode for m in model.modules() if isinstance(m, Int8Linear)} == {"w8a8"}
    adapters = [m for name, m in model.named_modules() if ".lora_" in name
                and isinstance(m, nn.Linear)]
    assert adapters and all(m.weight.requires_grad for m in adapters)
    float_model = with_lora(build("llama"), lora_config(r=2, target_modules=TARGETS))
    with pytest.raises(ValueError, match="quantize the model first"):
        transfuse.quantize(float_model, "w8a16")
