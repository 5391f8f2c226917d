"""bloodseg — blood smear segmentation with U-Nets and neural ODE blocks (Li et al. 2021).

This file is the contract: everything a reader or a notebook needs is importable from here.

Data flow: image file → ``read_image`` (uint8 HxWx3, OpenCV BGR) → ``clahe_on_luma`` →
``image_to_tensor`` (float 3xHxW, RGB) → model → logits Nx3xHxW → argmax → mask HxW in
{0 background, 1 white cell, 2 red cell} → ``ConfusionMatrix`` → ``scores`` (PA, CPA, MIoU).
"""
__version__ = "0.1.0"

from .errors import BloodsegError, CheckpointError, DataError, SolverError, TrainingError
from .profiles import PROFILES, Profile, get_profile
from .preprocess import clahe_on_luma, image_to_tensor
from .synthetic import colour_threshold_baseline, colourise_mask, make_smear, overlay, write_synthetic
from .datasets import (Sample, SegmentationDataset, augment, bccd_sample_dir, extract_patches, training_splits,
                       labelme_to_mask, load_folder, load_labelme_folder, load_splits, make_splits,
                       prepare_bccd, read_image, read_mask, synthetic_splits)
from .ode import ODEBlock, ODEFunc, ResidualBlock, nfe_report, ode_blocks, set_tolerance
from .models import (MODEL_NAMES, NODES_UNET_BLOCKS, ResUNet, UNet, build_model, count_parameters,
                     parameter_memory_mb)
from .metrics import ConfusionMatrix, confusion_matrix, per_image_scores, scores
from .train import TrainConfig, evaluate, fit, load_checkpoint, load_model, save_checkpoint
from .infer import predict_files, predict_image, predict_probabilities
from .count import count_cells
from .postprocess import clean_white_cells
