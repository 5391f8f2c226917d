"""Export a :class:`~bloodseg.Segmenter`'s network to ONNX, and segment with the exported file.

With a fixed-grid ODE solver (``euler``, ``midpoint``, ``rk4``, ... with N steps, e.g. the shipped
checkpoint's calibrated ``euler`` with 1 step) every ODE-block evaluates f the same number of
times whatever the input, so the network is a static graph. ``torch.onnx.export(dynamo=False)``
(the TorchScript tracer) records torchdiffeq's fixed-grid loop as it runs; the exported logits
match the PyTorch ones to about 1e-5 (``tests/test_export.py``). An adaptive solver (``dopri5``)
chooses its steps from the data at run time, which a static graph cannot hold: it is refused.
Also left out of the graph: bloodseg's solver checks (non-finite state) and the NFE counters.

::

    seg = Segmenter.load(shipped_checkpoint())
    export_onnx(seg, "bccd.onnx")                 # its stored solver; or solver={"method": "rk4", "steps": 2}
    onnx_seg = load_onnx("bccd.onnx", threads=1)  # a Segmenter whose network runs in onnxruntime
    mask = onnx_seg.predict(image_bgr)            # same preprocessing, tiling, scale, cleanup

The graph takes a float32 ``N x 3 x H x W`` RGB batch in [0, 1] (``image``; N, H and W dynamic,
H and W multiples of 16) and returns ``N x classes x H x W`` logits (``logits``). The file also
carries the Segmenter's settings (metadata ``bloodseg.segmenter``: input scale, cleanup, CLAHE,
tiling, ...), so :func:`load_onnx` needs nothing else. ``bloodseg export`` is the command.
"""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import torch

from .calibrate import check_solver, solver_label
from .errors import BloodsegError, DataError
from .io import write_bytes
from .ode import ADAPTIVE_METHODS, ode_blocks
from .segmenter import Segmenter

__all__ = ["export_onnx", "load_onnx", "OnnxNetwork"]

OPSET = 17


def export_onnx(segmenter: Segmenter, path, solver=None, opset: int = OPSET) -> Path:
    """Write ``segmenter``'s network, with ``solver`` (a fixed-grid :mod:`bloodseg.calibrate` spec;
    None: the Segmenter's own solver, else its trained one), to the ONNX file ``path``.

    The file is written atomically (a temporary file in the same folder, then a rename): on any
    failure an existing ``path`` is left as it was. Raises :class:`BloodsegError` for an adaptive
    solver, :class:`DataError` when ``path`` cannot be written.
    """
    import onnx

    seg = segmenter if solver is None else segmenter.replace(solver=check_solver(solver))
    seg._use_solver()
    try:
        adaptive = sorted({b.method for b in ode_blocks(seg.model) if b.method in ADAPTIVE_METHODS})
        if adaptive:
            raise BloodsegError(
                f"cannot export to ONNX with the adaptive ODE solver {'/'.join(adaptive)} "
                f"({solver_label(seg.solver)}): it chooses its number of steps from the data at run time, "
                "so the network is not a static graph. Export with a fixed-grid solver instead: "
                "--solver euler:1 (or rk4:2, ...), export_onnx(seg, path, solver={'method': 'euler', "
                "'steps': 1}); `bloodseg calibrate` picks one that keeps the scores.")
        device = next(seg.model.parameters()).device
        dummy = torch.rand(1, int(seg.model.options.get("in_channels", 3)), 64, 64, device=device)
        axes = {0: "batch", 2: "height", 3: "width"}
        buf = io.BytesIO()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)   # the solver's checks are traced away
            warnings.simplefilter("ignore", DeprecationWarning)        # torch's notes on the legacy exporter
            torch.onnx.export(seg.model, (dummy,), buf, dynamo=False, opset_version=opset,
                              input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": axes, "logits": axes})
    finally:
        segmenter._use_solver()   # the network is shared: put the caller's solver back
    model = onnx.load_from_string(buf.getvalue())
    meta = {"bloodseg.segmenter": seg.settings(), "bloodseg.solver": solver_label(seg.solver),
            "bloodseg.model": {"name": seg.model.name, "options": seg.model.options}}
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=json.dumps(value, default=float))
    return write_bytes(path, model.SerializeToString())


class OnnxNetwork(torch.nn.Module):
    """An ONNX file in an onnxruntime session, called like the PyTorch network (a float32 CPU
    tensor in, logits out), so that a :class:`Segmenter` can use it. ``threads``: onnxruntime's
    intra-op threads (None: its default, all cores)."""

    def __init__(self, path, threads: int | None = None):
        super().__init__()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = opts.inter_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:   # onnxruntime raises its own exception types
            raise DataError(f"cannot load the ONNX file {path}: {str(exc)[:300]}. Export it again with "
                            "`bloodseg export --ckpt CKPT --onnx OUT`.") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        info = json.loads(meta.get("bloodseg.model", "{}"))
        self.name, self.options = "onnx", dict(info.get("options") or {"classes": 3})
        self.meta = meta
        self.anchor = torch.nn.Parameter(torch.zeros(0), requires_grad=False)  # device for infer.py

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(["logits"], {"image": x})[0])


def load_onnx(path, threads: int | None = None) -> Segmenter:
    """A :class:`Segmenter` whose network is the ONNX file ``path`` (from :func:`export_onnx`) run
    by onnxruntime, with the settings stored in the file: ``predict``, ``count``, ``predict_files``
    work as for the checkpoint."""
    if not Path(path).is_file():
        raise DataError(f"ONNX file not found: {path}; write one with `bloodseg export`")
    net = OnnxNetwork(path, threads)
    if "bloodseg.segmenter" not in net.meta:
        raise DataError(f"{path} has no bloodseg settings (metadata 'bloodseg.segmenter'): it was not "
                        "written by bloodseg.export.export_onnx; export it again with `bloodseg export`")
    return Segmenter(net, **json.loads(net.meta["bloodseg.segmenter"]), trained=())
