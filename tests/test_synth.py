"""The synthetic chest X-ray world: phantoms, reports, the MIMIC-CXR-JPG tree and downstream sets."""
from __future__ import annotations

import csv
import gzip
import json
import re
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.common import MflagError
from pipeline.downstream.datasets.siim import rle_decode
from pipeline.synth import downstream, mimic
from pipeline.synth.dicom import siim_uids, write_dicom
from pipeline.synth.phantom import DEVICES, Findings, Opacity, Sided, polygon_mask, render, sample_findings
from pipeline.synth.reports import CHEXPERT_LABELS, label_report, label_sentences, make_report
from pipeline.text.sections import extract_sections

DICOM_ID = r"[0-9a-f]{8}(?:-[0-9a-f]{8}){4}"
IMAGE_PATH = re.compile(rf"^files/p(1\d)/p(1\d{{7}})/s(5\d{{7}})/({DICOM_ID})\.jpg$")
REPORT_PATH = re.compile(r"^files/p(1\d)/p(1\d{7})/s(5\d{7})\.txt$")
LABEL_VALUES = {"", "1.0", "0.0", "-1.0"}


def read_csv_gz(path: Path) -> tuple[list[str], list[dict]]:
    with gzip.open(path, "rt", newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames), list(reader)


@pytest.fixture(scope="module")
def mimic_tree(tmp_path_factory):
    out = tmp_path_factory.mktemp("mimic")
    summary = mimic.write_mimic(out, n_studies=40, seed=3, image_size=64)
    return out, summary


# --------------------------------------------------------------------------- phantom
def test_render_is_deterministic_and_seed_dependent():
    f = Findings(opacities=(Opacity("consolidation", "right lower lobe", 2),), devices=("enteric tube",))
    a, ga = render(f, np.random.default_rng(5), 96)
    b, gb = render(f, np.random.default_rng(5), 96)
    c, _ = render(f, np.random.default_rng(6), 96)
    assert a.dtype == np.uint8 and a.shape == (96, 96)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert [r.box for r in ga.regions] == [r.box for r in gb.regions]
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(ga.regions, gb.regions))


@pytest.mark.parametrize("view", ["PA", "AP", "LATERAL"])
def test_geometry_boxes_are_the_tight_boxes_of_their_masks(view):
    f = Findings(opacities=(Opacity("consolidation", "left upper lobe", 3), Opacity("nodule", "right upper lobe", 2),
                            Opacity("atelectasis", "left lower lobe", 2)),
                 cardiomegaly=2, effusions=(Sided("R", 2),), pneumothoraces=(Sided("L", 2),), edema=1,
                 devices=DEVICES, foreign_objects=("rectangle", "ellipse", "polygon"))
    img, geo = render(f, np.random.default_rng(1), (120, 100), view)
    assert img.shape == (120, 100) and geo.size == (120, 100)
    kinds = {r.finding for r in geo.regions}
    assert {"opacity", "effusion", "pneumothorax", "device", "foreign_object", "heart"} <= kinds
    for r in geo.regions:
        assert r.mask.shape == (120, 100) and r.mask.dtype == bool and r.mask.any(), r.label
        ys, xs = np.nonzero(r.mask)
        assert r.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), r.label
    union = np.zeros((120, 100), dtype=bool)
    for r in geo.select("foreign_object"):
        union |= r.mask
    assert np.array_equal(geo.mask("foreign_object"), union) and len(geo.boxes("foreign_object")) == 3
    assert geo.mask("nothing").shape == (120, 100) and not geo.mask("nothing").any()


def _lung_contrast(f: Findings, seed: int) -> tuple[float, int]:
    img, geo = render(f, np.random.default_rng(seed), 128)
    m = geo.mask("opacity")
    return float(img[m].mean()), int(m.sum())


def test_opacity_severity_is_visible():
    normal_img, _ = render(Findings(), np.random.default_rng(0), 128)
    results = {}
    for sev in (1, 3):
        vals = [_lung_contrast(Findings(opacities=(Opacity("consolidation", "right lower lobe", sev),)), s)
                for s in range(4)]
        results[sev] = (np.mean([v for v, _ in vals]), np.mean([a for _, a in vals]))
    assert results[3][1] > 1.5 * results[1][1]  # larger
    assert results[3][0] > results[1][0]  # denser
    # An opacity is much brighter than aerated lung of a normal chest at the same place.
    f = Findings(opacities=(Opacity("consolidation", "right lower lobe", 2),))
    img, geo = render(f, np.random.default_rng(0), 128)
    m = geo.mask("opacity")
    assert img[m].mean() > normal_img[m].mean() + 25


