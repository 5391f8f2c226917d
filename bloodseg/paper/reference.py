"""The paper's own numbers and settings, typed once (Li et al. 2021, Tables 1-2 and §4).

Every comparison in the book reads them from here; none of them is ever shown as ours.
"""
from __future__ import annotations


PAPER = "Li et al. 2021, Comput. Math. Methods Med. 2021:5590180, doi:10.1155/2021/5590180"


#: Table 1 of the paper (§3.2): one ODE-block (rtol 1e-3) at positions 1–9 vs the U-Net, 50 epochs,
#: MISP01 test set (20 crops of 256x256). PA, CPA and MIoU in percent; CPA columns in the paper's
#: order (background, red cells, white cells); ``time_s`` is the time to segment 20 images
#: (4x GTX 1080 Ti, Keras/TensorFlow).
PAPER_TABLE1 = {
    "unet":       dict(pa=94.59, cpa=dict(background=92.55, red=96.54, white=94.10), miou=88.58, time_s=0.15),
    "ode-unet-1": dict(pa=95.05, cpa=dict(background=94.25, red=95.97, white=93.92), miou=89.80, time_s=7.35),
    "ode-unet-2": dict(pa=95.08, cpa=dict(background=94.23, red=95.69, white=95.98), miou=89.68, time_s=3.73),
    "ode-unet-3": dict(pa=95.11, cpa=dict(background=95.14, red=95.70, white=91.65), miou=89.61, time_s=1.94),
    "ode-unet-4": dict(pa=95.19, cpa=dict(background=94.08, red=96.51, white=93.42), miou=90.17, time_s=1.03),
    "ode-unet-5": dict(pa=95.05, cpa=dict(background=95.62, red=94.62, white=94.53), miou=89.62, time_s=0.61),
    "ode-unet-6": dict(pa=95.14, cpa=dict(background=93.78, red=96.34, white=95.39), miou=90.09, time_s=1.06),
    "ode-unet-7": dict(pa=95.17, cpa=dict(background=93.80, red=96.59, white=94.19), miou=90.02, time_s=1.95),
    "ode-unet-8": dict(pa=95.16, cpa=dict(background=94.33, red=96.30, white=92.98), miou=89.91, time_s=3.72),
    "ode-unet-9": dict(pa=95.14, cpa=dict(background=94.33, red=96.23, white=93.15), miou=90.03, time_s=7.35),
}


#: Table 2 of the paper (§4.2): U-Net vs "ResNet" (our ``resunet``) vs NODEs-UNet, percent.
#: (Its U-Net row differs from Table 1's: 94.42 / 88.43 vs 94.59 / 88.58; the paper does not say why.)
#: The parameter-memory column "M" is lost in the text we have; §4.2 gives the ratio instead.
PAPER_TABLE2 = {
    "unet":       dict(pa=94.42, cpa=dict(background=92.55, red=96.54, white=94.10), miou=88.43),
    "resunet":    dict(pa=94.84, cpa=dict(background=94.55, red=95.60, white=92.89), miou=89.48),
    "nodes-unet": dict(pa=95.30, cpa=dict(background=94.58, red=95.94, white=95.37), miou=90.61),
}


#: §4.2: "the memory space occupied by the NODEs-UNet network is only 46% of the ResNet network".
PAPER_PARAM_MEMORY_RATIO = 0.46


#: §3.2 / §3.3: tolerance of the single block of Table 1; NODEs-UNet's three blocks.
PAPER_TABLE1_RTOL = 1e-3


PAPER_NODES_UNET_RTOLS = (1e-6, 1e-4, 1e-4)


#: §2, §3.2, §4.1: the paper's training setting.
PAPER_SETTINGS = dict(width=32, patch=256, epochs=50, n_test=20, train_val_patches=800, gpus=4)


#: The order of the CPA columns in the paper's tables, and our class index of each.
CPA_COLUMNS = (("background", 0), ("red", 2), ("white", 1))


def paper_gain(table: dict, better: str, worse: str, key: str) -> float:
    """The paper's improvement of ``better`` over ``worse`` in percentage points (e.g. +0.88 PA)."""
    return round(table[better][key] - table[worse][key], 2)
