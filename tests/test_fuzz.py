"""Property-based fuzzing (Hypothesis) of every reader that takes a user's file.

Property, for every generated input: the reader returns a result that passes its own checks
(an image is ``uint8 HxWx3``, a mask ``uint8 HxW`` in {0, 1, 2}, ...) or raises a
:class:`~bloodseg.errors.BloodsegError` subclass whose message names the file; never another
exception type, never a hang (every case runs under ``signal.alarm``), never a write outside
the case's own folder.

CI runs a fixed seed (``derandomize=True``, no example database) with about 2,300 generated cases
(``N_CASES`` below); ``BLOODSEG_FUZZ=slow`` runs ten times as many.

Bugs the fuzzer found, each fixed in the reader and kept as an ``@example`` or a plain test below
(search for "BUG"):

1. a PNG header declaring 100000x100000 pixels: ``cv2.error`` from OpenCV's size check (io._decode)
2. LabelMe ``shapes`` holding a non-object (``[1]``): ``AttributeError`` (labelme)
3. LabelMe ``imageHeight``/``imageWidth`` not a whole number ("x", NaN, [1]): ValueError/TypeError
4. LabelMe points with huge coordinates (1e300): ``cv2.error`` from rectangle/circle
5. LabelMe ``imagePath`` with a NUL byte: ``ValueError: embedded null byte``
6. LabelMe JSON nested 100000 deep: ``RecursionError``
7. VOC box corner "inf": ``OverflowError``; DOCTYPE/ENTITY (billion laughs) now refused by
   defusedxml (or a DOCTYPE check) instead of relying on expat's amplification limit
8. BCCD split file listing ``../../x``: prepare_bccd wrote outside ``out``; binary split file:
   ``UnicodeDecodeError``
9. checkpoint without ``model_options``: ``KeyError``; of the wrong type: ValueError/TypeError;
   ``model_state`` a list: ``TypeError``; bad model options: a BloodsegError not naming the file;
   ``segmenter`` settings not a dict: ``TypeError``
10. Recipe.from_dict with a section that is not a dict: ``TypeError``
11. TrainRecipe.validate with None / a string for max_minutes, weight_decay, checkpoint_every:
    ``TypeError``; NaN checkpoint_every and bool epochs were accepted
"""
from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import os
import pickle
import signal
import struct
import tempfile
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bloodseg import cli, commands
from bloodseg.bccd import _voc_boxes, prepare_bccd
from bloodseg.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from bloodseg.errors import BloodsegError, CheckpointError, DataError
from bloodseg.io import Sample, load_folder, read_image, read_mask
from bloodseg.labelme import labelme_to_mask, load_labelme_folder
from bloodseg.models import build_model
from bloodseg.recipe import Recipe, TrainRecipe
from bloodseg.segmenter import Segmenter

SLOW = os.environ.get("BLOODSEG_FUZZ", "").lower() == "slow"
FACTOR = 10 if SLOW else 1
CASE_SECONDS = 20            # a case that takes longer is a hang

#: generated cases per test in CI (x10 with BLOODSEG_FUZZ=slow); the report sums them.
N_CASES = {
    "read_image_bytes": 100, "read_image_mutated": 300, "read_image_header": 100,
    "read_mask": 250, "load_folder": 80,
    "labelme_random_json": 250, "labelme_structured": 300, "load_labelme_folder": 40,
    "voc_random": 150, "voc_structured": 200, "prepare_bccd": 40,
    "checkpoint_bytes": 100, "checkpoint_truncated": 100, "checkpoint_fields": 150,
    "recipe_from_dict": 200, "train_recipe": 200, "cli_numbers": 60,
}


def fuzz(name):
    return settings(max_examples=N_CASES[name] * FACTOR, derandomize=True, database=None, deadline=None,
                    print_blob=True, suppress_health_check=list(HealthCheck))


# --------------------------------------------------------------------------- the property

@contextlib.contextmanager
def time_limit(seconds=CASE_SECONDS):
    def hang(signum, frame):
        raise TimeoutError(f"a reader took more than {seconds} s: a hang")
    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def files_under(folder: Path) -> set[Path]:
    return {Path(d) / f for d, _, fs in os.walk(folder) for f in fs}


