"""`cli.py run` / `cli.py status`: the whole pipeline from one YAML file, rerunning only what changed.

The YAML names the corpus (synthetic or a real MIMIC-CXR-JPG tree), the text encoder (a hub id,
a local folder, or a small stand-in built here), the options of each stage, the pre-training
variants and the downstream evaluations. Every section maps onto a stage's config dataclass, so
an option means the same in the YAML as on the stage's command line (with ``_`` for ``-``).
See ``configs/demo.yaml`` and ``configs/mimic.yaml``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import yaml

from pipeline.common import ConfigError, MflagError, read_json, save_config, write_json
from pipeline.stagegraph import Node, NodeStatus, execute, plan

log = logging.getLogger(__name__)

TOP_KEYS = {"workdir", "corpus", "text_model", "prepare", "embed_text", "train", "downstream", "eval",
            "report"}
SYNTH_DATASETS = ("chexpert", "rsna", "covidx", "siim", "object-cxr")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """``config``: the pipeline YAML. ``force``: stages to rerun (a name or a prefix such as
    ``train`` or ``eval``); ``from_stage``: rerun this stage and all after it. ``workdir`` overrides
    the YAML's."""

    config: str
    force: tuple[str, ...] = ()
    from_stage: str | None = None
    workdir: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "config", str(self.config))
        if not Path(self.config).is_file():
            raise ConfigError(f"config: {self.config} is not a file")


