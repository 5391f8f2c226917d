"""Figures shared by the chapters: training histories, score bars, prediction grids (paper
Figs. 7-8), per-image scores (Figs. 9-10), goals and simple bars. matplotlib is imported lazily.
"""
from __future__ import annotations

import numpy as np
import torch

from ..classes import colourise_mask
from ..preprocess import clahe_on_luma, image_to_tensor


def _rgb(image_bgr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image_bgr[..., ::-1])


def plot_history(histories: dict, title: str = ""):
    """Loss, validation loss and validation MIoU per epoch for one or more runs."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for label, hist in histories.items():
        ep = [r["epoch"] for r in hist]
        axes[0].plot(ep, [r["loss"] for r in hist], "o-", label=label)
        axes[1].plot(ep, [r["val_loss"] for r in hist], "o-", label=label)
        axes[2].plot(ep, [100 * r["val_miou"] for r in hist], "o-", label=label)
    for ax, name in zip(axes, ("training loss", "validation loss", "validation MIoU (%)")):
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    if len(histories) > 1:
        axes[2].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_score_bars(frames: dict, columns=None, title: str = "", ylim=None):
    """Grouped bars: one group per score column, one bar per row of each frame (percent).

    ``frames``: ``{series label: DataFrame indexed by model}`` or a single DataFrame."""
    import matplotlib.pyplot as plt
    import pandas as pd
    if isinstance(frames, pd.DataFrame):
        frames = {"": frames}
    series = [(f"{k} {m}".strip(), df.loc[m]) for k, df in frames.items() for m in df.index]
    columns = columns or [c for c in next(iter(frames.values())).columns if c.endswith("(%)")]
    x = np.arange(len(columns))
    w = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(7, 1.4 * len(columns) + 0.3 * len(series)), 3.6))
    for i, (label, row) in enumerate(series):
        ax.bar(x + (i - (len(series) - 1) / 2) * w, [row[c] for c in columns], w, label=label)
    ax.set_xticks(x)
    ax.set_xticklabels([c.replace(" (%)", "") for c in columns], fontsize=9)
    ax.set_ylabel("%")
    if ylim:
        ax.set_ylim(*ylim)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def predict_masks(model, samples) -> list[np.ndarray]:
    """Argmax masks of ``model`` for ``samples`` (one at a time, CLAHE as in training)."""
    model = model.eval()
    with torch.inference_mode():
        return [model(image_to_tensor(s.image)[None]).argmax(1)[0].numpy().astype(np.uint8) for s in samples]


def prediction_grid(samples, predictions: dict, height: float = 2.2):
    """The paper's Fig. 7/8: per sample, original, CLAHE, label, then one column per model."""
    import matplotlib.pyplot as plt
    cols = ["original", "CLAHE (Y of YUV)", "label"] + list(predictions)
    fig, axes = plt.subplots(len(samples), len(cols), figsize=(height * len(cols), height * len(samples)),
                             squeeze=False)
    for i, s in enumerate(samples):
        panels = [_rgb(s.image), _rgb(clahe_on_luma(s.image)), _rgb(colourise_mask(s.mask))]
        panels += [_rgb(colourise_mask(predictions[k][i])) for k in predictions]
        for j, panel in enumerate(panels):
            axes[i, j].imshow(panel)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if i == 0:
                axes[i, j].set_title(cols[j], fontsize=9)
    fig.tight_layout()
    return fig


