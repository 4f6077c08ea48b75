"""Downstream readers against the real example rows of FORMATS.md, with tiny files in tmp_path."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.common import MflagError
from pipeline.downstream.datasets import siim as siim_mod
from pipeline.downstream.datasets._common import DatasetError
from pipeline.downstream.datasets.registry import load_dataset
from pipeline.downstream.datasets.rsna import read_labels
from pipeline.downstream.datasets.siim import RLEError, rle_decode, rle_encode


# --------------------------------------------------------------------------- tiny files
def write_image(path: Path, width: int, height: int, mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (width, height), 0).save(path)
    return path


def write_dicom(path: Path, rows: int, cols: int, sop_uid: str | None = None, patient_id: str = "anon") -> Path:
    """A minimal uncompressed 8-bit MONOCHROME2 DICOM with the given header size."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_uid = sop_uid or (path.stem if path.stem[0].isdigit() and "-" not in path.stem else generate_uid())
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid()
    ds.PatientID = patient_id
    ds.Modality = "CR"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(rows * cols)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------- RLE
WORKED = np.array([[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 1, 0]], dtype=np.uint8)


def test_rle_worked_example():
    assert rle_encode(WORKED) == "5 2 2 3"
    assert np.array_equal(rle_decode("5 2 2 3", 4, 4), WORKED)
    plus = WORKED.copy()
    plus[3, 3] = 1  # the last pixel: the official sample encoder would drop this run
    assert rle_encode(plus) == "5 2 2 3 3 1"
    assert np.array_equal(rle_decode("5 2 2 3 3 1", 4, 4), plus)


@pytest.mark.parametrize("shape", [(4, 4), (5, 3), (1, 7), (16, 9)])
def test_rle_round_trip_random(shape):
    rng = np.random.default_rng(sum(shape))
    for _ in range(5):
        m = (rng.random(shape) < 0.4).astype(np.uint8)
        m[-1, -1] = 1
        assert np.array_equal(rle_decode(rle_encode(m), *shape), m)


@pytest.mark.parametrize("empty", ["-1", " -1", ""])
def test_rle_empty(empty):
    assert rle_decode(empty, 3, 5).sum() == 0
    assert rle_encode(np.zeros((3, 5))) == "-1"


@pytest.mark.parametrize("bad", ["5 2 2", "5 2 2 100", "x 2", "1 0"])
def test_rle_malformed(bad):
    with pytest.raises(RLEError):
        rle_decode(bad, 4, 4)
    assert siim_mod.check_rle(bad, 4, 4) is not None


# --------------------------------------------------------------------------- CheXpert
CHEXPERT_HEADER = ("Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,"
                   "Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,"
                   "Pleural Effusion,Pleural Other,Fracture,Support Devices")
CHEXPERT_ROWS = [
    "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,1.0,,,,,,,,,0.0,,,,1.0",
    "CheXpert-v1.0-small/train/patient00002/study1/view2_lateral.jpg,Female,83,Lateral,,,,,1.0,,,-1.0,,,,,,1.0,",
    # Atelectasis -1, Cardiomegaly -1, Edema 1, Pleural Effusion -1: exercises the U-Ones/U-Zeros mix.
    "CheXpert-v1.0-small/train/patient00003/study2/view1_frontal.jpg,Male,50,Frontal,PA,,,-1.0,,,1.0,,,-1.0,,-1.0,,,",
]
CHEXPERT_VALID = ("CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg,Male,73,Frontal,AP,"
                  "0.0,1.0,1.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0")


def make_chexpert(tmp_path: Path, prefix: str = "CheXpert-v1.0-small") -> Path:
    root = tmp_path / prefix
    rows = [r.replace("CheXpert-v1.0-small", prefix) for r in CHEXPERT_ROWS]
    (root).mkdir(parents=True)
    (root / "train.csv").write_text("\n".join([CHEXPERT_HEADER, *rows]) + "\n")
    valid = CHEXPERT_VALID.replace("CheXpert-v1.0-small", prefix)
    (root / "valid.csv").write_text("\n".join([CHEXPERT_HEADER, valid]) + "\n")
    for r in [*rows, CHEXPERT_VALID]:
        rel = r.split(",")[0].split("/", 1)[1]
        write_image(root / rel, 8, 8)
    return root


