"""BCCD, the public blood-smear photographs: the vendored sample, the full copy, and the converter.

BCCD (Shenggan, MIT) has 640x480 photographs with Pascal-VOC boxes; Banik et al. (2020, MIT) drew
per-pixel white-cell masks for them. :func:`prepare_bccd` turns both into the paper's 3 classes:
white cell = the human masks (**gold**), red cell = a colour rule checked against the boxes
(**silver**, :func:`silver_red_cells`), background = the rest.

Where the full copy is: ``--src`` on the command line, or ``$BLOODSEG_BCCD``
(:func:`bccd_source`); the package ships a 16-photograph sample (:func:`bccd_sample_dir`).
"""
from __future__ import annotations

import csv
import json
import os
import re
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np

from .classes import RED_CELL, WHITE_CELL
from .errors import DataError
from .io import _read_bytes, read_image, write_image
from .postprocess import fill_small_holes, remove_small
from .colour import stain_masks


def bccd_sample_dir() -> Path:
    """The 16 BCCD images vendored with the package (raw layout, see its PROVENANCE.md)."""
    path = Path(__file__).resolve().parent / "data" / "bccd_sample"
    if not (path / "images").is_dir():
        raise DataError(f"the vendored BCCD sample is missing at {path}; reinstall bloodseg "
                        "(the package data bloodseg/data/bccd_sample/** was not installed)")
    return path


def _parse_xml(data: bytes, where: str) -> ET.Element:
    """Parse untrusted XML, refusing DTDs and entities (billion laughs, external entities)."""
    refused = (f"refused the Pascal VOC file {where}: it declares a DOCTYPE or entities, which VOC "
               "files never need (and which can expand to gigabytes); restore it from the BCCD dataset")
    try:
        import defusedxml.ElementTree as SafeET
    except ImportError:
        SafeET = None
    if SafeET is None:
        if b"<!DOCTYPE" in data.upper() or b"<!ENTITY" in data.upper():
            raise DataError(refused)
        return ET.fromstring(data)
    try:
        return SafeET.fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except ValueError:   # defusedxml's DTDForbidden / EntitiesForbidden subclass ValueError
        raise DataError(refused) from None


def _voc_boxes(xml_path: Path) -> dict[str, list[tuple[int, int, int, int]]]:
    xml_path = Path(xml_path)
    try:
        root = _parse_xml(_read_bytes(xml_path, "Pascal VOC"), str(xml_path.absolute()))
    except ET.ParseError as exc:
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
        except (TypeError, ValueError, OverflowError):   # missing, text, inf
            raise DataError(f"a box of {name!r} in {xml_path.absolute()} has missing or non-numeric corners; "
                            "restore the file from the BCCD dataset") from None
        boxes.setdefault(name, []).append(box)
    return boxes


def silver_red_cells(image_bgr: np.ndarray, white: np.ndarray) -> np.ndarray:
    """Red-cell pixels derived from colour (SILVER labels), never on ``white`` (the gold white cells).

    BGR ``uint8 HxWx3`` in, boolean ``HxW`` out. Areas scale with the image relative to BCCD's
    640x480. (1) A 5x5 median filter calms JPEG noise. (2) On the CLAHE'd image, red cells are
    pixels whose Lab a* (pinkness) exceeds the image's own Otsu threshold and which are not
    purple (nuclei, platelets), see :func:`bloodseg.colour.stain_masks`. (3) A 5x5 closing
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
    red = fill_small_holes(red, int(2500 * scale))
    red = remove_small(red, int(400 * scale) + 1)
    return red & ~white


def _read_ids(path: Path) -> list[str]:
    try:
        ids = [line.strip() for line in path.read_bytes().decode("utf-8").splitlines() if line.strip()]
    except OSError as exc:
        raise DataError(f"cannot read split file {path.absolute()} ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise DataError(f"split file {path.absolute()} is not text (one image id per line); restore it "
                        "from the BCCD dataset") from None
    for ident in ids:   # an id becomes a file name in the output: no folders, no '..'
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,200}", ident) or set(ident) == {"."}:
            raise DataError(f"split file {path.absolute()} lists {ident[:80]!r}, not an image id such as "
                            "BloodImage_00001 (ids are file names without folders); restore the file")
    return ids


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
            try:
                gold = cv2.imdecode(np.frombuffer(_read_bytes(src / "wbc_masks" / f"BloodImage_Mask_{number}.png",
                                                              "white-cell mask"), np.uint8), cv2.IMREAD_GRAYSCALE)
            except cv2.error:   # a header declaring a huge size
                gold = None
            if gold is None or gold.shape != image.shape[:2]:
                raise DataError(f"white-cell mask for {ident} is unreadable or not {image.shape[1]}x"
                                f"{image.shape[0]}: {(src / 'wbc_masks').absolute()}; restore it from the dataset")
            white = gold > 100
            red = silver_red_cells(image, white)
            mask = np.zeros(white.shape, np.uint8)
            mask[red] = RED_CELL
            mask[white] = WHITE_CELL
            write_image(out / split / "images" / f"{ident}.png", image)
            write_image(out / split / "masks" / f"{ident}.png", mask)
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


def bccd_source(src=None, prefer_full: bool = True) -> tuple[Path, str]:
    """``(folder, kind)`` of the BCCD photographs to use.

    ``src`` given: that folder (``kind`` "given"; it must hold ``images/`` and ``wbc_masks/``).
    Otherwise, with ``prefer_full``, the full copy named by ``$BLOODSEG_BCCD`` when it holds
    ``images/`` and ``wbc_masks/`` ("full"); else the vendored 16-photograph sample ("sample").
    ``bloodseg download-bccd`` fetches the full copy (see the README).
    """
    if src is not None:
        src = Path(src)
        if not ((src / "images").is_dir() and (src / "wbc_masks").is_dir()):
            raise DataError(f"{src.absolute()} is not a BCCD folder: it needs images/ and wbc_masks/ "
                            "(see `bloodseg download-bccd`)")
        return src, "given"
    full = os.environ.get("BLOODSEG_BCCD")
    if prefer_full and full and (Path(full) / "images").is_dir() and (Path(full) / "wbc_masks").is_dir():
        return Path(full), "full"
    return bccd_sample_dir(), "sample"


def prepare_cached(src, out) -> dict:
    """:func:`prepare_bccd` ``src`` into ``out`` unless ``out`` already holds it; return the report.

    The report gets ``"source"`` (the folder) and ``"reused"`` (True when nothing was redone).
    """
    src, out = Path(src).resolve(), Path(out)
    stamp = out / "source.txt"
    report_path = out / "bccd_report.json"
    if stamp.is_file() and report_path.is_file() and stamp.read_text().strip() == str(src):
        report = json.loads(report_path.read_text())
        report.update(source=str(src), reused=True)
        return report
    report = prepare_bccd(src, out)
    stamp.write_text(str(src) + "\n")
    report.update(source=str(src), reused=False)
    return report
