"""`cli.py run` / `cli.py status`: the whole pipeline from one YAML file, rerunning only what changed.

The YAML names the corpus (synthetic or a real MIMIC-CXR-JPG tree), the text encoder (a hub id,
a local folder, or a small stand-in built here), the options of each stage, the pre-training
variants and the downstream evaluations. Every section maps onto a stage's config dataclass, so
an option means the same in the YAML as on the stage's command line (with ``_`` for ``-``), and is
checked by the same declaration (``pipeline.options``): unknown keys against the dataclass fields,
types against their annotations, choices and bounds by building the config at planning time, each
error prefixed with its section (``train.common.batch_size: must be >= 2, got 1``).
See ``configs/demo.yaml`` and ``configs/mimic.yaml``.

Seeds and online variants (``configs/ablation.yaml``): ``train.seeds`` (or a variant's own ``seeds``)
trains a variant once per seed (stage ``train:<variant>:s<seed>``, folder ``train/<variant>/seed-<seed>``),
and every downstream task evaluates pre-training replicate s with downstream seed s, so two variants'
replicates s share the data order of pre-training and the label fraction of the downstream task (a
paired comparison); inits that are not pre-trained run the downstream seeds of ``eval`` or, when it
gives none, those of ``train.seeds``. A variant with ``text_mode: online`` runs the pipeline's text
encoder inside each training step (``unfreeze_last: K`` or ``all`` trains its last layers); the
orchestrator gives it the text model and the reports, and the pooling and length embed-text used.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from cache import TextEmbeddingCache
from cache.format import FORMAT_VERSION as CACHE_FORMAT
from pipeline.common import ConfigError, MflagError, read_json, read_text_utf8, save_config, write_json
from pipeline.corpora import corpus as corpus_entry
from pipeline.downstream import task_entry
from pipeline.downstream.zeroshot import default_protocol
from pipeline.locks import output_lock
from pipeline.run.graph import Node, NodeStatus, execute, explain
from pipeline.run.spec import (
    check_call,
    check_inputs_exist,
    check_keys,
    external,
    load_spec,
    mapping,
    names,
    resolve,
    seed_list,
    tuples,
    validate,
)
from pipeline.synth.downstream import WRITERS
from pipeline.synth.mimic import write_mimic
from pipeline.synth.openi import write_openi
from pipeline.text.mlm import pretrain_mlm
from pipeline.text.models import build_tiny_bert
from stages import embed_text, evaluate, prepare, report, train_vision

# load_spec is re-exported: tests and cli.py use it from here.
__all__ = ["RunConfig", "RunResult", "build_nodes", "load_spec", "run", "status"]

log = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------- YAML -> stage graph
@dataclasses.dataclass
class _Planned:
    """What the builders of the earlier YAML sections produced, read by the later ones: each builder
    takes its section(s) and this, records here what later sections need, and returns its nodes."""

    work: Path
    nodes: list[Node] = dataclasses.field(default_factory=list)  # every node so far, in order
    corpus: str = ""  # the corpus section's one key: synth, mimic, synth-openi, openi, ...
    model_ref: str = ""  # the text encoder: @text-model/model, a hub id or a local folder
    embed_opts: dict[str, Any] = dataclasses.field(default_factory=dict)  # embed_text's options
    # train variant -> its pre-training seeds (None: one run, stage train:<variant>), in YAML order
    variant_seeds: dict[str, list[int] | None] = dataclasses.field(default_factory=dict)
    all_seeds: list[int] | None = None  # train.seeds
    roots: dict[str, str] = dataclasses.field(default_factory=dict)  # downstream dataset -> folder or @synth:<ds>

    def has(self, stage: str) -> bool:
        return any(n.name == stage for n in self.nodes)


def build_nodes(spec: dict[str, Any]) -> list[Node]:
    """Turn a checked spec into the ordered stage graph: one builder per YAML section, in order."""
    planned = _Planned(Path(spec["workdir"]))
    planned.nodes.extend(_corpus_nodes(spec.get("corpus"), spec.get("prepare"), planned))
    planned.nodes.extend(_text_nodes(spec["text_model"], spec.get("embed_text"), planned))
    planned.nodes.extend(_train_nodes(spec["train"], planned))
    planned.nodes.extend(_downstream_nodes(spec.get("downstream"), planned))
    planned.nodes.extend(_eval_nodes(spec.get("eval"), planned))
    if spec.get("report", {}) is not False:
        planned.nodes.append(_report_node(spec.get("report"), planned))
    return planned.nodes


def _corpus_nodes(corpus_section: Any, prepare_section: Any, planned: _Planned) -> list[Node]:
    """``corpus`` and ``prepare``: the synthetic corpus's node, if any, then prepare."""
    corpus = mapping("corpus", corpus_section)
    options = mapping("prepare", prepare_section)
    named = options.pop("corpus", None)
    if not corpus:  # prepare: {corpus: openi, reports: ..., images: ...}: the inputs sit in the prepare section
        entry = corpus_entry(str(named))
        corpus = {entry.name: {k: options.pop(k) for k in entry.config_class().INPUTS if k in options}}
    kind = next(iter(corpus))
    prepared = {"synth": "mimic", "synth-openi": "openi"}.get(kind, kind)
    if named is not None and str(named) != prepared:
        raise MflagError(f"prepare.corpus: {named!r}, but the corpus section gives {kind!r}")
    planned.corpus = kind
    inputs = mapping(f"corpus.{kind}", corpus[kind])
    if prepared == "mimic":
        return _mimic_prepare_nodes(kind, inputs, options, planned.work)
    return _corpus_prepare_nodes(kind, prepared, inputs, options, planned.work)