def test_chexpert_example_rows(tmp_path):
    root = make_chexpert(tmp_path)
    spec = load_dataset("chexpert", root, "cls")
    assert spec.class_names == ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
    by = {r.image_id: r for r in spec.records}
    assert set(by) == {"train/patient00001/study1/view1_frontal.jpg", "train/patient00003/study2/view1_frontal.jpg",
                       "valid/patient64541/study1/view1_frontal.jpg"}  # lateral dropped by default
    r1 = by["train/patient00001/study1/view1_frontal.jpg"]
    assert r1.labels == (0.0,) * 5 and r1.patient_id == "patient00001" and r1.official_split == "train"
    assert r1.path == root / "train/patient00001/study1/view1_frontal.jpg" and r1.path.is_file()
    # competition policy: U-Ones Atelectasis/Edema/Effusion, U-Zeros Cardiomegaly/Consolidation
    assert by["train/patient00003/study2/view1_frontal.jpg"].labels == (1.0, 0.0, 0.0, 1.0, 1.0)
    assert by["valid/patient64541/study1/view1_frontal.jpg"].labels == (0.0, 1.0, 0.0, 0.0, 0.0)
    assert by["valid/patient64541/study1/view1_frontal.jpg"].official_split == "valid"
    assert spec.counts["skipped_lateral"] == 1 and spec.counts["rows"] == 4


@pytest.mark.parametrize("policy,expect3,expect2", [
    ("ones", (1.0, 1.0, 0.0, 1.0, 1.0), (0.0, 0.0, 1.0, 0.0, 0.0)),
    ("zeros", (0.0, 0.0, 0.0, 1.0, 0.0), (0.0, 0.0, 0.0, 0.0, 0.0)),
])
def test_chexpert_policies_and_laterals(tmp_path, policy, expect3, expect2):
    root = make_chexpert(tmp_path, prefix="CheXpert-v1.0")
    # root given as the parent folder: the reader finds CheXpert-v1.0/ itself
    spec = load_dataset("chexpert", tmp_path, "cls", uncertainty=policy, frontal_only=False)
    by = {r.image_id: r for r in spec.records}
    assert by["train/patient00003/study2/view1_frontal.jpg"].labels == expect3
    assert by["train/patient00002/study1/view2_lateral.jpg"].labels == expect2
    assert spec.root == root


def test_chexpert_bad_value_and_missing_column(tmp_path):
    root = make_chexpert(tmp_path)
    bad = CHEXPERT_ROWS[0].replace(",1.0,,,,,,,,,0.0", ",1.0,,yes,,,,,,,0.0")  # Cardiomegaly = "yes"
    (root / "train.csv").write_text(CHEXPERT_HEADER + "\n" + bad + "\n")
    with pytest.raises(DatasetError, match=r"train\.csv:2: column 'Cardiomegaly' has 'yes'"):
        load_dataset("chexpert", root, "cls")
    (root / "train.csv").write_text(CHEXPERT_HEADER.replace(",Edema", "") + "\n")
    with pytest.raises(DatasetError, match=r"train\.csv:1: missing column\(s\) Edema"):
        load_dataset("chexpert", root, "cls")


def test_missing_image_threshold(tmp_path):
    root = make_chexpert(tmp_path)
    (root / "train/patient00003/study2/view1_frontal.jpg").unlink()
    with pytest.raises(MflagError, match="1 of 3 labelled images are missing"):
        load_dataset("chexpert", root, "cls")
    spec = load_dataset("chexpert", root, "cls", max_missing=0.5)
    assert spec.counts["missing_images"] == 1 and len(spec.records) == 2


