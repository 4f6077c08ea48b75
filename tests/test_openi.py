"""prepare openi: the real NLMCXR_reports.tgz (when present) and the synthetic OpenI layout."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tarfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.common import ConfigError, read_json
from pipeline.corpora.openi import OpenIConfig
from stages.prepare import run
from tests._prepare_helpers import read_shards


def nlmcxr_reports() -> Path | None:
    """The published NLMCXR_reports.tgz: $MFLAG_NLMCXR_REPORTS, the copy torchxrayvision ships
    (torchxrayvision/data/), or ~/.cache/mflag/NLMCXR_reports.tgz. Nothing is downloaded."""
    candidates = [os.environ.get("MFLAG_NLMCXR_REPORTS")]
    spec = importlib.util.find_spec("torchxrayvision")  # finds the package without importing it
    if spec is not None and spec.origin:
        candidates.append(str(Path(spec.origin).parent / "data" / "NLMCXR_reports.tgz"))
    candidates.append(str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mflag"
                          / "NLMCXR_reports.tgz"))
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


def _independent_expectation(tgz: Path, sections: tuple[str, ...], sep: str, missing: set[str]):
    """What prepare openi must make of the tgz, computed here without pipeline code: per report the
    parentImage ids and the chosen AbstractText sections (by exact Label), and why a report is skipped."""
    labels = {"findings": "FINDINGS", "impression": "IMPRESSION"}
    kept, skipped = {}, Counter()
    with tarfile.open(tgz) as tf:
        for m in tf.getmembers():
            if not m.name.endswith(".xml"):
                continue
            number = Path(m.name).stem
            root = ET.fromstring(tf.extractfile(m).read())
            ids = [e.attrib["id"] for e in root.findall("parentImage")]
            parts = []
            for s in sections:
                found = [" ".join("".join(e.itertext()).split())
                         for e in root.findall(".//Abstract/AbstractText") if e.attrib.get("Label") == labels[s]]
                if any(found):
                    parts.append(" ".join(f for f in found if f))
            text = sep.join(parts)
            if not ids:
                skipped["no_image_listed"] += 1
            elif not text:
                skipped["no_text_empty_sections"] += 1
            elif all(i in missing for i in ids):
                skipped["no_image_present"] += 1
            else:
                kept[number] = (text, [i for i in ids if i not in missing])
    return kept, skipped


@pytest.mark.slow
def test_real_openi_reports_every_report_with_text_and_image_is_one_study(tmp_path):
    tgz = nlmcxr_reports()
    if tgz is None:
        pytest.skip("NLMCXR_reports.tgz not found (set MFLAG_NLMCXR_REPORTS, `pip install torchxrayvision`, or "
                    "copy it to ~/.cache/mflag/)")
    with tarfile.open(tgz) as tf:
        all_ids = sorted({e.attrib["id"] for m in tf.getmembers() if m.name.endswith(".xml")
                          for e in ET.fromstring(tf.extractfile(m).read()).findall("parentImage")})
    assert len(all_ids) > 7000 and any("_IM-" in i for i in all_ids)
    images = tmp_path / "png"
    images.mkdir()
    placeholder = tmp_path / "placeholder.png"
    # 32 px: the smallest side prepare accepts (pipeline.imaging.MIN_IMAGE_SIDE; smaller is a degenerate image)
    Image.fromarray(np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1))).save(placeholder)
    # Every report's images are placeholders (hard links: one file), except all images of three
    # reports, which are missing: those reports must be skipped as "no image present".
    with tarfile.open(tgz) as tf:
        by_report = {Path(m.name).stem: [e.attrib["id"] for e in ET.fromstring(tf.extractfile(m).read())
                                         .findall("parentImage")]
                     for m in tf.getmembers() if m.name.endswith(".xml")}
    gone = {i for r in ("1", "2", "100") for i in by_report[r]}
    for i in all_ids:
        if i not in gone:
            os.link(placeholder, images / f"{i}.png")
    sections, sep = ("findings", "impression"), " || "
    kept, skipped = _independent_expectation(tgz, sections, sep, gone)

    out = tmp_path / "out"
    res = run(OpenIConfig(reports=str(tgz), images=str(images), out=str(out), size=8, image_format="raw",
                          shard_size=4000, workers=1, text_sections=sections, section_separator=sep,
                          max_bad_fraction=0.01))
    rows = [json.loads(x) for x in (out / "reports.jsonl").read_text().splitlines()]
    assert {r["study_id"] for r in rows} == set(kept) and res.n_studies == len(kept) > 3000
    for r in rows:
        assert r["text"] == kept[r["study_id"]][0], r["study_id"]
        assert r["subject_id"] == r["study_id"]
    rep = read_json(out / "prepare-report.json")
    assert rep["dropped_counts"] == dict(skipped)
    assert rep["bad_counts"] == {"missing_image": len(gone)}
    assert "no --projections" in rep["notes"][0]
    # Every image is keyed to its own report, and every image of a kept report is there.
    owner = {i: r for r, (_, ids) in kept.items() for i in ids}
    samples = {}
    for members in read_shards(out / "shards").values():
        for name, data in members.items():
            if name.endswith(".json"):
                samples[name[:-5]] = json.loads(data)
    assert set(samples) == set(owner) and res.n_images == len(owner)
    assert all(meta["study_id"] == owner[key] and meta["dicom_id"] == key for key, meta in samples.items())
    # Ids such as CXR1_1_IM-0001 order naturally (never through int()): 2 before 10.
    order = [r["study_id"] for r in rows]
    assert order == sorted(order, key=int)
    manifest = read_json(out / "manifest.json")
    assert manifest["split"]["seed"] == 0 and manifest["corpus"] == "openi"
    n = manifest["split"]["studies"]
    assert sum(n.values()) == len(kept) and 0.85 < n["train"] / len(kept) < 0.95 and n["validate"] > 50 < n["test"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from pipeline.synth.openi import write_openi

    return write_openi(tmp_path_factory.mktemp("openi") / "root", 30, seed=0, image_size=64)


def _cfg(synth, out, **kw) -> OpenIConfig:
    return OpenIConfig(out=str(out), **{"reports": synth["reports"], "images": synth["images"], "size": 32,
                                        "shard_size": 8, "workers": 1, **kw})


def test_tgz_and_unpacked_folder_give_identical_outputs_and_projections_keep_frontal(synth, tmp_path):
    run(_cfg(synth, tmp_path / "tgz"))
    folder = tmp_path / "unpacked"
    with tarfile.open(synth["reports"]) as tf:
        tf.extractall(folder, filter="data")
    run(_cfg(synth, tmp_path / "dir", reports=str(folder)))
    run(_cfg(synth, tmp_path / "dir2", reports=str(folder / "ecgen-radiology")))
    ref = read_shards(tmp_path / "tgz" / "shards")
    assert ref and read_shards(tmp_path / "dir" / "shards") == ref == read_shards(tmp_path / "dir2" / "shards")
    assert (tmp_path / "tgz" / "reports.jsonl").read_bytes() == (tmp_path / "dir" / "reports.jsonl").read_bytes()

    res = run(_cfg(synth, tmp_path / "frontal", projections=synth["projections"]))
    frontal = {line.split(",")[1].replace(".dcm.png", "") for line in
               Path(synth["projections"]).read_text().splitlines()[1:] if line.endswith(",Frontal")}
    keys = {m[:-5] for ms in read_shards(tmp_path / "frontal" / "shards").values() for m in ms if m.endswith(".json")}
    assert keys and {k.removeprefix("CXR") for k in keys} <= frontal
    all_keys = {m[:-5] for ms in ref.values() for m in ms if m.endswith(".json")}
    assert keys < all_keys  # laterals were there and are gone
    rep = read_json(tmp_path / "frontal" / "prepare-report.json")
    assert rep["filtered"]["view"] == {"lateral": len(all_keys) - len(keys)} and "notes" not in rep
    assert res.n_images == len(keys)


def test_split_is_drawn_by_report_from_the_seed(synth, tmp_path):
    a = run(_cfg(synth, tmp_path / "a", split_seed=1, split_fractions=(0.5, 0.25, 0.25)))
    b = run(_cfg(synth, tmp_path / "b", split_seed=2, split_fractions=(0.5, 0.25, 0.25)))

    def split_of(out):
        return {json.loads(d)["study_id"]: json.loads(d)["split"] for ms in read_shards(out / "shards").values()
                for m, d in ms.items() if m.endswith(".json")}

    sa, sb = split_of(tmp_path / "a"), split_of(tmp_path / "b")
    assert set(sa.values()) == {"train", "validate", "test"} and sa != sb
    assert read_json(tmp_path / "a" / "manifest.json")["split"]["fractions"] == \
        {"train": 0.5, "validate": 0.25, "test": 0.25}
    assert a.fingerprint != b.fingerprint
    with pytest.raises(ConfigError, match="split_fractions: expected three non-negative fractions"):
        _cfg(synth, tmp_path / "c", split_fractions=(0.5, 0.5, 0.5))


def test_cli_prepare_openi_errors_name_the_file(synth, tmp_path):
    from click.testing import CliRunner

    from cli import cli

    bad = tmp_path / "bad"
    shutil.copytree(Path(synth["root"]), bad)
    (bad / "ecgen").mkdir()
    (bad / "ecgen" / "7.xml").write_text("<eCitation><parentImage id='x'>", encoding="utf-8")
    r = CliRunner().invoke(cli, ["prepare", "openi", "--reports", str(bad / "ecgen"), "--images",
                                 str(bad / "images"), "--out", str(tmp_path / "o"), "--workers", "1"])
    last = r.output.strip().splitlines()[-1]
    assert r.exit_code == 2 and last.startswith("error: ") and "no report has both text" in last
    rep = read_json(tmp_path / "o" / "prepare-report.json")
    assert rep["bad_counts"] == {"unreadable_report": 1} and rep["bad"][0]["where"].endswith("7.xml")
    r = CliRunner().invoke(cli, ["prepare", "openi", "--reports", synth["reports"], "--images",
                                 synth["images"], "--out", str(tmp_path / "ok"), "--size", "32", "--workers", "1"])
    assert r.exit_code == 0, r.output
    assert "train:" in r.output and read_json(tmp_path / "ok" / "manifest.json")["corpus"] == "openi"


# --------------------------------------------------------------------------- pipeline YAML
TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny-test.yaml"


def _tiny_openi(tmp_path: Path, **sections) -> Path:
    import yaml

    spec = yaml.safe_load(TINY.read_text())
    spec.update(workdir=str(tmp_path / "work"), corpus={"synth-openi": {"n_reports": 40, "seed": 0, "image_size": 64}})
    spec["prepare"] = {"corpus": "openi", **spec["prepare"]}
    spec["train"]["variants"] = {"mflag": {"orth_weight": 1.0}}
    spec.update(sections)
    path = tmp_path / "openi.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
def test_whole_chain_on_openi_from_a_pipeline_yaml(tmp_path):
    from click.testing import CliRunner

    from cli import cli

    cfg = _tiny_openi(tmp_path)
    res = CliRunner().invoke(cli, ["-q", "run", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    ran = {line.split()[0] for line in res.output.splitlines() if " ran " in line}
    assert {"synth-openi", "prepare", "text-model", "embed-text", "train:mflag", "eval:cls-chexpert:mflag",
            "report"} <= ran
    work = tmp_path / "work"
    manifest = read_json(work / "prepare" / "manifest.json")
    assert manifest["corpus"] == "openi" and manifest["n_images"] > 30
    studies = {json.loads(x)["study_id"] for x in (work / "prepare" / "reports.jsonl").read_text().splitlines()}
    assert studies and all(s.isdigit() for s in studies)  # OpenI's report numbers
    assert (work / "train" / "mflag" / "encoder.pt").is_file()
    assert "| cls-chexpert | auroc |" in (work / "report" / "results.md").read_text()
    res = CliRunner().invoke(cli, ["-q", "run", "--config", str(cfg)])
    assert res.exit_code == 0 and "0 stage(s) ran" in res.output, res.output
    # status checks the corpus's shards against the manifest's shard_files, as it does MIMIC's
    from stages import orchestrate

    assert set(manifest["shard_files"]) == {p.name for p in (work / "prepare" / "shards").glob("*.tar")}
    tar = sorted((work / "prepare" / "shards").glob("train-*.tar"))[0]
    with open(tar, "ab") as fh:
        fh.write(b"\0" * 512)
    states = {st.name: st for st in orchestrate.status(orchestrate.RunConfig(config=str(cfg)))}
    assert states["prepare"].state == "stale" and str(tar) in states["prepare"].reason


def test_pipeline_yaml_names_the_corpus_in_either_section(synth, tmp_path):
    from pipeline.common import MflagError
    from stages import orchestrate

    def plan(path):
        return {n.name: n for n in orchestrate.build_nodes(orchestrate.load_spec(path))}

    nodes = plan(_tiny_openi(tmp_path))
    assert nodes["prepare"].deps == ("synth-openi",) and nodes["prepare"].params["corpus"] == "openi"
    # Real inputs, in the corpus section or in the prepare section: the same stage
    real = {"reports": synth["reports"], "images": synth["images"]}
    a = plan(_tiny_openi(tmp_path, corpus={"openi": real}))["prepare"]
    b = plan(_tiny_openi(tmp_path, corpus=None, prepare={"corpus": "openi", **real, "size": 48, "shard_size": 20,
                                                          "workers": 1}))["prepare"]
    assert a.params == b.params and a.params["reports"] == synth["reports"] and "reports" in a.inputs
    # status checks every corpus's shards against its manifest (issue 22), not only MIMIC's
    assert nodes["prepare"].verify is a.verify is b.verify is orchestrate._verify_prepare
    for sections, message in [
        ({"corpus": {"openi": {**real, "imgs": "x"}}}, r"corpus.openi: unknown keys \['imgs'\]"),
        ({"prepare": {"corpus": "pairs", "size": 48}}, "prepare.corpus: 'pairs', but the corpus section gives"),
        ({"prepare": {"corpus": "openi", "split_fractions": [1, 1, 1]}}, "prepare.split_fractions: expected three"),
        ({"prepare": {"corpus": "openi", "views": ["PA"]}}, r"prepare: unknown or orchestrator-owned options"),
        ({"corpus": {"nope": {}}}, "corpus must have exactly one of"),
    ]:
        with pytest.raises(MflagError, match=message):
            plan(_tiny_openi(tmp_path, **sections))


def test_kaggle_image_names_are_found_too(synth, tmp_path):
    kaggle = tmp_path / "images_normalized"
    kaggle.mkdir()
    for p in Path(synth["images"]).iterdir():
        os.link(p, kaggle / f"{p.stem.removeprefix('CXR')}.dcm.png")
    run(_cfg(synth, tmp_path / "nlm"))
    run(_cfg(synth, tmp_path / "kaggle", images=str(kaggle)))
    assert read_shards(tmp_path / "kaggle" / "shards") == read_shards(tmp_path / "nlm" / "shards")
