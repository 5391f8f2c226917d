"""Perturbations of smear photographs at graded strengths, and adversarial attacks on a white-cell loss.

Chapter 10 ("Is it robust?") asks whether NODEs-UNet segments white cells more robustly than the
U-Net and the ResNet U-Net. This module makes the perturbations; :mod:`bloodseg.paper.robust` runs
the study.

**Families** (:data:`FAMILIES`): each is one function of a BGR ``uint8`` photograph (and its mask)
and a strength, with graded strengths whose first is 0, the identity (a test checks it):

* ``noise`` — additive Gaussian noise of ``sigma`` grey levels (of 255), per pixel and channel,
  drawn from a seeded generator, rounded and clipped (the clipping makes the measured sigma a
  little smaller at the brightest and darkest pixels);
* ``blur`` — Gaussian blur of ``sigma`` px at the photograph's own resolution (defocus);
* ``jpeg`` — JPEG re-compression; strength ``s`` is quality ``100 - s`` (0: no compression; 96:
  quality 4);
* ``exposure`` — brightness and contrast: ``128 + (x - 128) (1 - 0.75 s) + 64 s`` (s = 1: a quarter
  of the contrast, 64 grey levels brighter: a washed-out, over-exposed photograph);
* ``stain`` — colour deconvolution (:func:`bloodseg.stain.hed_jitter`): haematoxylin optical
  density x (1 + s) + 0.1 s, eosin x (1 - 0.7 s) (a more basophilic, less eosinophilic stain);
* ``white_balance`` — per-channel gains (B, G, R) = (1 + 0.5 s, 1, 1 - 0.5 s) (a cool lamp; s = 0.2
  is chapter 8's ``cool`` shift);
* ``magnification`` — the photograph and its mask resized by ``2 ** s`` (s = -1 .. 1: half to twice
  the size; s < 0: a lower
  magnification, smaller cells), so that the network, which resizes every photograph by its fixed
  ``input_scale``, sees cells of another size (the automatic scale rule of chapter 8 would undo
  this: the study tests the network, not that rule).

:func:`perturb` applies one; a family's strength 0 returns the photograph and mask unchanged.

**Attacks** act on the *network's input*: the photograph resized by the Segmenter's
``input_scale`` and CLAHE'd on the luma, as an RGB tensor in [0, 1] (:func:`network_input`: what
:meth:`bloodseg.Segmenter.segment` feeds the network). A perturbation ``delta`` is added there, kept
within ``eps`` in L-infinity and ``x + delta`` within [0, 1]; the probabilities are resized back to
the photograph and scored against its full-size mask (:func:`mask_from_input`; with ``delta = 0``
it is the Segmenter's own mask, a test checks it). Perturbing the input after CLAHE and resizing
rather than the photograph's pixels keeps the attack exact (CLAHE and the resize are not
differentiable as OpenCV runs them); it is the stronger attacker's position.

* :func:`white_loss` — class-balanced binary cross-entropy of the white-cell probability (the mean
  over white pixels and the mean over the rest, averaged), so the attack pays as much for missing
  white pixels as for inventing them;
* :func:`fgsm` — one signed-gradient step of size ``eps`` (Goodfellow et al. 2015);
* :func:`pgd` — ``steps`` projected signed-gradient steps of ``2.5 eps / steps`` from a random start
  in the ``eps`` ball (Madry et al. 2018); the iterate with the highest loss is returned.

Gradients go through whatever solver the network's ODE-blocks are set to (backpropagation
through the solver's steps; an adaptive solver's step-size choice is not differentiated, one way
an attack on it can be misled). :mod:`bloodseg.paper.robust` therefore also transfers
perturbations made on other networks.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .. import stain as S
from ..calibrate import apply_solver
from ..classes import WHITE_CELL
from ..errors import BloodsegError
from ..preprocess import image_to_tensor

__all__ = ["Family", "FAMILIES", "GROUPS", "perturb", "add_noise", "exposure", "network_input",
           "white_target", "white_loss", "mask_from_input", "predict_mask", "fgsm", "pgd", "use_solver", "EPSILONS"]

#: Attack budgets in L-infinity on the [0, 1] network input: 1, 2 and 4 grey levels of 255.
EPSILONS = (1 / 255, 2 / 255, 4 / 255)


def add_noise(image: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    """``image`` plus Gaussian noise of ``sigma`` grey levels (seeded), rounded and clipped to uint8."""
    if sigma == 0:
        return image
    rng = np.random.default_rng(seed)
    noisy = image.astype(np.float32) + rng.normal(0.0, float(sigma), image.shape).astype(np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def exposure(image: np.ndarray, s: float) -> np.ndarray:
    """Brightness and contrast: ``128 + (x - 128) (1 - 0.75 s) + 64 s`` through a lookup table."""
    if s == 0:
        return image
    lut = np.clip(np.rint(128 + (np.arange(256) - 128) * (1 - 0.75 * s) + 64 * s), 0, 255).astype(np.uint8)
    return cv2.LUT(image, lut)


def _resize_pair(image, mask, factor: float):
    h, w = image.shape[:2]
    size = (max(16, round(w * factor)), max(16, round(h * factor)))
    img = cv2.resize(image, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
    return img, cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)


@dataclasses.dataclass(frozen=True)
class Family:
    """A perturbation family: ``name``, what its strength means (``unit``), the graded ``levels``
    (the first is 0, the identity) and ``fn(image, mask, strength, seed) -> (image, mask)``."""
    name: str
    title: str
    unit: str
    levels: tuple
    fn: Callable


def _colour(fn):
    return lambda image, mask, s, seed: (image if s == 0 else fn(image, s), mask)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("noise", "Gaussian noise", "sigma (grey levels)", (0, 8, 16, 32, 64),
           lambda image, mask, s, seed: (add_noise(image, s, seed), mask)),
    Family("blur", "Gaussian blur", "sigma (px, native)", (0, 2, 4, 6, 8),
           _colour(lambda im, s: S.blur(im, s))),
    Family("jpeg", "JPEG compression", "100 - quality", (0, 70, 85, 92, 96),
           _colour(lambda im, s: S.jpeg(im, int(round(100 - s))))),
    Family("exposure", "brightness / contrast", "strength", (0, 0.25, 0.5, 0.75, 1.0),
           _colour(exposure)),
    Family("stain", "stain (HED)", "strength", (0, 0.25, 0.5, 0.75, 1.0),
           _colour(lambda im, s: S.hed_jitter(im, (1 + s, 1 - 0.7 * s, 1.0), (0.1 * s, 0.0, 0.0)))),
    Family("white_balance", "white balance", "strength", (0, 0.25, 0.5, 0.75, 1.0),
           _colour(lambda im, s: S.white_balance(im, (1 + 0.5 * s, 1.0, 1 - 0.5 * s)))),
    Family("magnification", "magnification", "log2 factor", (0, -1, -0.5, 0.5, 1),
           lambda image, mask, s, seed: (image, mask) if s == 0 else _resize_pair(image, mask, 2.0 ** s)),
)}

#: The ledger's groups of families (the issue's): noise, blur/JPEG, colour/stain, scale.
GROUPS: dict[str, tuple] = {"noise": ("noise",), "blur/JPEG": ("blur", "jpeg"),
                            "colour/stain": ("exposure", "stain", "white_balance"), "scale": ("magnification",)}


def perturb(family: str, strength: float, image: np.ndarray, mask: np.ndarray, seed: int = 0):
    """``(image, mask)`` under ``family`` (:data:`FAMILIES`) at ``strength``; 0 gives them back as they are.
    ``seed`` draws the noise (the study uses the photograph's index, the same for every model)."""
    if family not in FAMILIES:
        raise BloodsegError(f"unknown perturbation family {family!r}: choose one of {', '.join(FAMILIES)}")
    if strength == 0:
        return image, mask
    return FAMILIES[family].fn(image, mask, strength, seed)


# ----------------------------------------------------------------------------- attacks

def network_input(seg, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
    """``(x, (h, w))``: the tensor ``1 x 3 x h x w`` (RGB in [0, 1], reflect-padded to a multiple of
    16) that :meth:`bloodseg.Segmenter.segment` gives the network for ``image`` (colour rule, the
    Segmenter's fixed ``input_scale``, CLAHE), and its size before padding."""
    image = seg.prepare(image)
    factor = seg.scale_for(image)
    h0, w0 = image.shape[:2]
    if factor != 1.0:
        size = (max(1, round(w0 * factor)), max(1, round(h0 * factor)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
    x = image_to_tensor(image, clahe=seg.clahe)[None]
    h, w = x.shape[-2:]
    ph, pw = (-h) % 16, (-w) % 16
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect" if ph < h and pw < w else "replicate")
    return x, (h, w)


def white_target(mask: np.ndarray, hw: tuple[int, int], padded: tuple[int, int]) -> torch.Tensor:
    """The white-cell pixels of the full-size ``mask`` at the network's size ``hw`` (nearest), as a
    bool tensor of the padded size; padding is -1 (ignored by :func:`white_loss`)."""
    small = cv2.resize((np.asarray(mask) == WHITE_CELL).astype(np.uint8), (hw[1], hw[0]),
                       interpolation=cv2.INTER_NEAREST)
    t = torch.full(padded, -1, dtype=torch.int8)
    t[:hw[0], :hw[1]] = torch.from_numpy(small.astype(np.int8))
    return t


def white_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Class-balanced binary cross-entropy of the white-cell probability: the mean of ``-log p_white``
    over white pixels and of ``-log (1 - p_white)`` over the others, averaged (pixels of ``target``
    = -1 are ignored; a class with no pixel drops out)."""
    logp = F.log_softmax(logits.float(), 1)[0]
    lw = logp[WHITE_CELL]
    lrest = torch.logsumexp(torch.cat([logp[:WHITE_CELL], logp[WHITE_CELL + 1:]]), 0)
    parts = [(-lw[target == 1]).mean()] if bool((target == 1).any()) else []
    if bool((target == 0).any()):
        parts.append((-lrest[target == 0]).mean())
    return torch.stack(parts).mean()


def mask_from_input(model, x: torch.Tensor, hw: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """The mask (uint8, ``size`` = the photograph's (H, W)) of the network on input ``x``: softmax,
    cropped to ``hw``, resized bilinearly to ``size``, argmax (as :meth:`Segmenter.segment` does)."""
    with torch.inference_mode():
        p = F.softmax(model(x).float(), 1)[:, :, :hw[0], :hw[1]]
        if tuple(size) != tuple(hw):
            p = F.interpolate(p, size=tuple(size), mode="bilinear", align_corners=False)
    return p[0].max(0).indices.numpy().astype(np.uint8)     # = argmax (first maximum), 9x faster on a CPU


def predict_mask(seg, image: np.ndarray) -> np.ndarray:
    """``seg.segment(image).mask`` for a Segmenter without cleanup, flips or tiling (the study's:
    fixed scale, network argmax, a photograph within one tile), through :func:`network_input` and
    :func:`mask_from_input`; a test and every unit of the study check that the two agree."""
    use_solver(seg)
    x, hw = network_input(seg, image)
    return mask_from_input(seg.model, x, hw, image.shape[:2])


def _grad(model, x, delta, target):
    d = delta.detach().requires_grad_(True)
    loss = white_loss(model(x + d), target)
    (g,) = torch.autograd.grad(loss, d)
    return g, float(loss.detach())


def _project(x, delta, eps):
    delta = delta.clamp(-eps, eps)
    return (x + delta).clamp(0, 1) - x


def fgsm(model, x: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
    """One step ``eps * sign(grad)`` of :func:`white_loss` (projected so ``x + delta`` is in [0, 1])."""
    g, _ = _grad(model, x, torch.zeros_like(x), target)
    return _project(x, eps * g.sign(), eps).detach()


def pgd(model, x: torch.Tensor, target: torch.Tensor, eps: float, steps: int = 10, seed: int = 0,
        step: float | None = None) -> tuple[torch.Tensor, list[float]]:
    """``(delta, losses)``: projected gradient ascent on :func:`white_loss` within ``eps``
    (L-infinity) from a uniform random start (seeded), ``steps`` steps of ``step`` (default
    ``2.5 eps / steps``); the iterate with the highest loss is returned, ``losses`` lists each one's."""
    if steps < 1:
        raise BloodsegError(f"PGD needs at least one step; got {steps}")
    step = 2.5 * eps / steps if step is None else step
    gen = torch.Generator().manual_seed(int(seed))
    delta = _project(x, (torch.rand(x.shape, generator=gen) * 2 - 1) * eps, eps)
    best, best_loss, losses = delta, -np.inf, []
    for _ in range(steps):
        g, loss = _grad(model, x, delta, target)
        losses.append(loss)
        if loss > best_loss:
            best, best_loss = delta, loss
        delta = _project(x, delta + step * g.sign(), eps).detach()
    with torch.no_grad():
        last = float(white_loss(model(x + delta), target))
    losses.append(last)
    if last > best_loss:
        best = delta
    return best.detach(), losses


def use_solver(seg) -> None:
    """Put ``seg``'s solver on its network's ODE-blocks (a Segmenter shares its network with its copies)."""
    apply_solver(seg.model, seg.solver, seg.trained)