def plot_per_image(results: dict, labels=None):
    """Paper Figs. 9–10: PA and MIoU of every test image, one line per model."""
    import matplotlib.pyplot as plt
    labels = labels or list(results)
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.4))
    for label in labels:
        per = results[label]["per_image"]
        idx = np.arange(1, len(per) + 1)
        axes[0].plot(idx, [100 * s["pa"] for s in per], "o-", ms=3, label=label)
        axes[1].plot(idx, [100 * s["miou"] for s in per], "o-", ms=3, label=label)
    for ax, name in zip(axes, ("PA (%) per test image (paper Fig. 9)", "MIoU (%) per test image (paper Fig. 10)")):
        ax.set_xlabel("test image")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_goals(goals: list[dict]):
    """One small panel per goal: the measured value as a bar, the goal as a red line."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(goals), figsize=(3.8 * len(goals), 3.2), squeeze=False)
    for ax, g in zip(axes[0], goals):
        ax.bar([0], [g["measured"]], color="#1a7f37" if g["met"] else "#cf222e", width=0.5)
        ax.axhline(g["goal_value"], color="red", ls="--", label="goal")
        ax.set_xticks([])
        ax.set_title(g["goal"], fontsize=8, wrap=True)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
        ax.set_xlabel("met" if g["met"] else "missed")
    fig.tight_layout()
    return fig


def plot_bars(labels, values, ylabel: str, title: str = "", ref: float | None = None, ref_label: str = ""):
    """One simple bar chart (used for memory, levers and parameter tables)."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels)), 3.4))
    vals = [float("nan") if v is None else v for v in values]
    ax.bar(range(len(labels)), vals, color=[f"C{i % 10}" for i in range(len(labels))])
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if ref is not None:
        ax.axhline(ref, color="red", ls="--", label=ref_label)
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


# ============================================================================ chapter 2: the mechanism

