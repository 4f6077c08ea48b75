"""MGCA's splits and fraction lists, id for id.

Each test writes small label files in the published formats (shared/FORMATS.md) and computes MGCA's
lists the way MGCA's preprocess scripts and dataset classes do, with pandas and sklearn on the label
files themselves (mgca/preprocess/*.py, mgca/datasets/*.py), then compares them with what
``load_dataset(..., protocol="mgca")`` + ``make_split`` + ``sample_fraction`` give. No image exists.
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd  # the test extra: the reference re-runs MGCA's pandas scripts
import pytest
from sklearn.model_selection import train_test_split

from pipeline.downstream.datasets.registry import load_dataset
from pipeline.downstream.splits import (
    SplitError,
    count_leaks,
    load_split_file,
    make_split,
    sample_fraction,
    write_fraction,
    write_split,
)

FRACTIONS = (0.01, 0.1, 1.0)
COMPETITION = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
CHEXPERT_COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
                    "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia",
                    "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
                    "Support Devices"]


@contextlib.contextmanager
def global_numpy_seed(seed: int):
    """MGCA seeds numpy's global generator (np.random.seed / seed_everything); keep the test process's."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def uuid(rng: np.random.Generator) -> str:
    h = "".join(f"{int(v):016x}" for v in rng.integers(0, 2**63, 2))
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def ours(dataset: str, task: str, root: Path, **options):
    spec = load_dataset(dataset, root, task, protocol="mgca", require_images=False, **options)
    split = make_split(spec, protocol="mgca")
    fractions = {f: sample_fraction(split, f, seed=s, spec=spec) for f in FRACTIONS for s in (0, 3)}
    # one list per fraction, whatever the seed
    assert all(sample_fraction(split, f, seed=7, spec=spec) == fractions[f] for f in FRACTIONS)
    return spec, split, fractions


def assert_same(split, fractions, ref_lists: dict, ref_fractions: dict) -> None:
    for name in ("train", "val", "test"):
        assert split.ids(name) == sorted(set(ref_lists[name])), name
    for f in FRACTIONS:
        assert fractions[f] == sorted(set(ref_fractions[f])), f


