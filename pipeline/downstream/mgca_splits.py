"""MGCA's downstream splits and label fractions (HKU-MedAI/MGCA), id for id.

MGCA splits each dataset once, in ``mgca/preprocess/<dataset>.py``, from the label files in their
published row order, and draws the training subset of a label fraction in its dataset classes
(``mgca/datasets/*.py``) each time a training set is built. This module redoes both from the rows a
reader keeps under ``protocol="mgca"`` (``DatasetSpec.label_rows``), with the calls MGCA makes:
sklearn's ``train_test_split`` and numpy's legacy ``RandomState.choice``, which is what both
``DataFrame.sample(frac, random_state=42)`` and the global ``np.random.choice`` run underneath. Rows
are addressed by position, so these functions never look at images.

The recipes, with the MGCA source of each (docs/PROTOCOLS.md has the table):

- CheXpert (preprocess/chexpert.py): 200 frontal rows per competition task that are that task's only
  positive are set aside (``sample(n=200, random_state=0)``, chexpert 5x200); of the remaining rows of
  train.csv (all views) ``np.random.choice(len, 5000)`` after ``np.random.seed(0)`` picks validation by
  position, but training drops those positions as index *labels* (``df.drop(valid_ids)``), so most
  validation rows stay in training. valid.csv is the test set. Views are filtered afterwards.
- COVIDx (preprocess/covidx.py): ``train_test_split(train rows, train_size=0.8, random_state=0)``;
  the test file is the test set.
- RSNA (preprocess/rsna.py): rows grouped by patientId (sorted); classification
  ``test_size=0.3`` then half of it each for test and validation; detection and segmentation
  ``test_size=2 x 5337`` then 5337 / 5337.
- SIIM (preprocess/siim.py): rows of train-rle.csv, not images, split 0.3 then 0.5 as RSNA.
- Object-CXR (preprocess/object_cxr.py): ``train_test_split(train.csv rows, test_size=0.1,
  random_state=0)``; dev.csv is the test set.

Fractions: classification datasets ``sample(frac=F, random_state=42)`` on the training frame
(classification_dataset.py), so one list per fraction. Segmentation and detection draw from numpy's
global generator, seeded by ``seed_everything(--seed)`` (42 unless the run script gives another: SIIM
at 10% runs with ``--seed 0``); the training set is built twice (``num_training_steps`` and then
``fit``), but pytorch-lightning 1.5.10 (MGCA's requirements.txt) re-seeds after the sanity check
in between, so both draws are the first draw after the seed.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from pipeline.common import MflagError
from pipeline.downstream.datasets.base import LabelRow

# Which dataset takes which of the rules below, and the (dataset, task) pairs MGCA has a split for, are in
# the dataset registry (pipeline.downstream.datasets.registry: DatasetEntry.mgca, mgca_pairs, mgca_lists).

# mgca/constants.py and preprocess scripts
CHEXPERT_VALID_NUM = 5000          # constants.CHEXPERT_VALID_NUM
CHEXPERT_5X200_PER_TASK = 200      # preprocess/chexpert.py: sample(n=200, random_state=0)
CHEXPERT_PREPROCESS_SEED = 0       # preprocess/chexpert.py: np.random.seed(0) at import
SPLIT_RANDOM_STATE = 0             # train_test_split(..., random_state=0) in every preprocess script
HOLDOUT_FRACTION = 0.15            # preprocess/rsna.py, siim.py: test_fac=0.15, test_size=test_fac * 2
RSNA_DETECTION_HOLDOUT = 5337      # preprocess/rsna.py prepare_detection_data: test_size=5337 * 2
# The published label files' sizes: MGCA's absolute counts above are these shares of them. A smaller file
# (a synthetic set, a subset) cannot hold the absolute counts, so it gets the same shares instead, and
# its split says so; on the published files (or larger) the counts are MGCA's exactly.
RSNA_PATIENTS = 26684              # stage_2_train_labels.csv, distinct patientIds
CHEXPERT_TRAIN_ROWS = 223414       # CheXpert-v1.0(-small) train.csv
COVIDX_TRAIN_SIZE = 0.8            # preprocess/covidx.py
OBJECT_CXR_VAL_SIZE = 0.1          # preprocess/object_cxr.py
SAMPLE_RANDOM_STATE = 42           # datasets/classification_dataset.py: df.sample(frac, random_state=42)
LIGHTNING_SEED = 42                # mgca_segmenter.py / mgca_detector.py: --seed default, seed_everything
# run_seg_finetune.sh passes --seed 0 to one run only: SIIM at 10% of the labels.
LIGHTNING_SEED_OVERRIDES = {("siim", "seg", 0.1): 0}


class MgcaSplitError(MflagError):
    """MGCA's recipe cannot run on these label files (too few rows, a file missing, no recipe)."""