def test_cardiomegaly_widens_the_heart_and_pneumothorax_is_lucent():
    w = {}
    for c in (0, 3):
        _, geo = render(Findings(cardiomegaly=c), np.random.default_rng(2), 128)
        x1, _, x2, _ = geo.boxes("heart")[0]
        w[c] = x2 - x1
        assert geo.ctr > (0.55 if c else 0.3)
    assert w[3] > 1.2 * w[0]
    img, geo = render(Findings(pneumothoraces=(Sided("R", 3),)), np.random.default_rng(2), 128)
    m = geo.mask("pneumothorax")
    assert m[:, :64].sum() > 0.9 * m.sum()  # patient's right = image left
    assert img[m].mean() < img[m[:, ::-1]].mean() - 10  # darker than the aerated left lung


def test_sample_findings_is_varied_and_validated():
    rng = np.random.default_rng(0)
    fs = [sample_findings(rng) for _ in range(300)]
    assert 0.2 < np.mean([f.is_normal for f in fs]) < 0.5
    assert any(f.pneumothoraces for f in fs) and any(f.effusions for f in fs) and any(f.cardiomegaly for f in fs)
    with pytest.raises(ValueError, match="location"):
        Opacity("consolidation", "upper left", 2)
    with pytest.raises(ValueError, match="device"):
        Findings(devices=("stent",))


def test_polygon_mask_even_odd():
    m = polygon_mask([(1, 1), (7, 1), (7, 5), (1, 5)], 8, 10)
    assert m.sum() == 6 * 4 and m[1, 1] and not m[5, 1] and not m[1, 7]


# --------------------------------------------------------------------------- reports
def test_reports_parse_back_and_labels_agree_with_the_labeler():
    rng = np.random.default_rng(11)
    layouts = set()
    prior = None
    for i in range(400):
        f = sample_findings(rng)
        r = make_report(f, rng, prior=prior if i % 3 else None)
        prior = f
        assert extract_sections(r.text) == r.sections
        assert label_report(r.text) == r.labels
        lines = r.text.rstrip("\n").split("\n")
        assert lines[0].strip() == "FINAL REPORT" and all(line.startswith(" ") for line in lines)
        assert all(len(line) <= 81 for line in lines)
        headers = re.findall(r"^ ([A-Z][A-Z ]+):", r.text, flags=re.M)
        layouts.add(tuple(h for h in headers if h not in ("EXAMINATION", "INDICATION", "TECHNIQUE", "COMPARISON")))
        if not (r.sections.get("findings") or r.sections.get("impression")):
            assert all(v is None for v in r.labels.values())
    assert ("FINDINGS", "IMPRESSION") in layouts and ("FINDINGS", "CONCLUSION") in layouts
    assert ("FINDINGS AND IMPRESSION",) in layouts and ("IMPRESSION",) in layouts


@pytest.mark.parametrize("sentences, label, value", [
    (["No pneumothorax."], "Pneumothorax", 0.0),
    (["Small right apical pneumothorax."], "Pneumothorax", 1.0),
    (["Possible tiny left apical pneumothorax."], "Pneumothorax", -1.0),
    (["Early consolidation in the lingula cannot be excluded."], "Consolidation", -1.0),
    (["Moderate bilateral pleural effusions.", "No pleural effusion."], "Pleural Effusion", 1.0),
    (["Heart size is normal."], "Cardiomegaly", 0.0),
    (["The heart is severely enlarged."], "Cardiomegaly", 1.0),
    (["The lungs are clear."], "No Finding", 1.0),
    (["The lungs are clear."], "Pneumothorax", None),
    (["Moderate pulmonary edema."], "No Finding", None),
    (["Right PICC line terminates in the mid SVC."], "No Finding", 1.0),
])
def test_labeler_rules(sentences, label, value):
    assert label_sentences(sentences)[label] == value


def test_report_wording_follows_findings():
    rng = np.random.default_rng(0)
    f = Findings(opacities=(Opacity("consolidation", "left lower lobe", 3),), effusions=(Sided("R", 3),))
    r = make_report(f, rng, layout="standard")
    assert "left lower lobe" in r.sections["findings"] and "large right pleural effusion" in r.text.lower()
    assert r.labels["Pleural Effusion"] == 1.0 and r.labels["No Finding"] is None
    normal = make_report(Findings(), rng, layout="standard")
    assert normal.labels["No Finding"] == 1.0
    assert make_report(Findings(), rng, layout="empty").sections["findings"] == ""


