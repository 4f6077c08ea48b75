"""mflag command line: a thin click layer that turns options into stage configs.

Every command builds a frozen config dataclass and calls ``stages.<stage>.run(config)``; no stage
sees click. ``python cli.py ...`` and the ``mflag`` console script are the same group.
"""
from __future__ import annotations

import functools
import logging
import os
import sys

import click

from pipeline.common import MflagError

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


def user_errors(fn):
    """Print user-facing errors as one clear line (exit 2) instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MflagError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)

    return wrapper


def csv_list(value: str | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return tuple(v.strip() for v in value.split(",") if v.strip())


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", count=True, help="More log output (repeatable).")
@click.option("-q", "--quiet", count=True, help="Less log output (repeatable).")
@click.version_option(package_name="mflag")
def cli(verbose: int, quiet: int) -> None:
    """M-FLAG pre-training with a frozen, cached text encoder."""
    setup_logging(verbose, quiet)


@cli.group()
def synth() -> None:
    """Write synthetic datasets in the real datasets' formats (no data or network needed)."""


@cli.group()
def cache() -> None:
    """Inspect and verify text-embedding caches."""


# ==== synth commands (pipeline/synth) ====

# ==== prepare (stages/prepare.py) ====

# ==== embed-text and cache (stages/embed_text.py, cache/) ====

# ==== train-vision (stages/train_vision.py) ====

# ==== eval (stages/evaluate.py) ====

# ==== run / status (stages/orchestrate.py) ====


def main() -> None:
    cli(prog_name="mflag")


if __name__ == "__main__":
    main()
