"""eval stage: train a cls/seg/det head on a downstream dataset over an encoder, report test metrics;
or, for the tasks that train nothing (zero-shot classification, retrieval: ``pipeline.downstream``'s
registry marks them), score images against texts through a pre-training run's projector and text head.

Protocol (``--protocol``, docs/PROTOCOLS.md): ``mgca`` reproduces MGCA's published downstream recipe
(the one the M-FLAG paper's tables follow), ``tool`` is this tool's own. Either way:
- One split (train/val/test ids) per run, shared by all seeds. Seeds vary the head's initialisation,
  the data order and augmentation (and, for ``--init random``, the random encoder); under ``tool``
  also the training fraction, which ``mgca`` draws once for all seeds.
- Early stopping on the validation split; test metrics and predictions come from the best epoch.

Outputs in OUT: ``config.json``; ``split/`` (id lists and split.json via ``pipeline.downstream.splits.write_split``,
and the training subset(s) of the fraction); ``seeds/seed-<n>.json`` (one finished seed each, so an
interrupted run resumes) and ``seeds/seed-<n>.predictions.{csv,json}`` (its test predictions, formats
in the task modules and docs/DESIGN.md); ``results.json``; ``results.md`` (one appended table row per
finished run; rerunning a finished configuration adds nothing; ``pipeline.downstream.results``).
A folder holds one configuration: a rerun with another config (other than seeds, device, workers)
is refused rather than mixing results.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.common import (
    ConfigError,
    MflagError,
    config_to_dict,
    file_sha256,
    fingerprint,
    read_json,
    save_config,
    write_json,
)
from pipeline.distributed import resolve_device
from pipeline.downstream import TASKS, get_task, task_entry, task_names
from pipeline.downstream.datasets.registry import (
    check_options,
    dataset_names,
    dataset_tasks,
    load_dataset,
    mgca_pairs,
)
from pipeline.downstream.det_heads import DET_HEADS, det_head_names
from pipeline.downstream.language import run_folder
from pipeline.downstream.loop import TrainSettings, calibrate_bn
from pipeline.downstream.recipes import NORMALIZE, PROTOCOLS, Recipe, resolve
from pipeline.downstream.results import (
    Encoders,
    ImageStore,
    append_markdown,
    checkpoint_sha256,
    clean_json,
    results,
    summarise_seeds,
)
from pipeline.downstream.retrieval import SPLITS as RETRIEVAL_SPLITS
from pipeline.downstream.splits import load_split_file, make_split, sample_fraction, write_fraction, write_split
from pipeline.downstream.task import SeedRun
from pipeline.downstream.zeroshot import AGGREGATES as PROMPT_AGGREGATES
from pipeline.downstream.zeroshot import PROTOCOLS as ZEROSHOT_PROTOCOLS
from pipeline.locks import hold_output_lock
from pipeline.options import check_fields, option, result_config
from pipeline.tracking import REPORT_TO, Tracker, open_tracker
from stages import embed_text

log = logging.getLogger(__name__)

# Output version of this stage: 3 added the protocols and the per-seed predictions files. Part of the
# fingerprint of every run (and of `cli.py run`'s eval stages), so results of older code are redone.
FORMAT_VERSION = 3
# Options that the resolved recipe stands for in the fingerprint: an explicit value equal to the
# protocol's default is the same run.
_IN_RECIPE = ("epochs", "patience", "lr", "batch_size", "weight_decay", "normalize", "det_model", "image_size")


_TASK_HELP = "; ".join(f"{name}: {entry.help}" for name, entry in TASKS.items())


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Options of ``eval`` (each field is the option of the same name, pipeline.options). Options left
    None (or ``normalize="auto"``) take the protocol's value (``recipe()``); ``dataset_options`` are
    (name, value) pairs passed to the dataset reader."""

    # choices are the registries' names, read when needed (pipeline.downstream.TASKS, datasets.registry.DATASETS,
    # det_heads.DET_HEADS), so a task, dataset or head registered there is an accepted and documented value
    task: str = option(choices=task_names, help=_TASK_HELP + ".")
    dataset: str | None = option(None, choices=dataset_names,
                                 help="Downstream dataset (docs/DATASETS.md); every task but retrieval needs one.")
    root: str | None = option(None, path="dir", help="Dataset folder in its published layout (docs/DATASETS.md "
                                                     "says which folder for each dataset).")
    out: str = option(path="dir", affects_result=False,
                      help="Run folder: results.json, results.md (appended), split/, seeds/ (with predictions), "
                           "config.json.")
    init: str = option(help="Encoder: random | imagenet | PATH (encoder.pt, encoder.safetensors or a published "
                            "baseline's checkpoint; files are read without running any code from them); zeroshot "
                            "and retrieval: a train-vision run folder (or its encoder.pt) or random.")
    protocol: str = option("tool", choices=PROTOCOLS,
                           help="mgca: MGCA's published downstream recipe (the paper's tables); tool: this tool's "
                                "stricter protocol. Defaults of the options below follow it (docs/PROTOCOLS.md).")
    fraction: float = option(1.0, min=0, min_open=True, max=1,
                             help="Share of the training split used (e.g. 0.01, 0.1, 1.0): drawn per seed (tool) or "
                                  "once (mgca).")
    seeds: tuple[int, ...] = option((0,), min=0, affects_result=False, help="Comma-separated seeds, e.g. 0,1,2.")
    finetune: bool = option(False, negatable=False, help="Train the encoder too (default: frozen encoder).")
    epochs: int | None = option(None, min=1, show_default="mgca 50; tool 100 for the cls linear probe on cached "
                                                          "features, 10 otherwise", help="Max epochs.")
    batch_size: int | None = option(None, min=1, show_default="mgca cls 48, seg 8 SIIM / 16 RSNA, det 16 (8 at 1%); "
                                                              "tool 16", help="Images per step.")
    lr: float | None = option(None, min=0, min_open=True,
                              show_default="mgca 5e-4 (det at 1%: 2e-4 RSNA, 2.5e-4 Object-CXR); tool linear probe "
                                           "1e-3, seg 3e-4 (1e-4 finetuned), else 1e-4",
                              help="AdamW learning rate.")
    image_size: int = option(224, min=32, max=2048,
                             help="Network input size (square). mgca cls loads images at 8/7 of it and crops.")
    patience: int | None = option(None, min=1, show_default="mgca 10; tool 10 for the linear probe, 3 otherwise",
                                  help="Early-stopping patience in epochs.")
    split_file: str | None = option(None, exists="any",
                                    help="Reuse a split (split.json folder, JSON or CSV) instead of generating one.")
    split_seed: int = option(0, help="Seed of the generated split (shared by all seeds).")
    device: str = option("auto", affects_result=False, device=True, help="auto, cpu, cuda or cuda:N.")
    workers: int = option(0, min=0, affects_result=False, help="DataLoader workers.")
    det_model: str | None = option(None, choices=det_head_names, show_default="mgca yolov3 (MGCA's), tool fasterrcnn",
                                   help="det: the detection head.")
    weight_decay: float | None = option(None, min=0, show_default="mgca 1e-6 (seg 0.05); tool 1e-4",
                                        help="AdamW weight decay.")
    normalize: str = option("auto", choices=NORMALIZE,
                            help="Input normalisation; auto: mean/std 0.5 (mgca, and tool for every init but "
                                 "imagenet, which takes ImageNet statistics).")
    dataset_options: tuple[tuple[str, Any], ...] = option(
        (), names=("--dataset-option",),
        help="Reader option, repeatable (e.g. uncertainty=zeros, frontal_only=false, label_set=B).")
    report_to: str = option("none", choices=REPORT_TO, affects_result=False,
                            help="Also send the per-epoch scalars to TensorBoard or W&B (OUT/tensorboard, OUT/wandb).")
    # -- the tasks that train nothing (zeroshot, retrieval; docs/PROTOCOLS.md)
    zeroshot_protocol: str | None = option(None, choices=ZEROSHOT_PROTOCOLS, added_later=True,
                                           show_default="chexpert5x200 on chexpert, binary elsewhere",
                                           help="zeroshot: GLoRIA's CheXpert 5x200 classes, or CheXzero's positive/"
                                                "negative prompt pair per label.")
    prompts: str | None = option(None, exists="file", added_later=True,
                                 help="zeroshot: a YAML/JSON prompts file instead of the built-in prompts (class -> "
                                      "[texts], or label -> {positive: [...], negative: [...]} for binary).")
    prompts_per_class: int = option(5, min=1, added_later=True,
                                    help="zeroshot chexpert5x200: prompts drawn per class from GLoRIA's templates "
                                         "(seeded: seed 0 is GLoRIA's own draw).")
    prompt_aggregate: str = option("max", choices=PROMPT_AGGREGATES, added_later=True,
                                   help="zeroshot chexpert5x200: a class's score over its prompts, max (GLoRIA) or "
                                        "mean (MedCLIP's ensemble).")
    zeroshot_per_class: int | None = option(None, min=1, added_later=True,
                                            show_default="MGCA's 200 (its share of a smaller train.csv)",
                                            help="zeroshot chexpert5x200: images per class.")
    text_model: str | None = option(None, added_later=True, show_default="the model named by the run's text cache",
                                    help="zeroshot: the frozen text encoder the prompts go through (hub id or "
                                         "folder); it must be the one that made the run's training cache.")
    text_cache: str | None = option(None, exists="any", added_later=True,
                                    show_default="the cache the run trained on",
                                    help="zeroshot/retrieval: the text cache (its attributes check the prompts; "
                                         "retrieval reads the reports from it).")
    shards: str | None = option(None, exists="dir", added_later=True,
                                help="retrieval: a prepare output folder (or shards folder) holding held-out pairs.")
    split: str = option("test", choices=RETRIEVAL_SPLITS, added_later=True,
                        help="retrieval: which held-out shards (heldout = validate + test).")
    max_images: int = option(5000, min=2, added_later=True, help="retrieval: at most this many pairs, in file order.")
    retrieval_labels: str | None = option(None, exists="file", added_later=True,
                                          help="retrieval: a CSV(.gz) with study_id and the CheXpert competition "
                                               "columns (e.g. mimic-cxr-2.0.0-chexpert.csv.gz): adds GLoRIA's "
                                               "class-based Precision@5/10/100.")
    bootstrap: int = option(1000, min=10, added_later=True,
                            help="zeroshot/retrieval: bootstrap resamples of the 95% intervals (seed 0).")

    def __post_init__(self) -> None:
        check_fields(self)
        entry = task_entry(self.task)
        if not self.init:
            raise ConfigError("init: give 'random', 'imagenet' or a checkpoint path")
        if not self.seeds:
            raise ConfigError("seeds: give at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: must be distinct non-negative integers, got {list(self.seeds)}")
        if entry.needs_dataset and (self.dataset is None or self.root is None):
            raise ConfigError(f"{'dataset' if self.dataset is None else 'root'}: task {self.task} reads a "
                              "downstream dataset; give --dataset and --root")
        if not entry.trains:
            self._check_language()
            if self.dataset is not None:
                check_options(self.dataset, dict(self.dataset_options))
            return
        if self.task not in dataset_tasks(self.dataset):
            raise ConfigError(f"task: {self.dataset} supports {', '.join(dataset_tasks(self.dataset))}, "
                              f"not {self.task!r}")
        if self.protocol == "mgca" and (self.dataset, self.task) not in mgca_pairs():
            have = ", ".join(f"{t} {d}" for d, t in mgca_pairs())
            raise ConfigError(f"protocol: MGCA has no {self.task} {self.dataset} recipe (it has {have}); "
                              "use protocol tool")
        try:  # reader options are checked here, before any data is read (names and types only)
            check_options(self.dataset, dict(self.dataset_options))
        except MflagError as e:
            raise ConfigError(f"dataset_options: {e}") from e
        if self.task == "seg" and self.image_size % 32:
            raise ConfigError(f"image_size: the U-Net needs a multiple of 32 for seg, got {self.image_size}")
        head = DET_HEADS[self.recipe().head] if self.task == "det" else None
        if head is not None and self.image_size % head.size_multiple:
            raise ConfigError(f"image_size: the {head.title} head needs a multiple of {head.size_multiple}, "
                              f"got {self.image_size}")
        if self.split_file is not None and not Path(self.split_file).exists():
            raise ConfigError(f"split_file: {self.split_file} does not exist")
        if self.init not in ("random", "imagenet") and not Path(self.init).expanduser().is_file():
            raise ConfigError(f"init: expected 'random', 'imagenet' or a checkpoint file; {self.init!r} is neither")

    def _check_language(self) -> None:
        """The checks of the tasks that train nothing (zeroshot, retrieval)."""
        if self.task == "zeroshot":
            if "cls" not in dataset_tasks(self.dataset):
                raise ConfigError(f"dataset: zeroshot classifies images; {self.dataset} has no labels for it")
            if self.zeroshot_protocol == "chexpert5x200" and self.dataset != "chexpert":
                raise ConfigError(f"zeroshot_protocol: chexpert5x200 is CheXpert's set, not {self.dataset}'s; "
                                  "use binary")
        if self.task == "retrieval" and not self.shards:
            raise ConfigError("shards: retrieval needs a prepare output folder with held-out (validate/test) shards")
        if self.init == "imagenet":
            raise ConfigError(f"init: {self.task} needs a projector and text head trained into the text space; give a "
                              "train-vision run folder (or its encoder.pt), or random for the null")
        if self.init != "random" and not Path(self.init).expanduser().exists():
            raise ConfigError(f"init: {self.init!r} is neither 'random' nor a train-vision run folder or file")
        if self.init == "random" and not self.text_cache:
            raise ConfigError("text_cache: with init random give the text cache whose space the random model is "
                              "shaped for")

    def recipe(self, label_kind: str = "multilabel") -> Recipe:
        """The protocol's recipe for this run, with the options given explicitly taking precedence."""
        return resolve(self.protocol, self.task, self.dataset, self.fraction, self.finetune, self.init, label_kind,
                       epochs=self.epochs, patience=self.patience, lr=self.lr, batch_size=self.batch_size,
                       weight_decay=self.weight_decay, image_size=self.image_size, normalize=self.normalize,
                       det_model=self.det_model)

    def effective(self, label_kind: str = "multilabel") -> dict:
        """The resolved training settings as recorded in results.json (``hyperparameters``)."""
        return self.recipe(label_kind).as_dict()


