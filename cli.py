"""mflag command line: a thin click layer that turns options into stage configs.

Every command builds a frozen config dataclass and calls ``stages.<stage>.run(config)``; no stage
sees click. ``python cli.py ...`` and the ``mflag`` console script are the same group.
"""
from __future__ import annotations

import dataclasses
import errno
import functools
import importlib
import inspect
import logging
import os
import re
import sys
import types
import typing
from typing import Any, Callable

import click

from pipeline.common import ConfigError, MflagError, atomic_open
from pipeline.corpora import CORPORA
from pipeline.options import (
    Option,
    default_text,
    is_pairs,
    markdown_table,
    option_names,
    options_of,
    unwrap_optional,
)
from pipeline.preempt import Stopped, sigterm_interrupts

# The stage modules import torch (about 3 s), the synthetic writers, dataset readers and cache tools numpy or
# h5py (~0.25 s together); each command imports what it needs when it runs ("lazy" below), so `mflag --help`
# starts in ~0.1 s and `mflag synth ...` / `mflag cache info` without torch.
log = logging.getLogger("mflag")


def setup_logging(verbose: int, quiet: int) -> None:
    """The one logging set-up of the program; only rank 0 logs at INFO under torchrun."""
    level = logging.INFO - 10 * verbose + 10 * quiet
    if int(os.environ.get("RANK", "0")) != 0:
        level = max(level, logging.WARNING)
    logging.basicConfig(
        level=max(level, logging.DEBUG),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("PIL", "matplotlib", "h5py", "urllib3", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, level))


def _as_option(message: str) -> str:
    """Config errors start with the field name (``text_cache: required ...``); on the command line the
    user typed ``--text-cache``, so name the option of the running command instead (a stage command's
    parameters are generated from its config fields and carry the field names)."""
    ctx = click.get_current_context(silent=True)
    m = re.match(r"([a-z][a-z0-9_]*): ", message)
    if ctx is None or m is None:
        return message
    for param in ctx.command.params:
        if param.name == m.group(1) and isinstance(param, click.Option):
            long = [o for o in param.opts if o.startswith("--")]
            return (long[0] if long else param.opts[0]) + message[m.end(1):]
    return message


# Environment failures a stage cannot foresee everywhere (storage made read-only or full mid-run):
# one line naming the file rather than a traceback.
_USER_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


def user_errors(fn):
    """Print user-facing errors as one clear line (exit 2) instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import signal


        try:
            with sigterm_interrupts():
                return fn(*args, **kwargs)
        except Stopped as e:  # a clean stop on SIGTERM/SIGINT: not an error, but not a finished run
            if int(os.environ.get("RANK", "0")) == 0:
                click.echo(str(e), err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM outside a training loop: one line, not "Aborted!"
            signum = getattr(e, "signum", signal.SIGINT)
            click.echo(f"error: stopped by {signal.Signals(signum).name}; outputs are written atomically, so "
                       "nothing half-written is left: rerun the same command to resume (finished parts are kept)",
                       err=True)
            sys.exit(128 + signum)
        except MflagError as e:
            # Only config errors lead with a field name; others may lead with a path the user typed.
            click.echo(f"error: {_as_option(str(e)) if isinstance(e, ConfigError) else e}", err=True)
            sys.exit(2)
        except OSError as e:
            if e.errno not in _USER_ERRNOS or not e.filename:
                raise
            click.echo(f"error: {e.filename}: {e.strerror}", err=True)
            sys.exit(2)

    return wrapper


# --------------------------------------------------------------------------- click options from dataclasses
# One click option per `pipeline.options.option` field of a config dataclass: the only place that turns
# the stage configs into click objects (pipeline/ and stages/ never import click).
def _split_csv(cast: Callable[[str], Any]) -> Callable:
    what = {int: "integers", float: "numbers"}.get(cast, "values")

    def convert(ctx, param, value):
        if value is None:
            return None
        if isinstance(value, (tuple, list)):
            return tuple(value)
        try:
            return tuple(cast(v.strip()) for v in str(value).split(",") if v.strip())
        except ValueError:
            raise click.BadParameter(f"expected comma-separated {what}, got {value!r}") from None
    return convert


def _key_values(ctx, param, values):
    out = []
    for p in values or ():
        if "=" not in p:
            raise click.BadParameter(f"expected KEY=VALUE, got {p!r}")
        k, v = p.split("=", 1)
        # kept as typed: the reader's option types decide (pipeline.downstream.datasets.registry.check_options)
        out.append((k.strip().replace("-", "_"), v.strip()))
    return tuple(out)


def _shown_range(kind, opt: Option):
    """A click number type that shows the bounds in ``--help`` but leaves checking them to
    :func:`check_fields` (one message for the command line and the YAML)."""
    class ShownRange(kind):
        def convert(self, value, param, ctx):
            return (click.INT if kind is click.IntRange else click.FLOAT).convert(value, param, ctx)

    return ShownRange(min=opt.min, max=opt.max, min_open=opt.min_open, max_open=opt.max_open)


def _int_or_text():
    class IntOrText(click.ParamType):
        """``int | str`` (``--unfreeze-last 2`` or ``all``): a whole number when the text is one."""
        name = "integer|text"

        def convert(self, value, param, ctx):
            if isinstance(value, int):
                return value
            text = str(value).strip()
            return int(text) if text.lstrip("-").isdigit() else text

    return IntOrText()


def _live_choice(opt: Option):
    """A click.Choice whose values are ``opt.allowed()`` at each use (parsing, ``--help``), not when the
    command's options were built: a stage command builds them once per process."""

    class LiveChoice(click.Choice):
        def __init__(self) -> None:  # click.Choice's own __init__ would store a fixed tuple
            self.case_sensitive = True

        @property
        def choices(self) -> tuple[str, ...]:  # type: ignore[override]
            return tuple(str(c) for c in opt.allowed() or ())

    return LiveChoice()