def test_registry_errors(tmp_path):
    root = make_chexpert(tmp_path)
    with pytest.raises(MflagError, match="unknown dataset"):
        load_dataset("mimic", root, "cls")
    with pytest.raises(MflagError, match="no option.*label_set"):
        load_dataset("chexpert", root, "cls", label_set="A")
    with pytest.raises(MflagError, match="supports tasks cls, not 'seg'"):
        load_dataset("chexpert", root, "seg")
    with pytest.raises(MflagError, match="unknown uncertainty policy"):
        load_dataset("chexpert", root, "cls", uncertainty="maybe")



def test_options_from_the_command_line_take_the_readers_types(tmp_path):
    # `--dataset-option files=valid.csv` arrives as one string (not a list of characters); several
    # files are comma-separated; a file name that parses as a number stays a name.
    root = make_chexpert(tmp_path)
    both = load_dataset("chexpert", root, "cls")
    valid_only = load_dataset("chexpert", root, "cls", files="valid.csv")
    assert {r.official_split for r in valid_only.records} == {"valid"}
    assert len(load_dataset("chexpert", root, "cls", files="train.csv,valid.csv").records) == len(both.records)
    with pytest.raises(MflagError, match="option max_missing: expected a number, got 'lots'"):
        load_dataset("chexpert", root, "cls", max_missing="lots")
    with pytest.raises(MflagError, match="option frontal_only: expected true or false"):
        load_dataset("chexpert", root, "cls", frontal_only="sometimes")
    # text from the command line: booleans and numbers by the reader's types, names exactly as typed
    from pipeline.downstream.datasets.registry import check_options

    assert check_options("chexpert", {"frontal_only": "false", "max_missing": "0.5"}) == \
        {"frontal_only": False, "max_missing": 0.5}
    assert check_options("rsna", {"images_dir": "0001", "labels_file": "1e3"}) == \
        {"images_dir": "0001", "labels_file": "1e3"}


# --------------------------------------------------------------------------- RSNA
RSNA_CSV = """patientId,x,y,width,height,Target
0004cfab-14fd-4e49-80ba-63a80b6bddd6,,,,,0
00436515-870c-4b36-a041-de91049b9ab4,264.0,152.0,213.0,379.0,1
00436515-870c-4b36-a041-de91049b9ab4,562.0,152.0,256.0,453.0,1
"""
NEG, POS = "0004cfab-14fd-4e49-80ba-63a80b6bddd6", "00436515-870c-4b36-a041-de91049b9ab4"


def make_rsna(tmp_path: Path, pos_size: int = 1024) -> Path:
    root = tmp_path / "rsna"
    root.mkdir()
    (root / "stage_2_train_labels.csv").write_text(RSNA_CSV)
    write_dicom(root / "stage_2_train_images" / f"{NEG}.dcm", 1024, 1024)
    write_dicom(root / "stage_2_train_images" / f"{POS}.dcm", pos_size, pos_size)
    return root


def test_rsna_read_labels(tmp_path):
    root = make_rsna(tmp_path)
    labels = read_labels(root / "stage_2_train_labels.csv")
    assert set(labels) == {NEG, POS}
    assert labels[NEG].shape == (0, 4)
    np.testing.assert_allclose(labels[POS], [[264, 152, 477, 531], [562, 152, 818, 605]])


def test_rsna_images_of_the_labels_stage(tmp_path):
    # A root holding both stages' folders: stage 1 labels go with the stage 1 images, although the
    # stage 2 folder (which lacks these images) is found first otherwise.
    root = make_rsna(tmp_path)
    (root / "stage_2_train_labels.csv").rename(root / "stage_1_train_labels.csv")
    (root / "stage_2_train_images").rename(root / "stage_1_train_images")
    (root / "stage_2_train_images").mkdir()
    spec = load_dataset("rsna", root, "det")
    assert {r.path.parent.name for r in spec.records} == {"stage_1_train_images"}


