"""Data in: image and mask readers, LabelMe and BCCD converters, patches, augmentation, splits.

Every image leaves this module as OpenCV BGR ``uint8 HxWx3`` and every mask as ``uint8 HxW``
with 0 background, 1 white cell, 2 red cell. Anything a user can get wrong (a missing, empty,
corrupt or oddly encoded file, a mask with foreign values, a LabelMe label we do not know)
raises :class:`~bloodseg.errors.DataError` naming the file and saying what to do.

The paper's data recipe (§2): 256x256 crops from 775x519 smears, 20 crops held out for test,
the other 80 augmented x10 and split 3:1 into train and validation. :func:`make_splits` holds
the test crops out *by source image*, so no test crop shares pixels with a training crop.
"""
from __future__ import annotations

import base64
import binascii
import csv
import dataclasses
import functools
import json
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import torch

from .errors import DataError
from .preprocess import image_to_tensor
from .profiles import PROFILES, Profile, get_profile
from .synthetic import (BACKGROUND, PALETTE_BGR, RED_CELL, WHITE_CELL, _fill_small_holes,
                        _remove_small, make_smear, stain_masks)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_CLASSES_TEXT = "masks hold 0 background, 1 white cell, 2 red cell"


# ----------------------------------------------------------------------------- readers

def _read_bytes(path: Path, what: str) -> bytes:
    if not path.exists():
        raise DataError(f"{what} file not found: {path.absolute()}; check the path and the file name")
    if path.is_dir():
        raise DataError(f"{what} path is a folder, not a file: {path.absolute()}; pass the file itself")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {what} file {path.absolute()} ({exc.strerror or exc}); "
                        "check its permissions") from None
    if not data:
        raise DataError(f"{what} file is empty (0 bytes): {path.absolute()}; "
                        "the copy or export failed, re-export it")
    return data


def _looks_truncated(data: bytes) -> bool:
    """True for a JPEG without its end marker after the last scan, or a PNG without IEND.

    OpenCV decodes such files with a warning and grey filler instead of failing, which
    would silently put a half-grey picture into training.
    """
    if data[:2] == b"\xff\xd8":
        return data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda")
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return b"IEND" not in data[-32:]
    return False


def _decode(data: bytes, where: str) -> np.ndarray:
    image = None
    if not _looks_truncated(data):
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise DataError(f"cannot decode {where}: is it an image? The file may be truncated or "
                        "corrupt; re-export it as PNG/JPEG")
    return image


