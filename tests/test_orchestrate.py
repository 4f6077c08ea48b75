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
    assert "| cls-chexpert | auroc |" in report and "zv centred" in report
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
    res = runner.invoke(cli, ["status", "--config", str(changed), "--force", "train:mflag"])
    assert res.exit_code == 0, res.output
    lines = {line.split()[0]: line.split()[1] for line in res.output.splitlines() if line.strip()}
    assert lines["train:mflag"] == "forced" and lines["eval:cls-chexpert:mflag"] == "stale"
    assert lines["train:align-only"] == "fresh" and lines["prepare"] == "fresh"


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


def test_yaml_numbers_with_an_exponent_are_numbers(tmp_path):
    # YAML 1.1 reads 2e-5 as a string; the README writes numbers that way, so the pipeline reads it as one.
    path = _config(tmp_path)
    text = path.read_text().replace("lr: 0.001", "lr: 1e-3")
    assert "lr: 1e-3" in text
    path.write_text(text)
    nodes = {n.name: n for n in orchestrate.build_nodes(orchestrate.load_spec(path))}
    assert nodes["train:mflag"].params["lr"] == 1e-3


@pytest.mark.parametrize("dotted, value, message", [
    ("train.common.lr", "fast", r"train\.common\.lr: expected a number, got 'fast'"),
    ("train.common.max_steps", 2.5, r"train\.common\.max_steps: expected a whole number"),
    ("train.common.aug", "heavy", r"train\.common\.aug: expected one of"),
    ("train.variants.mflag", {"orth_on": "zz"}, r"train\.variants\.mflag\.orth_on: expected one of"),
    ("train.common.orth_wieght", 1, r"train\.common: unknown .*orth_wieght"),
    ("corpus.synth.n_studeis", 4, r"corpus\.synth: unknown options \['n_studeis'\]"),
    ("text_model.build.hiden", 4, r"text_model\.build: unknown options \['hiden'\]"),
    ("downstream.synth.chexpert.size", 4, r"downstream\.synth\.chexpert: unknown options \['size'\]"),
    ("eval.common.fraction", 2, r"eval\.common\.fraction: must be in \(0, 1\]"),
    ("eval.common.protocol", "paper", r"eval\.common\.protocol: expected one of mgca, tool, got 'paper'"),
    ("embed_text.pooling", "max", r"embed_text\.pooling: expected one of cls, mean, proj, got 'max'"),
    ("report", {"titel": "x"}, r"report: unknown .*titel"),
    ("eval.common.dataset_options", {"frontal_olny": False}, r"dataset 'chexpert' has no option\(s\) frontal_olny"),
    ("eval.common.dataset_options", {"frontal_only": "maybe"}, r"option frontal_only: expected true or false"),
    ("eval.common.dataset_options", [["frontal_only", False]], r"dataset_options: expected a mapping"),
])
def test_every_section_is_checked_before_anything_runs(tmp_path, dotted, value, message):
    path = _config(tmp_path, **{dotted: value})
    with pytest.raises(MflagError, match=message):
        orchestrate.status(orchestrate.RunConfig(config=str(path)))
    assert not (tmp_path / "work").exists()


def test_a_lone_value_where_a_list_is_wanted(tmp_path):
    path = _config(tmp_path, **{"eval.common.seeds": 3, "eval.inits": "random"})
    nodes = {n.name: n for n in orchestrate.build_nodes(orchestrate.load_spec(path))}
    assert nodes["eval:cls-chexpert:random"].params["seeds"] == [3]
    assert [n for n in nodes if n.startswith("eval:")] == ["eval:cls-chexpert:random"]


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
    from pipeline.run.graph import resolve_fingerprints

    resolve_fingerprints(list(relative.values()))
    for node in resolve_fingerprints(absolute).values():
        assert node.fingerprint == relative[node.name].fingerprint, node.name


def test_run_checks_outside_inputs_before_any_stage(tmp_path, monkeypatch):
    path = _config(tmp_path, **{"downstream.roots": {"rsna": str(tmp_path / "no-such-rsna")}})
    spec = yaml.safe_load(path.read_text())
    spec["eval"]["tasks"].append({"task": "det", "dataset": "rsna"})
    spec["train"]["common"]["init"] = "imagenet"
    path.write_text(yaml.safe_dump(spec))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    with pytest.raises(MflagError) as e:
        orchestrate.run(orchestrate.RunConfig(config=str(path)))
    assert "downstream.roots.rsna (stage eval:det-rsna:random)" in str(e.value) and "does not exist" in str(e.value)
    assert "use init imagenet" in str(e.value) and "step 0" in str(e.value)
    assert not (tmp_path / "work").exists()  # nothing ran
    orchestrate.status(orchestrate.RunConfig(config=str(path)))  # status still shows the plan