def test_rsna_tasks(tmp_path):
    root = make_rsna(tmp_path)
    for task in ("cls", "det", "seg"):
        spec = load_dataset("rsna", root, task)
        by = {r.image_id: r for r in spec.records}
        assert by[NEG].labels == (0.0,) and by[POS].labels == (1.0,)
        assert by[POS].patient_id == POS and by[POS].size == (1024, 1024)
        assert by[POS].boxes == ((264.0, 152.0, 477.0, 531.0), (562.0, 152.0, 818.0, 605.0))
    mask = spec.mask_fn(by[POS], 256, 256)  # boxes rendered at a quarter of the stored size
    assert mask.dtype == np.uint8 and mask.shape == (256, 256)
    assert mask[50, 80] == 1 and mask[50, 170] == 1 and mask[10, 10] == 0 and mask[140, 80] == 0
    assert spec.mask_fn(by[NEG], 64, 64).sum() == 0
    assert spec.counts.get("clipped_boxes", 0) == 0


def test_rsna_clipped_boxes_counted(tmp_path):
    root = make_rsna(tmp_path, pos_size=600)
    spec = load_dataset("rsna", root, "det")
    pos = next(r for r in spec.records if r.image_id == POS)
    assert pos.boxes[1] == (562.0, 152.0, 600.0, 600.0)
    assert spec.counts["clipped_boxes"] == 1


def test_rsna_bad_rows(tmp_path, caplog):
    root = make_rsna(tmp_path)
    csv = root / "stage_2_train_labels.csv"
    csv.write_text(RSNA_CSV + f"{POS},1.0,abc,2.0,2.0,1\n")
    with pytest.raises(DatasetError, match=r"stage_2_train_labels\.csv:5: column 'y' is not a number"):
        read_labels(csv)
    csv.write_text(RSNA_CSV + f"{POS},,,,,1\n")
    with pytest.raises(DatasetError, match=r":5: Target=1 row .* empty box"):
        read_labels(csv)
    csv.write_text(RSNA_CSV + "abcd,,,,,0\n")  # a third patient without a DICOM: 1 of 3 missing
    with pytest.raises(MflagError, match="1 of 3 labelled images are missing"):
        load_dataset("rsna", root, "cls")
    with caplog.at_level(logging.WARNING):
        assert load_dataset("rsna", root, "cls", max_missing=0.4).counts["missing_images"] == 1
    assert "stage_2_train_labels.csv:5: image" in caplog.text


# --------------------------------------------------------------------------- COVIDx
COVIDX_A = """3 SARS-10.1148rg.242035193-g04mr34g0-Fig8a-day0.jpeg pneumonia cohen
p17 normal-1.png normal rsna
p18 covid-1.jpg COVID-19 sirm
"""
COVIDX_B = """47c78742-4998-4878-aec4-37b11b1354ac 47c78742-4998-4878-aec4-37b11b1354ac.png negative rsna
p9 pos-1.jpg positive bimcv
"""


def make_covidx(tmp_path: Path, train: str, test: str, mode: str = "L") -> Path:
    root = tmp_path / "covidx"
    root.mkdir()
    (root / "train.txt").write_text(train)
    (root / "test.txt").write_text(test)
    for split, text in (("train", train), ("test", test)):
        for line in text.splitlines():
            write_image(root / split / line.split()[1], 6, 5, mode)
    return root


def test_covidx_label_set_a(tmp_path):
    root = make_covidx(tmp_path, COVIDX_A, "p20 covid-2.png COVID-19 sirm\n", mode="RGB")
    spec = load_dataset("covidx", root, "cls")
    assert spec.class_names == ("normal", "pneumonia", "COVID-19") and spec.label_kind == "multiclass"
    by = {r.image_id: r for r in spec.records}
    sars = by["train/SARS-10.1148rg.242035193-g04mr34g0-Fig8a-day0.jpeg"]
    assert sars.labels == (0.0, 1.0, 0.0) and sars.patient_id == "3" and sars.official_split == "train"
    assert by["train/covid-1.jpg"].labels == (0.0, 0.0, 1.0)
    assert by["test/covid-2.png"].official_split == "test" and by["test/covid-2.png"].path.is_file()
    with pytest.raises(DatasetError, match=r"train\.txt:1: unknown class 'pneumonia' for label set B"):
        load_dataset("covidx", root, "cls", label_set="B")


