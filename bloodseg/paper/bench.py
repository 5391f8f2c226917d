"""``bloodseg bench``: size, speed and memory of every network of the paper, measured in one go.

For each model (``unet``, ``ode-unet-1`` … ``ode-unet-9``, ``resunet``, ``nodes-unet``) at one width
(paper: 32) and image size (paper: 256x256):

* **parameters** and **parameter memory** (MiB of float32 weights: the paper's Table 2 "M");
* **inference time** for ``n_images`` synthetic smears of ``size x size`` passed one at a time after
  warm-up passes (CUDA synchronised on a GPU) — the paper's "time for 20 images" (Table 1), and its
  **ratio to the U-Net's** time next to the paper's ratio;
* **forward NFE** of every ODE-block (evaluations of f per forward, averaged over the images);
* one **training step** (forward, cross-entropy, backward, Adam update on a batch of ``batch``
  smears): time and peak memory, with direct backprop and with the adjoint.

How peak memory is measured. On CUDA: ``torch.cuda.max_memory_allocated`` during the step minus what
was allocated before it (tensors only, exact). On a CPU there is no allocator counter, so every
(model, backprop mode) runs its training steps in a *fresh Python process* and we read the kernel's
peak resident set size: the peak is reset just before the measured step by writing ``5`` to
``/proc/self/clear_refs`` and read back as ``VmHWM`` (Linux), minus ``VmRSS`` before the step. The
child runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so glibc hands every block of 64 KiB or more back to
the kernel when it is freed (otherwise freed memory stays in the process and hides the next peak).
Where ``clear_refs`` cannot be written, the fallback is ``ru_maxrss`` of that fresh process minus its
RSS before the first step (this includes the warm-up step, which is the same computation). As an
exact cross-check we also count the bytes autograd saves for backward (``saved_mb``, via
``torch.autograd.graph.saved_tensors_hooks``): the activations direct backprop keeps for every
evaluation of f and the adjoint does not.

Random weights are not trained weights: NFE (and so time) depends on the learned dynamics, and NFE
usually grows during training (torchdiffeq issue 153). ``ckpt_dir`` benches trained checkpoints
instead: for model ``m`` it loads ``<ckpt_dir>/<m>/best.pt`` when that file exists (the layout of
``runs/<chapter>/<profile>/``); models without a checkpoint stay random and are marked so. A
checkpoint is benched at its own width.
"""
from __future__ import annotations

import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint import load_checkpoint
from ..errors import BloodsegError
from ..measure import PeakMemory, count_saved_bytes, interleaved_times, run_isolated, sync, time_inference
from ..models import MODEL_NAMES, count_parameters, parameter_memory_mb
from ..registry import build_variant, variant, variant_names
from ..ode import nfe_report, ode_blocks
from ..preprocess import image_to_tensor
from ..checkpoint import model_from_checkpoint
from ..synthetic import make_smear
from .reference import PAPER_TABLE1


__all__ = ["paper_time_ratios", "plot_time_ratios", "bench_images", "time_inference", "training_step_cost", "run_bench",
           "bench_rows", "format_bench", "checkpoint_for", "export_bench"]


def _paper_times() -> dict:
    return {name: row["time_s"] for name, row in PAPER_TABLE1.items()}


def paper_time_ratios() -> dict:
    """The paper's Table 1 time of each model divided by its U-Net's (0.15 s for 20 images)."""
    times = _paper_times()
    return {name: t / times["unet"] for name, t in times.items()}


# --------------------------------------------------------------------------- inputs

def bench_images(n: int, size: int, seed: int = 1000) -> list[torch.Tensor]:
    """``n`` synthetic smears of ``size x size`` as ``1 x 3 x size x size`` tensors (CLAHE applied).

    Real-looking content, not noise: with trained weights the NFE depends on the input.
    """
    return [image_to_tensor(make_smear(seed + i, size=(size, size))[0])[None] for i in range(n)]


def _bench_masks(n: int, size: int, seed: int = 2000) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [make_smear(seed + i, size=(size, size)) for i in range(n)]
    x = torch.stack([image_to_tensor(img) for img, _ in pairs])
    y = torch.stack([torch.from_numpy(m.astype("int64")) for _, m in pairs])
    return x, y


# --------------------------------------------------------------------------- training step