# --------------------------------------------------------------------------- the stage
def run(cfg: EvalConfig) -> dict:
    """Evaluate ``cfg.init`` on ``cfg.task``/``cfg.dataset`` for every seed; returns the results dict
    also written to ``OUT/results.json``."""
    hold_output_lock(cfg.out, "eval", clean_temps=("", "seeds", "split"))
    if not task_entry(cfg.task).trains:
        return _run_untrained(cfg)
    out = Path(cfg.out)
    task = get_task(cfg.task)
    spec = load_dataset(cfg.dataset, cfg.root, cfg.task, protocol=cfg.protocol, **dict(cfg.dataset_options))
    task.check(spec)
    recipe = cfg.recipe(spec.label_kind)
    split = _split(cfg, spec)
    ckpt_hash = checkpoint_sha256(cfg.init)
    fp = _run_fingerprint(cfg, recipe, ckpt_hash, split.hashes()["all"])
    out.mkdir(parents=True, exist_ok=True)
    _check_folder(out, fp)
    finished = _finished(out, fp, cfg.seeds)
    if finished is not None:
        return finished
    save_config(cfg, out, stage="eval", fingerprint=fp, effective=recipe.as_dict(), checkpoint_sha256=ckpt_hash)
    fractions = {s: list(sample_fraction(split, cfg.fraction, s, spec=spec)) for s in cfg.seeds}
    fraction_files = _write_fractions(fractions, out / "split", cfg)
    write_split(split, out / "split", fraction_files=list({f["file"]: f for f in fraction_files.values()}.values()))

    todo = [s for s in cfg.seeds if _load_seed(out, s, fp) is None]
    store = ImageStore(spec, recipe, task, fractions, split, decode=bool(todo))
    encoders = Encoders(cfg.init, shared=task.shares_encoder(recipe, cfg.init))
    per_seed = []
    tracker = open_tracker(cfg.report_to, out, config_to_dict(cfg), key=fp) if todo else Tracker()
    try:
        for seed in cfg.seeds:
            done = _load_seed(out, seed, fp)
            if done is not None:
                log.info("seed %d: already done (%s), reusing", seed, out / "seeds" / f"seed-{seed}.json")
            else:
                done = _run_seed(cfg, task, recipe, store, encoders, seed, out, fp, tracker)
            per_seed.append(done)
    finally:
        tracker.close()

    res = results(cfg, recipe, spec, split, fractions, fraction_files, per_seed, fp, ckpt_hash)
    write_json(out / "results.json", res)
    append_markdown(out / "results.md", res)
    return res