# --------------------------------------------------------------------------- MIMIC tree
def test_mimic_layout_csvs_and_ids(mimic_tree):
    out, summary = mimic_tree
    cols, meta = read_csv_gz(out / mimic.METADATA_NAME)
    assert tuple(cols) == mimic.METADATA_COLUMNS
    scols, split = read_csv_gz(out / mimic.SPLIT_NAME)
    assert scols == ["dicom_id", "study_id", "subject_id", "split"]
    ccols, chex = read_csv_gz(out / mimic.CHEXPERT_NAME)
    assert ccols == ["subject_id", "study_id", *CHEXPERT_LABELS]
    assert len(chex) == summary["n_studies"] == 40 and len(meta) == len(split) == summary["n_images"]

    jpgs = sorted(str(p.relative_to(out)) for p in out.rglob("*.jpg"))
    txts = sorted(str(p.relative_to(out)) for p in out.rglob("*.txt"))
    assert len(jpgs) == len(meta) and len(txts) == 40
    by_dicom = {}
    for rel in jpgs:
        m = IMAGE_PATH.match(rel)
        assert m, rel
        group, subject, study, dicom_id = m.groups()
        assert subject.startswith(group)
        by_dicom[dicom_id] = (subject, study)
    for rel in txts:
        assert REPORT_PATH.match(rel), rel
    allowed_views = {"PA", "AP", "LATERAL", "LL", "AP AXIAL", "PA LLD", "LAO", "RAO", ""}
    per_study = defaultdict(int)
    for row in meta:
        assert re.fullmatch(DICOM_ID, row["dicom_id"])
        assert by_dicom[row["dicom_id"]] == (row["subject_id"], row["study_id"])
        assert row["ViewPosition"] in allowed_views
        path = out / f"files/p{row['subject_id'][:2]}/p{row['subject_id']}/s{row['study_id']}/{row['dicom_id']}.jpg"
        with Image.open(path) as im:
            assert im.mode == "L" and im.format == "JPEG"
            assert (im.height, im.width) == (int(row["Rows"]), int(row["Columns"]))
        assert re.fullmatch(r"2\d{3}[01]\d[0-3]\d", row["StudyDate"])
        per_study[row["study_id"]] += 1
    assert set(per_study.values()) <= {1, 2, 3} and len(per_study) == 40
    assert {r["ViewPosition"] for r in meta} >= {"PA", "AP", "LATERAL"}
    # Split by subject, consistent with the metadata.
    subject_split = {}
    for row in split:
        assert by_dicom[row["dicom_id"]] == (row["subject_id"], row["study_id"])
        assert subject_split.setdefault(row["subject_id"], row["split"]) == row["split"]
    assert set(subject_split.values()) == {"train", "validate", "test"}
    assert summary["n_subjects"] == len(subject_split) < 40  # several studies per subject


def test_mimic_chexpert_csv_agrees_with_report_text(mimic_tree):
    out, _ = mimic_tree
    _, chex = read_csv_gz(out / mimic.CHEXPERT_NAME)
    seen_values = set()
    for row in chex:
        s = row["subject_id"]
        text = (out / f"files/p{s[:2]}/p{s}/s{row['study_id']}.txt").read_text()
        labels = label_report(text)
        for name in CHEXPERT_LABELS:
            assert row[name] in LABEL_VALUES
            expect = "" if labels[name] is None else f"{labels[name]:.1f}"
            assert row[name] == expect, (row["study_id"], name)
            seen_values.add(row[name])
        assert "FINAL REPORT" in text and "___" in text
    assert seen_values == LABEL_VALUES