@dataclasses.dataclass(frozen=True)
class FractionDraw:
    """How MGCA draws the training subset at a label fraction, over its training frame.

    ``rule``: "sample" (``DataFrame.sample(frac=F, random_state=42)``, none at F = 1), "choice"
    (``np.random.choice(n, int(F * n), replace=False)`` after the Lightning seed, also at F = 1) or
    "siim" (all positive images plus as many negative images drawn with ``np.random.choice``, then
    ``int(F * n)`` of those images unless F = 1). ``rows``: the image id of each training-frame row
    in MGCA's order; ``positive``: per row, whether its mask is non-empty (siim only).
    """

    dataset: str
    task: str
    rule: str
    rows: tuple[str, ...]
    positive: tuple[bool, ...] = ()

    def seed(self, fraction: float) -> int | None:
        """The numpy seed the draw at ``fraction`` starts from (None for "sample", which has its own)."""
        if self.rule == "sample":
            return None
        for (d, t, f), s in LIGHTNING_SEED_OVERRIDES.items():
            if (d, t) == (self.dataset, self.task) and math.isclose(f, fraction):
                return s
        return LIGHTNING_SEED

    def draw(self, fraction: float) -> list[str]:
        """Image ids of MGCA's training set at ``fraction`` (0 < fraction <= 1), each once, drawn order."""
        if not 0.0 < fraction <= 1.0:
            raise MgcaSplitError(f"fraction must be in (0, 1], got {fraction}")
        n = len(self.rows)
        if self.rule == "sample":
            if fraction == 1:
                return _unique(self.rows)
            # pandas: n = round(frac * len) (Python's round), locs = RandomState(42).choice(len, n, replace=False)
            k = round(fraction * n)
            _check_size(self, fraction, k, n)
            idx = np.random.RandomState(SAMPLE_RANDOM_STATE).choice(n, size=k, replace=False)
            return _unique(self.rows[i] for i in idx)
        rs = np.random.RandomState(self.seed(fraction))
        if self.rule == "choice":
            k = int(fraction * n)
            _check_size(self, fraction, k, n)
            return _unique(self.rows[i] for i in rs.choice(n, size=k, replace=False))
        if self.rule == "siim":
            return self._siim(fraction, rs)
        raise ValueError(f"unknown fraction rule {self.rule!r}")

    def _siim(self, fraction: float, rs: np.random.RandomState) -> list[str]:
        # segmentation_dataset.SIIMImageDataset: rows with a mask are positive; n_pos = distinct positive
        # images; as many negative images (distinct, in row order) are drawn; the frame becomes the
        # positive rows followed by the chosen negative rows, and the fraction draws from its distinct ids.
        pos_ids = _unique(i for i, p in zip(self.rows, self.positive) if p)
        neg_ids = _unique(i for i, p in zip(self.rows, self.positive) if not p)
        if len(pos_ids) > len(neg_ids):
            raise MgcaSplitError(f"siim: MGCA pairs each of the {len(pos_ids)} positive training images with a "
                                 f"negative one, but the training rows have only {len(neg_ids)} negative images")
        chosen = {neg_ids[i] for i in rs.choice(len(neg_ids), size=len(pos_ids), replace=False)}
        frame = [i for i, p in zip(self.rows, self.positive) if p] + \
                [i for i, p in zip(self.rows, self.positive) if not p and i in chosen]
        ids = _unique(frame)
        if fraction == 1:
            return ids
        k = int(len(ids) * fraction)
        _check_size(self, fraction, k, len(ids))
        return [ids[i] for i in rs.choice(len(ids), size=k, replace=False)]


@dataclasses.dataclass(frozen=True)
class MgcaLists:
    """MGCA's three lists (image ids, each once, in MGCA's order) and how fractions are drawn."""

    train: list[str]
    val: list[str]
    test: list[str]
    draw: FractionDraw
    description: str
    held_out: int = 0  # rows MGCA sets aside for other uses (CheXpert's 5x200 zero-shot set)
    scaled: bool = False  # the label file is smaller than the published one: MGCA's counts became shares


def _unique(ids) -> list[str]:
    return list(dict.fromkeys(ids))


def _check_size(draw: FractionDraw, fraction: float, k: int, n: int) -> None:
    if k < 1:
        raise MgcaSplitError(f"{draw.dataset} {draw.task}: MGCA's draw at fraction {fraction:g} of {n} training "
                             f"images takes {k}; the dataset is too small for this fraction")


