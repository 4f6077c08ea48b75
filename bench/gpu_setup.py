"""Make a bare GPU machine ready for bench/gpu_smoke.sh and bench/gpu.sh, and say what it runs with.

The GPU machines this project borrows have Python, torch, transformers and most of our dependencies,
but not webdataset, braceexpand, pydicom, pycocotools or segmentation-models-pytorch, and no network.
Those arrive as wheels in ``.whl/`` at the repository root (README, "GPU machines", says how to fill
it once). This script installs only what does not import, from ``.whl/`` only (``pip install
--no-index --find-links .whl --no-deps --target SITE``; SITE is on the scripts' PYTHONPATH), then prints
and writes (``OUT/versions.txt``) the versions of Python, torch, CUDA, cuDNN, the card and the packages.

Exit status 1 when a required package is still missing (the message gives the pip download line);
packages needed only by the seg/det evaluations or DICOM readers are optional and only reported.

    python bench/gpu_setup.py --wheels .whl --site /tmp/site --out OUT
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

# import name -> distribution name; required: train-vision cannot stream shards without them.
REQUIRED = {"webdataset": "webdataset", "braceexpand": "braceexpand"}
OPTIONAL = {"pydicom": "pydicom", "pycocotools": "pycocotools",
            "segmentation_models_pytorch": "segmentation-models-pytorch"}
VERSIONS = ("torch", "torchvision", "transformers", "tokenizers", "safetensors", "numpy", "h5py", "pillow",
            "scikit-learn", "torchmetrics", "click", "webdataset", "braceexpand", "pydicom", "pycocotools",
            "segmentation-models-pytorch", "timm")
# The one command that fills .whl/ on a machine with network (README, "GPU machines").
DOWNLOAD = ("python3 -m pip download --only-binary=:all: --no-deps --python-version 3.12 --implementation cp "
            "--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "
            "-d .whl webdataset braceexpand pydicom pycocotools segmentation-models-pytorch")


def importable(module: str) -> bool:
    """Whether ``module`` can be found on the path (without importing it: segmentation-models-pytorch
    would import torch and timm, seconds each time)."""
    importlib.invalidate_caches()
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def ensure_packages(wanted: dict[str, str], wheels: Path, site: Path) -> tuple[list[str], list[str]]:
    """Install the distributions of the modules in ``wanted`` (import name -> distribution) that do not
    import, from the wheels in ``wheels`` into ``site``. Returns ``(installed, still_missing)``
    distribution names. Dependencies are not resolved (``--no-deps``): everything they need is on the
    machine already, and pip with ``--target`` would otherwise reinstall numpy and friends."""
    missing = {m: d for m, d in wanted.items() if not importable(m)}
    if not missing:
        return [], []
    # A wheel's file name starts with its distribution name, normalised, then "-<version>-".
    have = {_norm(p.name.split("-")[0]) for p in wheels.glob("*.whl")} if wheels.is_dir() else set()
    found = [d for d in missing.values() if _norm(d) in have]
    installed: list[str] = []
    if found:
        site.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index",
               "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade", "--find-links", str(wheels),
               "--target", str(site), *found]
        print("installing from", wheels, ":", " ".join(found), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-2000:], file=sys.stderr)
        else:
            installed = found
    env_path = os.environ.get("PYTHONPATH", "")
    if str(site) not in env_path.split(os.pathsep):  # for the programs started after this one
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env_path) if p)
    if str(site) not in sys.path:
        sys.path.insert(0, str(site))
    still = [d for m, d in missing.items() if not importable(m)]
    return installed, still


def dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def describe() -> list[str]:
    """Lines naming the interpreter, torch's CUDA build, the card and the package versions."""
    import torch

    lines = [f"python {platform.python_version()} ({sys.executable}) on {platform.machine()}, "
             f"{os.cpu_count()} CPUs"]
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    lines.append(f"torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}, cuDNN {cudnn or '-'}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i} {p.name}, {p.total_memory / 2 ** 30:.0f} GiB, compute capability "
                         f"{p.major}.{p.minor}, {p.multi_processor_count} SMs")
        smi = shutil.which("nvidia-smi")
        if smi:
            q = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                               text=True)
            if q.returncode == 0 and q.stdout.strip():
                lines.append(f"driver {q.stdout.strip().splitlines()[0]}")
    else:
        lines.append("no CUDA device visible")
    lines.append("packages: " + ", ".join(f"{n} {dist_version(n)}" for n in VERSIONS))
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheels", type=Path, required=True, help="folder of wheels (.whl/ at the repository root)")
    ap.add_argument("--site", type=Path, required=True, help="where missing packages are installed (on PYTHONPATH)")
    ap.add_argument("--out", type=Path, default=None, help="folder for versions.txt")
    args = ap.parse_args(argv)
    installed, missing = ensure_packages(REQUIRED, args.wheels, args.site)
    opt_installed, opt_missing = ensure_packages(OPTIONAL, args.wheels, args.site)
    lines = describe()
    if installed or opt_installed:
        lines.append(f"installed from {args.wheels}: {', '.join(installed + opt_installed)}")
    if opt_missing:
        lines.append(f"not installed (only seg/det evaluation and DICOM readers need them): {', '.join(opt_missing)}")
    for line in lines:
        print(line, flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "versions.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if missing:
        print(f"error: {', '.join(missing)} not installed and not in {args.wheels}/ (no network here). On a machine "
              f"with network, in the repository root: {DOWNLOAD}; then carry .whl with the working tree",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
