"""One place per change: a downstream dataset registered in one entry of the dataset registry, a task in one
entry of the task registry and a detection head in one entry of the head registry are seen by everything
that lists them (eval's and splits' options, `cli.py synth`, the pipeline YAML's checks, docs/OPTIONS.md),
without any other edit: the choices are read from the registries when needed, not copied when the stage
modules were imported."""
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import cli
from pipeline import downstream
from pipeline.common import ConfigError, MflagError
from pipeline.downstream import det_heads
from pipeline.downstream.datasets import registry
from pipeline.downstream.datasets.base import DatasetSpec, Record
from pipeline.downstream.datasets.registry import DatasetEntry, SynthOption
from pipeline.options import option_choices
from pipeline.synth.downstream import WRITERS
from stages import orchestrate
from stages.evaluate import EvalConfig
from stages.splits import SplitsConfig

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny-test.yaml"


# --------------------------------------------------------------------------- the toy dataset, task and head
def read_toy(root, task: str = "cls", protocol: str = "tool", require_images: bool = True,
             flavour: str = "plain") -> DatasetSpec:
    records = [Record(image_id=f"t{i}", patient_id=f"p{i}", path=Path(root) / f"t{i}.png") for i in range(3)]
    return DatasetSpec(name="toy", root=Path(root), records=records)


def write_toy(out_dir, n: int, seed: int, image_size: int = 64, shade: float = 0.5, workers: int = 1) -> dict:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "toy.txt").write_text(f"{n} {seed} {image_size} {shade}\n")
    return {"root": str(out_dir), "dataset": "toy", "n_images": n, "shade": shade}


TOY = DatasetEntry(read_toy, ("cls", "toytask"), "tests.test_registries:write_toy", 64,
                   (SynthOption("shade", "Grey level of the toy images.", bounds=(0, 1)),))


@pytest.fixture
def toy(monkeypatch):
    """One entry in each registry: the dataset, the task, the detection head."""
    # built before registering, as a long-lived process (or an earlier test) would have them
    assert "toy" not in _eval_help()
    monkeypatch.setitem(registry.DATASETS, "toy", TOY)
    monkeypatch.setitem(downstream.TASKS, "toytask", downstream.TaskEntry("tests.test_registries", True, True,
                                                                          "a toy head"))
    monkeypatch.setitem(det_heads.DET_HEADS, "toyhead", det_heads.DetHeadEntry(
        "tests.test_registries:write_toy", "backbone", True, 1, "Toy", "a toy head"))


def _eval_help() -> str:
    res = CliRunner().invoke(cli.cli, ["eval", "--help"], terminal_width=400)
    assert res.exit_code == 0, res.output
    return res.output


