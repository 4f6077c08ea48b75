"""Downstream train/val/test splits and label-fraction subsets of train, under two protocols.

``protocol="mgca"`` reproduces MGCA's published lists id for id (``pipeline.downstream.mgca_splits``; the table is
in docs/PROTOCOLS.md): one fixed split and one list per fraction, shared by all seeds. Where MGCA's
lists share patients or images (CheXpert's validation rows stay in training, SIIM is split by CSV row,
COVIDx by image), the split says how many (``Split.leaks``, a warning) and keeps them.

``protocol="tool"`` (the default), see FORMATS.md "Data fractions and splits":
- A dataset's own held-out split is the test set: CheXpert ``valid`` (the official test set is hidden;
  MGCA and CheXclusion also test on it), COVIDx ``test``, Object-CXR ``dev``. Validation is then drawn
  by patient from the official training part (default 10%). RSNA and SIIM define no split: patients are
  drawn 70/15/15. Training records whose patient is also in the official test part are dropped (and
  counted) so no patient crosses splits. Datasets without patient ids use the image id as the patient.
- Every random draw uses a generator seeded from a hash of (purpose, dataset, seed, ...), never a
  global RNG, so results do not depend on call order.
- Fractions are drawn from the training split only, by image, as a prefix of one seed-specific
  permutation (so the 1% subset is inside the 10% subset for the same seed), then repaired so every
  class with a positive in train has at least one positive in the subset.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from pipeline.common import MflagError, atomic_open, open_text_utf8, read_json, read_text_utf8, write_json
from pipeline.downstream.datasets.base import DatasetSpec, Record
from pipeline.downstream.datasets.registry import PROTOCOLS, mgca_lists, mgca_pairs
from pipeline.downstream.mgca_splits import FractionDraw, MgcaSplitError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
OFFICIAL_TEST = ("valid", "dev", "test")  # official_split values that become our test split
FRACTIONS = (0.01, 0.1, 1.0)
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validate": "val",
                  "validation": "val", "dev": "val", "test": "test", "testing": "test"}
_ID_COLUMNS = ("image_id", "ImageId", "patientId", "Path", "image_name", "filename", "id")
PAIRS = (("train", "val"), ("train", "test"), ("val", "test"))


class SplitError(MflagError):
    """A split is unusable (overlapping, unknown ids, edited since written); the message says where."""


@dataclasses.dataclass
class Split:
    """Image ids per split; ``source`` says how it was made ("generated" or the file it came from).

    ``protocol`` describes how the lists were drawn (text); ``scheme`` is the --protocol they follow,
    "tool" or "mgca". ``leaks``: {"patients"|"images": {"train/val"|"train/test"|"val/test": n}}, the
    patients and image ids two lists share (always 0 under "tool"), None when unknown.
    ``missing_images``: ids of MGCA's lists left out because their image is not on disk.
    ``draw``: how MGCA draws each fraction (splits made here under "mgca"); ``fraction_files``: the
    fraction lists a split.json names (split folders read from disk).
    """

    train: list[str]
    val: list[str]
    test: list[str]
    dataset: str = ""
    seed: int | None = None
    source: str = "generated"
    protocol: str = ""
    dropped: int = 0  # images left out so that no patient is in two splits
    scheme: str = "tool"
    leaks: dict[str, dict[str, int]] | None = None
    missing_images: int = 0
    draw: FractionDraw | None = dataclasses.field(default=None, repr=False, compare=False)
    fraction_files: tuple[dict, ...] = dataclasses.field(default=(), repr=False, compare=False)

    def ids(self, name: str) -> list[str]:
        if name not in SPLITS:
            raise KeyError(f"split name must be one of {SPLITS}, not {name!r}")
        return getattr(self, name)

    def counts(self) -> dict[str, int]:
        return {s: len(self.ids(s)) for s in SPLITS}

    def hashes(self) -> dict[str, str]:
        """sha256 of each id list as written (one id per line), plus "all" over the three."""
        h = {s: ids_sha256(self.ids(s)) for s in SPLITS}
        h["all"] = hashlib.sha256("".join(f"{s}:{h[s]}\n" for s in SPLITS).encode()).hexdigest()
        return h


def ids_sha256(ids: Iterable[str]) -> str:
    """sha256 of the id list file content (``sha256sum train.txt`` gives the same digest)."""
    return hashlib.sha256(_ids_text(ids).encode("utf-8")).hexdigest()


def _ids_text(ids: Iterable[str]) -> str:
    return "".join(f"{i}\n" for i in ids)


def derived_rng(*parts: object) -> np.random.Generator:
    """A generator seeded only by ``parts`` (purpose, dataset, seed, ...): independent of call order."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode("utf-8")).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