def outcome(call, names, sandbox: Path, may_write: Path | None = None):
    """Run ``call`` under a time limit; return its result, or None after a BloodsegError whose
    message contains ``names`` (the file). Any other exception fails the test. Nothing may be
    written in ``sandbox`` (the case's folder) except under ``may_write``."""
    before = files_under(sandbox)
    try:
        with time_limit():
            result = call()
    except BloodsegError as exc:
        result = None
        assert str(names) in str(exc), f"the message does not name {names}: {exc}"
    new = files_under(sandbox) - before
    assert all(may_write is not None and may_write in p.parents for p in new), sorted(new)
    return result


@pytest.fixture
def case_dir(tmp_path):
    """A fresh folder per generated case (``tmp_path`` is shared by all examples of a test)."""
    return lambda: Path(tempfile.mkdtemp(dir=tmp_path))


def check_image(image):
    assert isinstance(image, np.ndarray) and image.dtype == np.uint8
    assert image.ndim == 3 and image.shape[2] == 3 and image.shape[0] > 0 and image.shape[1] > 0


def check_mask(mask, shape=None):
    assert isinstance(mask, np.ndarray) and mask.dtype == np.uint8 and mask.ndim == 2
    assert set(np.unique(mask).tolist()) <= {0, 1, 2}
    if shape is not None:
        assert mask.shape == tuple(shape)


# --------------------------------------------------------------------------- images

