"""Test-time tolerance (paper §4.2): scores, time and NFE of a trained model against rtol,
the share of inference time spent in the ODE-blocks, and a profiler summary of one forward.
"""
from __future__ import annotations

import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

from ..measure import interleaved_times
from ..ode import ode_blocks, set_tolerance
from ..train import evaluate
from .runs import measure_time, timed_images


def tolerance_curve(model, dataset, tolerances=(1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6), n_timed: int = 20) -> list[dict]:
    """Test-time tolerance (paper §4.2): scores, time and NFE of a trained model for each rtol.

    Every ODE-block gets the same rtol = atol (:func:`bloodseg.ode.set_tolerance`); the model's own
    tolerances are restored afterwards. Rows ``dict(rtol, pa, miou, time_20_s, nfe_forward)``.
    """
    blocks = ode_blocks(model)
    saved = [(b.rtol, b.atol) for b in blocks]
    rows = []
    try:
        for tol in tolerances:
            set_tolerance(model, tol)
            s = evaluate(model, dataset, n_timed=0)
            t = measure_time(model, dataset, n_timed)
            rows.append(dict(rtol=float(tol), pa=s["pa"], miou=s["miou"], time_20_s=t["time_per_image_s"] * 20,
                             nfe_forward=t["nfe_forward_total"]))
    finally:
        for b, (r, a) in zip(blocks, saved):
            b.set_tolerance(r, a)
    return rows


def ode_time_share(model, dataset, n: int = 5) -> dict:
    """Share of inference time spent inside the ODE-blocks (forward hooks with a clock)."""
    blocks = ode_blocks(model)
    spent, starts = [0.0], {}

    def pre(mod, args):
        starts[id(mod)] = time.perf_counter()

    def post(mod, args, out):
        spent[0] += time.perf_counter() - starts.pop(id(mod))

    images = timed_images(dataset, n)
    handles = [b.register_forward_pre_hook(pre) for b in blocks] + [b.register_forward_hook(post) for b in blocks]
    model = model.eval()
    try:
        with torch.inference_mode():
            model(images[0])                       # warm-up
            spent[0] = 0.0
            total = interleaved_times({"model": model}, images)["model"][0]
    finally:
        for h in handles:
            h.remove()
    return dict(total_s=total, ode_s=spent[0], share=spent[0] / total if total else float("nan"))


class _QuietStderr:
    """Send file descriptor 2 to /dev/null for a moment (the profiler's C++ start/stop chatter)."""

    def __enter__(self):
        try:
            self.saved = os.dup(2)
            self.null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(self.null, 2)
        except OSError:
            self.saved = None
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            os.dup2(self.saved, 2)
            os.close(self.saved)
            os.close(self.null)
        return False


def profile_forward(model, image: torch.Tensor, top: int = 8):
    """torch.profiler summary of one forward: the ``top`` ops by self CPU time (a DataFrame)."""
    import pandas as pd
    model = model.eval()
    with torch.inference_mode():
        model(image)
        with _QuietStderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
            model(image)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    rows = sorted(({"op": e.key, "calls": e.count, "self CPU ms": e.self_cpu_time_total / 1000,
                    "share (%)": 100 * e.self_cpu_time_total / total} for e in events),
                  key=lambda r: -r["self CPU ms"])[:top]
    return pd.DataFrame(rows).set_index("op")


def plot_tolerance_curve(rows: list[dict], unet_miou: float | None = None, unet_time: float | None = None):
    """MIoU, time and NFE against the test-time rtol."""
    import matplotlib.pyplot as plt
    tol = [r["rtol"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.3))
    axes[0].plot(tol, [100 * r["miou"] for r in rows], "o-")
    axes[1].plot(tol, [r["time_20_s"] for r in rows], "o-")
    axes[2].plot(tol, [r["nfe_forward"] for r in rows], "o-")
    if unet_miou is not None:
        axes[0].axhline(100 * unet_miou, color="grey", ls=":", label="U-Net")
        axes[0].legend(fontsize=8)
    if unet_time is not None:
        axes[1].axhline(unet_time, color="grey", ls=":", label="U-Net")
        axes[1].axhline(3 * unet_time, color="red", ls="--", label="goal: 3x U-Net")
        axes[1].legend(fontsize=8)
    for ax, name in zip(axes, ("MIoU (%)", "time for 20 images (s)", "forward NFE (all blocks)")):
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("test-time rtol (tighter →)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