def _to_bgr8(image: np.ndarray, where: str) -> np.ndarray:
    """Any decoded picture → BGR uint8 HxWx3 (grey → 3 channels, alpha dropped, 16-bit >> 8)."""
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)       # keep the top 8 bits: same look, 8-bit range
    elif image.dtype != np.uint8:
        raise DataError(f"unsupported pixel type {image.dtype} in {where}; "
                        "save the image as 8-bit or 16-bit PNG/JPEG/TIFF")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 2:     # grey + alpha
        return cv2.cvtColor(np.ascontiguousarray(image[..., 0]), cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 4:     # BGRA: drop alpha, keep the stored colours
        return np.ascontiguousarray(image[..., :3])
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    raise DataError(f"unsupported image layout {image.shape} in {where}; "
                    "save it as a grey or colour PNG/JPEG")


def read_image(path) -> np.ndarray:
    """Read an image file as OpenCV BGR ``uint8 HxWx3``.

    Grey images become 3 equal channels; an alpha channel is dropped (the stored colours are
    kept as they are, not composited: smear photos carry no meaningful transparency); 16-bit
    images are scaled to 8 bits by keeping the high byte (``>> 8``). EXIF orientation is
    ignored, so the pixels match a mask drawn on the stored image. Missing, empty, truncated
    or undecodable files and other pixel types raise :class:`DataError`.
    """
    p = Path(path)
    return _to_bgr8(_decode(_read_bytes(p, "image"), str(p.absolute())), str(p.absolute()))


def _palette_to_classes(colour: np.ndarray, where: str) -> np.ndarray:
    flat = colour.reshape(-1, 3).astype(np.int32)
    codes = (flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2]
    palette = PALETTE_BGR.astype(np.int32)
    pal_codes = (palette[:, 0] << 16) | (palette[:, 1] << 8) | palette[:, 2]
    classes = np.full(codes.shape, 255, np.uint8)
    for cls, code in enumerate(pal_codes):
        classes[codes == code] = cls
    if (classes == 255).any():
        bad = np.unique(codes[classes == 255])[:5]
        shown = ", ".join(f"BGR({c >> 16},{(c >> 8) & 255},{c & 255})" for c in bad)
        allowed = ", ".join(f"{i} BGR{tuple(int(v) for v in row)}" for i, row in enumerate(PALETTE_BGR))
        raise DataError(f"colour mask {where} has colours outside the class palette: {shown}; "
                        f"{_CLASSES_TEXT} (palette {allowed}). Save masks as single-channel PNG with "
                        "values 0/1/2, or paint exactly the palette colours in a lossless PNG "
                        "(JPEG changes colours)")
    return classes.reshape(colour.shape[:2])


def read_mask(path) -> np.ndarray:
    """Read a class mask as ``uint8 HxW`` with values in {0 background, 1 white cell, 2 red cell}.

    Accepts a single-channel PNG holding 0/1/2 (also stored as 3 equal channels), or a colour
    mask painted exactly in :data:`bloodseg.synthetic.PALETTE_BGR` (alpha ignored). Other values
    or colours raise :class:`DataError` naming them.
    """
    p = Path(path)
    where = str(p.absolute())
    raw = _decode(_read_bytes(p, "mask"), where)
    if raw.dtype not in (np.uint8, np.uint16):
        raise DataError(f"unsupported pixel type {raw.dtype} in mask {where}; "
                        "save masks as 8-bit single-channel PNG with values 0/1/2")
    if raw.ndim == 3 and raw.shape[2] == 4:
        raw = raw[..., :3]
    if raw.ndim == 3 and raw.shape[2] == 1:
        raw = raw[..., 0]
    if raw.ndim == 3 and raw.shape[2] == 3:
        if (raw[..., 0] == raw[..., 1]).all() and (raw[..., 1] == raw[..., 2]).all():
            raw = raw[..., 0]                           # grey stored as RGB
        elif raw.dtype == np.uint8:
            return _palette_to_classes(raw, where)
    if raw.ndim != 2:
        raise DataError(f"unsupported mask layout {raw.shape} in {where}; "
                        "save masks as single-channel PNG with values 0/1/2")
    values = np.unique(raw)
    bad = [int(v) for v in values if v > 2]
    if bad:
        shown = ", ".join(map(str, bad[:6])) + (", ..." if len(bad) > 6 else "")
        hint = (" It looks like a 0/255 binary mask: map 255 to the class it stands for."
                if bad == [255] else "")
        raise DataError(f"mask value {shown} found in {where}; {_CLASSES_TEXT}.{hint} "
                        "Convert the mask to these values (or to the palette colours) and save it as PNG")
    return raw.astype(np.uint8)


# ----------------------------------------------------------------------------- samples and folders

@dataclasses.dataclass
class Sample:
    """One image with its mask. ``image``: BGR ``uint8 HxWx3``; ``mask``: ``uint8 HxW`` in {0,1,2};
    ``source``: the original image it came from (crops and augmented copies keep it), used to keep
    one source out of both sides of a train/test split."""
    name: str
    image: np.ndarray
    mask: np.ndarray
    source: str


def _files_by_stem(folder: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
            found.setdefault(f.stem, []).append(f)
    return found


def load_folder(root) -> list[Sample]:
    """Load ``root/images/*`` with ``root/masks/*`` matched by file stem (.png .jpg .jpeg .bmp .tif .tiff).

    Returns samples sorted by name, ``source`` = the stem. Raises :class:`DataError` for a missing
    folder, no images, an image without mask, two files with one stem, or differing sizes.
    """
    root = Path(root)
    images_dir, masks_dir = root / "images", root / "masks"
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise DataError(f"folder not found: {d.absolute()}; a dataset folder holds images/ and "
                            "masks/ with one mask per image, matched by file name")
    images, masks = _files_by_stem(images_dir), _files_by_stem(masks_dir)
    if not images:
        raise DataError(f"no images in {images_dir.absolute()} (looked for "
                        f"{' '.join(IMAGE_EXTENSIONS)}); put the smear images there")
    samples = []
    for stem, files in images.items():
        for kind, group in (("images", files), ("masks", masks.get(stem, []))):
            if len(group) > 1:
                raise DataError(f"several {kind} share the name {stem!r}: "
                                f"{', '.join(str(f.absolute()) for f in group)}; keep one")
        if stem not in masks:
            raise DataError(f"image {files[0].absolute()} has no mask: expected "
                            f"{(masks_dir / (stem + '.png')).absolute()} (any of "
                            f"{' '.join(IMAGE_EXTENSIONS)}); add it or move the image out")
        image, mask = read_image(files[0]), read_mask(masks[stem][0])
        if image.shape[:2] != mask.shape:
            raise DataError(f"size mismatch: image {files[0].absolute()} is "
                            f"{image.shape[1]}x{image.shape[0]} (WxH) but mask "
                            f"{masks[stem][0].absolute()} is {mask.shape[1]}x{mask.shape[0]}; "
                            "a mask must have the size of its image")
        samples.append(Sample(stem, image, mask, stem))
    return samples


def load_splits(root) -> dict[str, list[Sample]]:
    """Load ``root/{train,val,test}`` (as written by :func:`prepare_bccd`) with :func:`load_folder`."""
    root = Path(root)
    missing = [s for s in ("train", "val", "test") if not (root / s).is_dir()]
    if missing:
        raise DataError(f"{root.absolute()} lacks the split folder(s) {', '.join(missing)}; expected "
                        "train/, val/ and test/ each with images/ and masks/ (see prepare_bccd)")
    return {s: load_folder(root / s) for s in ("train", "val", "test")}


# ----------------------------------------------------------------------------- LabelMe

def _default_class(label: str):
    if label in ("wbc",) or label.startswith("white"):
        return WHITE_CELL
    if label in ("rbc",) or label.startswith("red"):
        return RED_CELL
    if label in ("background", "bg"):
        return BACKGROUND
    return None


def _points(shape: dict, index: int, where: str, need: int) -> np.ndarray:
    label = shape.get("label")
    try:
        pts = np.asarray(shape.get("points"), dtype=np.float64)
    except (TypeError, ValueError):
        pts = np.zeros((0,))
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) < need or not np.isfinite(pts).all():
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
    target = (folder / rel).resolve()
    if Path(rel).is_absolute() or not target.is_relative_to(folder):
        raise DataError(f"imagePath {rel!r} in {where} points outside the dataset folder {folder}; "
                        "for safety only images inside that folder are read. Move the image next to "
                        "the JSON and set imagePath to its file name, or save with imageData embedded")
    if not target.exists():
        raise DataError(f"image for {where} not found: {target} (from imagePath {rel!r}); "
                        "put the image there or save the JSON with imageData embedded")
    return read_image(target)


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
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
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
    if (exp_h is not None and int(exp_h) != h) or (exp_w is not None and int(exp_w) != w):
        raise DataError(f"image size mismatch in {where}: the JSON says {exp_w}x{exp_h} (WxH) but the "
                        f"image is {w}x{h}; the annotation belongs to another image or the image was "
                        "resized, re-annotate or restore the original")

    drawn = []
    for i, shape in enumerate(doc.get("shapes", [])):
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


# ----------------------------------------------------------------------------- BCCD

def bccd_sample_dir() -> Path:
    """The 16 BCCD images vendored with the package (raw layout, see its PROVENANCE.md)."""
    path = Path(__file__).resolve().parent / "data" / "bccd_sample"
    if not (path / "images").is_dir():
        raise DataError(f"the vendored BCCD sample is missing at {path}; reinstall bloodseg "
                        "(the package data bloodseg/data/bccd_sample/** was not installed)")
    return path


def _voc_boxes(xml_path: Path) -> dict[str, list[tuple[int, int, int, int]]]:
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise DataError(f"cannot parse the Pascal VOC file {xml_path.absolute()} ({exc}); "
                        "restore it from the BCCD dataset") from None
    boxes: dict[str, list] = {"RBC": [], "WBC": [], "Platelets": []}
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        bb = obj.find("bndbox")
        if bb is None:
            continue
        try:
            box = tuple(int(round(float(bb.findtext(k)))) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError):
            raise DataError(f"a box of {name!r} in {xml_path.absolute()} has non-numeric corners") from None
        boxes.setdefault(name, []).append(box)
    return boxes


def silver_red_cells(image_bgr: np.ndarray, white: np.ndarray) -> np.ndarray:
    """Red-cell pixels derived from colour (SILVER labels), never on ``white`` (the gold white cells).

    BGR ``uint8 HxWx3`` in, boolean ``HxW`` out. Areas scale with the image relative to BCCD's
    640x480. (1) A 5x5 median filter calms JPEG noise. (2) On the CLAHE'd image, red cells are
    pixels whose Lab a* (pinkness) exceeds the image's own Otsu threshold and which are not
    purple (nuclei, platelets), see :func:`bloodseg.synthetic.stain_masks`. (3) A 5x5 closing
    then opening smooths the outline and removes specks and thin bridges. (4) Holes up to
    2500 px are filled: the pale central pallor of a red cell (larger holes are plasma enclosed
    by touching cells and stay background). (5) Components below 400 px are dropped.
    (6) White-cell pixels are removed. Measured on 60 BCCD train/val images: 83% of RBC boxes
    at least half covered; the rule was chosen over plainer variants (77-82%) by that number.
    """
    h, w = image_bgr.shape[:2]
    scale = h * w / (640 * 480)
    _, pink = stain_masks(cv2.medianBlur(image_bgr, 5))
    pink &= ~white
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    red = cv2.morphologyEx(pink.astype(np.uint8), cv2.MORPH_CLOSE, disc)
    red = cv2.morphologyEx(red, cv2.MORPH_OPEN, disc).astype(bool)
    red = _fill_small_holes(red, int(2500 * scale))
    red = _remove_small(red, int(400 * scale) + 1)
    return red & ~white


def _write_png(path: Path, array: np.ndarray) -> None:
    try:
        path.write_bytes(cv2.imencode(".png", array)[1].tobytes())
    except OSError as exc:
        raise DataError(f"cannot write {path.absolute()} ({exc.strerror or exc}); "
                        "choose an output folder you can write to, with free space") from None


def _read_ids(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def prepare_bccd(src, out, limit: int | None = None) -> dict:
    """Turn the raw BCCD folder into 3-class train/val/test folders; return the report.

    Reads ``src/images/BloodImage_NNNNN.jpg``, ``src/wbc_masks/BloodImage_Mask_NNNNN.png``,
    ``src/annotations/BloodImage_NNNNN.xml`` and ``src/splits/{train,val,test}.txt`` (images in no
    split file, the three without VOC boxes, join train). Writes ``out/{split}/images/*.png``
    (BGR as decoded, losslessly) and ``out/{split}/masks/*.png`` with:

    * 1 white cell — GOLD: the human mask of Banik et al. (grey > 100: nucleus and cytoplasm;
      RGB masks are converted to grey first);
    * 2 red cell — SILVER: derived from colour by :func:`silver_red_cells`, never on white cells;
    * 0 background — the rest (plasma, platelets).

    Also writes ``out/boxes.csv`` (box counts per image, for counting) and ``out/bccd_report.json``:
    per split and overall, ``box_coverage`` = share of RBC boxes at least half covered by silver
    red pixels, ``pixels_in_boxes`` = share of silver red pixels inside some RBC box (a lower bound
    on precision: BCCD leaves many red cells unboxed). ``limit`` keeps the first N ids per split.
    """
    src, out = Path(src), Path(out)
    for sub in ("images", "wbc_masks", "annotations", "splits"):
        if not (src / sub).is_dir():
            raise DataError(f"{src.absolute()} lacks the folder {sub}/; a BCCD folder holds images/, "
                            "wbc_masks/, annotations/ and splits/ (see data/bccd/README.md)")
    splits = {}
    for s in ("train", "val", "test"):
        f = src / "splits" / f"{s}.txt"
        if not f.is_file():
            raise DataError(f"split file not found: {f.absolute()}; BCCD ships splits/train.txt, val.txt, test.txt")
        splits[s] = _read_ids(f)
    listed = {i for ids in splits.values() for i in ids}
    unlisted = sorted(p.stem for p in (src / "images").glob("BloodImage_*.jpg") if p.stem not in listed)
    splits["train"] = sorted(splits["train"] + unlisted)
    if limit is not None:
        splits = {s: ids[: int(limit)] for s, ids in splits.items()}

    t0 = time.perf_counter()
    rows, report = [], {}
    totals = dict(boxes=0, covered=0, red=0, red_in=0)
    for split, ids in splits.items():
        for sub in ("images", "masks"):
            try:
                (out / split / sub).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DataError(f"cannot create {(out / split / sub).absolute()} ({exc.strerror or exc}); "
                                "choose an output folder you can write to") from None
        acc = dict(images=0, with_boxes=0, boxes=0, covered=0, red=0, red_in=0,
                   white_px=0, red_px=0, pixels=0)
        for ident in ids:
            number = ident.rsplit("_", 1)[-1]
            image = read_image(src / "images" / f"{ident}.jpg")
            gold = cv2.imdecode(np.frombuffer(_read_bytes(src / "wbc_masks" / f"BloodImage_Mask_{number}.png",
                                                          "white-cell mask"), np.uint8), cv2.IMREAD_GRAYSCALE)
            if gold is None or gold.shape != image.shape[:2]:
                raise DataError(f"white-cell mask for {ident} is unreadable or not {image.shape[1]}x"
                                f"{image.shape[0]}: {(src / 'wbc_masks').absolute()}; restore it from the dataset")
            white = gold > 100
            red = silver_red_cells(image, white)
            mask = np.zeros(white.shape, np.uint8)
            mask[red] = RED_CELL
            mask[white] = WHITE_CELL
            _write_png(out / split / "images" / f"{ident}.png", image)
            _write_png(out / split / "masks" / f"{ident}.png", mask)
            acc["images"] += 1
            acc["white_px"] += int(white.sum())
            acc["red_px"] += int(red.sum())
            acc["pixels"] += mask.size

            xml = src / "annotations" / f"{ident}.xml"
            row = dict(split=split, image=ident, has_boxes=int(xml.is_file()),
                       n_rbc_boxes="", n_wbc_boxes="", n_platelet_boxes="")
            if xml.is_file():
                boxes = _voc_boxes(xml)
                row.update(n_rbc_boxes=len(boxes["RBC"]), n_wbc_boxes=len(boxes["WBC"]),
                           n_platelet_boxes=len(boxes["Platelets"]))
                in_box = np.zeros(white.shape, bool)
                for x0, y0, x1, y1 in boxes["RBC"]:
                    x0, y0 = max(x0, 0), max(y0, 0)
                    x1, y1 = min(x1, image.shape[1] - 1), min(y1, image.shape[0] - 1)
                    if x1 <= x0 or y1 <= y0:
                        continue
                    acc["boxes"] += 1
                    acc["covered"] += int(red[y0:y1 + 1, x0:x1 + 1].mean() >= 0.5)
                    in_box[y0:y1 + 1, x0:x1 + 1] = True
                acc["with_boxes"] += 1
                acc["red"] += int(red.sum())
                acc["red_in"] += int((red & in_box).sum())
            rows.append(row)
        report[split] = _summary(acc)
        for k in totals:
            totals[k] += acc[k]
    report["overall"] = _summary(dict(totals, images=sum(r["images"] for r in report.values())))
    report["labels"] = {"white_cell": "gold: human masks (Banik et al. 2020), grey > 100",
                        "red_cell": "silver: colour rule of bloodseg.datasets.silver_red_cells",
                        "background": "the rest (plasma, platelets)"}
    report["seconds"] = round(time.perf_counter() - t0, 2)
    with open(out / "boxes.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["split", "image"])
        writer.writeheader()
        writer.writerows(rows)
    (out / "bccd_report.json").write_text(json.dumps(report, indent=2))
    return report


def _summary(acc: dict) -> dict:
    ratio = lambda a, b: round(a / b, 4) if b else None  # noqa: E731
    out = {"images": acc["images"], "rbc_boxes": acc["boxes"],
           "box_coverage": ratio(acc["covered"], acc["boxes"]),
           "pixels_in_boxes": ratio(acc["red_in"], acc["red"])}
    if "pixels" in acc:
        out.update(images_with_boxes=acc["with_boxes"],
                   white_fraction=ratio(acc["white_px"], acc["pixels"]),
                   red_fraction=ratio(acc["red_px"], acc["pixels"]))
    return out


# ----------------------------------------------------------------------------- patches, augmentation, splits

def extract_patches(samples: list[Sample], size: int = 256, per_image: int = 1, seed: int = 0,
                    focus: float = 0.5) -> list[Sample]:
    """``per_image`` random ``size``x``size`` crops of every sample (paper: 256x256 from 775x519).

    The paper cropped "suitable areas" by hand; white cells are rare (a few per smear), so purely
    random crops would mostly miss them. A share ``focus`` of the crops is therefore centred
    (with jitter) on a random white-cell pixel when the sample has one; the rest are uniform.
    Crops are named ``<name>_p00`` …, keep their sample's ``source``, and are deterministic by seed.
    """
    if not 0.0 <= focus <= 1.0:
        raise DataError(f"focus must be between 0 and 1; got {focus}")
    rng = np.random.default_rng(seed)
    patches = []
    for s in samples:
        h, w = s.mask.shape
        if h < size or w < size:
            raise DataError(f"image {s.name!r} is {w}x{h} (WxH), smaller than the {size}x{size} patch; "
                            "use a smaller patch size or leave this image out")
        white = np.argwhere(s.mask == WHITE_CELL)
        for j in range(int(per_image)):
            if len(white) and rng.random() < focus:
                cy, cx = white[rng.integers(len(white))] + rng.integers(-size // 4, size // 4 + 1, 2)
                y = int(np.clip(cy - size // 2, 0, h - size))
                x = int(np.clip(cx - size // 2, 0, w - size))
            else:
                y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
            patches.append(Sample(f"{s.name}_p{j:02d}", s.image[y:y + size, x:x + size].copy(),
                                  s.mask[y:y + size, x:x + size].copy(), s.source))
    return patches


def _jitter_colour(image: np.ndarray, rng) -> np.ndarray:
    """Mild stain/exposure change: hue ±3 (of 180), saturation and brightness x0.9-1.1."""
    hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV).astype(np.float32)
    hsv[..., 0] = np.mod(hsv[..., 0] + rng.uniform(-3, 3), 180)
    hsv[..., 1] *= rng.uniform(0.9, 1.1)
    hsv[..., 2] *= rng.uniform(0.9, 1.1)
    return cv2.cvtColor(np.clip(hsv + 0.5, 0, [179, 255, 255]).astype(np.uint8), cv2.COLOR_HSV2BGR)


def augment(samples: list[Sample], factor: int = 10, seed: int = 0) -> list[Sample]:
    """Each sample plus ``factor - 1`` copies: a flip/90°-rotation and a mild colour jitter.

    The geometry is applied identically to image and mask; the colour jitter touches the image
    only. Copies are named ``<name>_a1`` …, keep ``source``, and are deterministic by seed. The
    7 non-identity flips/rotations are used before any repeats (then only the colour differs).
    """
    if int(factor) != factor or factor < 1:
        raise DataError(f"augmentation factor must be a whole number >= 1; got {factor!r}")
    rng = np.random.default_rng(seed)
    out = []
    for s in samples:
        out.append(s)
        order = rng.permutation(7) + 1            # dihedral transforms 1..7 (0 is the identity)
        for j in range(1, int(factor)):
            t = int(order[(j - 1) % 7])
            rot, flip = t % 4, t >= 4
            image, mask = np.rot90(s.image, rot), np.rot90(s.mask, rot)
            if flip:
                image, mask = image[:, ::-1], mask[:, ::-1]
            out.append(Sample(f"{s.name}_a{j}", _jitter_colour(np.ascontiguousarray(image), rng),
                              np.ascontiguousarray(mask), s.source))
    return out


def _take_sources(groups: list[tuple[str, list]], target: float) -> int:
    """How many of the (shuffled) source groups to take so their sample count is closest to target."""
    taken, count = 0, 0
    while taken < len(groups):
        size = len(groups[taken][1])
        if count > 0 and abs(count + size - target) >= abs(count - target):
            break
        if count == 0 and target <= 0:
            break
        count += size
        taken += 1
    return taken


def make_splits(samples: list[Sample], n_test: int, val_ratio: float = 0.25, seed: int = 0,
                factor: int = 1) -> dict[str, list[Sample]]:
    """Split by source image: test first (about ``n_test`` samples, never augmented), then
    train/val (``val_ratio`` of the rest, paper 3:1), then augment train and val ``factor`` times.

    Whole sources go to one side, so no test or validation sample shares a source image (or an
    augmented copy) with a training sample. Returns ``{"train": [...], "val": [...], "test": [...]}``.
    """
    if not samples:
        raise DataError("make_splits got no samples; load or generate images first")
    if not 0 <= val_ratio < 1:
        raise DataError(f"val_ratio must be in [0, 1); got {val_ratio}")
    groups: dict[str, list] = {}
    for s in samples:
        groups.setdefault(s.source, []).append(s)
    order = list(groups.items())
    order = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
    n_test_src = _take_sources(order, n_test)
    test_groups, rest = order[:n_test_src], order[n_test_src:]
    if not rest:
        raise DataError(f"holding out {n_test} test samples leaves nothing to train on: there are "
                        f"{len(samples)} samples from {len(groups)} source images; lower n_test or add images")
    n_val_src = min(_take_sources(rest, val_ratio * sum(len(g) for _, g in rest)), len(rest) - 1)
    if val_ratio > 0 and n_val_src == 0 and len(rest) > 1:
        n_val_src = 1
    val_groups, train_groups = rest[:n_val_src], rest[n_val_src:]
    flat = lambda gs: [s for _, g in gs for s in g]  # noqa: E731
    return {"train": augment(flat(train_groups), factor, seed),
            "val": augment(flat(val_groups), factor, seed + 1),
            "test": flat(test_groups)}


@functools.lru_cache(maxsize=4)
def _synthetic_splits_cached(profile_key: tuple) -> dict:
    n_source, size, patch, crops, n_test, factor = profile_key
    smears = []
    for i in range(n_source):
        image, mask = make_smear(i, size=size)
        smears.append(Sample(f"smear_{i:04d}", image, mask, f"smear_{i:04d}"))
    patches = extract_patches(smears, size=patch, per_image=crops, seed=0)
    return make_splits(patches, n_test=n_test, val_ratio=0.25, seed=0, factor=factor)


def synthetic_splits(profile=None) -> dict[str, list[Sample]]:
    """The paper's data pipeline on synthetic smears, sized by a profile (name, Profile or None).

    ``profile.n_source`` smears of ``profile.image_size`` (seeds 0, 1, …) → ``crops_per_image``
    patches of ``patch`` px each → ``n_test`` patches held out by source → the rest augmented
    x``augment`` and split 3:1 into train/val. Cached in memory; treat the arrays as read-only.
    """
    p = profile if isinstance(profile, Profile) else get_profile(profile)
    key = (p.n_source, tuple(p.image_size), p.patch, p.crops_per_image, p.n_test, p.augment)
    cached = _synthetic_splits_cached(key)
    return {k: list(v) for k, v in cached.items()}


# ----------------------------------------------------------------------------- torch

class SegmentationDataset(torch.utils.data.Dataset):
    """Samples as ``(image float32 3xHxW RGB in [0, 1], mask int64 HxW)`` for a DataLoader.

    The image goes through :func:`bloodseg.preprocess.image_to_tensor` (CLAHE on luma first when
    ``clahe=True``, as everywhere else in bloodseg).
    """

    def __init__(self, samples: list[Sample], clahe: bool = True):
        for s in samples:
            if (s.image.dtype != np.uint8 or s.image.ndim != 3 or s.image.shape[2] != 3
                    or s.mask.shape != s.image.shape[:2]):
                raise DataError(f"sample {s.name!r} has image {s.image.dtype} {s.image.shape} and mask "
                                f"{s.mask.shape}; need BGR uint8 HxWx3 and an HxW mask of the same size")
        self.samples, self.clahe = list(samples), clahe

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        return image_to_tensor(s.image, clahe=self.clahe), torch.from_numpy(s.mask.astype(np.int64))


# ----------------------------------------------------------------------------- one entry point for training

def _crop16(s: Sample) -> Sample:
    """Top-left crop to the largest multiple of 16 so a whole image fits the models."""
    h, w = (d - d % 16 for d in s.mask.shape)
    if h == 0 or w == 0:
        raise DataError(f"image {s.name!r} is smaller than 16x16 pixels")
    return Sample(s.name, s.image[:h, :w], s.mask[:h, :w], s.source)


def _check_patch_fits(samples: list[Sample], p: Profile, root: Path) -> None:
    for s in samples:
        h, w = s.mask.shape
        if h < p.patch or w < p.patch:
            sizes = ", ".join(f"{k} {v.patch}" for k, v in PROFILES.items())
            raise DataError(f"image {s.name!r} in {root.absolute()} is {w}x{h} (WxH), smaller than the "
                            f"{p.patch}x{p.patch} training patch of the '{p.name}' profile; pick a profile "
                            f"with smaller patches (--profile or BLOODSEG_PROFILE: {sizes}), use larger "
                            "images, or leave this image out")


def training_splits(data, profile=None, seed: int = 0) -> dict[str, list[Sample]]:
    """``{"train", "val", "test"}`` sample lists for ``data``, sized by ``profile``:

    * ``"synthetic"`` – :func:`synthetic_splits` (the embedded default);
    * a folder with ``train/ val/ test/`` (a :func:`prepare_bccd` output) – train and val images
      are cut into ``crops_per_image`` patches of ``patch`` px (train augmented x``augment``);
      test images stay whole (cropped to a multiple of 16), as whole-image scores are wanted;
    * a folder with ``images/`` + ``masks/`` – patches, then :func:`make_splits` (test held out by
      source image, train/val 3:1, augmented);
    * a folder of LabelMe ``.json`` files – the same, after rasterising the shapes.
    """
    p = profile if isinstance(profile, Profile) else get_profile(profile)
    if str(data) == "synthetic":
        return synthetic_splits(p)
    root = Path(data)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root.absolute()}. Pass 'synthetic', a folder with "
                        "images/ and masks/, a prepare-bccd output (train/ val/ test/), or LabelMe files")
    if all((root / s).is_dir() for s in ("train", "val", "test")):
        raw = load_splits(root)
        _check_patch_fits(raw["train"] + raw["val"], p, root)
        return {"train": augment(extract_patches(raw["train"], p.patch, p.crops_per_image, seed), p.augment, seed),
                "val": extract_patches(raw["val"], p.patch, p.crops_per_image, seed + 1),
                "test": [_crop16(s) for s in raw["test"]]}
    if (root / "images").is_dir():
        samples = load_folder(root)
    elif any(root.glob("*.json")):
        samples = load_labelme_folder(root)
    else:
        raise DataError(f"{root.absolute()} holds neither images/ + masks/, nor train/ val/ test/, "
                        "nor LabelMe .json files; see `bloodseg train --help`")
    _check_patch_fits(samples, p, root)
    patches = extract_patches(samples, p.patch, p.crops_per_image, seed)
    n_test = max(1, round(len(patches) * p.n_test / max(1, p.n_source * p.crops_per_image)))
    return make_splits(patches, n_test=n_test, seed=seed, factor=p.augment)