def _rows(label_rows: dict[str, Sequence[LabelRow]], dataset: str, role: str, what: str) -> Sequence[LabelRow]:
    rows = label_rows.get(role)
    if not rows:
        raise MgcaSplitError(f"{dataset}: MGCA's split needs the rows of {what}, which were not read "
                             f"(missing file, or the dataset was not read with protocol='mgca')")
    return rows


def _train_test_split(n: int, *, test_size=None, train_size=None) -> tuple[np.ndarray, np.ndarray]:
    """Positions 0..n-1 split as MGCA's ``train_test_split(df, ..., random_state=0)`` splits rows."""
    from sklearn.model_selection import train_test_split

    try:
        return train_test_split(np.arange(n), test_size=test_size, train_size=train_size,
                                random_state=SPLIT_RANDOM_STATE)
    except ValueError as e:
        raise MgcaSplitError(f"MGCA's split cannot be made from {n} rows: {e}") from None


def _ids(rows: Sequence[LabelRow], positions) -> list[str]:
    return _unique(rows[i].image_id for i in positions)


def _five_by_200(train_rows: Sequence[LabelRow], per_task: int | None = None
                 ) -> tuple[list[tuple[str, int]], int, bool]:
    """MGCA's CheXpert 5x200 draw (preprocess/chexpert.py): per competition task in order, the frontal
    train.csv rows that have it as their only positive (``LabelRow.group``), ``sample(n=per_task,
    random_state=0)`` of them in draw order. ``per_task`` None: MGCA's 200, or its share of a train.csv
    smaller than the published one (then ``scaled``). Returns ([(image_id, task index)], per_task, scaled)."""
    groups = [[i for i, r in enumerate(train_rows) if r.group == k] for k in range(5)]
    # MGCA's counts need a train.csv of the published size; a smaller one gets the same shares of its rows
    scaled = (min(len(c) for c in groups) < CHEXPERT_5X200_PER_TASK
              or len(train_rows) - 5 * CHEXPERT_5X200_PER_TASK < CHEXPERT_VALID_NUM)
    if per_task is None:
        share = len(train_rows) / CHEXPERT_TRAIN_ROWS
        per_task = round(CHEXPERT_5X200_PER_TASK * share) if scaled else CHEXPERT_5X200_PER_TASK
    picked: list[tuple[str, int]] = []
    for k, cand in enumerate(groups):
        pick = np.random.RandomState(0).choice(len(cand), size=min(per_task, len(cand)), replace=False)
        picked += [(train_rows[cand[j]].image_id, k) for j in pick]
    return picked, per_task, scaled


def chexpert_5x200(label_rows: dict[str, Sequence[LabelRow]], per_task: int | None = None
                   ) -> tuple[list[tuple[str, int]], int]:
    """The CheXpert 5x200 zero-shot set as MGCA sets it aside: [(image_id, competition task index)] and
    the number drawn per task (see ``_five_by_200``; a task with fewer candidates gives all it has)."""
    picked, n, _ = _five_by_200(_rows(label_rows, "chexpert", "train", "train.csv"), per_task)
    return picked, n


def chexpert(label_rows: dict[str, Sequence[LabelRow]], task: str = "cls") -> MgcaLists:
    train_rows = _rows(label_rows, "chexpert", "train", "train.csv")
    valid_rows = _rows(label_rows, "chexpert", "valid", "valid.csv (MGCA's test set)")
    picked, per_task, scaled = _five_by_200(train_rows)
    held = {image_id for image_id, _ in picked}
    share = len(train_rows) / CHEXPERT_TRAIN_ROWS
    # df keeps its RangeIndex labels (the 0-based row numbers of train.csv) after the 5x200 rows go.
    rest = [i for i, r in enumerate(train_rows) if r.image_id not in held]
    n_valid = min(len(rest) - 1, max(1, round(CHEXPERT_VALID_NUM * share))) if scaled else CHEXPERT_VALID_NUM
    if n_valid < 1:
        raise MgcaSplitError(f"chexpert: train.csv has {len(train_rows)} rows, too few for a validation draw")
    valid_pos = np.random.RandomState(CHEXPERT_PREPROCESS_SEED).choice(len(rest), size=n_valid, replace=False)
    valid = [train_rows[rest[p]] for p in valid_pos]          # df.iloc[valid_ids]: by position
    dropped_labels = {int(p) for p in valid_pos}
    train = [train_rows[i] for i in rest if i not in dropped_labels]  # df.drop(valid_ids): by label
    train_ids = _unique(r.image_id for r in train if r.keep)
    return MgcaLists(
        train=train_ids, val=_unique(r.image_id for r in valid if r.keep),
        test=_unique(r.image_id for r in valid_rows if r.keep),
        draw=FractionDraw("chexpert", task, "sample", tuple(r.image_id for r in train if r.keep)),
        description=(f"mgca: CheXpert valid.csv as test; {n_valid} validation rows drawn from "
                     f"train.csv by position (np.random.seed(0)) but dropped from training by label; "
                     f"5x{per_task} rows held out; frontal views"
                     + (f" (scaled from MGCA's 5,000 and 5x200 to this train.csv's {len(train_rows)} of "
                        f"{CHEXPERT_TRAIN_ROWS:,} rows)" if scaled else "")),
        held_out=len(held), scaled=scaled)