def _scalar_type(base: Any, opt: Option):
    if typing.get_origin(base) in (typing.Union, types.UnionType) and set(typing.get_args(base)) == {int, str}:
        return _int_or_text()
    if callable(opt.choices):
        return _live_choice(opt)
    if opt.choices is not None:
        return click.Choice([str(c) for c in opt.choices])
    if opt.exists is not None:
        return click.Path(exists=True, file_okay=opt.exists != "dir", dir_okay=opt.exists != "file")
    if opt.path is not None:
        return click.Path(file_okay=opt.path != "dir", dir_okay=opt.path != "file")
    bounded = opt.min is not None or opt.max is not None
    if base is int:
        return _shown_range(click.IntRange, opt) if bounded else int
    if base is float:
        return _shown_range(click.FloatRange, opt) if bounded else float
    return str


def click_params(cls) -> list:
    """One click option per command-line :func:`option` field of ``cls``, in field order; the
    parameter name is the field name, so the parsed values are ``cls``'s keyword arguments."""
    params = []
    for f, opt, hint in options_of(cls):
        if not opt.cli:
            continue
        base, _ = unwrap_optional(hint)
        names = option_names(f, opt)
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        kw: dict[str, Any] = {"help": opt.help, "metavar": opt.metavar}
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory
        else:
            default = None
        decl = list(names)
        if base is bool:
            if opt.negatable:
                decl = [f"{names[0]}/--no-{names[0][2:]}"]
            kw.update(is_flag=True, default=bool(default), show_default=opt.negatable)
        elif is_pairs(base):
            kw.update(multiple=True, callback=_key_values, metavar=opt.metavar or "KEY=VALUE")
        elif typing.get_origin(base) is tuple and opt.repeat:
            elem = typing.get_args(base)[0]
            kw.update(multiple=True, type=_scalar_type(elem, opt), required=required)
            if not required and default not in (None, ()):
                kw.update(default=default, show_default=opt.show_default or True)
        elif typing.get_origin(base) is tuple:
            elem = typing.get_args(base)[0]
            cast = elem if elem in (int, float) else str
            kw.update(type=str, callback=_split_csv(cast), required=required)
            if not required:
                kw["default"] = default_text(default) if default not in (None, ()) else None
            if default not in (None, ()):
                kw["show_default"] = opt.show_default or True
        else:
            kw.update(type=_scalar_type(base, opt), required=required)
            if not required:  # click (8.3+) takes an explicit default=None as a value that satisfies required
                kw["default"] = default
            if opt.show_default is not None:
                kw["show_default"] = opt.show_default
            elif default is not None and not callable(default):
                kw["show_default"] = True
        params.append(click.Option([*decl, f.name], **kw))
    return params


