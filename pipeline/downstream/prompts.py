"""Prompt sets of the zero-shot protocols, and user prompt files (``--prompts``).

- GLoRIA's CheXpert class prompts (marshuang80/gloria, gloria/constants.py lines 77-169, the same in MGCA's
  and MedCLIP's constants): per class, word lists whose product gives the prompt pool, joined in the
  dict's key order as ``f"{a} {b} {c}"`` without stripping (gloria/gloria.py lines 278-306; Pleural
  Effusion's order is severity, location, subtype). Duplicated entries and typos are theirs and kept, so
  the pools are the published ones. GLoRIA draws ``random.sample(pool, 5)`` per class, in class order,
  from ``random.seed(6)``; :func:`gloria_class_prompts` with seed 0 reproduces that draw (``Random(6 +
  seed)``), other seeds give other draws.
- CheXzero's binary pair (rajpurkarlab/CheXzero, zero_shot.py line 526): positive ``"{}"``, negative
  ``"no {}"``, filled with the label name as written (the tokenizer lower-cases).
- A prompts file (YAML or JSON): ``{class: [prompt, ...]}`` for chexpert5x200, or
  ``{label: {positive: [...], negative: [...]}}`` for binary; it must give every class of the dataset,
  no other, and no empty list.
"""
from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import yaml

from pipeline.common import MflagError, read_text_utf8

GLORIA_PROMPT_SEED = 6  # gloria/gloria.py lines 16-17: random.seed(6) at import
CHEXPERT_CLASS_PROMPTS: dict[str, dict[str, list[str]]] = {
    "Atelectasis": {
        "severity": ["", "mild", "minimal"],
        "subtype": ["subsegmental atelectasis", "linear atelectasis", "trace atelectasis", "bibasilar atelectasis",
                    "retrocardiac atelectasis", "bandlike atelectasis", "residual atelectasis"],
        "location": ["at the mid lung zone", "at the upper lung zone", "at the right lung zone",
                     "at the left lung zone", "at the lung bases", "at the right lung base", "at the left lung base",
                     "at the bilateral lung bases", "at the left lower lobe", "at the right lower lobe"],
    },
    "Cardiomegaly": {
        "severity": [""],
        "subtype": ["cardiac silhouette size is upper limits of normal", "cardiomegaly which is unchanged",
                    "mildly prominent cardiac silhouette",
                    "portable view of the chest demonstrates stable cardiomegaly",
                    "portable view of the chest demonstrates mild cardiomegaly", "persistent severe cardiomegaly",
                    "heart size is borderline enlarged", "cardiomegaly unchanged",
                    "heart size is at the upper limits of normal", "redemonstration of cardiomegaly",
                    "ap erect chest radiograph demonstrates the heart size is the upper limits of normal",
                    "cardiac silhouette size is mildly enlarged",
                    "mildly enlarged cardiac silhouette, likely left ventricular enlargement. other chambers are "
                    "less prominent",
                    "heart size remains at mildly enlarged",
                    "persistent cardiomegaly with prominent upper lobe vessels"],
        "location": [""],
    },
    "Consolidation": {
        "severity": ["", "increased", "improved", "apperance of"],
        "subtype": ["bilateral consolidation", "reticular consolidation", "retrocardiac consolidation",
                    "patchy consolidation", "airspace consolidation", "partial consolidation"],
        "location": ["at the lower lung zone", "at the upper lung zone", "at the left lower lobe",
                     "at the right lower lobe", "at the left upper lobe", "at the right uppper lobe",
                     "at the right lung base", "at the left lung base"],
    },
    "Edema": {
        "severity": ["", "mild", "improvement in", "presistent", "moderate", "decreased"],
        "subtype": ["pulmonary edema", "trace interstitial edema", "pulmonary interstitial edema"],
        "location": [""],
    },
    "Pleural Effusion": {
        "severity": ["", "small", "stable", "large", "decreased", "increased"],
        "location": ["left", "right", "tiny"],
        "subtype": ["bilateral pleural effusion", "subpulmonic pleural effusion", "bilateral pleural effusion"],
    },
}
BINARY_TEMPLATES = ("{}", "no {}")  # CheXzero's default (positive, negative)


