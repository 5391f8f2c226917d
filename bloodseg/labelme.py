"""LabelMe annotations: polygons, rectangles and circles drawn in LabelMe become class masks.

A LabelMe ``.json`` holds the shapes a person drew and either the image itself (``imageData``,
base64) or its file name (``imagePath``, next to the ``.json``). Labels map to the three classes
by name (``label_map`` overrides); shapes are painted background first, then red cells, then white
cells, so a white cell drawn over a red one wins.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
from pathlib import Path

import cv2
import numpy as np

from .classes import BACKGROUND, RED_CELL, WHITE_CELL
from .errors import DataError
from .io import Sample, _decode, _read_bytes, _to_bgr8, read_image


def _default_class(label: str):
    if label in ("wbc",) or label.startswith("white"):
        return WHITE_CELL
    if label in ("rbc",) or label.startswith("red"):
        return RED_CELL
    if label in ("background", "bg"):
        return BACKGROUND
    return None


#: Points farther than this (px) from the origin are refused: no photograph is that large, and
#: OpenCV's drawing functions overflow on them.
_MAX_COORD = 1 << 20


def _points(shape: dict, index: int, where: str, need: int) -> np.ndarray:
    label = shape.get("label")
    try:
        pts = np.asarray(shape.get("points"), dtype=np.float64)
    except (TypeError, ValueError):
        pts = np.zeros((0,))
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) < need or not np.isfinite(pts).all() \
            or (np.abs(pts) > _MAX_COORD).any():   # cv2 overflows on huge coordinates
        kind = shape.get("shape_type") or "polygon"
        raise DataError(f"malformed {kind} (shape {index}, label {label!r}) in {where}: needs "
                        f"{'at least ' if kind == 'polygon' else ''}{need} numeric [x, y] points, got "
                        f"{shape.get('points')!r:.80}; fix or delete the shape in LabelMe")
    return pts


def _labelme_image(doc: dict, json_path: Path) -> np.ndarray:
    where = str(json_path.absolute())
    if doc.get("imageData"):
        try:
            data = base64.b64decode(doc["imageData"], validate=False)
        except (binascii.Error, ValueError, TypeError):
            raise DataError(f"imageData in {where} is not valid base64; re-save the file in LabelMe") from None
        return _to_bgr8(_decode(data, f"the imageData embedded in {where}"), where)
    rel = doc.get("imagePath")
    if not rel:
        raise DataError(f"{where} has neither imageData nor imagePath; re-save it in LabelMe "
                        "with the image next to the JSON")
    rel = str(rel).replace("\\", "/")
    folder = json_path.parent.resolve()
    try:
        target = (folder / rel).resolve()
        found = target.exists()
    except (ValueError, OSError) as exc:     # a NUL byte, a link loop, a name too long
        raise DataError(f"imagePath {rel[:80]!r} in {where} is not a usable file name ({exc}); set it "
                        "to the image's file name, or save with imageData embedded") from None
    if Path(rel).is_absolute() or not target.is_relative_to(folder):
        raise DataError(f"imagePath {rel!r} in {where} points outside the dataset folder {folder}; "
                        "for safety only images inside that folder are read. Move the image next to "
                        "the JSON and set imagePath to its file name, or save with imageData embedded")
    if not found:
        raise DataError(f"image for {where} not found: {target} (from imagePath {rel!r}); "
                        "put the image there or save the JSON with imageData embedded")
    try:
        return read_image(target)
    except DataError as exc:   # say which annotation asked for it
        raise DataError(f"{exc} (the image named by imagePath {rel!r:.80} in {where})") from None


def labelme_to_mask(json_path, label_map: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise a LabelMe JSON file; return ``(image BGR uint8 HxWx3, mask uint8 HxW)``.

    Shapes: ``polygon`` (≥ 3 points), ``rectangle`` (2 corners), ``circle`` (centre, a point on
    the circumference). Labels are lower-cased and mapped by default: ``wbc`` or ``white…`` → 1,
    ``rbc`` or ``red…`` → 2, ``background``/``bg`` → 0; ``label_map`` (e.g. ``{"neutrophil": 1}``)
    adds to or overrides these. Background shapes are drawn first, then red cells, then white
    cells, so a white cell wins where it overlaps a red one. The image comes from the embedded
    ``imageData`` or else from ``imagePath``, which must stay inside the JSON's folder.
    """
    json_path = Path(json_path)
    where = str(json_path.absolute())
    try:
        doc = json.loads(_read_bytes(json_path, "LabelMe JSON").decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise DataError(f"{where} is not valid JSON ({exc}); is it a LabelMe file?") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("shapes", []), list):
        raise DataError(f"{where} is not a LabelMe file (expected an object with a 'shapes' list)")
    user = {str(k).strip().lower(): v for k, v in (label_map or {}).items()}
    for k, v in user.items():
        if v not in (0, 1, 2):
            raise DataError(f"label_map maps {k!r} to {v!r}; classes are 0 background, 1 white cell, 2 red cell")

    image = _labelme_image(doc, json_path)
    h, w = image.shape[:2]
    exp_h, exp_w = doc.get("imageHeight"), doc.get("imageWidth")
    for key, value in (("imageHeight", exp_h), ("imageWidth", exp_w)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value != int(value)):
            raise DataError(f"{key} in {where} is {value!r:.40}, not a whole number of pixels; "
                            "re-save the file in LabelMe")
    if (exp_h is not None and int(exp_h) != h) or (exp_w is not None and int(exp_w) != w):
        raise DataError(f"image size mismatch in {where}: the JSON says {exp_w}x{exp_h} (WxH) but the "
                        f"image is {w}x{h}; the annotation belongs to another image or the image was "
                        "resized, re-annotate or restore the original")

    drawn = []
    for i, shape in enumerate(doc.get("shapes", [])):
        if not isinstance(shape, dict):
            raise DataError(f"shape {i} in {where} is {type(shape).__name__} {shape!r:.40}, not an object "
                            "with label and points; fix or delete it in LabelMe")
        label = str(shape.get("label", "")).strip().lower()
        cls = user[label] if label in user else _default_class(label)
        if cls is None:
            known = "wbc / white* → 1, rbc / red* → 2, background / bg → 0"
            extra = f"; your label_map: {user}" if user else ""
            raise DataError(f"unknown label {shape.get('label')!r} (shape {i}) in {where}; known labels: "
                            f"{known}{extra}. Pass label_map={{{label!r}: 1}} (0, 1 or 2) to name its class")
        kind = shape.get("shape_type") or "polygon"     # old LabelMe files leave it empty
        if kind not in ("polygon", "rectangle", "circle"):
            raise DataError(f"unsupported shape type {kind!r} (shape {i}, label {label!r}) in {where}; "
                            "use polygon, rectangle or circle for cells")
        need = 3 if kind == "polygon" else 2
        drawn.append((cls, kind, _points(shape, i, where, need)))

    mask = np.zeros((h, w), np.uint8)
    for order in (BACKGROUND, RED_CELL, WHITE_CELL):
        for cls, kind, pts in drawn:
            if cls != order:
                continue
            if kind == "polygon":
                cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], int(cls))
            elif kind == "rectangle":
                (x0, y0), (x1, y1) = np.round(pts[:2]).astype(int)
                cv2.rectangle(mask, (min(x0, x1), min(y0, y1)), (max(x0, x1), max(y0, y1)), int(cls), -1)
            else:
                (cx, cy), edge = pts[0], pts[1]
                radius = int(round(float(np.hypot(*(edge - pts[0])))))
                cv2.circle(mask, (int(round(cx)), int(round(cy))), radius, int(cls), -1)
    return image, mask


def load_labelme_folder(root, label_map: dict | None = None) -> list[Sample]:
    """Every ``root/*.json`` LabelMe file as a :class:`Sample` (name and source = the JSON's stem)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"LabelMe folder not found: {root.absolute()}")
    files = sorted(root.glob("*.json"))
    if not files:
        raise DataError(f"no LabelMe .json files in {root.absolute()}; save the annotations there")
    samples, inside = [], root.resolve()
    for f in files:
        if not f.resolve().is_relative_to(inside):
            raise DataError(f"{f.absolute()} is a link to {f.resolve()}, outside the LabelMe folder {inside}; "
                            "for safety only annotation files inside that folder are read. Copy the file "
                            "into the folder instead of linking it")
        image, mask = labelme_to_mask(f, label_map)
        samples.append(Sample(f.stem, image, mask, f.stem))
    return samples
