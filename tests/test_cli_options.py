"""The stage commands are generated from their config dataclasses: --help lists exactly the fields with
their defaults, a new field needs no cli.py change, the CLI and the YAML give one message, docs/OPTIONS.md
is what the generator writes."""
import dataclasses
import re
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

import cli
from pipeline.common import ConfigError, MflagError
from pipeline.options import check_fields, option
from stages import orchestrate
from stages.embed_text import EmbedTextConfig
from stages.evaluate import EvalConfig
from stages.prepare import PrepareConfig
from stages.splits import SplitsConfig
from stages.train_vision import TrainVisionConfig

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"prepare mimic": PrepareConfig, "embed-text": EmbedTextConfig, "train-vision": TrainVisionConfig,
           "eval": EvalConfig, "splits": SplitsConfig}


def _required(name: str, tmp_path: Path) -> dict:
    """The values a command needs (real folders where the option checks that they exist)."""
    (tmp_path / "data").mkdir(exist_ok=True)
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    return {"prepare mimic": {"root": data, "out": out},
            "embed-text": {"reports": "reports.jsonl", "out": out},
            "train-vision": {"shards": data, "out": out, "text_cache": "cache"},
            "eval": {"task": "cls", "dataset": "chexpert", "root": data, "out": out, "init": "random"},
            "splits": {"dataset": "chexpert", "task": "cls", "root": data, "out": out}}[name]


def _expected_names(cls) -> set[str]:
    """Option spellings written independently of the generator: --field-name (or the declared names),
    and --no-x for a switch."""
    names = set()
    for f in dataclasses.fields(cls):
        meta = f.metadata["mflag_option"]  # every field of a stage config is an option
        spelled = meta.names or ("--" + f.name.replace("_", "-"),)
        names.update(spelled)
        if f.type in ("bool", bool) and meta.negatable:
            names.add("--no-" + spelled[0][2:])
    return names


def _help_rows(cmd: click.Command, name: str) -> dict[str, str]:
    """--help, one line per option (wide formatter): first spelling -> the whole line."""
    ctx = click.Context(cmd, info_name=name, max_content_width=10_000, terminal_width=10_000)
    text = cmd.get_help(ctx)
    lines: list[str] = []
    for line in text.split("Options:", 1)[1].splitlines():
        if line.startswith("  -"):
            lines.append(line)
        elif line.strip():  # help put below a long option column
            lines[-1] += "  " + line.strip()
    rows = {}
    for line in lines:
        head = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
        for spelling in re.findall(r"(?<![\w-])--?[a-z][a-z0-9-]*", head):
            rows[spelling] = line
    return rows


