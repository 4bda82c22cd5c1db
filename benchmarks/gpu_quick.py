"""The lent GPU's one command (run through benchmarks/gpu_quick.sh); see benchmarks/README.md.

Stages, each writing as it goes under OUT (at most 7 files, no folders):
  results.jsonl  one JSON object per line: environment, each stage's status and time, every
                 check and timing (device, dtype, shape, versions named)
  build.log      CUDA_HOME, arch, the extension build and the import check
  ctest.log      the C++ CUDA tests (CMake, this GPU's arch only)
  kernels.log    each kernel checked against PyTorch, then timed, with its floor; then the
                 models stage (benchmarks/gpu_models.py: whole models, eager / SDPA / patched)
  profile.log    where the models stage's BERT spends its host time (gpu_model_profile.py)
  pytest.log     the `gpu` tests, in stages ordered by value, -x, one shared deadline
  summary.txt    the table printed last
--dry-run (or TRANSFUSE_GPU_QUICK_DRY=1): CPU, tiny shapes, TRITON_INTERPRET=1, checks only (the
interpreter is never timed), build / ctest / pytest stages skipped; seconds.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# a second call in one lease:
#   GPU_QUICK_SKIP=kernels,models,profile,ctest GPU_QUICK_PYTEST=norm,rest
SKIP = set(os.environ.get("GPU_QUICK_SKIP", "").split(",")) - {""}
CTEST_RESERVE_S = 120  # the C++ tests' build and run (measured 38-46 s on the H200 machine)
GRAPH_BELOW_MS = 0.2  # kernels timed through graph replays too (see kernels_stage)
START = time.time()
BUDGET_S = float(os.environ.get("GPU_QUICK_BUDGET_S", 8.5 * 60))   # the whole call
# pytest stages, most valuable first: the CUDA attention paths, the Triton attention that `auto`
# takes for prefill, then each op family; `rest` is every other file's `gpu` tests
FAMILY_STAGES = [
    ("attention-cuda", ["tests/test_attention_cuda.py"]),
    ("attention", ["tests/test_attention.py"]),
    ("norm", ["tests/test_norm.py"]),
    ("int8", ["tests/test_int8.py"]),
]
PYTEST_STAGES = FAMILY_STAGES + [
    ("rest", ["tests"] + [f"--ignore={path}" for _, paths in FAMILY_STAGES for path in paths])]


class Out:
    def __init__(self, path: Path):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.summary = []

    def record(self, **fields):
        fields.setdefault("t_s", round(time.time() - START, 1))
        with open(self.path / "results.jsonl", "a") as f:
            f.write(json.dumps(fields, default=str) + "\n")

    def log(self, name, text):
        with open(self.path / name, "a") as f:
            f.write(text if text.endswith("\n") else text + "\n")

    def line(self, text):
        print(text, flush=True)
        self.summary.append(text)
        with open(self.path / "summary.txt", "a") as f:
            f.write(text + "\n")


def run(cmd, log_path, env=None, timeout=None, cwd=ROOT):
    """cmd's output appended to log_path; -> return code (124 on timeout)."""
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(map(str, cmd))}\n")
        log.flush()
        try:
            return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                  timeout=timeout, cwd=cwd).returncode
        except subprocess.TimeoutExpired:
            log.write(f"TIMEOUT after {timeout} s\n")
            return 124


def left():
    return BUDGET_S - (time.time() - START)


# ------------------------------------------------------------------------------------- build