def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(w, h, depth=8, ctype=2, payload=None, plte=None) -> bytes:
    """A hand-made PNG: any header (sizes up to 2^31-1), optional palette, ``payload`` as IDAT."""
    ihdr = struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, 0)
    if payload is None:
        channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(ctype, 1)
        row = 1 + max(1, (w * channels * depth + 7) // 8) if w * h <= 4096 else 2
        payload = zlib.compress(b"\0" * (row * max(1, min(h, 64))))
    out = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
    if plte is not None:
        out += png_chunk(b"PLTE", plte)
    return out + png_chunk(b"IDAT", payload) + png_chunk(b"IEND", b"")


@st.composite
def valid_image_bytes(draw):
    """A small valid image file: grey/colour/alpha, 8/16-bit, palette, PNG/JPEG/TIFF/BMP."""
    kind = draw(st.sampled_from(["png", "png16", "palette", "jpg", "tif", "tif16", "bmp"]))
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    if kind == "palette":
        n = draw(st.integers(1, 8))
        plte = bytes(draw(st.lists(st.integers(0, 255), min_size=3 * n, max_size=3 * n)))
        rows = b"".join(b"\0" + bytes(draw(st.lists(st.integers(0, n - 1), min_size=w, max_size=w)))
                        for _ in range(h))
        return png_bytes(w, h, 8, 3, zlib.compress(rows), plte), "png"
    channels = draw(st.sampled_from([1, 3, 4] if kind in ("jpg", "bmp") else [1, 2, 3, 4]))
    if kind in ("jpg",) and channels == 4:
        channels = 3
    dtype = np.uint16 if kind.endswith("16") else np.uint8
    seed = draw(st.integers(0, 2 ** 16))
    array = np.random.default_rng(seed).integers(0, np.iinfo(dtype).max + 1, (h, w, channels)).astype(dtype)
    ext = {"png16": "png", "tif16": "tif"}.get(kind, kind)
    if channels == 2:   # grey + alpha: OpenCV cannot write it, build the PNG by hand
        rows = b"".join(b"\0" + array[i].astype(">u2" if dtype == np.uint16 else np.uint8).tobytes()
                        for i in range(h))
        return png_bytes(w, h, 16 if dtype == np.uint16 else 8, 4, zlib.compress(rows)), "png"
    ok, buf = cv2.imencode("." + ext, array[..., 0] if channels == 1 else array)
    assert ok
    return buf.tobytes(), ext


@st.composite
def mutated(draw, source):
    data, ext = draw(source)
    data = bytearray(data)
    how = draw(st.sampled_from(["truncate", "flip", "both", "append", "none"]))
    if how in ("truncate", "both"):
        data = data[:draw(st.integers(0, max(0, len(data) - 1)))]
    if how in ("flip", "both") and data:
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
    if how == "append":
        data += draw(st.binary(max_size=64))
    return bytes(data), ext


@example(data=b"\x89PNG\r\n\x1a\n", ext="png")
@example(data=b"\xff\xd8\xff\xe0", ext="jpg")
@example(data=b"II*\x00", ext="tif")
@given(data=st.binary(max_size=512), ext=st.sampled_from(["png", "jpg", "tif", "bmp", "jpeg"]))
@fuzz("read_image_bytes")
def test_read_image_random_bytes(case_dir, data, ext):
    folder = case_dir()
    path = folder / f"x.{ext}"
    path.write_bytes(data)
    image = outcome(lambda: read_image(path), path.name, folder)
    if image is not None:
        check_image(image)


@given(mutated(valid_image_bytes()))
@fuzz("read_image_mutated")
def test_read_image_truncated_and_bit_flipped(case_dir, case):
    data, ext = case
    folder = case_dir()
    path = folder / f"x.{ext}"
    path.write_bytes(data)
    image = outcome(lambda: read_image(path), path.name, folder)
    if image is not None:
        check_image(image)


# BUG 1: OpenCV's own size check raised cv2.error
@example(w=100000, h=100000, depth=8, ctype=2)
@example(w=0, h=0, depth=8, ctype=2)
@example(w=1, h=1, depth=16, ctype=6)
@example(w=2 ** 31 - 1, h=1, depth=8, ctype=0)
@given(w=st.one_of(st.integers(0, 64), st.integers(0, 2 ** 31 - 1)),
       h=st.one_of(st.integers(0, 64), st.integers(0, 2 ** 31 - 1)),
       depth=st.sampled_from([1, 2, 4, 8, 16, 3, 0]), ctype=st.sampled_from([0, 2, 3, 4, 6, 1, 7]))
@fuzz("read_image_header")
def test_read_image_declared_sizes(case_dir, w, h, depth, ctype):
    """A header may claim any size; decoding must refuse it quickly, not allocate it.
    (Sizes whose buffer could really be allocated are kept below 2^26 pixels.)"""
    if 2 ** 26 < w * h <= 2 ** 30:     # OpenCV would allocate them (up to GBs): not fuzzed here
        w = max(1, w % 4096)
    folder = case_dir()
    path = folder / "x.png"
    path.write_bytes(png_bytes(w, h, depth, ctype))
    image = outcome(lambda: read_image(path), path.name, folder)
    if image is not None:
        check_image(image)
        assert image.shape[:2] == (h, w)


# --------------------------------------------------------------------------- masks

@st.composite
def mask_files(draw):
    h, w = draw(st.integers(1, 10)), draw(st.integers(1, 10))
    layout = draw(st.sampled_from(["grey", "grey3", "palette", "bgra", "u16"]))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    top = draw(st.sampled_from([3, 3, 4, 256]))
    from bloodseg.classes import PALETTE_BGR
    if layout == "grey":
        array = rng.integers(0, top, (h, w)).astype(np.uint8)
    elif layout == "u16":
        array = rng.integers(0, draw(st.sampled_from([3, 65536])), (h, w)).astype(np.uint16)
    elif layout == "grey3":
        array = np.repeat(rng.integers(0, top, (h, w, 1)).astype(np.uint8), 3, 2)
    else:
        colours = np.vstack([PALETTE_BGR, rng.integers(0, 256, (draw(st.integers(0, 2)), 3))]).astype(np.uint8)
        array = colours[rng.integers(0, len(colours), (h, w))]
        if layout == "bgra":
            array = np.dstack([array, rng.integers(0, 256, (h, w), dtype=np.uint8)])
    ext = draw(st.sampled_from(["png", "png", "tif", "bmp", "jpg"]))
    if array.dtype == np.uint16 or array.ndim == 3 and array.shape[2] == 4:
        ext = draw(st.sampled_from(["png", "tif"]))
    ok, buf = cv2.imencode("." + ext, array)
    assert ok
    return buf.tobytes(), ext, (h, w)


@given(mask_files(), st.booleans())
@fuzz("read_mask")
def test_read_mask(case_dir, case, corrupt):
    data, ext, shape = case
    if corrupt:
        data = data[: len(data) // 2]
    folder = case_dir()
    path = folder / f"m.{ext}"
    path.write_bytes(data)
    mask = outcome(lambda: read_mask(path), path.name, folder)
    if mask is not None:
        check_mask(mask, shape)


@given(st.lists(st.tuples(valid_image_bytes(), mask_files(), st.sampled_from(["ok", "no mask", "twin"])),
                min_size=1, max_size=3))
@fuzz("load_folder")
def test_load_folder(case_dir, samples):
    """Image/mask pairs of random sizes (often differing), foreign values, missing masks,
    two files with one stem."""
    folder = case_dir()
    root = folder / "set"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, ((image, ext), (mask, mext, _), what) in enumerate(samples):
        (root / "images" / f"s{i}.{ext}").write_bytes(image)
        if what != "no mask":
            (root / "masks" / f"s{i}.{mext}").write_bytes(mask)
        if what == "twin":
            (root / "masks" / f"s{i}.{'bmp' if mext != 'bmp' else 'png'}").write_bytes(mask)
    result = outcome(lambda: load_folder(root), root.name, folder)
    if result is not None:
        assert len(result) == len(samples)
        for s in result:
            assert isinstance(s, Sample)
            check_image(s.image)
            check_mask(s.mask, s.image.shape[:2])


# --------------------------------------------------------------------------- LabelMe

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["shapes", "points", "label", "shape_type", "imagePath", "imageData",
                         "imageHeight", "imageWidth", "x"]) | st.text(max_size=4), inner, max_size=5),
    max_leaves=20)