def test_seeds_per_variant_and_online_variants(tmp_path):
    spec = yaml.safe_load(TINY.read_text())
    spec["workdir"] = str(tmp_path / "work")
    spec["train"]["seeds"] = [0, 1]
    spec["train"]["variants"] = {"mflag": {}, "k1": {"text_mode": "online", "unfreeze_last": 1},
                                 "all": {"text_mode": "online", "unfreeze_last": "all", "seeds": [2, 0, 1]}}
    del spec["eval"]["common"]["seeds"]
    spec["eval"]["inits"] = ["random", "mflag", "all"]
    nodes = {n.name: n for n in orchestrate.build_nodes(spec)}
    trains = [n for n in nodes if n.startswith("train:")]
    assert trains == ["train:mflag:s0", "train:mflag:s1", "train:k1:s0", "train:k1:s1", "train:all:s2",
                      "train:all:s0", "train:all:s1"]
    work = tmp_path / "work"
    assert nodes["train:mflag:s1"].out_dir == work / "train" / "mflag" / "seed-1"
    assert nodes["train:mflag:s1"].params["seed"] == 1
    # online variants: the pipeline's text model and reports, pooled and truncated as embed-text did
    k1 = nodes["train:k1:s0"]
    assert k1.params["text_model"] == "@text-model/model" and k1.params["reports"] == "@prepare/reports.jsonl"
    assert (k1.params["text_pooling"], k1.params["text_max_length"]) == ("mean", 128)
    assert "text-model" in k1.deps and "text_model" not in nodes["train:mflag:s0"].params
    assert nodes["train:all:s2"].params["unfreeze_last"] == "all"
    # pre-training replicate s is evaluated with downstream seed s; random with every train seed
    evals = {n: nodes[n] for n in nodes if n.startswith("eval:")}
    assert sorted(evals) == ["eval:cls-chexpert:all:s0", "eval:cls-chexpert:all:s1", "eval:cls-chexpert:all:s2",
                             "eval:cls-chexpert:mflag:s0", "eval:cls-chexpert:mflag:s1",
                             "eval:cls-chexpert:random"]
    e = evals["eval:cls-chexpert:all:s2"]
    assert e.params["seeds"] == [2] and e.params["init"] == "all:s2" and "train:all:s2" in e.deps
    assert e.out_dir == work / "eval" / "cls-chexpert" / "all" / "seed-2"
    assert evals["eval:cls-chexpert:random"].params["seeds"] == [0, 1]
    # the report reads every replicate
    assert {d for d in nodes["report"].deps if d.startswith("train:")} == set(trains)


@pytest.mark.parametrize("change, message", [
    ({"train.seeds": [0, 0]}, r"train\.seeds: expected distinct non-negative seeds"),
    ({"train.seeds": [1], "train.common.seed": 3}, r"train\.seeds \(one run per seed\) or train\.common\.seed"),
    ({"train.variants.mflag": {"seeds": [0], "seed": 1}}, r"train\.variants\.mflag: give seeds"),
    ({"train.variants.mflag": {"text_mode": "online", "unfreeze_last": "some"}},
     r"train\.variants\.mflag\.unfreeze_last: expected a number of layers or 'all'"),
    ({"train.variants.mflag": {"text_mode": "online", "text_model": "x"}},
     r"train\.variants\.mflag: unknown or orchestrator-owned options \['text_model'\]"),
    ({"train.variants.mflag": {"align_weight": 0.0, "orth_weight": 0.0}}, r"align_weight and orth_weight are both 0"),
])
def test_seed_and_online_options_are_checked(tmp_path, change, message):
    path = _config(tmp_path, **change)
    with pytest.raises(MflagError, match=message):
        orchestrate.status(orchestrate.RunConfig(config=str(path)))


@pytest.mark.parametrize("name", ["ablation.yaml", "ablation-mimic.yaml", "demo.yaml", "mimic.yaml", "openi.yaml"])
def test_shipped_pipelines_validate(name, tmp_path):
    path = TINY.parent / name
    states = orchestrate.status(orchestrate.RunConfig(config=str(path), workdir=str(tmp_path / "w")))
    assert states and all(s.state == "missing" for s in states)