# --------------------------------------------------------------------------- CheXpert
def write_chexpert(root: Path, n_rows: int = 6400, n_valid: int = 60, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    values = np.array(["", "1.0", "0.0", "-1.0"])
    rows, patient, study, view = [], 1, 1, 1
    for _ in range(n_rows):
        if rng.random() < 0.35:  # next image belongs to a new study or patient
            patient, study, view = (patient + 1, 1, 1) if rng.random() < 0.6 else (patient, study + 1, 1)
        frontal = rng.random() < 0.75
        path = (f"CheXpert-v1.0-small/train/patient{patient:05d}/study{study}/"
                f"view{view}_{'frontal' if frontal else 'lateral'}.jpg")
        view += 1
        labels = {c: str(rng.choice(values, p=[0.5, 0.15, 0.25, 0.1])) for c in CHEXPERT_COLUMNS[5:]}
        if rng.random() < 0.3:  # a candidate for MGCA's 5x200 set: one competition task positive only
            k = int(rng.integers(5))
            for c in CHEXPERT_COLUMNS[6:]:
                labels[c] = str(rng.choice(["", "0.0"]))
            labels[COMPETITION[k]] = "1.0"
            if rng.random() < 0.1:  # ... unless an uncertain label spoils it
                labels[COMPETITION[(k + 1) % 5]] = "-1.0"
        rows.append([path, "Female", "60", "Frontal" if frontal else "Lateral", "AP" if frontal else ""]
                    + [labels[c] for c in CHEXPERT_COLUMNS[5:]])
    valid = []
    for i in range(n_valid):
        frontal = i % 3 != 2
        path = (f"CheXpert-v1.0-small/valid/patient{64541 + i // 2:05d}/study1/"
                f"view{i % 2 + 1}_{'frontal' if frontal else 'lateral'}.jpg")
        valid.append([path, "Male", "50", "Frontal" if frontal else "Lateral", "PA" if frontal else ""]
                     + [str(rng.choice(["0.0", "1.0"])) for _ in CHEXPERT_COLUMNS[5:]])
    root.mkdir(parents=True, exist_ok=True)
    for name, table in (("train.csv", rows), ("valid.csv", valid)):
        text = ",".join(CHEXPERT_COLUMNS) + "\n" + "".join(",".join(r) + "\n" for r in table)
        (root / name).write_text(text)


def chexpert_reference(root: Path):
    """mgca/preprocess/chexpert.py, then CheXpertImageDataset's view filter and sample(frac, 42)."""
    with global_numpy_seed(0):  # np.random.seed(0) at the preprocess script's import
        df = pd.read_csv(root / "train.csv")
        five = df.copy()  # fillna(0) on the label columns (MGCA fills every column; only these are compared)
        five[CHEXPERT_COLUMNS[5:]] = five[CHEXPERT_COLUMNS[5:]].fillna(0)
        five = five[five["Frontal/Lateral"] == "Frontal"]
        parts = []
        for i in range(5):
            index = np.zeros(14)
            index[i] = 1
            cond = ((five["Atelectasis"] == index[0]) & (five["Cardiomegaly"] == index[1])
                    & (five["Consolidation"] == index[2]) & (five["Edema"] == index[3])
                    & (five["Pleural Effusion"] == index[4]) & (five["Enlarged Cardiomediastinum"] == index[5])
                    & (five["Lung Lesion"] == index[7]) & (five["Lung Opacity"] == index[8])
                    & (five["Pneumonia"] == index[9]) & (five["Pneumothorax"] == index[10])
                    & (five["Pleural Other"] == index[11]) & (five["Fracture"] == index[12])
                    & (five["Support Devices"] == index[13]))
            parts.append(five[cond].sample(n=200, random_state=0))
        df_200 = pd.concat(parts)
        df = df[~df["Path"].isin(df_200["Path"])]
        valid_ids = np.random.choice(len(df), size=5000, replace=False)
        valid_df = df.iloc[valid_ids]
        train_df = df.drop(valid_ids, errors="ignore")
    test_df = pd.read_csv(root / "valid.csv")

    def frontal(frame):
        return frame[frame["Frontal/Lateral"] == "Frontal"]

    def ids(frame):
        return ["/".join(p.split("/")[1:]) for p in frame["Path"]]

    train = frontal(train_df)
    lists = {"train": ids(train), "val": ids(frontal(valid_df)), "test": ids(frontal(test_df))}
    fractions = {f: ids(train if f == 1 else train.sample(frac=f, random_state=42)) for f in FRACTIONS}
    return lists, fractions


@pytest.mark.slow
def test_chexpert_matches_mgca(tmp_path):
    write_chexpert(tmp_path)
    _spec, split, fractions = ours("chexpert", "cls", tmp_path)
    lists, ref_fractions = chexpert_reference(tmp_path)
    assert_same(split, fractions, lists, ref_fractions)
    # MGCA's validation rows that are not also dropped by label stay in training: counted, not fixed
    both = set(lists["train"]) & set(lists["val"])
    assert both and split.leaks["images"]["train/val"] == len(both)
    pid = {i: i.split("/")[1] for i in lists["train"] + lists["val"]}
    assert split.leaks["patients"]["train/val"] == len({pid[i] for i in lists["train"]}
                                                       & {pid[i] for i in lists["val"]})
    assert split.leaks["patients"]["train/test"] == 0  # valid.csv patients are not in train.csv
    assert split.scheme == "mgca" and split.missing_images == 0  # label files alone: nothing left out


# --------------------------------------------------------------------------- COVIDx
def write_covidx(root: Path, n_train: int = 400, n_test: int = 60, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    classes = ["normal", "pneumonia", "COVID-19"]
    root.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.txt", n_train), ("test.txt", n_test)):
        lines, pid = [], 0
        for i in range(n):
            pid += int(rng.random() < 0.5)  # patients with one to several images
            lines.append(f"{name[:-4]}{pid} {name[:-4]}-{i:05d}.png {classes[int(rng.integers(3))]} "
                         f"{rng.choice(['cohen', 'rsna', 'bimcv'])}\n")
        (root / name).write_text("".join(lines))


def covidx_reference(root: Path):
    """mgca/preprocess/covidx.py, then COVIDXImageDataset's sample(frac, 42)."""
    raw = pd.read_csv(root / "train.txt", sep=" ", header=None)
    raw.columns = ["patient id", "filename", "class", "data source"]
    train_df, valid_df = train_test_split(raw, train_size=0.8, random_state=0)
    test_df = pd.read_csv(root / "test.txt", sep=" ", header=None)
    test_df.columns = raw.columns

    def ids(frame, split):
        return [f"{split}/{f}" for f in frame["filename"]]

    lists = {"train": ids(train_df, "train"), "val": ids(valid_df, "train"), "test": ids(test_df, "test")}
    fractions = {f: ids(train_df if f == 1 else train_df.sample(frac=f, random_state=42), "train")
                 for f in FRACTIONS}
    return lists, fractions, train_df, valid_df


def test_covidx_matches_mgca_and_counts_patient_leaks(tmp_path, caplog):
    write_covidx(tmp_path)
    with caplog.at_level(logging.WARNING, logger="pipeline.downstream.splits"):
        _spec, split, fractions = ours("covidx", "cls", tmp_path)
    lists, ref_fractions, train_df, valid_df = covidx_reference(tmp_path)
    assert_same(split, fractions, lists, ref_fractions)
    crossing = set(train_df["patient id"]) & set(valid_df["patient id"])
    assert crossing and split.leaks["patients"]["train/val"] == len(crossing)
    assert split.leaks["images"]["train/val"] == 0
    assert f"{len(crossing)} patients in both train and val" in caplog.text


# --------------------------------------------------------------------------- RSNA
def write_rsna(root: Path, n_patients: int, seed: int = 2) -> None:
    rng = np.random.default_rng(seed)
    lines = ["patientId,x,y,width,height,Target\n"]
    for _ in range(n_patients):
        pid = uuid(rng)
        if rng.random() < 0.25:
            for _ in range(int(rng.integers(1, 4))):
                x, y, w, h = (float(v) for v in rng.integers(50, 400, 4))
                lines.append(f"{pid},{x},{y},{w},{h},1\n")
        else:
            lines.append(f"{pid},,,,,0\n")
    root.mkdir(parents=True, exist_ok=True)
    (root / "stage_2_train_labels.csv").write_text("".join(lines))


def rsna_reference(root: Path, task: str):
    """mgca/preprocess/rsna.py (preprocess_rsna_data for cls, prepare_detection_data for det/seg), then
    RSNAImageDataset's sample(frac, 42) or RSNADetectionDataset / RSNASegmentDataset's np.random.choice
    after seed_everything(42)."""
    df = pd.read_csv(root / "stage_2_train_labels.csv")
    df["bbox"] = df.apply(lambda r: 0 if r["Target"] == 0 else [r["x"], r["y"], r["x"] + r["width"],
                                                                r["y"] + r["height"]], axis=1)
    df = df[["patientId", "bbox"]].groupby("patientId").agg(list).reset_index()
    test_size = 0.15 * 2 if task == "cls" else 5337 * 2
    train_df, test_val_df = train_test_split(df, test_size=test_size, random_state=0)
    test_df, valid_df = train_test_split(test_val_df, test_size=0.5, random_state=0)
    lists = {"train": list(train_df["patientId"]), "val": list(valid_df["patientId"]),
             "test": list(test_df["patientId"])}
    if task == "cls":
        fractions = {f: list((train_df if f == 1 else train_df.sample(frac=f, random_state=42))["patientId"])
                     for f in FRACTIONS}
    else:
        filenames = np.array([p + ".dcm" for p in train_df["patientId"]])
        fractions = {}
        for f in FRACTIONS:
            with global_numpy_seed(42):
                idx = np.random.choice(len(filenames), int(f * len(filenames)), replace=False)
            fractions[f] = [name[:-4] for name in filenames[idx]]
    return lists, fractions


@pytest.fixture(scope="module")
def rsna_root(tmp_path_factory) -> Path:
    # 26,684 patients as in stage 2: the detection split is MGCA's 16,010 / 5,337 / 5,337
    root = tmp_path_factory.mktemp("rsna")
    write_rsna(root, 26684)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("task", ["cls", "det", "seg"])
def test_rsna_matches_mgca(rsna_root, task):
    _spec, split, fractions = ours("rsna", task, rsna_root)
    lists, ref_fractions = rsna_reference(rsna_root, task)
    assert_same(split, fractions, lists, ref_fractions)
    expected = {"cls": (18678, 4003, 4003), "det": (16010, 5337, 5337), "seg": (16010, 5337, 5337)}[task]
    assert tuple(split.counts().values()) == expected
    assert split.leaks == {"patients": dict.fromkeys(("train/val", "train/test", "val/test"), 0),
                           "images": dict.fromkeys(("train/val", "train/test", "val/test"), 0)}


# --------------------------------------------------------------------------- SIIM
def write_siim(root: Path, n_images: int = 500, seed: int = 3, kaggle_spaces: bool = False) -> None:
    rng = np.random.default_rng(seed)
    empty = " -1" if kaggle_spaces else "-1"
    lines = ["ImageId, EncodedPixels\n"]
    for i in range(n_images):
        image = f"1.2.276.0.7230010.3.1.4.8323329.{1000 + i}.1517875{i:03d}.{rng.integers(10**5, 10**6)}"
        if rng.random() < 0.3:
            for _ in range(int(rng.integers(1, 4))):  # one row per pneumothorax instance
                lines.append(f"{image},{' ' if kaggle_spaces else ''}{rng.integers(1000, 9000)} 5 1019 8\n")
        else:
            lines.append(f"{image},{empty}\n")
    root.mkdir(parents=True, exist_ok=True)
    (root / "train-rle.csv").write_text("".join(lines))


def siim_reference(root: Path):
    """mgca/preprocess/siim.py (rows split 0.3 then 0.5), then SIIMImageDataset for the train split after
    seed_everything(--seed): negatives are rows whose ' EncodedPixels' is '-1', as many negative images
    as positive ones are drawn, then int(F x n) images unless F = 1."""
    df = pd.read_csv(root / "train-rle.csv")
    train_df, test_val_df = train_test_split(df, test_size=0.15 * 2, random_state=0)
    test_df, valid_df = train_test_split(test_val_df, test_size=0.5, random_state=0)
    lists = {"train": list(train_df["ImageId"]), "val": list(valid_df["ImageId"]), "test": list(test_df["ImageId"])}
    fractions = {}
    for f in FRACTIONS:
        with global_numpy_seed(0 if f == 0.1 else 42):  # run_seg_finetune.sh: --seed 0 for siim at 10%
            d = train_df.copy()
            d["class"] = d[" EncodedPixels"].apply(lambda x: x != "-1")
            neg, pos = d[d["class"] == False], d[d["class"] == True]  # noqa: E712
            chosen = np.random.choice(neg["ImageId"].unique(), size=pos["ImageId"].nunique(), replace=False)
            d = pd.concat([pos, neg[neg["ImageId"].isin(chosen)]])
            if f != 1:
                ids = d["ImageId"].unique()
                d = d[d["ImageId"].isin(np.random.choice(ids, size=int(len(ids) * f), replace=False))]
        fractions[f] = list(d["ImageId"].unique())
    return lists, fractions


def test_siim_matches_mgca(tmp_path, caplog):
    write_siim(tmp_path / "published")
    with caplog.at_level(logging.WARNING, logger="pipeline.downstream.splits"):
        spec, split, fractions = ours("siim", "seg", tmp_path / "published")
    lists, ref_fractions = siim_reference(tmp_path / "published")
    assert_same(split, fractions, lists, ref_fractions)
    # rows, not images, are split: an image with several rows can sit in two lists, and that is counted
    shared = {pair: len(set(lists[a]) & set(lists[b])) for pair, (a, b) in
              {"train/val": ("train", "val"), "train/test": ("train", "test"), "val/test": ("val", "test")}.items()}
    assert sum(shared.values()) > 0 and split.leaks["images"] == shared
    assert "images in both" in caplog.text or "image in both" in caplog.text
    # the training list is balanced: as many negative as positive images at F = 1
    positive = {r.image_id for r in spec.records if r.rle}
    assert len(set(fractions[1.0]) & positive) * 2 == len(fractions[1.0])
    # the Kaggle original writes " -1" (leading space): the same lists
    write_siim(tmp_path / "kaggle", kaggle_spaces=True)
    _, split2, fractions2 = ours("siim", "seg", tmp_path / "kaggle")
    assert (split2.train, split2.val, split2.test) == (split.train, split.val, split.test)
    assert fractions2 == fractions


# --------------------------------------------------------------------------- Object-CXR
def write_object_cxr(root: Path, n_train: int = 300, n_dev: int = 50, seed: int = 4) -> None:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for name, n, start in (("train.csv", n_train, 1), ("dev.csv", n_dev, 8001)):
        lines = ["image_name,annotation\n"]
        for i in range(n):
            anno = ""
            if rng.random() < 0.5:
                x, y = (int(v) for v in rng.integers(50, 300, 2))
                anno = rng.choice([f"0 {x} {y} {x + 40} {y + 30}", f"1 {x} {y} {x + 20} {y + 20}",
                                   f"2 {x} {y} {x + 30} {y} {x + 15} {y + 25}"])
            lines.append(f"{start + i:05d}.jpg,{anno}\n")
        (root / name).write_text("".join(lines))


def object_cxr_reference(root: Path):
    """mgca/preprocess/object_cxr.py, then OBJCXRDetectionDataset's np.random.choice after
    seed_everything(42)."""
    train_df, val_df = train_test_split(pd.read_csv(root / "train.csv"), test_size=0.1, random_state=0)
    test_df = pd.read_csv(root / "dev.csv")
    lists = {"train": [f"train/{n}" for n in train_df["image_name"]],
             "val": [f"train/{n}" for n in val_df["image_name"]],
             "test": [f"dev/{n}" for n in test_df["image_name"]]}
    names = np.array(list(train_df["image_name"]))
    fractions = {}
    for f in FRACTIONS:
        with global_numpy_seed(42):
            fractions[f] = [f"train/{n}" for n in names[np.random.choice(len(names), int(f * len(names)),
                                                                          replace=False)]]
    return lists, fractions


def test_object_cxr_matches_mgca(tmp_path):
    write_object_cxr(tmp_path)
    _spec, split, fractions = ours("object-cxr", "det", tmp_path)
    lists, ref_fractions = object_cxr_reference(tmp_path)
    assert_same(split, fractions, lists, ref_fractions)
    assert len(fractions[0.01]) == int(0.01 * 270) == 2


# --------------------------------------------------------------------------- pairs, images, files
def test_no_mgca_recipe_and_tool_spec_refused(tmp_path):
    write_siim(tmp_path, n_images=40)
    with pytest.raises(SplitError, match="MGCA has no siim cls recipe"):
        make_split(load_dataset("siim", tmp_path, "cls", protocol="mgca", require_images=False), protocol="mgca")
    with pytest.raises(SplitError, match="read with protocol 'tool'"):
        make_split(load_dataset("siim", tmp_path, "seg", require_images=False), protocol="mgca")


def test_images_missing_on_disk_are_left_out_of_mgca_lists(tmp_path):
    write_object_cxr(tmp_path, n_train=60, n_dev=10)
    from PIL import Image

    on_disk = [f"{i:05d}.jpg" for i in range(1, 41)] + ["08001.jpg", "08002.jpg"]
    for name in on_disk:
        folder = tmp_path / ("dev" if name.startswith("08") else "train")
        folder.mkdir(exist_ok=True)
        Image.new("L", (64, 64)).save(folder / name)
    full = make_split(load_dataset("object-cxr", tmp_path, "det", protocol="mgca", require_images=False),
                      protocol="mgca")
    spec = load_dataset("object-cxr", tmp_path, "det", protocol="mgca", max_missing=0.9)
    split = make_split(spec, protocol="mgca")
    present = {r.image_id for r in spec.records}
    assert len(present) == 42
    for name in ("train", "val", "test"):
        assert split.ids(name) == [i for i in full.ids(name) if i in present]
    assert split.missing_images == 70 - 42
    # MGCA's draw runs on all its rows; the list keeps the ones on disk
    assert sample_fraction(split, 0.5, 0, spec) == [i for i in sample_fraction(full, 0.5, 0) if i in present]


def test_leaks_counted_on_a_hand_made_split(tmp_path, caplog):
    """Six COVIDx images of four patients; the published lists put patient p1 in train and test, image
    b.png (patient p2) in train and val, and patient p3 in val and test."""
    root = tmp_path / "covidx"
    root.mkdir()
    (root / "train.txt").write_text("p1 a.png normal x\np2 b.png normal x\np3 c.png pneumonia x\n"
                                    "p4 d.png normal x\np3 e.png COVID-19 x\n")
    (root / "test.txt").write_text("p1 f.png normal x\n")
    spec = load_dataset("covidx", root, "cls", protocol="mgca", require_images=False)
    lists = {"train": ["train/a.png", "train/b.png", "train/d.png"], "val": ["train/b.png", "train/c.png"],
             "test": ["test/f.png", "train/e.png"]}
    (tmp_path / "published.json").write_text(json.dumps(lists))
    with caplog.at_level(logging.WARNING, logger="pipeline.downstream.splits"):
        split = load_split_file(tmp_path / "published.json", spec, protocol="mgca")
    assert split.leaks == {"patients": {"train/val": 1, "train/test": 1, "val/test": 1},
                           "images": {"train/val": 1, "train/test": 0, "val/test": 0}}
    assert count_leaks(split, spec) == split.leaks
    assert "1 patient in both train and test" in caplog.text
    assert "1 image in both train and val" in caplog.text
    # the same lists are refused under tool, naming the overlap
    with pytest.raises(SplitError, match=r"1 image\(s\) in both train and val.*--protocol mgca"):
        load_split_file(tmp_path / "published.json", spec, protocol="tool")
    # not MGCA's own lists: no MGCA draw to take fractions from, and the error says how to get one
    with pytest.raises(SplitError, match="cli.py splits --protocol mgca --fraction 0.1"):
        sample_fraction(split, 0.1, 0, spec)


def test_mgca_split_folder_round_trip(tmp_path):
    write_covidx(tmp_path / "covidx", n_train=120, n_test=20)
    spec = load_dataset("covidx", tmp_path / "covidx", "cls", protocol="mgca", require_images=False)
    split = make_split(spec, protocol="mgca")
    files = [write_fraction(sample_fraction(split, f, 0, spec), tmp_path / "s", f, None, protocol="mgca")
             for f in (0.1, 1.0)] if (tmp_path / "s").mkdir() is None else []
    assert [f["file"] for f in files] == ["train-frac0.1.txt", "train-frac1.txt"]
    write_split(split, tmp_path / "s", fraction_files=files)
    # without the label rows (a tool-read spec): the lists and fraction files come from the folder
    tool_spec = load_dataset("covidx", tmp_path / "covidx", "cls", require_images=False)
    back = load_split_file(tmp_path / "s", tool_spec)
    assert back.scheme == "mgca" and (back.train, back.val, back.test) == (split.train, split.val, split.test)
    assert back.draw is None
    assert sample_fraction(back, 0.1, 5, tool_spec) == sample_fraction(split, 0.1, 0, spec)
    with pytest.raises(SplitError, match=r"fraction 0.01 \(it has: 0.1, 1\)"):
        sample_fraction(back, 0.01, 0, tool_spec)
    # with them: MGCA's own lists are recognised, so every fraction can be drawn
    again = load_split_file(tmp_path / "s", spec)
    assert again.draw is not None
    assert sample_fraction(again, 0.01, 0, spec) == sample_fraction(split, 0.01, 0, spec)
    # an edited fraction list is refused
    (tmp_path / "s" / "train-frac0.1.txt").write_text("train/train-00000.png\n")
    with pytest.raises(SplitError, match="does not match the sha256"):
        sample_fraction(load_split_file(tmp_path / "s", tool_spec), 0.1, 0, tool_spec)


# --------------------------------------------------------------------------- Object-CXR boxes
def test_object_cxr_mgca_boxes_worked_by_hand(tmp_path):
    """Ellipse 1 10 20 50 80 and rectangle 0 5 5 15 25: the box of their corners under both protocols.
    Polygon (0,0) (120,0) (0,160), a right triangle with legs 120 and 160 and hypotenuse 200: tight box
    (0, 0, 120, 160). MGCA grows its outline by 100 px; the grown triangle's point farthest from its
    edge is the incenter, r = (120 + 160 - 200) / 2 = 40 from each side: (40, 40). The box centred there
    reaching the farthest vertex: half width max(40 - 0, 120 - 40) = 80, half height max(40, 160 - 40)
    = 120, so (-40, -80, 120, 160); polylabel finds the centre to within a fraction of a pixel here."""
    from PIL import Image

    (tmp_path / "train").mkdir()
    (tmp_path / "train.csv").write_text("image_name,annotation\n"
                                        "00001.jpg,1 10 20 50 80;2 0 0 120 0 0 160;0 5 5 15 25\n")
    Image.new("L", (200, 200)).save(tmp_path / "train" / "00001.jpg")
    tool = load_dataset("object-cxr", tmp_path, "det", files="train.csv").records[0]
    mgca = load_dataset("object-cxr", tmp_path, "det", files="train.csv", protocol="mgca")
    assert tool.box_kinds == mgca.records[0].box_kinds == ("ellipse", "polygon", "rectangle")
    assert tool.boxes == ((10, 20, 50, 80), (0, 0, 120, 160), (5, 5, 15, 25))
    ellipse, polygon, rectangle = mgca.records[0].boxes
    assert ellipse == (10, 20, 50, 80) and rectangle == (5, 5, 15, 25)
    assert polygon == pytest.approx((-40, -80, 120, 160), abs=0.5)
    # the far sides are the tight box's exactly; MGCA's box is not clipped to the 200 x 200 image
    assert polygon[2:] == pytest.approx((120, 160), abs=1e-9)
    assert mgca.counts["boxes_outside_image"] == 1 and "boxes_outside_image" not in \
        load_dataset("object-cxr", tmp_path, "det", files="train.csv").counts


def test_rsna_detection_split_of_a_small_file_holds_out_mgca_share(tmp_path, caplog):
    """A label file with fewer patients than MGCA's 2 x 5337 held-out ones (a synthetic set) gets the same
    share held out (10,674 of 26,684), with a warning; the lists are sklearn's for that share."""
    write_rsna(tmp_path, 300)
    with caplog.at_level(logging.WARNING, logger="pipeline.downstream.splits"):
        spec = load_dataset("rsna", tmp_path, "det", protocol="mgca", require_images=False)
        split = make_split(spec, protocol="mgca")
    ids = sorted(pd.read_csv(tmp_path / "stage_2_train_labels.csv")["patientId"].unique())
    train, rest = train_test_split(ids, test_size=2 * 5337 / 26684, random_state=0)
    test, val = train_test_split(rest, test_size=0.5, random_state=0)
    assert (split.train, split.val, split.test) == (sorted(train), sorted(val), sorted(test))
    assert split.counts() == {"train": 179, "val": 61, "test": 60}
    assert "smaller than the published one" in caplog.text and "scaled to 300 patients" in split.protocol
