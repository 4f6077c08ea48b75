"""pipeline.options: one dataclass field -> checks, click option, option name and docs row."""
import dataclasses
from typing import Any

import click
import pytest
from click.testing import CliRunner

from cli import click_options
from pipeline.common import ConfigError
from pipeline.options import (
    check_fields,
    markdown_table,
    option,
    option_choices,
    option_name,
    result_config,
)


@dataclasses.dataclass(frozen=True)
class Toy:
    out: str = option(help="Output folder.")
    batch_size: int = option(128, help="Global batch.", min=2)
    lr: float = option(2e-5, help="Learning rate.", min=0, min_open=True)
    ratio: float = option(0.0, help="A fraction.", min=0, max=1)
    aug: str = option("original", help="Augmentation.", choices=("original", "light", "none"))
    steps: int | None = option(None, help="Total steps.", min=1, show_default="epochs x steps per epoch")
    workers: int = option(2, help="Loader workers.", names=("--num-workers", "--workers"), min=0)
    sync_bn: bool = option(True, help="SyncBatchNorm.")
    force: bool = option(False, help="Rebuild.", negatable=False)
    views: tuple[str, ...] = option(("PA", "AP"), help="Views.")
    seeds: tuple[int, ...] = option((0,), help="Seeds.", min=0)
    pairs: tuple[tuple[str, Any], ...] = option((), help="Reader options.")
    internal: str = option("x", help="Not on the command line.", cli=False)
    device: str = option("auto", device=True, help="Device.")
    log_every: int = option(10, min=1, affects_result=False, help="Logging.")
    new_weight: float = option(1.0, added_later=True, help="An option added later.")

    def __post_init__(self):
        check_fields(self)


@pytest.mark.parametrize("kw, message", [
    ({"batch_size": 1}, "batch_size: must be >= 2, got 1"),
    ({"lr": 0.0}, "lr: must be > 0, got 0.0"),
    ({"ratio": 1.5}, "ratio: must be in [0, 1], got 1.5"),
    ({"aug": "heavy"}, "aug: expected one of original, light, none, got 'heavy'"),
    ({"steps": 0}, "steps: must be >= 1, got 0"),
    ({"batch_size": 2.5}, "batch_size: expected a whole number, got 2.5"),
    ({"sync_bn": "yes"}, "sync_bn: expected true or false, got 'yes'"),
    ({"seeds": (0, -1)}, "seeds: must be >= 0, got -1"),
    ({"views": ["PA"]}, "views: expected a list, got ['PA']"),
    ({"batch_size": True}, "batch_size: expected a whole number, got True"),
    ({"device": "gpu"}, "device: expected auto, cpu, cuda or cuda:N, got 'gpu'"),
    ({"device": "cuda:x"}, "device: expected auto, cpu, cuda or cuda:N, got 'cuda:x'"),
])
def test_check_fields_names_the_field_and_the_rule(kw, message):
    with pytest.raises(ConfigError) as e:
        Toy(out="o", **kw)
    assert str(e.value) == message


def test_result_config_is_what_the_fingerprint_sees():
    base = result_config(Toy(out="o"))
    assert "log_every" not in base and "new_weight" not in base and base["device"] == "auto"
    # logging, the GPU's index and an added option at its default change nothing computed ...
    assert result_config(Toy(out="o", log_every=1, new_weight=1.0)) == base
    assert result_config(Toy(out="o", device="cuda:1")) == result_config(Toy(out="o", device="cuda"))
    # ... while CPU vs GPU, an added option off its default and every other option do
    assert result_config(Toy(out="o", device="cuda"))["device"] == "cuda"
    assert result_config(Toy(out="o", new_weight=0.5))["new_weight"] == 0.5
    assert result_config(Toy(out="o", lr=1.0)) != base


def test_valid_values_pass_and_none_is_allowed_only_where_optional():
    Toy(out="o", steps=None, lr=1, ratio=1.0, seeds=(0, 3))
    with pytest.raises(ConfigError, match="^out: required$"):
        Toy(out=None)


def _command():
    seen = {}

    @click.command()
    @click_options(Toy)
    def cmd(**kw):
        seen.update(kw)

    return cmd, seen


def test_click_options_parse_to_the_dataclass_fields():
    cmd, seen = _command()
    res = CliRunner().invoke(cmd, ["--out", "o", "--workers", "3", "--no-sync-bn", "--force", "--views", "PA, LL",
                                   "--seeds", "0,1,2", "--pairs", "a-b=1", "--pairs", "c=x=y", "--aug", "light"])
    assert res.exit_code == 0, res.output
    assert Toy(**seen) == Toy(out="o", workers=3, sync_bn=False, force=True, views=("PA", "LL"), seeds=(0, 1, 2),
                             pairs=(("a_b", "1"), ("c", "x=y")), aug="light")
    assert "internal" not in seen


def test_click_defaults_equal_the_dataclass_defaults():
    cmd, seen = _command()
    assert CliRunner().invoke(cmd, ["--out", "o"]).exit_code == 0
    assert Toy(**seen) == Toy(out="o")


