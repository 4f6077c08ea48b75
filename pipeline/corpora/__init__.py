"""The corpora ``prepare`` reads, by name: each is one module with its config dataclass and its reader.

A corpus module (``pipeline/corpora/<name>.py``) defines a config class (subclass of
:class:`~pipeline.corpora.base.ShardOptions`, adding its inputs and own options) and
``read(cfg, report) -> Selection``. Adding a corpus is that module plus one line in ``CORPORA``: the
``prepare <name>`` command, the pipeline YAML's ``corpus: {<name>: ...}``, docs/OPTIONS.md and the
shard writer all follow from the entry. Modules are imported when first used, so the command line
stays quick.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from pipeline.common import MflagError

# Nothing heavier than the names is imported here: `mflag --help` lists the corpora without numpy or
# PIL; the record types are in pipeline.corpora.base.
__all__ = ["CORPORA", "Corpus", "corpus", "corpus_of"]


@dataclass(frozen=True)
class Corpus:
    """A registry entry: the command/YAML name, its module, its config class and a one-line summary."""

    name: str
    module: str
    config: str
    summary: str

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    def config_class(self) -> type:
        return getattr(self.load(), self.config)

    @property
    def config_path(self) -> str:
        """``module:Class``, as ``cli.StageCommand`` takes it (imported when the command is used)."""
        return f"{self.module}:{self.config}"


CORPORA: dict[str, Corpus] = {c.name: c for c in (
    Corpus("mimic", "pipeline.corpora.mimic", "MimicConfig",
           "MIMIC-CXR-JPG images + reports -> OUT/shards/<split>-NNNNNN.tar, OUT/reports.jsonl, manifest."),
    Corpus("openi", "pipeline.corpora.openi", "OpenIConfig",
           "IU X-ray / OpenI (NLMCXR_reports.tgz + PNGs) -> shards, reports.jsonl, manifest."),
    Corpus("chexpert-plus", "pipeline.corpora.chexpert_plus", "ChexpertPlusConfig",
           "CheXpert Plus (df_chexpert_plus_240401.csv + images) -> shards, reports.jsonl, manifest."),
    Corpus("pairs", "pipeline.corpora.pairs", "PairsConfig",
           "Any image-report table (CSV, JSONL or Parquet) + an image folder -> shards, reports.jsonl, manifest."),
)}


def corpus(name: str) -> Corpus:
    try:
        return CORPORA[name]
    except KeyError:
        raise MflagError(f"unknown corpus {name!r}; one of {', '.join(CORPORA)}") from None


def corpus_of(cfg) -> Corpus:
    """The registry entry whose config class ``cfg`` is an instance of."""
    for c in CORPORA.values():
        if type(cfg).__module__ == c.module and type(cfg).__name__ == c.config:
            return c
    raise MflagError(f"{type(cfg).__name__} is not the config of a registered corpus")