def _small_png() -> bytes:
    ok, buf = cv2.imencode(".png", np.full((6, 8, 3), 200, np.uint8))
    return buf.tobytes()


@given(json_values)
@fuzz("labelme_random_json")
def test_labelme_random_json(case_dir, doc):
    folder = case_dir()
    (folder / "img.png").write_bytes(_small_png())
    path = folder / "a.json"
    path.write_text(json.dumps(doc))
    result = outcome(lambda: labelme_to_mask(path), path.name, folder)
    if result is not None:
        image, mask = result
        check_image(image)
        check_mask(mask, image.shape[:2])


coordinates = st.one_of(st.floats(-20, 20), st.floats(allow_nan=True, allow_infinity=True),
                        st.sampled_from([1e300, -1e300, 2 ** 31, 1e9, -1e9]), st.integers(-50, 50),
                        st.text(max_size=2), st.none())
shapes = st.fixed_dictionaries(
    {"label": st.sampled_from(["wbc", "rbc", "red cell", "White", "bg", "background", "platelet", "", 3])},
    optional={"shape_type": st.sampled_from(["polygon", "rectangle", "circle", "line", "", None, [1]]),
              "points": st.one_of(st.lists(st.lists(coordinates, min_size=2, max_size=2), max_size=6),
                                  st.lists(st.lists(coordinates, max_size=3), max_size=3), json_values)})
image_paths = st.sampled_from(["img.png", "./img.png", "../outside.png", "/etc/passwd", "", "img\0.png",
                               "sub/../img.png", "..\\outside.png", ".", "missing.png", "x" * 300, 7])
sizes = st.one_of(st.none(), st.sampled_from([6, 8, 6.0, 8.5, -1, 0, 10 ** 30]), st.floats(), st.text(max_size=3),
                  st.lists(st.integers(), max_size=1))


@example(doc={"imagePath": "img.png", "shapes": [1]})                                   # BUG 2
@example(doc={"imagePath": "img.png", "shapes": [], "imageHeight": "x"})                # BUG 3
@example(doc={"imagePath": "img.png", "shapes": [], "imageHeight": math.nan})
@example(doc={"imagePath": "img.png", "shapes": [], "imageWidth": [1]})
@example(doc={"imagePath": "img.png", "shapes": [{"label": "wbc", "shape_type": "rectangle",  # BUG 4
                                                  "points": [[1e300, 1], [2, 1e20]]}]})
@example(doc={"imagePath": "img.png", "shapes": [{"label": "wbc", "shape_type": "circle",
                                                  "points": [[1, 1], [2, 1e20]]}]})
