"""Stopping a training run cleanly on SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C).

A scheduler sends SIGTERM and, after a grace period, SIGKILL (SLURM: ``--signal=TERM@120`` asks for the
TERM 120 s before the end). :class:`StopSignals` turns either signal into a request the training loop
reads between steps: it finishes the step in progress, writes a checkpoint, and the command prints one
line and exits with 128 + the signal number (143 for SIGTERM, 130 for SIGINT), as a shell reports a
process killed by it, so a requeue script can tell a preemption from a failure. A second Ctrl-C while
the checkpoint is being written ends the process at once (the previous checkpoint is still complete:
they are written atomically); a repeated SIGTERM does not (srun and torchrun may both deliver one).
DataLoader workers ignore both signals (:func:`ignore_in_worker`): a terminal's Ctrl-C reaches the
whole process group, and a worker that died of it would fail the batch being read instead of letting
the step finish.
"""
from __future__ import annotations

import contextlib
import signal
import threading

from pipeline.common import MflagError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(MflagError):
    """The run stopped on a signal after saving a checkpoint; the CLI prints the message alone and exits
    with :attr:`exit_code` (128 + the signal number)."""

    def __init__(self, signum: int, step: int, saved: bool = True):
        self.signum, self.step = int(signum), int(step)
        name = signal.Signals(self.signum).name
        what = "checkpoint saved" if saved else "nothing to save yet"
        super().__init__(f"stopped by {name} at step {step}; {what}, rerun the same command to resume")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """Context manager: while inside, SIGTERM and SIGINT only set :attr:`signum` (the first one
    received); the previous handlers come back on exit. Outside the main thread (where Python cannot
    install handlers) it does nothing."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        # Ctrl-C twice: stop now, without waiting for the checkpoint. Not SIGTERM: under srun + torchrun
        # a rank may get it twice (from the step and from the agent), and SIGKILL follows anyway.
        if signum == signal.SIGINT and self.signum == signum:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.signum = self.signum or signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


class Interrupted(KeyboardInterrupt):
    """SIGTERM outside a training loop: raised where the program stands, like Ctrl-C's KeyboardInterrupt
    (temp files are removed on the way out: ``atomic_path``), so the CLI can say so in one line."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = int(signum)


@contextlib.contextmanager
def sigterm_interrupts():
    """While inside (main thread only), SIGTERM raises :class:`Interrupted` instead of ending the process
    without a word; training loops take both signals over with :class:`StopSignals`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def ignore_in_worker(_worker_id: int | None = None) -> None:
    """DataLoader ``worker_init_fn``: the main process alone decides when to stop (module docstring)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def pool_worker_init() -> None:
    """``multiprocessing.Pool`` initializer: the main process alone decides when to stop (SIGINT ignored),
    and the SIGTERM with which ``Pool.terminate()`` ends its workers ends them quietly (the default action),
    rather than through the parent's inherited handler, which printed a traceback per worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
