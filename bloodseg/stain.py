"""Stain and camera shifts of smear photographs: colour transforms for training and for testing.

Every function takes and returns an OpenCV BGR ``uint8 HxWx3`` image (as
:func:`bloodseg.io.read_image` gives) and never changes its argument. The fixed transforms are
deterministic; :func:`random_stain` draws their parameters from a ``numpy.random.Generator``, so
the same seed gives the same image.

* :func:`hed_jitter` — colour deconvolution (Ruifrok & Johnston 2001) into haematoxylin, eosin
  and DAB optical densities with the H&E-DAB matrix :data:`RGB_FROM_HED`; each stain channel is
  scaled and shifted (``od * scale + shift``, Tellez et al. 2018) and the image recomposed.
  :func:`to_hed` / :func:`from_hed` are the two halves; a round trip changes no pixel by more
  than one grey level (stains are not clipped at 0, so nothing is lost).
* :func:`white_balance` — per-channel gains (a warm or cool lamp, a camera's white balance);
* :func:`gamma` — ``255 (x / 255) ** g`` (a camera's tone curve; g < 1 brightens);
* :func:`jpeg` — re-compression at a JPEG quality (1-100);
* :func:`blur` — Gaussian blur of ``sigma`` px (defocus).

And one transform for prediction: :func:`match_background` brings a photograph's background (the
plasma between the cells, the brightest part of a bright-field smear, :func:`background_colour`)
to a reference colour, the typical background of the training photographs, with one gain per
channel. A lamp's or camera's colour cast is such a gain, so this undoes it; the cells keep
their colour relative to the background.

Giemsa/Wright stains are not H&E, but their two dyes (a blue-purple nucleus stain and a pink
eosin) lie close to the H and E vectors, so the same deconvolution moves them independently.
"""
from __future__ import annotations

import cv2
import numpy as np

from .errors import BloodsegError

__all__ = ["RGB_FROM_HED", "to_hed", "from_hed", "hed_jitter", "white_balance", "gamma", "jpeg", "blur",
           "random_stain", "background_colour", "check_background", "match_background", "reference_background"]

#: The largest correction :func:`match_background` makes per channel (a factor of 2 either way).
MAX_GAIN = 2.0

#: Optical-density vectors (rows: haematoxylin, eosin, DAB; columns R, G, B), Ruifrok & Johnston
#: 2001, as in scikit-image's ``rgb_from_hed``; rows normalised to unit length.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
RGB_FROM_HED = RGB_FROM_HED / np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)


def _check(image) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise BloodsegError(f"a smear photograph must be BGR uint8 HxWx3; got {image.dtype} {image.shape}")
    return image


def to_hed(image) -> np.ndarray:
    """Stain optical densities ``float32 HxWx3`` (H, E, DAB) of a BGR ``uint8`` image.

    Optical density per RGB channel is ``-ln((x + 1) / 256)`` (0 for white light, no pixel infinite)."""
    rgb = _check(image)[..., ::-1].astype(np.float64)
    od = -np.log((rgb + 1.0) / 256.0)
    return (od @ HED_FROM_RGB).astype(np.float32)


def from_hed(hed) -> np.ndarray:
    """BGR ``uint8`` image of stain optical densities (the inverse of :func:`to_hed`)."""
    od = np.asarray(hed, np.float64) @ RGB_FROM_HED
    rgb = 256.0 * np.exp(-od) - 1.0
    return np.clip(rgb[..., ::-1] + 0.5, 0, 255).astype(np.uint8)


def hed_jitter(image, scale=(1.0, 1.0, 1.0), shift=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Each stain's optical density times ``scale`` plus ``shift`` (H, E, DAB order; OD units).

    ``scale`` 1.1 on H: 10 % more haematoxylin (darker, bluer nuclei); ``shift`` adds dye everywhere,
    the background included (0.05 is a faint tint)."""
    hed = to_hed(image)
    return from_hed(hed * np.asarray(scale, np.float32) + np.asarray(shift, np.float32))


def white_balance(image, gains=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Per-channel gains in B, G, R order (``(0.9, 1.0, 1.1)``: a warmer lamp), clipped to 0-255."""
    g = np.asarray(gains, np.float32)
    if g.shape != (3,) or not np.all(g > 0):
        raise BloodsegError(f"white-balance gains must be three positive numbers (B, G, R); got {gains!r}")
    return np.clip(_check(image) * g + 0.5, 0, 255).astype(np.uint8)


def gamma(image, g: float) -> np.ndarray:
    """Tone curve ``255 (x / 255) ** g`` through a lookup table (g < 1 brightens the mid-tones)."""
    if not g > 0:
        raise BloodsegError(f"gamma must be a positive number; got {g!r}")
    lut = np.clip(255.0 * (np.arange(256) / 255.0) ** float(g) + 0.5, 0, 255).astype(np.uint8)
    return cv2.LUT(_check(image), lut)


def jpeg(image, quality: int) -> np.ndarray:
    """The image after JPEG compression at ``quality`` (1-100) and decoding."""
    q = int(quality)
    if not 1 <= q <= 100:
        raise BloodsegError(f"JPEG quality must be 1-100; got {quality!r}")
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(_check(image)), [cv2.IMWRITE_JPEG_QUALITY, q])
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)