# --------------------------------------------------------------------------- making splits
def make_split(spec: DatasetSpec, seed: int = 0, val_frac: float | None = None, test_frac: float | None = None,
               use_official: bool = True, protocol: str = "tool") -> Split:
    """Deterministic train/val/test split of ``spec`` (see the module docstring).

    ``protocol="tool"``: disjoint by patient, drawn with ``seed``. ``val_frac`` defaults to 0.1 of the
    training patients when the dataset has an official test part and 0.15 of all patients otherwise;
    ``test_frac`` (default 0.15) only applies without an official test.
    ``protocol="mgca"``: MGCA's lists for ``spec.task`` from ``spec.label_rows`` (read the dataset with
    protocol "mgca"); ``seed``, ``val_frac``, ``test_frac`` and ``use_official`` do not apply. Ids whose
    image is not among ``spec.records`` are left out and counted; shared patients and images are
    counted in ``leaks`` and logged as warnings.
    """
    if protocol not in PROTOCOLS:
        raise SplitError(f"unknown protocol {protocol!r} (one of {', '.join(PROTOCOLS)})")
    if protocol == "mgca":
        if val_frac is not None or test_frac is not None or not use_official:
            raise SplitError("val_frac, test_frac and use_official do not apply to MGCA's split")
        return _make_mgca_split(spec)
    split = _make_tool_split(spec, seed, val_frac, test_frac, use_official)
    split.leaks = count_leaks(split, spec)
    return split


def _make_tool_split(spec: DatasetSpec, seed: int, val_frac: float | None, test_frac: float | None,
                     use_official: bool) -> Split:
    records = spec.records
    if not records:
        raise SplitError(f"dataset {spec.name!r} has no records to split")
    has_official = use_official and any(r.official_split in OFFICIAL_TEST for r in records)
    if test_frac is not None and has_official:
        raise SplitError(f"dataset {spec.name!r} has an official test split; test_frac applies only with "
                         f"use_official=False")
    val_frac = (0.1 if has_official else 0.15) if val_frac is None else val_frac
    test_frac = 0.0 if has_official else (0.15 if test_frac is None else test_frac)
    for name, v in (("val_frac", val_frac), ("test_frac", test_frac)):
        if not 0.0 <= v < 1.0:
            raise SplitError(f"{name} must be in [0, 1), got {v}")
    if val_frac + test_frac >= 1.0:
        raise SplitError(f"val_frac + test_frac must be < 1, got {val_frac + test_frac}")

    by_patient: dict[str, list[str]] = {}
    test_ids: list[str] = []
    test_patients: set[str] = set()
    if has_official:
        for r in records:
            if r.official_split in OFFICIAL_TEST:
                test_ids.append(r.image_id)
                test_patients.add(r.patient_id)
    dropped = 0
    for r in records:
        if has_official and r.official_split in OFFICIAL_TEST:
            continue
        if r.patient_id in test_patients:
            dropped += 1
            continue
        by_patient.setdefault(r.patient_id, []).append(r.image_id)
    patients = sorted(by_patient)
    if not patients:
        raise SplitError(f"dataset {spec.name!r}: no training patients left outside the test split")
    perm = [patients[i] for i in derived_rng("split", spec.name, seed).permutation(len(patients))]
    n = len(patients)
    n_test = _portion(test_frac, n)
    n_val = _portion(val_frac, n)
    if n_test + n_val >= n:  # tiny datasets: keep at least one training patient
        n_val = max(0, n - 1 - n_test)
        n_test = min(n_test, n - 1 - n_val)
    val_p = perm[:n_val]
    test_p = perm[n_val:n_val + n_test]
    train_p = perm[n_val + n_test:]
    if dropped:
        log.warning("%s: %d training images dropped because their patient is in the official test split",
                    spec.name, dropped)
    protocol = (f"official {'/'.join(sorted({r.official_split for r in records if r.official_split in OFFICIAL_TEST}))}"
                f" as test; val = {val_frac:g} of training patients" if has_official else
                f"random by patient: val {val_frac:g}, test {test_frac:g}")
    return Split(train=_images(by_patient, train_p), val=_images(by_patient, val_p),
                 test=sorted(test_ids) if has_official else _images(by_patient, test_p),
                 dataset=spec.name, seed=seed, protocol=protocol, dropped=dropped)


