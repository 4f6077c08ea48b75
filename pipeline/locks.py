"""One writer per output folder: an exclusive lock file that names its holder.

Every stage that writes an output folder takes its lock first (``output_lock`` as a context manager,
or ``hold_output_lock`` for the rest of the process), so a second run into the same folder stops at
once with one line naming the holder, instead of interleaving metrics lines or deleting the other
run's temporary files.

The lock is ``FOLDER/.mflag.lock``, opened and ``flock``-ed for as long as it is held; it records the
holder's pid, host, stage and start time for the message. The kernel drops an ``flock`` when its
process dies, so a lock file left by a killed run is stale by construction and is taken over (with a
log line naming the previous holder). Where ``flock`` is not supported (some network file systems),
the recorded pid decides: a holder on this host whose pid is gone is stale.

Work split into parts (embed-text ``--num-parts``) locks ``.mflag.lock.<scope>`` instead: parts may
run at the same time, but not alongside a whole-folder run or the same part twice. Under torchrun the
global rank 0 takes the lock and every rank learns the outcome before anyone writes, so all ranks of
a refused run stop together. A process that already holds a lock may take it again (``cli.py run``
calls several stages in one process). A folder that cannot be written (read-only storage) can still
be opened with ``allow_read_only``: the stage then only re-checks finished outputs.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime as _dt
import errno
import json
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from pipeline.common import MflagError
from pipeline.distributed import all_gather_object

log = logging.getLogger(__name__)

LOCK_NAME = ".mflag.lock"
_READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)

try:  # POSIX; elsewhere the recorded pid alone decides
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


class FolderLockedError(MflagError):
    """Another live process holds the output folder's lock; the message names it."""


@dataclass
class OutputLock:
    """A held (or, read-only, not needed) lock on ``folder``. ``writable`` is False when the folder
    cannot be written at all; the stage may then only read what is there."""

    folder: Path
    path: Path | None
    writable: bool = True
    reason: str = ""
    _held: "_Held | None" = field(default=None, repr=False)

    def require_writable(self, what: str = "this run") -> None:
        if not self.writable:
            raise MflagError(f"{self.folder}: not writable ({self.reason}); {what} has to write there. Use "
                             f"another output folder, or make this one writable")

    def release(self) -> None:
        if self._held is not None:
            _release(self._held)
            self._held = None


@dataclass
class _Held:
    key: str
    path: Path
    fd: int
    pid: int
    count: int = 1


_HELD: dict[str, _Held] = {}


def _holder_info(stage: str) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "stage": stage,
            "since": _dt.datetime.now().isoformat(timespec="seconds")}


def _describe(h: dict | None) -> str:
    if not h:
        return "another process (the lock file names none)"
    return (f"{h.get('stage', '?')} (pid {h.get('pid', '?')} on host {h.get('host', '?')}, since "
            f"{h.get('since', '?')})")


def _read(fd: int) -> dict | None:
    try:
        data = os.pread(fd, 4096, 0)
        info = json.loads(data.decode("utf-8")) if data.strip() else None
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