def blur(image, sigma: float) -> np.ndarray:
    """Gaussian blur of ``sigma`` px (0: a copy of the image)."""
    if not sigma >= 0:
        raise BloodsegError(f"blur sigma must be >= 0; got {sigma!r}")
    image = _check(image)
    return cv2.GaussianBlur(image, (0, 0), float(sigma)) if sigma > 0 else image.copy()


def random_stain(image, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """A random stain/camera shift for training; ``strength`` 0 returns the image unchanged.

    At strength ``s`` (1 = the shifts of :mod:`bloodseg.paper.robustness` at their largest):
    HED jitter with scales ``1 ± 0.25 s`` and shifts ``± 0.05 s`` per stain (always); then, each with
    probability 0.5, white-balance gains ``1 ± 0.1 s`` per channel, gamma ``exp(± 0.3 s)`` (0.74-1.35 at s = 1), Gaussian
    blur ``sigma`` up to ``1.5 s`` px, JPEG quality from 100 down to ``100 - 70 s``. The same number of
    values is drawn from ``rng`` whatever happens, so one image's draw never shifts the next's.
    """
    try:
        s = float(strength)
    except (TypeError, ValueError):
        s = float("nan")
    if isinstance(strength, bool) or not 0 <= s <= 1:
        raise BloodsegError(f"stain strength must be a number from 0 (off) to 1; got {strength!r}")
    image = _check(image)
    u = rng.uniform(-1.0, 1.0, 6)            # HED scales and shifts
    wb = rng.uniform(-1.0, 1.0, 3)
    g, sig, q = rng.uniform(-1.0, 1.0), rng.uniform(0.0, 1.0), rng.uniform(0.0, 1.0)
    use = rng.random(4) < 0.5                # white balance, gamma, blur, JPEG
    if s == 0:
        return image
    out = hed_jitter(image, 1.0 + 0.25 * s * u[:3], 0.05 * s * u[3:])
    if use[0]:
        out = white_balance(out, 1.0 + 0.1 * s * wb)
    if use[1]:
        out = gamma(out, float(np.exp(0.3 * s * g)))
    if use[2]:
        out = blur(out, 1.5 * s * sig)
    if use[3]:
        out = jpeg(out, int(round(100 - 70 * s * q)))
    return out


def background_colour(image, quantile: float = 0.7) -> np.ndarray:
    """The background colour (B, G, R floats) of a bright-field smear photograph: per channel, the
    median of the pixels whose luma is at or above its ``quantile`` (the brightest 30 %: the plasma
    between the cells). Every 4th pixel of every 4th row is enough and keeps large photographs fast."""
    small = np.ascontiguousarray(_check(image)[::4, ::4])
    luma = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
    bright = small[luma >= np.quantile(luma, quantile)]
    return np.median(bright.astype(np.float64), axis=0)


def match_background(image, reference) -> np.ndarray:
    """``image`` with per-channel gains that bring its :func:`background_colour` to ``reference``
    (B, G, R), each gain limited to 1/:data:`MAX_GAIN`..:data:`MAX_GAIN`; a photograph whose
    background is darker than 32 grey levels in a channel (not a bright-field smear) is returned
    unchanged."""
    ref = np.asarray(check_background(reference))
    image = _check(image)
    bg = background_colour(image)
    if np.any(bg < 32):
        return image
    return white_balance(image, np.clip(ref / bg, 1 / MAX_GAIN, MAX_GAIN))


def check_background(reference) -> tuple:
    """``reference`` as a background colour ``(B, G, R)`` of floats in (0, 255], or a BloodsegError."""
    try:
        ref = np.asarray(reference, np.float64)
    except (TypeError, ValueError):
        ref = np.zeros(0)
    if ref.shape != (3,) or not np.all((ref > 0) & (ref <= 255)):
        raise BloodsegError(f"a background colour must be three numbers in (0, 255] (B, G, R); got {reference!r}")
    return tuple(float(v) for v in ref)


def reference_background(images) -> tuple:
    """The typical background (B, G, R) of a set of photographs: the per-channel median of their
    :func:`background_colour`; what a Segmenter trained on them stores as ``background``."""
    colours = np.array([background_colour(im) for im in images])
    if not len(colours):
        raise BloodsegError("reference_background needs at least one photograph")
    return tuple(float(v) for v in np.median(colours, axis=0))
