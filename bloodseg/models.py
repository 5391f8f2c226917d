"""The networks of the paper: a half-width U-Net with an ODE-block slot at 9 positions, the
"ResNet" baseline, and NODEs-UNet.

Half-width U-Net (paper §3.3). Widths ``w, 2w, 4w, 8w, 16w`` with ``w = 32`` (32..512, half of
Ronneberger et al.'s 64..1024). Every level is a double conv block (3x3 "same" conv → GroupNorm →
ReLU, twice); max-pooling goes down; going up, a feature map is upsampled bilinearly (x2), a 3x3
conv-norm-ReLU halves its channels, the skip of the same level is concatenated, and a double conv
block fuses them. A final 1x1 conv gives ``classes`` logits. ``forward`` returns LOGITS: softmax
(paper eq. 6) belongs to the loss (``F.cross_entropy``) and to prediction, never to ``forward``.
The paper does not say which normalisation its Keras U-Net used; we default to GroupNorm
(:func:`make_norm` says why) and offer ``norm="batch"``.

ODE-block positions (paper Fig. 5 / Table 1)::

    1 ─ encoder level 1 (full res, w)                          9 ─ decoder level 1 (full res, w)
      2 ─ encoder level 2 (1/2, 2w)                          8 ─ decoder level 2 (1/2, 2w)
        3 ─ encoder level 3 (1/4, 4w)                      7 ─ decoder level 3 (1/4, 4w)
          4 ─ encoder level 4 (1/8, 8w)                  6 ─ decoder level 4 (1/8, 8w)
                          5 ─ bottom (1/16, 16w)

A block sits right after the double conv of its level; at an encoder level its output feeds both
the skip connection and the next max-pool. The smaller the feature map, the cheaper each
evaluation of f: that is why the paper's time falls from position 1 to 5 and rises again to 9.

NODEs-UNet: the paper puts "one ODE-block with tolerance 1e-6 and two with 1e-4 at the bottom of
the U" (its Fig. 6 is not in the text). Our reading, :data:`NODES_UNET_BLOCKS`, is 1e-6 at the
bottom (5) and 1e-4 at the two levels next to it (4 and 6); ``build_model("nodes-unet",
blocks={...})`` tries another.

"ResNet" baseline (:class:`ResUNet`): the paper only says that the residual blocks were placed as in
D-LinkNet (its ref. [20]): a residual encoder and a dilated centre. Our reading: the same half-width
U-Net skeleton, each encoder level a residual stage (a BasicBlock: conv-BN-ReLU-conv-BN plus an
identity or 1x1-projection shortcut, then ReLU), and at the bottom D-LinkNet's dilated centre (a
cascade of 3x3 convs with dilation 1, 2, 4, 8 whose outputs are summed with the input); the decoder
is the U-Net's.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import BloodsegError, DataError
from .ode import ODEBlock

__all__ = [
    "MODEL_NAMES",
    "NODES_UNET_BLOCKS",
    "POSITIONS",
    "DoubleConv",
    "BasicBlock",
    "DilatedCentre",
    "Up",
    "UNet",
    "ResUNet",
    "build_model",
    "position_channels",
    "position_scale",
    "count_parameters",
    "parameter_memory_mb",
]

#: The 9 ODE-block positions of Fig. 5: 1–4 down the encoder, 5 the bottom, 6–9 up the decoder.
POSITIONS = tuple(range(1, 10))
# position → U-Net level (0 = full resolution, 4 = the bottom at 1/16)
_POSITION_LEVEL = {1: 0, 2: 1, 3: 2, 4: 3, 5: 4, 6: 3, 7: 2, 8: 1, 9: 0}

#: NODEs-UNet (paper §3.3): position → tolerance (rtol = atol). Our reading of "one ODE-block with
#: tolerance 1e-6 and two with 1e-4 at the bottom of the U".
NODES_UNET_BLOCKS = {5: 1e-6, 4: 1e-4, 6: 1e-4}

#: The paper's Table 1 experiment: one block at a time, tolerance 1e-3.
SINGLE_BLOCK_RTOL = 1e-3

MODEL_NAMES = ("unet",) + tuple(f"ode-unet-{p}" for p in POSITIONS) + ("resunet", "nodes-unet")

_DIVISOR = 16  # four 2x2 max-pools


def position_channels(position: int, width: int = 32) -> int:
    """Channels of the feature map at ODE-block ``position`` for a U-Net of first width ``width``."""
    return width * 2 ** _POSITION_LEVEL[_check_position(position)]


def position_scale(position: int) -> int:
    """How many times smaller than the input the feature map at ``position`` is (1, 2, 4, 8, 16)."""
    return 2 ** _POSITION_LEVEL[_check_position(position)]


def _check_position(position) -> int:
    if isinstance(position, str) and position.strip().isdigit():
        position = int(position)
    if isinstance(position, bool) or not isinstance(position, int) or position not in POSITIONS:
        raise BloodsegError(f"ODE-block position must be one of 1..9 (paper Fig. 5), got {position!r}")
    return position


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BloodsegError(f"{name} must be a positive integer, got {value!r}")
    return value


NORMS = ("group", "batch")


def make_norm(channels: int, norm: str = "group") -> nn.Module:
    """The normalisation after each conv: GroupNorm (default) or BatchNorm.

    GroupNorm is the default because it normalises each image on its own: training and
    evaluation compute the same thing, small batches are fine, and a DDP step equals a
    single-process step on the same global batch exactly. With BatchNorm, short CPU runs showed
    validation scores swinging between epochs (running statistics lagging the weights).
    """
    if norm == "group":
        return nn.GroupNorm(_gn_groups(channels), channels)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    raise BloodsegError(f"norm must be one of {', '.join(NORMS)}; got {norm!r}")


def _gn_groups(channels: int) -> int:
    """Up to 8 groups, and a divisor of ``channels``."""
    return max(g for g in range(1, min(8, channels) + 1) if channels % g == 0)


class DoubleConv(nn.Sequential):
    """(3x3 "same" conv → norm → ReLU) x 2: one U-Net level."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "group"):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            make_norm(out_channels, norm),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            make_norm(out_channels, norm),
            nn.ReLU(inplace=True),
        )


