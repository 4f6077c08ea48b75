"""A tiny stage graph with fingerprinted outputs, for `cli.py run` and `cli.py status`.

Each node has a name, the names of the nodes it depends on, its parameters (JSON-able), its inputs
from outside the pipeline (the output format version of its code, and a content signature of each
external file or folder it reads: ``path_signature``) and an output folder. Its fingerprint hashes
these with the fingerprints of its dependencies, so changing one option or replacing one input makes
that node and everything downstream stale, and nothing upstream. A node that
finished writes ``<folder>.stage.json`` beside its folder (atomically, last; the folder itself
belongs to the stage); a node without one is missing.
"""
from __future__ import annotations

import dataclasses
import hashlib
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from pipeline import __version__
from pipeline.common import MflagError, fingerprint, read_json, write_json
from pipeline.locks import check_not_locked

# Above this many entries at the top of a folder, the rest count by name and size only.
_SAMPLED_ENTRIES = 64
_SAMPLE_BYTES = 1 << 20


def _file_signature(path: Path, sample: bool = True) -> str:
    """Size plus the first and last MiB of the file: cheap, and it moves when the content does (a zip's
    or checkpoint's index sits at one end) but not when the file is copied or touched."""
    size = path.stat().st_size
    if not sample:
        return f"{size}"
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        h.update(fh.read(_SAMPLE_BYTES))
        if size > 2 * _SAMPLE_BYTES:
            fh.seek(size - _SAMPLE_BYTES)
        h.update(fh.read(_SAMPLE_BYTES))
    return f"{size}:{h.hexdigest()[:16]}"


def path_signature(path: str | Path) -> str:
    """A content signature of an input file or folder (a folder: its top-level entries), or
    ``"missing"``. Modification times are left out, so copying a dataset does not rerun anything."""
    p = Path(path).expanduser()
    try:
        if p.is_file():
            return _file_signature(p)
        if p.is_dir():
            entries = sorted(c for c in p.iterdir() if not c.name.startswith("."))
            return fingerprint([[c.name, _file_signature(c, i < _SAMPLED_ENTRIES) if c.is_file() else "dir"]
                                for i, c in enumerate(entries)])
    except OSError as e:
        return f"unreadable: {e.strerror}"
    return "missing"


def record_path(node: "Node") -> Path:
    """Where a finished node's record lives: beside its folder, so the stage owns the folder."""
    return node.out_dir.with_name(node.out_dir.name + ".stage.json")


def pending_path(node: "Node") -> Path:
    return node.out_dir.with_name(node.out_dir.name + ".pending.json")


@dataclasses.dataclass
class Node:
    name: str
    out_dir: Path
    params: dict[str, Any]
    deps: tuple[str, ...] = ()
    run: Callable[["Node", dict[str, "Node"]], Any] | None = None
    fingerprint: str = ""
    # what the node reads from outside the pipeline: {"format": n, "<param>": path_signature, ...}
    inputs: dict[str, Any] = dataclasses.field(default_factory=dict)
    # a fresh node's outputs checked as their readers check them: None when intact, else why not
    verify: Callable[["Node"], str | None] | None = None


@dataclasses.dataclass(frozen=True)
class NodeStatus:
    name: str
    state: str  # fresh | stale | missing
    reason: str
    fingerprint: str


def resolve_fingerprints(nodes: list[Node]) -> dict[str, Node]:
    """Compute fingerprints in dependency order; the node list must already be topologically sorted."""
    by_name: dict[str, Node] = {}
    for node in nodes:
        missing = [d for d in node.deps if d not in by_name]
        if missing:
            raise MflagError(f"stage {node.name!r} depends on {missing}, which come later or do not exist")
        node.fingerprint = fingerprint({
            "stage": node.name,
            "params": node.params,
            "deps": {d: by_name[d].fingerprint for d in node.deps},
            "mflag_version": __version__,
            **({"inputs": node.inputs} if node.inputs else {}),
        })
        by_name[node.name] = node
    return by_name


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [prefix.rstrip(".") or "(value)"]


def node_status(node: Node, by_name: dict[str, Node]) -> NodeStatus:
    path = record_path(node)
    if not path.is_file():
        return NodeStatus(node.name, "missing", "never completed", node.fingerprint)
    record = read_json(path)
    if record.get("fingerprint") == node.fingerprint:
        damaged = node.verify(node) if node.verify is not None else None
        if damaged:
            return NodeStatus(node.name, "stale", f"outputs damaged: {damaged}", node.fingerprint)
        return NodeStatus(node.name, "fresh", "up to date", node.fingerprint)
    reasons = []
    changed = _changed_keys(record.get("params", {}), node.params)
    if changed:
        reasons.append("options changed: " + ", ".join(changed[:6]) + (" ..." if len(changed) > 6 else ""))
    for key in _changed_keys(record.get("inputs", {}), node.inputs):
        reasons.append("code output format changed" if key == "format" else f"input {key} changed")
    old_deps = record.get("deps", {})
    for dep in node.deps:
        if old_deps.get(dep) != by_name[dep].fingerprint:
            reasons.append(f"upstream {dep} changed")
    if record.get("mflag_version") != __version__:
        reasons.append(f"made by mflag {record.get('mflag_version')}")
    return NodeStatus(node.name, "stale", "; ".join(reasons) or "fingerprint differs", node.fingerprint)


