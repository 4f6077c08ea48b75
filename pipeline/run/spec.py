"""The pipeline YAML (``cli.py run``): reading and checking it, and the helpers that turn its sections
into stage parameters.

``load_spec`` reads the YAML (any number written with an exponent is a float) and checks its top level;
``check_keys`` / ``check_call`` check a section's options against a config dataclass's fields or a
function's parameters and normalise their types; ``validate`` builds a stage's config once at planning
time so that a bad value fails before anything runs; ``external`` signs the outside files a stage reads,
``resolve`` turns ``@stage/path`` references into folders; ``check_inputs_exist`` checks the outside
inputs before a run. The stage graph itself is built by ``stages.orchestrate.build_nodes``.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from pathlib import Path
from typing import Any

import torch
import yaml

from pipeline.common import ConfigError, MflagError, coerce_to_hint, read_text_utf8
from pipeline.corpora import CORPORA
from pipeline.run.graph import Node, path_signature
from pipeline.vision.checkpoints import imagenet_weights_path

# corpus: synthetic MIMIC, synthetic OpenI, or one of the registry's (pipeline/corpora) with its inputs
SYNTH_CORPORA = ("synth", "synth-openi")  # a synthetic MIMIC / OpenI written first, then prepared


def corpus_keys() -> tuple[str, ...]:
    """The names the YAML's ``corpus:`` section takes: the synthetic ones and every registered corpus
    (read from ``CORPORA`` when a YAML is checked, so a corpus added to the registry is one here too)."""
    return (*SYNTH_CORPORA, *CORPORA)
TOP_KEYS = {"workdir", "corpus", "text_model", "prepare", "embed_text", "train", "downstream", "eval",
            "report"}



class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``2e-5`` as text (its floats need a dot, ``2.0e-5``); here any number written
    with an exponent is a float, as a reader of the README expects. A key given twice in one mapping
    is refused (PyYAML keeps the second value silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue  # complex keys are refused by SafeLoader itself (unhashable)
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise _DuplicateKey(f"key {key!r} is given twice (lines {seen[key]} and {line}); "
                                        "keep one of them")
                seen[key] = line
        return super().construct_mapping(node, deep)


class _DuplicateKey(MflagError):
    pass


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_spec(path: str | Path, workdir: str | None = None) -> dict[str, Any]:
    """Read and check a pipeline YAML; relative paths are taken from the current directory."""
    path = Path(path)
    try:
        spec = yaml.load(read_text_utf8(path), Loader=_Loader) or {}
    except yaml.YAMLError as e:
        raise MflagError(f"{path}: not valid YAML ({e})") from e
    except _DuplicateKey as e:
        raise MflagError(f"{path}: {e}") from e
    if not isinstance(spec, dict):
        raise MflagError(f"{path}: the top level must be a mapping")
    unknown = set(spec) - TOP_KEYS
    if unknown:
        raise MflagError(f"{path}: unknown top-level keys {sorted(unknown)}; allowed: {sorted(TOP_KEYS)}")
    spec.setdefault("workdir", "runs/pipeline")
    if workdir:
        spec["workdir"] = workdir
    corpus = spec.get("corpus") or {}
    prepare = spec.get("prepare") if isinstance(spec.get("prepare"), dict) else {}
    if not isinstance(corpus, dict) or (len(corpus) != 1 or next(iter(corpus)) not in corpus_keys()) and \
            not (not corpus and prepare.get("corpus")):
        raise MflagError(f"{path}: corpus must have exactly one of 'synth' or 'mimic' (or another corpus: "
                         f"{', '.join(k for k in corpus_keys() if k not in ('synth', 'mimic'))}), or prepare must "
                         "name one (prepare: {corpus: openi, reports: ..., images: ...})")
    tm = spec.get("text_model") or {}
    if ("build" in tm) == ("model" in tm):
        raise MflagError(f"{path}: text_model must have exactly one of 'build' (a small stand-in built "
                         "from the corpus) or 'model' (a hub id or local folder, e.g. "
                         "microsoft/BiomedVLP-CXR-BERT-general)")
    variants = (spec.get("train") or {}).get("variants") or {}
    if not isinstance(variants, dict) or not variants:
        raise MflagError(f"{path}: train.variants must name at least one pre-training variant")
    for name in variants:
        if not isinstance(name, str) or name in ("random", "imagenet") or ":" in name or "/" in name:
            raise MflagError(f"{path}: train variant name {name!r} is reserved or has ':' or '/'")
    return spec


def config_fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def mapping(section: str, value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MflagError(f"{section}: expected a mapping of options, got {type(value).__name__} {value!r}")
    return dict(value)


def check_keys(section: str, options: dict, cls, reserved: set[str]) -> dict:
    """``options`` checked against the fields of the config dataclass ``cls`` (minus ``reserved``, which
    the orchestrator sets) and against their types; returns them with numbers and lists normalised."""
    allowed = config_fields(cls) - reserved
    bad = set(options) - allowed
    if bad:
        raise MflagError(f"{section}: unknown or orchestrator-owned options {sorted(bad)}; "
                         f"allowed: {', '.join(sorted(allowed))}")
    return coerce(section, options, typing.get_type_hints(cls))


def check_call(section: str, options: dict, fn, skip: int = 1, extra: dict | None = None) -> dict:
    """``options`` checked against the keyword parameters of ``fn`` (after its first ``skip``
    positional ones) plus ``extra`` (name -> type); returns them type-normalised."""
    params = list(inspect.signature(fn).parameters.values())[skip:]
    hints = typing.get_type_hints(fn)
    allowed = {p.name: hints.get(p.name) for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    allowed.update(extra or {})
    bad = set(options) - set(allowed)
    if bad:
        raise MflagError(f"{section}: unknown options {sorted(bad)}; allowed: {', '.join(sorted(allowed))}")
    return coerce(section, options, allowed)


def coerce(section: str, options: dict, hints: dict) -> dict:
    return {k: coerce_to_hint(f"{section}.{k}", v, hints.get(k)) for k, v in options.items()}


def seed_list(where: str, value: Any) -> list[int] | None:
    """A YAML list of distinct non-negative seeds (or one seed), or None when not given."""
    if value is None:
        return None
    seeds = coerce_to_hint(where, value, tuple[int, ...])
    if not seeds or len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise MflagError(f"{where}: expected distinct non-negative seeds, got {value!r}")
    return list(seeds)


def names(value: Any) -> list[str]:
    """A YAML list of names, or one name written alone (``inits: random``)."""
    if value is None:
        return []
    return [str(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def external(**paths: str | None) -> dict[str, str]:
    """Content signatures of the parameters that name files or folders outside the pipeline (not
    ``@stage`` references, not hub ids or ``random``/``imagenet``), so replacing one makes the stage stale."""
    return {k: path_signature(v) for k, v in paths.items()
            if isinstance(v, str) and not v.startswith("@") and v not in ("random", "imagenet")
            and Path(v).expanduser().exists()}


def validate(section: str, cls, options: dict, **placeholders) -> None:
    """Build the stage's config once at planning time (paths are placeholders), so a bad value fails
    before any stage runs, not hours later when its stage starts."""
    kw = {k: v for k, v in options.items() if k not in placeholders}
    if "dataset_options" in kw and isinstance(kw["dataset_options"], dict):
        kw["dataset_options"] = tuple(sorted(kw["dataset_options"].items()))
    try:
        cls(**placeholders, **tuples(kw))
    except ConfigError as e:
        raise ConfigError(f"{section}.{e}") from e
    except TypeError as e:  # a required option is missing
        raise ConfigError(f"{section}: {str(e).replace('__init__()', cls.__name__)}") from e


def resolve(ref: str, by_name) -> str:
    """``@stage`` (or ``@stage/sub/path``) names the output folder of another stage of this pipeline
    (or a path inside it). Parameters hold the
    reference, not the path, so a workdir spelled differently (relative, absolute, moved) does not
    make stages stale; the upstream stage's fingerprint already stands for its content."""
    if isinstance(ref, str) and ref.startswith("@"):
        stage, _, sub = ref[1:].partition("/")
        return str(by_name[stage].out_dir / sub) if sub else str(by_name[stage].out_dir)
    return ref