def _make_mgca_split(spec: DatasetSpec, warn: bool = True) -> Split:
    if spec.protocol != "mgca" or not spec.label_rows:
        raise SplitError(f"dataset {spec.name!r} was read with protocol {spec.protocol!r}: MGCA's split needs "
                         f"the label rows a reader keeps under load_dataset(..., protocol='mgca')")
    try:
        lists = mgca_lists(spec.name, spec.task, spec.label_rows)
    except MgcaSplitError as e:
        raise SplitError(str(e)) from None
    present = {r.image_id for r in spec.records}
    kept = {s: sorted(i for i in set(getattr(lists, s)) if i in present) for s in SPLITS}
    missing = len((set(lists.train) | set(lists.val) | set(lists.test)) - present)
    if missing and warn:
        log.warning("%s %s: %d image(s) of MGCA's lists are not on disk and are left out", spec.name, spec.task,
                    missing)
    for s in SPLITS:
        if not kept[s]:
            raise SplitError(f"dataset {spec.name!r}: MGCA's {s} list has no image on disk "
                             f"({len(getattr(lists, s))} ids in the label files)")
    split = Split(**kept, dataset=spec.name, seed=None, protocol=lists.description, scheme="mgca",
                  missing_images=missing, draw=lists.draw)
    split.leaks = count_leaks(split, spec)
    if warn:
        _warn_leaks(split)
    if lists.scaled and warn:
        log.warning("%s %s: the label file is smaller than the published one, so MGCA's fixed counts are taken "
                    "as shares of it: %s", spec.name, spec.task, lists.description)
    if lists.held_out and warn:
        log.info("%s: %d rows held out as MGCA's chexpert 5x200 set (in no list)", spec.name, lists.held_out)
    return split


def count_leaks(split: Split, spec: DatasetSpec | None = None) -> dict[str, dict[str, int]]:
    """Patients (``spec``'s patient ids; the image id where unknown) and image ids each pair of lists
    shares, as {"patients": {"train/val": n, "train/test": n, "val/test": n}, "images": {...}}."""
    patient = {r.image_id: r.patient_id for r in spec.records} if spec is not None else {}
    out: dict[str, dict[str, int]] = {"patients": {}, "images": {}}
    for a, b in PAIRS:
        ia, ib = set(split.ids(a)), set(split.ids(b))
        out["images"][f"{a}/{b}"] = len(ia & ib)
        out["patients"][f"{a}/{b}"] = len({patient.get(i, i) for i in ia} & {patient.get(i, i) for i in ib})
    return out


def _warn_leaks(split: Split) -> None:
    for kind in ("patients", "images"):
        for pair, n in (split.leaks or {}).get(kind, {}).items():
            if n:
                a, b = pair.split("/")
                log.warning("%s: %d %s in both %s and %s (%s split, kept as it is published)", split.dataset,
                            n, kind if n != 1 else kind[:-1], a, b, split.scheme)


def _portion(frac: float, n: int) -> int:
    """round(frac * n), but at least one patient when frac > 0 and there are at least 3 patients."""
    k = int(round(frac * n))
    if frac > 0 and k == 0 and n >= 3:
        k = 1
    return k