def find_cuda_home():
    candidates = [os.environ.get("CUDA_HOME", "")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    candidates += sorted(glob.glob("/usr/local/cuda*"), reverse=True)
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").exists():
            return c
    return None


def build(out: Out, env):
    import torch
    cuda_home = find_cuda_home()
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}.{minor}" + ("a" if major == 9 else "")
    out.log("build.log", f"CUDA_HOME={cuda_home} TORCH_CUDA_ARCH_LIST={arch} MAX_JOBS={os.cpu_count()}")
    if cuda_home is None:
        return False, "no nvcc found (CUDA_HOME, PATH, /usr/local/cuda*)", arch, None
    env.update(CUDA_HOME=cuda_home, TORCH_CUDA_ARCH_LIST=arch, MAX_JOBS=str(os.cpu_count()),
               TRANSFUSE_REQUIRE_EXTENSION="1", PATH=f"{cuda_home}/bin:" + env["PATH"])
    rc = run([sys.executable, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps",
              "--no-index", "-e", "."], out.path / "build.log", env=env, timeout=max(60, left()))
    check = ("import transfuse; i = transfuse.info(); print(i); "
             "assert i['extension'] == 'built with CUDA', i['extension']")
    ok = run([sys.executable, "-c", check], out.path / "build.log", env=env, timeout=120) == 0
    why = "" if ok else f"transfuse._C does not import with CUDA (pip exit {rc}); see build.log"
    return ok, why, arch, cuda_home


def ctest(out: Out, env, arch):
    cc = arch.replace(".", "")
    gencode = f"-gencode arch=compute_{cc},code=sm_{cc}"
    log = out.path / "ctest.log"
    steps = [["cmake", "-S", ".", "-B", "build/cmake-gpu", "-G", "Ninja",
              "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_CUDA_COMPILER={env['CUDA_HOME']}/bin/nvcc",
              f"-DTRANSFUSE_CUDA_GENCODE={gencode}"],
             ["cmake", "--build", "build/cmake-gpu", "-j", str(os.cpu_count())],
             ["ctest", "--test-dir", "build/cmake-gpu", "--output-on-failure", "-R", "cuda",
              "-j", "3"]]   # concurrently: test_norm_cuda's float64 host reference takes minutes
    for step in steps:
        rc = run(step, log, env=env, timeout=max(10, left()))
        if rc:
            return rc
    return 0


# ------------------------------------------------------------------------------------- pytest

