"""What every chapter prints and saves, so each number in the book says where it came from.

``run = start_run("chapter-name", seed=0)`` prints the profile, device, torch version and seed;
``run.save("table1", rows)`` writes ``book/results/<chapter>/<name>.json`` with that provenance;
``run.finish()`` prints the wall time. The claims ledger and the intro read the JSON back
with :func:`load_results` instead of retyping numbers.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import torch

from ..io import write_bytes
from ..recipe import Recipe, get_recipe
from .notebooks import setup_figures


def _default_results() -> Path:
    """``$BLOODSEG_RESULTS``, else ``book/results`` under the working directory (a clone's root),
    else ``results`` (a notebook runs in ``book/``)."""
    if os.environ.get("BLOODSEG_RESULTS"):
        return Path(os.environ["BLOODSEG_RESULTS"])
    return Path("book/results") if Path("book").is_dir() else Path("results")


RESULTS_DIR = _default_results()


def device_name(device: torch.device | None = None) -> str:
    device = device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


@dataclasses.dataclass
class Run:
    chapter: str
    profile: Recipe
    seed: int
    device: torch.device
    started: float

    def info(self) -> dict:
        return {"chapter": self.chapter, "profile": self.profile.name, "device": device_name(self.device),
                "torch": str(torch.__version__), "seed": self.seed,
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    def save(self, name: str, data) -> Path:
        """Write ``data`` with this run's provenance to ``RESULTS_DIR/<chapter>/<name>.json``.

        Results are kept per profile: a smoke run (CI) never overwrites what a quick or full run
        saved for the book; it writes ``<name>.smoke.json`` instead.
        """
        suffix = "" if self.profile.name != "smoke" else ".smoke"
        path = Path(RESULTS_DIR) / self.chapter / f"{name}{suffix}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"provenance": {**self.info(), "wall_s_so_far": round(time.perf_counter() - self.started, 1)},
                   "data": data}
        return write_bytes(path, (json.dumps(payload, indent=1, default=_jsonable) + "\n").encode())

    def finish(self) -> float:
        wall = time.perf_counter() - self.started
        print(f"finished {self.chapter}: profile {self.profile.name}, device {device_name(self.device)}, "
              f"wall time {wall:.1f} s")
        return wall


def _jsonable(x):
    if torch.is_tensor(x):
        return x.tolist()
    if hasattr(x, "item"):
        return x.item()
    if dataclasses.is_dataclass(x):
        return dataclasses.asdict(x)
    return str(x)


def start_run(chapter: str, seed: int = 0, profile: str | None = None) -> Run:
    """Seed everything, print what this run is, and return a :class:`Run`."""
    prof = get_recipe(profile)
    setup_figures()                      # inline figures as JPEG at a set dpi: small notebooks
    torch.manual_seed(seed)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    run = Run(chapter, prof, seed, device, time.perf_counter())
    i = run.info()
    print(f"profile {i['profile']} | device {i['device']} | torch {i['torch']} | seed {seed}")
    return run


def load_results(chapter: str, name: str, profile: str | None = None) -> dict:
    """Read what a chapter saved: ``{"provenance": {...}, "data": ...}``.

    Prefers the book's own (quick/full) results; falls back to a smoke run's when that is all
    there is (in CI).
    """
    folder = RESULTS_DIR / chapter
    candidates = [folder / f"{name}.json", folder / f"{name}.smoke.json"]
    if profile == "smoke":
        candidates.reverse()
    for path in candidates:
        if path.exists():
            return json.loads(path.read_text())
    raise FileNotFoundError(f"no saved results {chapter}/{name}: run the chapter '{chapter}' first")