def _mimic_prepare_nodes(kind: str, inputs: dict, options: dict, work: Path) -> list[Node]:
    """MIMIC's prepare (``corpus: {mimic: {root: ..., reports: ...}}``), after the synthetic tree's node
    for ``synth``."""
    nodes: list[Node] = []
    if kind == "synth":
        synth = check_call("corpus.synth", inputs, write_mimic)
        nodes.append(Node("synth-mimic", work / "data" / "mimic", synth, (), _run_synth_mimic))
        root, reports = "@synth-mimic", None
    else:
        if "root" not in inputs or set(inputs) - {"root", "reports"}:
            raise MflagError("corpus.mimic: give root (the MIMIC-CXR-JPG folder) and optionally reports "
                             f"(a folder or mimic-cxr-reports.zip); got {sorted(inputs)}")
        root, reports = str(inputs["root"]), inputs.get("reports")
    opts = check_keys("prepare", options, prepare.PrepareConfig, {"root", "reports", "out", "force"})
    # root "." stands in for the corpus: prepare runs first and checks the real folder itself
    validate("prepare", prepare.PrepareConfig, opts, root=".", reports=None, out="(planned)")
    nodes.append(Node("prepare", work / "prepare", {"root": root, "reports": reports, **opts},
                      tuple(n.name for n in nodes), _run_prepare,
                      inputs={"format": prepare.FORMAT_VERSION, **external(root=root, reports=reports)},
                      verify=_verify_prepare))
    return nodes


def _corpus_prepare_nodes(kind: str, name: str, inputs: dict, options: dict, work: Path) -> list[Node]:
    """The prepare node of a corpus other than MIMIC (``corpus: {openi: {reports: ..., images: ...}}``), after
    the synthetic corpus's node for ``synth-openi`` (a synthetic OpenI made first)."""
    cls = corpus_entry(name).config_class()
    nodes: list[Node] = []
    if kind == "synth-openi":
        synth = check_call("corpus.synth-openi", inputs, write_openi)
        nodes.append(Node("synth-openi", work / "data" / "openi", synth, (), _run_synth_openi))
        inputs = {"reports": "@synth-openi/NLMCXR_reports.tgz", "images": "@synth-openi/images"}
    elif set(inputs) - set(cls.INPUTS):
        raise MflagError(f"corpus.{kind}: unknown keys {sorted(set(inputs) - set(cls.INPUTS))}; "
                         f"give {', '.join(cls.INPUTS)} (see `mflag prepare {name} --help`)")
    opts = check_keys("prepare", options, cls, {*cls.INPUTS, "out", "force"})
    try:  # "." stands in for the inputs: prepare checks the real ones when it runs
        validate("prepare", cls, opts, out="(planned)", **{k: "." for k in cls.INPUTS})
    except ConfigError as e:
        if not any(str(e).startswith(f"prepare.{k}:") for k in cls.INPUTS):
            raise
    given = {k: str(v) for k, v in inputs.items() if v is not None}
    nodes.append(Node("prepare", work / "prepare", {"corpus": name, **given, **opts}, tuple(n.name for n in nodes),
                      _run_prepare, inputs={"format": prepare.FORMAT_VERSION, **external(**given)},
                      verify=_verify_prepare))
    return nodes