def test_mimic_is_deterministic_zip_matches_and_workers_agree(tmp_path, mimic_tree):
    out, _ = mimic_tree
    a = mimic.write_mimic(tmp_path / "a", n_studies=40, seed=3, image_size=64, zip_reports=True, workers=2)
    assert a["reports"].endswith("mimic-cxr-reports.zip")
    for name in (mimic.METADATA_NAME, mimic.SPLIT_NAME, mimic.CHEXPERT_NAME):
        assert (out / name).read_bytes() == (tmp_path / "a" / name).read_bytes()
    jpg = next(out.rglob("*.jpg"))
    assert jpg.read_bytes() == (tmp_path / "a" / jpg.relative_to(out)).read_bytes()
    with zipfile.ZipFile(tmp_path / "a" / "mimic-cxr-reports.zip") as zf:
        names = zf.namelist()
        assert len(names) == 40 and all(REPORT_PATH.match(n) for n in names)
        assert zf.read(names[0]).decode() == (out / names[0]).read_text()
    assert not list((tmp_path / "a").rglob("*.txt"))
    b = mimic.write_mimic(tmp_path / "b", n_studies=5, seed=4, image_size=64)
    _, meta_b = read_csv_gz(Path(b["metadata"]))
    _, meta_a = read_csv_gz(Path(a["metadata"]))
    assert {r["dicom_id"] for r in meta_b}.isdisjoint({r["dicom_id"] for r in meta_a})
    with pytest.raises(MflagError, match="n_studies"):
        mimic.write_mimic(tmp_path / "c", n_studies=0, seed=0)
    # A rerun with the same arguments is fine; another corpus into the same folder is refused.
    assert mimic.write_mimic(tmp_path / "b", n_studies=5, seed=4, image_size=64)["n_images"] == b["n_images"]
    with pytest.raises(MflagError, match="different synthetic"):
        mimic.write_mimic(tmp_path / "b", n_studies=5, seed=5, image_size=64)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("x")
    with pytest.raises(MflagError, match="not empty"):
        mimic.write_mimic(tmp_path / "d", n_studies=5, seed=5, image_size=64)


# --------------------------------------------------------------------------- downstream sets
@pytest.fixture
def captured(monkeypatch):
    """Record every (image, geometry) the downstream writers render, in order."""
    seen = []

    def spy(*args, **kwargs):
        img, geo = render(*args, **kwargs)
        seen.append((img, geo))
        return img, geo

    monkeypatch.setattr(downstream, "render", spy)
    return seen


def test_chexpert_layout(tmp_path):
    s = downstream.write_chexpert(tmp_path, n=30, seed=0, image_size=48)
    rows = {}
    for split in ("train", "valid"):
        with open(tmp_path / f"{split}.csv", newline="") as fh:
            header = fh.readline().rstrip("\n")
            assert header == ",".join(downstream.CHEXPERT_HEADER)
            fh.seek(0)
            rows[split] = list(csv.DictReader(fh))
    assert len(rows["train"]) + len(rows["valid"]) == s["n_images"] == 30 and rows["valid"]
    patients = {}
    for split, rs in rows.items():
        for r in rs:
            m = re.fullmatch(rf"CheXpert-v1\.0-small/{split}/(patient\d{{5}})/study\d+/view\d+_(frontal|lateral)\.jpg",
                             r["Path"])
            assert m, r["Path"]
            assert patients.setdefault(m.group(1), split) == split  # patient-disjoint
            assert (tmp_path / r["Path"].split("/", 1)[1]).is_file()
            assert r["Frontal/Lateral"] == m.group(2).capitalize()
            assert r["AP/PA"] in (("AP", "PA") if m.group(2) == "frontal" else ("",))
            values = [r[c] for c in downstream.CHEXPERT_HEADER[5:]]
            assert set(values) <= (LABEL_VALUES if split == "train" else {"0.0", "1.0"})
    assert any(r["Frontal/Lateral"] == "Lateral" for r in rows["train"] + rows["valid"])