def _build_for_bench(name: str, width: int, adjoint: bool | None, ckpt: str | None,
                     options: dict | None = None) -> torch.nn.Module:
    """The network of the label ``name`` (:func:`bloodseg.registry.build_variant`) with ``options``
    on top, or ``ckpt``'s network with ``options`` overriding its solver settings."""
    extra = dict(options or {})
    if adjoint is not None:
        extra["adjoint"] = bool(adjoint)
    if ckpt:
        return model_from_checkpoint(load_checkpoint(ckpt), ckpt, **extra)
    return build_variant(name, width=width, **extra)


def _train_steps(cfg: dict) -> dict:
    """Runs where the memory is measured: warm-up step(s), then the measured step(s)."""
    device = torch.device(cfg["device"])
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    has_ode = cfg["adjoint"] is not None
    torch.manual_seed(int(cfg["seed"]))
    model = _build_for_bench(cfg["model"], cfg["width"], cfg["adjoint"] if has_ode else None,
                             cfg.get("ckpt"), cfg.get("options")).to(device).train()
    x, y = _bench_masks(int(cfg["batch"]), int(cfg["size"]))
    x, y = x.to(device), y.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    saved = [0]

    def step(count_saved: bool):
        sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if count_saved:
            with count_saved_bytes() as counter:
                logits = model(x)
            saved[0] = counter.nbytes
        else:
            logits = model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        opt.step()
        sync(device)
        return time.perf_counter() - t0

    memory = PeakMemory(device)            # before the warm-up: the fallback counts from here
    for _ in range(int(cfg["warmup"])):
        step(False)
    memory.start()
    seconds = step(True)
    peak_mb = memory.stop()
    saved_mb = saved[0] / 2 ** 20
    times = [seconds]
    for _ in range(int(cfg["repeats"]) - 1):
        times.append(step(False))
    report = nfe_report(model)
    return dict(step_s=min(times), step_times_s=times, peak_mb=peak_mb, saved_mb=saved_mb,
                nfe_forward=sum(f for f, _ in report.values()),
                nfe_backward=sum(b for _, b in report.values()), memory_how=memory.how)


def training_step_cost(model: str, width: int = 32, size: int = 256, batch: int = 2,
                       adjoint: bool | None = False, device="cpu", ckpt: str | None = None,
                       options: dict | None = None, warmup: int = 1, repeats: int = 1, seed: int = 0,
                       subprocess_on_cpu: bool = True, timeout: float = 1800) -> dict:
    """Time and peak memory of one training step of ``model`` (``adjoint`` None: no ODE-blocks).

    ``options`` go to :func:`bloodseg.registry.build_variant` (or override a checkpoint's solver settings,
    e.g. ``dict(rtol=1e-6)``).
    On a CPU the steps run in a fresh Python process (:func:`bloodseg.measure.run_isolated`, see
    the module docstring), on CUDA in this one; peak memory is :class:`bloodseg.measure.PeakMemory`. Returns ``dict(step_s, peak_mb, saved_mb, nfe_forward, nfe_backward, memory_how)``, or
    ``dict(error=...)`` when the solver gave up.
    """
    device = torch.device(device)
    cfg = dict(model=model, width=int(width), size=int(size), batch=int(batch), adjoint=adjoint,
               device=str(device), ckpt=str(ckpt) if ckpt else None, options=dict(options or {}),
               warmup=int(warmup),
               repeats=max(1, int(repeats)), seed=int(seed), threads=torch.get_num_threads())
    if device.type != "cpu" or not subprocess_on_cpu:
        try:
            return _train_steps(cfg)
        except BloodsegError as exc:
            return dict(error=str(exc))
    return run_isolated(f"{__name__}:_train_steps", cfg, threads=cfg["threads"], timeout=timeout)


# --------------------------------------------------------------------------- the whole bench

def checkpoint_for(name: str, ckpt_dir) -> str | None:
    """``<ckpt_dir>/<name>/best.pt`` if it exists, else None."""
    if not ckpt_dir:
        return None
    path = Path(ckpt_dir) / name / "best.pt"
    return str(path) if path.is_file() else None