def test_covidx_label_set_b(tmp_path):
    root = make_covidx(tmp_path, COVIDX_B, "")
    spec = load_dataset("covidx", root, "cls")
    assert spec.class_names == ("negative", "positive")
    by = {r.image_id: r for r in spec.records}
    r = by["train/47c78742-4998-4878-aec4-37b11b1354ac.png"]
    assert r.labels == (1.0, 0.0) and r.patient_id == "47c78742-4998-4878-aec4-37b11b1354ac"
    assert by["train/pos-1.jpg"].labels == (0.0, 1.0)


def test_covidx_unknown_class_is_an_error(tmp_path):
    root = make_covidx(tmp_path, COVIDX_B + "p10 x.png covid bimcv\n", "")
    with pytest.raises(DatasetError, match=r"train\.txt:3: unknown class 'covid'"):
        load_dataset("covidx", root, "cls")
    (root / "train.txt").write_text("p1 onlytwo\n")
    with pytest.raises(DatasetError, match=r"train\.txt:1: expected"):
        load_dataset("covidx", root, "cls")


def test_covidx_named_label_files(tmp_path):
    root = make_covidx(tmp_path, COVIDX_B, "")
    (root / "train.txt").rename(root / "train_COVIDx9B.txt")
    (root / "test.txt").unlink()
    assert len(load_dataset("covidx", root, "cls").records) == 2
    assert len(load_dataset("covidx", root, "cls", train_file="train_COVIDx9B.txt").records) == 2


# --------------------------------------------------------------------------- SIIM
SIIM_NEG = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819"
SIIM_POS = "1.2.276.0.7230010.3.1.4.8323329.13666.1517875247.117800"
SIIM_POS_RLE = "557374 2 1015 8 1009 14 1002 20 997 26"  # the example row, up to its ellipsis


def make_siim(tmp_path: Path, extra_rows: str = "") -> Path:
    root = tmp_path / "siim"
    root.mkdir()
    (root / "train-rle.csv").write_text(
        "ImageId, EncodedPixels\n"
        f"{SIIM_NEG},-1\n"
        f"{SIIM_POS}, {SIIM_POS_RLE}\n"
        f"{SIIM_POS}, 100 3\n"  # a second instance of the same image: unioned
        f"1.2.3.4, -1\n" + extra_rows)  # the Kaggle original's ' -1'
    write_dicom(root / "dicom-images-train/1.2.9/1.2.9.1" / f"{SIIM_NEG}.dcm", 1024, 1024)
    write_dicom(root / "dicom-images-train/1.2.8/1.2.8.1" / f"{SIIM_POS}.dcm", 1024, 1024, patient_id="pt-7")
    write_dicom(root / "dicom-images-train/1.2.7/1.2.7.1" / "1.2.3.4.dcm", 20, 30, patient_id="")
    return root


def test_siim_example_rows(tmp_path):
    root = make_siim(tmp_path)
    spec = load_dataset("siim", root, "seg")
    by = {r.image_id: r for r in spec.records}
    assert by[SIIM_NEG].rle == () and by[SIIM_NEG].labels == (0.0,)
    assert by["1.2.3.4"].rle == () and by["1.2.3.4"].size == (20, 30) and by["1.2.3.4"].patient_id == "1.2.3.4"
    pos = by[SIIM_POS]
    assert pos.rle == (SIIM_POS_RLE, "100 3") and pos.labels == (1.0,) and pos.patient_id == "pt-7"
    mask = spec.mask_fn(pos, 1024, 1024)
    expected = rle_decode(SIIM_POS_RLE, 1024, 1024) | rle_decode("100 3", 1024, 1024)
    assert np.array_equal(mask, expected) and mask.sum() == 2 + 8 + 14 + 20 + 26 + 3
    assert mask[100:103, 0].all()  # column-major: pixels 100..102 lie in column 0
    small = spec.mask_fn(pos, 256, 256)
    assert small.shape == (256, 256) and small.sum() > 0
    assert spec.mask_fn(by["1.2.3.4"], 8, 8).sum() == 0
    assert spec.counts["positive"] == 1 and load_dataset("siim", root, "cls").records