def _text_nodes(text_model_section: Any, embed_section: Any, planned: _Planned) -> list[Node]:
    """``text_model`` and ``embed_text``: the stand-in encoder's node when built here, then embed-text."""
    tm = mapping("text_model", text_model_section)
    nodes: list[Node] = []
    if set(tm) - {"build", "model"}:
        raise MflagError(f"text_model: unknown keys {sorted(set(tm) - {'build', 'model'})}; give build or model")
    if "build" in tm:
        build = check_call("text_model.build", mapping("text_model.build", tm["build"]), build_tiny_bert,
                           skip=2, extra={"mlm_steps": int, "mlm_batch_size": int})
        nodes.append(Node("text-model", planned.work / "text-model", build, ("prepare",), _run_text_model))
        planned.model_ref = "@text-model/model"
    else:
        planned.model_ref = str(tm["model"])
    opts = check_keys("embed_text", mapping("embed_text", embed_section), embed_text.EmbedTextConfig,
                      {"reports", "out", "model"})
    validate("embed_text", embed_text.EmbedTextConfig, opts, reports="(planned)", out="(planned)",
             model="(planned)")
    planned.embed_opts = opts
    nodes.append(Node("embed-text", planned.work / "embed-text", {"model": planned.model_ref, **opts},
                      ("prepare", *(n.name for n in nodes)), _run_embed_text,
                      inputs={"format": CACHE_FORMAT, **external(model=planned.model_ref)},
                      verify=_verify_embed_text))
    return nodes


_TRAIN_RESERVED = {"shards", "text_cache", "out", "text_model", "reports"}  # set here, not in the YAML
_TRAIN_PLACEHOLDERS = dict(shards="(planned)", text_cache="(planned)", out="(planned)")
_ONLINE_PLACEHOLDERS = dict(text_model="(planned)", reports="(planned)")


def _train_nodes(section: Any, planned: _Planned) -> list[Node]:
    """``train``: one node per pre-training variant, or per variant and seed."""
    train = mapping("train", section)
    if set(train) - {"common", "variants", "seeds"}:
        raise MflagError(f"train: unknown keys {sorted(set(train) - {'common', 'variants', 'seeds'})}; "
                         "give common (options of every variant), variants and optionally seeds")
    config = train_vision.TrainVisionConfig
    common = check_keys("train.common", mapping("train.common", train.get("common")), config, _TRAIN_RESERVED)
    if "seed" in common and "seeds" in train:
        raise MflagError("train: give train.seeds (one run per seed) or train.common.seed, not both")
    validate("train.common", config, common,
             **_TRAIN_PLACEHOLDERS, **(_ONLINE_PLACEHOLDERS if common.get("text_mode") == "online" else {}))
    planned.all_seeds = seed_list("train.seeds", train.get("seeds"))
    nodes: list[Node] = []
    for name, overrides in train["variants"].items():
        where = f"train.variants.{name}"
        overrides = mapping(where, overrides)
        seeds = seed_list(f"{where}.seeds", overrides.pop("seeds")) if "seeds" in overrides else planned.all_seeds
        opts = {**common, **check_keys(where, overrides, config, _TRAIN_RESERVED)}
        if seeds is not None and "seed" in opts:
            raise MflagError(f"{where}: give seeds (one run per seed) or seed, not both")
        deps: tuple[str, ...] = ("prepare", "embed-text")
        if opts.get("text_mode") == "online":
            # the pipeline's text encoder, pooled and truncated as embed-text did, so that an online
            # run with nothing unfrozen computes the targets the cache holds
            opts.setdefault("text_pooling", planned.embed_opts.get("pooling", "cls"))
            opts.setdefault("text_max_length", planned.embed_opts.get("max_length", 512))
            opts.update(text_model=planned.model_ref, reports="@prepare/reports.jsonl")
            deps = (*deps, "text-model") if planned.has("text-model") else deps
        validate(where, config, {k: v for k, v in opts.items() if k not in _ONLINE_PLACEHOLDERS},
                 **_TRAIN_PLACEHOLDERS, **(_ONLINE_PLACEHOLDERS if opts.get("text_mode") == "online" else {}))
        planned.variant_seeds[name] = seeds
        ext = external(init=opts.get("init"), text_model=opts.get("text_model"))
        if seeds is None:
            nodes.append(Node(f"train:{name}", planned.work / "train" / name, opts, deps, _run_train, inputs=ext))
        for seed in seeds or []:
            nodes.append(Node(f"train:{name}:s{seed}", planned.work / "train" / name / f"seed-{seed}",
                              {**opts, "seed": seed}, deps, _run_train, inputs=ext))
    return nodes


