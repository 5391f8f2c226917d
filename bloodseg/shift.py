"""Training for domain shift: every training patch drawn as another microscope might have taken it.

A network trained on one microscope's photographs learns that microscope: its magnification, its
framing (whole fields), its stain, lamp and camera. :class:`ShiftedPatches` draws each training
patch afresh, at every epoch, from a whole training photograph with its label mask, randomising
what changes between microscopes (``strength`` 1 = the ranges below; 0 = the plain patch):

* **magnification** — the photograph is resized by ``data.scale x m`` with ``m`` log-uniform in
  [1/2.5, 2.5]^strength (so at strength 1 cells are 0.4 to 2.5 times their trained size);
* **framing** — half the patches are centred on a white cell (with jitter), so that single-cell
  crops, with red cells cut by the border, are as common as views of whole fields;
* **colour** — :func:`bloodseg.stain.random_stain` (HED stain, white balance, gamma, blur, JPEG),
  a hue / saturation shift, and a plasma tint (pink or yellow, up to 30 % per channel, clipped:
  saturated channels occur);
* **noise** — Gaussian, sigma up to 6 grey levels.

Labels follow the geometry only (nearest-neighbour resize, the same crop and flips).
:func:`bloodseg.shipping.train_model` takes these in place of fixed patches when the recipe's
``data.shift`` is above 0 (``bloodseg train-bccd --shift 1``).
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import torch

from .classes import WHITE_CELL
from .errors import DataError
from .io import Sample
from .preprocess import image_to_tensor
from .stain import random_stain, white_balance

__all__ = ["MAX_ZOOM", "shifted_patch", "ShiftedPatches"]

#: The largest magnification change at strength 1 (either way).
MAX_ZOOM = 2.5


def _hue_saturation(image: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV).astype(np.float32)
    hsv[..., 0] = np.mod(hsv[..., 0] + rng.uniform(-8, 8) * s, 180)
    hsv[..., 1] *= math.exp(rng.uniform(-0.4, 0.4) * s)
    return cv2.cvtColor(np.clip(hsv + 0.5, 0, [179, 255, 255]).astype(np.uint8), cv2.COLOR_HSV2BGR)


def shifted_patch(sample: Sample, size: int, scale: float, rng: np.random.Generator,
                  strength: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One ``size`` x ``size`` (image, mask) drawn from a whole labelled photograph as described in
    the module docstring; ``scale``: the network's trained magnification (``data.scale``). The same
    ``rng`` state gives the same patch."""
    if not 0 <= strength <= 1:
        raise DataError(f"shift strength must be from 0 to 1; got {strength!r}")
    s = float(strength)
    m = math.exp(rng.uniform(-1, 1) * math.log(MAX_ZOOM) * s)
    f = scale * m
    h, w = sample.mask.shape
    # the crop in photograph pixels whose resize by f is `size` px (at least 8 px of photograph)
    side = max(8, int(round(size / f)))
    white = np.argwhere(sample.mask == WHITE_CELL)
    u = rng.random(4)
    if len(white) and u[0] < 0.5:
        cy, cx = white[int(u[1] * len(white))] + (rng.uniform(-0.25, 0.25, 2) * side).astype(int)
    else:
        cy, cx = int(u[2] * h), int(u[3] * w)
    y0, x0 = int(cy - side // 2), int(cx - side // 2)
    # out of the photograph: reflect (a crop at the border of a field, not a black frame)
    pad = [(max(0, -y0), max(0, y0 + side - h)), (max(0, -x0), max(0, x0 + side - w))]
    image = np.pad(sample.image, pad + [(0, 0)], mode="reflect") if any(sum(p) for p in pad) else sample.image
    mask = np.pad(sample.mask, pad, mode="reflect") if any(sum(p) for p in pad) else sample.mask
    y0, x0 = y0 + pad[0][0], x0 + pad[1][0]
    image = image[y0:y0 + side, x0:x0 + side]
    mask = mask[y0:y0 + side, x0:x0 + side]
    image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)
    mask = cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)
    k, flip = int(rng.integers(4)), bool(rng.random() < 0.5)
    image, mask = np.rot90(image, k), np.rot90(mask, k)
    if flip:
        image, mask = image[:, ::-1], mask[:, ::-1]
    image = np.ascontiguousarray(image)
    if s > 0:
        image = random_stain(image, rng, s)
        image = _hue_saturation(image, rng, s)
        tint = 1.0 + rng.uniform(-0.3, 0.3, 3) * s * (rng.random() < 0.5)
        image = white_balance(image, tint)
        sigma = rng.uniform(0, 6) * s
        image = np.clip(image + rng.normal(0, sigma, image.shape) + 0.5, 0, 255).astype(np.uint8)
    return image, np.ascontiguousarray(mask)


class ShiftedPatches(torch.utils.data.Dataset):
    """``length`` patches a epoch, each drawn afresh by :func:`shifted_patch` from one of ``photos``
    (whole training photographs with masks) as ``(image float32 3xHxW, mask int64 HxW)``. Item ``i``
    of epoch ``e`` depends only on ``(seed, e, i)`` (call :meth:`set_epoch`), so a resumed run sees
    the same patches as an uninterrupted one."""

    def __init__(self, photos: list[Sample], size: int, scale: float, length: int, strength: float = 1.0,
                 seed: int = 0):
        if not photos:
            raise DataError("ShiftedPatches needs at least one training photograph")
        self.photos, self.size, self.scale, self.length = list(photos), int(size), float(scale), int(length)
        self.strength, self.seed, self.epoch = float(strength), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, self.epoch, int(i)])
        photo = self.photos[int(rng.integers(len(self.photos)))]
        image, mask = shifted_patch(photo, self.size, self.scale, rng, self.strength)
        return image_to_tensor(image), torch.from_numpy(mask.astype(np.int64))