# --------------------------------------------------------------------------- YAML -> spec
def load_spec(path: str | Path, workdir: str | None = None) -> dict[str, Any]:
    """Read and check a pipeline YAML; relative paths are taken from the current directory."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise MflagError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(spec, dict):
        raise MflagError(f"{path}: the top level must be a mapping")
    unknown = set(spec) - TOP_KEYS
    if unknown:
        raise MflagError(f"{path}: unknown top-level keys {sorted(unknown)}; allowed: {sorted(TOP_KEYS)}")
    spec.setdefault("workdir", "runs/pipeline")
    if workdir:
        spec["workdir"] = workdir
    corpus = spec.get("corpus") or {}
    if ("synth" in corpus) == ("mimic" in corpus):
        raise MflagError(f"{path}: corpus must have exactly one of 'synth' or 'mimic'")
    tm = spec.get("text_model") or {}
    if ("build" in tm) == ("model" in tm):
        raise MflagError(f"{path}: text_model must have exactly one of 'build' (a small stand-in built "
                         "from the corpus) or 'model' (a hub id or local folder, e.g. "
                         "microsoft/BiomedVLP-CXR-BERT-general)")
    variants = (spec.get("train") or {}).get("variants") or {}
    if not variants:
        raise MflagError(f"{path}: train.variants must name at least one pre-training variant")
    for name in variants:
        if name in ("random", "imagenet") or ":" in name or "/" in name:
            raise MflagError(f"{path}: train variant name {name!r} is reserved or has ':' or '/'")
    return spec


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _check_keys(section: str, options: dict, cls, reserved: set[str]) -> None:
    allowed = _fields(cls) - reserved
    bad = set(options) - allowed
    if bad:
        raise MflagError(f"{section}: unknown or orchestrator-owned options {sorted(bad)}; "
                         f"allowed: {', '.join(sorted(allowed))}")


def build_nodes(spec: dict[str, Any]) -> list[Node]:
    """Turn a checked spec into the ordered stage graph."""
    from stages.embed_text import EmbedTextConfig
    from stages.evaluate import EvalConfig
    from stages.prepare import PrepareConfig
    from stages.train_vision import TrainVisionConfig

    work = Path(spec["workdir"])
    nodes: list[Node] = []
    corpus = spec["corpus"]

    # -- corpus
    prep_deps: tuple[str, ...] = ()
    if "synth" in corpus:
        synth = dict(corpus["synth"])
        nodes.append(Node("synth-mimic", work / "data" / "mimic", synth, (), _run_synth_mimic))
        prep_deps = ("synth-mimic",)
        mimic_root, mimic_reports = "@synth-mimic", None
    else:
        real = dict(corpus["mimic"])
        if "root" not in real:
            raise MflagError("corpus.mimic: give root (the MIMIC-CXR-JPG folder) and optionally reports")
        mimic_root, mimic_reports = real["root"], real.get("reports")

    prepare_opts = dict(spec.get("prepare") or {})
    _check_keys("prepare", prepare_opts, PrepareConfig, {"root", "reports", "out", "force"})
    nodes.append(Node("prepare", work / "prepare",
                      {"root": mimic_root, "reports": mimic_reports, **prepare_opts},
                      prep_deps, _run_prepare))

    # -- text encoder
    tm = spec["text_model"]
    embed_deps: tuple[str, ...] = ("prepare",)
    if "build" in tm:
        nodes.append(Node("text-model", work / "text-model", dict(tm["build"]), ("prepare",), _run_text_model))
        embed_deps = ("prepare", "text-model")
        model_ref = "@text-model/model"
    else:
        model_ref = str(tm["model"])
    embed_opts = dict(spec.get("embed_text") or {})
    _check_keys("embed_text", embed_opts, EmbedTextConfig, {"reports", "out", "model"})
    nodes.append(Node("embed-text", work / "embed-text", {"model": model_ref, **embed_opts}, embed_deps,
                      _run_embed_text))

    # -- pre-training variants
    train = spec["train"]
    common = dict(train.get("common") or {})
    for name, overrides in train["variants"].items():
        opts = {**common, **(overrides or {})}
        _check_keys(f"train.variants.{name}", opts, TrainVisionConfig, {"shards", "text_cache", "out"})
        nodes.append(Node(f"train:{name}", work / "train" / name, opts, ("prepare", "embed-text"), _run_train))

    # -- downstream data
    down = spec.get("downstream") or {}
    roots: dict[str, str] = {}
    for ds, opts in (down.get("synth") or {}).items():
        if ds not in SYNTH_DATASETS:
            raise MflagError(f"downstream.synth: unknown dataset {ds!r}; one of {', '.join(SYNTH_DATASETS)}")
        nodes.append(Node(f"synth:{ds}", work / "data" / ds, {"dataset": ds, **(opts or {})}, (), _run_synth_down))
        roots[ds] = f"@synth:{ds}"
    for ds, root in (down.get("roots") or {}).items():
        roots[ds] = str(root)

    # -- evaluations
    ev = spec.get("eval") or {}
    ev_common = dict(ev.get("common") or {})
    inits = list(ev.get("inits") or ["random", *train["variants"]])
    for task in ev.get("tasks") or []:
        task = dict(task)
        task_inits = list(task.pop("inits", None) or inits)  # a task may name its own inits
        ds = task.get("dataset")
        if ds not in roots:
            raise MflagError(f"eval.tasks: dataset {ds!r} has no data; add it under downstream.synth or "
                             "downstream.roots")
        for init in task_inits:
            opts = {**ev_common, **task}
            _check_keys("eval", opts, EvalConfig, {"root", "out", "init"})
            deps: list[str] = []
            if init in train["variants"]:
                deps.append(f"train:{init}")
            elif init not in ("random", "imagenet") and not Path(init).is_file():
                raise MflagError(f"eval.inits: {init!r} is not a train variant, random, imagenet or a file")
            if f"synth:{ds}" in {n.name for n in nodes}:
                deps.append(f"synth:{ds}")
            label = f"{opts['task']}-{ds}"
            if "fraction" in task:
                label += f"@{opts['fraction']:g}"
            if f"eval:{label}:{init}" in {n.name for n in nodes}:
                raise MflagError(f"eval.tasks: {label} with init {init} is listed twice")
            folder = init if init in train["variants"] or init in ("random", "imagenet") else f"file-{Path(init).stem}"
            nodes.append(Node(f"eval:{label}:{init}", work / "eval" / label / folder,
                              {"root": roots[ds], "init": init, **opts}, tuple(deps), _run_eval))

    # -- report
    if spec.get("report", {}) is not False:
        deps = tuple(n.name for n in nodes if n.name.startswith(("train:", "eval:")))
        nodes.append(Node("report", work / "report", dict(spec.get("report") or {}), deps, _run_report))
    return nodes


# --------------------------------------------------------------------------- runners
def _run_synth_mimic(node: Node, by_name) -> None:
    from pipeline.synth.mimic import write_mimic

    p = dict(node.params)
    write_mimic(node.out_dir, n_studies=int(p.pop("n_studies", 1000)), seed=int(p.pop("seed", 0)), **p)


def _run_synth_down(node: Node, by_name) -> None:
    from pipeline.synth.downstream import WRITERS

    p = dict(node.params)
    ds = p.pop("dataset")
    WRITERS[ds.replace("-", "_") if ds.replace("-", "_") in WRITERS else ds](
        node.out_dir, n=int(p.pop("n", 200)), seed=int(p.pop("seed", 0)), **p)


def _run_prepare(node: Node, by_name) -> None:
    from stages import prepare

    p = dict(node.params)
    cfg = prepare.PrepareConfig(root=_resolve(p.pop("root"), by_name), reports=p.pop("reports"),
                                out=str(node.out_dir),
                                force=False, **_tuples(p))
    prepare.run(cfg)


def _reports_path(by_name) -> Path:
    return by_name["prepare"].out_dir / "reports.jsonl"


def _run_text_model(node: Node, by_name) -> None:
    """Build the demo's stand-in text encoder: a WordPiece tokenizer and a small BERT trained briefly
    with MLM on the corpus reports. Clearly not CXR-BERT; it only has to make report embeddings
    reflect what reports say, which is all the frozen-text design needs."""
    from pipeline.mlm import pretrain_mlm
    from pipeline.textmodels import build_tiny_bert

    p = dict(node.params)
    texts = [json.loads(line)["text"] for line in _reports_path(by_name).read_text(encoding="utf-8").splitlines()
             if line.strip()]
    mlm_steps = int(p.pop("mlm_steps", 200))
    mlm_batch = int(p.pop("mlm_batch_size", 32))
    seed = int(p.get("seed", 0))
    model_dir = build_tiny_bert(texts, node.out_dir / "model", **p)
    stats = pretrain_mlm(model_dir, texts, steps=mlm_steps, batch_size=mlm_batch, seed=seed) if mlm_steps else {}
    write_json(node.out_dir / "text-model.json", {"params": node.params, "mlm": stats,
                                                   "note": "stand-in for CXR-BERT, built from the corpus"})


def _run_embed_text(node: Node, by_name) -> None:
    from stages import embed_text

    p = dict(node.params)
    model = _resolve(p.pop("model"), by_name)
    cfg = embed_text.EmbedTextConfig(reports=str(_reports_path(by_name)), out=str(node.out_dir / "caches"),
                                     model=model, **_tuples(p))
    res = embed_text.run(cfg)
    # The orchestrator points training at the exact cache folder of this configuration.
    write_json(node.out_dir / "cache.json", {"path": str(res.cache_dir)})


def _cache_dir(by_name) -> str:
    return read_json(by_name["embed-text"].out_dir / "cache.json")["path"]


def _run_train(node: Node, by_name) -> None:
    from stages import train_vision

    cfg = train_vision.TrainVisionConfig(shards=str(by_name["prepare"].out_dir), text_cache=_cache_dir(by_name),
                                         out=str(node.out_dir), **_tuples(dict(node.params)))
    train_vision.run(cfg)


def _run_eval(node: Node, by_name) -> None:
    from stages import evaluate

    p = dict(node.params)
    init = p.pop("init")
    train_node = by_name.get(f"train:{init}")
    init_ref = str(train_node.out_dir / "encoder.pt") if train_node else init
    opts = p.pop("dataset_options", None) or {}
    cfg = evaluate.EvalConfig(root=_resolve(p.pop("root"), by_name), out=str(node.out_dir), init=init_ref,
                              dataset_options=tuple(sorted(opts.items())), **_tuples(p))
    evaluate.run(cfg)


def _run_report(node: Node, by_name) -> None:
    from stages import report

    trains = {n.split(":", 1)[1]: by_name[n].out_dir for n in by_name if n.startswith("train:")}
    evals = {n: by_name[n].out_dir for n in by_name if n.startswith("eval:")}
    cache = _cache_dir(by_name) if "embed-text" in by_name else None
    report.run(report.ReportConfig(out=str(node.out_dir), trains=tuple((k, str(v)) for k, v in trains.items()),
                                   evals=tuple((k, str(v)) for k, v in evals.items()), text_cache=cache,
                                   **dict(node.params)))


def _resolve(ref: str, by_name) -> str:
    """``@stage`` (or ``@stage/sub/path``) names the output folder of another stage of this pipeline
    (or a path inside it). Parameters hold the
    reference, not the path, so a workdir spelled differently (relative, absolute, moved) does not
    make stages stale; the upstream stage's fingerprint already stands for its content."""
    if isinstance(ref, str) and ref.startswith("@"):
        stage, _, sub = ref[1:].partition("/")
        return str(by_name[stage].out_dir / sub) if sub else str(by_name[stage].out_dir)
    return ref