def _downstream_nodes(section: Any, planned: _Planned) -> list[Node]:
    """``downstream``: a node per dataset generated here; every dataset's folder into ``planned.roots``."""
    down = mapping("downstream", section)
    if set(down) - {"synth", "roots"}:
        raise MflagError(f"downstream: unknown keys {sorted(set(down) - {'synth', 'roots'})}; give synth "
                         "(datasets to generate) and/or roots (dataset -> folder)")
    nodes: list[Node] = []
    for ds, opts in mapping("downstream.synth", down.get("synth")).items():
        if ds not in WRITERS:  # the registered datasets with a synthetic writer
            raise MflagError(f"downstream.synth: unknown dataset {ds!r}; one of {', '.join(WRITERS)}")
        opts = check_call(f"downstream.synth.{ds}", mapping(f"downstream.synth.{ds}", opts), WRITERS[ds])
        nodes.append(Node(f"synth:{ds}", planned.work / "data" / ds, {"dataset": ds, **opts}, (), _run_synth_down))
        planned.roots[ds] = f"@synth:{ds}"
    for ds, root in mapping("downstream.roots", down.get("roots")).items():
        planned.roots[ds] = str(root)
    return nodes


_EVAL_RESERVED = {"root", "out", "init"}  # set here, not in the YAML


def _eval_nodes(section: Any, planned: _Planned) -> list[Node]:
    """``eval``: a node per task and init (and seed, for a variant trained once per seed)."""
    ev = mapping("eval", section)
    if set(ev) - {"common", "inits", "tasks"}:
        raise MflagError(f"eval: unknown keys {sorted(set(ev) - {'common', 'inits', 'tasks'})}; give common, "
                         "inits and tasks")
    common = check_keys("eval.common", mapping("eval.common", ev.get("common")), evaluate.EvalConfig,
                        _EVAL_RESERVED)
    inits = names(ev.get("inits")) or ["random", *planned.variant_seeds]
    seen: set[tuple[str, str]] = set()  # (label, init) of the nodes so far
    nodes: list[Node] = []
    for k, task in enumerate(ev.get("tasks") or []):
        nodes.extend(_eval_task_nodes(f"eval.tasks[{k}]", task, common, inits, planned, seen))
    return nodes


