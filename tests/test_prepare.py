"""stages.prepare / pipeline.corpora.mimic_files: shards, reports, manifest, bad inputs, resume, force, CLI."""
from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.common import ConfigError, MflagError, read_json
from pipeline.corpora.base import BadItem, CsvColumnError
from pipeline.corpora.mimic_files import METADATA_CSV, SPLIT_CSV, image_relpath, report_relpath
from stages.prepare import PrepareConfig, TooManyBadItems, run
from tests._prepare_helpers import (
    META_HEADER,
    Img,
    Study,
    corrupt_zip_member,
    default_studies,
    make_tree,
    read_shards,
    report_text,
    write_csv,
)

REPO = Path(__file__).resolve().parents[1]


def _cfg(root, out, **kw) -> PrepareConfig:
    kw = {"size": 32, "shard_size": 2, "workers": 1, **kw}
    return PrepareConfig(root=str(root), out=str(out), **kw)


def _expected(studies, views=("PA", "AP"), splits=("train", "validate", "test")):
    """dicom_id -> (study, image) for images that should end up in shards."""
    out = {}
    for st in studies:
        if st.report is None or st.split not in splits:
            continue
        if st.report == report_text("", ""):
            continue  # both sections empty: dropped
        for im in st.images:
            if im.view in views:
                out[im.dicom_id] = (st, im)
    return out


def _samples(out: Path) -> dict[str, dict]:
    """Every sample across shards: key -> {"shard", ext: bytes}."""
    samples: dict[str, dict] = {}
    for name, members in read_shards(out / "shards").items():
        for member, data in members.items():
            key, ext = member.split(".", 1)
            samples.setdefault(key, {"shard": name})[ext] = data
    return samples


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    studies = default_studies()
    root = make_tree(tmp_path_factory.mktemp("mimic") / "root", studies, border=5)
    return root, studies