def _tuples(options: dict) -> dict:
    """YAML lists become tuples, as the frozen configs expect."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}


# --------------------------------------------------------------------------- entry points
@dataclasses.dataclass
class RunResult:
    workdir: Path
    steps: list[dict]


def run(cfg: RunConfig) -> RunResult:
    spec = load_spec(cfg.config, cfg.workdir)
    nodes = build_nodes(spec)
    work = Path(spec["workdir"])
    work.mkdir(parents=True, exist_ok=True)
    save_config(cfg, work, name="run-config.json", pipeline=spec)
    steps = execute(nodes, force=cfg.force, from_stage=cfg.from_stage, log=log)
    return RunResult(work, steps)


def status(cfg: RunConfig) -> list[NodeStatus]:
    """Each stage as fresh, stale or missing, with the reason; changes nothing on disk.

    A stage whose own record matches but that ``plan`` would rerun (something upstream must run) is
    reported stale, naming the first such upstream stage.
    """
    spec = load_spec(cfg.config, cfg.workdir)
    _, steps = plan(build_nodes(spec))
    out, rerun = [], {}
    for node, st, will in steps:
        if will and st.state == "fresh":
            up = next(d for d in node.deps if d in rerun)
            st = NodeStatus(node.name, "stale", f"upstream {up} is {rerun[up]}", st.fingerprint)
        if will:
            rerun[node.name] = st.state
        out.append(st)
    return out
