"""bloodseg — blood smear segmentation with U-Nets and neural ODE blocks (Li et al. 2021).

This file is the contract: what a user of the package needs, and nothing else. The paper's
experiments live in :mod:`bloodseg.paper` (``from bloodseg.paper import table1``).

Data flow: image file → ``read_image`` (uint8 HxWx3, OpenCV BGR) → ``clahe_on_luma`` →
``image_to_tensor`` (float 3xHxW, RGB) → model → logits Nx3xHxW → argmax → mask HxW in
{0 background, 1 white cell, 2 red cell} → ``ConfusionMatrix`` → ``scores`` (PA, CPA, MIoU).
A :class:`Segmenter` does the whole path for a photograph.
"""
__version__ = "0.2.0"

from .errors import BloodsegError, CheckpointError, DataError, SolverError, TrainingError
from .classes import CLASS_NAMES
from .io import read_image, read_mask, load_folder
from .preprocess import clahe_on_luma
from .synthetic import make_smear
from .datasets import SegmentationDataset, training_splits
from .ode import ODEBlock
from .models import MODEL_NAMES, build_model
from .metrics import ConfusionMatrix, scores
from .recipe import Recipe, get_recipe
from .train import evaluate, fit
from .segmenter import Segmenter, shipped_checkpoint

__all__ = ["BloodsegError", "CheckpointError", "DataError", "SolverError", "TrainingError", "CLASS_NAMES",
           "read_image", "read_mask", "load_folder", "clahe_on_luma", "make_smear", "SegmentationDataset",
           "training_splits", "ODEBlock", "MODEL_NAMES", "build_model", "ConfusionMatrix", "scores",
           "Recipe", "get_recipe", "fit", "evaluate", "Segmenter", "shipped_checkpoint"]
