"""Fine-tuning with transformers.Trainer: a patched model trains as the unpatched one does, step by
step, and a LoRA-style adapter trains over an int8-quantized base."""
import tempfile

import pytest
import torch
from torch import nn

import transfuse

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from hf_models import ENCODER, VOCAB  # noqa: E402
from transformers import (AutoConfig, AutoModelForSequenceClassification, Trainer,  # noqa: E402
                          TrainerCallback, TrainingArguments)

STEPS = 20


def classifier(hidden_dropout=0.1):
    """A tiny BERT classifier; attention dropout off (transfuse draws its own dropout masks, which
    cannot equal eager's). Hidden dropout draws the same torch RNG stream on both sides only when
    both run the padded batch (padding removal runs it on the real tokens alone)."""
    torch.manual_seed(0)
    config = AutoConfig.for_model("bert", vocab_size=VOCAB, num_labels=2,
                                  attention_probs_dropout_prob=0.0,
                                  hidden_dropout_prob=hidden_dropout, **ENCODER)
    return AutoModelForSequenceClassification.from_config(config)


def dataset():
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, VOCAB, (12,), generator=g),
             "attention_mask": torch.ones(12, dtype=torch.long), "labels": torch.tensor(i % 2)}
            for i in range(4 * STEPS)]
    for row in rows[::3]:
        row["attention_mask"][8:] = 0  # padded sequences
    return rows


class _Losses(TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def train(model):
    """Per-step training losses of STEPS Trainer steps."""
    record = _Losses()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(out, max_steps=STEPS, per_device_train_batch_size=4,
                                 logging_steps=1, learning_rate=1e-3, seed=0, data_seed=0,
                                 report_to=[], save_strategy="no", use_cpu=True,
                                 disable_tqdm=True, dataloader_num_workers=0)
        Trainer(model, args, train_dataset=dataset(), callbacks=[record]).train()
    assert len(record.losses) == STEPS
    return record.losses


@pytest.mark.parametrize("unpad,dropout", [(False, 0.1), (True, 0.0)],
                         ids=["padded-dropout", "unpadded"])
def test_patched_classifier_trains_like_the_unpatched_one(unpad, dropout):
    expected = train(classifier(dropout))
    actual = train(transfuse.patch(classifier(dropout), unpad=unpad))
    assert max(abs(a - e) for a, e in zip(actual, expected)) < 1e-4, (actual, expected)


class LowRankAdapter(nn.Module):
    """base(x) + x A^T B^T with A [rank, in], B [out, rank] (B starts at zero, as LoRA)."""

    def __init__(self, base, in_features, out_features, rank=4):
        super().__init__()
        self.base = base
        self.a = nn.Parameter(torch.randn(rank, in_features) * 0.1)
        self.b = nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, x):
        return self.base(x) + (x @ self.a.T) @ self.b.T


def with_adapters(model):
    for param in model.parameters():
        param.requires_grad_(False)
    torch.manual_seed(1)
    for layer in model.bert.encoder.layer:
        for name in ("query", "value"):
            base = getattr(layer.attention.self, name)
            size = base.in_features
            setattr(layer.attention.self, name, LowRankAdapter(base, size, base.out_features))
    return model


def test_adapter_over_an_int8_base_trains_like_over_its_dequantized_weights():
    quantized = transfuse.quantize(classifier(), "w8a16")
    dequantized = classifier()
    for name, module in quantized.named_modules():
        if isinstance(module, transfuse.nn.Int8Linear):
            plain = dequantized.get_submodule(name)
            plain.weight.data.copy_(module.dequantized_weight())
    int8_before = {k: v.clone() for k, v in quantized.state_dict().items()}
    expected = train(with_adapters(dequantized))
    actual = train(with_adapters(quantized))
    assert max(abs(a - e) for a, e in zip(actual, expected)) < 1e-4, (actual, expected)
    assert actual[-1] != actual[0]
    for name, value in quantized.state_dict().items():
        if name.replace(".base.", ".") in int8_before and ".base." in name:
            assert torch.equal(value, int8_before[name.replace(".base.", ".")]), name
