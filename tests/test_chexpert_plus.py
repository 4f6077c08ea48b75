"""prepare chexpert-plus: df_chexpert_plus_240401.csv + the JPG or PNG release."""
from __future__ import annotations

import csv
import json

import numpy as np
from PIL import Image

from pipeline.common import read_json
from pipeline.corpora.base import image_key
from pipeline.corpora.chexpert_plus import CSV_NAME, ChexpertPlusConfig
from stages.prepare import run
from tests._prepare_helpers import phantom, read_shards

HEADER = ["path_to_image", "path_to_dcm", "frontal_lateral", "ap_pa", "deid_patient_id", "patient_report_date_order",
          "report", "section_narrative", "section_clinical_history", "section_history", "section_comparison",
          "section_technique", "section_procedure_comments", "section_findings", "section_impression",
          "section_end_of_impression", "section_summary", "section_accession_number", "age", "sex", "race",
          "ethnicity", "interpreter_needed", "insurance_type", "recent_bmi", "deceased", "split"]


def _row(path, fl, appa, patient, order, findings, impression, split):
    r = dict.fromkeys(HEADER, "")
    r.update(path_to_image=path, frontal_lateral=fl, ap_pa=appa, deid_patient_id=patient,
             patient_report_date_order=order, section_findings=findings, section_impression=impression,
             split=split, report=f"FINDINGS: {findings} IMPRESSION: {impression}")
    return r


def test_chexpert_plus_study_keys_views_splits_extensions_and_text(tmp_path):
    root = tmp_path / "chexpert-plus"
    rows = [
        _row("train/patient00001/study1/view1_frontal.jpg", "Frontal", "AP", "patient00001", "1",
             "Lines and tubes.", "No change.", "train"),
        _row("train/patient00001/study1/view2_lateral.jpg", "Lateral", "", "patient00001", "1",
             "Lines and tubes.", "No change.", "train"),
        _row("train/patient00001/study2/view1_frontal.jpg", "Frontal", "PA", "patient00001", "2",
             "Clear lungs.", "Normal.", "train"),
        _row("valid/patient64541/study1/view1_frontal.jpg", "Frontal", "AP", "patient64541", "1",
             "", "Cardiomegaly.", "valid"),
        _row("train/patient00003/study1/view1_frontal.jpg", "Frontal", "AP", "patient00003", "1",
             "Missing file.", "", "train"),
        _row("train/patient00004/study1/view1_frontal.jpg", "Frontal", "PA", "patient00004", "1", "", "", "train"),
    ]
    rng = np.random.default_rng(0)
    for i, r in enumerate(rows):
        if r["deid_patient_id"] == "patient00003":
            continue
        p = root / r["path_to_image"]
        p.parent.mkdir(parents=True, exist_ok=True)
        # the first image exists only as PNG (the PNG release): found by the other extension
        Image.fromarray(phantom(rng, 48)).save(p.with_suffix(".png") if i == 0 else p)
    with open(root / CSV_NAME, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, HEADER)
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "out"
    res = run(ChexpertPlusConfig(root=str(root), out=str(out), size=32, workers=1, max_bad_fraction=0.5,
                                 text_sections=("findings", "impression"), section_separator=" / "))
    metas = {json.loads(d)["dicom_id"]: json.loads(d) for ms in read_shards(out / "shards").values()
             for m, d in ms.items() if m.endswith(".json")}
    want = {rows[0]["path_to_image"]: ("patient00001_1", "train", "AP"),
            rows[2]["path_to_image"]: ("patient00001_2", "train", "PA"),
            rows[3]["path_to_image"]: ("patient64541_1", "validate", "AP")}
    assert {k: (m["study_id"], m["split"], m["view"]) for k, m in metas.items()} == \
        {image_key(p): v for p, v in want.items()}
    texts = {r["study_id"]: r["text"] for r in map(json.loads, (out / "reports.jsonl").read_text().splitlines())}
    assert texts == {"patient00001_1": "Lines and tubes. / No change.", "patient00001_2": "Clear lungs. / Normal.",
                     "patient64541_1": "Cardiomegaly."}
    rep = read_json(out / "prepare-report.json")
    assert [(b["reason"], b["where"]) for b in rep["bad"]] == [("missing_image", f"{root / CSV_NAME}:6")]
    assert [(d["reason"], d["where"]) for d in rep["dropped"]] == [("no_text_empty_sections", f"{root / CSV_NAME}:7")]
    assert rep["filtered"]["view"] == {"lateral": 1}
    assert res.n_images == 3 and read_json(out / "manifest.json")["corpus"] == "chexpert-plus"