def test_rsna_layout_boxes_and_dicoms(tmp_path, captured):
    s = downstream.write_rsna(tmp_path, n=16, seed=0, image_size=64, positive_fraction=0.6,
                              monochrome1_fraction=0.5)
    with open(tmp_path / "stage_2_train_labels.csv", newline="") as fh:
        assert fh.readline() == "patientId,x,y,width,height,Target\n"
        fh.seek(0)
        rows = list(csv.DictReader(fh))
    with open(tmp_path / "stage_2_detailed_class_info.csv", newline="") as fh:
        cls_rows = list(csv.DictReader(fh))
    assert len(cls_rows) == len(rows) == s["rows"]
    by_pid = defaultdict(list)
    for r in rows:
        by_pid[r["patientId"]].append(r)
    assert len(by_pid) == 16 and len(captured) == 16
    photometric = set()
    for (img, geo), pid in zip(captured, list(dict.fromkeys(r["patientId"] for r in rows))):
        rs = by_pid[pid]
        ds = pydicom.dcmread(tmp_path / "stage_2_train_images" / f"{pid}.dcm")
        assert ds.PatientID == pid and ds.Modality == "CR" and ds.ViewPosition in ("PA", "AP")
        px = ds.pixel_array
        if ds.PhotometricInterpretation == "MONOCHROME1":
            px = 255 - px
        photometric.add(ds.PhotometricInterpretation)
        assert np.abs(px.astype(int) - img).mean() < 4
        if rs[0]["Target"] == "1":
            assert 1 <= len(rs) <= 3 and all(r["Target"] == "1" for r in rs)
            boxes = sorted((float(r["x"]), float(r["y"]), float(r["x"]) + float(r["width"]),
                            float(r["y"]) + float(r["height"])) for r in rs)
            assert boxes == sorted(tuple(map(float, b)) for b in geo.boxes("opacity"))
        else:
            assert len(rs) == 1 and [rs[0][k] for k in ("x", "y", "width", "height")] == ["", "", "", ""]
            assert not geo.boxes("opacity")
    assert photometric == {"MONOCHROME1", "MONOCHROME2"}
    assert {r["class"] for r in cls_rows} <= set(downstream.RSNA_CLASSES)
    assert s["positive"] > 0 and "Normal" in s["classes"]


