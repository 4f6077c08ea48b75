"""Splits disjoint by patient, deterministic per seed; fractions reproducible and inside train."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.downstream.datasets.base import DatasetSpec, Record
from pipeline.downstream.splits import (
    Split,
    SplitError,
    ids_sha256,
    load_split_file,
    make_split,
    read_split,
    sample_fraction,
    split_summary,
    write_fraction,
    write_split,
)


def make_spec(n_patients: int = 60, per_patient: int = 3, official: bool = False, n_classes: int = 3,
              rare_every: int = 0) -> DatasetSpec:
    """Patients with several images; class c positive when (image index) % (c + 2) == 0, plus a rare class."""
    records = []
    k = 0
    for p in range(n_patients):
        split = ("valid" if p % 5 == 0 else "train") if official else None
        for j in range(per_patient):
            labels = [1.0 if k % (c + 2) == 0 else 0.0 for c in range(n_classes)]
            if rare_every:
                labels.append(1.0 if k % rare_every == rare_every - 1 else 0.0)
            records.append(Record(image_id=f"{split or 'all'}/p{p:04d}/v{j}.jpg", patient_id=f"p{p:04d}",
                                  path=Path("/nonexistent"), labels=tuple(labels), official_split=split))
            k += 1
    names = tuple(f"c{c}" for c in range(n_classes)) + (("rare",) if rare_every else ())
    return DatasetSpec(name="toy", root=Path("/nonexistent"), records=records, class_names=names)


def patients(spec: DatasetSpec, ids) -> set[str]:
    pid = {r.image_id: r.patient_id for r in spec.records}
    return {pid[i] for i in ids}


def test_random_split_disjoint_by_patient_and_deterministic():
    spec = make_spec()
    a = make_split(spec, seed=0)
    assert a == make_split(spec, seed=0)
    assert make_split(spec, seed=1).train != a.train
    counts = a.counts()
    assert sum(counts.values()) == len(spec.records)
    assert counts["test"] == counts["val"] == 9 * 3  # 15% of 60 patients, 3 images each
    for x, y in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not patients(spec, a.ids(x)) & patients(spec, a.ids(y))
    assert a.protocol.startswith("random by patient")


def test_official_test_split_honoured():
    spec = make_spec(official=True)
    # one training image of a test patient: must be dropped, not leaked into train
    leak = Record(image_id="train/p0000/extra.jpg", patient_id="p0000", path=Path("/x"), labels=(0.0,) * 3,
                  official_split="train")
    spec.records.append(leak)
    s = make_split(spec, seed=3)
    assert set(s.test) == {r.image_id for r in spec.records if r.official_split == "valid"}
    assert s.dropped == 1 and leak.image_id not in s.train + s.val
    assert not patients(spec, s.train) & patients(spec, s.val)
    assert len(patients(spec, s.val)) == round(0.1 * 48)
    with pytest.raises(SplitError, match="official test split"):
        make_split(spec, test_frac=0.2)
    plain = make_split(spec, test_frac=0.2, use_official=False)
    assert len(patients(spec, plain.test)) == 12 and plain.dropped == 0
    assert sum(plain.counts().values()) == len(spec.records)


def test_tiny_dataset_keeps_train():
    spec = make_spec(n_patients=2, per_patient=1)
    s = make_split(spec)
    assert s.train and not set(s.train) & set(s.val + s.test)


@pytest.mark.parametrize("fraction", [0.01, 0.1, 1.0])
def test_fraction_deterministic_subset_disjoint(fraction):
    spec = make_spec(n_patients=200)
    s = make_split(spec, seed=0)
    ids = sample_fraction(s, fraction, seed=1, spec=spec)
    # independent of call order: draw other seeds/fractions first, then again
    sample_fraction(s, 0.1, seed=2, spec=spec)
    assert sample_fraction(s, fraction, seed=1, spec=spec) == ids
    assert ids and len(ids) == len(set(ids))
    assert set(ids) <= set(s.train) and not set(ids) & set(s.val + s.test)
    assert abs(len(ids) - max(1, round(fraction * len(s.train)))) <= 1
    if fraction < 1.0:
        assert sample_fraction(s, fraction, seed=2, spec=spec) != ids


def test_fraction_nested_and_never_empty():
    spec = make_spec(n_patients=200, n_classes=1)
    s = make_split(spec, seed=0)
    small, big = sample_fraction(s, 0.01, 5), sample_fraction(s, 0.1, 5)
    assert set(small) <= set(big)
    tiny = make_split(make_spec(n_patients=10, per_patient=1), seed=0)
    assert len(sample_fraction(tiny, 0.01, 0)) == 1


def test_fraction_covers_every_class():
    spec = make_spec(n_patients=300, per_patient=1, rare_every=97)  # "rare": ~3 positives in train
    s = make_split(spec, seed=0)
    rare_in_train = [r for r in spec.records if r.image_id in set(s.train) and r.labels[-1] > 0.5]
    assert rare_in_train
    labels = {r.image_id: r.labels for r in spec.records}
    for seed in range(8):
        ids = sample_fraction(s, 0.01, seed, spec=spec)
        for c in range(len(spec.class_names)):
            assert any(labels[i][c] > 0.5 for i in ids), (seed, c)
        assert len(ids) == max(1, round(0.01 * len(s.train))) or len(ids) == round(0.01 * len(s.train)) + 1


def test_fraction_rejects_bad_value():
    s = make_split(make_spec())
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(SplitError):
            sample_fraction(s, bad, 0)


def test_write_read_round_trip_and_tamper(tmp_path):
    spec = make_spec()
    s = make_split(spec, seed=4)
    meta_path = write_split(s, tmp_path / "split")
    meta = json.loads(meta_path.read_text())
    assert meta["counts"] == s.counts() and meta["sha256"]["train"] == ids_sha256(s.train)
    import hashlib
    assert hashlib.sha256((tmp_path / "split/train.txt").read_bytes()).hexdigest() == meta["sha256"]["train"]
    back = read_split(tmp_path / "split")
    assert (back.train, back.val, back.test) == (s.train, s.val, s.test) and back.seed == 4
    assert load_split_file(meta_path, spec).train == s.train
    frac = write_fraction(sample_fraction(s, 0.1, 0), tmp_path / "split", 0.1, 0)
    assert (tmp_path / "split" / frac["file"]).read_text().count("\n") == frac["count"]
    (tmp_path / "split/val.txt").write_text("\n".join(s.val[1:]) + "\n")
    with pytest.raises(SplitError, match=r"val\.txt: content does not match"):
        read_split(meta_path)


def test_load_published_json_and_csv(tmp_path):
    spec = make_spec(n_patients=6, per_patient=1)
    ids = [r.image_id for r in spec.records]
    # published ids may carry an extra leading folder; they resolve by their unique trailing path
    (tmp_path / "s.json").write_text(json.dumps({"train": [f"CheXpert-v1.0-small/{i}" for i in ids[:4]],
                                                 "valid": [ids[4]], "test": [ids[5]]}))
    s = load_split_file(tmp_path / "s.json", spec)
    assert s.train == sorted(ids[:4]) and s.val == [ids[4]] and s.test == [ids[5]]
    (tmp_path / "s.csv").write_text("Path,split\n" + "".join(f"{i},{'train' if k < 4 else 'test'}\n"
                                                              for k, i in enumerate(ids)))
    assert load_split_file(tmp_path / "s.csv", spec).test == sorted(ids[4:])
    (tmp_path / "bad.csv").write_text(f"image_id,split\n{ids[0]},train\n{ids[1]},holdout\n")
    with pytest.raises(SplitError, match=r"bad\.csv:3: unknown split 'holdout'"):
        load_split_file(tmp_path / "bad.csv", spec)
    (tmp_path / "unk.json").write_text(json.dumps({"train": ["nope.jpg"], "test": [ids[0]]}))
    with pytest.raises(SplitError, match="not in dataset"):
        load_split_file(tmp_path / "unk.json", spec)


def test_published_split_overlap_rejected(tmp_path):
    spec = make_spec(n_patients=4, per_patient=2)
    ids = [r.image_id for r in spec.records]
    (tmp_path / "o.json").write_text(json.dumps({"train": ids[:3], "test": ids[2:]}))
    with pytest.raises(SplitError, match="in both train and test"):
        load_split_file(tmp_path / "o.json", spec)
    (tmp_path / "p.json").write_text(json.dumps({"train": ids[:3], "test": ids[3:]}))  # p0001 split across
    with pytest.raises(SplitError, match="patient"):
        load_split_file(tmp_path / "p.json", spec)


def test_split_summary():
    spec = make_spec()
    s = make_split(spec)
    fr = {"0.1/seed0": sample_fraction(s, 0.1, 0, spec)}
    summ = split_summary(s, spec, fractions=fr)
    assert summ["counts"] == s.counts() and summ["patients"]["test"] == 9
    assert summ["positives"]["train"]["c0"] == sum(1 for r in spec.records if r.image_id in set(s.train)
                                                  and r.labels[0] > 0.5)
    assert summ["fractions"]["0.1/seed0"]["count"] == len(fr["0.1/seed0"])
    assert isinstance(Split([], [], []).hashes()["all"], str)