def test_siim_malformed_rle_names_line(tmp_path):
    root = make_siim(tmp_path, "1.2.3.4, 5 2 2\n")
    with pytest.raises(RLEError, match=r"train-rle\.csv:6: malformed RLE for 1\.2\.3\.4: odd number"):
        load_dataset("siim", root, "seg")
    (root / "train-rle.csv").write_text("ImageId, EncodedPixels\n1.2.3.4, 590 11\n")  # 20x30 = 600 pixels
    with pytest.raises(RLEError, match=r"train-rle\.csv:2: .*past the end of a 20x30 image"):
        load_dataset("siim", root, "seg")
    (root / "train-rle.csv").write_text("ImageId,Pixels\n")
    with pytest.raises(DatasetError, match="missing column.*EncodedPixels"):
        load_dataset("siim", root, "seg")


def test_siim_real_dicom(tmp_path, realcxr):
    root = make_siim(tmp_path)
    dst = next((root / "dicom-images-train").rglob(f"{SIIM_NEG}.dcm"))
    shutil.copy(realcxr / f"{SIIM_NEG}.dcm", dst)
    spec = load_dataset("siim", root, "seg")
    r = next(r for r in spec.records if r.image_id == SIIM_NEG)
    assert r.size == (1024, 1024) and r.patient_id != SIIM_NEG


# --------------------------------------------------------------------------- Object-CXR
OBJ_TRAIN = """image_name,annotation
00001.jpg,0 10 20 30 40;1 50 50 70 80;2 5 5 15 5 10 15
00002.jpg,
00003.jpg,0 90 10 130 30
"""
OBJ_DEV = """image_name,annotation
08001.jpg,2 1 1 9 1 9 9 1 9
"""


def make_object_cxr(tmp_path: Path, train: str = OBJ_TRAIN, dev: str = OBJ_DEV) -> Path:
    root = tmp_path / "object-cxr"
    root.mkdir()
    (root / "train.csv").write_text(train)
    (root / "dev.csv").write_text(dev)
    write_image(root / "train/00001.jpg", 100, 90)
    write_image(root / "train/00002.jpg", 64, 64)
    write_image(root / "train/00003.jpg", 120, 100)  # width 120: the box to x=130 is clipped
    write_image(root / "dev/08001.jpg", 12, 12)
    return root


def test_object_cxr_shapes(tmp_path):
    root = make_object_cxr(tmp_path)
    spec = load_dataset("object-cxr", root, "det")
    by = {r.image_id: r for r in spec.records}
    r1 = by["train/00001.jpg"]
    assert r1.size == (90, 100) and r1.labels == (1.0,) and r1.official_split == "train"
    assert r1.box_kinds == ("rectangle", "ellipse", "polygon")
    assert r1.boxes == ((10.0, 20.0, 30.0, 40.0), (50.0, 50.0, 70.0, 80.0), (5.0, 5.0, 15.0, 15.0))
    assert r1.polygons[2] == ((5.0, 5.0), (15.0, 5.0), (10.0, 15.0))
    assert len(r1.polygons[0]) == 4 and len(r1.polygons[1]) == 4
    assert by["train/00002.jpg"].boxes == () and by["train/00002.jpg"].labels == (0.0,)
    assert by["train/00003.jpg"].boxes == ((90.0, 10.0, 120.0, 30.0),)
    assert spec.counts["clipped_boxes"] == 1
    assert by["dev/08001.jpg"].official_split == "dev" and by["dev/08001.jpg"].patient_id == "dev/08001.jpg"
    mask = spec.mask_fn(r1, 90, 100)
    assert mask[30, 20] == 1 and mask[65, 60] == 1 and mask[51, 51] == 0  # ellipse corner stays empty
    assert mask[8, 10] == 1 and mask[0, 0] == 0
    assert mask[20:40, 10:30].sum() == 20 * 20