def _eval_task_nodes(where: str, task: Any, common: dict, inits: list[str], planned: _Planned,
                     seen: set[tuple[str, str]]) -> list[Node]:
    """One entry of ``eval.tasks`` (its options over ``eval.common``) for each of its inits."""
    task = mapping(where, task)
    task_inits = names(task.pop("inits", None)) or inits  # a task may name its own inits
    task = check_keys(where, task, evaluate.EvalConfig, _EVAL_RESERVED)
    for section, opts in (("eval.common", common), (where, task)):
        if "dataset_options" in opts:
            mapping(f"{section}.dataset_options", opts["dataset_options"])
    entry = task_entry(str(task.get("task", common.get("task"))))
    # the tasks that train nothing read the pipeline's own text cache, text model and (retrieval) shards
    language = {} if entry.trains else {"text_cache": "@cache", "text_model": planned.model_ref,
                                        **({"shards": "@prepare"} if not entry.needs_dataset else {})}
    if "shards" in language and planned.corpus == "synth" and "retrieval_labels" not in task:
        # the synthetic MIMIC tree has CheXpert labels per study: class-based Precision@K too
        language["retrieval_labels"] = "@synth-mimic/mimic-cxr-2.0.0-chexpert.csv.gz"
    try:
        validate(where, evaluate.EvalConfig, {**common, **task, **language}, root="(planned)", out="(planned)",
                 init="random", **({k: "(planned)" for k in language}))
    except ConfigError as e:
        field = str(e)[len(where) + 1:].split(":", 1)[0]
        if field in common and field not in task:  # the bad value came from eval.common
            raise ConfigError("eval.common." + str(e)[len(where) + 1:]) from e
        raise
    ds = task.get("dataset", common.get("dataset"))
    if entry.needs_dataset and ds not in planned.roots:
        raise MflagError(f"eval.tasks: dataset {ds!r} has no data; add it under downstream.synth or "
                         "downstream.roots")
    variants = planned.variant_seeds
    nodes: list[Node] = []
    for init in task_inits:
        opts = {**common, **task, **language}
        deps: list[str] = [] if entry.trains else [
            "embed-text", *(["prepare"] if "shards" in language else []),
            *(["text-model"] if planned.has("text-model") else [])]
        if init not in variants and init not in ("random", "imagenet") and not Path(init).is_file():
            raise MflagError(f"eval.inits: {init!r} is not a train variant, random, imagenet or a file")
        if planned.has(f"synth:{ds}"):
            deps.append(f"synth:{ds}")
        label = f"{opts['task']}-{ds}" if entry.needs_dataset else f"{opts['task']}-{opts.get('split', 'test')}"
        if opts["task"] == "zeroshot":
            label = f"zeroshot-{opts.get('zeroshot_protocol') or default_protocol(ds)}-{ds}"
        if "fraction" in task:
            label += f"@{opts['fraction']:g}"
        if (label, init) in seen:
            raise MflagError(f"eval.tasks: {label} with init {init} is listed twice")
        seen.add((label, init))
        folder = init if init in variants or init in ("random", "imagenet") else f"file-{Path(init).stem}"
        out = planned.work / "eval" / label / folder
        root = planned.roots[ds] if entry.needs_dataset else None
        ext = external(root=root, init=None if init in variants else init,
                       split_file=opts.get("split_file"), prompts=opts.get("prompts"))
        ext["format"] = evaluate.FORMAT_VERSION
        params = {"root": root, "init": init, **opts}
        if init in variants and variants[init] is not None:
            # pre-training replicate s is evaluated with downstream seed s: the pairing unit
            for seed in variants[init]:
                nodes.append(Node(f"eval:{label}:{init}:s{seed}", out / f"seed-{seed}",
                                  {**params, "init": f"{init}:s{seed}", "seeds": [seed]},
                                  (*deps, f"train:{init}:s{seed}"), _run_eval, inputs=ext))
            continue
        if init in variants:
            deps.append(f"train:{init}")
        elif planned.all_seeds is not None and "seeds" not in opts:
            params["seeds"] = list(planned.all_seeds)  # not pre-trained: one downstream seed per replicate
        nodes.append(Node(f"eval:{label}:{init}", out, params, tuple(deps), _run_eval, inputs=ext))
    return nodes


def _report_node(section: Any, planned: _Planned) -> Node:
    """``report``: reads every train and eval stage."""
    deps = tuple(n.name for n in planned.nodes if n.name.startswith(("train:", "eval:")))
    opts = check_keys("report", mapping("report", section), report.ReportConfig,
                      {"out", "trains", "evals", "text_cache"})
    return Node("report", planned.work / "report", opts, deps, _run_report)