class BasicBlock(nn.Module):
    """ResNet's BasicBlock: ReLU(conv-BN-ReLU-conv-BN(x) + shortcut(x)).

    The shortcut is the identity when the channels agree, else a 1x1 conv + BN projection.
    """

    def __init__(self, in_channels: int, out_channels: int, norm: str = "group"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = make_norm(out_channels, norm)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = make_norm(out_channels, norm)
        if in_channels == out_channels:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                          make_norm(out_channels, norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class DilatedCentre(nn.Module):
    """D-LinkNet's centre ("Dblock"): x + d1 + d2 + d3 + d4 with d_k = ReLU(conv_k(d_{k-1})),
    3x3 convs of dilation 1, 2, 4, 8 in cascade (receptive fields 3, 7, 15, 31)."""

    def __init__(self, channels: int, dilations=(1, 2, 4, 8)):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(channels, channels, 3, padding=d, dilation=d) for d in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, d = x, x
        for conv in self.convs:
            d = F.relu(conv(d))
            out = out + d
        return out


class Up(nn.Module):
    """Bilinear x2 upsampling → 3x3 conv-BN-ReLU halving the channels → concat skip → DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "group"):
        super().__init__()
        self.reduce = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            make_norm(out_channels, norm),
            nn.ReLU(inplace=True),
        )
        self.fuse = DoubleConv(2 * out_channels, out_channels, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = self.reduce(x)
        return self.fuse(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """Half-width U-Net with optional ODE-blocks (paper §3.2–3.3).

    Args:
        in_channels: image channels (3).
        classes: output classes (3: background, white cell, red cell).
        width: channels of the first level ``w``; levels have ``w, 2w, 4w, 8w, 16w`` (paper: 32).
        ode_blocks: ``{position: rtol}`` (atol = rtol) for ODE-blocks at positions 1..9, or None.
        method, adjoint, max_steps, ode_hidden: passed to every :class:`~bloodseg.ode.ODEBlock`
            (``ode_hidden`` is the inner width of f; None = the block's channels).
        norm: "group" (default, see :func:`make_norm`) or "batch" after every conv.

    ``forward(x)`` takes ``N x in_channels x H x W`` with H and W multiples of 16 and returns
    logits ``N x classes x H x W``. The model keeps ``name`` and ``options`` so that
    ``build_model(model.name, **model.options)`` rebuilds it (checkpoints rely on this).
    """

    def __init__(self, in_channels: int = 3, classes: int = 3, width: int = 32,
                 ode_blocks: dict[int, float] | None = None, method: str = "dopri5",
                 adjoint: bool = False, max_steps: int = 1000, ode_hidden: int | None = None,
                 norm: str = "group"):
        super().__init__()
        if norm not in NORMS:
            raise BloodsegError(f"norm must be one of {', '.join(NORMS)}; got {norm!r}")
        self.norm = norm
        self.in_channels = _check_positive_int("in_channels", in_channels)
        self.classes = _check_positive_int("classes", classes)
        self.width = _check_positive_int("width", width)
        if ode_hidden is not None:
            _check_positive_int("ode_hidden", ode_hidden)
        chs = [width * 2 ** level for level in range(5)]
        self.pool = nn.MaxPool2d(2)
        self.encoder = nn.ModuleList(
            self._make_stage(cin, cout) for cin, cout in zip([in_channels] + chs[:-1], chs))
        self.centre = self._make_centre(chs[-1])
        self.decoder = nn.ModuleList(Up(chs[level + 1], chs[level], norm) for level in (3, 2, 1, 0))
        self.head = nn.Conv2d(chs[0], classes, 1)

        positions = {_check_position(p): rtol for p, rtol in (ode_blocks or {}).items()}
        # ode_hidden is one absolute inner width for every block (None: each block's channels).
        self.ode = nn.ModuleDict({
            str(p): ODEBlock(position_channels(p, width), rtol=positions[p], method=method,
                             adjoint=adjoint, max_steps=max_steps, hidden=ode_hidden,
                             name=f"ODE-block at position {p}")
            for p in sorted(positions)})
        blocks = {int(p): block.rtol for p, block in self.ode.items()}  # validated floats

        # Canonical name/options: build_model(self.name, **self.options) rebuilds this network.
        self.options = dict(in_channels=in_channels, classes=classes, width=width)
        if norm != "group":  # only non-defaults, so older checkpoints' options stay valid
            self.options["norm"] = norm
        if not blocks:
            self.name = "unet"
        else:
            self.options.update(method=method, adjoint=bool(adjoint), max_steps=max_steps,
                                ode_hidden=ode_hidden)
            if len(blocks) == 1:
                (p, rtol), = blocks.items()
                self.name = f"ode-unet-{p}"
                self.options["rtol"] = rtol
            else:
                self.name = "nodes-unet"
                self.options["blocks"] = dict(sorted(blocks.items()))

    # The two things ResUNet changes.
    def _make_stage(self, in_channels: int, out_channels: int) -> nn.Module:
        return DoubleConv(in_channels, out_channels, self.norm)

    def _make_centre(self, channels: int) -> nn.Module:
        return nn.Identity()

    def _slot(self, position: int, h: torch.Tensor) -> torch.Tensor:
        key = str(position)
        return self.ode[key](h) if key in self.ode else h

    def _check_input(self, x) -> None:
        kind = type(self).__name__
        if not torch.is_tensor(x) or x.dim() != 4:
            got = f"a tensor of shape {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__
            raise DataError(
                f"{kind} expects a batch N x {self.in_channels} x H x W; got {got}. "
                "Add a batch axis with x.unsqueeze(0), or use bloodseg.predict_image for one image.")
        n, c, h, w = x.shape
        if c != self.in_channels:
            raise DataError(
                f"{kind} was built for {self.in_channels} input channels; got {n} x {c} x {h} x {w}. "
                "Pass an RGB image tensor (bloodseg.image_to_tensor) or build the model with "
                f"in_channels={c}.")
        if h % _DIVISOR or w % _DIVISOR or h == 0 or w == 0:
            raise DataError(
                f"{kind} needs H and W that are positive multiples of {_DIVISOR} (four 2x2 poolings); "
                f"got {n} x {c} x {h} x {w}. Pad to a multiple of {_DIVISOR}, or use "
                "bloodseg.predict_image / bloodseg.predict_files, which pad for you.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        skips = []
        h = x
        for level, stage in enumerate(self.encoder):  # positions 1..5
            if level > 0:
                h = self.pool(h)
                # (position 5 is the bottom: pooled 4 times, then the centre)
            h = stage(h)
            if level == len(self.encoder) - 1:
                h = self.centre(h)
            h = self._slot(level + 1, h)
            if level < len(self.encoder) - 1:
                skips.append(h)
        for i, up in enumerate(self.decoder):  # positions 6..9
            h = up(h, skips[-1 - i])
            h = self._slot(6 + i, h)
        return self.head(h)


class ResUNet(UNet):
    """The paper's "ResNet" baseline in our reading (see the module docstring): U-Net skeleton,
    residual encoder stages (:class:`BasicBlock`), D-LinkNet dilated centre, U-Net decoder."""

    def __init__(self, in_channels: int = 3, classes: int = 3, width: int = 32, norm: str = "group"):
        super().__init__(in_channels=in_channels, classes=classes, width=width, norm=norm)
        self.name = "resunet"
        self.options = dict(in_channels=in_channels, classes=classes, width=width)
        if norm != "group":
            self.options["norm"] = norm

    def _make_stage(self, in_channels: int, out_channels: int) -> nn.Module:
        return BasicBlock(in_channels, out_channels, self.norm)

    def _make_centre(self, channels: int) -> nn.Module:
        return DilatedCentre(channels)


_COMMON_OPTIONS = ("width", "in_channels", "classes", "norm")
_ODE_OPTIONS = ("method", "adjoint", "max_steps", "ode_hidden")


def build_model(name: str, **options) -> UNet:
    """Build a network by name: one of :data:`MODEL_NAMES`.

    * ``unet`` – the half-width U-Net;
    * ``ode-unet-1`` … ``ode-unet-9`` – one ODE-block at that position, rtol = atol = 1e-3 as in
      the paper's Table 1 (option ``rtol`` changes it);
    * ``resunet`` – the "ResNet" baseline (:class:`ResUNet`);
    * ``nodes-unet`` – ODE-blocks at :data:`NODES_UNET_BLOCKS` (option ``blocks={position: rtol}``
      overrides; string keys such as ``"5"`` from JSON are accepted; option ``rtol`` then sets one
      tolerance for all of its blocks).

    Options: ``width`` (32), ``in_channels`` (3), ``classes`` (3), ``norm`` ("group"); for models with ODE-blocks also
    ``method`` ("dopri5"), ``adjoint`` (False), ``max_steps`` (1000), ``ode_hidden`` (None). The
    ODE options (and ``rtol``) are accepted and ignored by ``unet`` and ``resunet``, so one options
    dict can build every model of a comparison.
    """
    if not isinstance(name, str):
        raise BloodsegError(f"model name must be a string, one of: {', '.join(MODEL_NAMES)}")
    key = name.strip().lower().replace("_", "-")
    if key not in MODEL_NAMES:
        raise BloodsegError(f"unknown model {name!r}: choose one of {', '.join(MODEL_NAMES)}")
    allowed = set(_COMMON_OPTIONS) | set(_ODE_OPTIONS) | {"rtol"}
    if key == "nodes-unet":
        allowed.add("blocks")
    unknown = sorted(set(options) - allowed)
    if unknown:
        hint = " (blocks is for nodes-unet; ode-unet-k takes rtol)" if "blocks" in unknown else ""
        raise BloodsegError(
            f"unknown option(s) {', '.join(unknown)} for model {key!r}{hint}; valid options: "
            f"{', '.join(sorted(allowed))}")
    common = {k: options[k] for k in _COMMON_OPTIONS if k in options}
    ode = {k: options[k] for k in _ODE_OPTIONS if k in options}
    if key == "unet":
        return UNet(**common)
    if key == "resunet":
        return ResUNet(**common)
    if key == "nodes-unet":
        blocks = options.get("blocks")
        if blocks is None:
            blocks = NODES_UNET_BLOCKS
        if not isinstance(blocks, dict) or not blocks:
            raise BloodsegError(f"blocks must be a non-empty dict {{position: rtol}}, got {blocks!r}")
        blocks = {_check_position(p): tol for p, tol in blocks.items()}
        if options.get("rtol") is not None:  # one tolerance for every block
            blocks = {p: options["rtol"] for p in blocks}
        return UNet(**common, ode_blocks=blocks, **ode)
    position = int(key.rsplit("-", 1)[1])
    return UNet(**common, ode_blocks={position: options.get("rtol", SINGLE_BLOCK_RTOL)}, **ode)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (weights and biases; BatchNorm running statistics are buffers, not
    parameters, and are not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def parameter_memory_mb(model: nn.Module) -> float:
    """Memory of the parameters in MiB (bytes / 2**20), at their current dtype (float32: 4 bytes
    each) – the paper's "parameter memory" column. Buffers are not included."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 20
