"""The `transfuse` command starts fast: `-h` and `bench -h` import neither torch nor the package,
`info` imports torch but not transformers or torch._dynamo (what `import transfuse` costs).
Checked by what a fresh interpreter has imported, not by timing."""
import importlib.metadata
import json
import subprocess
import sys

HEAVY = ("torch", "transformers", "torch._dynamo", "transfuse", "transfuse.ops")


def run_cli(*argv):
    """transfuse_cli.main(argv) in a fresh interpreter: (its stdout, the HEAVY modules it had
    imported at the end)."""
    code = ("import json, sys, transfuse_cli\n"
            "try:\n"
            "    transfuse_cli.main(sys.argv[1:])\n"
            "except SystemExit:\n"
            "    pass\n"
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]), file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", code, *argv], check=True, capture_output=True,
                          text=True)
    return done.stdout, json.loads(done.stderr.splitlines()[-1])


def test_console_script_is_the_module_beside_the_package():
    (script,) = importlib.metadata.entry_points(group="console_scripts", name="transfuse")
    assert script.value == "transfuse_cli:main"


def test_help_imports_nothing_heavy():
    for argv in (["--help"], ["bench", "--help"]):
        out, imported = run_cli(*argv)
        assert "usage: transfuse" in out and imported == [], argv


def test_info_imports_torch_only():
    out, imported = run_cli("info")
    report = json.loads(out)
    assert report["backends"]["reference"]["cpu"] is True
    assert imported == ["torch", "transfuse"]  # the package object, its __init__ not run