@pytest.mark.parametrize("annotation,message", [
    ("0 10 20 30", r"object 1 \(rectangle\) needs 4 coordinates"),
    ("0 1 1 5 5;2 1 1 5 5 9", r"object 2 \(polygon\) needs an even number"),
    ("2 1 1 5 5", r"object 1 \(polygon\) needs an even number \(>= 6\)"),
    ("3 1 1 5 5", r"object 1 has unknown type '3'"),
    ("1 a b c d", r"object 1 has a non-numeric token"),
])
def test_object_cxr_malformed(tmp_path, annotation, message):
    root = make_object_cxr(tmp_path, train=f"image_name,annotation\n00002.jpg,\n00001.jpg,{annotation}\n")
    with pytest.raises(DatasetError, match=r"train\.csv:3: " + message):
        load_dataset("object-cxr", root, "det")


def test_object_cxr_box_fully_outside_dropped(tmp_path, caplog):
    root = make_object_cxr(tmp_path, train="image_name,annotation\n00002.jpg,0 70 70 90 90;0 1 1 4 4;\n")
    with caplog.at_level(logging.WARNING):
        spec = load_dataset("object-cxr", root, "det")
    r = next(r for r in spec.records if r.image_id == "train/00002.jpg")
    assert r.boxes == ((1.0, 1.0, 4.0, 4.0),) and spec.counts["dropped_boxes"] == 1
    assert "train.csv:2" in caplog.text


# --------------------------------------------------------------------------- synthetic sets
@pytest.mark.parametrize("name,task,kw", [
    ("chexpert", "cls", {}), ("rsna", "det", {}), ("covidx", "cls", {"label_set": "A"}),
    ("covidx", "cls", {"label_set": "B"}), ("siim", "seg", {}), ("object-cxr", "det", {}),
])
def test_reads_synthetic_sets(tmp_path, name, task, kw):
    from pipeline.downstream.splits import make_split
    from pipeline.synth.downstream import WRITERS

    info = WRITERS[name](tmp_path / name, 16, 3, image_size=48, **kw)
    spec = load_dataset(name, tmp_path / name, task)
    assert spec.records and not spec.counts.get("missing_images") and not spec.counts.get("clipped_boxes")
    if name == "chexpert":
        assert spec.counts["rows"] == info["train"] + info["valid"] == 16
        assert len(spec.records) == 16 - spec.counts.get("skipped_lateral", 0)
    else:
        assert len(spec.records) == info["n_images"] == 16
    if name == "covidx":
        assert spec.class_names == ({"A": ("normal", "pneumonia", "COVID-19"), "B": ("negative", "positive")}
                                    [kw["label_set"]])
        assert sum(r.official_split == "test" for r in spec.records) == info["test"]
    if name == "siim":
        assert sum(1 for r in spec.records if r.rle) == info["positive"] and spec.counts["rows"] == info["rows"]
        pos = next(r for r in spec.records if r.rle)
        assert spec.mask_fn(pos, *pos.size).sum() > 0
    if name == "rsna":
        assert sum(len(r.boxes) for r in spec.records) == info["rows"] - sum(
            1 for r in spec.records if not r.boxes)
    if name == "object-cxr":
        assert sum(r.labels[0] for r in spec.records) == sum(info["with_objects"].values())
        for r in spec.records:
            h, w = r.size
            assert all(0 <= b[0] < b[2] <= w and 0 <= b[1] < b[3] <= h for b in r.boxes)
    split = make_split(spec, seed=0)
    assert split.train and split.test