def _device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_bench(models=MODEL_NAMES, width: int = 32, size: int = 256, n_images: int = 20,
              batch: int = 2, device=None, ckpt_dir=None, train: bool = True, adjoint: bool = True,
              warmup: int = 2, repeats: int = 1, progress=None, options: dict | None = None) -> dict:
    """Measure every model of ``models`` (labels of :data:`bloodseg.registry.VARIANTS`, e.g.
    ``nodes-unet-h16``; see the module docstring); returns a JSON-able dict. ``options``: build
    options of every network on top of its label's (``--model-option``; the ODE options are
    ignored by ``unet`` and ``resunet``).

    ``{"config": {...}, "models": [row, ...]}``: each row has ``model, weights, width, params,
    param_mb, time_s, time_per_image_s, time_20_s, ratio_to_unet, paper_time_20_s,
    paper_ratio_to_unet, nfe_forward (per block), nfe_forward_total, train``; ``train`` maps
    ``"direct"`` and ``"adjoint"`` to the step cost (``"adjoint"`` is None for models without
    ODE-blocks; ``train`` is None with ``train=False``). The U-Net is always measured, as the
    reference of the ratios, and added first if ``models`` lacks it.
    """
    models = [m.strip() for m in (models.split(",") if isinstance(models, str) else models) if m.strip()]
    if not models:
        raise BloodsegError(f"no model to bench: choose from {', '.join(variant_names())} (or nodes-unet-hN)")
    models = [variant(m).label for m in models]      # an unknown label is an error that names them all
    options = dict(options or {})
    if "unet" not in models:
        models = ["unet"] + models
    for what, v in (("size", size), ("width", width), ("n_images", n_images), ("batch", batch)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise BloodsegError(f"{what} must be a positive integer, got {v!r}")
    if size % 16:
        raise BloodsegError(f"size must be a multiple of 16 (four 2x2 poolings), got {size}")
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BloodsegError("--device cuda was asked for, but CUDA is not available here; use --device cpu")
    say = progress or (lambda msg: None)
    images = bench_images(n_images, size)
    paper_times = _paper_times()
    rows = []
    for name in models:
        ckpt = checkpoint_for(name, ckpt_dir)
        torch.manual_seed(0)
        model = _build_for_bench(name, width, None, ckpt, options)
        has_ode = bool(ode_blocks(model))
        row = dict(model=name, weights=ckpt or "random", width=int(model.options.get("width", width)),
                   params=count_parameters(model), param_mb=parameter_memory_mb(model))
        say(f"{name}: inference on {n_images} images of {size}x{size} ...")
        row.update(time_inference(model, images, warmup=warmup, device=device))
        row["time_20_s"] = row["time_per_image_s"] * 20
        row["nfe_forward_total"] = sum(row["nfe_forward"].values())
        row["paper_time_20_s"] = paper_times.get(name)
        del model
        if train:
            say(f"{name}: training step(s), batch {batch} ...")
            row["train"] = {"direct": training_step_cost(
                name, width, size, batch, adjoint=False if has_ode else None, device=device, ckpt=ckpt,
                options=options, repeats=repeats)}
            row["train"]["adjoint"] = (training_step_cost(
                name, width, size, batch, adjoint=True, device=device, ckpt=ckpt, options=options,
                repeats=repeats)
                if has_ode and adjoint else None)
        else:
            row["train"] = None
        rows.append(row)
    ref = next(r for r in rows if r["model"] == "unet")
    for row in rows:
        row["ratio_to_unet"] = row["time_per_image_s"] / ref["time_per_image_s"]
        p = row["paper_time_20_s"]
        row["paper_ratio_to_unet"] = p / paper_times["unet"] if p is not None else None
    how = next((r["train"]["direct"].get("memory_how") for r in rows
                if r["train"] and "memory_how" in r["train"]["direct"]), None)
    config = dict(width=width, size=size, n_images=n_images, batch=batch, device=str(device),
                  device_name=_device_label(device), torch=str(torch.__version__),
                  threads=torch.get_num_threads(), ckpt_dir=str(ckpt_dir) if ckpt_dir else None,
                  warmup=warmup, repeats=repeats, memory_how=how, model_options=options,
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  paper_reference="Li et al. 2021, Table 1: time for 20 images, GTX 1080 Ti, 256x256")
    return dict(config=config, models=rows)


def _fmt(v, spec: str, missing: str = "-") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return missing
    return format(v, spec)


def bench_rows(result: dict) -> list[dict]:
    """One flat dict per model (for a table or a DataFrame)."""
    out = []
    for r in result["models"]:
        tr = r.get("train") or {}
        d, a = tr.get("direct") or {}, tr.get("adjoint") or {}
        out.append({
            "model": r["model"], "params": r["params"], "param MB": r["param_mb"],
            f"time {r['n_images']} img (s)": r["time_s"], "x U-Net": r["ratio_to_unet"],
            "paper x U-Net": r["paper_ratio_to_unet"],
            "NFE fwd": ("/".join(f"{v:.0f}" for v in r["nfe_forward"].values()) or None),
            "step s": d.get("step_s"), "peak MB": d.get("peak_mb"),
            "step s adj": a.get("step_s"), "peak MB adj": a.get("peak_mb"),
            "weights": "trained" if r["weights"] != "random" else "random"})
    return out


def format_bench(result: dict) -> str:
    """The bench as a plain-text table, with its configuration on top."""
    c = result["config"]
    head = (f"bloodseg bench: width {c['width']}, {c['size']}x{c['size']}, {c['n_images']} images "
            f"(one at a time), train batch {c['batch']}, device {c['device_name']}, torch {c['torch']}")
    cols = [("model", 12, "s"), ("params", 10, ","), ("param MB", 9, ".2f"),
            (f"time {c['n_images']} img (s)", 16, ".3f"), ("x U-Net", 8, ".2f"),
            ("paper x U-Net", 13, ".1f"), ("NFE fwd", 9, "s"), ("step s", 8, ".2f"),
            ("peak MB", 9, ".0f"), ("step s adj", 10, ".2f"), ("peak MB adj", 11, ".0f"),
            ("weights", 8, "s")]
    lines = [head, "  ".join(name.rjust(w) for name, w, _ in cols)]
    for row in bench_rows(result):
        lines.append("  ".join(_fmt(row[name], spec).rjust(w) for name, w, spec in cols))
    lines.append("x U-Net: inference time / the U-Net's; paper x U-Net: Table 1 of Li et al. 2021 "
                 "(20 images, 256x256, GTX 1080 Ti, Keras). NFE fwd: forward NFE per ODE-block.")
    if c.get("memory_how"):
        lines.append(f"peak MB: {c['memory_how']}.")
    if not c.get("ckpt_dir"):
        lines.append("Random weights: trained ODE-blocks usually need more NFE (use --ckpt-dir).")
    return "\n".join(lines)


def plot_time_ratios(results: dict[str, dict], ax=None):
    """Inference time over the U-Net's for the nine single-block positions, one line per bench result
    (``{label: run_bench() result}``) next to the paper's Table 1, on a log axis. Returns the axes."""
    import matplotlib.pyplot as plt
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.6))
    positions = list(range(1, 10))
    paper = paper_time_ratios()
    ax.plot(positions, [paper.get(f"ode-unet-{k}", math.nan) for k in positions], "k--o", label="paper (GTX 1080 Ti)")
    for label, result in results.items():
        ratio = {r["model"]: r["ratio_to_unet"] for r in result["models"]}
        ax.plot(positions, [ratio.get(f"ode-unet-{k}", math.nan) for k in positions], "-o", label=label)
    ax.set_yscale("log")
    ax.set_xticks(positions)
    ax.set_xlabel("ODE-block position (5 = bottom of the U)")
    ax.set_ylabel("time / U-Net time")
    ax.axhline(1, color="grey", lw=0.8)
    ax.legend(fontsize=8)
    return ax