def plot_adjoint(toy: dict):
    """The adjoint method on a 2-D toy ODE (:func:`bloodseg.paper.foundations.adjoint_toy`): the
    forward trajectory and the state rebuilt by the backward solve in the plane, with the adjoint
    a(t) = dL/dh(t) drawn along it; h(t) forward and a(t) backward against t; and dL/dθ as the
    backward solve accumulates it, ending on the values direct backprop gives."""
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=(10, 8.2))
    grid = fig.add_gridspec(2, 2, height_ratios=[1.15, 1])
    axes = [fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, :])]
    hf, hb, ab = toy["h_forward"], toy["h_backward"], toy["a_backward"]
    tf, tb = toy["t_forward"], toy["t_backward"]
    t0, t1 = tf[0], tf[-1]

    ax = axes[0]
    ax.plot(hf[:, 0], hf[:, 1], "-", color="C0", lw=3, label="forward solve, $t_0 \\to t_1$")
    ax.plot(hb[:, 0], hb[:, 1], "--", color="C1", lw=1.8, label="$h$ rebuilt backward, $t_1 \\to t_0$")
    mid = len(hf) // 2
    ax.annotate("", hf[mid + 1], hf[mid], arrowprops=dict(arrowstyle="-|>", color="C0", lw=2, mutation_scale=20))
    every = max(1, len(hb) // 6)
    ax.quiver(hb[::every, 0], hb[::every, 1], ab[::every, 0], ab[::every, 1], color="C3", angles="xy",
              scale_units="xy", scale=5.0, width=0.007, label="adjoint $a(t) = \\partial L / \\partial h(t)$")
    ax.plot(*hf[0], "o", color="k", ms=8)
    ax.annotate("$h(t_0)$", hf[0], textcoords="offset points", xytext=(8, -14), fontsize=11)
    ax.plot(*hf[-1], "s", color="k", ms=7)
    ax.annotate("$h(t_1)$", hf[-1], textcoords="offset points", xytext=(-18, -20), fontsize=11)
    ax.plot(*toy["target"], "x", color="C2", ms=11, mew=3, label="target $y$, $L = \\frac{1}{2}|h(t_1) - y|^2$")
    ax.set_xlabel("$h_1$")
    ax.set_ylabel("$h_2$")
    ax.set_title("in the plane of the state")
    ax.set_aspect("equal", adjustable="datalim")
    ax.legend(fontsize=8.5, loc="lower left")
    ax.grid(alpha=0.3)

    ax = axes[1]
    for k in range(2):
        ax.plot(tf, hf[:, k], "-", color=f"C{k}", lw=2, label=f"$h_{k + 1}(t)$, forward")
        ax.plot(tb, ab[:, k], "--", color=f"C{k}", lw=2, label=f"$a_{k + 1}(t)$, backward")
    low, top = ax.get_ylim()
    span = top - low
    ax.annotate("", (t1, top + 0.08 * span), (t0, top + 0.08 * span), arrowprops=dict(arrowstyle="-|>", color="C0"))
    ax.text((t0 + t1) / 2, top + 0.1 * span, "forward solve", ha="center", va="bottom", fontsize=9.5, color="C0")
    ax.annotate("", (t0, low - 0.08 * span), (t1, low - 0.08 * span), arrowprops=dict(arrowstyle="-|>", color="C3"))
    ax.text((t0 + t1) / 2, low - 0.1 * span, "backward (adjoint) solve", ha="center", va="top", fontsize=9.5,
            color="C3")
    ax.set_ylim(low - 0.28 * span, top + 0.28 * span)
    ax.set_xlabel("t")
    ax.set_title("state forward, adjoint backward")
    ax.legend(fontsize=8.5, ncol=2, loc="center left")
    ax.grid(alpha=0.3)

    ax = axes[2]
    g = toy["g_backward"]
    direct = np.asarray(toy["grad_direct"])[2:]
    for k, name in enumerate(toy["names"]):
        ax.plot(tb, g[:, k], "-", lw=2, color=f"C{k}", label=f"$\\partial L/\\partial {name[0]}_{{{name[1:]}}}$")
        ax.plot([t0], [direct[k]], "x", color="k", ms=9, mew=2)
    ax.plot([], [], "x", color="k", ms=9, mew=2, label="direct backprop")
    ax.annotate("", (t0 + 0.05 * (t1 - t0), 0), (t1, 0), arrowprops=dict(arrowstyle="-|>", color="0.5"))
    ax.set_xlabel("t (the backward solve runs from right to left, from $g(t_1) = 0$)")
    ax.set_title("$g(t)$: $\\partial L/\\partial \\theta$ accumulated by the backward solve; at $t_0$ it lands on direct backprop's")
    ax.legend(fontsize=8.5, ncol=4, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _tol(x: float) -> str:
    """1e-04 -> "1e-4"; 0.5 -> "0.5"."""
    text = f"{x:.0e}"
    return f"{x:g}" if float(text) != x else text.replace("e-0", "e-").replace("e+0", "e")


def unet_layout(model, size: int = 32) -> dict:
    """Read a :class:`bloodseg.models.UNet`'s layout from the model itself: one forward pass of a
    ``size`` x ``size`` zero image with hooks on every encoder stage, decoder stage and the head,
    and on ``model._slot`` (the call that fills each of the 9 ODE-block positions, empty or not).

    Returns ``dict(name, width, parameters, events)``; ``events`` in the order the forward pass
    met them: ``{"kind": "encoder" | "decoder" | "head", "index", "module", "in_channels",
    "out_channels", "scale"}`` or ``{"kind": "slot", "position", "channels", "scale", "block"}``,
    where ``scale`` is how many times smaller than the input the feature map is and ``block`` is
    None or ``{"method", "rtol", "channels", "hidden", "parameters"}`` of the ODE-block there.
    """
    from ..models import count_parameters

    events, hooks = [], []

    def stage_hook(kind, index):
        def hook(module, inputs, output):
            events.append(dict(kind=kind, index=index, module=type(module).__name__,
                               in_channels=int(inputs[0].shape[1]), out_channels=int(output.shape[1]),
                               scale=size // int(output.shape[-1])))
        return hook

    for kind in ("encoder", "decoder"):
        for i, stage in enumerate(getattr(model, kind)):
            hooks.append(stage.register_forward_hook(stage_hook(kind, i)))
    hooks.append(model.head.register_forward_hook(stage_hook("head", 0)))
    original = model._slot

    def slot(position, h):
        block = model.ode[str(position)] if str(position) in model.ode else None
        events.append(dict(kind="slot", position=int(position), channels=int(h.shape[1]),
                           scale=size // int(h.shape[-1]),
                           block=None if block is None else dict(
                               method=block.method, rtol=block.rtol, channels=block.func.channels,
                               hidden=block.func.hidden, parameters=count_parameters(block))))
        return original(position, h)

    was_training = model.training
    model._slot = slot
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, model.in_channels, size, size))
    finally:
        del model._slot
        for h in hooks:
            h.remove()
        model.train(was_training)
    return dict(name=model.name, width=model.width, parameters=count_parameters(model), events=events)


def plot_architecture(model="nodes-unet", **options):
    """The U of a :class:`bloodseg.models.UNet` as :func:`unet_layout` reads it from the model:
    encoder and decoder stages with their channels, the 9 ODE-block positions, and the blocks the
    model actually has (filled, with their solver, tolerance and size). ``model`` is a network or
    a name for :func:`bloodseg.models.build_model` (``options`` go there)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch
    from ..models import build_model

    if isinstance(model, str):
        model = build_model(model, **options)
    layout = unet_layout(model)
    events = layout["events"]
    stages = [e for e in events if e["kind"] in ("encoder", "decoder")]
    level = lambda scale: int(round(np.log2(scale)))
    deepest = max(level(e["scale"]) for e in stages)
    dx, dy, bw, bh = 1.5, 1.15, 1.2, 0.82        # column and level spacing, box size
    fig, ax = plt.subplots(figsize=(10, 6.4))
    xy = {}      # stage (kind, index) -> box centre
    for col, e in enumerate(stages):
        x, y = dx * col, -dy * level(e["scale"])
        xy[(e["kind"], e["index"])] = (x, y)
        enc = e["kind"] == "encoder"
        ax.add_patch(FancyBboxPatch((x - bw / 2, y - bh / 2), bw, bh, boxstyle="round,pad=0.02",
                                    fc="#dbe9f6" if enc else "#e6f2df", ec="0.3"))
        ax.text(x, y + 0.2, e["module"] if enc else f"x2, {e['module']}", ha="center", va="center",
                fontsize=8.5)
        ax.text(x, y - 0.04, f"{e['in_channels']} → {e['out_channels']}", ha="center", va="center",
                fontsize=9, fontweight="bold", color="0.2")
        ax.text(x, y - 0.26, f"1/{e['scale']} size", ha="center", va="center", fontsize=8.5, color="0.35")
    # skip connections: from each encoder level to the decoder stage of the same level
    enc = {level(e["scale"]): xy[("encoder", e["index"])] for e in stages if e["kind"] == "encoder"}
    for e in stages:
        if e["kind"] == "decoder" and level(e["scale"]) in enc:
            (xa, ya), (xb, yb) = enc[level(e["scale"])], xy[("decoder", e["index"])]
            ax.annotate("", (xb - bw / 2, yb + 0.28), (xa + bw / 2 + 0.3, ya + 0.28),
                        arrowprops=dict(arrowstyle="-|>", color="C7", ls="--", lw=1.2))
    # the slots, each on the right edge of the stage the forward pass ran just before it
    last_stage, slot_at, blocks = None, {}, []
    for e in events:
        if e["kind"] in ("encoder", "decoder"):
            last_stage = (e["kind"], e["index"])
        elif e["kind"] == "slot":
            x, y = xy[last_stage]
            cx = x + bw / 2 + 0.22
            slot_at[last_stage] = cx
            b = e["block"]
            ax.plot([cx], [y], "o", ms=21 if b else 16, mfc="#f28e2b" if b else "white",
                    mec="#b85a00" if b else "0.5", mew=1.5, zorder=3)
            ax.text(cx, y, str(e["position"]), ha="center", va="center", fontsize=10, zorder=4,
                    fontweight="bold" if b else "normal")
            if b:
                blocks.append(e)
                lv = level(e["scale"])
                ha, tx = ("center", x) if lv == deepest else (("right", x + 0.3) if last_stage[0] == "encoder"
                                                                 else ("left", x - 0.3))
                ax.text(tx, y - bh / 2 - 0.1, f"ODE-block {e['position']}\n{b['method']}, rtol {_tol(b['rtol'])}\n"
                        f"{b['channels']} ch, {b['parameters'] / 1e6:.2f} M weights",
                        ha=ha, va="top", fontsize=9, color="#8a4300")
    # max-pool arrows down the encoder, upsampling arrows up the decoder (from the slot on)
    for a, b in zip(stages, stages[1:]):
        ka, kb = (a["kind"], a["index"]), (b["kind"], b["index"])
        (xa, ya), (xb, yb) = xy[ka], xy[kb]
        ax.annotate("", (xb - bw / 2, yb), (slot_at.get(ka, xa + bw / 2) + 0.12, ya),
                    arrowprops=dict(arrowstyle="-|>", color="0.45", lw=1.3, shrinkA=5))
    head = next(e for e in events if e["kind"] == "head")
    xl, yl = xy[(stages[-1]["kind"], stages[-1]["index"])]
    ax.annotate(f"1x1 conv:\n{head['in_channels']} → {head['out_channels']} class logits",
                (slot_at.get((stages[-1]["kind"], stages[-1]["index"]), xl) + 0.12, yl + 0.12),
                (xl + 0.55, yl + 1.05), fontsize=9, ha="center", arrowprops=dict(arrowstyle="<|-", color="0.45"))
    x0, y0 = xy[(stages[0]["kind"], stages[0]["index"])]
    ax.annotate(f"image, {stages[0]['in_channels']} channels", (x0 - bw / 2, y0 + 0.12), (x0 - 0.3, y0 + 1.05),
                fontsize=9, ha="center", arrowprops=dict(arrowstyle="-|>", color="0.45"))
    ax.plot([], [], "o", mfc="white", mec="0.5", ms=12, label="ODE-block position, empty")
    ax.plot([], [], "o", mfc="#f28e2b", mec="#b85a00", ms=14, label="ODE-block of this model")
    ax.plot([], [], "--", color="C7", label="skip connection (concatenated)")
    ax.plot([], [], "-", color="0.45", label="max-pool down / upsample up")
    ax.legend(loc="lower right", fontsize=9)
    where = ", ".join(str(e["position"]) for e in blocks) or "none"
    ax.set_title(f"build_model({layout['name']!r}), width {layout['width']}: {layout['parameters'] / 1e6:.2f} M "
                 f"weights\nboxes: channels in → out; circles: the 9 ODE-block positions; blocks at {where}",
                 fontsize=10.5)
    xs = [p[0] for p in xy.values()]
    ys = [p[1] for p in xy.values()]
    ax.set_xlim(min(xs) - 1.0, max(xs) + 1.2)
    ax.set_ylim(min(ys) - 1.35, max(ys) + 1.35)
    ax.axis("off")
    fig.tight_layout()
    return fig


def interactive_figure(draw, controls: dict, hint: str = "Move a control to draw."):
    """Controls (ipywidgets) that call ``draw(**values)`` and show what it returns (a figure or
    text) whenever one changes. Nothing is drawn before the first change, so a notebook executed
    with its widget state saved stores the controls only, no image."""
    import ipywidgets as widgets
    from IPython.display import display

    out = widgets.Output()
    note = widgets.HTML(f"<i>{hint}</i>")

    def redraw(_change=None):
        import matplotlib.pyplot as plt
        note.value = "<i>working…</i>"
        with out:
            out.clear_output(wait=True)
            result = draw(**{name: c.value for name, c in controls.items()})
            if hasattr(result, "savefig"):
                display(result)
                plt.close(result)
            elif result is not None:
                print(result)
        note.value = ""

    for c in controls.values():
        c.observe(redraw, names="value")
    return widgets.VBox([widgets.HBox(list(controls.values())), note, out])


def solver_title(spec) -> str:
    """A solver spec (:mod:`bloodseg.calibrate`) as a title: "euler, 1 step", "dopri5, rtol 1e-3",
    "dopri5 (trained)" for None."""
    if spec is None:
        return "dopri5 (trained)"
    if "steps" in spec:
        return f"{spec['method']}, {spec['steps']} step{'s' if spec['steps'] > 1 else ''}"
    return f"{spec['method']}, rtol {_tol(spec['rtol'])}"


def _timing(row: dict) -> str:
    return f"NFE {row['nfe_total']} · blocks {row['ode_seconds']:.2f} s of {row['seconds']:.2f} s"


def _agreement(mask: np.ndarray, reference: np.ndarray) -> str:
    n = int((mask != reference).sum())
    return f"{100 * (1 - n / mask.size):.3f}% as dopri5 ({n:,} px differ)"


def plot_solver_row(image_bgr: np.ndarray, row: dict, reference: np.ndarray | None = None):
    """One setting of the solver explorer (a row of
    :func:`bloodseg.paper.foundations.solve_photograph`): the photograph and the mask, with the
    pixels that differ from ``reference`` in yellow; NFE, time and agreement in the titles."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    axes[0].imshow(_rgb(image_bgr))
    axes[0].set_title("photograph", fontsize=9)
    shown = _rgb(colourise_mask(row["mask"])) if reference is None else _difference(row["mask"], reference)
    axes[1].imshow(shown)
    title = f"{solver_title(row['spec'])}: {_timing(row)}"
    if reference is not None:
        title += "\n" + _agreement(row["mask"], reference) + " (yellow)"
    axes[1].set_title(title, fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    return fig


def _difference(mask: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The mask's colours, with the pixels that differ from ``reference`` in yellow (thickened so
    that single pixels show at figure size)."""
    rgb = _rgb(colourise_mask(mask)).astype(np.float32) * 0.6 + 30
    diff = mask != reference
    if diff.any():
        import cv2
        diff = cv2.dilate(diff.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    rgb[diff] = (255, 220, 0)
    return rgb.astype(np.uint8)


def plot_solver_grid(image_bgr: np.ndarray, rows: list[dict], reference: np.ndarray):
    """The solver explorer as a static figure: the photograph, then one mask per setting (rows of
    :func:`bloodseg.paper.foundations.solve_photograph`) with the pixels that differ from
    ``reference`` (the trained dopri5) in yellow, and under each its NFE (all blocks), time in the
    blocks and in the whole prediction, and its agreement with the reference."""
    import matplotlib.pyplot as plt
    n = len(rows) + 1
    ncol = 3 if n > 3 else n
    nrow = -(-n // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.4 * ncol, 3.2 * nrow), squeeze=False)
    axes = axes.ravel()
    axes[0].imshow(_rgb(image_bgr))
    axes[0].set_title("photograph", fontsize=11)
    for ax, row in zip(axes[1:], rows):
        ax.imshow(_difference(row["mask"], reference))
        ax.set_title(solver_title(row["spec"]), fontsize=11)
        ax.text(0.5, -0.03, f"{_timing(row)}\n{_agreement(row['mask'], reference)}",
                transform=ax.transAxes, ha="center", va="top", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[n:]:
        ax.axis("off")
    if n < len(axes):
        axes[n].text(0.02, 0.55, "red: red cell; violet: white\ncell; dark: background;\nyellow: pixels whose class\n"
                     "differs from the trained\ndopri5's. NFE: evaluations\nof f, all blocks together;\n"
                     "time in the blocks, of the\nwhole prediction.", transform=axes[n].transAxes, fontsize=10,
                     va="center")
    fig.tight_layout(h_pad=3.0)
    return fig


def as_png(fig, colours: int = 48, max_chars: int = 45_000):
    """A line drawing as a palette PNG (``colours`` colours, no dithering): crisper and about half
    the size of the notebook's default JPEG. Falls back to JPEG when the PNG would pass
    ``max_chars`` of base64 (tests/test_notebook_size.py allows PNGs under 50,000). Closes ``fig``
    and returns an ``IPython.display.Image``."""
    import io

    import matplotlib.pyplot as plt
    from IPython.display import Image as Picture
    from PIL import Image

    from .notebooks import JPEG_QUALITY
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    plt.close(fig)
    rgb = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    out = io.BytesIO()
    rgb.quantize(colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(out, format="PNG",
                                                                                          optimize=True)
    if len(out.getvalue()) * 4 / 3 < max_chars:
        return Picture(data=out.getvalue(), format="png")
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return Picture(data=out.getvalue(), format="jpeg")
