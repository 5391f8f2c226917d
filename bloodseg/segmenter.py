"""A :class:`Segmenter`: a trained network with everything needed to use it on a photograph.

The network alone maps a normalised tensor to logits. To segment a smear photograph you also
need: CLAHE on the luma, the scale the network was trained at (BCCD models see photographs at
half size), how to tile a large image, the post-processing chosen for this network, the class
names, and where it came from (its recipe and scores). A Segmenter keeps all of it together and
is saved and loaded as one file (a weights-only checkpoint)::

    seg = Segmenter.load(shipped_checkpoint())
    mask = seg.predict(image_bgr)            # uint8 HxW in {0, 1, 2}
    probs = seg.predict_proba(image_bgr)     # float 3xHxW
    counts = seg.count(image_bgr)            # white and red cells
    seg.save("my.pt")

Old checkpoints (``input_scale`` / ``postprocess`` at the top level) load the same way.

``solver`` (None, or a spec of :mod:`bloodseg.calibrate` such as ``{"method": "euler", "steps": 1}``)
replaces the trained ODE solver of every ODE-block at prediction time; :meth:`Segmenter.calibrate`
chooses one on validation photographs, and ``Segmenter.load(path, exact=True)`` (or
``seg.replace(solver=None)``) gives the trained solver back, bit for bit.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from .batch import run_batch
from .calibrate import apply_solver, calibrate, check_solver, trained_solver
from .checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint, unwrap
from .classes import CLASS_NAMES
from .count import count_cells
from .distributed import default_device
from .errors import BloodsegError, CheckpointError
from .infer import predict_image, predict_probabilities
from .postprocess import check_postprocess, clean_white_cells, keep_crop_cell, min_area_at
from .scale import CROP_FACTORS, auto_scale, is_crop
from .stain import check_background, match_background

#: The use settings a Segmenter stores in its checkpoint under ``"segmenter"``.
SETTINGS = ("input_scale", "postprocess", "clahe", "tile", "overlap", "tta", "class_names", "solver",
            "red_cell_diameter", "scale", "background", "colour", "crop_cells")

#: The values of ``Segmenter.crop_cells``.
CROP_CELLS = ("centre", "all")


@dataclasses.dataclass
class Prediction:
    """What :meth:`Segmenter.segment` gives for one photograph: the ``mask`` (``uint8 HxW``, 0/1/2,
    after the cleanup), the resize ``factor`` the network saw it at, and when asked for, the class
    ``probs`` (``float32 C x H x W``) and the ``raw`` argmax before the cleanup."""
    mask: np.ndarray
    factor: float
    probs: torch.Tensor | None = None
    raw: np.ndarray | None = None


@dataclasses.dataclass
class Segmenter:
    """A network and how to use it. ``model`` is in eval mode; the other fields are plain values.

    * ``input_scale`` — photographs are resized by this before the network sees them (masks
      come back at full size);
    * ``postprocess`` — the white-cell cleanup spec (:mod:`bloodseg.postprocess`) or None;
    * ``clahe``, ``tile``, ``overlap``, ``tta`` — preprocessing, tiling, flip averaging;
    * ``recipe``, ``metrics`` — how it was made and what it scored (dicts, as stored);
    * ``solver`` — the ODE solver used to predict (a :mod:`bloodseg.calibrate` spec), or None for
      the trained one. The network is shared between copies (:meth:`replace`), so the solver is
      set on it again at every prediction, and the trained settings are kept here (``trained``,
      read from the network when a Segmenter is first built), not on the network;
    * ``red_cell_diameter`` — the typical red-cell diameter, in network pixels, of the photographs
      it was trained on (:mod:`bloodseg.scale`), or None when unknown;
    * ``scale`` — ``"fixed"``: every photograph is resized by ``input_scale``; ``"auto"``: a whole
      field by :func:`bloodseg.scale.auto_scale` (its red cells measured, and brought to
      ``red_cell_diameter``; ``input_scale`` when they cannot be measured or are within 20% of
      it), a crop (:func:`bloodseg.scale.is_crop`) at the factor the network is most confident at. Default: ``"auto"`` when ``red_cell_diameter`` is known, else ``"fixed"``.
      :meth:`scale_for` gives the factor used for one photograph.
    * ``background`` — the typical background colour (B, G, R) of the training photographs, or None;
    * ``colour`` — ``"background"``: each photograph's background is first brought to ``background``
      (:func:`bloodseg.stain.match_background`: undoes a lamp's or camera's colour cast); ``"none"``:
      photographs as they are. Default: ``"background"`` when ``background`` is known.
    * ``crop_cells`` — on a crop (:func:`bloodseg.scale.is_crop`): ``"centre"``, the white cells cut
      by its border are dropped except the crop's own, the one nearest its centre
      (:func:`bloodseg.postprocess.keep_crop_cell`; the default, adopted by the rule of
      book/results/domains/attempts/crop-centre-cell.json); ``"all"``: every white cell kept. Whole
      fields are never changed; the network's raw argmax (``postprocess=False``) neither.
    """
    model: torch.nn.Module
    input_scale: float = 1.0
    postprocess: dict | None = None
    clahe: bool = True
    tile: int = 512
    overlap: int = 64
    tta: bool = False
    class_names: tuple = CLASS_NAMES
    recipe: dict | None = None
    metrics: dict | None = None
    solver: dict | None = None
    red_cell_diameter: float | None = None
    scale: str | None = None
    background: tuple | None = None
    colour: str | None = None
    crop_cells: str = "centre"
    trained: tuple | None = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if not (isinstance(self.input_scale, (int, float)) and self.input_scale > 0
                and np.isfinite(self.input_scale)):
            raise BloodsegError(f"input_scale must be a positive number; got {self.input_scale!r}")
        self.input_scale = float(self.input_scale)
        if self.postprocess is not None:
            self.postprocess = check_postprocess(self.postprocess)
        if self.tile % 16 or self.tile < 16 or not 0 <= self.overlap < self.tile:
            raise BloodsegError(f"tile must be a positive multiple of 16 and 0 <= overlap < tile; got "
                                f"tile {self.tile}, overlap {self.overlap}")
        self.class_names = tuple(self.class_names)
        d = self.red_cell_diameter
        if d is not None and not (isinstance(d, (int, float)) and not isinstance(d, bool) and d > 0
                                  and np.isfinite(d)):
            raise BloodsegError(f"red_cell_diameter must be a positive number of pixels or None; got {d!r}")
        self.red_cell_diameter = None if d is None else float(d)
        if self.scale is None:
            self.scale = "fixed" if self.red_cell_diameter is None else "auto"
        if self.scale not in ("fixed", "auto"):
            raise BloodsegError(f"scale must be 'fixed' or 'auto'; got {self.scale!r}")
        if self.scale == "auto" and self.red_cell_diameter is None:
            raise BloodsegError("scale='auto' needs red_cell_diameter (the red-cell diameter, in network "
                                "pixels, of the training photographs); use scale='fixed'")
        if self.background is not None:
            self.background = check_background(self.background)
        self.colour = self.colour or ("none" if self.background is None else "background")
        if self.colour not in ("none", "background") or (self.colour == "background" and self.background is None):
            raise BloodsegError(f"colour must be 'none' or 'background' (which needs background, the training "
                                f"photographs' background colour); got colour={self.colour!r}, "
                                f"background={self.background!r}")
        if self.crop_cells not in CROP_CELLS:
            raise BloodsegError(f"crop_cells must be one of {', '.join(map(repr, CROP_CELLS))}; got {self.crop_cells!r}")
        self.model = unwrap(self.model).eval()
        if self.solver is not None:
            self.solver = check_solver(self.solver)
        if self.trained is None:
            self.trained = tuple(trained_solver(self.model))
        self._use_solver()

    def _use_solver(self) -> None:
        """Put this Segmenter's solver (or the trained one) on every ODE-block of the network."""
        apply_solver(self.model, self.solver, self.trained)

    # ------------------------------------------------------------------ files
    @classmethod
    def load(cls, path, device=None, exact: bool = False, **solver_overrides) -> "Segmenter":
        """Read a checkpoint (``torch.load(weights_only=True)``: a file that would run code is
        refused). ``solver_overrides`` change ODE solver settings (e.g. ``rtol=1e-3``).
        ``exact=True`` ignores a stored (calibrated) ``solver``: the trained solver is used."""
        ckpt = load_checkpoint(path)
        model = model_from_checkpoint(ckpt, path, **solver_overrides)
        settings = ckpt.get("segmenter")
        settings = {} if settings is None else settings
        if not isinstance(settings, dict):
            raise CheckpointError(f"{path} is damaged: its segmenter settings are a "
                                  f"{type(settings).__name__}, not a dict; re-save it with Segmenter.save")
        settings = dict(settings)
        for key in ("input_scale", "postprocess"):   # checkpoints written before the Segmenter
            if key not in settings and ckpt.get(key) is not None:
                settings[key] = ckpt[key]
        if settings.get("postprocess") is not None:
            try:
                check_postprocess(settings["postprocess"])
            except BloodsegError as exc:
                raise CheckpointError(f"{path} has an invalid 'postprocess' entry: {exc}") from None
        unknown = set(settings) - set(SETTINGS)
        if unknown:
            raise CheckpointError(f"{path} has unknown segmenter settings {sorted(unknown)}")
        if exact:   # the trained solver; a stored one is not even read
            settings["solver"] = None
        if settings.get("solver") is not None:
            try:
                check_solver(settings["solver"])
            except BloodsegError as exc:
                raise CheckpointError(f"{path} has an invalid 'solver' entry: {exc}; load it with "
                                      "exact=True (--exact) or re-save it with Segmenter.save") from None
        try:
            seg = cls(model.to(device or default_device()), recipe=ckpt.get("recipe"),
                      metrics=ckpt.get("metrics"), **settings)
        except (BloodsegError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path} has invalid segmenter settings {settings}: {exc}") from None
        return seg

    def settings(self) -> dict:
        """The use settings as plain values (what :meth:`save` stores under ``"segmenter"``)."""
        out = {k: getattr(self, k) for k in SETTINGS}
        out["class_names"] = list(self.class_names)
        return out

    def save(self, path, **extra) -> Path:
        """Write one weights-only checkpoint (atomically): weights, architecture, settings, recipe,
        metrics, and ``extra`` top-level entries."""
        entries = dict(segmenter=self.settings(), **extra)
        if self.recipe is not None:
            entries["recipe"] = self.recipe
        if self.metrics is not None:
            entries["metrics"] = self.metrics
        return save_checkpoint(path, self.model, **entries)

    def replace(self, **changes) -> "Segmenter":
        """A copy with some settings changed (the same network object, the same trained solver)."""
        return dataclasses.replace(self, **changes)

    def calibrate(self, samples, **kw) -> "Segmenter":
        """A copy with the solver :func:`bloodseg.calibrate.calibrate` chooses on ``samples``
        (VALIDATION photographs with gold masks, never the test ones), and the calibration table
        in ``metrics["calibration"]``. ``kw`` go to :func:`~bloodseg.calibrate.calibrate`."""
        result = calibrate(self, samples, **kw)
        metrics = dict(self.metrics or {})
        metrics["calibration"] = json.loads(json.dumps(result, default=float))
        return self.replace(solver=result["chosen"], metrics=metrics)

    # ------------------------------------------------------------------ one image
    def prepare(self, image_bgr: np.ndarray) -> np.ndarray:
        """The photograph as the network is given it before scaling: its colour matched (``colour``)."""
        return image_bgr if self.colour == "none" else match_background(image_bgr, self.background)

    def scale_for(self, image_bgr: np.ndarray) -> float:
        """The factor ``image_bgr`` is resized by before the network sees it: ``input_scale``, or
        with ``scale="auto"``: on a whole field :func:`bloodseg.scale.auto_scale` (its red cells
        measured), on a crop (:func:`bloodseg.scale.is_crop`) the factor of :meth:`_crop_scale`."""
        if self.scale != "auto":
            return self.input_scale
        crop = self._crop_scale(image_bgr, self.tta)
        return crop[0] if crop else auto_scale(image_bgr, self.red_cell_diameter, self.input_scale)

    def _crop_scale(self, image_bgr: np.ndarray, tta: bool):
        """On a crop, ``(factor, probabilities)``: the factor among :data:`bloodseg.scale.CROP_FACTORS`
        x ``input_scale`` at which the network is most confident (the highest mean, over the picture,
        of its largest class probability; a tie goes to the smaller factor), with its probabilities.
        None on a whole field. A crop has too few whole red cells to measure: the ones cut by its
        border look small (adopted by the rule of book/results/domains/attempts/scale-crops-confidence.json)."""
        if not is_crop(image_bgr):
            return None
        self._use_solver()
        best = None
        for c in CROP_FACTORS:
            f = c * self.input_scale
            probs = predict_probabilities(self.model, image_bgr, tile=self.tile, overlap=self.overlap,
                                          clahe=self.clahe, tta=tta, input_scale=f)
            conf = float(probs.max(0).values.mean())
            if best is None or conf > best[2] + 1e-9:
                best = (f, probs, conf)
        return best[0], best[1]

    def segment(self, image_bgr: np.ndarray, postprocess=None, tta: bool | None = None, *,
                probabilities: bool = False, raw: bool = False, input_scale: float | None = None,
                prepared: bool = False) -> "Prediction":
        """The one path from a photograph to its mask, which every use of a Segmenter takes
        (``predict``, ``count``, the batch runs, ``bloodseg evaluate`` and the book's records):

        1. :meth:`prepare` — the colour rule (``colour``), unless ``prepared``;
        2. :meth:`scale_for` — the resize factor (``scale``), unless ``input_scale`` is given;
        3. the network on the resized photograph (tiled, CLAHE on the luma, flips with ``tta``),
           probabilities back at full size, argmax;
        4. the white-cell cleanup (``postprocess`` as in :meth:`predict`) at that factor; then, on a
           crop, the crop rule (``crop_cells``), unless ``postprocess`` is False.

        Returns a :class:`Prediction`: ``mask``, ``factor``, and with ``probabilities`` the class
        probabilities, with ``raw`` the argmax before the cleanup (one pass of the network for both).
        """
        image_bgr = image_bgr if prepared else self.prepare(image_bgr)
        spec = self._postprocess(postprocess)
        tta = self.tta if tta is None else tta
        crop = self._crop_scale(image_bgr, tta) if input_scale is None and self.scale == "auto" else None
        probs = None
        if crop:
            factor, probs = crop
        else:
            factor = float(self.scale_for(image_bgr) if input_scale is None else input_scale)
        self._use_solver()
        if probs is None and not (probabilities or raw):
            mask = predict_image(self.model, image_bgr, tile=self.tile, overlap=self.overlap, clahe=self.clahe,
                                 tta=tta, input_scale=factor, postprocess=spec)
            return Prediction(self._crop_rule(mask, postprocess), factor)
        if probs is None:
            probs = predict_probabilities(self.model, image_bgr, tile=self.tile, overlap=self.overlap,
                                          clahe=self.clahe, tta=tta, input_scale=factor)
        argmax = probs.argmax(0).numpy().astype(np.uint8)
        mask = (clean_white_cells(argmax, probs, min_area_at(spec, factor), spec["fill_white_holes"])
                if spec else argmax)
        return Prediction(self._crop_rule(mask, postprocess), factor, probs if probabilities else None, argmax if raw else None)

    def predict_proba(self, image_bgr: np.ndarray, tta: bool | None = None, *,
                      input_scale: float | None = None, prepared: bool = False) -> torch.Tensor:
        """Class probabilities ``float32 C x H x W`` for a BGR ``uint8 HxWx3`` image of any size
        (:meth:`segment`'s). ``input_scale``: this factor instead of :meth:`scale_for`'s;
        ``prepared``: the image has been through :meth:`prepare` already."""
        return self.segment(image_bgr, False, tta, probabilities=True, input_scale=input_scale,
                            prepared=prepared).probs

    def predict(self, image_bgr: np.ndarray, postprocess=None, tta: bool | None = None, *,
                input_scale: float | None = None, prepared: bool = False) -> np.ndarray:
        """Mask ``uint8 HxW`` in {0 background, 1 white cell, 2 red cell} (:meth:`segment`'s).

        ``postprocess``: None (default) applies this Segmenter's own cleanup (if any); False gives
        the network's argmax alone; a dict is used as given; True without a stored spec is an error.
        ``input_scale``, ``prepared``: as for :meth:`predict_proba`.
        """
        return self.segment(image_bgr, postprocess, tta, input_scale=input_scale, prepared=prepared).mask

    def count(self, image_bgr: np.ndarray, red_radius: float | None = None, postprocess=None) -> dict:
        """White and red cells of one image (:func:`bloodseg.count.count_cells` on :meth:`predict`)."""
        return count_cells(self.predict(image_bgr, postprocess), red_radius=red_radius)

    def _crop_rule(self, mask: np.ndarray, postprocess) -> np.ndarray:
        """``mask`` after the crop rule (``crop_cells``): only on a crop, never on the raw argmax."""
        if self.crop_cells == "all" or postprocess is False or not is_crop(mask):
            return mask
        return keep_crop_cell(mask)

    def _postprocess(self, postprocess) -> dict | None:
        if postprocess is False:
            return None
        if postprocess is None or postprocess is True:
            if self.postprocess is None and postprocess is True:
                raise BloodsegError("postprocess=True, but this segmenter carries no post-processing (its "
                                    "checkpoint has no 'postprocess'); pass a dict such as "
                                    "{'white_min_area': 4000, 'fill_white_holes': True}")
            return self.postprocess
        return check_postprocess(postprocess)

    # ------------------------------------------------------------------ many files (see bloodseg.batch)
    def _mask_and_probs(self, image, postprocess, need_probs: bool):
        p = self.segment(image, postprocess, probabilities=need_probs)
        return p.mask, p.probs, p.factor

    def predict_files(self, paths, out_dir, overlays: bool = True, postprocess=None, *, skip_existing: bool = False,
                      progress: bool | None = None, instances=None, pixel_size_um=None,
                      save_probabilities: bool = False) -> list[dict]:
        """Predict every image (files or folders); write ``<stem>.png`` (mask, values 0/1/2) and
        ``<stem>_overlay.png``; with ``instances`` (a folder) ``<stem>_instances.png`` and
        ``<stem>_cells.csv`` (:mod:`bloodseg.instances`, ``pixel_size_um`` gives areas in µm²); with
        ``save_probabilities`` ``<stem>_probs.npz`` (float16) next to the masks.

        Returns one row per input, in order: ``{"image", "mask", "height", "width", "fraction_*",
        "overlay", "scale"}`` (``scale``: the resize factor used, :meth:`scale_for`) for a written image, the same with ``"skipped": True`` for one kept by
        ``skip_existing``, and ``{"image", "error"}`` for one that failed (reported on stderr and
        skipped; see :mod:`bloodseg.batch`). Refuses (before writing anything) when two inputs share a
        stem, or when an output would overwrite an input image. Every file is written atomically.
        """
        def row_of(f, mask, outputs):
            row = {"image": str(f), "mask": str(outputs[0]), "height": mask.shape[0], "width": mask.shape[1],
                   **{f"fraction_{k}": float((mask == i).mean())
                      for i, k in enumerate(("background", "white", "red"))}}
            if overlays:
                row["overlay"] = str(outputs[1])
            return row
        return run_batch(self, paths, out_dir, overlays, postprocess, skip_existing, progress, instances,
                           pixel_size_um, save_probabilities, row_of, "predict")

    def count_files(self, paths, red_radius: float | None = None, masks_out=None, postprocess=None, *,
                    skip_existing: bool = False, progress: bool | None = None, instances=None,
                    pixel_size_um=None, save_probabilities: bool = False) -> list[dict]:
        """Count the cells of every image (files or folders); one row per image with
        :data:`bloodseg.count.COUNT_COLUMNS` and ``"scale"``. With ``masks_out`` the masks and overlays are written
        too; ``instances``, ``pixel_size_um``, ``save_probabilities`` (into ``masks_out``, else
        ``instances``), ``skip_existing`` (the count is made again from the saved mask, without the
        network; needs ``masks_out``) and ``progress`` as in :meth:`predict_files`. A failed image
        gives ``{"image", "error"}``."""
        if skip_existing and masks_out is None:
            raise BloodsegError("skip_existing needs masks_out (--masks): the counts are made again from the "
                                "saved masks")

        def row_of(f, mask, outputs):
            return {"image": str(f), **count_cells(mask, red_radius=red_radius)}
        return run_batch(self, paths, masks_out, True, postprocess, skip_existing, progress, instances,
                           pixel_size_um, save_probabilities, row_of, "count")


#: File name of the shipped checkpoint in ``bloodseg/data/checkpoints/``.
SHIPPED_NAME = "bccd-nodes-unet-w16.pt"


def shipped_checkpoint() -> Path:
    """Path of the BCCD-trained checkpoint that ships with bloodseg (see its README.md)."""
    path = Path(__file__).resolve().parent / "data" / "checkpoints" / SHIPPED_NAME
    if not path.is_file():
        raise CheckpointError(f"the shipped checkpoint is missing at {path}; reinstall bloodseg, or "
                              "make it with `bloodseg train-bccd` (recipe in bloodseg/data/checkpoints/README.md)")
    return path
