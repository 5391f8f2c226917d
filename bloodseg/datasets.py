"""From samples to training data: patches, augmentation, splits, the torch Dataset.

Readers live in :mod:`bloodseg.io` (image/mask files and folders), :mod:`bloodseg.labelme` and
:mod:`bloodseg.bccd`; this module cuts what they return into what :func:`bloodseg.train.fit` eats.

The paper's data recipe (§2): 256x256 crops from 775x519 smears, 20 crops held out for test,
the other 80 augmented x10 and split 3:1 into train and validation. :func:`make_splits` holds
the test crops out *by source image*, so no test crop shares pixels with a training crop.
"""
from __future__ import annotations

import fcntl
import functools
import zlib
from pathlib import Path

import cv2
import numpy as np
import torch

from .bccd import bccd_source, prepare_cached
from .classes import WHITE_CELL
from .errors import DataError
from .io import Sample, load_folder, load_splits
from .labelme import load_labelme_folder
from .preprocess import image_to_tensor
from .recipe import PRESETS, DataRecipe, get_recipe
from .stain import random_stain
from .synthetic import make_smear



# ----------------------------------------------------------------------------- patches, augmentation, splits

def extract_patches(samples: list[Sample], size: int = 256, per_image: int = 1, seed: int = 0,
                    focus: float = 0.5) -> list[Sample]:
    """``per_image`` random ``size``x``size`` crops of every sample (paper: 256x256 from 775x519).

    The paper cropped "suitable areas" by hand; white cells are rare (a few per smear), so purely
    random crops would mostly miss them. A share ``focus`` of the crops is therefore centred
    (with jitter) on a random white-cell pixel when the sample has one; the rest are uniform.
    Crops are named ``<name>_p00`` …, keep their sample's ``source``, and are deterministic by seed.
    """
    if not 0.0 <= focus <= 1.0:
        raise DataError(f"focus must be between 0 and 1; got {focus}")
    rng = np.random.default_rng(seed)
    patches = []
    for s in samples:
        h, w = s.mask.shape
        if h < size or w < size:
            raise DataError(f"image {s.name!r} is {w}x{h} (WxH), smaller than the {size}x{size} patch; "
                            "use a smaller patch size or leave this image out")
        white = np.argwhere(s.mask == WHITE_CELL)
        for j in range(int(per_image)):
            if len(white) and rng.random() < focus:
                cy, cx = white[rng.integers(len(white))] + rng.integers(-size // 4, size // 4 + 1, 2)
                y = int(np.clip(cy - size // 2, 0, h - size))
                x = int(np.clip(cx - size // 2, 0, w - size))
            else:
                y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
            patches.append(Sample(f"{s.name}_p{j:02d}", s.image[y:y + size, x:x + size].copy(),
                                  s.mask[y:y + size, x:x + size].copy(), s.source))
    return patches


def _jitter_colour(image: np.ndarray, rng) -> np.ndarray:
    """Mild stain/exposure change: hue ±3 (of 180), saturation and brightness x0.9-1.1."""
    hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV).astype(np.float32)
    hsv[..., 0] = np.mod(hsv[..., 0] + rng.uniform(-3, 3), 180)
    hsv[..., 1] *= rng.uniform(0.9, 1.1)
    hsv[..., 2] *= rng.uniform(0.9, 1.1)
    return cv2.cvtColor(np.clip(hsv + 0.5, 0, [179, 255, 255]).astype(np.uint8), cv2.COLOR_HSV2BGR)


def augment(samples: list[Sample], factor: int = 10, seed: int = 0, stain: float = 0.0) -> list[Sample]:
    """Each sample plus ``factor - 1`` copies: a flip/90°-rotation and a mild colour jitter.

    The geometry is applied identically to image and mask; the colour jitter touches the image
    only. Copies are named ``<name>_a1`` …, keep ``source``, and are deterministic by seed. The
    7 non-identity flips/rotations are used before any repeats (then only the colour differs).

    ``stain`` > 0 (``DataRecipe.stain``; for training samples only): every returned image, the
    originals included, then goes through :func:`bloodseg.stain.random_stain` at that strength,
    drawn from a second generator, so flips and jitter are those of ``stain=0``.
    """
    if int(factor) != factor or factor < 1:
        raise DataError(f"augmentation factor must be a whole number >= 1; got {factor!r}")
    rng = np.random.default_rng(seed)
    out = []
    for s in samples:
        out.append(s)
        order = rng.permutation(7) + 1            # dihedral transforms 1..7 (0 is the identity)
        for j in range(1, int(factor)):
            t = int(order[(j - 1) % 7])
            rot, flip = t % 4, t >= 4
            image, mask = np.rot90(s.image, rot), np.rot90(s.mask, rot)
            if flip:
                image, mask = image[:, ::-1], mask[:, ::-1]
            out.append(Sample(f"{s.name}_a{j}", _jitter_colour(np.ascontiguousarray(image), rng),
                              np.ascontiguousarray(mask), s.source))
    if stain:
        srng = np.random.default_rng([int(seed), 0x57A1])
        out = [Sample(s.name, random_stain(s.image, srng, stain), s.mask, s.source) for s in out]
    return out


def _take_sources(groups: list[tuple[str, list]], target: float) -> int:
    """How many of the (shuffled) source groups to take so their sample count is closest to target."""
    taken, count = 0, 0
    while taken < len(groups):
        size = len(groups[taken][1])
        if count > 0 and abs(count + size - target) >= abs(count - target):
            break
        if count == 0 and target <= 0:
            break
        count += size
        taken += 1
    return taken


def make_splits(samples: list[Sample], n_test: int, val_ratio: float = 0.25, seed: int = 0,
                factor: int = 1, stain: float = 0.0) -> dict[str, list[Sample]]:
    """Split by source image: test first (about ``n_test`` samples, never augmented), then
    train/val (``val_ratio`` of the rest, paper 3:1), then augment train and val ``factor`` times;
    ``stain`` (:func:`augment`) shifts the training samples' colours only, never val or test.

    Whole sources go to one side, so no test or validation sample shares a source image (or an
    augmented copy) with a training sample. Returns ``{"train": [...], "val": [...], "test": [...]}``.
    """
    if not samples:
        raise DataError("make_splits got no samples; load or generate images first")
    if not 0 <= val_ratio < 1:
        raise DataError(f"val_ratio must be in [0, 1); got {val_ratio}")
    groups: dict[str, list] = {}
    for s in samples:
        groups.setdefault(s.source, []).append(s)
    order = list(groups.items())
    order = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
    n_test_src = _take_sources(order, n_test)
    test_groups, rest = order[:n_test_src], order[n_test_src:]
    if not rest:
        raise DataError(f"holding out {n_test} test samples leaves nothing to train on: there are "
                        f"{len(samples)} samples from {len(groups)} source images; lower n_test or add images")
    n_val_src = min(_take_sources(rest, val_ratio * sum(len(g) for _, g in rest)), len(rest) - 1)
    if val_ratio > 0 and n_val_src == 0 and len(rest) > 1:
        n_val_src = 1
    val_groups, train_groups = rest[:n_val_src], rest[n_val_src:]
    flat = lambda gs: [s for _, g in gs for s in g]  # noqa: E731
    return {"train": augment(flat(train_groups), factor, seed, stain=stain),
            "val": augment(flat(val_groups), factor, seed + 1),
            "test": flat(test_groups)}


@functools.lru_cache(maxsize=4)
def _synthetic_splits_cached(profile_key: tuple) -> dict:
    n_source, size, patch, crops, n_test, factor, stain = profile_key
    smears = []
    for i in range(n_source):
        image, mask = make_smear(i, size=size)
        smears.append(Sample(f"smear_{i:04d}", image, mask, f"smear_{i:04d}"))
    patches = extract_patches(smears, size=patch, per_image=crops, seed=0)
    return make_splits(patches, n_test=n_test, val_ratio=0.25, seed=0, factor=factor, stain=stain)


def _data_recipe(recipe) -> DataRecipe:
    return recipe if isinstance(recipe, DataRecipe) else get_recipe(recipe).data


def synthetic_splits(recipe=None) -> dict[str, list[Sample]]:
    """The paper's data pipeline on synthetic smears, sized by a recipe (preset name, Recipe,
    DataRecipe, or None for ``$BLOODSEG_PROFILE``).

    ``n_source`` smears of ``image_size`` (seeds 0, 1, …) → ``crops_per_image`` patches of
    ``patch`` px each → ``n_test`` patches held out by source → the rest augmented x``augment``
    and split 3:1 into train/val (training patches stain-shifted when ``stain`` > 0). Cached in
    memory; treat the arrays as read-only.
    """
    d = _data_recipe(recipe)
    key = (d.n_source, tuple(d.image_size), d.patch, d.crops_per_image, d.n_test, d.augment, float(d.stain))
    cached = _synthetic_splits_cached(key)
    return {k: list(v) for k, v in cached.items()}


# ----------------------------------------------------------------------------- torch

class SegmentationDataset(torch.utils.data.Dataset):
    """Samples as ``(image float32 3xHxW RGB in [0, 1], mask int64 HxW)`` for a DataLoader.

    The image goes through :func:`bloodseg.preprocess.image_to_tensor` (CLAHE on luma first when
    ``clahe=True``, as everywhere else in bloodseg).
    """

    def __init__(self, samples: list[Sample], clahe: bool = True):
        for s in samples:
            if (s.image.dtype != np.uint8 or s.image.ndim != 3 or s.image.shape[2] != 3
                    or s.mask.shape != s.image.shape[:2]):
                raise DataError(f"sample {s.name!r} has image {s.image.dtype} {s.image.shape} and mask "
                                f"{s.mask.shape}; need BGR uint8 HxWx3 and an HxW mask of the same size")
        self.samples, self.clahe = list(samples), clahe

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        return image_to_tensor(s.image, clahe=self.clahe), torch.from_numpy(s.mask.astype(np.int64))


# ----------------------------------------------------------------------------- one entry point for training

def _crop16(s: Sample) -> Sample:
    """Top-left crop to the largest multiple of 16 so a whole image fits the models."""
    h, w = (d - d % 16 for d in s.mask.shape)
    if h == 0 or w == 0:
        raise DataError(f"image {s.name!r} is smaller than 16x16 pixels")
    return Sample(s.name, s.image[:h, :w], s.mask[:h, :w], s.source)


def _check_patch_fits(samples: list[Sample], d: DataRecipe, name: str, root: Path) -> None:
    for s in samples:
        h, w = s.mask.shape
        if h < d.patch or w < d.patch:
            sizes = ", ".join(f"{k} {v.data.patch}" for k, v in PRESETS.items())
            raise DataError(f"image {s.name!r} in {root.absolute()} is {w}x{h} (WxH), smaller than the "
                            f"{d.patch}x{d.patch} training patch of the '{name}' recipe; pick a profile "
                            f"with smaller patches (--profile or BLOODSEG_PROFILE: {sizes}), use larger "
                            "images, or leave this image out")


def resize_sample(s: Sample, scale: float) -> Sample:
    """A sample resized by ``scale``: the image with area averaging (bilinear when enlarging), the
    mask with nearest labels."""
    if scale == 1.0:
        return s
    h, w = s.mask.shape
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return Sample(s.name, cv2.resize(s.image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR),
                  cv2.resize(s.mask, size, interpolation=cv2.INTER_NEAREST), s.source)


def is_photograph_data(data) -> bool:
    """Whether ``data`` names real photographs with a split of their own: ``"bccd"``, a raw BCCD
    folder (``images/`` + ``wbc_masks/``) or a prepared one (``train/ val/ test/``)."""
    if str(data) == "bccd":
        return True
    root = Path(data)
    return root.is_dir() and ((root / "wbc_masks").is_dir() or all((root / s).is_dir() for s in ("train", "val", "test")))


def prepared_photographs(data) -> Path:
    """The prepared folder (``train/ val/ test/``) of photograph data: ``"bccd"`` is
    :func:`bloodseg.bccd.bccd_source`'s copy, a raw BCCD folder is prepared once
    (:func:`bloodseg.bccd.prepare_cached`) into ``runs/prepared/`` under the current folder."""
    if str(data) != "bccd" and all((Path(data) / s).is_dir() for s in ("train", "val", "test")):
        return Path(data)
    src = bccd_source()[0] if str(data) == "bccd" else bccd_source(data)[0]
    out = Path("runs") / "prepared" / f"bccd-{zlib.crc32(str(src.resolve()).encode()):08x}"
    out.parent.mkdir(parents=True, exist_ok=True)
    # one process prepares at a time (parallel test workers, two notebooks): the others wait, then reuse
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        prepare_cached(src, out)
    return out


def photograph_splits(data, recipe=None, seed: int = 0) -> dict[str, list[Sample]]:
    """``{"train": patches, "val": patches, "test": whole photographs}`` of photograph data with a
    split of its own (:func:`is_photograph_data`; BCCD's train/val/test).

    Train: every training photograph resized by ``data.scale`` (the magnification the network
    learns at, stored in its checkpoint as ``input_scale``), ``data.crops_per_image`` patches of
    ``data.patch`` px each, augmented ``data.augment`` times (and stain-shifted by ``data.stain``).
    Val: one patch from each of the first ``real.val_images`` validation photographs (all without a
    ``real`` section), resized alike. Test: the first ``real.eval_images`` test photographs, whole
    and at full size (sorted by name, so every profile scores a prefix of the same list).
    """
    r = get_recipe(recipe)
    d, real = r.data, r.real
    prepared = prepared_photographs(data)
    raw = load_splits(prepared)
    train = [resize_sample(s, d.scale) for s in raw["train"]]
    val = [resize_sample(s, d.scale) for s in raw["val"][: real.val_images if real else None]]
    _check_patch_fits(train + val, d, r.name, prepared)
    return {"train": augment(extract_patches(train, d.patch, d.crops_per_image, seed), d.augment, seed, stain=d.stain),
            "val": extract_patches(val, d.patch, 1, seed + 1),
            "test": raw["test"][: real.eval_images if real else None]}


def training_splits(data, recipe=None, seed: int = 0) -> dict[str, list[Sample]]:
    """``{"train", "val", "test"}`` sample lists for ``data``, sized by ``recipe`` (a preset name,
    a :class:`~bloodseg.recipe.Recipe`, or None for ``$BLOODSEG_PROFILE``). The one split path of
    ``bloodseg train``, ``train-bccd`` and the book:

    * ``"synthetic"`` – :func:`synthetic_splits` (the embedded default);
    * ``"bccd"``, a raw BCCD folder or a prepared one (``train/ val/ test/``, :func:`prepare_bccd`) –
      :func:`photograph_splits`: the data's own split, training at the recipe's ``data.scale``;
    * a folder with ``images/`` + ``masks/`` – patches, then :func:`make_splits` (test held out by
      source image, train/val 3:1, augmented);
    * a folder of LabelMe ``.json`` files – the same, after rasterising the shapes.
    """
    r = get_recipe(recipe)
    p = r.data
    if str(data) == "synthetic":
        return synthetic_splits(p)
    if is_photograph_data(data):
        return photograph_splits(data, r, seed)
    root = Path(data)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root.absolute()}. Pass 'synthetic', 'bccd', a folder with "
                        "images/ and masks/, a BCCD folder (raw, or prepare-bccd's train/ val/ test/), or LabelMe files")
    if (root / "images").is_dir():
        samples = load_folder(root)
    elif any(root.glob("*.json")):
        samples = load_labelme_folder(root)
    else:
        raise DataError(f"{root.absolute()} holds neither images/ + masks/, nor train/ val/ test/, "
                        "nor LabelMe .json files; see `bloodseg train --help`")
    samples = [resize_sample(s, p.scale) for s in samples]
    _check_patch_fits(samples, p, r.name, root)
    patches = extract_patches(samples, p.patch, p.crops_per_image, seed)
    n_test = max(1, round(len(patches) * p.n_test / max(1, p.n_source * p.crops_per_image)))
    return make_splits(patches, n_test=n_test, seed=seed, factor=p.augment, stain=p.stain)


def split_photographs(data, recipe, split: str = "test", names=None, seed: int = 0) -> list[Sample]:
    """The WHOLE photographs of one split of ``data`` (what ``bloodseg evaluate`` scores): for
    photograph data its own split at full size; for ``"synthetic"`` and folders the source images
    whose patches :func:`training_splits` put in ``split`` (``names``: those sources, e.g. as a
    checkpoint stored them, instead of recomputing the split)."""
    r = get_recipe(recipe)
    if is_photograph_data(data):
        folder = load_folder(prepared_photographs(data) / split)
        if names is not None:
            by = {s.name: s for s in folder}
            missing = [n for n in names if n not in by]
            if missing:
                raise DataError(f"{len(missing)} photograph(s) of the stored {split} split are not in {data}: "
                                f"{', '.join(missing[:3])}; is it the data the checkpoint was trained on?")
            return [by[n] for n in names]
        return folder if split != "test" or r.real is None else folder[: r.real.eval_images]
    if names is None:
        names = sorted({s.source for s in training_splits(data, r, seed)[split]})
    if str(data) == "synthetic":
        out = []
        for n in names:
            image, mask = make_smear(int(n.rsplit("_", 1)[1]), size=tuple(r.data.image_size))
            out.append(Sample(n, image, mask, n))
        return out
    root = Path(data)
    samples = load_folder(root) if (root / "images").is_dir() else load_labelme_folder(root)
    by = {s.source: s for s in samples}
    return [by[n] for n in names if n in by]