@example(doc={"imagePath": "img\0.png", "shapes": []})                                  # BUG 5
@example(doc={"imagePath": "../outside.png", "shapes": []})
@given(doc=st.fixed_dictionaries({"shapes": st.lists(shapes, max_size=4)},
                                 optional={"imagePath": image_paths, "imageHeight": sizes, "imageWidth": sizes,
                                           "imageData": st.one_of(st.just("embedded"), st.text(max_size=8),
                                                                  st.binary(max_size=16).map(
                                                                      lambda b: base64.b64encode(b).decode()))}))
@fuzz("labelme_structured")
def test_labelme_shapes_sizes_and_paths(case_dir, doc):
    """Polygons with 0-6 points, NaN / huge coordinates, wrong types, sizes that do not match,
    and imagePath values pointing outside the folder (``../outside.png`` exists there)."""
    folder = case_dir()
    (folder / "outside.png").write_bytes(_small_png())
    ds = folder / "ds"
    ds.mkdir()
    (ds / "sub").mkdir()
    (ds / "img.png").write_bytes(_small_png())
    if doc.get("imageData") == "embedded":
        doc["imageData"] = base64.b64encode(_small_png()).decode()
    path = ds / "a.json"
    path.write_text(json.dumps(doc))
    result = outcome(lambda: labelme_to_mask(path), path.name, folder)
    if result is not None:
        image, mask = result
        check_image(image)
        check_mask(mask, image.shape[:2])
        assert "imageData" in doc or str(doc.get("imagePath")) in ("img.png", "./img.png", "sub/../img.png")


def test_labelme_image_path_outside_the_folder_is_refused(tmp_path):
    (tmp_path / "secret.png").write_bytes(_small_png())
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "a.json").write_text(json.dumps({"imagePath": "../secret.png", "shapes": []}))
    with pytest.raises(DataError, match="outside the dataset folder"):
        labelme_to_mask(tmp_path / "ds" / "a.json")


def test_labelme_deeply_nested_json_is_a_data_error(tmp_path):    # BUG 6
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="deep.json"):
        labelme_to_mask(path)


@given(st.lists(st.one_of(json_values, st.just({"imagePath": "img.png", "shapes": [{"label": "wbc", "points": [[0, 0], [5, 0], [5, 5]]}]})),
                min_size=1, max_size=2))
@fuzz("load_labelme_folder")
def test_load_labelme_folder(case_dir, docs):
    folder = case_dir()
    (folder / "img.png").write_bytes(_small_png())
    for i, doc in enumerate(docs):
        (folder / f"a{i}.json").write_text(json.dumps(doc))
    result = outcome(lambda: load_labelme_folder(folder), folder.name, folder)
    if result is not None:
        assert len(result) == len(docs)
        for s in result:
            check_image(s.image)
            check_mask(s.mask, s.image.shape[:2])


# --------------------------------------------------------------------------- Pascal VOC

VOC = ("<annotation><filename>BloodImage_00000.jpg</filename><size><width>640</width><height>480</height>"
       "</size>{objects}</annotation>")
OBJECT = "<object><name>{name}</name><bndbox><xmin>{0}</xmin><ymin>{1}</ymin><xmax>{2}</xmax><ymax>{3}</ymax></bndbox></object>"
numbers = st.one_of(st.integers(-10, 700).map(str), st.floats().map(str), st.sampled_from(
    ["inf", "-inf", "nan", "1e400", "", " 12 ", "0x10", "1_000", "abc", "&amp;", "9" * 400]))


def check_boxes(boxes):
    assert isinstance(boxes, dict) and {"RBC", "WBC", "Platelets"} <= set(boxes)
    for found in boxes.values():
        for box in found:
            assert len(box) == 4 and all(isinstance(v, int) for v in box)


@example(data=b"\xff\xfe<a>")
@example(data=b"")
@example(data=b"<annotation><object><bndbox>")
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                 st.lists(st.sampled_from(["<annotation>", "</annotation>", "<object>", "</object>", "<name>RBC</name>",
                                           "<bndbox>", "</bndbox>", "<xmin>1</xmin>", "<!DOCTYPE a>", "<?xml version='1.0'?>",
                                           "<!ENTITY e 'x'>", "&e;", "<![CDATA[x]]>", "<!-- c -->", "\0", "é"]),
                          max_size=12).map(lambda parts: "".join(parts).encode())).map(lambda d: d))