def _default_shown(line: str) -> str | None:
    m = re.search(r"\[default: (.*?)(?:; [^;\]]*x[^;\]]*)?\]$", line)
    return None if m is None else m.group(1)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_help_lists_exactly_the_config_fields_with_their_defaults(name):
    cls = CONFIGS[name]
    cmd = cli.stage_commands()[name]
    assert cmd.config_class() is cls
    rows = _help_rows(cmd, name)
    assert set(rows) - {"-h", "--help"} == _expected_names(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata["mflag_option"]
        line = rows[(meta.names or ("--" + f.name.replace("_", "-"),))[0]]
        assert meta.help in line, f.name
        shown = _default_shown(line)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            assert "[required]" in line and shown is None, f.name
        elif meta.show_default is not None:
            assert shown == f"({meta.show_default})", f.name
        elif f.type in ("bool", bool):
            want = None if not meta.negatable else (f.name if f.default else "no-" + f.name).replace("_", "-")
            assert shown == want, f.name
        elif f.default is None or f.default == ():
            assert shown is None, f.name
        elif isinstance(f.default, tuple):
            assert shown in (",".join(map(str, f.default)), ", ".join(map(str, f.default))), f.name
        else:
            assert shown == str(f.default), f.name


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parsed_defaults_build_the_dataclass_defaults(name, tmp_path):
    cls = CONFIGS[name]
    cmd = cli.stage_commands()[name]
    required = _required(name, tmp_path)
    args = []
    for field, value in required.items():
        args += [(f.metadata["mflag_option"].names or ("--" + field.replace("_", "-"),))[0]
                 for f in dataclasses.fields(cls) if f.name == field] + [value]
    ctx = cmd.make_context(name, args)
    assert set(ctx.params) == {f.name for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        if f.name not in required:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            assert ctx.params[f.name] == default and type(ctx.params[f.name]) is type(default), f.name
    assert cls(**ctx.params) == cls(**required)


@dataclasses.dataclass(frozen=True)
class Throwaway:
    out: str = option(help="Output folder.")
    extra_knob: int = option(4, min=1, help="A knob added to the dataclass only.")

    def __post_init__(self):
        check_fields(self)


def test_a_field_added_to_a_config_appears_without_touching_cli_py(tmp_path):
    seen = []
    cmd = cli.StageCommand("throwaway", config=Throwaway, callback=seen.append)
    assert "--extra-knob" in cmd.get_help(click.Context(cmd, info_name="throwaway"))
    assert CliRunner().invoke(cmd, ["--out", "o", "--extra-knob", "7"]).exit_code == 0
    assert seen == [Throwaway(out="o", extra_knob=7)]
    bad = CliRunner().invoke(cmd, ["--out", "o", "--extra-knob", "0"])
    assert bad.exit_code == 2 and bad.output == "error: --extra-knob: must be >= 1, got 0\n"

    # the same for a real stage: a subclass of SplitsConfig with one more field gets every option plus it
    plus = dataclasses.make_dataclass(
        "SplitsPlus", [("dry_run", bool, option(False, negatable=False, help="Only say what would be written."))],
        bases=(SplitsConfig,), frozen=True)
    cmd = cli.StageCommand("splits", config=plus, callback=seen.append)
    rows = _help_rows(cmd, "splits")
    assert set(rows) - {"-h", "--help"} == _expected_names(SplitsConfig) | {"--dry-run"}
    root = tmp_path / "root"
    root.mkdir()
    res = CliRunner().invoke(cmd, ["--dataset", "chexpert", "--task", "cls", "--root", str(root), "--out", "o",
                                   "--dry-run"])
    assert res.exit_code == 0, res.output
    assert seen[-1].dry_run is True and seen[-1].fractions == (0.01, 0.1, 1.0)


# One check, one message: the command line names the option as typed, the YAML names section.field.
@pytest.mark.parametrize("args, dotted, value, message", [
    (["train-vision", "--batch-size", "1"], "train.common.batch_size", 1, "must be >= 2, got 1"),
    (["train-vision", "--restart-fraction", "0"], "train.common.restart_fraction", 0.0, "must be in (0, 1], got 0.0"),
    (["eval", "--fraction", "2"], "eval.common.fraction", 2.0, "must be in (0, 1], got 2.0"),
    (["eval", "--workers", "-1"], "eval.common.workers", -1, "must be >= 0, got -1"),
    (["embed-text", "--max-length", "1"], "embed_text.max_length", 1, "must be in [2, 65536], got 1"),
    (["prepare", "mimic", "--jpeg-quality", "0"], "prepare.jpeg_quality", 0, "must be in [1, 100], got 0"),
])
def test_cli_and_yaml_give_the_same_message(tmp_path, args, dotted, value, message):
    name = "prepare mimic" if args[0] == "prepare" else args[0]
    cls = CONFIGS[name]
    base = []
    for field, v in _required(name, tmp_path).items():
        base += [next((f.metadata["mflag_option"].names or ("--" + field.replace("_", "-"),))[0]
                      for f in dataclasses.fields(cls) if f.name == field), v]
    opt = [a for a in args if a.startswith("--")][0]
    res = CliRunner().invoke(cli.cli, [*args[:-2], *base, opt, args[-1]])
    assert res.exit_code == 2 and res.output.splitlines()[-1] == f"error: {opt}: {message}", res.output

    spec = yaml.safe_load((REPO / "configs" / "tiny-test.yaml").read_text())
    spec["workdir"] = str(tmp_path / "work")
    node = spec
    *parents, leaf = dotted.split(".")
    for p in parents:
        if node.get(p) is None:
            node[p] = {}
        node = node[p]
    node[leaf] = value
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError) as e:
        orchestrate.status(orchestrate.RunConfig(config=str(path)))
    assert str(e.value).endswith(f"{dotted}: {message}")


def test_yaml_unknown_keys_are_named_with_their_section(tmp_path):
    spec = yaml.safe_load((REPO / "configs" / "tiny-test.yaml").read_text())
    spec["workdir"] = str(tmp_path / "work")
    spec["prepare"] = {**(spec.get("prepare") or {}), "jpeg_qualty": 90}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(MflagError, match=r"prepare: unknown or orchestrator-owned options \['jpeg_qualty'\]"):
        orchestrate.status(orchestrate.RunConfig(config=str(path)))


def test_options_doc_is_what_the_generator_writes():
    committed = (REPO / "docs" / "OPTIONS.md").read_text(encoding="utf-8")
    assert committed == cli.options_markdown(), "docs/OPTIONS.md is stale: run `python cli.py options-doc --write`"
    for name in CONFIGS:
        assert f"### `mflag {name}`" in committed