def covidx(label_rows: dict[str, Sequence[LabelRow]], task: str = "cls") -> MgcaLists:
    rows = _rows(label_rows, "covidx", "train", "the train label file")
    test = _rows(label_rows, "covidx", "test", "the test label file (MGCA's test set)")
    tr, va = _train_test_split(len(rows), train_size=COVIDX_TRAIN_SIZE)
    return MgcaLists(train=_ids(rows, tr), val=_ids(rows, va), test=_ids(test, range(len(test))),
                     draw=FractionDraw("covidx", task, "sample", tuple(rows[i].image_id for i in tr)),
                     description="mgca: COVIDx test file as test; train file rows split 80/20 "
                                 "(train_test_split, random_state=0)")


def rsna(label_rows: dict[str, Sequence[LabelRow]], task: str) -> MgcaLists:
    rows = sorted(_rows(label_rows, "rsna", "train", "stage_2_train_labels.csv"), key=lambda r: r.image_id)
    if task == "cls":
        tr, tv = _train_test_split(len(rows), test_size=HOLDOUT_FRACTION * 2)
        desc = "mgca: RSNA patients 70/15/15 (train_test_split 0.3 then 0.5, random_state=0)"
    elif len(rows) > RSNA_DETECTION_HOLDOUT * 2:
        tr, tv = _train_test_split(len(rows), test_size=RSNA_DETECTION_HOLDOUT * 2)
        desc = (f"mgca: RSNA detection split, {RSNA_DETECTION_HOLDOUT} patients each for validation and test "
                f"(train_test_split, random_state=0)")
    else:  # fewer patients than MGCA holds out: the same share of them (2 x 5337 of 26,684)
        tr, tv = _train_test_split(len(rows), test_size=RSNA_DETECTION_HOLDOUT * 2 / RSNA_PATIENTS)
        desc = (f"mgca: RSNA detection split scaled to {len(rows)} patients: {RSNA_DETECTION_HOLDOUT * 2} of "
                f"{RSNA_PATIENTS:,} held out as in MGCA, half each for validation and test (train_test_split, "
                f"random_state=0)")
    te, va = (tv[p] for p in _train_test_split(len(tv), test_size=0.5))
    return MgcaLists(train=_ids(rows, tr), val=_ids(rows, va), test=_ids(rows, te),
                     draw=FractionDraw("rsna", task, "sample" if task == "cls" else "choice",
                                       tuple(rows[i].image_id for i in tr)),
                     description=desc, scaled=task != "cls" and len(rows) <= RSNA_DETECTION_HOLDOUT * 2)


def siim(label_rows: dict[str, Sequence[LabelRow]], task: str = "seg") -> MgcaLists:
    rows = _rows(label_rows, "siim", "train", "train-rle.csv")
    tr, tv = _train_test_split(len(rows), test_size=HOLDOUT_FRACTION * 2)
    te, va = (tv[p] for p in _train_test_split(len(tv), test_size=0.5))
    return MgcaLists(train=_ids(rows, tr), val=_ids(rows, va), test=_ids(rows, te),
                     draw=FractionDraw("siim", task, "siim", tuple(rows[i].image_id for i in tr),
                                       tuple(rows[i].positive for i in tr)),
                     description="mgca: SIIM train-rle.csv rows (not images) 70/15/15 (train_test_split 0.3 "
                                 "then 0.5, random_state=0); training: all positive images plus as many "
                                 "negatives")


def object_cxr(label_rows: dict[str, Sequence[LabelRow]], task: str = "det") -> MgcaLists:
    rows = _rows(label_rows, "object-cxr", "train", "train.csv")
    dev = _rows(label_rows, "object-cxr", "dev", "dev.csv (MGCA's test set)")
    tr, va = _train_test_split(len(rows), test_size=OBJECT_CXR_VAL_SIZE)
    return MgcaLists(train=_ids(rows, tr), val=_ids(rows, va), test=_ids(dev, range(len(dev))),
                     draw=FractionDraw("object-cxr", task, "choice", tuple(rows[i].image_id for i in tr)),
                     description="mgca: Object-CXR dev.csv as test; train.csv rows split 90/10 "
                                 "(train_test_split, random_state=0)")

