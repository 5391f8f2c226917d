"""One switch for every notebook, script and test: smoke / quick / full.

``BLOODSEG_PROFILE`` (or ``--profile`` on the CLI) picks the sizes. ``full`` is the
paper's setting and the default when CUDA is available; ``quick`` is the default
on a CPU; ``smoke`` runs in seconds and is what CI executes the notebooks with.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from .errors import BloodsegError


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    patch: int            # side of a square training patch (paper: 256)
    width: int            # channels of the first U-Net level (paper: 32, half the usual 64)
    n_source: int         # number of synthetic source smears generated
    crops_per_image: int  # patches cropped from each source smear
    n_test: int           # patches held out for test, before augmentation (paper: 20 of 100)
    augment: int          # augmentation factor of the remaining patches (paper: x10)
    epochs: int           # training epochs (paper: 50)
    batch_size: int
    lr: float
    image_size: tuple     # (height, width) of a synthetic source smear (paper's MISP: 519x775)


PROFILES = {
    "smoke": Profile("smoke", patch=64, width=8, n_source=4, crops_per_image=3, n_test=4,
                     augment=2, epochs=1, batch_size=4, lr=3e-3, image_size=(160, 240)),
    "quick": Profile("quick", patch=128, width=16, n_source=16, crops_per_image=4, n_test=12,
                     augment=4, epochs=6, batch_size=8, lr=2e-3, image_size=(519, 775)),
    "full": Profile("full", patch=256, width=32, n_source=50, crops_per_image=2, n_test=20,
                    augment=10, epochs=50, batch_size=8, lr=1e-3, image_size=(519, 775)),
}


def get_profile(name: str | None = None) -> Profile:
    """Return the profile named ``name``, else ``$BLOODSEG_PROFILE``, else full on CUDA / quick on CPU."""
    if name is None:
        name = os.environ.get("BLOODSEG_PROFILE") or ("full" if torch.cuda.is_available() else "quick")
    key = name.strip().lower()
    if key not in PROFILES:
        raise BloodsegError(
            f"unknown profile {name!r}: choose one of {', '.join(PROFILES)} "
            "(set BLOODSEG_PROFILE or pass --profile)")
    return PROFILES[key]