def _run_untrained(cfg: EvalConfig) -> dict:
    """A task that trains nothing (zeroshot, retrieval): its module's ``evaluate`` computes every seed; this
    stage fingerprints the run (options, the weights' and prompts file's hashes), refuses a folder of
    another configuration and writes results.json and the results.md row."""
    out = Path(cfg.out)
    d = result_config(cfg)
    d.update(init_sha256=_init_sha256(cfg.init), format=FORMAT_VERSION,
             prompts_sha256=file_sha256(cfg.prompts) if cfg.prompts else None)
    d.update(labels_sha256=file_sha256(cfg.retrieval_labels) if cfg.retrieval_labels else None)
    for k in ("init", "prompts", "text_cache", "shards", "root", "retrieval_labels"):
        d.pop(k, None)  # the same weights and inputs under other paths are the same run
    d["inputs"] = {k: str(getattr(cfg, k)) for k in ("root", "shards", "text_cache") if getattr(cfg, k)}
    fp = fingerprint(d)
    out.mkdir(parents=True, exist_ok=True)
    _check_folder(out, fp)
    finished = _finished(out, fp, cfg.seeds)
    if finished is not None:
        return finished
    save_config(cfg, out, stage="eval", fingerprint=fp)  # one stage per folder (pipeline.locks)
    res = get_task(cfg.task).evaluate(cfg, out, embed_text.embed_file)
    per_seed = [{**r, "fingerprint": fp} for r in res.pop("per_seed")]
    summary, summary_per_class = summarise_seeds(per_seed)
    hashes = d["init_sha256"] or {}
    results = clean_json({
        "task": cfg.task, "dataset": cfg.dataset or f"shards:{cfg.split}", "protocol": cfg.protocol, "init": cfg.init,
        "checkpoint_sha256": next(iter(hashes.values()), None),  # the encoder file's (the first hashed)
        "init_sha256": d["init_sha256"], "fraction": None, "finetune": False, "seeds": list(cfg.seeds),
        "fingerprint": fp, **res, "summary": summary, "summary_auroc_per_class": summary_per_class,
        "per_seed": per_seed, "predictions": {str(r["seed"]): f"seeds/{r['predictions']}" for r in per_seed},
        "fraction_sizes": {}, "config": config_to_dict(cfg),
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    write_json(out / "results.json", results)
    append_markdown(out / "results.md", results)
    return results


def _init_sha256(init: str) -> dict | None:
    """The weights behind a zeroshot/retrieval init: encoder and projector hashes of the run folder."""
    if init == "random":
        return None
    run = run_folder(init)
    enc = Path(init).expanduser() if Path(init).expanduser().is_file() else run / "encoder.pt"
    return {p.name: file_sha256(p) for p in (enc, run / "projector.pt") if p.is_file()}


def _run_seed(cfg: EvalConfig, task, recipe: Recipe, store: ImageStore, encoders: Encoders, seed: int,
              out: Path, fp: str, tracker: Tracker) -> dict:
    """Train and test one seed; writes its predictions, then ``seeds/seed-N.json`` (the seed's completion)."""
    t0 = time.monotonic()

    def on_epoch(row: dict) -> None:  # per-seed curves: seed-N/train_loss, seed-N/val_<metric>
        tracker.log({f"seed-{seed}/{k}": v for k, v in row.items() if k != "epoch"}, row["epoch"])

    settings = TrainSettings(epochs=recipe.epochs, batch_size=recipe.batch_size, lr=recipe.lr,
                             patience=recipe.patience, seed=seed, device=resolve_device(cfg.device),
                             workers=cfg.workers, weight_decay=recipe.weight_decay, norm=recipe.normalize,
                             monitor=recipe.monitor, mode=recipe.mode, grad_clip=recipe.grad_clip,
                             drop_last=recipe.drop_last, on_epoch=on_epoch)
    torch.manual_seed(seed)  # before the encoder: a random encoder differs per seed
    encoder, info, cache = encoders.get()
    train_idx = store.indices(store.fractions[seed])
    run = SeedRun(seed=seed, spec=store.spec, source=store.source, train_idx=train_idx,
                  val_idx=store.indices(store.split.val), test_idx=store.indices(store.split.test),
                  encoder=encoder, recipe=recipe, settings=settings, labels=store.labels, cache=cache)
    log.info("seed %d: %s on %s (%s protocol), %d train / %d val / %d test images", seed, cfg.task, cfg.dataset,
             cfg.protocol, len(run.train_idx), len(run.val_idx), len(run.test_idx))
    n_bn = 0
    # A random encoder's BN statistics (mean 0, variance 1) describe no data: they are estimated on the
    # training images first. Frozen encoders and torchvision's detection body (frozen BN even when
    # fine-tuned) keep them; trainable BN starts from them instead of lagging behind the data for the
    # first epochs (its running averages move by 10% a step).
    if cfg.init == "random":
        n_bn = calibrate_bn(encoder, store.source, train_idx, settings, transform=run.transforms()[1])
    outcome = task.run(run)
    predictions = f"seed-{seed}.predictions{task.predictions_suffix}"
    task.write_predictions(out / "seeds" / predictions, outcome, run)
    fitted = outcome.fitted
    result = {
        "seed": seed, "fingerprint": fp, "n_train": len(train_idx), "best_epoch": fitted.best_epoch,
        "epochs_run": len(fitted.history), "selected_by": fitted.selection,
        "val": fitted.history[fitted.best_epoch] if fitted.best_epoch >= 0 else {},
        "checkpoint_layout": info.get("layout"), "bn_calibration_images": n_bn, "test": outcome.test,
        "predictions": predictions, "history": fitted.history, "seconds": round(time.monotonic() - t0, 2),
    }
    write_json(out / "seeds" / f"seed-{seed}.json", clean_json(result))
    log.info("seed %d: test %s = %s (best epoch %d)", seed, recipe.primary, outcome.test.get(recipe.primary),
             fitted.best_epoch)
    return clean_json(result)


# --------------------------------------------------------------------------- pieces of the stage
def _split(cfg: EvalConfig, spec):
    """The run's split (generated, or ``--split-file``), every list non-empty and known to the dataset."""
    if cfg.split_file:
        split = load_split_file(cfg.split_file, spec=spec, protocol=cfg.protocol)
    else:
        split = make_split(spec, seed=cfg.split_seed, protocol=cfg.protocol)
    known = {r.image_id for r in spec.records}
    for part in ("train", "val", "test"):
        ids = split.ids(part)
        missing = [i for i in ids if i not in known]
        if missing:
            raise MflagError(f"split {part}: {len(missing)} ids are not in dataset {cfg.dataset} at "
                             f"{cfg.root}, e.g. {missing[:3]}")
        if not ids:
            raise MflagError(f"split {part} is empty ({len(spec.records)} images in {cfg.dataset} at "
                             f"{cfg.root}); the dataset is too small to split")
    return split


def _write_fractions(fractions: dict, folder: Path, cfg: EvalConfig) -> dict:
    """Each seed's training subset as a file (under mgca one list, one file, shared by every seed)."""
    written: dict = {}
    out = {}
    for seed, ids in fractions.items():
        key = None if cfg.protocol == "mgca" else seed
        if key not in written:
            written[key] = write_fraction(ids, folder, cfg.fraction, seed, protocol=cfg.protocol)
        out[seed] = written[key]
    return out



def _run_fingerprint(cfg: EvalConfig, recipe: Recipe, ckpt_hash: str | None, split_hash: str) -> str:
    d = result_config(cfg)  # without seeds, out, device, workers, report_to (affects_result=False)
    for k in _IN_RECIPE:
        d.pop(k, None)
    if cfg.init not in ("random", "imagenet"):
        d["init"] = "file"  # the same weights under another path are the same run
    d["split_file"] = None  # the split's content hash below stands for it
    d.update(recipe=recipe.as_dict(), checkpoint_sha256=ckpt_hash, split_sha256=split_hash, format=FORMAT_VERSION)
    return fingerprint(d)


def _finished(out: Path, fp: str, seeds) -> dict | None:
    """The results of this very configuration and seeds if the folder already holds them."""
    if (out / "results.json").is_file():
        prev = read_json(out / "results.json")
        if prev.get("fingerprint") == fp and prev.get("seeds") == list(seeds):
            log.info("%s: this configuration is already complete; nothing to do", out / "results.json")
            return prev
    return None


def _check_folder(out: Path, fp: str) -> None:
    """Refuse a folder holding results of another configuration; a run of another configuration that
    stopped before finishing any seed left no results, so its leftovers are cleared instead."""
    cfg_path = out / "config.json"
    if cfg_path.is_file():
        old = read_json(cfg_path).get("fingerprint")
        if old is not None and old != fp:
            seeds = out / "seeds"
            if (out / "results.json").exists() or (seeds.is_dir() and any(seeds.glob("seed-*.json"))):
                raise MflagError(
                    f"{out} holds eval results of another configuration (fingerprint {old}, this one {fp}); "
                    f"use another --out, or delete {out} to start over, so results of different "
                    "configurations are never mixed")
            log.info("%s: clearing what a run of another configuration left before its first seed", out)
            cfg_path.unlink()
            shutil.rmtree(out / "split", ignore_errors=True)
            shutil.rmtree(seeds, ignore_errors=True)


def _load_seed(out: Path, seed: int, fp: str) -> dict | None:
    """A finished seed of this configuration: its json and its predictions file both present."""
    path = out / "seeds" / f"seed-{seed}.json"
    if not path.is_file():
        return None
    data = read_json(path)
    if data.get("fingerprint") != fp or not (out / "seeds" / str(data.get("predictions"))).is_file():
        return None
    return data