@fuzz("voc_random")
def test_voc_random_xml(case_dir, data):
    folder = case_dir()
    path = folder / "a.xml"
    path.write_bytes(data)
    boxes = outcome(lambda: _voc_boxes(path), path.name, folder)
    if boxes is not None:
        check_boxes(boxes)


@example(objects=[("RBC", ("inf", "1", "2", "3"))])              # BUG 7
@given(st.lists(st.tuples(st.sampled_from(["RBC", "WBC", "Platelets", "", "x"]), st.tuples(numbers, numbers, numbers, numbers)),
                max_size=4))
@fuzz("voc_structured")
def test_voc_box_corners(case_dir, objects):
    folder = case_dir()
    path = folder / "a.xml"
    path.write_text(VOC.format(objects="".join(OBJECT.format(*corners, name=name) for name, corners in objects)))
    boxes = outcome(lambda: _voc_boxes(path), path.name, folder)
    if boxes is not None:
        check_boxes(boxes)
        assert sum(map(len, boxes.values())) == len(objects)


def test_billion_laughs_is_refused_quickly(tmp_path):
    entities = "".join(f'<!ENTITY lol{i} "{("&lol%d;" % (i - 1)) * 10}">' for i in range(1, 10))
    path = tmp_path / "laughs.xml"
    path.write_text(f'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol0 "lol">{entities}]>'
                    "<annotation><object><name>&lol9;</name></object></annotation>")
    t0 = time.perf_counter()
    with time_limit(5), pytest.raises(DataError, match="laughs.xml.*DOCTYPE or entities"):
        _voc_boxes(path)
    assert time.perf_counter() - t0 < 2
    external = tmp_path / "xxe.xml"
    external.write_text('<!DOCTYPE a [<!ENTITY e SYSTEM "file:///etc/passwd">]><annotation>&e;</annotation>')
    with pytest.raises(DataError, match="xxe.xml"):
        _voc_boxes(external)


# --------------------------------------------------------------------------- BCCD folders

def _fake_bccd(root: Path, split_text: bytes, xml: bytes, mask: bytes):
    for sub in ("images", "wbc_masks", "annotations", "splits"):
        (root / sub).mkdir(parents=True)
    image = np.full((16, 16, 3), (200, 150, 220), np.uint8)
    image[4:10, 4:10] = (120, 40, 120)
    (root / "images" / "BloodImage_00001.jpg").write_bytes(cv2.imencode(".jpg", image)[1].tobytes())
    (root / "wbc_masks" / "BloodImage_Mask_00001.png").write_bytes(mask)
    (root / "annotations" / "BloodImage_00001.xml").write_bytes(xml)
    (root / "splits" / "train.txt").write_bytes(split_text)
    (root / "splits" / "val.txt").write_bytes(b"")
    (root / "splits" / "test.txt").write_bytes(b"")


GOOD_MASK = cv2.imencode(".png", np.pad(np.full((4, 4), 255, np.uint8), 6))[1].tobytes()
GOOD_XML = VOC.format(objects=OBJECT.format(1, 1, 8, 8, name="RBC")).encode()


@example(ids=["../../../escaped"], xml=GOOD_XML, mask=GOOD_MASK)      # BUG 8
@example(ids=["BloodImage_00001"], xml=GOOD_XML, mask=GOOD_MASK)
@given(ids=st.lists(st.one_of(st.just("BloodImage_00001"), st.sampled_from(["..", "../x", "a/b", "/abs", "x\\y", "é", "\0"]),
                              st.text(max_size=6)), max_size=3),
       xml=st.one_of(st.just(GOOD_XML), st.binary(max_size=40)),
       mask=st.one_of(st.just(GOOD_MASK), st.binary(max_size=40), st.just(png_bytes(100000, 100000))))
@fuzz("prepare_bccd")
def test_prepare_bccd(case_dir, ids, xml, mask):
    folder = case_dir()
    src, out = folder / "src", folder / "deep" / "er" / "out"
    _fake_bccd(src, "\n".join(ids).encode("utf-8", "surrogatepass"), xml, mask)
    report = outcome(lambda: prepare_bccd(src, out), src.name, folder, may_write=out)
    if report is not None:
        assert report["overall"]["images"] >= 1   # listed ids, or the unlisted image joins train
        for split in ("train", "val", "test"):
            for m in (out / split / "masks").glob("*.png"):
                check_mask(read_mask(m))