def test_click_enforces_choices_formats_and_required():
    cmd, _ = _command()
    for args, text in ((["--out", "o", "--aug", "heavy"], "'heavy' is not one of"),
                       ([], "Missing option '--out'"),
                       (["--out", "o", "--pairs", "novalue"], "expected KEY=VALUE"),
                       (["--out", "o", "--seeds", "0,a"], "expected comma-separated integers"),
                       (["--out", "o", "--batch-size", "2.5"], "'2.5' is not a valid integer")):
        res = CliRunner().invoke(cmd, args)
        assert res.exit_code == 2 and text in res.output, (args, res.output)


def test_bounds_are_left_to_check_fields_so_cli_and_yaml_say_the_same():
    # click parses the number; the dataclass rejects it with the message a YAML value would get
    cmd, seen = _command()
    for args, message in ((["--batch-size", "1"], "batch_size: must be >= 2, got 1"),
                          (["--lr", "0"], "lr: must be > 0, got 0.0"),
                          (["--seeds", "0,-1"], "seeds: must be >= 0, got -1")):
        seen.clear()
        assert CliRunner().invoke(cmd, ["--out", "o", *args]).exit_code == 0
        with pytest.raises(ConfigError) as e:
            Toy(**seen)
        assert str(e.value) == message


@dataclasses.dataclass(frozen=True)
class Paths:
    src: str = option(help="Input.", exists="dir")
    out: str = option(help="Output folder.", path="dir")
    fractions: tuple[float, ...] = option((0.01, 1.0), help="Fractions, repeatable.", names=("--fraction",),
                                          repeat=True, min=0, max=1, min_open=True)

    def __post_init__(self):
        check_fields(self)


def test_paths_and_repeatable_lists(tmp_path):
    seen = {}

    @click.command()
    @click_options(Paths)
    def cmd(**kw):
        seen.update(kw)

    (tmp_path / "file").write_text("x")
    ok = CliRunner().invoke(cmd, ["--src", str(tmp_path), "--out", str(tmp_path / "new")])
    assert ok.exit_code == 0, ok.output
    assert Paths(**seen) == Paths(src=str(tmp_path), out=str(tmp_path / "new"))
    assert CliRunner().invoke(cmd, ["--src", str(tmp_path), "--out", "o", "--fraction", "0.1",
                                    "--fraction", "0.5"]).exit_code == 0
    assert seen["fractions"] == (0.1, 0.5)
    for args, text in ((["--src", str(tmp_path / "nope"), "--out", "o"], "does not exist"),
                       (["--src", str(tmp_path), "--out", str(tmp_path / "file")], "is a file")):
        res = CliRunner().invoke(cmd, args)
        assert res.exit_code == 2 and text in res.output, (args, res.output)
    help_text = CliRunner().invoke(cmd, ["--help"], terminal_width=200).output
    assert "--out DIRECTORY" in help_text and "[default: 0.01, 1.0; 0<x<=1]" in help_text
    with pytest.raises(ConfigError, match=r"^fractions: must be in \(0, 1\], got 0$"):
        Paths(src=".", out="o", fractions=(0.5, 0))
    assert Paths(src=tmp_path, out=tmp_path).src == tmp_path  # a pathlib.Path passes where text is wanted


def test_help_shows_every_option_with_its_default():
    cmd, _ = _command()
    out = CliRunner().invoke(cmd, ["--help"], terminal_width=200).output
    for text in ("--out", "--batch-size", "[default: 128; x>=2]", "--num-workers, --workers",
                 "--sync-bn / --no-sync-bn",
                 "[default: (epochs x steps per epoch); x>=1]", "[default: PA,AP]", "--force"):
        assert text in out, text
    assert "--internal" not in out and "--no-force" not in out


def test_option_name_and_markdown_table():
    assert option_name(Toy, "workers") == "--num-workers"
    assert option_name(Toy, "batch_size") == "--batch-size"
    assert option_name(Toy, "internal") is None
    table = markdown_table(Toy, "toy").splitlines()
    assert table[0] == "### `toy`"
    rows = {r.split(" | ")[0].lstrip("| "): r.split(" | ")[1] for r in table[4:]}
    assert rows["`--out`"] == "required"
    assert rows["`--batch-size`"] == "128"
    assert rows["`--sync-bn` / `--no-sync-bn`"] == "True"
    assert rows["`--views`"] == "PA,AP"
    assert rows["`--steps`"] == "epochs x steps per epoch"
    assert rows["`internal` (YAML only)"] == "x"
    assert len(rows) == len(dataclasses.fields(Toy))


@dataclasses.dataclass(frozen=True)
class Layers:
    unfreeze: int | str = option(0, help="K layers or 'all'.")


def test_int_or_text_option_and_option_choices():
    seen = {}

    @click.command()
    @click_options(Layers)
    def cmd(**kw):
        seen.update(kw)

    for typed, value in (("3", 3), ("all", "all"), (None, 0)):
        assert CliRunner().invoke(cmd, ["--unfreeze", typed] if typed else []).exit_code == 0
        assert seen["unfreeze"] == value and type(seen["unfreeze"]) is type(value)
    assert option_choices(Toy, "aug") == ("original", "light", "none")
    assert option_choices(Toy, "lr") is None
    with pytest.raises(KeyError):
        option_choices(Toy, "nope")
