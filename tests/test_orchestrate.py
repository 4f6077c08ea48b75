"""`cli.py run` / `cli.py status` end to end on the smallest real pipeline (every stage, seconds)."""
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cli import cli
from pipeline.common import MflagError
from stages import orchestrate

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny-test.yaml"


def _config(tmp_path: Path, **changes) -> Path:
    spec = yaml.safe_load(TINY.read_text())
    spec["workdir"] = str(tmp_path / "work")
    for dotted, value in changes.items():
        node = spec
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    path = tmp_path / f"pipeline-{len(changes)}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
def test_run_skips_fresh_stages_and_reruns_only_what_changed(tmp_path):
    runner = CliRunner()
    cfg = _config(tmp_path)
    res = runner.invoke(cli, ["-q", "run", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert "10 stage(s) ran, 0 up to date" in res.output
    work = tmp_path / "work"
    report = (work / "report" / "results.md").read_text()
    assert "| cls-chexpert | auroc |" in report and "zv effective rank" in report
    for png in ("loss_curves.png", "spectra.png", "metrics.png"):
        assert (work / "report" / png).stat().st_size > 1000
    assert (work / "train" / "mflag" / "encoder.pt").is_file()

    res = runner.invoke(cli, ["-q", "run", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert "0 stage(s) ran, 10 up to date" in res.output

    # A new text-model option reruns the text model, embed-text and everything after, never prepare.
    changed = _config(tmp_path, **{"embed_text.max_length": 96})
    states = {s.name: s for s in orchestrate.status(orchestrate.RunConfig(config=str(changed)))}
    assert states["prepare"].state == "fresh" and states["synth-mimic"].state == "fresh"
    assert states["embed-text"].state == "stale" and "max_length" in states["embed-text"].reason
    assert states["train:mflag"].state == "stale" and states["eval:cls-chexpert:random"].state == "fresh"
    res = runner.invoke(cli, ["-q", "run", "--config", str(changed)])
    assert res.exit_code == 0, res.output
    ran = {line.split()[0] for line in res.output.splitlines() if line.strip().endswith(" s") and " ran " in line}
    assert ran == {"embed-text", "train:mflag", "train:align-only", "eval:cls-chexpert:mflag", "report"}

    res = runner.invoke(cli, ["status", "--config", str(changed)])
    assert res.exit_code == 0 and "stale" not in res.output and "missing" not in res.output


def test_spec_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"corpus": {"synth": {}}, "text_model": {"model": "x"},
                                   "train": {"variants": {"m": {"orth_wieght": 1}}}}))
    with pytest.raises(MflagError, match="orth_wieght"):
        orchestrate.build_nodes(orchestrate.load_spec(bad))
    bad.write_text(yaml.safe_dump({"corpus": {}, "text_model": {"model": "x"}}))
    with pytest.raises(MflagError, match="exactly one of 'synth' or 'mimic'"):
        orchestrate.load_spec(bad)
    bad.write_text(yaml.safe_dump({"corpus": {"synth": {}}, "text_model": {"model": "x"}, "trian": {}}))
    with pytest.raises(MflagError, match="unknown top-level keys"):
        orchestrate.load_spec(bad)


def test_a_task_may_name_its_own_inits(tmp_path):
    spec = yaml.safe_load(TINY.read_text())
    spec["workdir"] = str(tmp_path / "work")
    spec["eval"]["tasks"].append({"task": "cls", "dataset": "chexpert", "fraction": 1.0, "inits": ["random"]})
    names = [n.name for n in orchestrate.build_nodes(spec)]
    assert "eval:cls-chexpert@1:random" in names and "eval:cls-chexpert@1:mflag" not in names
    assert "eval:cls-chexpert:mflag" in names  # the other task keeps the common inits


def test_fingerprints_do_not_depend_on_how_the_workdir_is_spelled(tmp_path, monkeypatch):
    spec = yaml.safe_load(TINY.read_text())
    monkeypatch.chdir(tmp_path)
    spec["workdir"] = "work"
    relative = {n.name: n for n in orchestrate.build_nodes(dict(spec))}
    spec["workdir"] = str(tmp_path / "work")
    absolute = orchestrate.build_nodes(dict(spec))
    from pipeline.stagegraph import resolve_fingerprints

    resolve_fingerprints(list(relative.values()))
    for node in resolve_fingerprints(absolute).values():
        assert node.fingerprint == relative[node.name].fingerprint, node.name
