"""Image and mask files in and out: the one place that knows file formats and extensions.

Every image leaves this module as OpenCV BGR ``uint8 HxWx3`` and every mask as ``uint8 HxW``
with 0 background, 1 white cell, 2 red cell. Anything a user can get wrong (a missing, empty,
corrupt or oddly encoded file, a mask with foreign values) raises
:class:`~bloodseg.errors.DataError` naming the file and saying what to do. Files are written
atomically: a temporary file in the same folder, then a rename, so a killed run never leaves
half a PNG behind.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import cv2
import numpy as np

from .classes import PALETTE_BGR
from .errors import DataError

#: The image files bloodseg reads (folders are scanned for these, case-insensitively).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_CLASSES_TEXT = "masks hold 0 background, 1 white cell, 2 red cell"


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        path.stat()
    except (OSError, ValueError) as exc:   # missing, a name too long, a NUL byte, a link loop
        if not isinstance(exc, FileNotFoundError):
            raise DataError(f"cannot open {what} file {str(path)[:300]!r} ({getattr(exc, 'strerror', None) or exc}); "
                            "check the path and the file name") from None
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
        try:
            image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        except cv2.error:   # e.g. a header declaring more than CV_IO_MAX_IMAGE_PIXELS pixels
            raise DataError(f"cannot decode {where}: its header declares an image too large to "
                            "decode (or is corrupt); re-export it as PNG/JPEG at a sane size") from None
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


def write_image(path, array: np.ndarray) -> Path:
    """Write ``array`` (a BGR image or a class mask) as a PNG or JPEG at ``path``, atomically.

    The bytes are encoded first, written to a hidden temporary file in the same folder, then
    renamed over ``path``: a crash, a kill or a full disk leaves the previous file (or none),
    never a truncated one, and no temporary file behind.
    """
    path = Path(path)
    ok, buf = cv2.imencode(path.suffix.lower() or ".png", array)
    if not ok:
        raise DataError(f"cannot encode an array of shape {array.shape} as {path.suffix} for {path}")
    return write_bytes(path, buf.tobytes())


def write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (a hidden temporary file in the same folder, then a
    rename), like :func:`write_image`: for CSV tables and ``.npz`` arrays next to the masks."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        raise DataError(f"cannot write {path.absolute()} ({exc.strerror or exc}); "
                        "choose an output folder you can write to, with free space") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def expand_inputs(paths) -> list[Path]:
    """Files stay files; a folder becomes its image files (sorted). Missing paths are an error."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {p}")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"input not found: {p}. Give image files or folders of images.")
    if not out:
        raise DataError("no input images given")
    return out


def _writable_dir(out_dir) -> Path:
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise DataError(f"cannot write to the output folder {out_dir}: {exc.strerror}. "
                        "Choose a folder you can write to (--out).") from None
    return out_dir


def check_output_names(files: list[Path], out_dir: Path, suffixes=("", "_overlay")) -> None:
    """Raise :class:`DataError` if outputs ``<stem><suffix>.png`` in ``out_dir`` would collide with
    each other or overwrite one of the input ``files``."""
    by_stem: dict[str, Path] = {}
    for f in files:
        if f.stem in by_stem and by_stem[f.stem].resolve() != f.resolve():
            raise DataError(f"two inputs share the name {f.stem!r} ({by_stem[f.stem]} and {f}); their "
                            f"outputs {f.stem}.png would overwrite each other in {out_dir}. Rename one, "
                            "or predict them into different --out folders")
        by_stem[f.stem] = f
    inputs = {f.resolve() for f in files}
    for f in files:
        for suffix in suffixes:
            target = (out_dir / f"{f.stem}{suffix}.png").resolve()
            if target in inputs:
                raise DataError(f"writing {target} would overwrite the input image {target}; choose "
                                "another --out folder than the one that holds the images")


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