class PromptsError(MflagError):
    """A prompts file that cannot be used (names the file and the class)."""


def gloria_pool(cls: str) -> list[str]:
    """Every prompt of GLoRIA's templates for ``cls``, in GLoRIA's generation order (duplicates kept)."""
    parts = CHEXPERT_CLASS_PROMPTS[cls]
    return [f"{a} {b} {c}" for a, b, c in itertools.product(*(parts[k] for k in parts))]


def gloria_class_prompts(n: int, seed: int = 0) -> dict[str, list[str]]:
    """``n`` prompts per CheXpert competition class drawn as GLoRIA draws them (``random.sample`` in class
    order from one generator), the generator seeded ``GLORIA_PROMPT_SEED + seed``; n larger than a
    class's pool takes the whole pool."""
    rng = random.Random(GLORIA_PROMPT_SEED + seed)
    out = {}
    for cls in CHEXPERT_CLASS_PROMPTS:
        pool = gloria_pool(cls)
        out[cls] = rng.sample(pool, n) if n < len(pool) else pool
    return out


def binary_prompts(labels, templates: tuple[str, str] = BINARY_TEMPLATES) -> dict[str, dict[str, list[str]]]:
    """CheXzero's pair per label: {label: {"positive": ["{label}"], "negative": ["no {label}"]}}."""
    return {c: {"positive": [templates[0].format(c)], "negative": [templates[1].format(c)]} for c in labels}


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the second silently), as the
    pipeline YAML's loader does (pipeline.run.spec)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                if key in seen:
                    raise PromptsError(f"key {key!r} is given twice (lines {seen[key]} and {line}); keep one of them")
                seen[key] = line
        return super().construct_mapping(node, deep)


def _read(path: Path):
    try:
        text = read_text_utf8(path)  # UTF-8, BOM tolerated; a bad byte is one line naming the line
    except OSError as e:
        raise PromptsError(f"--prompts {path}: cannot read ({e})") from e
    except MflagError as e:
        raise PromptsError(f"--prompts {e}") from None
    try:
        return json.loads(text) if path.suffix.lower() == ".json" else yaml.load(text, Loader=_YamlLoader)
    except PromptsError as e:
        raise PromptsError(f"--prompts {path}: {e}") from None
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise PromptsError(f"--prompts {path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'} "
                           f"({str(e).splitlines()[0]})") from e


def _texts(path: Path, where: str, value) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PromptsError(f"--prompts {path}: {where}: expected a list of prompt texts, got {value!r}"[:300])
    texts = [v for v in value if v.strip()]
    if not texts:
        raise PromptsError(f"--prompts {path}: {where}: no prompt (an empty list or only empty texts)")
    return texts


def load_prompts_file(path: str | Path, classes, protocol: str) -> dict:
    """The prompts of ``path`` for ``classes`` under ``protocol`` (chexpert5x200 | binary); every class
    given, none unknown, none empty, else one PromptsError naming the file and the class."""
    path = Path(path)
    data = _read(path)
    if not isinstance(data, dict) or not data:
        raise PromptsError(f"--prompts {path}: expected a mapping of class -> prompts")
    classes = list(classes)
    unknown = [str(k) for k in data if k not in classes]
    if unknown:
        raise PromptsError(f"--prompts {path}: unknown class {unknown[0]!r} (the classes are {', '.join(classes)})")
    missing = [c for c in classes if c not in data]
    if missing:
        raise PromptsError(f"--prompts {path}: no prompts for class {missing[0]!r} (every class needs them: "
                           f"{', '.join(classes)})")
    if protocol != "binary":
        return {c: _texts(path, f"class {c!r}", data[c]) for c in classes}
    out = {}
    for c in classes:
        entry = data[c]
        if not isinstance(entry, dict) or set(entry) != {"positive", "negative"}:
            raise PromptsError(f"--prompts {path}: class {c!r}: the binary protocol needs "
                               "{positive: [...], negative: [...]}")
        out[c] = {side: _texts(path, f"class {c!r} {side}", entry[side]) for side in ("positive", "negative")}
    return out