def _images(by_patient: dict[str, list[str]], patients: Sequence[str]) -> list[str]:
    return sorted(i for p in patients for i in by_patient[p])


# --------------------------------------------------------------------------- fractions
def sample_fraction(split: Split, fraction: float, seed: int, spec: DatasetSpec | None = None) -> list[str]:
    """The training ids used at ``fraction`` (0 < fraction <= 1) for ``seed``; sorted, never empty.

    Under a "mgca" split: MGCA's one list for ``fraction`` whatever the seed (drawn as MGCA draws it, or
    read from the fraction file its split.json names); at 1.0 this is still a draw for SIIM (all
    positives plus as many negatives). Under "tool": drawn from ``split.train`` only, per seed; with
    ``spec`` given, each class that has a positive in train gets at least one positive in the subset
    (swapping out the latest-drawn image that is not needed elsewhere).
    """
    if not 0.0 < fraction <= 1.0:
        raise SplitError(f"fraction must be in (0, 1], got {fraction}")
    if split.scheme == "mgca":
        return _mgca_fraction(split, fraction)
    train = sorted(split.train)
    if not train:
        raise SplitError(f"split of {split.dataset!r} has an empty training set")
    if fraction >= 1.0:
        return train
    n = max(1, int(round(fraction * len(train))))
    order = [train[i] for i in derived_rng("fraction", split.dataset, seed, ids_sha256(train))
             .permutation(len(train))]
    chosen = order[:n]
    if spec is not None:
        chosen = _cover_classes(chosen, order[n:], spec)
    return sorted(chosen)


def _mgca_fraction(split: Split, fraction: float) -> list[str]:
    train = set(split.train)
    if split.draw is not None:
        try:
            ids = split.draw.draw(fraction)
        except MgcaSplitError as e:
            raise SplitError(str(e)) from None
        # Ids whose image is missing on disk are not in split.train: MGCA's draw runs on all its rows.
        return sorted(i for i in ids if i in train)
    entry = next((e for e in split.fraction_files
                  if e.get("seed") is None and math.isclose(float(e.get("fraction", -1)), fraction)), None)
    if entry is None:
        have = ", ".join(f"{float(e['fraction']):g}" for e in split.fraction_files if e.get("seed") is None)
        raise SplitError(f"{split.source}: a mgca split without MGCA's list for fraction {fraction:g} (it has: "
                         f"{have or 'none'}); write it with `cli.py splits --protocol mgca --fraction "
                         f"{fraction:g}`")
    ids = _read_list(Path(entry["path"]), entry.get("sha256"), split.source)
    outside = [i for i in ids if i not in train]
    if outside:
        raise SplitError(f"{entry['path']}: {len(outside)} id(s) not in the split's train list, e.g. {outside[:3]}")
    return sorted(ids)


def _read_list(path: Path, sha256: str | None, meta: str) -> list[str]:
    try:
        text = read_text_utf8(path)
    except OSError as e:
        raise SplitError(f"{path}: cannot read split list ({e.strerror})") from e
    ids = [line.strip() for line in text.splitlines() if line.strip()]
    if sha256 is not None and ids_sha256(ids) != sha256:
        raise SplitError(f"{path}: content does not match the sha256 recorded in {meta} (edited?)")
    return ids


def _cover_classes(chosen: list[str], rest: list[str], spec: DatasetSpec) -> list[str]:
    labels = {r.image_id: r.labels for r in spec.records}
    n_classes = len(spec.class_names) or max((len(v) for v in labels.values()), default=0)

    def positives(i: str) -> set[int]:
        return {c for c, v in enumerate(labels.get(i, ())) if v > 0.5}

    chosen = list(chosen)
    count = np.zeros(n_classes, dtype=int)
    for i in chosen:
        for c in positives(i):
            count[c] += 1
    for c in range(n_classes):
        if count[c]:
            continue
        donor = next((i for i in rest if c in positives(i)), None)
        if donor is None:
            continue  # no positive of this class anywhere in train
        # Replace the latest-drawn image whose positives are all covered twice; else grow by one.
        victim = next((k for k in range(len(chosen) - 1, -1, -1)
                       if all(count[p] > 1 for p in positives(chosen[k]))), None)
        if victim is not None and len(chosen) > 1:
            for p in positives(chosen[victim]):
                count[p] -= 1
            chosen.pop(victim)
        chosen.append(donor)
        rest = [i for i in rest if i != donor]
        for p in positives(donor):
            count[p] += 1
    return chosen