def test_dicom_matches_the_real_siim_sample(tmp_path, realcxr):
    real = pydicom.dcmread(realcxr / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm")
    img, _ = render(Findings(), np.random.default_rng(0), 128)
    study, series, sop = siim_uids(np.random.default_rng(1))
    write_dicom(tmp_path / "x.dcm", img, sop_uid=sop, study_uid=study, series_uid=series, patient_id="p")
    ours = pydicom.dcmread(tmp_path / "x.dcm")
    assert ours.file_meta.TransferSyntaxUID == real.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    for key in ("Modality", "PhotometricInterpretation", "BitsAllocated", "BitsStored", "SamplesPerPixel",
                "PixelRepresentation", "SOPClassUID", "BodyPartExamined"):
        assert getattr(ours, key) == getattr(real, key), key
    assert ours.SOPInstanceUID == sop and ours.pixel_array.dtype == np.uint8


def test_siim_layout_and_rle_decode_to_the_pneumothorax_mask(tmp_path, captured):
    s = downstream.write_siim(tmp_path, n=16, seed=0, image_size=64, positive_fraction=0.7)
    lines = (tmp_path / "train-rle.csv").read_text().splitlines()
    assert lines[0] == "ImageId, EncodedPixels"
    rows = defaultdict(list)
    for line in lines[1:]:
        image_id, rle = line.split(",", 1)
        rows[image_id].append(rle)
    assert len(rows) == 16 == len(captured) and s["rows"] == len(lines) - 1
    assert any(len(v) > 1 for v in rows.values())  # instances on separate rows
    assert any(v == [" -1"] for v in rows.values())
    files = {p.stem: p for p in (tmp_path / "dicom-images-train").glob("*/*/*.dcm")}
    assert set(files) == set(rows)
    for (img, geo), (image_id, rles) in zip(captured, rows.items()):
        ds = pydicom.dcmread(files[image_id])
        assert ds.SOPInstanceUID == image_id
        assert files[image_id].parent.name == ds.SeriesInstanceUID
        assert files[image_id].parent.parent.name == ds.StudyInstanceUID
        mask = np.zeros(img.shape, dtype=np.uint8)
        for rle in rles:
            mask |= rle_decode(rle, ds.Rows, ds.Columns)
        assert np.array_equal(mask.astype(bool), geo.mask("pneumothorax"))


def test_downstream_output_does_not_depend_on_workers(tmp_path):
    a = downstream.write_siim(tmp_path / "a", n=6, seed=2, image_size=48, positive_fraction=0.5)
    b = downstream.write_siim(tmp_path / "b", n=6, seed=2, image_size=48, positive_fraction=0.5, workers=2)
    assert (tmp_path / "a" / "train-rle.csv").read_bytes() == (tmp_path / "b" / "train-rle.csv").read_bytes()
    assert a["positive"] == b["positive"] > 0
    for p in (tmp_path / "a").rglob("*.dcm"):
        assert np.array_equal(pydicom.dcmread(p).pixel_array,
                              pydicom.dcmread(tmp_path / "b" / p.relative_to(tmp_path / "a")).pixel_array)


def test_covidx_layout_and_label_sets(tmp_path):
    a = downstream.write_covidx(tmp_path / "a", n=24, seed=0, image_size=48)
    b = downstream.write_covidx(tmp_path / "b", n=24, seed=0, image_size=48, label_set="B")
    suffixes, modes, patients = set(), set(), {}
    for root, allowed in ((tmp_path / "a", set(downstream.COVIDX_CLASSES_A)),
                          (tmp_path / "b", set(downstream.COVIDX_CLASSES_B))):
        classes = set()
        for split in ("train", "test"):
            for line in (root / f"{split}.txt").read_text().splitlines():
                patient, name, cls, source = line.split(" ")
                classes.add(cls)
                assert patients.setdefault((root.name, patient), split) == split
                with Image.open(root / split / name) as im:
                    modes.add(im.mode)
                suffixes.add(Path(name).suffix)
                assert source
        assert classes == allowed
    assert {".png", ".jpg"} <= suffixes and {"L", "RGB"} <= modes
    assert a["test"] > 0 and set(a["classes"]["test"]) == set(downstream.COVIDX_CLASSES_A)
    assert b["n_images"] == 24
    with pytest.raises(MflagError, match="label_set"):
        downstream.write_covidx(tmp_path / "c", n=5, seed=0, label_set="C")


def test_object_cxr_layout_and_annotations(tmp_path, captured):
    s = downstream.write_object_cxr(tmp_path, n=20, seed=0, image_size=64, dev_fraction=0.2)
    sizes, kinds = set(), set()
    all_rows = []
    for split, first in (("train", 1), ("dev", s["train"] + 1)):
        with open(tmp_path / f"{split}.csv", newline="") as fh:
            assert fh.readline() == "image_name,annotation\n"
            fh.seek(0)
            rows = list(csv.DictReader(fh))
        assert [r["image_name"] for r in rows] == [f"{i:05d}.jpg" for i in range(first, first + len(rows))]
        assert sum(1 for r in rows if r["annotation"]) == (len(rows) + 1) // 2
        for r in rows:
            with Image.open(tmp_path / split / r["image_name"]) as im:
                w, h = im.size
            sizes.add((w, h))
            for obj in filter(None, r["annotation"].split(";")):
                kind, *nums = map(int, obj.split(" "))
                kinds.add(kind)
                assert (len(nums) == 4) if kind in (0, 1) else (kind == 2 and len(nums) >= 6 and len(nums) % 2 == 0)
                assert all(0 <= x <= w for x in nums[0::2]) and all(0 <= y <= h for y in nums[1::2])
            all_rows.append(r)
    assert len(sizes) > 3 and kinds == {0, 1, 2} and s["dev"] == 4
    # Annotations are the rendered foreign objects: a rectangle's corners are its mask's box.
    for (_img, geo), r in zip(captured, all_rows):
        objs = [o.split(" ") for o in filter(None, r["annotation"].split(";"))]
        assert len(objs) == len(geo.select("foreign_object"))
        for o, region in zip(objs, geo.select("foreign_object")):
            if o[0] == "0":
                assert tuple(map(int, o[1:])) == region.box


def test_cli_synth_commands(tmp_path):
    from cli import cli

    runner = CliRunner()
    res = runner.invoke(cli, ["synth", "mimic", "--out", str(tmp_path / "m"), "--n-studies", "6", "--seed", "1",
                              "--image-size", "48", "--zip-reports"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    assert summary["n_studies"] == 6 and (tmp_path / "m" / "mimic-cxr-reports.zip").is_file()
    res = runner.invoke(cli, ["synth", "object-cxr", "--out", str(tmp_path / "o"), "--n", "4", "--image-size", "48",
                              "--workers", "2"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o" / "dev.csv").is_file()
    res = runner.invoke(cli, ["synth", "siim", "--out", str(tmp_path / "s"), "--n", "2", "--image-size", "48",
                              "--monochrome1-fraction", "1"])
    assert res.exit_code == 0, res.output
    dcm = next((tmp_path / "s").rglob("*.dcm"))
    assert pydicom.dcmread(dcm).PhotometricInterpretation == "MONOCHROME1"
    res = runner.invoke(cli, ["synth", "covidx", "--out", str(tmp_path / "c"), "--n", "1"])
    assert res.exit_code == 2 and "error: n must be at least 3" in res.output