def test_a_binary_split_file_is_a_data_error(tmp_path):                # BUG 8
    _fake_bccd(tmp_path / "src", b"\xff\xfe\x00", GOOD_XML, GOOD_MASK)
    with pytest.raises(DataError, match="train.txt"):
        prepare_bccd(tmp_path / "src", tmp_path / "out")


# --------------------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    seg = Segmenter(build_model("unet", width=2))
    path = seg.save(tmp_path_factory.mktemp("ckpt") / "good.pt")
    return path.read_bytes(), torch.load(path, weights_only=True)


def _check_checkpoint(ckpt):
    assert isinstance(ckpt, dict) and ckpt["format"] == CHECKPOINT_FORMAT


@given(st.one_of(st.binary(max_size=600), st.binary(max_size=64).map(lambda b: b"PK\x03\x04" + b)))
@fuzz("checkpoint_bytes")
def test_checkpoint_random_bytes(case_dir, data):
    folder = case_dir()
    path = folder / "c.pt"
    path.write_bytes(data)
    for reader in (load_checkpoint, Segmenter.load):
        outcome(lambda: reader(path), path.name, folder)   # random bytes never load


@given(cut=st.floats(0, 1, exclude_max=True), flips=st.lists(st.floats(0, 1, exclude_max=True), max_size=4))
@fuzz("checkpoint_truncated")
def test_checkpoint_truncated_or_flipped(case_dir, good_checkpoint, cut, flips):
    data = bytearray(good_checkpoint[0])
    if flips:
        for f in flips:
            data[int(f * len(data))] ^= 0x10
    else:
        data = data[: int(cut * len(data))]
    folder = case_dir()
    path = folder / "c.pt"
    path.write_bytes(bytes(data))
    ckpt = outcome(lambda: load_checkpoint(path), path.name, folder)
    if ckpt is not None:
        _check_checkpoint(ckpt)
        seg = outcome(lambda: Segmenter.load(path, device="cpu"), path.name, folder)
        assert seg is None or isinstance(seg.model, torch.nn.Module)


field_values = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(), st.text(max_size=6),
                         st.lists(st.integers(0, 3), max_size=3), st.just(torch.zeros(2)),
                         st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
                         st.sampled_from([{"width": 0}, {"width": -1}, {"width": 2.5}, {"width": "2"}, {"zzz": 1},
                                          {"width": 2, "classes": 0}, {"tile": 3}, {"input_scale": math.nan},
                                          {"postprocess": {"zzz": 1}}, {"class_names": 5}, "unet", "ode-unet-1",
                                          {"conv.weight": torch.zeros(1)}]))
fields = st.sampled_from(["format", "model_name", "model_options", "model_state", "segmenter", "input_scale",
                          "postprocess", "recipe", "metrics", "optimizer_state"])


@example(changes=[("model_options", "DELETE")])                        # BUG 9
@example(changes=[("model_options", "x"), ("model_name", 5)])
@example(changes=[("model_state", [1])])
@example(changes=[("model_options", {"width": -1})])
@example(changes=[("segmenter", [1, 2])])
@given(st.lists(st.tuples(fields, st.one_of(st.just("DELETE"), field_values)), min_size=1, max_size=3))
@fuzz("checkpoint_fields")
def test_checkpoint_fields_removed_or_of_the_wrong_type(case_dir, good_checkpoint, changes):
    ckpt = dict(good_checkpoint[1])
    for key, value in changes:
        if value == "DELETE":
            ckpt.pop(key, None)
        else:
            ckpt[key] = value
    folder = case_dir()
    path = folder / "c.pt"
    torch.save(ckpt, path)
    seg = outcome(lambda: Segmenter.load(path, device="cpu"), path.name, folder)
    if seg is not None:
        assert isinstance(seg, Segmenter) and seg.input_scale > 0
        check_mask(seg.predict(np.full((16, 16, 3), 128, np.uint8)), (16, 16))


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch, good_checkpoint):
    monkeypatch.chdir(tmp_path)
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        path = tmp_path / f"evil{protocol}.pt"
        torch.save(dict(good_checkpoint[1], payload=_RunsCode()), path, pickle_protocol=protocol)
        for reader in (load_checkpoint, Segmenter.load):
            with pytest.raises(CheckpointError, match=path.name):
                reader(path)
    assert not (tmp_path / "PWNED").exists()