# --------------------------------------------------------------------------- main path
def test_prepare_counts_keys_splits_views_text(tree, tmp_path):
    root, studies = tree
    out = tmp_path / "out"
    res = run(_cfg(root, out, text_sections=("findings", "impression"), section_separator=" || "))
    expect = _expected(studies)
    samples = _samples(out)
    assert set(samples) == set(expect)
    assert res.n_images == len(expect) == 6 and res.n_studies == 5
    for key, s in samples.items():
        st, im = expect[key]
        meta = json.loads(s["json"])
        assert meta == {"dicom_id": key, "subject_id": st.subject_id, "study_id": st.study_id, "view": im.view,
                        "split": st.split, "orig_size": [64, 64]}
        assert s["shard"].startswith(st.split + "-")
        with Image.open(io.BytesIO(s["png"])) as img:
            assert img.mode == "L" and img.size == (32, 32)
            a = np.asarray(img)
        assert a.min() == 0 and a.max() == 255
        assert a[0].max() > 0 and a[:, 0].max() > 0  # the 5 px black border was cropped

    sizes = read_json(out / "shards" / "sizes.json")
    tars = read_shards(out / "shards")
    assert sizes == {name: len(m) // 2 for name, m in tars.items()}
    manifest = read_json(out / "manifest.json")
    assert manifest["image_format"] == "png" and manifest["size"] == 32 and manifest["fingerprint"] == res.fingerprint
    for split, info in manifest["splits"].items():
        assert info["count"] == sum(sizes[n] for n in info["shards"])
        assert info["count"] == sum(1 for st, _ in expect.values() if st.split == split)
    assert manifest["splits"]["train"]["shards"] == ["train-000000.tar", "train-000001.tar"]
    assert sum(i["count"] for i in manifest["splits"].values()) == res.n_images

    lines = [json.loads(x) for x in (out / "reports.jsonl").read_text().splitlines()]
    by_study = {r["study_id"]: r for r in lines}
    assert set(by_study) == {"50414267", "53189527", "51000001", "52000002", "53000003"}
    r = by_study["50414267"]
    assert r == {"study_id": "50414267", "subject_id": "10000032", "sections": ["findings", "impression"],
                 "text": "No focal consolidation. || No acute process.", "n_words": 7}

    rep = read_json(out / "prepare-report.json")
    assert rep["status"] == "ok" and rep["bad"] == []
    assert rep["filtered"]["view"] == {"LATERAL": 2, "LL": 1}
    assert rep["dropped_counts"] == {"no_text_empty_sections": 1}
    assert rep["dropped"][0]["study_id"] == "54000004"
    assert rep["dropped"][0]["where"].endswith(report_relpath("14000044", "54000004"))
    assert read_json(out / "config.json")["config"]["section_separator"] == " || "

    # The shards are real webdataset shards.
    import webdataset as wds

    ds = wds.WebDataset(str(out / "shards" / "train-000000.tar"), shardshuffle=False).decode("l")
    got = list(ds)
    assert len(got) == 2 and got[0]["png"].shape == (32, 32) and got[0]["json"]["split"] == "train"


def test_views_splits_and_single_section(tree, tmp_path):
    root, studies = tree
    out = tmp_path / "out"
    res = run(_cfg(root, out, views=("lateral", "ll"), splits=("test",), text_sections=("impression",)))
    samples = _samples(out)
    expect = [im.dicom_id for st in studies if st.split == "test" for im in st.images if im.view in ("LATERAL", "LL")]
    assert sorted(samples) == sorted(expect) and res.splits["test"]["count"] == 1
    assert list(res.splits) == ["test"]
    lines = [json.loads(x) for x in (out / "reports.jsonl").read_text().splitlines()]
    assert lines == [{"study_id": "53000003", "subject_id": "13000033", "text": "Normal chest.",
                      "sections": ["impression"], "n_words": 2}]
    rep = read_json(out / "prepare-report.json")
    # The view filter runs first: only the two train laterals count as filtered by split.
    assert rep["filtered"]["split"] == {"train": 2}
    assert rep["filtered"]["view"] == {"PA": 4, "AP": 3}


def test_zip_reports_and_plain_csv_give_identical_output(tree, tmp_path):
    root, studies = tree
    zroot = make_tree(tmp_path / "zroot", studies, border=5, gz=False, zip_reports=True)
    assert not list((zroot / "files").rglob("*.txt")) and (zroot / (METADATA_CSV)).is_file()
    run(_cfg(root, tmp_path / "a"))
    run(_cfg(zroot, tmp_path / "b", reports=str(zroot / "mimic-cxr-reports.zip")))
    run(_cfg(zroot, tmp_path / "c"))  # a root holding the zip finds it
    assert read_shards(tmp_path / "a" / "shards") == read_shards(tmp_path / "b" / "shards")
    for name in ("reports.jsonl", "manifest.json", "shards/sizes.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes() \
            == (tmp_path / "c" / name).read_bytes()


def test_worker_pool_output_identical(tree, tmp_path):
    root, _ = tree
    run(_cfg(root, tmp_path / "w1", workers=1))
    run(_cfg(root, tmp_path / "w2", workers=2, shard_size=1))
    run(_cfg(root, tmp_path / "w3", workers=2))
    a, c = tmp_path / "w1" / "shards", tmp_path / "w3" / "shards"
    assert {p.name: p.read_bytes() for p in a.glob("*.tar")} == {p.name: p.read_bytes() for p in c.glob("*.tar")}
    assert len(list((tmp_path / "w2" / "shards").glob("*.tar"))) == 6
    assert _samples(tmp_path / "w2").keys() == _samples(tmp_path / "w1").keys()


def test_raw_format_equals_png_pixel_for_pixel(tree, tmp_path):
    import webdataset as wds

    root, _ = tree
    run(_cfg(root, tmp_path / "png"))
    res = run(_cfg(root, tmp_path / "raw", image_format="raw"))
    manifest = read_json(tmp_path / "raw" / "manifest.json")
    assert (manifest["image_format"], manifest["image_key"]) == ("raw", "npy")
    assert read_json(tmp_path / "png" / "manifest.json")["image_key"] == "png"
    members = {m for ms in read_shards(tmp_path / "raw" / "shards").values() for m in ms}
    assert members and all(m.endswith((".npy", ".json")) for m in members)

    def load(out, decode):
        shards = sorted(str(p) for p in (out / "shards").glob("*.tar"))
        return {s["__key__"]: s for s in wds.WebDataset(shards, shardshuffle=False).decode(decode)}

    raw, png = load(tmp_path / "raw", "l8"), load(tmp_path / "png", "l8")
    assert sorted(raw) == sorted(png) and len(raw) == res.n_images == 6
    for key, s in raw.items():
        a = s["npy"]
        assert a.dtype == np.uint8 and a.shape == (32, 32)
        np.testing.assert_array_equal(a, png[key]["png"])
        assert s["json"] == png[key]["json"]


# --------------------------------------------------------------------------- bad inputs
def _one_bad_tree(tmp_path, case):
    studies = default_studies()
    root = make_tree(tmp_path / "root", studies, zip_reports=(case == "unreadable_report"))
    st = studies[2]  # 11000011/51000001, PA + AP
    if case == "missing_image":
        target = root / image_relpath(st.subject_id, st.study_id, st.images[0].dicom_id)
        target.unlink()
    elif case == "corrupt_image":
        target = root / image_relpath(st.subject_id, st.study_id, st.images[0].dicom_id)
        target.write_bytes(target.read_bytes()[:200])
    elif case == "no_report":
        target = root / report_relpath(st.subject_id, st.study_id)
        target.unlink()
    elif case == "empty_report":
        target = root / report_relpath(st.subject_id, st.study_id)
        target.write_text("  \n \n")
    elif case == "unreadable_report":
        member = report_relpath(st.subject_id, st.study_id)
        corrupt_zip_member(root / "mimic-cxr-reports.zip", member)
        target = Path(f"mimic-cxr-reports.zip:{member}")
    return root, st, target


@pytest.mark.parametrize("case,lost", [("missing_image", 1), ("corrupt_image", 1), ("no_report", 2),
                                       ("empty_report", 2), ("unreadable_report", 2)])
def test_bad_input_named_counted_and_limited(tmp_path, case, lost, caplog):
    root, st, target = _one_bad_tree(tmp_path, case)
    out = tmp_path / "out"
    with pytest.raises(TooManyBadItems, match=r"(?s)too many bad inputs.*" + case) as e:
        run(_cfg(root, out))
    assert f"{lost} of 7 images" in str(e.value)
    rep = read_json(out / "prepare-report.json")
    assert rep["status"] == "failed" and rep["bad_counts"] == {case: 1}
    assert str(target) in rep["bad"][0]["where"] and rep["bad"][0]["study_id"] == st.study_id
    assert str(target) in caplog.text  # named in the log too
    assert not (out / "manifest.json").exists()

    caplog.clear()
    res = run(_cfg(root, out, max_bad_fraction=0.5))
    assert res.n_images == 6 - lost
    rep = read_json(out / "prepare-report.json")
    assert rep["status"] == "ok" and rep["bad_counts"] == {case: 1} and rep["counts"]["bad_images"] == lost
    keys = set(_samples(out))
    if case.endswith("image"):
        assert st.images[0].dicom_id not in keys and st.images[1].dicom_id in keys
        assert rep["bad"][0]["dicom_id"] == st.images[0].dicom_id
    else:
        assert not keys & {i.dicom_id for i in st.images}
        assert st.study_id not in (out / "reports.jsonl").read_text()


def test_reports_missing_from_the_root_fail_fast_with_advice(tmp_path, caplog):
    # A MIMIC-CXR-JPG root holds no reports; without --reports every study would be "no_report".
    root = make_tree(tmp_path / "jpg", default_studies(), zip_reports=True)
    (root / "mimic-cxr-reports.zip").rename(tmp_path / "mimic-cxr-reports.zip")
    with pytest.raises(MflagError, match=r"no reports here .*pass --reports with mimic-cxr-reports.zip"):
        run(_cfg(root, tmp_path / "out"))
    assert "bad input" not in caplog.text
    assert run(_cfg(root, tmp_path / "out", reports=str(tmp_path / "mimic-cxr-reports.zip"))).n_images > 0


def test_bad_input_warnings_are_rate_limited(caplog):
    from pipeline.corpora.shards import PrepareReport

    rep = PrepareReport(Path("unused"))
    for i in range(100):
        rep.add_bad(BadItem("no_report", f"files/p10/p1/s{i}.txt", "no report file", {}))
    assert len(rep.bad) == 100  # every item is kept for prepare-report.json
    lines = [r for r in caplog.records if "bad input (no_report)" in r.getMessage()]
    assert 5 <= len(lines) <= 12 and "rate-limited" in lines[-1].getMessage()


@pytest.mark.parametrize("which,column", [("metadata", "ViewPosition"), ("split", "split")])
def test_missing_csv_column(tmp_path, which, column):
    root = make_tree(tmp_path / "root", default_studies())
    name = METADATA_CSV if which == "metadata" else SPLIT_CSV
    header = META_HEADER if which == "metadata" else ["dicom_id", "study_id", "subject_id", "split"]
    keep = [h for h in header if h != column]
    write_csv(root / (name + ".gz"), keep, [["x"] * len(keep)])
    with pytest.raises(CsvColumnError, match=f"{name}.gz: missing required column '{column}'"):
        run(_cfg(root, tmp_path / "out"))
    rep = read_json(tmp_path / "out" / "prepare-report.json")
    assert rep["status"] == "failed" and rep["bad"][0]["reason"] == "missing_column"
    assert rep["bad"][0]["column"] == column and rep["bad"][0]["where"].endswith(name + ".gz")


def test_bad_csv_rows_named_by_line(tmp_path):
    studies = default_studies()
    root = make_tree(tmp_path / "root", studies, gz=False)
    meta = (root / METADATA_CSV).read_text().splitlines()
    meta.append(",,,,PA")  # line len(meta) + 1: no ids
    meta.append(meta[1])  # a duplicate dicom_id
    (root / METADATA_CSV).write_text("\n".join(meta) + "\n")
    res = run(_cfg(root, tmp_path / "out", max_bad_fraction=0.3))
    rep = read_json(tmp_path / "out" / "prepare-report.json")
    assert rep["bad_counts"] == {"bad_csv_row": 2}
    wheres = sorted(b["where"] for b in rep["bad"])
    assert wheres == [f"{root / METADATA_CSV}:{len(meta) - 1}", f"{root / METADATA_CSV}:{len(meta)}"]
    assert res.n_images == 6


def test_changed_input_refused_and_no_usable_text(tmp_path):
    studies = default_studies()
    root = make_tree(tmp_path / "root", studies)
    run(_cfg(root, tmp_path / "out"))
    (root / report_relpath(studies[3].subject_id, studies[3].study_id)).unlink()
    with pytest.raises(MflagError, match="different input data.*--force"):
        run(_cfg(root, tmp_path / "out", max_bad_fraction=0.5))
    with pytest.raises(MflagError, match="no study among 1 has usable report text in sections comparison"):
        run(_cfg(root, tmp_path / "other", text_sections=("comparison",), splits=("test",)))


def test_outputs_of_an_older_shard_format_are_named_as_such(tree, tmp_path):
    import json

    root, _ = tree
    out = tmp_path / "out"
    run(_cfg(root, out))
    stamp = out / ".prepare-state" / "fingerprint.json"
    old = json.loads(stamp.read_text())
    stamp.write_text(json.dumps({**old, "fingerprint": "0" * 16, "format_version": 3}))
    with pytest.raises(MflagError, match=r"another version of prepare \(shard format 3, now \d+\); use --force"):
        run(_cfg(root, out))
    assert run(_cfg(root, out, force=True)).n_images > 0


def test_config_validation(tree, tmp_path):
    root, _ = tree
    with pytest.raises(ConfigError, match="image_format"):
        _cfg(root, tmp_path, image_format="tiff")
    with pytest.raises(ConfigError, match="root"):
        _cfg(tmp_path / "nope", tmp_path)
    with pytest.raises(ConfigError, match="max_bad_fraction"):
        _cfg(root, tmp_path, max_bad_fraction=2)
    with pytest.raises(ConfigError, match="text_sections"):
        _cfg(root, tmp_path, text_sections=())


# --------------------------------------------------------------------------- rerun, force, resume
def test_rerun_skips_rebuilds_missing_refuses_other_config_and_force(tree, tmp_path):
    root, _ = tree
    out = tmp_path / "out"
    first = run(_cfg(root, out))
    tars = sorted((out / "shards").glob("*.tar"))
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tars}
    again = run(_cfg(root, out, workers=2, max_bad_fraction=0.2))  # no content change: reuse
    assert (again.shards_written, again.shards_skipped) == (0, len(tars))
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tars} == before

    tars[1].unlink()
    third = run(_cfg(root, out))
    assert (third.shards_written, third.shards_skipped) == (1, len(tars) - 1)
    assert tars[1].read_bytes() == before[tars[1].name][0]
    assert third.fingerprint == first.fingerprint

    with pytest.raises(MflagError, match=r"different config \(size: 32 -> 48\).*--force"):
        run(_cfg(root, out, size=48))
    assert (out / "manifest.json").is_file() and tars[0].read_bytes() == before[tars[0].name][0]

    forced = run(_cfg(root, out, size=48, force=True))
    assert forced.shards_written == len(tars) and forced.fingerprint != first.fingerprint
    s = next(iter(_samples(out).values()))
    with Image.open(io.BytesIO(s["png"])) as img:
        assert img.size == (48, 48)
    assert read_json(out / "manifest.json")["size"] == 48

    foreign = tmp_path / "foreign"
    (foreign / "shards").mkdir(parents=True)
    (foreign / "shards" / "train-000000.tar").write_bytes(b"")
    with pytest.raises(MflagError, match="not made by this prepare run"):
        run(_cfg(root, foreign))


