"""The book's JSON records: one toolkit to stamp, write, read and cite them.

Every record under ``book/results/`` says where its numbers came from: :func:`provenance` gives
the commit (``-dirty`` when the working tree differed from it), the command as typed, the device
(CPU model, cores, threads and the load average, or the CUDA device), torch and Python versions,
the date and the wall time. :func:`write_record` writes a record atomically and refuses one without
provenance; :func:`load_record` reads one back by its name under the results folder
(:data:`bloodseg.paper.report.RESULTS_DIR`, ``book/results`` from a clone's root), None when it has
not been written; :func:`provenance_line` is the one line a chapter prints under a table::

    t0 = time.perf_counter()
    ...
    record = {"what": ..., "rows": rows, "provenance": provenance(command, t0)}
    write_record(record, "speed/bench.json")          # a name: under the results folder
    write_record(record, Path(args.out))              # a Path: there
    print(provenance_line(load_record("speed/bench.json")))
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import BloodsegError
from ..io import write_bytes

__all__ = ["REQUIRED", "git_commit", "command_line", "cpu_model", "device_line", "provenance", "results_path",
           "write_record", "load_record", "provenance_line"]

#: Fields a record's provenance must have (in ``record["provenance"]``, or at its top level as
#: :mod:`bloodseg.paper.reproduce`'s records keep them); :func:`write_record` refuses a record without.
REQUIRED = ("git_commit", "command", "device", "torch", "date", "wall_s")

_HERE = Path(__file__).resolve().parent


def _git(*args) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=_HERE)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str:
    """HEAD's hash, with ``-dirty`` when tracked files differ from it or ``bloodseg/`` holds untracked
    files (code that may have run); ``unknown`` outside a git checkout."""
    head = _git("rev-parse", "HEAD")
    if not head:
        return "unknown"
    dirty = _git("status", "--porcelain", "--untracked-files=no") or _git(
        "status", "--porcelain", "--untracked-files=normal", "--", str(_HERE.parent))
    return head + ("-dirty" if dirty else "")


def command_line() -> str:
    """This process's command as a user would type it: ``bloodseg ...`` for the CLI (run as
    ``bloodseg`` or ``python -m bloodseg.cli``), else the arguments as given, without machine paths."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("bloodseg", "cli.py", "__main__.py"):
        return shlex.join(["bloodseg", *argv[1:]])
    return shlex.join([Path(argv[0]).name if argv else "python", *argv[1:]])


def cpu_model() -> str:
    """The CPU's model name and its vector extensions that change float rounding in PyTorch's kernels
    (a unit trained again on another CPU or thread count need not match its record bit for bit)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    isa = [f for f in ("avx512f", "avx512_bf16", "amx_tile", "avx2", "fma") if f in flags]
    return f"{name or platform.machine()} ({', '.join(isa) or 'no AVX'})"


def _load() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def device_line(threads_note: str | None = None) -> str:
    """``cuda (<name>)``, or ``cpu (<arch>, <n> cores, <threads>; shared with other jobs, load average
    <1 min> at the end)``; ``threads_note`` says how many threads ran (default: torch's)."""
    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name()})"
    load = _load()
    return (f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{threads_note or f'{torch.get_num_threads()} torch thread(s)'}; shared with other jobs, load average "
            f"{load[0] if load else float('nan'):.1f} at the end)")


def provenance(command: str | None, started: float, *, threads_note: str | None = None, **extra) -> dict:
    """Where a record came from: ``git_commit`` (``-dirty`` when the tree differed), ``git_dirty``,
    ``command`` (as typed; default :func:`command_line`), ``device`` (:func:`device_line` with
    ``threads_note``), ``cpu`` (:func:`cpu_model`), ``threads`` (torch's), ``load_average`` (1, 5,
    15 min at the end), ``torch``, ``python``, ``date`` (UTC, ISO) and ``wall_s`` since ``started``
    (a ``time.perf_counter()``); ``extra`` fields are added as given (or replace these)."""
    commit = git_commit()
    return {"git_commit": commit, "git_dirty": commit.endswith("-dirty"), "command": command or command_line(),
            "device": device_line(threads_note), "cpu": cpu_model(), "threads": torch.get_num_threads(),
            "load_average": _load(), "torch": str(torch.__version__), "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "wall_s": round(time.perf_counter() - started, 1), **extra}


def results_path(name) -> Path:
    """``name`` under the results folder (:data:`bloodseg.paper.report.RESULTS_DIR`, read at each call)."""
    from . import report
    return Path(report.RESULTS_DIR) / name


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    if isinstance(x, np.ndarray) or torch.is_tensor(x):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    if dataclasses.is_dataclass(x):
        return dataclasses.asdict(x)
    return float(x)


def write_record(record: dict, where) -> Path:
    """Write ``record`` as JSON, atomically (:func:`bloodseg.io.write_bytes`). ``where``: a
    :class:`~pathlib.Path` (written there) or a name (a string) under the results folder. A record
    without provenance (:data:`REQUIRED`, in ``record["provenance"]`` or at its top level) is refused."""
    p = record.get("provenance") if isinstance(record.get("provenance"), dict) else record
    missing = [k for k in REQUIRED if k not in p]
    if missing:
        raise BloodsegError(f"a record without provenance ({', '.join(missing)} missing) is not written: "
                            "add provenance(command, started) to it")
    path = where if isinstance(where, Path) else results_path(where)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_bytes(path, (json.dumps(record, indent=1, default=_jsonable) + "\n").encode())


def load_record(name) -> dict | None:
    """The record ``name`` under the results folder (e.g. ``"speed/bench.json"``; a path outside it
    when absolute), or None when it has not been written."""
    path = results_path(name)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise BloodsegError(f"{path} is not a readable JSON record ({exc}); write it again") from exc


def provenance_line(record: dict) -> str:
    """One line saying where a record came from: date, commit (12 characters, ``-dirty`` when the
    tree differed), device, torch, wall time and the command (from ``record["provenance"]``, or the
    record's top level for records that keep them there)."""
    p = record.get("provenance") or record
    commit = str(p.get("git_commit", "?"))
    commit = commit[:12] + ("-dirty" if commit.endswith("-dirty") or p.get("git_dirty") else "")
    return (f"recorded {str(p.get('date', '?'))[:16].replace('T', ' ')} UTC, commit {commit}, "
            f"{p.get('device', '?')}, torch {p.get('torch', '?')}, {p.get('wall_s', '?')} s, "
            f"by `{p.get('command', '?')}`")
