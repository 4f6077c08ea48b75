"""prepare pairs: any image-report table; every bad row named file:line and counted, nothing else lost."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.common import ConfigError, read_json
from pipeline.corpora.base import image_key
from pipeline.corpora.pairs import PairsConfig
from stages.prepare import TooManyBadItems, run
from tests._prepare_helpers import read_shards

HEADER = ["path", "report", "impression", "study", "patient", "split"]


def _images(root: Path) -> None:
    (root / "ok").mkdir(parents=True)
    (root / "dicom").mkdir()
    yy, xx = np.mgrid[0:48, 0:48]
    Image.fromarray((40 + 3 * xx + yy).astype(np.uint8)).save(root / "ok" / "a.png")
    # 16-bit grey: a horizontal ramp over most of the 16-bit range
    Image.fromarray((1000 + 1200 * xx).astype(np.uint16)).save(root / "ok" / "b16.png")
    assert Image.open(root / "ok" / "b16.png").mode.startswith("I;16")
    Image.fromarray(np.zeros((48, 48), np.uint8) + 90).save(root / "ok" / "empty.png")
    rgb = np.zeros((48, 48, 3), np.uint8)
    rgb[..., 0] = 200 + (xx // 8)  # a red picture with a faint ramp
    rgb[..., 1] = 30
    rgb[..., 2] = 40 + (yy // 8)
    Image.fromarray(rgb).save(root / "ok" / "rgb.jpg", quality=95)
    from pipeline.synth.dicom import write_dicom

    write_dicom(root / "dicom" / "x.dcm", (20 + 4 * yy).astype(np.uint8), sop_uid="1.2.3.4", study_uid="1.2.3",
                series_uid="1.2.3.5", patient_id="p5")


# (line, row): the text of the rgb row spans two lines, so the rows after it start one line later.
ROWS = [
    (2, ["ok/a.png", "Heart normal.", "No acute process.", "s1", "p1", "train"]),
    (3, ["ok/b16.png", "Heart normal.", "No acute process.", "s1", "p1", "train"]),
    (4, ["missing/none.png", "Effusion.", "", "s2", "p2", "train"]),
    (5, ["../outside.png", "Escapes.", "", "s6", "p6", "train"]),
    (6, ["ok/empty.png", "", "", "s3", "p3", "train"]),
    (7, ["ok/a.png", "Heart normal.", "No acute process.", "s1", "p1", "train"]),
    (8, ["ok/rgb.jpg", "Stained\nsection.", "Benign.", "s4", "p4", "val"]),
    (10, ["dicom/x.dcm", "Lungs clear.", "Normal.", "s5", "p5", "test"]),
    (11, ["/etc/passwd", "Absolute.", "", "s7", "p7", "train"]),
]
KEPT = {"ok/a.png": "s1", "ok/b16.png": "s1", "ok/rgb.jpg": "s4", "dicom/x.dcm": "s5"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    base = tmp_path_factory.mktemp("pairs")
    root = base / "images"
    _images(root)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(HEADER)
    w.writerows(r for _, r in ROWS)
    (base / "table.csv").write_text(buf.getvalue(), encoding="utf-8")
    lines = buf.getvalue().splitlines()
    assert [n for n, _ in ROWS] == [i + 1 for i, line in enumerate(lines) if line[:1] in "od./m"]
    with open(base / "table.jsonl", "w", encoding="utf-8") as fh:
        for _, r in ROWS:
            fh.write(json.dumps(dict(zip(HEADER, r))) + "\n")
    return base, root


def _cfg(base, root, out, table="table.csv", **kw) -> PairsConfig:
    return PairsConfig(table=str(base / table), image_root=str(root), out=str(out), image_column="path",
                       text_column=("report", "impression"), study_column="study", patient_column="patient",
                       split_column="split", **{"size": 32, "shard_size": 3, "workers": 1, "max_bad_fraction": 0.5,
                                                "section_separator": " | ", **kw})


def _samples(out: Path) -> dict[str, dict]:
    samples: dict[str, dict] = {}
    for members in read_shards(out / "shards").values():
        for name, data in members.items():
            key, ext = name.split(".", 1)
            samples.setdefault(key, {})[ext] = data
    return samples


def _pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im)


def test_pairs_table_bad_rows_named_and_counted_good_images_kept(corpus, tmp_path):
    base, root = corpus
    out = tmp_path / "out"
    res = run(_cfg(base, root, out))
    table = str(base / "table.csv")
    samples = _samples(out)
    assert set(samples) == {image_key(p) for p in KEPT}
    for path, study in KEPT.items():
        meta = json.loads(samples[image_key(path)]["json"])
        assert meta["study_id"] == study and meta["split"] == {"s1": "train", "s4": "validate", "s5": "test"}[study]
    rep = read_json(out / "prepare-report.json")
    bad = sorted((b["reason"], b["where"]) for b in rep["bad"])
    assert bad == sorted([("missing_image", f"{table}:4"), ("unsafe_path", f"{table}:5"),
                          ("duplicate_image", f"{table}:7"), ("unsafe_path", f"{table}:11")])
    assert [(d["reason"], d["where"]) for d in rep["dropped"]] == [("no_text", f"{table}:6")]
    assert rep["counts"]["bad_images"] == 4 and rep["counts"]["table_rows"] == len(ROWS)
    assert res.n_images == 4 and res.n_studies == 3

    reports = {r["study_id"]: r for r in map(json.loads, (out / "reports.jsonl").read_text().splitlines())}
    assert set(reports) == {"s1", "s4", "s5"}
    assert reports["s4"]["text"] == "Stained section. | Benign."
    assert reports["s4"]["sections"] == ["report", "impression"]
    assert reports["s1"]["subject_id"] == "p1"

    a16 = _pixels(samples[image_key("ok/b16.png")]["png"])  # 16-bit: scaled to the full 8-bit range, order kept
    assert a16.dtype == np.uint8 and a16.shape == (32, 32) and a16.min() == 0 and a16.max() == 255
    assert (np.diff(a16[16].astype(int)) >= 0).all() and a16[16, -1] > a16[16, 0]
    grey = _pixels(samples[image_key("ok/rgb.jpg")]["png"])  # RGB -> one grey channel
    assert grey.ndim == 2
    dcm = _pixels(samples[image_key("dicom/x.dcm")]["png"])
    assert dcm.ndim == 2 and dcm[:, 16].argmax() > dcm[:, 16].argmin()  # the DICOM's vertical ramp survives


def test_too_many_bad_rows_fail_naming_the_report(corpus, tmp_path):
    base, root = corpus
    with pytest.raises(TooManyBadItems, match="prepare-report.json"):
        run(_cfg(base, root, tmp_path / "out", max_bad_fraction=0.1))


def test_jsonl_table_gives_the_same_shards_and_names_its_lines(corpus, tmp_path):
    base, root = corpus
    run(_cfg(base, root, tmp_path / "csv"))
    run(_cfg(base, root, tmp_path / "jsonl", table="table.jsonl"))
    assert read_shards(tmp_path / "csv" / "shards") == read_shards(tmp_path / "jsonl" / "shards")
    assert (tmp_path / "csv" / "reports.jsonl").read_bytes() == (tmp_path / "jsonl" / "reports.jsonl").read_bytes()
    rep = read_json(tmp_path / "jsonl" / "prepare-report.json")
    # JSONL has one row per line: the rgb row's line break is inside a JSON string
    assert sorted(b["where"].rsplit(":", 1)[1] for b in rep["bad"]) == ["3", "4", "6", "9"]


def test_parquet_table(corpus, tmp_path):
    pa = pytest.importorskip("pyarrow", reason="Parquet tables need pyarrow")
    import pyarrow.parquet as pq

    base, root = corpus
    pq.write_table(pa.Table.from_pylist([dict(zip(HEADER, r)) for _, r in ROWS]), base / "table.parquet")
    run(_cfg(base, root, tmp_path / "pq", table="table.parquet"))
    run(_cfg(base, root, tmp_path / "csv"))
    assert read_shards(tmp_path / "pq" / "shards") == read_shards(tmp_path / "csv" / "shards")
    rep = read_json(tmp_path / "pq" / "prepare-report.json")
    assert sorted(b["where"].rsplit(":", 1)[1] for b in rep["bad"]) == ["row 3", "row 4", "row 6", "row 9"]


def test_three_channels_keep_colour(corpus, tmp_path):
    base, root = corpus
    out = tmp_path / "rgb"
    run(_cfg(base, root, out, channels=3))
    samples = _samples(out)
    rgb = _pixels(samples[image_key("ok/rgb.jpg")]["png"])
    assert rgb.shape == (32, 32, 3)
    r, g, b = (rgb[..., c].astype(int).mean() for c in range(3))
    assert r > g + 100 and r > b + 100  # still red
    a16 = _pixels(samples[image_key("ok/b16.png")]["png"])
    assert a16.shape == (32, 32, 3) and (a16[..., 0] == a16[..., 1]).all() and (a16[..., 1] == a16[..., 2]).all()
    manifest = read_json(out / "manifest.json")
    assert manifest["channels"] == 3 and manifest["config"]["channels"] == 3
    run(_cfg(base, root, tmp_path / "raw", channels=3, image_format="raw"))
    raw = np.load(io.BytesIO(_samples(tmp_path / "raw")[image_key("ok/rgb.jpg")]["npy"]))
    assert raw.shape == (32, 32, 3) and np.abs(raw.astype(int) - rgb.astype(int)).max() == 0


def test_defaults_each_image_its_own_study_and_a_split_drawn_per_patient(corpus, tmp_path):
    base, root = corpus
    # an absolute path under the image root and a ./ prefix are the same images as relative paths
    rows = [(str(root / "ok" / "a.png"), "A.", "p1"), ("./ok/b16.png", "B.", "p1"), ("ok/rgb.jpg", "C.", "p2")]
    (base / "plain.csv").write_text("image,text,patient\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))
    out = tmp_path / "plain"
    run(PairsConfig(table=str(base / "plain.csv"), image_root=str(root), out=str(out), patient_column="patient",
                    size=32, workers=1, split_fractions=(0.5, 0.0, 0.5)))
    metas = [json.loads(s["json"]) for s in _samples(out).values()]
    assert sorted(m["study_id"] for m in metas) == sorted(map(image_key, ("ok/a.png", "ok/b16.png", "ok/rgb.jpg")))
    by_patient = {}
    for m in metas:
        by_patient.setdefault(m["subject_id"], set()).add(m["split"])
    assert all(len(s) == 1 for s in by_patient.values())  # no patient in two splits


def test_missing_column_and_bad_options_are_one_line_errors(corpus, tmp_path):
    from click.testing import CliRunner

    from cli import cli

    base, root = corpus
    r = CliRunner().invoke(cli, ["prepare", "pairs", "--table", str(base / "table.csv"), "--image-root", str(root),
                                 "--out", str(tmp_path / "o"), "--workers", "1"])
    last = r.output.strip().splitlines()[-1]
    assert r.exit_code == 2 and last.startswith("error: ") and "missing column 'image'" in last
    assert str(base / "table.csv") in last and "path, report" in last
    (base / "t.xlsx").write_text("x")
    with pytest.raises(ConfigError, match="unknown table type"):
        PairsConfig(table=str(base / "t.xlsx"), image_root=str(root), out=str(tmp_path / "o2"))
    r = CliRunner().invoke(cli, ["prepare", "pairs", "--table", str(base / "table.csv"), "--image-root", str(root),
                                 "--out", str(tmp_path / "o3"), "--image-column", "path", "--text-column",
                                 "report,impression", "--study-column", "study", "--split-column", "split",
                                 "--size", "32", "--workers", "1", "--max-bad-fraction", "0.5", "--channels", "3"])
    assert r.exit_code == 0, r.output
    assert read_json(tmp_path / "o3" / "manifest.json")["channels"] == 3


# --------------------------------------------------------------------------- colour through training
def _colour_corpus(base: Path, n: int = 24) -> Path:
    """Colour images whose hue, not brightness, carries the class: grey conversion would lose it."""
    rng = np.random.default_rng(0)
    (base / "img").mkdir(parents=True)
    lines = ["image,text,patient,split"]
    for i in range(n):
        rgb = rng.integers(90, 110, size=(40, 40, 3)).astype(np.uint8)
        rgb[8:32, 8:32, i % 2] += 100  # red or green square of equal luma weight... roughly
        Image.fromarray(rgb).save(base / "img" / f"{i}.png")
        lines.append(f"img/{i}.png,class {i % 2} tissue.,p{i},{'train' if i < n - 8 else 'validate'}")
    (base / "table.csv").write_text("\n".join(lines) + "\n")
    return base / "table.csv"


@pytest.mark.slow
@pytest.mark.parametrize("channels", [1, 3])
def test_channels_reach_the_resnet_input(tmp_path, monkeypatch, channels):
    from cache import write_cache
    from pipeline.pretrain import step as pretrain
    from pipeline.pretrain import wds
    from stages import train_vision
    from tests._train_helpers import tiny_config

    table = _colour_corpus(tmp_path / "corpus")
    out = tmp_path / "prepared"
    run(PairsConfig(table=str(table), image_root=str(tmp_path / "corpus"), out=str(out), size=40, shard_size=4,
                    workers=1, channels=channels, image_format="raw"))
    studies = [json.loads(x)["study_id"] for x in (out / "reports.jsonl").read_text().splitlines()]
    rng = np.random.default_rng(0)
    cache = write_cache(tmp_path / "cache", studies, rng.normal(size=(len(studies), 16)).astype(np.float32),
                        {"model_id": "synthetic", "pooling": "cls", "text_encoder_params": 1})
    assert wds.resolve_shards(str(out), "train").channels == channels

    seen = []
    original = pretrain.prepare_images

    def spy(images, augmenter, device, channels_last):
        x = original(images, augmenter, device, channels_last)
        seen.append(x.detach().clone())
        return x

    monkeypatch.setattr(pretrain, "prepare_images", spy)
    cfg = tiny_config({"shards": out, "cache": cache}, tmp_path / "train", aug="light", max_steps=2, probe_size=4,
                      probe_every=2, ckpt_every=2)
    train_vision.run(cfg)
    assert seen and all(x.shape[1] == 3 for x in seen)
    differ = max(float((x[:, 0] - x[:, 1]).abs().max()) for x in seen)
    if channels == 3:
        assert differ > 0.5  # red and green squares arrive as themselves
    else:
        assert differ == 0.0  # grey: the three channels are one


# ---- issue 22 x issue 23: the integrity rules of every read hold for a table corpus too
@pytest.mark.parametrize("channels", [1, 3])
def test_degenerate_image_is_a_bad_item_and_shards_get_digests(tmp_path, channels):
    import hashlib

    root = tmp_path / "images"
    root.mkdir()
    yy, xx = np.mgrid[0:48, 0:48]
    Image.fromarray((40 + 3 * xx + yy).astype(np.uint8)).save(root / "ok.png")
    Image.fromarray(np.full((8, 40), 90, np.uint8)).save(root / "tiny.png")  # 8 px high: below the minimum side
    (tmp_path / "t.csv").write_text("image,text\nok.png,Heart normal.\ntiny.png,Thumbnail.\n", encoding="utf-8")
    out = tmp_path / "out"
    res = run(PairsConfig(table=str(tmp_path / "t.csv"), image_root=str(root), out=str(out), size=32, workers=1,
                          split_fractions=(1.0, 0.0, 0.0), max_bad_fraction=0.5, channels=channels))
    assert res.n_images == 1
    rep = read_json(out / "prepare-report.json")
    assert [(b["reason"], Path(b["where"]).name) for b in rep["bad"]] == [("degenerate_image", "tiny.png")]
    assert "8x40 px" in rep["bad"][0]["detail"]
    man = read_json(out / "manifest.json")
    assert man["corpus"] == "pairs" and man.get("channels", 1) == channels
    tars = sorted((out / "shards").glob("*.tar"))
    assert man["shard_files"] == {t.name: {"count": 1, "bytes": t.stat().st_size,
                                           "sha256": hashlib.sha256(t.read_bytes()).hexdigest()} for t in tars}
    assert read_json(out / "config.json")["stage"] == "prepare"

    from pipeline.pretrain import wds

    shards = wds.resolve_shards(str(out), "train")
    assert shards.channels == channels and set(shards.digests) == {t.name for t in tars}
    assert wds.check_shard_files(shards)[0] is None
    with open(tars[0], "r+b") as fh:  # one flipped byte: the check that runs before training names the tar
        fh.seek(600)
        b = fh.read(1)
        fh.seek(600)
        fh.write(bytes([b[0] ^ 1]))
    assert tars[0].name in wds.check_shard_files(shards)[0]


def test_table_text_is_declared_utf8_and_lone_surrogates_are_handled(tmp_path):
    from pipeline.common import MflagError

    root = tmp_path / "images"
    root.mkdir()
    yy, xx = np.mgrid[0:48, 0:48]
    for n in ("a", "b", "c"):
        Image.fromarray((40 + 3 * xx + yy).astype(np.uint8)).save(root / f"{n}.png")
    bad = tmp_path / "latin1.csv"
    bad.write_bytes("image,text\na.png,Heart normal.\nb.png,Cr\xe8me.\n".encode("latin-1"))
    with pytest.raises(MflagError, match=r"latin1.csv: line 3: not valid UTF-8"):
        run(PairsConfig(table=str(bad), image_root=str(root), out=str(tmp_path / "o1"), size=32, workers=1))
    # a JSONL escape \ud800 decodes to a lone surrogate: replaced in the text (counted), refused in a path
    jl = tmp_path / "t.jsonl"
    jl.write_text('\ufeff{"image": "a.png", "text": "Heart \\ud800 normal."}\n'
                  '{"image": "b\\udc00.png", "text": "Lungs clear."}\n'
                  '{"image": "c.png", "text": "No effusion."}\n', encoding="utf-8")
    out = tmp_path / "o2"
    res = run(PairsConfig(table=str(jl), image_root=str(root), out=str(out), size=32, workers=1,
                          split_fractions=(1.0, 0.0, 0.0), max_bad_fraction=0.5))
    assert res.n_images == 2
    rep = read_json(out / "prepare-report.json")
    assert [(b["reason"], b["where"]) for b in rep["bad"]] == [("bad_row", f"{jl}:2")]
    assert rep["counts"]["surrogates_replaced"] == 1
    texts = sorted(json.loads(line)["text"] for line in (out / "reports.jsonl").read_text("utf-8").splitlines())
    assert texts == ["Heart \ufffd normal.", "No effusion."]
