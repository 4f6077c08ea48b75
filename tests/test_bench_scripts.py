"""The GPU scripts (bench/gpu_smoke.sh, bench/gpu.sh) as CI can check them without a GPU: their dry runs
execute the same commands on the CPU, so a syntax error, a wrong flag, a missing import or a wrong path
fails here instead of on a borrowed GPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from bench import gpu_setup
from bench.gpu_bench import format_table
from bench.gpu_common import Runner
from bench.gpu_smoke import Smoke
from tests._scratch import scratch

REPO = Path(__file__).resolve().parents[1]
SMOKE_CHECKS = ["data", "text-model", "embed-text", "train-bf16", "train-fp16", "train-online", "no-sync",
                "device-check", "pytest-cuda", "eval-cls"]
# What the GPU machines lack (bench/gpu_setup.py installs them from .whl/).
ABSENT_ON_GPU_MACHINE = ["webdataset", "braceexpand", "pydicom", "pycocotools", "segmentation_models_pytorch"]


def script_env(out: Path, work: Path, **extra) -> dict:
    env = dict(os.environ, PY=sys.executable, MFLAG_BENCH_OUT=str(out), MFLAG_BENCH_WORK=str(work), **extra)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    return env


@pytest.fixture(scope="module")
def bench_dirs(tmp_path_factory):
    """One work folder for both dry runs, as bench/gpu_all.sh shares it (gpu.sh reuses the data)."""
    with scratch(tmp_path_factory, "gpu-bench") as root:  # ~3 GB
        yield root / "out", root / "work"


def test_bench_programs_compile_and_shell_scripts_parse():
    for path in sorted((REPO / "bench").glob("*.py")):
        compile(path.read_text(encoding="utf-8"), str(path), "exec")  # SyntaxError names file and line
    for path in sorted((REPO / "bench").glob("*.sh")):
        proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, (path.name, proc.stderr)


@pytest.mark.slow
def test_gpu_smoke_dry_run_passes(bench_dirs):
    out, work = bench_dirs
    proc = subprocess.run(["bash", "bench/gpu_smoke.sh", "--dry-run"], cwd=REPO, env=script_env(out, work),
                          capture_output=True, text=True, timeout=3000)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines[-1] == "GPU SMOKE: PASS (dry run on the CPU)", \
        proc.stdout[-4000:] + proc.stderr[-2000:]
    report = json.loads((out / "smoke.json").read_text())
    assert [c["name"] for c in report["checks"]] == SMOKE_CHECKS
    assert {c["status"] for c in report["checks"]} == {"pass"}
    train = next(c for c in report["checks"] if c["name"] == "train-bf16")["figures"]
    assert train["precision"] == "fp32" and train["windows"] >= 1  # --precision auto on the CPU
    versions = (out / "versions.txt").read_text()
    assert f"python {sys.version.split()[0]}" in versions and "torch " in versions
    assert "$ " in (out / "smoke.log").read_text()  # every command is logged


@pytest.mark.slow
def test_gpu_bench_dry_run_prints_one_table(bench_dirs):
    out, work = bench_dirs
    proc = subprocess.run(["bash", "bench/gpu.sh", "--dry-run", "--compile"], cwd=REPO, env=script_env(out, work),
                          capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert not [r for r in rows if "error" in r]
    assert {r["bench"] for r in rows} == {"train_vision", "train_step", "embed_text", "orth_loss", "loader"}
    whats = [r["what"] for r in rows]
    assert any("--compile" in w for w in whats) and any("batched CPU warp" in w for w in whats)
    assert any(w.startswith("CPU fp32 reports/s") for w in whats)  # the device run of embed_text, on the CPU
    table = (out / "table.md").read_text()
    assert table.count("\n| ") == len(rows) + 1 and table in proc.stdout  # header + one line per figure


def test_gpu_all_runs_both_scripts_with_the_same_folders(tmp_path):
    """bench/gpu_all.sh with a stand-in Python that records its calls: both scripts start, in order, on
    files that exist, with --dry-run passed on and one shared work folder."""
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        [ -f "$1" ] || {{ echo "no such script: $1" >&2; exit 3; }}
        echo "$(basename "$1") $MFLAG_BENCH_WORK $*" >> {calls}
        """))
    fake.chmod(0o755)
    env = dict(os.environ, PY=str(fake), TMPDIR=str(tmp_path))
    env.pop("MFLAG_BENCH_WORK", None)
    env.pop("MFLAG_BENCH_OUT", None)
    proc = subprocess.run(["bash", "bench/gpu_all.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [ln.split() for ln in calls.read_text().splitlines()]
    assert [ln[0] for ln in lines] == ["gpu_setup.py", "gpu_smoke.py", "gpu_setup.py", "gpu_bench.py"]
    assert len({ln[1] for ln in lines}) == 1  # one work folder for both
    assert "--dry-run" in lines[1] and "--dry-run" in lines[3]
    bad = subprocess.run(["bash", "bench/gpu_all.sh", "--compile"], cwd=REPO, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument --compile" in bad.stderr


@pytest.mark.slow
def test_a_failed_check_is_named_on_the_last_line(tmp_path, capsys):
    smoke = Smoke(tmp_path / "out", tmp_path / "work", dry=True, compile_=False)
    (tmp_path / "out").mkdir()
    smoke.run = Runner(tmp_path / "out" / "smoke.log", timeout=300)
    smoke.checks = [("fine", lambda: {"x": 1}, ()),
                    ("bad-flag", lambda: smoke.run.cli("train-vision", "--no-such-flag", "1"), ("fine",)),
                    ("after", lambda: {}, ("bad-flag",))]
    assert smoke.main(budget=None) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("GPU SMOKE: FAIL (bad-flag: `python cli.py train-vision --no-such-flag ...` exited 2")
    assert "No such option '--no-such-flag'" in last and "after: needs bad-flag" in last
    report = json.loads((tmp_path / "out" / "smoke.json").read_text())
    assert [c["status"] for c in report["checks"]] == ["pass", "fail", "skipped"]


def test_table_shows_ratios_values_and_failures():
    rows = [{"bench": "loader", "what": "CPU ms/img", "ratio": 4.0, "target": 2, "ours_ms": 0.19},
            {"bench": "train_vision", "what": "img/s", "ratio": None, "value": 4100.5, "unit": "img/s",
             "target": None, "data_wait": 0.01},
            {"bench": "embed_text", "what": "reports/s", "error": "`python bench/embed_text.py` timed out after 240 s"}]
    table = format_table(rows, ["cuda:0 NVIDIA H200"], "bench/gpu.sh")
    assert "| loader | CPU ms/img | 4.00x | >= 2x | ours_ms 0.19 |" in table
    assert "| train_vision | img/s | 4100.5 img/s |  | data_wait 0.01 |" in table
    assert "**`python bench/embed_text.py` timed out after 240 s**" in table and "- cuda:0 NVIDIA H200" in table


def _fake_wheel(folder: Path, name: str = "mflag_fake_wheel_pkg") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{name}-0.1.dist-info"
    files = {f"{name}/__init__.py": "VALUE = 42\n",
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: 0.1\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{dist}/RECORD"] = "".join(f"{k},,\n" for k in [*files, f"{dist}/RECORD"])
    path = folder / f"{name}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for k, v in files.items():
            z.writestr(k, v)
    return path


def test_setup_installs_only_what_is_missing_from_the_wheels(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setattr(sys, "path", list(sys.path))
    wheels, site = tmp_path / ".whl", tmp_path / "site"
    _fake_wheel(wheels)
    wanted = {"mflag_fake_wheel_pkg": "mflag-fake-wheel-pkg", "json": "json-is-there"}
    installed, missing = gpu_setup.ensure_packages(wanted, wheels, site)
    assert installed == ["mflag-fake-wheel-pkg"] and missing == []  # json imports: nothing to do for it
    probe = subprocess.run([sys.executable, "-c", "import mflag_fake_wheel_pkg as m; print(m.VALUE)"],
                           env=dict(os.environ), capture_output=True, text=True)
    assert probe.stdout.strip() == "42"  # PYTHONPATH now holds the site folder
    assert gpu_setup.ensure_packages(wanted, wheels, site) == ([], [])  # a second run installs nothing


def test_setup_fails_with_the_download_line_when_a_required_wheel_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(gpu_setup, "REQUIRED", {"mflag_not_a_module_xyz": "mflag-not-a-module-xyz"})
    monkeypatch.setattr(gpu_setup, "OPTIONAL", {})
    assert gpu_setup.main(["--wheels", str(tmp_path / ".whl"), "--site", str(tmp_path / "site"),
                           "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "mflag-not-a-module-xyz not installed" in err and "pip download --only-binary=:all:" in err
    assert "--python-version 3.12" in err and "webdataset braceexpand pydicom pycocotools" in err
    assert (tmp_path / "out" / "versions.txt").read_text().startswith("python ")


BLOCKED_RUNNER = textwrap.dedent("""
    import contextlib, io, runpy, sys
    for name in sys.argv[1].split(","):
        sys.modules[name] = None  # import raises ModuleNotFoundError, as on the GPU machine
    results = {}
    for cmd in sys.argv[2:]:
        path, *args = cmd.split(" ")
        sys.argv = [path, *args]
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                runpy.run_path(path, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code or 0
        results[cmd] = (code, buf.getvalue()[:200])
    from pipeline.pretrain import wds
    from pipeline.common import MflagError
    try:
        wds.train_pipeline(["x.tar"], wds.StreamState(), None, 2, 32)
        results["train_pipeline"] = (0, "built")
    except MflagError as e:
        results["train_pipeline"] = (2, str(e))
    import json
    print("RESULTS " + json.dumps(results))
""")


@pytest.mark.slow
def test_entry_points_work_without_the_packages_a_gpu_machine_lacks(tmp_path):
    """With webdataset, braceexpand, pydicom, pycocotools and segmentation-models-pytorch unimportable:
    the benchmarks and train-vision start, synth chexpert writes its data, and building a stream fails
    with one message saying how to install webdataset."""
    cmds = ["cli.py train-vision --help", "cli.py embed-text --help", "cli.py eval --help",
            "bench/train_step.py --help", "bench/loader.py --help", "bench/embed_text.py --help",
            "bench/orth_loss.py --help", "bench/gpu_smoke.py --help", "bench/gpu_bench.py --help",
            f"cli.py -q synth chexpert --out {tmp_path / 'chexpert'} --n 6 --image-size 32"]
    proc = subprocess.run([sys.executable, "-c", BLOCKED_RUNNER, ",".join(ABSENT_ON_GPU_MACHINE), *cmds], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.split("RESULTS ", 1)[1])
    for cmd in cmds:
        assert results[cmd][0] == 0, (cmd, results[cmd])
    assert (tmp_path / "chexpert" / "train.csv").is_file()
    code, msg = results["train_pipeline"]
    assert code == 2 and "webdataset is not installed" in msg and "--find-links .whl" in msg