# --------------------------------------------------------------------------- files
def write_split(split: Split, out_dir: str | Path, fraction_files: Sequence[dict] = ()) -> Path:
    """Write ``train.txt``/``val.txt``/``test.txt`` (one id per line) and ``split.json`` (counts, sha256
    per list, protocol, scheme, seed, leaks, and the ``write_fraction`` entries given) into ``out_dir``;
    returns the split.json path. Each file appears atomically; split.json last.
    """
    out_dir = Path(out_dir)
    for s in SPLITS:
        with atomic_open(out_dir / f"{s}.txt", "w", encoding="utf-8", newline="\n") as fh:
            fh.write(_ids_text(split.ids(s)))
    meta = {"dataset": split.dataset, "seed": split.seed, "source": split.source, "protocol": split.protocol,
            "scheme": split.scheme, "dropped": split.dropped, "missing_images": split.missing_images,
            "leaks": split.leaks, "counts": split.counts(), "sha256": split.hashes(),
            "files": {s: f"{s}.txt" for s in SPLITS}}
    if fraction_files:
        meta["fractions"] = list(fraction_files)
    write_json(out_dir / "split.json", meta)
    return out_dir / "split.json"


def fraction_file_name(fraction: float, seed: int | None, protocol: str = "tool") -> str:
    """``train-frac<f>.txt`` under mgca (one list for all seeds), ``train-frac<f>-seed<s>.txt`` under tool."""
    return f"train-frac{fraction:g}.txt" if protocol == "mgca" else f"train-frac{fraction:g}-seed{seed}.txt"


