"""splits stage: a dataset's train/val/test lists and label-fraction lists, from its label files alone.

Users inspect, share and pass the folder to ``eval --split-file``. No image needs to exist: the
dataset is read with ``require_images=False`` (where images are there, the readers still read what
they need from them, e.g. SIIM's patient ids from the DICOM headers).

- ``protocol="mgca"``: MGCA's lists id for id (``pipeline.downstream.mgca_splits``), and one training list per
  fraction shared by all seeds, ``train-frac<F>.txt``.
- ``protocol="tool"``: the split eval generates with ``--split-seed`` (identical when every labelled
  image is on disk; eval skips missing images), and the per-seed lists eval draws,
  ``train-frac<F>-seed<S>.txt`` for each of ``seeds``.

Outputs in OUT, each written under a temporary name and moved into place: ``config.json`` first; the
fraction lists; ``train.txt``, ``val.txt``, ``test.txt``; ``split.json`` last (counts, sha256 of every
list, the fraction files, and the patients and images two lists share). A folder holds one
configuration: a rerun with the same one rewrites the same files; another one is refused without
``force`` (which removes the previous lists first) rather than mixing lists of two configurations,
unless the earlier run did not finish (no split.json), whose files are then removed.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from pipeline.common import ConfigError, MflagError, config_to_dict, read_json, save_config
from pipeline.downstream.datasets.registry import (
    PROTOCOLS,
    check_options,
    dataset_names,
    dataset_tasks,
    load_dataset,
    mgca_pairs,
    trained_tasks,
)
from pipeline.downstream.splits import make_split, sample_fraction, split_summary, write_fraction, write_split
from pipeline.options import check_fields, option

log = logging.getLogger(__name__)

DEFAULT_FRACTIONS = (0.01, 0.1, 1.0)


@dataclasses.dataclass(frozen=True)
class SplitsConfig:
    """Options of ``splits`` (each field is the option of the same name, pipeline.options).
    ``seeds`` and ``split_seed`` apply to ``protocol="tool"`` only (MGCA's split and lists have fixed
    random states). ``dataset_options``: (name, value) pairs for the dataset reader, as for eval."""

    # choices are read from the registries when needed: the datasets (datasets.registry.DATASETS) and the
    # trained tasks that read one (pipeline.downstream.TASKS)
    dataset: str = option(help="Downstream dataset whose label files are split.", choices=dataset_names)
    task: str = option(help="The eval task the split is for (RSNA's MGCA split differs between cls and det/seg).",
                       choices=trained_tasks)
    root: str = option(help="Dataset folder in its published layout, as for eval; only the label files are needed.",
                       exists="dir")
    out: str = option(help="Folder for train.txt, val.txt, test.txt, split.json and train-frac<F>[-seed<S>].txt; "
                           "pass it to eval --split-file.", path="dir")
    protocol: str = option("tool", help="mgca: MGCA's published lists id for id (docs/PROTOCOLS.md); tool: the "
                                        "patient-disjoint split eval generates.", choices=PROTOCOLS)
    fractions: tuple[float, ...] = option(DEFAULT_FRACTIONS, names=("--fraction",), repeat=True, min=0, min_open=True,
                                          max=1, help="Label fraction to write a training list for, repeatable.")
    seeds: tuple[int, ...] = option((0,), min=0, help="tool only: comma-separated seeds, one list per fraction and "
                                                      "seed (mgca: one list for all).")
    split_seed: int = option(0, help="tool only: seed of the split, as eval's --split-seed.")
    dataset_options: tuple[tuple[str, Any], ...] = option(
        (), names=("--dataset-option",),
        help="Reader option, repeatable, as for eval (e.g. frontal_only=false, train_file=train_COVIDx9A.txt).")
    force: bool = option(False, negatable=False, help="Replace the lists of another configuration in OUT.")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.task not in dataset_tasks(self.dataset):
            raise ConfigError(f"task: {self.dataset} supports {', '.join(dataset_tasks(self.dataset))}, "
                              f"not {self.task!r}")
        if self.protocol == "mgca" and (self.dataset, self.task) not in mgca_pairs():
            raise ConfigError(f"protocol: MGCA has no split for {self.dataset} {self.task} (it has "
                              f"{', '.join(f'{d} {t}' for d, t in mgca_pairs())}); use --protocol tool")
        if not self.fractions:
            raise ConfigError("fractions: give at least one fraction")
        if len(set(self.fractions)) != len(self.fractions):
            raise ConfigError(f"fractions: must be distinct values in (0, 1], got {list(self.fractions)}")
        if not self.seeds:
            raise ConfigError("seeds: give at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: must be distinct non-negative integers, got {list(self.seeds)}")
        if self.protocol == "mgca" and self.seeds != (0,):
            raise ConfigError("seeds: under --protocol mgca one list per fraction serves every seed; drop --seeds")
        if self.protocol == "mgca" and self.split_seed != 0:
            raise ConfigError("split_seed: MGCA's split has fixed random states; drop --split-seed")
        if not Path(self.root).is_dir():
            raise ConfigError(f"root: {self.root} is not a directory")
        try:  # reader options are checked here, before any data is read (names and types only)
            check_options(self.dataset, dict(self.dataset_options))
        except MflagError as e:
            raise ConfigError(f"dataset_options: {e}") from e


@dataclasses.dataclass
class SplitsResult:
    out: Path
    summary: dict               # pipeline.downstream.splits.split_summary of the split written
    fraction_files: list[dict]  # write_fraction entries, as in split.json


def _same_config(a: dict, b: dict) -> bool:
    drop = ("force", "out")
    return {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}


def _clear(out: Path, cfg: SplitsConfig) -> None:
    """Refuse a folder holding another configuration's finished lists (with ``force``, or when that
    run did not finish, remove them first)."""
    previous = out / "config.json"
    if not previous.is_file():
        return
    old = (read_json(previous) or {}).get("config", {})
    if _same_config(old, config_to_dict(cfg)):
        return  # the same lists are written again under the same names
    complete = (out / "split.json").is_file()  # written last: without it the earlier run did not finish
    if complete and not cfg.force:
        changed = sorted(k for k in set(old) | set(config_to_dict(cfg)) if k not in ("force", "out")
                         and old.get(k) != config_to_dict(cfg).get(k))
        raise MflagError(f"{out} holds the lists of another configuration (differs in {', '.join(changed)}); "
                         f"use another --out, or --force to replace them")
    names = ["split.json", "train.txt", "val.txt", "test.txt", "config.json"]
    removed = [p for p in out.glob("train-frac*.txt")] + [out / n for n in names if (out / n).is_file()]
    for p in removed:
        p.unlink()
    log.info("%s: removed %d file(s) of the previous configuration", out, len(removed))


def run(cfg: SplitsConfig) -> SplitsResult:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _clear(out, cfg)
    save_config(cfg, out, stage="splits")
    spec = load_dataset(cfg.dataset, cfg.root, cfg.task, protocol=cfg.protocol, require_images=False,
                        **dict(cfg.dataset_options))
    split = make_split(spec, seed=cfg.split_seed, protocol=cfg.protocol)
    files: list[dict] = []
    lists: dict[str, list[str]] = {}
    seeds = (None,) if cfg.protocol == "mgca" else cfg.seeds
    for f in cfg.fractions:
        for s in seeds:
            ids = sample_fraction(split, f, 0 if s is None else s, spec=spec)
            entry = write_fraction(ids, out, f, s, protocol=cfg.protocol)
            files.append(entry)
            lists[entry["file"]] = ids
    write_split(split, out, fraction_files=files)
    summary = split_summary(split, spec, lists)
    summary["dataset_counts"] = dict(spec.counts)
    log.info("%s %s (%s): train %d, val %d, test %d images; %d fraction list(s) in %s", cfg.dataset, cfg.task,
             cfg.protocol, *split.counts().values(), len(files), out)
    return SplitsResult(out=out, summary=summary, fraction_files=files)