def _plan_nodes(cfg: RunConfig) -> tuple[dict[str, Any], list[Node]]:
    spec = load_spec(cfg.config, cfg.workdir)
    try:
        return spec, build_nodes(spec)
    except MflagError as e:
        raise type(e)(f"{cfg.config}: {e}") from e


# --------------------------------------------------------------------------- runners
def _run_synth_mimic(node: Node, by_name) -> None:
    p = dict(node.params)
    write_mimic(node.out_dir, n_studies=int(p.pop("n_studies", 1000)), seed=int(p.pop("seed", 0)), **p)


def _run_synth_openi(node: Node, by_name) -> None:
    p = dict(node.params)
    write_openi(node.out_dir, n_reports=int(p.pop("n_reports")), seed=int(p.pop("seed", 0)), **p)


def _run_synth_down(node: Node, by_name) -> None:
    p = dict(node.params)
    ds = p.pop("dataset")
    WRITERS[ds](node.out_dir, n=int(p.pop("n", 200)), seed=int(p.pop("seed", 0)), **p)


def _run_prepare(node: Node, by_name) -> None:
    p = dict(node.params)
    name = p.pop("corpus", None)
    if name is not None:  # any corpus but MIMIC, whose parameters stay as they were (its fingerprints too)
        cls = corpus_entry(name).config_class()
        given = {k: resolve(p.pop(k), by_name) for k in cls.INPUTS if k in p}
        prepare.run(cls(out=str(node.out_dir), force=False, **given, **tuples(p)))
        return
    cfg = prepare.PrepareConfig(root=resolve(p.pop("root"), by_name), reports=p.pop("reports"),
                                out=str(node.out_dir), force=False, **tuples(p))
    prepare.run(cfg)


def _reports_path(by_name) -> Path:
    return by_name["prepare"].out_dir / "reports.jsonl"


def _run_text_model(node: Node, by_name) -> None:
    """Build the demo's stand-in text encoder: a WordPiece tokenizer and a small BERT trained briefly
    with MLM on the corpus reports. Clearly not CXR-BERT; it only has to make report embeddings
    reflect what reports say, which is all the frozen-text design needs."""
    p = dict(node.params)
    texts = [json.loads(line)["text"] for line in read_text_utf8(_reports_path(by_name)).splitlines()
             if line.strip()]
    mlm_steps = int(p.pop("mlm_steps", 200))
    mlm_batch = int(p.pop("mlm_batch_size", 32))
    seed = int(p.get("seed", 0))
    model_dir = build_tiny_bert(texts, node.out_dir / "model", **p)
    stats = pretrain_mlm(model_dir, texts, steps=mlm_steps, batch_size=mlm_batch, seed=seed) if mlm_steps else {}
    write_json(node.out_dir / "text-model.json", {"params": node.params, "mlm": stats,
                                                   "note": "stand-in for CXR-BERT, built from the corpus"})


def _run_embed_text(node: Node, by_name) -> None:
    p = dict(node.params)
    model = resolve(p.pop("model"), by_name)
    cfg = embed_text.EmbedTextConfig(reports=str(_reports_path(by_name)), out=str(node.out_dir / "caches"),
                                     model=model, **tuples(p))
    res = embed_text.run(cfg)
    # The orchestrator points training at the exact cache folder of this configuration.
    write_json(node.out_dir / "cache.json", {"path": str(res.cache_dir)})


def _verify_prepare(node: Node) -> str | None:
    """Every shard manifest.json records is there at the size prepare wrote (stat only, so status stays
    instant; train-vision hashes them before training); why not, or None."""
    manifest = node.out_dir / "manifest.json"
    try:
        files = read_json(manifest).get("shard_files") or {}
    except (MflagError, OSError) as e:
        return f"{manifest}: {e}"
    for name, rec in sorted(files.items()):
        tar = node.out_dir / "shards" / str(name)
        try:
            size = tar.stat().st_size
        except OSError:
            return f"{tar} is missing"
        if size != rec.get("bytes"):
            return f"{tar}: {size} bytes, prepare wrote {rec.get('bytes')}"
    return None