_KILL_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
from stages.prepare import PrepareConfig, run
run(PrepareConfig(root={root!r}, out={out!r}, size=32, shard_size=1, workers=1))
"""


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    rng = np.random.default_rng(3)
    studies = [Study(f"1{k:07d}", f"5{k:07d}", "train", [Img(f"{k:08x}-0-0-0-0", "PA")],
                     report_text(f"Finding {k}.", "Impression.")) for k in range(40)]
    root = make_tree(tmp_path / "root", studies, image_size=900)  # the metadata's Rows/Columns: 900
    # Large noisy PNGs (no reduced-scale decoding) make each image slow enough to kill mid-run.
    for st in studies:
        p = root / image_relpath(st.subject_id, st.study_id, st.images[0].dicom_id)
        Image.fromarray(rng.integers(0, 255, (900, 900), dtype=np.uint8)).save(p, format="PNG", compress_level=1)
    ref = run(PrepareConfig(root=str(root), out=str(tmp_path / "ref"), size=32, shard_size=1, workers=1))

    out = tmp_path / "out"
    script = _KILL_SCRIPT.format(repo=str(REPO), root=str(root), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.DEVNULL)
    state = out / ".prepare-state"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if state.is_dir() and len(list(state.glob("train-*.json"))) >= 3:
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "prepare finished before it could be killed"
    assert not (out / "manifest.json").exists()

    reference = read_shards(tmp_path / "ref" / "shards")
    partial = read_shards(out / "shards")
    assert 3 <= len(partial) < len(reference)
    for name, members in partial.items():  # whatever has a final name is complete and correct
        assert members == reference[name], name

    res = run(PrepareConfig(root=str(root), out=str(out), size=32, shard_size=1, workers=1))
    assert res.shards_skipped >= 3 and res.shards_written + res.shards_skipped == 40
    assert not list((out / "shards").glob(".*.tmp"))
    for name in reference:
        assert (out / "shards" / name).read_bytes() == (tmp_path / "ref" / "shards" / name).read_bytes()
    for name in ("reports.jsonl", "manifest.json", "shards/sizes.json", "prepare-report.json"):
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    assert res.fingerprint == ref.fingerprint


# --------------------------------------------------------------------------- CLI and synthetic world
def test_cli_prepare_mimic(tree, tmp_path):
    from click.testing import CliRunner

    from cli import cli

    root, _ = tree
    out = tmp_path / "out"
    args = ["prepare", "mimic", "--root", str(root), "--reports", str(root), "--out", str(out), "--size", "32",
            "--shard-size", "3", "--workers", "1", "--format", "jpg", "--text-sections", "impression",
            "--section-separator", " / ", "--no-crop-border"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "train: 4 images in 2 shards" in r.output
    keys = {m for ms in read_shards(out / "shards").values() for m in ms}
    assert all(k.endswith((".jpg", ".json")) for k in keys)
    assert read_json(out / "config.json")["config"]["crop_border"] is False
    r = CliRunner().invoke(cli, args[:-1] + ["--size", "64"])
    assert r.exit_code == 2 and "error:" in r.output and "--force" in r.output
    raw_args = [a if a != "jpg" else "raw" for a in args]
    raw_args[raw_args.index(str(out))] = str(tmp_path / "raw")
    r = CliRunner().invoke(cli, raw_args)
    assert r.exit_code == 0, r.output
    assert read_json(tmp_path / "raw" / "manifest.json")["image_format"] == "raw"
    assert "64 KiB per 256 px image" in CliRunner().invoke(cli, ["prepare", "mimic", "--help"]).output


def test_prepare_synthetic_mimic_world(tmp_path):
    synth = pytest.importorskip("pipeline.synth.mimic", reason="pipeline.synth.mimic not written yet")
    from pipeline.text.sections import extract_sections, join_sections

    root = tmp_path / "synth"
    synth.write_mimic(root, n_studies=12, seed=0, image_size=128)
    res = run(_cfg(root, tmp_path / "out", max_bad_fraction=0.0))
    assert res.n_images > 0
    lines = [json.loads(x) for x in (tmp_path / "out" / "reports.jsonl").read_text().splitlines()]
    assert len(lines) == res.n_studies
    for r in lines:
        raw = (root / report_relpath(r["subject_id"], r["study_id"])).read_text()
        assert (r["text"], r["sections"]) == join_sections(extract_sections(raw), ("impression", "findings"), " ")
    for s in _samples(tmp_path / "out").values():
        assert json.loads(s["json"])["view"] in ("PA", "AP")