def click_options(cls) -> Callable[[Callable], Callable]:
    """A decorator adding :func:`click_params` of ``cls`` to a click command function."""
    def apply(fn: Callable) -> Callable:
        params = click_params(cls)
        # click's decorators collect parameters in reverse, for the command to restore their order
        fn.__click_params__ = getattr(fn, "__click_params__", []) + list(reversed(params))  # type: ignore[attr-defined]
        return fn

    return apply


class StageCommand(click.Command):
    """A stage's command: its options are generated from the stage's config dataclass
    (:func:`click_params`), and the callback gets the config built from the parsed values.

    ``config`` is ``"module:Class"`` (or the class); the stage module is imported when the options are
    first needed (parsing or ``--help``), so that ``mflag cache info`` or ``mflag --help`` do not import
    torch. A field added to the dataclass is an option of the command with no change here.
    Errors of the config (and of the stage) are one ``error:`` line naming the option (:func:`user_errors`).
    """

    def __init__(self, name: str | None, *, config: str | type, callback, **kwargs) -> None:
        self.config = config

        def build_and_call(**values):
            return callback(self.config_class()(**values))

        super().__init__(name, callback=user_errors(build_and_call), **kwargs)
        self._generated = False

    def config_class(self) -> type:
        if isinstance(self.config, str):
            module, _, name = self.config.partition(":")
            self.config = getattr(importlib.import_module(module), name)
        return self.config

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if not self._generated:
            self.params[:0] = click_params(self.config_class())
            self._generated = True
        return super().get_params(ctx)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", count=True, help="More log output (repeatable).")
@click.option("-q", "--quiet", count=True, help="Less log output (repeatable).")
@click.version_option(package_name="mflag")
def cli(verbose: int, quiet: int) -> None:
    """M-FLAG pre-training with a frozen, cached text encoder."""
    setup_logging(verbose, quiet)


class SynthGroup(click.Group):
    """``synth``: the commands declared below (mimic, openi) plus one per downstream dataset of the dataset
    registry (``pipeline/downstream/datasets/registry.py``), built when listed or invoked so that a dataset
    registered there with a writer is a command with no change here."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        from pipeline.downstream.datasets.registry import synth_names  # lazy: numpy/h5py, kept out of start-up

        return sorted({*super().list_commands(ctx), *synth_names()})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        from pipeline.downstream.datasets.registry import (  # lazy: numpy/h5py, kept out of start-up
            DATASETS,
            synth_names,
        )

        cmd = super().get_command(ctx, name)
        if cmd is None and name in synth_names():
            cmd = _downstream_command(name, DATASETS[name])
        return cmd


@cli.group(cls=SynthGroup)
def synth() -> None:
    """Write synthetic datasets in the real datasets' formats (no data or network needed)."""


@cli.group()
def cache() -> None:
    """Inspect and verify text-embedding caches."""


# ==== synth commands (pipeline/synth) ====
# Synth is a tool utility, not a pipeline stage: the commands call pipeline.synth directly.
def _echo_summary(summary: dict) -> None:
    import json

    click.echo(json.dumps(summary, indent=2, sort_keys=True))