def tuples(options: dict) -> dict:
    """YAML lists become tuples, as the frozen configs expect."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}


def check_inputs_exist(config: str, nodes: list[Node]) -> None:
    """Before running anything: the outside inputs the stages will need are there. (``status`` skips
    this, so a plan can be shown on a machine without the data.)"""
    problems = []
    imagenet = [n.name for n in nodes if n.params.get("init") == "imagenet"]
    if imagenet and imagenet_weights_path() is None:
        problems.append(f"{', '.join(imagenet[:3])}{' ...' if len(imagenet) > 3 else ''} use init imagenet, "
                        f"but the ImageNet ResNet50 weights are not in the torch hub cache "
                        f"({Path(torch.hub.get_dir()) / 'checkpoints'}); fill it once with network (README, "
                        "Real data step 0) or name a weights file")
    for n in nodes:
        for key in ("root", "reports", "images", "projections", "csv", "table", "image_root"):
            v = n.params.get(key)
            if isinstance(v, str) and not v.startswith("@") and not Path(v).expanduser().exists():
                where = (f"corpus.{n.params.get('corpus', 'mimic')}.{key}" if n.name == "prepare"
                         else f"downstream.roots.{n.params.get('dataset')}")
                problems.append(f"{where} (stage {n.name}): {v} does not exist")
    if problems:
        raise MflagError(f"{config}: " + "; ".join(dict.fromkeys(problems)))
