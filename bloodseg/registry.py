"""One model registry: every network variant the book, the CLI and the records name, in one table.

A *variant* is a label (what records, tables and ``--model`` say) with the model name of
:func:`bloodseg.models.build_model`, the options it is built with, and a title for figures. The
paper's models are variants of themselves (``unet``, ``ode-unet-1`` … ``ode-unet-9``, ``resunet``,
``nodes-unet``); the others add options, e.g. ``nodes-unet-h16``: NODEs-UNet whose ODE functions
have 16 hidden channels (``ode_hidden``) — the "narrow f" of chapter 6. ``nodes-unet-hN`` works for
any N. Adding a variant is one entry of :data:`VARIANTS` (and, if it needs a new kind of block,
the code of that block in :mod:`bloodseg.models`)::

    net = build_variant("nodes-unet-h16", width=8)
    net = build_variant("nodes-unet", width=8, method="euler")   # options on top of the entry's

``train``, ``train-bccd`` and ``bench`` take any label and ``--model-option k=v`` for more
options (:func:`parse_model_options`); ``reproduce`` and the speed records read their labels here.
"""
from __future__ import annotations

import dataclasses
import json
import re

from .errors import BloodsegError
from .models import MODEL_NAMES, POSITIONS, build_model

__all__ = ["Variant", "VARIANTS", "variant", "variant_names", "build_variant", "parse_model_options", "title"]


@dataclasses.dataclass(frozen=True)
class Variant:
    """A label, the :func:`~bloodseg.models.build_model` name and options it stands for, and a title."""
    label: str
    model: str
    options: dict = dataclasses.field(default_factory=dict)
    title: str = ""


def _entries():
    yield Variant("unet", "unet", {}, "U-Net")
    for p in POSITIONS:
        yield Variant(f"ode-unet-{p}", f"ode-unet-{p}", {}, f"ODE-UNet (block {p})")
    yield Variant("resunet", "resunet", {}, "ResNet U-Net")
    yield Variant("nodes-unet", "nodes-unet", {}, "NODEs-UNet")
    yield Variant("nodes-unet-h16", "nodes-unet", {"ode_hidden": 16}, "NODEs-UNet, narrow f (hidden 16)")


#: label -> :class:`Variant`; every name of :data:`bloodseg.models.MODEL_NAMES` is a label of itself.
VARIANTS: dict[str, Variant] = {v.label: v for v in _entries()}
assert set(MODEL_NAMES) <= set(VARIANTS)


def variant_names() -> tuple:
    """The labels of :data:`VARIANTS` (the paper's model names first)."""
    return tuple(VARIANTS)


def variant(label: str) -> Variant:
    """The :class:`Variant` of ``label``: an entry of :data:`VARIANTS`, or ``nodes-unet-hN``
    (NODEs-UNet with ``ode_hidden`` N) for any N."""
    if not isinstance(label, str):
        raise BloodsegError(f"a model label must be a string, one of: {', '.join(VARIANTS)}")
    key = label.strip().lower().replace("_", "-")
    if key in VARIANTS:
        return VARIANTS[key]
    m = re.fullmatch(r"nodes-unet-h(\d+)", key)
    if m and int(m.group(1)) > 0:
        h = int(m.group(1))
        return Variant(key, "nodes-unet", {"ode_hidden": h}, f"NODEs-UNet, narrow f (hidden {h})")
    raise BloodsegError(f"unknown model {label!r}: choose one of {', '.join(VARIANTS)} (or nodes-unet-hN)")


def title(label: str) -> str:
    """The figure title of a label (the label itself when it is not a variant)."""
    try:
        return variant(label).title or label
    except BloodsegError:
        return label


def build_variant(label: str, width: int = 32, **options):
    """The network of ``label`` at ``width``: its entry's options, then ``options`` on top. The
    built network's ``options`` record everything (checkpoints store them), so it reloads by its
    model name alone."""
    v = variant(label)
    return build_model(v.model, width=width, **{**v.options, **options})


def parse_model_options(items) -> dict:
    """``["ode_hidden=16", "method=euler"]`` (``--model-option k=v``, repeatable) as a dict; values
    are read as JSON when they can be (numbers, true/false, null, lists), else kept as text."""
    out = {}
    for item in items or ():
        key, eq, value = str(item).partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key.isidentifier():
            raise BloodsegError(f"--model-option {item!r}: write KEY=VALUE, e.g. ode_hidden=16 or method=euler")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value.strip()
    return out