def _alive_here(info: dict | None) -> bool:
    """The recorded holder is a live process on this host (and not this process)."""
    if not info or info.get("host") != socket.gethostname():
        return False
    try:
        pid = int(info.get("pid"))
    except (TypeError, ValueError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    return True


def _flock(fd: int) -> bool | None:
    """True: locked; False: someone else holds it; None: flock is not supported here."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            return None
        raise


def _probe(path: Path) -> dict | None:
    """The live holder of the lock file ``path``, or None when nobody holds it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError:
        return None
    try:
        info = _read(fd)
        got = _flock(fd)
        if got is False:
            return info or {}
        if got is None:
            return info if _alive_here(info) else None
        return None  # we could lock it: nobody holds it (closing the fd drops our flock)
    finally:
        os.close(fd)


def _acquire(path: Path, stage: str) -> tuple[_Held | None, dict | None]:
    """(held lock, None) or (None, the live holder's info)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            got = _flock(fd)
            previous = _read(fd)
            if got is False:
                os.close(fd)
                return None, previous or {}
            if _alive_here(previous):
                # flock succeeded although the recorded holder lives: flock does not work on this file
                # system (or is local to each client); believe the record.
                os.close(fd)
                return None, previous
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file between our open and flock: retry
                os.close(fd)
                continue
            if previous and previous.get("pid") != os.getpid():
                log.info("%s: taking over a stale lock of %s, which is gone", path.parent, _describe(previous))
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_holder_info(stage)).encode("utf-8"), 0)
            os.fsync(fd)
            return _Held(str(path.resolve()), path, fd, os.getpid()), None
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise


def _release(held: _Held) -> None:
    held.count -= 1
    if held.count > 0 or held.pid != os.getpid():  # a forked child never releases its parent's lock
        return
    _HELD.pop(held.key, None)
    try:
        if os.fstat(held.fd).st_ino == os.stat(held.path).st_ino:
            held.path.unlink()
    except OSError:  # cannot remove it: at least leave no live pid in it
        with contextlib.suppress(OSError):
            os.ftruncate(held.fd, 0)
    with contextlib.suppress(OSError):
        os.close(held.fd)


@atexit.register
def _release_all() -> None:
    for held in list(_HELD.values()):
        held.count = 1
        _release(held)


def _prepare_folder(folder: Path) -> None:
    """Create ``folder`` (and its parents), or say in one line why it cannot be."""
    if folder.exists() and not folder.is_dir():
        raise MflagError(f"{folder}: exists and is not a folder; the output must be a folder (choose another "
                         "path or remove the file)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise MflagError(f"{folder}: a part of this path is a file, not a folder") from None
    except OSError as e:
        raise MflagError(f"{folder}: cannot create the output folder ({e.strerror})") from e


# What marks a folder as a stage's output when its config.json does not name the stage (folders written
# before config.json did): files and folders only that stage writes.
_STAGE_EVIDENCE = (("prepare", ("manifest.json", ".prepare-state")),
                   ("train-vision", ("checkpoints", "encoder.pt", "projector.pt")),
                   ("eval", ("results.json", "seeds")),
                   ("embed-text", ("index.json",)),
                   ("splits", ("split.json",)))


def folder_owner(folder: Path) -> tuple[str, str] | None:
    """``(stage, evidence)`` of the stage whose outputs ``folder`` holds, or None: the ``stage`` its
    config.json records, else the files only that stage writes (a text-cache root: a child folder with
    an index.json)."""
    import json

    cfg = folder / "config.json"
    if cfg.is_file():
        try:
            stage = json.loads(cfg.read_text(encoding="utf-8")).get("stage")
        except (OSError, ValueError, AttributeError):
            stage = None
        if isinstance(stage, str):
            return stage, f"{cfg} says stage {stage!r}"
    for stage, names in _STAGE_EVIDENCE:
        found = [n for n in names if (folder / n).exists()]
        if found:
            return stage, f"it holds {folder / found[0]}"
    with contextlib.suppress(OSError):
        for child in folder.iterdir():
            if child.is_dir() and (child / "index.json").is_file() and any(child.glob("part-*.h5")):
                return "embed-text", f"it holds the text cache {child}"
    return None


def check_owner(folder: Path, stage: str) -> None:
    """One stage per output folder: MflagError naming the owner when ``folder`` holds another stage's
    outputs (writing there would overwrite its config.json, and with it its provenance)."""
    owner = folder_owner(folder)
    if owner is not None and owner[0] != stage:
        raise MflagError(f"{folder}: holds the outputs of {owner[0]} ({owner[1]}); {stage} writes a folder of its "
                         f"own, so that neither overwrites the other's config.json: choose another --out")


def _take(folder: Path, stage: str, scope: str | None, allow_read_only: bool) -> OutputLock:
    _prepare_folder(folder)
    path = folder / (LOCK_NAME if scope is None else f"{LOCK_NAME}.{scope}")
    key = str(path.resolve())
    mine = _HELD.get(key)
    if mine is not None and mine.pid == os.getpid():  # this process holds it already...
        try:
            intact = os.fstat(mine.fd).st_ino == os.stat(path).st_ino
        except OSError:
            intact = False
        if intact:
            mine.count += 1
            return OutputLock(folder, path, _held=mine)
        # ...but its file was removed with the folder (cli.py run replacing a stale stage output)
        _HELD.pop(key, None)
        with contextlib.suppress(OSError):
            os.close(mine.fd)
    try:
        held, holder = _acquire(path, stage)
    except OSError as e:
        if e.errno not in _READ_ONLY_ERRNOS:
            raise MflagError(f"{path}: cannot create the lock file ({e.strerror})") from e
        if not allow_read_only:
            raise MflagError(f"{folder}: not writable ({e.strerror}); choose another output folder or make it "
                             "writable") from e
        log.info("%s is not writable (%s): only reading what is there", folder, e.strerror)
        return OutputLock(folder, None, writable=False, reason=e.strerror or "read-only")
    if held is None:
        raise FolderLockedError(
            f"{folder} is in use by {_describe(holder)}; two runs into one folder would overwrite each other. "
            f"Wait for it to finish, use another output folder, or, if that process is gone, remove {path}")
    _HELD[held.key] = held
    lock = OutputLock(folder, path, _held=held)
    # Parts may run side by side, but not next to a whole-folder run of the same stage.
    others = [folder / LOCK_NAME] if scope is not None else sorted(folder.glob(f"{LOCK_NAME}.*"))
    for other in others:
        live = _probe(other)
        if live is not None:
            lock.release()
            what = "the whole folder" if scope is not None else f"part {other.name[len(LOCK_NAME) + 1:]}"
            raise FolderLockedError(f"{folder}: {what} is in use by {_describe(live)}; wait for it to finish "
                                    "or use another output folder")
    if stage != "run":  # cli.py run's workdir holds every stage's folder, each owned by its stage
        try:
            check_owner(folder, stage)
        except MflagError:
            lock.release()
            raise
    return lock


def remove_stale_temps(folder: Path, subfolders: Sequence[str] = ("",)) -> int:
    """Remove ``.*.tmp`` files (``atomic_path`` temps of a killed run) in ``folder`` and ``subfolders``.
    Only call it while holding the folder's lock: then no live writer owns them."""
    n = 0
    for sub in subfolders:
        d = folder / sub if sub else folder
        if not d.is_dir():
            continue
        for tmp in d.glob(".*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                size = tmp.stat().st_size
                tmp.unlink()
                n += 1
                log.info("removed %s (%.1f MB), left by an interrupted run", tmp, size / 2**20)
    return n


def _take_dist(folder: Path, stage: str, scope: str | None, allow_read_only: bool, dist) -> OutputLock:
    """Rank 0 takes the lock; every rank learns the outcome before anything is written."""
    if dist is None or not getattr(dist, "enabled", False):
        return _take(folder, stage, scope, allow_read_only)

    lock, mine = None, None
    if dist.is_main:
        try:
            lock = _take(folder, stage, scope, allow_read_only)
            mine = (None, lock.writable, lock.reason)
        except MflagError as e:
            mine = (type(e).__name__, str(e))
    outcome = all_gather_object(mine, dist)[0]  # rank 0's outcome, on every rank
    if outcome[0] is not None:
        cls = FolderLockedError if outcome[0] == "FolderLockedError" else MflagError
        raise cls(outcome[1])
    if lock is None:  # ranks > 0: rank 0 holds the lock for the whole job
        lock = OutputLock(folder, None, writable=outcome[1], reason=outcome[2])
    return lock


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, stage: str, *, dist=None, scope: str | None = None,
                allow_read_only: bool = False, clean_temps: Sequence[str] = ()) -> Iterator[OutputLock]:
    """Hold ``folder``'s lock for the ``with`` block (see the module docstring).

    ``stage`` names this run in the lock file (and so in the other run's error). ``dist`` (a
    ``DistInfo``): under torchrun, rank 0 locks for all. ``clean_temps``: subfolders (``""`` for the
    folder itself) whose ``.*.tmp`` leftovers of a killed run are removed once the lock is held.
    Raises ``FolderLockedError`` naming the live holder, or ``MflagError`` when the folder is a file or
    cannot be created (or is read-only without ``allow_read_only``).
    """
    lock = _take_dist(Path(folder), stage, scope, allow_read_only, dist)
    try:
        if clean_temps and lock.path is not None:
            remove_stale_temps(Path(folder), clean_temps)
        yield lock
    finally:
        lock.release()


def hold_output_lock(folder: str | os.PathLike, stage: str, **kwargs) -> OutputLock:
    """Take ``folder``'s lock for the rest of this process (released at exit), for a stage whose body
    should stay un-indented; taking it again in the same process is allowed."""
    lock = _take_dist(Path(folder), stage, kwargs.pop("scope", None), kwargs.pop("allow_read_only", False),
                      kwargs.pop("dist", None))
    if kwargs.get("clean_temps") and lock.path is not None:
        remove_stale_temps(Path(folder), kwargs["clean_temps"])
    return lock


def check_not_locked(folder: str | os.PathLike) -> None:
    """Raise ``FolderLockedError`` when a live process other than this one holds ``folder``'s lock
    (before removing a folder that another run may be writing)."""
    folder = Path(folder)
    path = folder / LOCK_NAME
    key = str(path.resolve()) if path.exists() else None
    if key is not None and key in _HELD and _HELD[key].pid == os.getpid():
        return
    live = _probe(path) if path.exists() else None
    if live is not None:
        raise FolderLockedError(f"{folder} is in use by {_describe(live)}; it cannot be replaced while that "
                                f"run writes to it")
