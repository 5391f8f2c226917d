"""The painter's shapes: antialiased blobs on a pixel grid, and smooth noise for textures.

:mod:`bloodseg.synthetic` paints every cell, nucleus lobe and platelet as a :class:`Blob`: an
ellipse whose radius wobbles with the angle. :meth:`Blob.coverage` gives each pixel the fraction of
it the shape covers, with ``coverage >= 0.5`` exactly "inside": the image is rendered from the
coverage and the mask labels a pixel by the topmost shape that covers at least half of it, so the
labels follow the geometry exactly. :func:`on_image` walks a list of cells over the pixels they
touch; :func:`full_area` is a shape's whole area, inside the image or not (what counting needs).
"""
from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np


def smooth_noise(rng, h, w, sigma):
    """Unit-variance gaussian noise blurred to a correlation length of ``sigma`` px (textures)."""
    field = cv2.GaussianBlur(rng.standard_normal((h, w), dtype=np.float32), (0, 0), sigma)
    return field / (field.std() + 1e-6)


@dataclasses.dataclass
class Blob:
    """An ellipse whose radius wobbles with the angle: r(θ) = 1 + Σ a_k cos(kθ + φ_k)."""
    cx: float
    cy: float
    a: float                       # semi-major axis, px
    b: float                       # semi-minor axis, px
    angle: float                   # rad
    harmonics: tuple = ()          # ((k, amplitude, phase), ...)

    def extent(self) -> float:
        return self.a * (1 + sum(abs(amp) for _, amp, _ in self.harmonics)) + 2.0

    def coverage(self, ys, xs):
        """Antialiased coverage in [0, 1] and the normalised radius (0 centre, 1 edge) on a grid.

        The signed distance to the edge is approximated radially; coverage = 0.5 - distance,
        clipped, so ``coverage >= 0.5`` is exactly "inside the shape" and labels follow geometry.
        """
        dx, dy = xs - self.cx, ys - self.cy
        c, s = math.cos(self.angle), math.sin(self.angle)
        u = (dx * c + dy * s) / self.a
        v = (dy * c - dx * s) / self.b
        rho = np.sqrt(u * u + v * v) + 1e-6
        edge = 1.0
        if self.harmonics:
            theta = np.arctan2(v, u)
            edge = 1.0 + sum(amp * np.cos(k * theta + ph) for k, amp, ph in self.harmonics)
        rn = rho / edge
        local_radius = np.sqrt((self.a * u) ** 2 + (self.b * v) ** 2) / rho * edge  # px along the ray
        cov = np.clip(0.5 - (rn - 1.0) * local_radius, 0.0, 1.0)
        return cov, rn


def region(blob: Blob, h, w):
    """Bounding box of a blob clipped to the image, as slices plus coordinate grids (or None)."""
    e = blob.extent()
    y0, y1 = max(int(blob.cy - e), 0), min(int(blob.cy + e) + 2, h)
    x0, x1 = max(int(blob.cx - e), 0), min(int(blob.cx + e) + 2, w)
    if y0 >= y1 or x0 >= x1:
        return None
    ys = np.arange(y0, y1, dtype=np.float32)[:, None]
    xs = np.arange(x0, x1, dtype=np.float32)[None, :]
    return (slice(y0, y1), slice(x0, x1)), ys, xs


def on_image(cells, h, w):
    """Yield ``(cell, slices, ys, xs, coverage, radius)`` for every cell that overlaps the image.

    ``cells`` are tuples whose first entry is the blob (a red cell's ``(blob, pallor, strength)``, a
    white cell's ``(cell, lobes, cytoplasm)``); the rest are :func:`region` and ``blob.coverage``.
    """
    for cell in cells:
        reg = region(cell[0], h, w)
        if reg is not None:
            sl, ys, xs = reg
            yield (cell, sl, ys, xs, *cell[0].coverage(ys, xs))


def wobble(rng, amplitude, ks=(2, 3, 4, 5)):
    """Random :attr:`Blob.harmonics`: harmonic k with an amplitude up to ``amplitude / sqrt(k)`` and a random phase."""
    return tuple((k, float(rng.uniform(0, amplitude) / k ** 0.5), float(rng.uniform(0, 2 * np.pi)))
                 for k in ks)


def full_area(blob: Blob) -> int:
    """Pixels of a blob's whole shape (coverage >= 0.5), including any part outside the image."""
    e = blob.extent()
    ys = np.arange(int(blob.cy - e), int(blob.cy + e) + 2, dtype=np.float32)[:, None]
    xs = np.arange(int(blob.cx - e), int(blob.cx + e) + 2, dtype=np.float32)[None, :]
    return int((blob.coverage(ys, xs)[0] >= 0.5).sum())
