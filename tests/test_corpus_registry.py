"""A pre-training corpus is one module + one registry entry: a toy corpus defined here (its module written
to a temporary folder, one entry added to ``pipeline.corpora.CORPORA``) becomes ``prepare <name>`` with its
own options, prepares shards and reports.jsonl, and appears in docs/OPTIONS.md, with nothing else edited."""
from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import cli
from pipeline.corpora import CORPORA, Corpus
from stages.orchestrate import build_nodes, load_spec

TOY_MODULE = '''
"""A toy corpus: ROOT/<study>.png with its report in ROOT/<study>.txt."""
from dataclasses import dataclass
from pathlib import Path

from pipeline.corpora.base import CorpusImage, Selection, ShardOptions, draw_split, splits_option
from pipeline.options import option


@dataclass(frozen=True, kw_only=True)
class ToyConfig(ShardOptions):
    INPUTS = ("root",)
    root: str = option(help="Folder of <study>.png and <study>.txt.", exists="dir")
    toy_seed: int = option(0, help="Seed of the drawn split.")
    splits: tuple[str, ...] = splits_option()


def read(cfg, report):
    root = Path(cfg.root)
    images, texts = [], {}
    for png in sorted(root.glob("*.png")):
        study = png.stem
        split = draw_split(study, cfg.toy_seed, (0.6, 0.2, 0.2))
        images.append(CorpusImage(study, "p" + study, study, "PA", split, png.name))
        texts[("p" + study, study)] = ((root / (study + ".txt")).read_text(), ["impression"])
    return Selection(images, texts, root, len(images), 0, {"corpus": "toy"})
'''


@pytest.fixture
def toy_corpus(tmp_path, monkeypatch):
    pkg = tmp_path / "toy_pkg"
    pkg.mkdir()
    (pkg / "toy_corpus_mod.py").write_text(textwrap.dedent(TOY_MODULE))
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.setitem(CORPORA, "toy", Corpus("toy", "toy_corpus_mod", "ToyConfig", "A toy corpus (test only)."))
    yield
    sys.modules.pop("toy_corpus_mod", None)


def _write_toy(root, n=20):
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(root / f"s{i:03d}.png")
        (root / f"s{i:03d}.txt").write_text(f"report number {i}: no acute findings")


def test_a_registered_corpus_is_a_prepare_command(toy_corpus, tmp_path):
    runner = CliRunner()
    listing = runner.invoke(cli.cli, ["prepare", "--help"])
    assert listing.exit_code == 0 and "toy" in listing.output and "A toy corpus" in listing.output
    own = runner.invoke(cli.cli, ["prepare", "toy", "--help"])
    assert own.exit_code == 0, own.output
    assert "--toy-seed" in own.output and "--root" in own.output and "--shard-size" in own.output

    _write_toy(tmp_path / "toy")
    out = tmp_path / "out"
    res = runner.invoke(cli.cli, ["prepare", "toy", "--root", str(tmp_path / "toy"), "--out", str(out),
                                  "--size", "32", "--workers", "1", "--shard-size", "8"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["corpus"] == "toy" and manifest["n_images"] == 20
    assert sum(s["count"] for s in manifest["splits"].values()) == 20
    studies = [json.loads(line)["study_id"] for line in (out / "reports.jsonl").read_text().splitlines()]
    assert sorted(studies) == [f"s{i:03d}" for i in range(20)]


def test_a_registered_corpus_is_in_the_options_doc(toy_corpus):
    doc = cli.options_markdown()
    assert "### `mflag prepare toy`" in doc and "`--toy-seed`" in doc


def test_an_unregistered_corpus_is_no_command():
    res = CliRunner().invoke(cli.cli, ["prepare", "toy", "--help"])
    assert res.exit_code != 0 and "No such command 'toy'" in res.output


def test_a_registered_corpus_is_a_pipeline_yaml_corpus(toy_corpus, tmp_path):
    (tmp_path / "toy").mkdir()
    yaml_file = tmp_path / "p.yaml"
    yaml_file.write_text(textwrap.dedent(f"""\
        workdir: {tmp_path / 'work'}
        corpus:
          toy: {{root: {tmp_path / 'toy'}}}
        prepare: {{size: 32, toy_seed: 3}}
        text_model:
          build: {{hidden: 32, layers: 1, heads: 2}}
        train:
          variants: {{mflag: {{}}}}
        """))
    nodes = {n.name: n for n in build_nodes(load_spec(yaml_file))}
    assert nodes["prepare"].params["corpus"] == "toy" and nodes["prepare"].params["toy_seed"] == 3
    # its own options are checked against its config like any corpus's
    yaml_file.write_text(yaml_file.read_text().replace("toy_seed: 3", "toy_seed: 3, toy_sed: 1"))
    with pytest.raises(Exception, match="toy_sed"):
        build_nodes(load_spec(yaml_file))