def _verify_embed_text(node: Node) -> str | None:
    """The finished cache checked as train-vision checks it before training (every shard's fingerprint
    and sha256 against index.json); why it is unusable, or None."""
    try:
        TextEmbeddingCache(read_json(node.out_dir / "cache.json")["path"]).check_files()
    except (MflagError, OSError, KeyError, TypeError) as e:
        return str(e)
    return None


def _cache_dir(by_name) -> str:
    return read_json(by_name["embed-text"].out_dir / "cache.json")["path"]


def _run_train(node: Node, by_name) -> None:
    p = dict(node.params)
    if p.get("text_mode") == "online":
        p.update(text_model=resolve(p["text_model"], by_name), reports=resolve(p["reports"], by_name))
        cache = None
    else:
        cache = _cache_dir(by_name)
    cfg = train_vision.TrainVisionConfig(shards=str(by_name["prepare"].out_dir), text_cache=cache,
                                         out=str(node.out_dir), **tuples(p))
    train_vision.run(cfg)


def _run_eval(node: Node, by_name) -> None:
    p = dict(node.params)
    init = p.pop("init")  # a variant, <variant>:s<seed> for a seeded one, random, imagenet or a file
    train_node = by_name.get(f"train:{init}")
    trains = task_entry(p["task"]).trains
    # a trained head needs the encoder; zero-shot and retrieval read the whole run folder (projector, text head)
    init_ref = (str(train_node.out_dir / "encoder.pt") if trains else str(train_node.out_dir)) if train_node else init
    opts = p.pop("dataset_options", None) or {}
    if p.get("text_cache") == "@cache":
        p["text_cache"] = _cache_dir(by_name)
    for key in ("shards", "text_model", "retrieval_labels"):
        if p.get(key):
            p[key] = resolve(p[key], by_name)
    root = p.pop("root", None)
    cfg = evaluate.EvalConfig(root=resolve(root, by_name) if root else None, out=str(node.out_dir), init=init_ref,
                              dataset_options=tuple(sorted(opts.items())), **tuples(p))
    evaluate.run(cfg)


def _run_report(node: Node, by_name) -> None:
    # names: <variant> or <variant>:s<seed> (the report groups replicates by variant)
    trains = {n.split(":", 1)[1]: by_name[n].out_dir for n in by_name if n.startswith("train:")}
    evals = {n: by_name[n].out_dir for n in by_name if n.startswith("eval:")}
    cache = _cache_dir(by_name) if "embed-text" in by_name else None
    report.run(report.ReportConfig(out=str(node.out_dir), trains=tuple((k, str(v)) for k, v in trains.items()),
                                   evals=tuple((k, str(v)) for k, v in evals.items()), text_cache=cache,
                                   **dict(node.params)))


# --------------------------------------------------------------------------- entry points
@dataclasses.dataclass
class RunResult:
    workdir: Path
    steps: list[dict]


def run(cfg: RunConfig) -> RunResult:
    """Run the pipeline; the workdir is locked for the whole run (each stage also locks its own folder,
    which this process may take again), so two pipeline runs on one workdir never interleave."""
    spec, nodes = _plan_nodes(cfg)
    check_inputs_exist(cfg.config, nodes)
    work = Path(spec["workdir"])
    with output_lock(work, "run"):
        save_config(cfg, work, name="run-config.json", pipeline=spec)
        steps = execute(nodes, force=cfg.force, from_stage=cfg.from_stage, log=log)
    return RunResult(work, steps)


def status(cfg: RunConfig) -> list[NodeStatus]:
    """Each stage as fresh, stale, missing or forced, with the reason (``pipeline.run.graph.explain``:
    what ``run`` with the same ``force``/``from_stage`` would do); changes nothing on disk."""
    _, nodes = _plan_nodes(cfg)
    return explain(nodes, cfg.force, cfg.from_stage)