def export_bench(out=None, ckpt=None, solver=None, repeats: int = 3, threads: int = 1,
                 command: str | None = None, n_images: int | None = None) -> dict:
    """PyTorch eager against the ONNX export (:mod:`bloodseg.export`, run by onnxruntime) on the 16
    vendored BCCD photographs, with the same fixed-grid solver (``solver``; None: the checkpoint's
    stored one), in one process with ``threads`` threads each.

    Per photograph: the two masks of ``Segmenter.predict`` (same preprocessing, scale and cleanup)
    and their pixel agreement; the network input the predict fed (a forward pre-hook) and the
    largest logit difference on it; then ``repeats`` rounds in which eager and ONNX take turns
    (the first alternating), timing the network alone and the whole ``predict``; the median of
    each is kept. Returns the record, also written to ``out`` (JSON) when given, with provenance.
    ``n_images``: the first n photographs only (tests).
    """
    import statistics
    import tempfile

    import onnxruntime

    from ..bccd import bccd_sample_dir
    from ..calibrate import solver_label
    from ..export import export_onnx, load_onnx
    from ..io import read_image
    from ..segmenter import Segmenter, shipped_checkpoint
    from .records import provenance, write_record

    t_all, old_threads = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        seg = Segmenter.load(ckpt or shipped_checkpoint(), device="cpu")
        seg = seg if solver is None else seg.replace(solver=solver)
        with tempfile.TemporaryDirectory() as tmp:
            export_onnx(seg, Path(tmp) / "model.onnx")
            onnx_seg = load_onnx(Path(tmp) / "model.onnx", threads=threads)
        files = sorted((bccd_sample_dir() / "images").glob("*.jpg"))[:n_images]
        seen = []
        seg.predict(read_image(files[0])), onnx_seg.predict(read_image(files[0]))   # warm-up
        rows = []
        for f in files:
            image = read_image(f)
            seen.clear()
            hook = seg.model.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
            try:   # the hook only here: it would add a copy to the eager times
                mask_t = seg.predict(image)
            finally:
                hook.remove()
            mask_o = onnx_seg.predict(image)
            x = seen[0]
            with torch.inference_mode():
                diff = float((seg.model(x) - onnx_seg.model(x)).abs().max())
            jobs = {"eager": lambda _: seg.model(x), "onnx": lambda _: onnx_seg.model(x),
                    "predict_eager": lambda _: seg.predict(image), "predict_onnx": lambda _: onnx_seg.predict(image)}
            # each round: the networks alone, then the whole predict, each pair taking turns (the first alternating)
            turns = lambda r, k: k if r % 2 == 0 else [k[1], k[0], k[3], k[2]]   # noqa: E731
            with torch.inference_mode():
                times = interleaved_times(jobs, [None], repeats, order=turns)
            ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
            rows.append(dict(image=f.name, size=list(image.shape[:2]), network_input=list(x.shape),
                             eager_ms=ms["eager"], onnx_ms=ms["onnx"], ratio_onnx_to_eager=ms["onnx"] / ms["eager"],
                             predict_eager_ms=ms["predict_eager"], predict_onnx_ms=ms["predict_onnx"],
                             predict_ratio_onnx_to_eager=ms["predict_onnx"] / ms["predict_eager"],
                             pixel_agreement=float((mask_t == mask_o).mean()), max_abs_logit_diff=diff))
    finally:
        torch.set_num_threads(old_threads)
    mean = lambda k: statistics.fmean(r[k] for r in rows)   # noqa: E731
    summary = {k: mean(k) for k in ("eager_ms", "onnx_ms", "predict_eager_ms", "predict_onnx_ms")}
    summary.update(ratio_onnx_to_eager=summary["onnx_ms"] / summary["eager_ms"],
                   predict_ratio_onnx_to_eager=summary["predict_onnx_ms"] / summary["predict_eager_ms"],
                   pixel_agreement_min=min(r["pixel_agreement"] for r in rows),
                   pixel_agreement_mean=mean("pixel_agreement"),
                   max_abs_logit_diff=max(r["max_abs_logit_diff"] for r in rows))
    record = {
        "what": f"PyTorch eager vs onnxruntime (bloodseg.export) on the {len(rows)} vendored BCCD photographs, "
                f"solver {solver_label(seg.solver)} in both, {threads} thread(s) each, one process, eager and "
                f"ONNX taking turns; ms are medians of {repeats} rounds per photograph, summary means over "
                "photographs; 'eager_ms'/'onnx_ms' the network alone on the input predict feeds it, "
                "'predict_*' the whole Segmenter.predict (scale, CLAHE, network, cleanup)",
        "checkpoint": str(Path(ckpt or shipped_checkpoint()).name), "solver": seg.solver,
        "summary": summary, "images": rows,
        "provenance": provenance(command, t_all, threads_note=f"{threads} thread(s) each for torch and onnxruntime",
                                 threads=threads, onnxruntime=onnxruntime.__version__),
    }
    if out is not None:
        write_record(record, Path(out))
    return record