# --------------------------------------------------------------------------- what follows from the entries
def test_the_command_line_sees_a_registered_dataset_task_and_head(toy, tmp_path):
    help_text = _eval_help()
    assert "[chexpert|rsna|covidx|siim|object-cxr|toy]" in help_text
    assert "|retrieval|toytask]" in help_text and "|yolov3|toyhead]" in help_text
    res = CliRunner().invoke(cli.cli, ["splits", "--help"], terminal_width=400)
    assert "|object-cxr|toy]" in res.output and "[cls|seg|det|toytask]" in res.output
    # parsing accepts them too (the config then fails on --init, after the choices passed)
    res = CliRunner().invoke(cli.cli, ["eval", "--task", "toytask", "--dataset", "toy", "--root", str(tmp_path),
                                       "--out", str(tmp_path / "o"), "--init", str(tmp_path / "none.pt")])
    assert res.exit_code == 2 and "error: --init: expected 'random'" in res.output, res.output
    # the synthetic world: `cli.py synth toy` with the writer's option
    res = CliRunner().invoke(cli.cli, ["synth", "--help"])
    assert "toy" in res.output
    res = CliRunner().invoke(cli.cli, ["synth", "toy", "--out", str(tmp_path / "d"), "--n", "5", "--shade", "0.25"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "d" / "toy.txt").read_text() == "5 0 64 0.25\n"
    assert set(WRITERS) == {*registry.synth_names()} == {*registry.dataset_names()} and WRITERS["toy"] is write_toy


def test_the_configs_and_the_task_dataset_check_see_it(toy, tmp_path):
    assert option_choices(EvalConfig, "dataset")[-1] == "toy"
    good = dict(dataset="toy", root=str(tmp_path), out=str(tmp_path / "o"), init="random")
    EvalConfig(task="toytask", **good, dataset_options=(("flavour", "spicy"),))
    with pytest.raises(ConfigError, match="task: toy supports cls, toytask, not 'seg'"):
        EvalConfig(task="seg", **good)
    with pytest.raises(ConfigError, match="protocol: MGCA has no toytask toy recipe"):
        EvalConfig(task="toytask", protocol="mgca", **good)
    with pytest.raises(ConfigError, match="dataset 'toy' has no option\\(s\\) colour .*accepted: flavour"):
        EvalConfig(task="cls", **good, dataset_options=(("colour", "red"),))
    SplitsConfig(dataset="toy", task="toytask", root=str(tmp_path), out=str(tmp_path / "s"))
    spec = registry.load_dataset("toy", tmp_path, "toytask")
    assert spec.tasks == ("cls", "toytask") and spec.task == "toytask"
    with pytest.raises(MflagError, match="dataset 'toy' supports tasks cls, toytask, not 'det'"):
        registry.load_dataset("toy", tmp_path, "det")


def test_the_pipeline_yaml_sees_it(toy, tmp_path):
    spec = yaml.safe_load(TINY.read_text())
    spec["workdir"] = str(tmp_path / "work")
    spec["downstream"]["synth"]["toy"] = {"n": 6, "shade": 0.75}
    spec["eval"]["tasks"].append({"task": "toytask", "dataset": "toy"})
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    nodes = {n.name: n for n in orchestrate.build_nodes(orchestrate.load_spec(path))}
    assert nodes["synth:toy"].params == {"dataset": "toy", "n": 6, "shade": 0.75}
    assert "synth:toy" in nodes["eval:toytask-toy:random"].deps
    # and checks its options against the writer's and the reader's parameters
    spec["downstream"]["synth"]["toy"] = {"colour": 1}
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(MflagError, match=r"downstream\.synth\.toy: unknown options \['colour'\]"):
        orchestrate.build_nodes(orchestrate.load_spec(path))
    spec["downstream"]["synth"]["toy"] = {}
    spec["eval"]["tasks"][-1]["dataset_options"] = {"colour": "red"}
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(MflagError, match=r"dataset 'toy' has no option\(s\) colour"):
        orchestrate.build_nodes(orchestrate.load_spec(path))


def test_the_options_doc_sees_it(toy):
    doc = cli.options_markdown()
    assert "`chexpert`, `rsna`, `covidx`, `siim`, `object-cxr`, `toy`." in doc
    assert "`retrieval`, `toytask`." in doc and "`yolov3`, `toyhead`." in doc


def test_without_the_toy_entries_nothing_lists_them():
    # the fixture's entries are gone after its tests: the registries are read each time, nothing kept a copy
    assert "toy" not in registry.dataset_names() and "toy" not in WRITERS
    assert "toy" not in _eval_help() and "toy" not in cli.options_markdown()


def test_every_registered_dataset_is_complete():
    """Each entry's tasks are trained tasks of the task registry, its MGCA tasks among them, and its writer and
    synth options resolve (the writer takes each option, and is what pipeline.synth.downstream writes with)."""
    import inspect

    for name, entry in registry.DATASETS.items():
        assert set(entry.tasks) <= set(registry.trained_tasks()), name
        assert set(entry.mgca_tasks) <= set(entry.tasks) and (entry.mgca is None) == (not entry.mgca_tasks), name
        params = inspect.signature(WRITERS[name]).parameters
        assert {o.param for o in entry.synth_options} <= set(params), name
    assert registry.trained_tasks() == ("cls", "seg", "det")
    for head in det_heads.DET_HEADS.values():
        assert head.build.startswith("pipeline.downstream.det:")


def test_a_dataset_needs_only_its_reader_and_entry(monkeypatch, tmp_path):
    """A real dataset added without a synthetic writer: eval and splits take it, `cli.py synth` and the
    YAML's `downstream: synth:` do not offer it (and say which datasets they have)."""
    monkeypatch.setitem(registry.DATASETS, "bare", DatasetEntry(read_toy, ("cls",)))
    assert "bare" in _eval_help() and "bare" in registry.dataset_names()
    EvalConfig(task="cls", dataset="bare", root=str(tmp_path), out=str(tmp_path / "o"), init="random")
    assert "bare" not in WRITERS and "bare" not in registry.synth_names()
    res = CliRunner().invoke(cli.cli, ["synth", "bare", "--help"])
    assert res.exit_code != 0 and "No such command 'bare'" in res.output
    with pytest.raises(MflagError, match="dataset 'bare' has no synthetic writer; one of chexpert, rsna"):
        registry.synth_writer("bare")
    spec = yaml.safe_load(TINY.read_text())
    spec["workdir"] = str(tmp_path / "work")
    spec["downstream"]["synth"]["bare"] = {"n": 6}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(MflagError, match=r"downstream\.synth: unknown dataset 'bare'; one of chexpert, rsna"):
        orchestrate.build_nodes(orchestrate.load_spec(path))