@synth.command("mimic")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output root.")
@click.option("--n-studies", "--n", "n_studies", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Number of studies (1-3 images each).")
@click.option("--seed", type=int, default=0, show_default=True, help="Everything drawn follows from it.")
@click.option("--image-size", type=click.IntRange(min=32), default=256, show_default=True,
              help="Shorter image side in pixels (real MIMIC is 2000-3000).")
@click.option("--zip-reports", is_flag=True, help="Write mimic-cxr-reports.zip instead of .txt files.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Drawing processes (output does not depend on it).")
@user_errors
def synth_mimic(out_dir, n_studies, seed, image_size, zip_reports, workers):
    """A MIMIC-CXR-JPG 2.0.0 tree with reports, CSVs and chest phantoms."""

    from pipeline.synth.mimic import write_mimic  # lazy: numpy/h5py, kept out of start-up

    _echo_summary(write_mimic(out_dir, n_studies, seed, image_size=image_size, zip_reports=zip_reports,
                              workers=workers))


def _downstream_command(name: str, entry) -> click.Command:
    """``synth <name>`` for a dataset registry entry: --out, --n, --seed, --image-size (``entry.synth_size``),
    --workers and the writer's parameters named in ``entry.synth_options`` (defaults from its signature)."""
    writer = entry.synth_writer()
    defaults = {p.name: p.default for p in inspect.signature(writer).parameters.values()}

    @user_errors
    def command(out_dir, n, seed, image_size, **kwargs):
        _echo_summary(writer(out_dir, n, seed, image_size=image_size, **kwargs))

    params = [
        click.Option(["--out", "out_dir"], required=True, type=click.Path(file_okay=False),
                     help="Output folder: the dataset root to pass to `eval --root`."),
        click.Option(["--n"], type=click.IntRange(min=1), default=200, show_default=True, help="Number of images."),
        click.Option(["--seed"], type=int, default=0, show_default=True, help="Everything drawn follows from it."),
        click.Option(["--image-size"], type=click.IntRange(min=32), default=entry.synth_size, show_default=True,
                     help="Image side in pixels."),
        click.Option(["--workers"], type=click.IntRange(min=1), default=1, show_default=True,
                     help="Drawing processes (output does not depend on it).")]
    for opt in entry.synth_options:
        default = defaults[opt.param]
        kind = (click.Choice(list(opt.choices)) if opt.choices else
                click.FloatRange(*opt.bounds) if opt.bounds else type(default))
        params.append(click.Option(["--" + opt.param.replace("_", "-"), opt.param], type=kind, default=default,
                                   show_default=True, help=opt.help))
    return click.Command(name, callback=command, params=params,
                         help=f"The {name} dataset in its published layout, labels from phantom geometry.")


@synth.command("openi")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--n-reports", "--n", "n_reports", type=click.IntRange(min=1), default=200, show_default=True,
              help="Number of reports (1-3 images each).")
@click.option("--seed", type=int, default=0, show_default=True, help="Everything drawn follows from it.")
@click.option("--image-size", type=click.IntRange(min=32), default=256, show_default=True,
              help="Shorter image side in pixels.")
@user_errors
def synth_openi(out_dir, n_reports, seed, image_size):
    """An IU X-ray / OpenI corpus: NLMCXR_reports.tgz, images/<id>.png, indiana_projections.csv."""

    from pipeline.synth.openi import write_openi  # lazy: numpy/h5py, kept out of start-up

    _echo_summary(write_openi(out_dir, n_reports, seed, image_size=image_size))



# ==== prepare (stages/prepare.py) ====
def _prepare_corpus(cfg) -> None:
    from stages import prepare as stage  # lazy: imports torch

    res = stage.run(cfg)
    for split, info in res.splits.items():
        click.echo(f"{split}: {info['count']} images in {len(info['shards'])} shards")
    click.echo(f"{res.n_studies} studies in {res.out / 'reports.jsonl'}; "
               f"{res.shards_written} shards written, {res.shards_skipped} reused; "
               f"manifest {res.out / 'manifest.json'}")