def plan(nodes: list[Node], force: tuple[str, ...] = (), from_stage: str | None = None
         ) -> tuple[dict[str, Node], list[tuple[Node, NodeStatus, bool]]]:
    """Decide which nodes run: stale, missing, forced, at/after ``from_stage``, or downstream of a rerun.

    Returns the nodes by name and ``(node, status, will_run)`` in execution order.
    """
    by_name = resolve_fingerprints(nodes)

    def matches(node_name: str, name: str) -> bool:
        # a whole name, or its leading part before ':' or '-' (train -> train:*, synth -> synth-mimic and
        # synth:*, embed -> embed-text)
        return node_name == name or node_name.startswith((name + ":", name + "-"))

    for name in (*force, *( [from_stage] if from_stage else [])):
        if not any(matches(n, name) for n in by_name):
            raise MflagError(f"unknown stage {name!r}; stages are: {', '.join(by_name)}")

    rerun: set[str] = set()
    reached_from = from_stage is None
    out = []
    for node in nodes:
        status = node_status(node, by_name)
        if from_stage and matches(node.name, from_stage):
            reached_from = True
        will = (
            status.state != "fresh"
            or any(matches(node.name, f) for f in force)
            or (from_stage is not None and reached_from)
            or any(d in rerun for d in node.deps)
        )
        if will:
            rerun.add(node.name)
        out.append((node, status, will))
    return by_name, out


def explain(nodes: list[Node], force: tuple[str, ...] = (), from_stage: str | None = None) -> list[NodeStatus]:
    """Each node's status as :func:`execute` with the same ``force``/``from_stage`` would act on it: a
    node whose own record matches but that runs because something upstream runs is "stale", naming the
    first such upstream node; one that runs only because ``force``/``from_stage`` names it is "forced"."""
    _, steps = plan(nodes, force, from_stage)
    out, rerun = [], {}
    for node, st, will in steps:
        if will and st.state == "fresh":
            up = next((d for d in node.deps if d in rerun), None)
            if up is not None:
                st = NodeStatus(node.name, "stale", f"upstream {up} is {rerun[up]}", st.fingerprint)
            else:
                how = [f"--force {' '.join(force)}"] if force else []
                how += [f"--from {from_stage}"] if from_stage else []
                st = NodeStatus(node.name, "forced", " ".join(how), st.fingerprint)
        if will:
            rerun[node.name] = st.state
        out.append(st)
    return out


def execute(nodes: list[Node], force: tuple[str, ...] = (), from_stage: str | None = None,
            log=None) -> list[dict[str, Any]]:
    """Run what ``plan`` says must run, in order; record each completion in its stage.json."""
    by_name, steps = plan(nodes, force, from_stage)
    summary = []
    n_run = sum(1 for _, _, will in steps if will)
    k, start = 0, time.monotonic()
    if log:
        log.info("%d of %d stage(s) to run", n_run, len(steps))
    for node, status, will in steps:
        if not will:
            if log:
                log.info("stage %s: fresh, skipped", node.name)
            summary.append({"stage": node.name, "action": "skipped", "seconds": 0.0})
            continue
        k += 1
        if log:
            # which stage of how many, and the time so far, so a user on a slow machine sees where it stands
            log.info("[%d/%d, %s elapsed] stage %s: running (%s)", k, n_run, _clock(time.monotonic() - start),
                     node.name, status.reason if status.state != "fresh" else "forced")
        t0 = time.monotonic()
        _claim(node)
        assert node.run is not None, node.name
        try:
            node.run(node, by_name)
        except MflagError as e:
            try:
                named = type(e)(f"stage {node.name}: {e}")
            except TypeError:  # an error type with its own constructor
                named = MflagError(f"stage {node.name}: {e}")
            raise named from e
        seconds = time.monotonic() - t0
        write_json(record_path(node), {
            "stage": node.name,
            "fingerprint": node.fingerprint,
            "params": node.params,
            "deps": {d: by_name[d].fingerprint for d in node.deps},
            "mflag_version": __version__,
            "inputs": node.inputs,
            "seconds": round(seconds, 2),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        pending_path(node).unlink(missing_ok=True)
        summary.append({"stage": node.name, "action": "ran", "seconds": round(seconds, 2)})
        if log:
            log.info("[%d/%d, %s elapsed] stage %s: done in %s", k, n_run, _clock(time.monotonic() - start),
                     node.name, _clock(seconds))
    return summary


def _clock(seconds: float) -> str:
    """``1 h 02 min``, ``3 min 05 s`` or ``42 s``."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def _claim(node: Node) -> None:
    """Prepare ``node.out_dir`` for a run of this fingerprint.

    Outputs of another configuration (a finished stale run, or an interrupted run of other options)
    are removed so they can never mix with this run's; an interrupted run of the same fingerprint is
    kept so the stage can resume it.
    """
    out = node.out_dir
    pending = pending_path(node)
    done = record_path(node)
    same_pending = pending.is_file() and read_json(pending).get("fingerprint") == node.fingerprint
    if out.exists() and not same_pending and any(out.iterdir()):
        check_not_locked(out)  # never delete a folder another live run is writing into
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    done.unlink(missing_ok=True)
    write_json(pending, {"stage": node.name, "fingerprint": node.fingerprint,
                         "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
