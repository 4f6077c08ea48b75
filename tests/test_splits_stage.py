"""`cli.py splits`: the lists written from label files alone, and eval's round trip through them."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import cli
from pipeline.common import ConfigError
from pipeline.downstream.datasets.registry import load_dataset
from pipeline.downstream.splits import load_split_file, make_split, read_split, sample_fraction
from stages.splits import SplitsConfig


def write_covidx_labels(root: Path, n: int = 150) -> None:
    """COVIDx label files only (no image folders): patients with one to three images."""
    root.mkdir(parents=True)
    classes = ("normal", "pneumonia", "COVID-19")
    train = "".join(f"p{i // 2 + i // 5} img-{i:04d}.png {classes[i % 3]} rsna\n" for i in range(n))
    (root / "train.txt").write_text(train)
    (root / "test.txt").write_text("".join(f"q{i} t-{i:03d}.jpg {classes[i % 3]} cohen\n" for i in range(20)))


def invoke(*args: str):
    return CliRunner().invoke(cli, ["splits", *args], catch_exceptions=False)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_mgca_splits_from_label_files_alone(tmp_path):
    root = tmp_path / "covidx"
    write_covidx_labels(root)
    assert not (root / "train").exists()
    out = tmp_path / "lists"
    res = invoke("--dataset", "covidx", "--task", "cls", "--root", str(root), "--protocol", "mgca",
                 "--fraction", "0.1", "--fraction", "1", "--out", str(out))
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "split.json", "test.txt", "train-frac0.1.txt",
                                                     "train-frac1.txt", "train.txt", "val.txt"]
    spec = load_dataset("covidx", root, "cls", protocol="mgca", require_images=False)
    split = make_split(spec, protocol="mgca")
    for name in ("train", "val", "test"):
        assert lines(out / f"{name}.txt") == split.ids(name)
    assert lines(out / "train-frac0.1.txt") == sample_fraction(split, 0.1, 0, spec)
    assert len(lines(out / "train-frac0.1.txt")) == round(0.1 * 120)  # sample(frac=0.1) of the 80% part
    meta = json.loads((out / "split.json").read_text())
    assert meta["scheme"] == "mgca" and meta["counts"] == {"train": 120, "val": 30, "test": 20}
    assert meta["sha256"]["train"] == hashlib.sha256((out / "train.txt").read_bytes()).hexdigest()
    assert [f["file"] for f in meta["fractions"]] == ["train-frac0.1.txt", "train-frac1.txt"]
    # COVIDx is split 80/20 by image, so patients cross: the command says how many
    crossing = meta["leaks"]["patients"]["train/val"]
    assert crossing == split.leaks["patients"]["train/val"] > 0
    assert f"{crossing} patients in both train and val" in res.output
    # eval's round trip: the folder loads as a split, and its fraction list is MGCA's for every seed
    back = load_split_file(out, load_dataset("covidx", root, "cls", require_images=False))
    assert back.scheme == "mgca" and back.counts() == split.counts()
    assert sample_fraction(back, 0.1, 2) == lines(out / "train-frac0.1.txt")
    assert read_split(out / "split.json").leaks == split.leaks


def test_tool_splits_per_seed_lists_and_rerun_rules(tmp_path):
    root = tmp_path / "covidx"
    write_covidx_labels(root)
    out = tmp_path / "lists"
    args = ["--dataset", "covidx", "--task", "cls", "--root", str(root), "--fraction", "0.1", "--seeds", "0,1",
            "--split-seed", "3", "--out", str(out)]
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    spec = load_dataset("covidx", root, "cls", require_images=False)
    split = make_split(spec, seed=3)
    assert lines(out / "train.txt") == split.train
    for seed in (0, 1):
        assert lines(out / f"train-frac0.1-seed{seed}.txt") == sample_fraction(split, 0.1, seed, spec)
    assert lines(out / "train-frac0.1-seed0.txt") != lines(out / "train-frac0.1-seed1.txt")
    meta = json.loads((out / "split.json").read_text())
    assert meta["scheme"] == "tool" and set(meta["leaks"]["patients"].values()) == {0}
    assert load_split_file(out, spec).train == split.train
    # the same command again rewrites the same files; another configuration is refused ...
    assert invoke(*args).exit_code == 0 and lines(out / "train.txt") == split.train
    other = [a if a != "3" else "4" for a in args]
    res = CliRunner().invoke(cli, ["splits", *other])
    assert res.exit_code == 2 and "another configuration (differs in split_seed)" in res.output
    # ... unless forced, which leaves no list of the old one behind
    forced = ["--dataset", "covidx", "--task", "cls", "--root", str(root), "--fraction", "0.1", "--split-seed", "4",
              "--out", str(out), "--force"]
    assert CliRunner().invoke(cli, ["splits", *forced]).exit_code == 0
    assert sorted(p.name for p in out.glob("train-frac*")) == ["train-frac0.1-seed0.txt"]
    assert lines(out / "train.txt") == make_split(spec, seed=4).train


@pytest.mark.parametrize("extra, message", [
    (["--dataset", "siim", "--task", "cls", "--protocol", "mgca"], "--protocol: MGCA has no split for siim cls"),
    (["--dataset", "covidx", "--task", "cls", "--protocol", "mgca", "--seeds", "0,1"],
     "--seeds: under --protocol mgca"),
    (["--dataset", "covidx", "--task", "cls", "--fraction", "1.5"], "error: --fraction: must be in (0, 1], got 1.5"),
    (["--dataset", "covidx", "--task", "cls", "--fraction", "0.1", "--fraction", "0.1"],
     "error: --fraction: must be distinct values in (0, 1], got [0.1, 0.1]"),
    (["--dataset", "covidx", "--task", "cls", "--seeds", "0,-1"], "error: --seeds: must be >= 0, got -1"),
    (["--dataset", "covidx", "--task", "seg"], "--task: covidx supports cls"),
])
def test_bad_options_are_named(tmp_path, extra, message):
    write_covidx_labels(tmp_path / "root")
    res = CliRunner().invoke(cli, ["splits", "--root", str(tmp_path / "root"), "--out", str(tmp_path / "o"), *extra])
    assert res.exit_code == 2 and message in res.output, res.output


def test_config_checks_dataset_options(tmp_path):
    with pytest.raises(ConfigError, match="dataset_options: dataset 'covidx' has no option"):
        SplitsConfig(dataset="covidx", task="cls", root=str(tmp_path), out=str(tmp_path / "o"),
                     dataset_options=(("frontal_only", "false"),))


def test_an_unfinished_run_does_not_block_another_configuration(tmp_path):
    root = tmp_path / "covidx"
    write_covidx_labels(root, n=40)
    out = tmp_path / "lists"
    base = ["--dataset", "covidx", "--task", "cls", "--root", str(root), "--protocol", "mgca", "--out", str(out)]
    res = CliRunner().invoke(cli, ["splits", *base, "--fraction", "0.01"])  # 1% of 32 images: MGCA keeps 0
    assert res.exit_code == 2 and "takes 0; the dataset is too small" in res.output
    assert not (out / "split.json").exists()
    assert invoke(*base, "--fraction", "0.1").exit_code == 0
    assert sorted(p.name for p in out.glob("train-frac*")) == ["train-frac0.1.txt"]