def pytest_stages(out: Out, env, deadline):
    chosen = os.environ.get("GPU_QUICK_PYTEST")   # e.g. "int8,rest" to rerun what failed
    # Triton's JIT compiles (1-2 s a variant, one core each) are most of the tests' time there:
    # pytest-xdist (in the machine's image) spreads them over the cores
    workers = (["-n", str(min(8, max(1, (os.cpu_count() or 2) // 2)))]
               if importlib.util.find_spec("xdist") else [])
    out.record(stage="pytest", workers=workers)
    for name, paths in PYTEST_STAGES:
        if chosen is not None and name not in chosen.split(","):
            continue
        remaining = deadline - time.time()
        if remaining < 20:
            out.record(stage=f"pytest:{name}", status="not run: deadline")
            out.line(f"pytest {name}: not run (deadline)")
            continue
        t0 = time.time()
        rc = run([sys.executable, "-m", "pytest", "-m", "gpu", "-x", "-q", "-p", "no:cacheprovider",
                  *workers, *paths], out.path / "pytest.log", env=env, timeout=remaining)
        status = {0: "passed", 5: "no gpu tests", 124: "cut by the deadline"}.get(rc, f"failed ({rc})")
        out.record(stage=f"pytest:{name}", status=status, seconds=round(time.time() - t0, 1))
        out.line(f"pytest {name}: {status} in {time.time() - t0:.0f} s")
        if rc not in (0, 5):
            return rc
    return 0


def script_stage(out: Out, env, name, argv, dry, timeout, log="kernels.log"):
    """A stage run as a subprocess (a crash there still leaves the stages after it), its output
    appended to `log`; -> whether it failed."""
    if name in SKIP:
        out.record(stage=name, status="skipped: GPU_QUICK_SKIP")
        return False
    t0 = time.time()
    rc = run([sys.executable, *argv] + (["--dry-run"] if dry else []), out.path / log,
             env=env, timeout=900 if dry else timeout)
    out.record(stage=name, rc=rc, seconds=round(time.time() - t0, 1))
    out.line(f"{name}: {'ok' if rc == 0 else f'FAILED ({rc}), see {log}'} "
             f"in {time.time() - t0:.0f} s")
    return rc != 0


def main(argv):
    dry = "--dry-run" in argv or os.environ.get("TRANSFUSE_GPU_QUICK_DRY") == "1"
    # PYTHONSAFEPATH: the subprocesses run in the repository root, whose kernels/ would otherwise
    # shadow Hugging Face's `kernels` package that transformers imports
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONSAFEPATH="1")
    if dry:
        env["TRITON_INTERPRET"] = "1"
        env.setdefault("CUDA_VISIBLE_DEVICES", "")
    import torch
    device = "cpu" if dry else torch.cuda.get_device_name().replace(" ", "-")
    default = ROOT / "build" / "gpu-dry-run" if dry else ROOT / "benchmarks" / "results" / f"gpu-{device}"
    out = Out(Path(os.environ.get("OUT") or default))
    for name in ("results.jsonl", "summary.txt"):
        (out.path / name).unlink(missing_ok=True)
    out.record(stage="start", dry_run=dry, device=device, python=sys.version.split()[0],
               torch=torch.__version__, cuda=torch.version.cuda, cores=os.cpu_count())
    status = 0
    if not dry:
        if not torch.cuda.is_available():
            out.line("no CUDA GPU visible: use --dry-run on a CPU")
            return 2
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.sm,"
                              "clocks.max.mem,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        out.record(stage="nvidia-smi", text=smi.stdout.strip())
        t0 = time.time()
        ok, why, arch, cuda_home = build(out, env)
        out.record(stage="build", ok=ok, why=why, arch=arch, cuda_home=cuda_home,
                   seconds=round(time.time() - t0, 1))
        out.line(f"build ({arch}): {'ok' if ok else 'FAILED: ' + why} in {time.time() - t0:.0f} s")
        if not ok:
            out.line("stopping: the extension did not build")
            return 1
    else:
        out.record(stage="build", status="skipped: dry run")
    script = [str(Path(__file__).resolve()), "--kernels-stage", str(out.path)]
    status |= script_stage(out, env, "kernels", script, dry, max(60, min(200, left() - 150)))
    script = [str(ROOT / "benchmarks" / "gpu_models.py"), str(out.path)]
    status |= script_stage(out, env, "models", script, dry, max(60, min(150, left() - 150)))
    if not dry:
        # where a patched model's host time goes (a diagnostic: its failure fails nothing)
        script_stage(out, env, "profile", [str(ROOT / "benchmarks" / "gpu_model_profile.py")],
                     dry, max(30, min(90, left() - 240)), log="profile.log")
        # the C++ CUDA tests last: their build compiles attention.cu again (~1.5 min), which
        # the pytest stages leave them unless GPU_QUICK_SKIP names ctest
        reserve = 0 if "ctest" in SKIP else CTEST_RESERVE_S
        status |= pytest_stages(out, env, START + BUDGET_S - reserve) != 0
        if "ctest" in SKIP:
            out.record(stage="ctest", status="skipped: GPU_QUICK_SKIP")
        else:
            t0 = time.time()
            rc = ctest(out, env, arch)
            out.record(stage="ctest", rc=rc, seconds=round(time.time() - t0, 1))
            out.line(f"ctest: {'passed' if rc == 0 else f'FAILED ({rc}), see ctest.log'} "
                     f"in {time.time() - t0:.0f} s")
            status |= rc != 0
    else:
        out.record(stage="pytest", status="skipped: dry run")
        out.record(stage="ctest", status="skipped: dry run")
    out.record(stage="end", status=status, seconds=round(time.time() - START, 1))
    out.line(f"done in {time.time() - START:.0f} s, status {status}; results under {out.path}")
    return int(status)


# ------------------------------------------------------------------------------------ kernels

def kernels_stage(out: Out, dry: bool):
    """Each op checked against PyTorch on the key shapes (tiny ones when dry), then timed (not
    when dry: the interpreter is never timed) with its floor beside it."""
    import torch
    import torch.nn.functional as F
    import transfuse
    from transfuse import reference
    dev = "cpu" if dry else "cuda"
    bf16 = torch.float32 if dry else torch.bfloat16   # the interpreter's bf16 is slow
    backends = ["triton"] if dry else ["cuda", "triton"]
    versions = transfuse.info()["versions"]
    bench = None
    if not dry:
        import triton.testing
        bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        # one call's launch (Python, checks, binding) can outlast a short kernel, and do_bench's
        # events then time the launch: below GRAPH_BELOW_MS the replays of a captured graph too
        graph_bench = lambda fn: triton.testing.do_bench_cudagraph(fn, rep=20,
                                                                   return_mode="median")
        n = 1 << 28
        src = torch.empty(n, dtype=torch.uint8, device=dev); dst = torch.empty_like(src)
        copy_gbs = 2 * n / bench(lambda: dst.copy_(src)) / 1e6
        a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
        mm_tflops = 2 * 8192 ** 3 / bench(lambda: a @ a) / 1e9
        del src, dst, a
        out.record(stage="kernels", case="ceilings", copy_GBps=copy_gbs, bf16_mm_TFLOPs=mm_tflops)
        out.line(f"ceilings: copy {copy_gbs:.0f} GB/s, bf16 matmul {mm_tflops:.0f} TFLOP/s")

    def case(name, shape, dtype, check, timed, flops=0.0, bytes_=0.0):
        row = dict(stage="kernels", case=name, shape=shape, dtype=str(dtype), device=dev,
                   versions=versions)
        try:
            row["max_err"], row["bound"] = check()
            row["check"] = "ok" if row["max_err"] <= row["bound"] else "FAILED"
        except Exception as error:
            row["check"] = f"error: {type(error).__name__}: {error}"[:500]
        if bench is not None and row["check"] == "ok":
            for label, fn in timed().items():
                try:
                    ms = bench(fn)
                    row[f"{label}_ms"] = ms
                    if flops:
                        row[f"{label}_TFLOPs"] = flops / ms / 1e9
                    if bytes_:
                        row[f"{label}_GBps"] = bytes_ / ms / 1e6
                    if ms < GRAPH_BELOW_MS:
                        row[f"{label}_graph_ms"] = graph_bench(fn)
                except Exception as error:
                    row[f"{label}_error"] = f"{type(error).__name__}: {error}"[:300]
            if flops:
                row["floor_ms"] = flops / (mm_tflops * 1e9)
            elif bytes_:
                row["floor_ms"] = bytes_ / (copy_gbs * 1e6)
        out.record(**row)
        figures = " ".join(f"{k}={v:.4g}" for k, v in row.items()
                           if k.endswith(("_ms", "_TFLOPs", "_GBps")))
        out.line(f"{name} {shape}: check {row['check']} {figures}")
        return row["check"] == "ok"

    ok = True
    rel = lambda o, e: ((o.double() - e.double()).norm() / e.double().norm().clamp_min(1e-30)).item()
    # attention forward
    for causal in (False, True):
        B, H, S, D = (1, 2, 64, 32) if dry else (4, 32, 4096, 128)
        q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=bf16) for _ in range(3))
        cs = (1, 2, 64, 32) if dry else (1, 4, 1024, 128)      # checked on a slice
        for backend in backends:
            def check(backend=backend):
                qs, ks, vs = (t[:cs[0], :cs[1], :cs[2]] for t in (q, k, v))
                o = transfuse.ops.attention(qs, ks, vs, causal=causal, backend=backend)
                e = reference.attention(qs.double(), ks.double(), vs.double(), causal=causal)
                p = reference.attention(qs, ks, vs, causal=causal)
                return rel(o, e), 2 * rel(p, e) + 1e-3
            def timed(backend=backend):
                from torch.nn.attention import SDPBackend, sdpa_kernel
                def sdpa():
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                return {backend: lambda: transfuse.ops.attention(q, k, v, causal=causal,
                                                                 backend=backend),
                        "sdpa_flash": sdpa}
            ok &= case(f"attention fwd {'causal' if causal else 'full'} [{backend}]",
                       (B, H, S, D), bf16, check, timed,
                       flops=4 * B * H * S * S * D / (2 if causal else 1))
    # GQA decode, long KV
    B, Hq, Hkv, Skv, D = (1, 4, 2, 300, 32) if dry else (1, 32, 8, 32768, 128)
    q = torch.randn(B, Hq, 1, D, device=dev, dtype=bf16)
    k, v = (torch.randn(B, Hkv, Skv, D, device=dev, dtype=bf16) for _ in range(2))
    for backend in backends:
        def check(backend=backend):
            o = transfuse.ops.attention(q, k, v, causal=True, backend=backend)
            e = reference.attention(q.double(), k.double(), v.double(), causal=True)
            return rel(o, e), 2 * rel(reference.attention(q, k, v, causal=True), e) + 1e-3
        timed = lambda backend=backend: {
            backend: lambda: transfuse.ops.attention(q, k, v, causal=True, backend=backend),
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)}
        ok &= case(f"attention decode GQA [{backend}]", (B, Hq, Hkv, 1, Skv, D), bf16, check,
                   timed, bytes_=2 * k.numel() * k.element_size())
    # varlen
    if hasattr(transfuse.ops, "varlen_attention"):
        g = torch.Generator().manual_seed(0)
        n_seq, H, D = (3, 2, 32) if dry else (32, 16, 128)
        lens = torch.randint(8 if dry else 128, 40 if dry else 4097, (n_seq,), generator=g)
        cu = torch.zeros(n_seq + 1, dtype=torch.int32); cu[1:] = lens.cumsum(0)
        total, mx = int(cu[-1]), int(lens.max())
        q, k, v = (torch.randn(total, H, D, device=dev, dtype=bf16) for _ in range(3))
        cu = cu.to(dev)
        for backend in backends:
            def check(backend=backend):
                o = transfuse.ops.varlen_attention(q, k, v, cu, cu, mx, mx, causal=True,
                                                   backend=backend)
                errs = []
                for i in range(n_seq):
                    s, t = int(cu[i]), int(cu[i + 1])
                    qs, ks, vs = (x[s:t].transpose(0, 1)[None] for x in (q, k, v))
                    e = reference.attention(qs.double(), ks.double(), vs.double(), causal=True)
                    p = reference.attention(qs, ks, vs, causal=True)
                    errs.append((rel(o[s:t].transpose(0, 1)[None], e), 2 * rel(p, e) + 1e-3))
                return max(e for e, _ in errs), min(b for _, b in errs)
            def timed(backend=backend):
                pad = torch.zeros(n_seq, H, mx, D, device=dev, dtype=bf16)
                return {backend: lambda: transfuse.ops.varlen_attention(
                            q, k, v, cu, cu, mx, mx, causal=True, backend=backend),
                        "sdpa_padded": lambda: F.scaled_dot_product_attention(
                            pad, pad, pad, is_causal=True)}
            flops = sum(4 * H * D * int(n) * int(n) / 2 for n in lens)
            ok &= case(f"varlen attention causal [{backend}]", (n_seq, H, D, total), bf16,
                       check, timed, flops=flops)
    else:
        out.record(stage="kernels", case="varlen attention", status="skipped: no "
                   "transfuse.ops.varlen_attention")
        out.line("varlen attention: skipped (transfuse.ops.varlen_attention missing)")
    # norms with residual
    R, C = (8, 64) if dry else (4096, 4096)
    x, r = (torch.randn(R, C, device=dev, dtype=bf16) for _ in range(2))
    w, b = (torch.randn(C, device=dev, dtype=bf16) for _ in range(2))
    for op in ("layer_norm", "rms_norm"):
        for backend in backends:
            def call(backend=backend, op=op, x=x):
                if op == "layer_norm":
                    return transfuse.ops.layer_norm(x, w, b, residual=r, backend=backend)
                return transfuse.ops.rms_norm(x, w, residual=r, backend=backend)
            def check(call=call, op=op):
                y, _ = call()
                fn = getattr(reference, op)
                args = (w.double(), b.double()) if op == "layer_norm" else (w.double(),)
                e, _ = fn(x.double(), *args, residual=r.double())
                pa = (w, b) if op == "layer_norm" else (w,)
                p, _ = fn(x, *pa, residual=r)
                return rel(y, e), 2 * rel(p, e) + 1e-3
            eager = (lambda: F.layer_norm(x + r, (C,), w, b)) if op == "layer_norm" else \
                (lambda: reference.rms_norm(x, w, residual=r))
            ok &= case(f"{op} + residual [{backend}]", (R, C), bf16, check,
                       lambda call=call, eager=eager: {backend: call, "eager": eager},
                       bytes_=4 * x.numel() * x.element_size())
    def elementwise(name, inputs, eager, bytes_):
        """transfuse.ops.<name> against reference.<name> (float64, and at bf16 for the bound),
        timed against `eager`."""
        op, exact = getattr(transfuse.ops, name), getattr(reference, name)
        ok = True
        for backend in backends:
            def check(backend=backend):
                e = exact(*(t.double() for t in inputs))
                return rel(op(*inputs, backend=backend), e), 2 * rel(exact(*inputs), e) + 1e-3
            timed = lambda backend=backend: {
                backend: lambda: op(*inputs, backend=backend), "eager": lambda: eager(*inputs)}
            ok &= case(f"{name} [{backend}]", tuple(inputs[0].shape), bf16, check, timed,
                       bytes_=bytes_)
        return ok

    # bias + GELU, the epilogue of BERT's intermediate linear layer
    R, C = (8, 64) if dry else (8192, 4096)
    x = torch.randn(R, C, device=dev, dtype=bf16)
    b = torch.randn(C, device=dev, dtype=bf16)
    ok &= elementwise("bias_gelu", (x, b), lambda x, b: F.gelu(x + b),
                      2 * x.numel() * x.element_size())
    # act(gate) * up over the halves of a joint gate-up GEMM's output (SwiGLU, GeGLU MLPs)
    gate_up = torch.randn(R, 2 * C, device=dev, dtype=bf16)
    gate, up = gate_up[:, :C], gate_up[:, C:]
    ok &= elementwise("silu_mul", (gate, up), lambda gate, up: F.silu(gate) * up,
                      3 * gate.numel() * gate.element_size())
    ok &= elementwise("gelu_mul", (gate, up), lambda gate, up: F.gelu(gate) * up,  # GeGLU
                      3 * gate.numel() * gate.element_size())
    # rotary embedding of a prefill's q and k (8B-model shape: 32 query and 8 key heads of 128)
    B, S, HQ, HK, D = (2, 5, 4, 2, 16) if dry else (4, 2048, 32, 8, 128)
    q = torch.randn(B, S, HQ, D, device=dev, dtype=bf16).transpose(1, 2)
    k = torch.randn(B, S, HK, D, device=dev, dtype=bf16).transpose(1, 2)
    angle = torch.randn(B, S, D // 2, device=dev)
    cos, sin = (torch.cat([f(angle)] * 2, dim=-1).to(bf16) for f in (torch.cos, torch.sin))

    def eager_rotary():  # transformers' apply_rotary_pos_emb
        c, n = cos.unsqueeze(1), sin.unsqueeze(1)
        half = lambda x: torch.cat((-x[..., D // 2:], x[..., :D // 2]), dim=-1)
        return q * c + half(q) * n, k * c + half(k) * n
    for backend in backends:
        def check(backend=backend):
            got = transfuse.ops.rotary(q, k, cos, sin, backend=backend)
            exact = reference.rotary(q.double(), k.double(), cos.double(), sin.double())
            plain = reference.rotary(q, k, cos, sin)
            return (max(rel(g, e) for g, e in zip(got, exact)),
                    2 * max(rel(p, e) for p, e in zip(plain, exact)) + 1e-3)
        timed = lambda backend=backend: {
            backend: lambda: transfuse.ops.rotary(q, k, cos, sin, backend=backend),
            "eager": eager_rotary}
        ok &= case(f"rotary [{backend}]", (B, HQ, HK, S, D), bf16, check, timed,
                   bytes_=2 * (q.numel() + k.numel()) * q.element_size())
    # int8
    for mode, (m, n_, k_) in (("w8a8", (8, 64, 96) if dry else (4096, 4096, 4096)),
                              ("w8a16", (1, 64, 96) if dry else (1, 4096, 4096))):
        xa = torch.randn(m, k_, device=dev, dtype=bf16)
        wq, ws = reference.quantize_per_token(torch.randn(n_, k_) * 0.05)
        wq, ws = wq.to(dev), ws.to(dev)
        wf = (wq.float() * ws[:, None]).to(bf16)
        for backend in backends:
            def check(backend=backend, mode=mode, xa=xa, wq=wq, ws=ws):
                o = transfuse.ops.int8_linear(xa, wq, ws, None, mode, backend=backend)
                e = reference.int8_linear(xa.double() if mode == "w8a16" else xa, wq, ws, None,
                                          mode).double()
                return rel(o, e), 1e-2
            def timed(backend=backend, mode=mode, xa=xa, wq=wq, ws=ws, wf=wf):
                t = {backend: lambda: transfuse.ops.int8_linear(xa, wq, ws, None, mode,
                                                                backend=backend),
                     "bf16_linear": lambda: F.linear(xa, wf)}
                if mode == "w8a8":
                    xq = torch.randint(-127, 128, xa.shape, dtype=torch.int8, device=dev)
                    t["torch_int_mm"] = lambda: torch._int_mm(xq, wq.t())
                return t
            ok &= case(f"int8 {mode} [{backend}]", (m, n_, k_), bf16, check, timed,
                       flops=2 * m * n_ * k_ if mode == "w8a8" else 0.0,
                       bytes_=0.0 if mode == "w8a8" else wq.numel())
    if not dry:
        ok &= int8_tile_sweep(out, bench)
    return 0 if ok else 1


# Tiles (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) tried for the large-m row of
# kernels/int8.py's INT8_CONFIGS (the first is today's); shared memory per stage is
# (BLOCK_M + BLOCK_N) * BLOCK_K bytes, 228 KiB on Hopper.
INT8_TILES = ((128, 128, 128, 8, 3), (128, 128, 128, 4, 4), (128, 256, 128, 8, 3),
              (256, 128, 128, 8, 3), (128, 256, 128, 8, 4), (128, 256, 64, 8, 4),
              (256, 128, 64, 8, 4))


def int8_tile_sweep(out: Out, bench, size=4096, device="cuda"):
    """The Triton w8a8 GEMM (int8 x int8 -> bf16 with its epilogue; quantization not included)
    at size^3 with each of INT8_TILES, each output checked bit for bit against today's tiles;
    -> whether none differed."""
    import math
    import torch
    from transfuse.kernels import int8 as tint8
    m = n = k = size
    x_q, w = (torch.randint(-127, 128, (r, k), dtype=torch.int8, device=device) for r in (m, n))
    x_scale, w_scale = torch.rand(m, device=device) / 100, torch.rand(n, device=device) / 100
    gemm = lambda: tint8.int8_linear_w8a8(x_q, x_scale, w, w_scale, None, torch.bfloat16)
    expected, default, wrong = gemm(), tint8.INT8_CONFIGS, False
    for tiles in INT8_TILES:
        row = dict(stage="kernels", case="int8 w8a8 GEMM tiles [triton]", shape=(m, n, k),
                   tiles=tiles)
        tint8.INT8_CONFIGS = default[:-1] + ((math.inf, *tiles),)
        try:  # (a tile over this GPU's shared memory raises: a candidate to drop, not a bug)
            row["check"] = "ok" if torch.equal(gemm(), expected) else "FAILED"
            if row["check"] == "ok":
                row["ms"] = bench(gemm)
                row["TOPS"] = 2 * m * n * k / row["ms"] / 1e9
        except Exception as error:
            row["check"] = f"error: {type(error).__name__}: {error}"[:300]
        finally:
            tint8.INT8_CONFIGS = default
        out.record(**row)
        out.line(f"int8 GEMM tiles {tiles}: {row['check']} " + (
            f"{row['ms']:.4g} ms, {row['TOPS']:.0f} TOPS" if "TOPS" in row else ""))
        wrong |= row["check"] == "FAILED"
    return not wrong


if __name__ == "__main__":
    if "--kernels-stage" in sys.argv:
        path = Path(sys.argv[sys.argv.index("--kernels-stage") + 1])
        sys.exit(kernels_stage(Out(path), "--dry-run" in sys.argv))
    sys.exit(main(sys.argv[1:]))
