"""The one configuration type: a :class:`Recipe` says how a number was made.

A recipe has four sections, and a fifth for real photographs, each a plain frozen dataclass:

* :class:`DataRecipe` — which smears, how many, cut into which patches, augmented how;
* :class:`ModelRecipe` — the network's name, width and extra options (solver, tolerances);
* :class:`TrainRecipe` — every knob of :func:`bloodseg.train.fit` (epochs, batch, lr, ...);
* :class:`MeasureRecipe` — how results are measured (timed images, tolerances, memory sizes);
* :class:`RealDataRecipe` (optional, ``real``) — training on real photographs (BCCD): which of them
  validate and score, the synthetic pretraining, the fine-tuning learning rate.

Named presets (:data:`PRESETS`) are the book's profiles: ``smoke`` (seconds, CI), ``quick`` (a
2-core CPU, minutes a chapter) and ``full`` (the paper's setting). ``BLOODSEG_PROFILE`` picks
one; :func:`get_recipe` returns it. Experiments derive theirs with :meth:`Recipe.replace`
(``recipe.replace(**{"train.epochs": 3})``), so a difference between two runs is always a
visible field, never a branch in library code. A recipe is stored, as :meth:`Recipe.to_dict`,
in every checkpoint and every record. :data:`REAL_PRESETS` are the same profiles for real
photographs (chapter 8), plus ``ship``, the recipe of ``bloodseg train-bccd``'s defaults.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import torch

from .errors import BloodsegError
from .ode import check_regularise


@dataclasses.dataclass(frozen=True)
class DataRecipe:
    """The data of a run. Synthetic smears are made by :func:`bloodseg.synthetic.make_smear`."""
    n_source: int = 50              # synthetic source smears (seeds 0, 1, ...)
    image_size: tuple = (519, 775)  # (H, W) of a synthetic smear (the paper's MISP: 519x775)
    patch: int = 256                # side of a square patch cut from a smear (paper: 256)
    crops_per_image: int = 2        # patches cut from each source image
    n_test: int = 20                # patches held out for test, by source (paper: 20 of 100)
    augment: int = 10               # augmentation factor of train/val patches (paper: x10)
    train_patch: int | None = None  # > 0: train/validate on random crops of this side instead
    crops_per_patch: int = 1        # crops per patch when train_patch is set
    max_train: int | None = None    # keep a seeded subset of this many training patches
    max_val: int | None = None      # ... and of validation patches
    scale: float = 1.0              # photographs are resized by this before the model sees them
    stain: float = 0.0              # 0-1: stain/camera shifts of training samples (bloodseg.stain.random_stain)
    shift: float = 0.0              # 0-1: photographs: patches drawn afresh per epoch under domain shift (bloodseg.shift)


@dataclasses.dataclass(frozen=True)
class ModelRecipe:
    """The network: a name from :data:`bloodseg.models.MODEL_NAMES`, its width and options."""
    name: str = "unet"
    width: int = 32                 # channels of the first U-Net level (paper: 32, half the usual 64)
    options: dict = dataclasses.field(default_factory=dict)   # e.g. rtol, method, ode_hidden


def _whole(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class TrainRecipe:
    """Every knob of a training run (:func:`bloodseg.train.fit`).

    Several processes (``torchrun``): ``batch_size`` is per process, so N processes train with an
    effective batch of ``batch_size * N``. ``scale_lr=True`` multiplies ``lr`` by N (the linear
    scaling rule of Goyal et al. 2017). ``sync_bn`` (default) computes BatchNorm statistics over
    the global batch; ``sync_bn=False`` keeps per-process statistics (Keras' ``multi_gpu_model``).
    """
    epochs: int = 50
    batch_size: int = 8            # per process; the effective batch is batch_size * world size
    lr: float = 1e-3
    optimizer: str = "adam"        # "adam" or "adamw"
    weight_decay: float = 0.0
    seed: int = 0
    checkpoint_every: int = 0      # also write last.pt every N steps inside an epoch (0: epoch ends only)
    bf16: bool = False             # bf16 autocast on CUDA (ignored on CPU)
    num_workers: int = 0
    progress: bool | None = None   # tqdm bars; None = only when attached to a terminal/notebook
    scale_lr: bool = False         # multiply lr by the world size (linear scaling rule)
    sync_bn: bool = True           # under DDP: BatchNorm statistics of the global batch
    schedule: str = "constant"     # "constant" lr, or "cosine": lr * (1 + cos(pi * epoch / epochs)) / 2
    max_minutes: float = 0.0       # > 0: start no new epoch once this much wall time would be exceeded
    ode_reg: dict = dataclasses.field(default_factory=dict)   # {"kinetic": a, "jacobian": b}: RNODE penalties

    def validate(self) -> None:
        """Raise :class:`BloodsegError` naming the first field that cannot work."""
        if not (_whole(self.epochs) and _whole(self.batch_size)) \
                or self.epochs < 1 or self.batch_size < 1:
            raise BloodsegError(f"epochs and batch_size must be whole numbers >= 1; got "
                                f"{self.epochs!r}, {self.batch_size!r}")
        if not (_real(self.lr) and self.lr > 0 and math.isfinite(self.lr)):
            raise BloodsegError(f"learning rate must be a positive number; got {self.lr}")
        if self.optimizer not in ("adam", "adamw"):
            raise BloodsegError(f"optimizer must be 'adam' or 'adamw'; got {self.optimizer!r}")
        if self.schedule not in ("constant", "cosine"):
            raise BloodsegError(f"schedule must be 'constant' or 'cosine'; got {self.schedule!r}")
        if not (_real(self.max_minutes) and self.max_minutes >= 0 and math.isfinite(self.max_minutes)):
            raise BloodsegError(f"max_minutes must be 0 (no limit) or a positive number; got {self.max_minutes}")
        if not (_real(self.weight_decay) and self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise BloodsegError(f"weight_decay must be >= 0; got {self.weight_decay}")
        if not (_whole(self.checkpoint_every) and _whole(self.num_workers)) \
                or self.checkpoint_every < 0 or self.num_workers < 0:
            raise BloodsegError(f"checkpoint_every and num_workers must be >= 0; got "
                                f"{self.checkpoint_every}, {self.num_workers}")
        check_regularise(self.ode_reg)


@dataclasses.dataclass(frozen=True)
class MeasureRecipe:
    """How results are measured, besides the test split itself."""
    n_timed: int = 20                                   # the paper's "time for 20 test images"
    tolerances: tuple = (1e-1, 1e-2, 1e-3, 1e-4, 1e-6)  # test-time tolerance curve
    loose_rtol: float = 1e-3                            # the looser test-time tolerance lever
    mem_size: int = 256                                 # image side of the adjoint-memory step
    mem_batch: int = 2
    try_compile: bool = False                           # also time torch.compile'd ODE functions


@dataclasses.dataclass(frozen=True)
class RealDataRecipe:
    """Training on real photographs (BCCD, :mod:`bloodseg.paper.bccd`): synthetic pretraining, then
    fine-tuning on the BCCD training photographs.

    With this section the data section's ``scale``, ``patch``, ``crops_per_image``, ``augment`` and
    ``stain`` apply to the BCCD training photographs (its synthetic-smear fields are not used), the
    model's ``width`` to every network, ``train.lr`` to training from scratch and to the synthetic
    pretraining, and ``train.epochs`` to the epochs on BCCD.
    """
    val_images: int | None = None        # BCCD validation photographs that pick the best epoch (None: all)
    eval_images: int | None = None       # BCCD test photographs scored (None: the whole test split)
    finetune_lr: float = 1e-3            # learning rate on BCCD after the synthetic pretraining
    pretrain_smears: int = 16            # synthetic smears (pretrain_size, seeds 0, 1, ...) to pretrain on
    pretrain_crops: int = 4              # patches per pretraining smear
    pretrain_epochs: int = 2
    pretrain_size: tuple = (240, 320)    # (H, W) of a pretraining smear: a resized BCCD photograph's size
    count_smears: int = 0                # held-out synthetic smears of the counting check
    count_size: tuple = (480, 640)       # (H, W) of a smear of the counting check


def _plain(x):
    """Tuples to lists, recursively: what JSON gives back, so a stored recipe compares equal."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


_SECTIONS = {"data": DataRecipe, "model": ModelRecipe, "train": TrainRecipe, "measure": MeasureRecipe,
             "real": RealDataRecipe}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Data + model + training + measurement (+ real photographs): everything that decides a number."""
    name: str
    data: DataRecipe = DataRecipe()
    model: ModelRecipe = ModelRecipe()
    train: TrainRecipe = TrainRecipe()
    measure: MeasureRecipe = MeasureRecipe()
    real: RealDataRecipe | None = None   # only a recipe for real photographs has it

    def replace(self, name: str | None = None, **changes: Any) -> "Recipe":
        """A copy with ``changes`` applied: ``"section.field": value`` (``{"train.epochs": 3}``) or
        ``section=dataclass``. Unknown sections or fields are a clear error. A ``real.*`` change to a
        recipe without that section starts from :class:`RealDataRecipe`'s defaults."""
        sections = {k: getattr(self, k) for k in _SECTIONS}
        for key, value in changes.items():
            section, _, field = key.partition(".")
            if section not in _SECTIONS:
                raise BloodsegError(f"unknown recipe section {section!r} in {key!r}: choose one of "
                                    f"{', '.join(_SECTIONS)}")
            if not field:
                sections[section] = value
                continue
            names = {f.name for f in dataclasses.fields(_SECTIONS[section])}
            if field not in names:
                raise BloodsegError(f"unknown recipe field {key!r}: {section} has {', '.join(sorted(names))}")
            sections[section] = dataclasses.replace(sections[section] or _SECTIONS[section](), **{field: value})
        return Recipe(name=name or self.name, **sections)

    def to_dict(self) -> dict:
        """Plain JSON-able values (tuples become lists), as stored in checkpoints and records; ``real``
        only when the recipe has it (so a recipe without it reads as it did before that section)."""
        return _plain({"name": self.name, **{k: dataclasses.asdict(getattr(self, k)) for k in _SECTIONS
                                             if getattr(self, k) is not None}})

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        """Inverse of :meth:`to_dict`; unknown fields are an error, missing ones take defaults (a
        missing ``real`` section stays None)."""
        if not isinstance(d, dict) or not isinstance(d.get("name", ""), str):
            raise BloodsegError(f"a recipe must be a dict with a 'name'; got {type(d).__name__}")
        sections = {}
        for key, kind in _SECTIONS.items():
            if key == "real" and d.get(key) is None:
                sections[key] = None
                continue
            values = d.get(key) or {}
            if not isinstance(values, dict):
                raise BloodsegError(f"recipe section {key!r} must be a dict of fields; got "
                                    f"{type(values).__name__} {values!r:.60}")
            values = dict(values)
            names = {f.name for f in dataclasses.fields(kind)}
            extra = set(values) - names
            if extra:
                raise BloodsegError(f"recipe section {key!r} has unknown field(s) {sorted(extra)}")
            for f in dataclasses.fields(kind):
                if f.name in values and isinstance(values[f.name], list):
                    values[f.name] = tuple(values[f.name])
            sections[key] = kind(**values)
        return cls(name=d.get("name", "custom"), **sections)

    def describe(self) -> str:
        d, m, t = self.data, self.model, self.train
        crops = (f"{d.crops_per_patch} random {d.train_patch} px crop(s) per train/val patch"
                 if d.train_patch else f"{d.patch} px patches")
        subset = (f", at most {d.max_train or 'all'} train / {d.max_val or 'all'} val patches"
                  if d.max_train or d.max_val else "")
        return (f"recipe {self.name}: width {m.width}, {t.epochs} epoch(s), batch {t.batch_size}, "
                f"{t.optimizer} lr {t.lr:g}, seed {t.seed}; {crops}{subset}; "
                f"time for {self.measure.n_timed} test images")


PRESETS: dict[str, Recipe] = {
    "smoke": Recipe("smoke",
                    DataRecipe(n_source=4, image_size=(160, 240), patch=64, crops_per_image=3, n_test=4,
                               augment=2),
                    ModelRecipe(width=8),
                    TrainRecipe(epochs=1, batch_size=4, lr=3e-3),
                    MeasureRecipe(n_timed=5, tolerances=(1e-2, 1e-6), mem_size=64)),
    "quick": Recipe("quick",
                    DataRecipe(n_source=16, image_size=(519, 775), patch=128, crops_per_image=4, n_test=12,
                               augment=4),
                    ModelRecipe(width=16),
                    TrainRecipe(epochs=6, batch_size=8, lr=2e-3),
                    MeasureRecipe(mem_size=128)),
    "full": Recipe("full",
                   DataRecipe(n_source=50, image_size=(519, 775), patch=256, crops_per_image=2, n_test=20,
                              augment=10),
                   ModelRecipe(width=32),
                   TrainRecipe(epochs=50, batch_size=8, lr=1e-3),
                   MeasureRecipe(mem_size=256, try_compile=True)),
}


#: The same profiles for real photographs (:mod:`bloodseg.paper.bccd`, chapter 8), and ``ship``:
#: ``bloodseg train-bccd``'s defaults (a CPU-sized version of the shipped checkpoint's recipe,
#: which bloodseg/data/checkpoints/README.md gives). Every network of a chapter gets the same
#: recipe; the model name says only which one ``train-bccd`` trains.
REAL_PRESETS: dict[str, Recipe] = {
    "smoke": Recipe("smoke", DataRecipe(patch=64, crops_per_image=1, augment=1, scale=0.5), ModelRecipe(width=8),
                    TrainRecipe(epochs=1, batch_size=8, lr=3e-3),
                    real=RealDataRecipe(val_images=2, eval_images=2, finetune_lr=2e-3, pretrain_smears=2,
                                        pretrain_crops=2, pretrain_epochs=1, count_smears=2, count_size=(160, 240))),
    "quick": Recipe("quick", DataRecipe(patch=128, crops_per_image=1, augment=1, scale=0.5), ModelRecipe(width=8),
                    TrainRecipe(epochs=3, batch_size=8, lr=2e-3),
                    real=RealDataRecipe(val_images=24, eval_images=24, finetune_lr=1e-3, pretrain_smears=10,
                                        pretrain_crops=4, pretrain_epochs=2, count_smears=6, count_size=(360, 480))),
    "full": Recipe("full", DataRecipe(patch=128, crops_per_image=2, augment=4, scale=0.5), ModelRecipe(width=32),
                   TrainRecipe(epochs=30, batch_size=8, lr=1e-3),
                   real=RealDataRecipe(val_images=None, eval_images=None, finetune_lr=5e-4, pretrain_smears=50,
                                       pretrain_crops=4, pretrain_epochs=10, count_smears=20)),
    "ship": Recipe("ship", DataRecipe(patch=128, crops_per_image=4, augment=1, scale=0.5),
                   ModelRecipe(name="nodes-unet", width=8), TrainRecipe(epochs=5, batch_size=8, lr=2e-3),
                   real=RealDataRecipe(val_images=40, eval_images=None, finetune_lr=1e-3, pretrain_smears=16,
                                       pretrain_crops=4, pretrain_epochs=2, count_smears=0)),
}


def profile_name(name: str | None = None) -> str:
    """``name``, else ``$BLOODSEG_PROFILE``, else ``full`` on CUDA / ``quick`` on a CPU (checked)."""
    if isinstance(name, Recipe):
        return name.name
    if name is None:
        name = os.environ.get("BLOODSEG_PROFILE") or ("full" if torch.cuda.is_available() else "quick")
    key = str(name).strip().lower()
    if key not in PRESETS:
        raise BloodsegError(
            f"unknown profile {name!r}: choose one of {', '.join(PRESETS)} "
            "(set BLOODSEG_PROFILE or pass --profile)")
    return key


def get_recipe(name: "str | Recipe | None" = None) -> Recipe:
    """The preset recipe ``name`` (see :func:`profile_name`); a :class:`Recipe` is returned as is."""
    if isinstance(name, Recipe):
        return name
    return PRESETS[profile_name(name)]


def real_recipe(name: "str | Recipe | None" = None) -> Recipe:
    """The real-photograph recipe (:data:`REAL_PRESETS`) ``"ship"``, or that of a profile (a name, a
    profile's :class:`Recipe`, or None for the current profile; see :func:`profile_name`)."""
    return REAL_PRESETS["ship" if name == "ship" else profile_name(name)]