class CorpusGroup(click.Group):
    """``prepare <corpus>``: one stage command per entry of the corpus registry (``pipeline.corpora.CORPORA``),
    built when it is listed or called, so a corpus added to the registry is a command with no change here."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(CORPORA)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        c = CORPORA.get(name)
        if c is None:
            return None
        return StageCommand(name, config=c.config_path, callback=_prepare_corpus, help=c.summary)


@cli.group(cls=CorpusGroup)
def prepare() -> None:
    """Turn a raw dataset into webdataset shards and a reports file for embed-text."""


# ==== embed-text and cache (stages/embed_text.py, cache/) ====

@cli.command("embed-text", cls=StageCommand, config="stages.embed_text:EmbedTextConfig")
def embed_text(cfg) -> None:
    """Embed every report once with the frozen text encoder into an HDF5 cache."""
    from stages.embed_text import run  # lazy: imports torch

    result = run(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        state = "complete" if result.complete else "partial (other parts pending)"
        click.echo(f"{result.cache_dir}  [{state}: {result.count} reports, dim {result.dim}, "
                   f"{result.shards_written} shards written, {result.shards_skipped} skipped]")


@cache.command("info")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@user_errors
def cache_info_cmd(path: str, as_json: bool) -> None:
    """Attributes, counts and truncation stats of a text cache (PATH: cache folder or its parent)."""
    import json

    from cache.verify import cache_info  # lazy: numpy/h5py, kept out of start-up

    info = cache_info(path)
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    click.echo(f"path: {info['path']}")
    click.echo(f"count: {info['count']}  dim: {info['dim']}  shards: {len(info['shards'])}  "
               f"bytes: {info['bytes']}")
    for name, value in sorted(info["attrs"].items()):
        click.echo(f"{name}: {json.dumps(value, sort_keys=True) if isinstance(value, dict) else value}")


@cache.command("verify")
@click.argument("path")
@user_errors
def cache_verify_cmd(path: str) -> None:
    """Check every shard of a text cache: present, readable, counts, dims, hashes, attributes."""

    from cache.verify import verify_cache  # lazy: numpy/h5py, kept out of start-up

    report = verify_cache(path)
    click.echo(f"ok: {report['path']} ({report['count']} embeddings, dim {report['dim']}, "
               f"{report['shards']} shards)")


# ==== train-vision (stages/train_vision.py) ====

@cli.command("train-vision", cls=StageCommand, config="stages.train_vision:TrainVisionConfig")
def train_vision(cfg) -> None:
    """Pre-train the ResNet50 image encoder against cached report embeddings (M-FLAG)."""
    from stages.train_vision import run  # lazy: imports torch

    summary = run(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        probe = summary.get("final_probe") or {}
        click.echo(f"{cfg.out}  [{summary['steps']} steps; centred effective rank of zv "
                   f"{probe.get('zv_effective_rank_centred', float('nan')):.2f} (N={probe.get('n_images', 0)}, "
                   f"D={probe.get('zv_dim', 0)}), R@1 {probe.get('retrieval_R@1', float('nan')):.2f}]")


# ==== eval (stages/evaluate.py) ====
@cli.command("eval", cls=StageCommand, config="stages.evaluate:EvalConfig")
def eval_cmd(cfg) -> None:
    """Train and test a downstream head on an encoder (cls, seg, det), or score images against texts through
    a pre-training run's projector and text head (zeroshot, retrieval: no training); writes
    OUT/results.json and a results.md row."""
    from stages.evaluate import run  # lazy: imports torch

    res = run(cfg)
    p = res["primary_metric"]
    s = res["summary"].get(p, {})
    mean = "n/a" if s.get("mean") is None else f"{s['mean']:.4f} ± {s['std']:.4f}"
    what = (f"{cfg.dataset} ({cfg.protocol}) init={cfg.init} fraction={cfg.fraction}" if res.get("fraction_sizes")
            else f"{res['dataset']} init={cfg.init}")
    click.echo(f"{cfg.task} {what}: test {p} {mean} over seeds {','.join(map(str, res['seeds']))} -> "
               f"{cfg.out}/results.json")


# ==== splits (stages/splits.py) ====
@cli.command("splits", cls=StageCommand, config="stages.splits:SplitsConfig")
def splits_cmd(cfg) -> None:
    """Write a dataset's train/val/test and label-fraction id lists from its label files alone."""
    from stages.splits import run  # lazy: imports torch

    res = run(cfg)
    counts = res.summary["counts"]
    click.echo(f"{cfg.dataset} {cfg.task} ({cfg.protocol}): train {counts['train']}, val {counts['val']}, "
               f"test {counts['test']} images -> {res.out}/split.json")
    for kind, pairs in (res.summary.get("leaks") or {}).items():
        for pair, n in pairs.items():
            if n:
                click.echo(f"  {n} {kind} in both {pair.replace('/', ' and ')}")
    for f in res.fraction_files:
        click.echo(f"  {f['file']}: {f['count']} images")


# ==== run / status (stages/orchestrate.py) ====
@cli.command("run")
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Pipeline YAML (see configs/demo.yaml, configs/mimic.yaml).")
@click.option("--force", "force", multiple=True, metavar="STAGE",
              help="Rerun STAGE (a name, or its part before ':' or '-': prepare, embed, train, train:mflag, eval, ...) "
                   "and what depends on it. Repeatable.")