def write_fraction(ids: Sequence[str], out_dir: str | Path, fraction: float, seed: int | None,
                   protocol: str = "tool") -> dict:
    """Write a fraction subset as ``fraction_file_name`` names it; returns {file, fraction, seed, count,
    sha256} (seed None under mgca), the entry ``write_split`` records in split.json."""
    if protocol not in PROTOCOLS:
        raise SplitError(f"unknown protocol {protocol!r} (one of {', '.join(PROTOCOLS)})")
    name = fraction_file_name(fraction, seed, protocol)
    with atomic_open(Path(out_dir) / name, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(_ids_text(ids))
    return {"file": name, "fraction": fraction, "seed": None if protocol == "mgca" else seed, "count": len(ids),
            "sha256": ids_sha256(ids)}


def read_split(path: str | Path) -> Split:
    """Read a split written by ``write_split`` (its split.json or folder); a list whose sha256 no longer
    matches split.json is a SplitError naming the file."""
    path = Path(path)
    meta_path = path / "split.json" if path.is_dir() else path
    if not meta_path.is_file():
        raise SplitError(f"split file {meta_path} not found")
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or "files" not in meta or "sha256" not in meta:
        raise SplitError(f"{meta_path}: not a split.json written by mflag (no 'files'/'sha256')")
    lists = {}
    for s in SPLITS:
        if s not in meta["files"]:
            raise SplitError(f"{meta_path}: 'files' has no {s!r} entry")
        lists[s] = _read_list(meta_path.parent / meta["files"][s], meta["sha256"].get(s), str(meta_path))
    scheme = meta.get("scheme", "tool")
    if scheme not in PROTOCOLS:
        raise SplitError(f"{meta_path}: unknown scheme {scheme!r} (one of {', '.join(PROTOCOLS)})")
    fractions = tuple({**e, "path": str(meta_path.parent / e["file"])} for e in meta.get("fractions") or ()
                      if isinstance(e, dict) and "file" in e)
    return Split(**lists, dataset=meta.get("dataset", ""), seed=meta.get("seed"), source=str(meta_path),
                 protocol=meta.get("protocol", ""), dropped=int(meta.get("dropped", 0)), scheme=scheme,
                 leaks=meta.get("leaks"), missing_images=int(meta.get("missing_images", 0)),
                 fraction_files=fractions)


def load_split_file(path: str | Path, spec: DatasetSpec | None = None, protocol: str | None = None) -> Split:
    """Reuse a published split (``--split-file``).

    Accepts a split.json/folder from ``write_split``, a JSON object {"train": [...], "val"|"valid": [...],
    "test": [...]}, or a CSV with an id column (image_id, ImageId, patientId, Path, image_name,
    filename or id) and a ``split`` column. ``protocol`` ("tool"/"mgca") is the scheme the split is
    used under; None keeps the one split.json names ("tool" for JSON and CSV files). With ``spec``,
    ids are matched to its records (exactly, or by a unique trailing path, so
    "CheXpert-v1.0-small/train/..." finds "train/..."), and unknown ids are SplitErrors; ids and
    patients in two splits are SplitErrors under "tool" and counted in ``leaks`` (with a warning)
    under "mgca". A "mgca" split whose lists are MGCA's for ``spec`` gets MGCA's fraction draws.
    """
    if protocol is not None and protocol not in PROTOCOLS:
        raise SplitError(f"unknown protocol {protocol!r} (one of {', '.join(PROTOCOLS)})")
    path = Path(path)
    if not path.exists():
        raise SplitError(f"split file {path} not found")
    if path.is_dir() or (path.suffix == ".json" and "files" in (read_json(path) or {})):
        split = read_split(path)
    elif path.suffix == ".json":
        split = _split_from_mapping(read_json(path), path)
    elif path.suffix in (".csv", ".tsv", ".txt"):
        split = _split_from_csv(path)
    else:
        raise SplitError(f"{path}: split file must be a split.json folder, a .json or a .csv")
    if protocol is not None and protocol != split.scheme:
        split = dataclasses.replace(split, scheme=protocol, draw=None,
                                    fraction_files=split.fraction_files if protocol == "mgca" else ())
    if spec is not None:
        split = _match_to_spec(split, spec, path)
    return split


def _split_from_mapping(obj: object, path: Path) -> Split:
    if not isinstance(obj, dict):
        raise SplitError(f"{path}: expected a JSON object with train/val/test id lists")
    lists: dict[str, list[str]] = {s: [] for s in SPLITS}
    for key, ids in obj.items():
        s = _SPLIT_ALIASES.get(str(key).lower())
        if s is None:
            continue
        if not isinstance(ids, list):
            raise SplitError(f"{path}: {key!r} must be a list of ids")
        lists[s].extend(str(i) for i in ids)
    if not lists["train"]:
        raise SplitError(f"{path}: no training ids (keys: {', '.join(map(str, obj))})")
    return Split(**lists, source=str(path))


def _split_from_csv(path: Path) -> Split:
    import csv

    lists: dict[str, list[str]] = {s: [] for s in SPLITS}
    with open_text_utf8(path) as fh:
        sample = fh.read(4096)
        fh.seek(0)
        dialect = csv.Sniffer().sniff(sample, delimiters=",\t") if sample else csv.excel
        reader = csv.DictReader(fh, dialect=dialect)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        reader.fieldnames = fields
        id_col = next((c for c in _ID_COLUMNS if c in fields), None)
        if id_col is None or "split" not in fields:
            raise SplitError(f"{path}:1: need an id column ({', '.join(_ID_COLUMNS)}) and a 'split' column; "
                             f"header is {fields}")
        for row in reader:
            s = _SPLIT_ALIASES.get((row["split"] or "").strip().lower())
            if s is None:
                raise SplitError(f"{path}:{reader.line_num}: unknown split {row['split']!r} "
                                 f"(train, val/valid/dev, test)")
            lists[s].append(row[id_col].strip())
    return Split(**lists, source=str(path))


def _match_to_spec(split: Split, spec: DatasetSpec, path: Path) -> Split:
    known = {r.image_id: r for r in spec.records}
    suffix: dict[str, str | None] = {}
    for i in known:
        parts = i.split("/")
        for k in range(1, len(parts)):
            tail = "/".join(parts[k:])
            suffix[tail] = None if tail in suffix and suffix[tail] != i else i

    def resolve(i: str) -> str | None:
        if i in known:
            return i
        parts = i.replace("\\", "/").split("/")
        for k in range(len(parts)):
            tail = "/".join(parts[k:])
            if tail in known:
                return tail
            if suffix.get(tail):
                return suffix[tail]
        return None

    lists: dict[str, list[str]] = {}
    unknown: list[str] = []
    for s in SPLITS:
        out = []
        for i in split.ids(s):
            j = resolve(i)
            if j is None:
                unknown.append(i)
            else:
                out.append(j)
        lists[s] = sorted(set(out))
    if unknown:
        raise SplitError(f"{path}: {len(unknown)} id(s) not in dataset {spec.name!r}, e.g. {unknown[:5]}")
    matched = Split(**lists, dataset=spec.name, seed=split.seed, source=split.source, protocol=split.protocol
                    or f"published split {path.name}", dropped=split.dropped, scheme=split.scheme,
                    missing_images=split.missing_images, fraction_files=split.fraction_files)
    matched.leaks = count_leaks(matched, spec)
    if split.scheme == "tool":
        for a, b in PAIRS:
            both = set(lists[a]) & set(lists[b])
            if both:
                raise SplitError(f"{path}: {len(both)} image(s) in both {a} and {b}, e.g. {sorted(both)[:5]}"
                                 f"{_MGCA_HINT}")
            pa = {known[i].patient_id for i in lists[a]}
            pb = {known[i].patient_id for i in lists[b]}
            if pa & pb:
                raise SplitError(f"{path}: {len(pa & pb)} patient(s) in both {a} and {b}, e.g. "
                                 f"{sorted(pa & pb)[:5]}{_MGCA_HINT}")
        return matched
    if spec.protocol == "mgca" and spec.label_rows:
        try:  # the published lists are MGCA's own: fractions can be drawn as MGCA draws them
            mine = _make_mgca_split(spec, warn=False) if (spec.name, spec.task) in mgca_pairs() else None
        except SplitError:
            mine = None
        if mine is not None and (mine.train, mine.val, mine.test) == (matched.train, matched.val, matched.test):
            matched.draw = mine.draw
    _warn_leaks(matched)
    return matched


# Under tool every list pair must be disjoint; MGCA's own lists are not, and are accepted under mgca.
_MGCA_HINT = " (allowed only under --protocol mgca, which keeps MGCA's lists as published and counts this)"


# --------------------------------------------------------------------------- summary
def split_summary(split: Split, spec: DatasetSpec | None = None,
                  fractions: dict[str, Sequence[str]] | None = None) -> dict:
    """JSON-able summary: images (and patients, positives per class with ``spec``) per split, hashes,
    the scheme ("tool"/"mgca"), the patients and images two lists share (``leaks``), MGCA ids left out
    for a missing image, and the size of each fraction subset given as {label: ids}."""
    out: dict = {"dataset": split.dataset, "source": split.source, "protocol": split.protocol, "seed": split.seed,
                 "scheme": split.scheme, "dropped": split.dropped, "missing_images": split.missing_images,
                 "counts": split.counts(), "sha256": split.hashes()}
    out["leaks"] = count_leaks(split, spec) if spec is not None else split.leaks
    if spec is not None:
        rec: dict[str, Record] = {r.image_id: r for r in spec.records}
        out["patients"] = {s: len({rec[i].patient_id for i in split.ids(s) if i in rec}) for s in SPLITS}
        if spec.class_names:
            out["positives"] = {
                s: {c: int(sum(1 for i in split.ids(s) if i in rec and len(rec[i].labels) > k
                               and rec[i].labels[k] > 0.5)) for k, c in enumerate(spec.class_names)}
                for s in SPLITS}
    if fractions:
        out["fractions"] = {k: {"count": len(v), "sha256": ids_sha256(sorted(v))} for k, v in fractions.items()}
    return out