# --------------------------------------------------------------------------- recipes and CLI numbers

weird_numbers = st.one_of(st.integers(-2, 3), st.sampled_from([0, -1, 10 ** 30, True, None, "3", [1]]),
                          st.floats(allow_nan=True, allow_infinity=True))


@example(d={"name": "a", "train": 5})                                  # BUG 10
@example(d={"name": "a", "train": [1]})
@given(st.one_of(json_values, st.fixed_dictionaries(
    {"name": st.one_of(st.text(max_size=4), st.integers())},
    optional={"train": st.one_of(json_values, st.dictionaries(st.sampled_from(["epochs", "batch_size", "lr",
                                                                                "max_minutes", "weight_decay",
                                                                                "checkpoint_every", "zzz"]),
                                                              weird_numbers, max_size=3)),
              "data": json_values, "model": json_values, "measure": json_values})))
@fuzz("recipe_from_dict")
def test_recipe_from_dict(tmp_path, d):
    with time_limit():
        try:
            recipe = Recipe.from_dict(d)
        except BloodsegError as exc:
            assert "recipe" in str(exc)
            return
        assert isinstance(recipe, Recipe)
        try:
            recipe.train.validate()
        except BloodsegError:
            pass


@example(values={"max_minutes": "x"})                                  # BUG 11
@example(values={"checkpoint_every": None})
@example(values={"weight_decay": None})
@example(values={"checkpoint_every": math.nan})
@example(values={"epochs": True})
@given(st.dictionaries(st.sampled_from(["epochs", "batch_size", "lr", "max_minutes", "weight_decay",
                                        "checkpoint_every", "num_workers"]), weird_numbers, max_size=4))
@fuzz("train_recipe")
def test_train_recipe_validate(values):
    cfg = TrainRecipe(**values)
    with time_limit():
        try:
            cfg.validate()
        except BloodsegError as exc:
            assert any(name in str(exc) for name in values) or "learning rate" in str(exc)
            return
    for name in ("epochs", "batch_size"):
        assert type(getattr(cfg, name)) is int and getattr(cfg, name) >= 1
    for name in ("checkpoint_every", "num_workers"):
        assert type(getattr(cfg, name)) is int and getattr(cfg, name) >= 0
    for name in ("lr", "max_minutes", "weight_decay"):
        assert math.isfinite(getattr(cfg, name)) and getattr(cfg, name) >= 0
    assert cfg.lr > 0


class _Validated(Exception):
    """Raised where cli train would start building data: every number passed validation."""


cli_ints = st.one_of(st.integers(-3, 4), st.sampled_from([0, -1, 10 ** 12]))
cli_floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -1e-3, 1e300]))


@given(st.fixed_dictionaries({}, optional={"--epochs": cli_ints, "--batch-size": cli_ints, "--lr": cli_floats,
                                           "--width": st.integers(-3, 6), "--weight-decay": cli_floats,
                                           "--checkpoint-every": cli_ints, "--max-minutes": cli_floats}))
@fuzz("cli_numbers")
def test_cli_train_numbers(case_dir, monkeypatch, flags):
    """`bloodseg train` with 0, negative, NaN, inf and huge numbers: exit code 2 and one line on
    stderr before any data or model is built, or validation passes."""
    folder = case_dir()

    def reached(*a, **k):
        raise _Validated
    monkeypatch.setattr(commands, "training_splits", reached)
    argv = ["train", "--model", "unet", "--out", str(folder / "run"), "--profile", "smoke"]
    argv += [f"{k}={v}" for k, v in flags.items()]
    err = io.StringIO()
    with time_limit(), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(argv)
        except _Validated:
            code = None
    if code is None:   # validation passed: the numbers must be usable
        assert flags.get("--epochs", 1) >= 1 and flags.get("--batch-size", 1) >= 1
        assert math.isfinite(flags.get("--lr", 1.0)) and flags.get("--lr", 1.0) > 0
        assert flags.get("--width", 1) >= 1
    else:
        assert code == 2, err.getvalue()
        lines = err.getvalue().strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("bloodseg train: error:"), lines