@click.option("--from", "from_stage", metavar="STAGE", help="Rerun STAGE and every stage after it.")
@click.option("--workdir", type=click.Path(file_okay=False), help="Override the YAML's workdir.")
@user_errors
def run_cmd(config_path, force, from_stage, workdir) -> None:
    """Run every stage of the pipeline in order, skipping stages whose outputs are up to date."""
    from stages import orchestrate  # lazy: imports torch

    cfg = orchestrate.RunConfig(config=config_path, force=tuple(force), from_stage=from_stage, workdir=workdir)
    res = orchestrate.run(cfg)
    ran = [s for s in res.steps if s["action"] == "ran"]
    click.echo(f"{len(ran)} stage(s) ran, {len(res.steps) - len(ran)} up to date; "
               f"total {sum(s['seconds'] for s in ran):.0f} s")
    for s in res.steps:
        click.echo(f"  {s['stage']:<40} {s['action']:<8} {s['seconds']:>7.1f} s")
    report = res.workdir / "report" / "results.md"
    if report.is_file():
        click.echo("")
        click.echo(report.read_text(encoding="utf-8"))
        click.echo(f"report: {report}")


@cli.command("status")
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Pipeline YAML, as given to `run`.")
@click.option("--force", "force", multiple=True, metavar="STAGE", help="As for `run`: show what it would rerun.")
@click.option("--from", "from_stage", metavar="STAGE", help="As for `run`: show what it would rerun.")
@click.option("--workdir", type=click.Path(file_okay=False), help="Override the YAML's workdir.")
@user_errors
def status_cmd(config_path, force, from_stage, workdir) -> None:
    """Show each stage of a pipeline as fresh, stale, missing or forced, and why (what `run` would do)."""
    from stages import orchestrate  # lazy: imports torch

    cfg = orchestrate.RunConfig(config=config_path, force=tuple(force), from_stage=from_stage, workdir=workdir)
    for st in orchestrate.status(cfg):
        click.echo(f"{st.name:<40} {st.state:<8} {st.reason}")


# ==== docs/OPTIONS.md (generated from the stage configs) ====
OPTIONS_DOC = "docs/OPTIONS.md"


def stage_commands() -> dict[str, StageCommand]:
    """Every stage command by its full name (``prepare mimic``, ``eval``, ...), in the order of ``--help``."""
    found: dict[str, StageCommand] = {}

    def walk(group: click.Group, prefix: str) -> None:
        for name in group.list_commands(click.Context(group)):
            cmd = group.get_command(click.Context(group), name)
            if isinstance(cmd, click.Group):
                walk(cmd, f"{prefix}{name} ")
            elif isinstance(cmd, StageCommand):
                found[prefix + name] = cmd

    walk(cli, "")
    return found


def options_markdown() -> str:
    """The text of docs/OPTIONS.md: one table per stage command, from its config dataclass."""

    parts = ["# Options of the stage commands", "",
             "Generated from the stage config dataclasses (`pipeline/options.py`) by "
             "`python cli.py options-doc --write`; a test fails when this file and the code disagree, so edit the "
             "dataclass field, not this file. In a pipeline YAML (`cli.py run`) an option is written as its field "
             "name: the option without `--`, `-` replaced by `_` (where it differs, the table names it); "
             "`dataset_options` is a mapping there. Bounds are checked once, by the dataclass, with the same "
             "message on the command line and in the YAML.", ""]
    for name, cmd in stage_commands().items():
        parts.append(markdown_table(cmd.config_class(), f"mflag {name}"))
    return "\n".join(parts)


@cli.command("options-doc", hidden=True)
@click.option("--write", is_flag=True, help=f"Write {OPTIONS_DOC} (beside cli.py) instead of printing it.")
def options_doc(write: bool) -> None:
    """Print (or write) docs/OPTIONS.md, generated from the stage config dataclasses."""
    text = options_markdown()
    if not write:
        click.echo(text, nl=False)
        return

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), OPTIONS_DOC)
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    click.echo(path)


def main() -> None:
    cli(prog_name="mflag")


if __name__ == "__main__":
    main()
