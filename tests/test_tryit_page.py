"""The "Try it on your own smear" page (book/try_it.md) in headless Chromium, as a reader uses it.

The page runs the shipped Segmenter in the browser (ONNX network in onnxruntime-web, OpenCV.js and
the page's own JavaScript for the rest). Here it is served from a temporary folder laid out like the
built book (:func:`bloodseg.paper.tryit.site`: the page's markup from book/try_it.md, its scripts,
and the files the book build writes: the network exported now from the shipped checkpoint, the
settings, the samples, the npm runtime), and checked against Python:

* parity: every vendored BCCD photograph gives the mask of ``Segmenter.predict`` on >= 99.5 % of
  the pixels, the same white-cell count and the same scale factor (the per-photo table is printed);
* crop parity: five crops around a white cell (170-344 px, shorter side below
  ``bloodseg.scale.CROP_SIDE``), where the network's confidence chooses the scale
  (``Segmenter._crop_scale``), get the factor of ``Segmenter.segment``, its mask and its count; on
  one, a second white cell cut by the border goes (the crop rule, ``Segmenter.crop_cells``);
* a photograph larger than a tile (tiling), the downloads (mask PNG, cells CSV) against bloodseg's;
* bad input: not an image, a 16-bit TIFF, a 20-megapixel photograph, no WebAssembly, a page opened
  from a file: each gives a clear message, never a blank page.

Skips (saying why) when Chromium or the npm runtime (``make setup``) is missing.
"""
from __future__ import annotations

import base64
import concurrent.futures
import time
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from bloodseg import Segmenter, shipped_checkpoint
from bloodseg import segmenter as segmenter_module
from bloodseg.bccd import bccd_sample_dir
from bloodseg.count import count_cells, write_counts_csv
from bloodseg.instances import INSTANCE_COLUMNS, instances
from bloodseg.io import read_image
from bloodseg.paper import tryit
from bloodseg.paper.crops import crop_around_white_cell
from bloodseg.postprocess import clean_white_cells, min_area_at
from bloodseg.scale import CROP_FACTORS, CROP_SIDE, is_crop

PHOTOS = sorted((bccd_sample_dir() / "images").glob("*.jpg"))

#: Crops fed to the page: (photograph, how it is cut, zoom). ("white", k): a square of k x the gold
#: white cell's box around it (bloodseg.paper.crops.crop_around_white_cell on the vendored gold mask,
#: grey > 100 as bloodseg.bccd reads it); ("box", y, x, h, w): a fixed box. Zoom 2 enlarges the crop
#: (bilinear), as a picture taken at twice BCCD's magnification. Chosen so that each of the three
#: crop factors wins once at least, each by a margin of >= 0.004 in mean confidence on the Python
#: side (1.0 x, 2.0 x and 1.4 x the trained scale 0.5, in this order).
CROPS = (("BloodImage_00058.jpg", ("white", 1.5), 1.0),        # 170 x 170
         ("BloodImage_00020.jpg", ("white", 1.0), 2.0),        # 232 x 232
         ("BloodImage_00017.jpg", ("white", 1.0), 2.0),        # 344 x 344
         ("BloodImage_00007.jpg", ("box", 87, 157, 200, 300), 1.0),   # 200 high, 300 wide
         ("BloodImage_00058.jpg", ("beside", "BloodImage_00020.jpg"), 1.0))   # 170 x 255, two white cells


def _crop(name, cut, zoom) -> np.ndarray:
    if cut[0] == "beside":   # this photograph's white cell, and half of another's cut by the right border
        a, b = _crop(name, ("white", 1.5), 1.0), _crop(cut[1], ("white", 1.5), 1.0)
        b = cv2.resize(b, (a.shape[0], a.shape[0]), interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(np.hstack([a, b[:, :a.shape[0] // 2]]))
    image = read_image(bccd_sample_dir() / "images" / name)
    if cut[0] == "white":
        gold = cv2.imread(str(bccd_sample_dir() / "wbc_masks" / name.replace("BloodImage_", "BloodImage_Mask_")
                              .replace(".jpg", ".png")), cv2.IMREAD_GRAYSCALE)
        image = crop_around_white_cell(image, (gold > 100).astype(np.uint8), cut[1])[0]
    else:
        y, x, h, w = cut[1:]
        image = image[y:y + h, x:x + w]
    if zoom != 1.0:
        image = cv2.resize(image, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(image)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    missing = [f for f in tryit.VENDOR_FILES.values() if not (tryit.VENDOR_DIR / f).is_file()]
    if missing:
        pytest.skip(f"the page's runtime is missing from {tryit.VENDOR_DIR} ({', '.join(missing)}): "
                    "`make setup` fetches onnxruntime-web and OpenCV.js with npm")
    driver = tryit.chromium()
    if driver is None:
        pytest.skip("Chromium and chromedriver are not installed (Debian: apt-get install chromium "
                    "chromium-driver; .ci/run installs them when it runs as root)")
    root = tmp_path_factory.mktemp("tryit-site")
    try:
        settings = tryit.site(root)
        with tryit.serve(root) as base:
            driver.get(base + "book/try_it.html")
            state = tryit.wait_ready(driver)
            assert state == "ready", f"the page did not get ready ({state}): {_message(driver)} {_status(driver)}"
            yield SimpleNamespace(driver=driver, base=base, root=root, settings=settings,
                                  files=tmp_path_factory.mktemp("tryit-files"))
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def segmenter():
    return Segmenter.load(shipped_checkpoint(), device="cpu")


def _status(driver) -> str:
    return driver.execute_script("return (document.querySelector('.tryit-status') || {}).textContent || ''")


def _message(driver) -> str:
    """The visible message box's text ('' when none is shown)."""
    return driver.execute_script(
        "const m = document.querySelector('.tryit-message');"
        "return m && !m.hidden && m.checkVisibility() ? m.textContent : '';")


def _upload(p, path, timeout: float = 300) -> dict:
    """Give the page a file through its file picker, as a reader does; wait for the outcome."""
    d = p.driver
    before = d.execute_script("return window.bloodsegTryIt.attempts")
    d.find_element("css selector", "#tryit-file").send_keys(str(path))
    t0 = time.time()
    while time.time() - t0 < timeout:
        if d.execute_script("const a = window.bloodsegTryIt; return !a.busy && a.attempts > arguments[0];", before):
            break
        time.sleep(0.2)
    return d.execute_script("const l = window.bloodsegTryIt.last; return {ok: l.ok, message: l.message, "
                            "refusal: l.refusal, notes: l.notes, width: l.width, height: l.height, "
                            "tiles: l.tiles, counts: l.counts, factor: l.factor};")


def _page_mask(p) -> np.ndarray:
    b64 = p.driver.execute_script(
        "const m = window.bloodsegTryIt.last.mask; let s = '';"
        "for (let i = 0; i < m.length; i += 0x8000) s += String.fromCharCode.apply(null, m.subarray(i, i + 0x8000));"
        "return btoa(s);")
    last = p.driver.execute_script("return [window.bloodsegTryIt.last.height, window.bloodsegTryIt.last.width]")
    return np.frombuffer(base64.b64decode(b64), np.uint8).reshape(last)


def test_the_page_is_ready_with_its_samples_and_within_its_weight(page):
    d = page.driver
    assert "Ready" in _status(d)
    assert _message(d) == ""
    n = d.execute_script("return document.querySelectorAll('.tryit-sample img').length")
    assert n == len(PHOTOS) == 16
    assert page.settings["onnx"]["solver"] == "euler-1"
    weight = page.settings["weight"]["total_bytes"]
    print(f"\npage weight: {weight / 1e6:.1f} MB in _static/tryit/ (target <= 30 MB)")
    assert weight <= 30e6


def test_parity_with_segmenter_predict_on_every_vendored_photograph(page, segmenter):
    """The page, fed each vendored BCCD photograph, against Segmenter.predict (the Python side runs
    on one torch thread in a worker thread at the same time as the browser)."""
    def python(path):
        torch.set_num_threads(1)
        p = segmenter.segment(read_image(path))
        return p, count_cells(p.mask)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        refs = [pool.submit(python, f) for f in PHOTOS]
        pages = [tryit.run_in_page(page.driver, page.base + "_static/tryit/samples/" + f.name) for f in PHOTOS]
        refs = [r.result() for r in refs]
    print("\nphoto                 agreement   white page/python   red page/python   factor page/python   page ms")
    bad = []
    for f, got, (ref, counts) in zip(PHOTOS, pages, refs):
        assert got["ok"], f"{f.name}: {got}"
        agree = tryit.agreement(got["mask"], ref.mask)
        print(f"{f.name:22s} {100 * agree:8.3f} %   {got['counts']['n_white']:5d} / {counts['n_white']:<5d}"
              f"       {got['counts']['n_red']:5d} / {counts['n_red']:<5d}     {got['factor']:.4g} / {ref.factor:.4g}"
              f"        {got['ms']['total']:7.0f}")
        if agree < 0.995 or got["counts"]["n_white"] != counts["n_white"] or abs(got["factor"] - ref.factor) > 1e-9:
            bad.append(f.name)
    assert not bad, (f"the page differs from Segmenter.predict on {bad}: if bloodseg's colour or scale rule "
                     "changed, update book/_static/tryit/colour_rule.js / scale_rule.js to match")


def test_parity_on_crops_where_the_network_chooses_the_scale(page, segmenter, monkeypatch):
    """Crops (shorter side below CROP_SIDE), given to the page as PNG files: the page runs the
    network at each of CROP_FACTORS x the trained scale and keeps the most confident pass, as
    Segmenter._crop_scale does, so it must choose Segmenter.segment's factor, and give its mask and
    white-cell count. The confidences Python computed are recorded on the way (a wrapper around
    the predict_probabilities that Segmenter calls, no extra pass) and printed next to the page's."""
    crops = [_crop(*c) for c in CROPS]
    folder = page.root / "crops"
    folder.mkdir(exist_ok=True)
    names = []
    for (photo, cut, zoom), image in zip(CROPS, crops):
        assert is_crop(image) and 120 <= min(image.shape[:2]) < CROP_SIDE
        names.append(f"crop-{photo[len('BloodImage_'):-4]}-{image.shape[1]}x{image.shape[0]}.png")
        assert cv2.imwrite(str(folder / names[-1]), image)
    python_conf = {}
    real = segmenter_module.predict_probabilities

    def recording(model, image, *args, input_scale=1.0, **kwargs):
        probs = real(model, image, *args, input_scale=input_scale, **kwargs)
        python_conf.setdefault(image.shape[:2], {})[input_scale] = float(probs.max(0).values.mean())
        return probs

    monkeypatch.setattr(segmenter_module, "predict_probabilities", recording)

    def python(image):
        torch.set_num_threads(1)
        p = segmenter.segment(image, probabilities=True)
        return p, count_cells(p.mask)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        refs = [pool.submit(python, im) for im in crops]
        pages = [tryit.run_in_page(page.driver, page.base + "crops/" + n) for n in names]
        refs = [r.result() for r in refs]
    trained = segmenter.input_scale
    print("\ncrop                          size      factor page/python   agreement  white page/python"
          "   confidence at " + ", ".join(f"{c:g}x" for c in CROP_FACTORS) + " (page | python)   page ms")
    bad = []
    for name, image, got, (ref, counts) in zip(names, crops, pages, refs):
        assert got["ok"], f"{name}: {got}"
        crop = got["crop"]
        assert crop is not None and [p["multiple"] for p in crop["passes"]] == list(CROP_FACTORS), crop
        assert got["factor"] == crop["passes"][crop["chosen"]]["factor"]
        agree = tryit.agreement(got["mask"], ref.mask)
        ours = [p["confidence"] for p in crop["passes"]]
        theirs = [python_conf.get(image.shape[:2], {}).get(c * trained) for c in CROP_FACTORS]
        fmt = lambda xs: " ".join("  n/a  " if x is None else f"{x:.5f}" for x in xs)  # noqa: E731
        factors = f"{got['factor']:.4g} / {ref.factor:.4g}"
        print(f"{name:29s} {image.shape[1]:3d}x{image.shape[0]:<3d}   {factors:20s} {100 * agree:8.3f} %   "
              f"{got['counts']['n_white']:3d} / {counts['n_white']:<3d}           {fmt(ours)} | {fmt(theirs)}"
              f"   {got['ms']['total']:7.0f}")
        if (abs(got["factor"] - ref.factor) > 1e-9 or agree < 0.995
                or got["counts"]["n_white"] != counts["n_white"]):
            bad.append(name)
        if None not in theirs:
            assert max(abs(a - b) for a, b in zip(ours, theirs)) < 5e-4, (name, ours, theirs)
    # the crop rule acted on the pair (the cut cell went), so the page's agreement covers it too
    pair, spec = refs[-1][0], segmenter.postprocess
    without = clean_white_cells(pair.probs.argmax(0).numpy().astype(np.uint8), pair.probs,
                                min_area_at(spec, pair.factor), spec["fill_white_holes"])
    assert segmenter.crop_cells == "centre" and (without == 1).sum() > (pair.mask == 1).sum() + 500
    assert not bad, (f"the page differs from Segmenter.segment on the crops {bad}: if the crop rule "
                     "(Segmenter._crop_scale, bloodseg.scale.CROP_SIDE / CROP_FACTORS) changed, update "
                     "cropScale in book/_static/tryit/scale_rule.js to match")


def test_a_photograph_larger_than_a_tile_is_tiled_like_python(page, segmenter):
    """Two photographs side by side (1280x480): at the trained scale 0.5 the network sees 640x240,
    wider than one 512-pixel tile, so the page blends overlapping tiles as bloodseg.infer does."""
    wide = np.hstack([read_image(f) for f in PHOTOS[:2]])
    path = page.files / "two-photographs.png"
    cv2.imwrite(str(path), wide)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        python = pool.submit(lambda: (torch.set_num_threads(1), segmenter.segment(wide))[1])
        got = _upload(page, path)
        ref = python.result()
    assert got["ok"], got
    assert got["tiles"] > 1 and got["factor"] == ref.factor
    agree = tryit.agreement(_page_mask(page), ref.mask)
    white = count_cells(ref.mask)["n_white"]
    print(f"\n1280x480: {got['tiles']} tiles, agreement {100 * agree:.3f} %, white {got['counts']['n_white']} / {white}")
    assert agree >= 0.995
    assert got["counts"]["n_white"] == white


def test_the_downloads_are_the_files_bloodseg_writes(page, tmp_path):
    """The mask PNG decodes (cv2) to the page's mask, one grey channel of 0/1/2; the cells CSV has
    bloodseg count --instances's columns and, mean probability aside, its rows for that mask; the
    counts CSV is what bloodseg count --out writes for that mask."""
    d = page.driver
    tryit.run_in_page(d, page.base + "_static/tryit/samples/" + PHOTOS[1].name)
    mask = _page_mask(page)
    png = d.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const l = window.bloodsegTryIt.last;
        import(new URL('../_static/tryit/png.js', location.href).href)
          .then((m) => m.encodeGreyPng(l.mask, l.width, l.height)).then((b) => b.arrayBuffer())
          .then((buf) => { const u = new Uint8Array(buf); let s = '';
                           for (let i = 0; i < u.length; i += 0x8000) s += String.fromCharCode.apply(null, u.subarray(i, i + 0x8000));
                           done(btoa(s)); });""")
    decoded = cv2.imdecode(np.frombuffer(base64.b64decode(png), np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded.dtype == np.uint8 and decoded.ndim == 2
    assert np.array_equal(decoded, mask)
    csv_text = d.execute_async_script("""
        const done = arguments[arguments.length - 1];
        import(new URL('../_static/tryit/count.js', location.href).href)
          .then((m) => done(m.cellsCsv(window.bloodsegTryIt.last.rows)));""")
    lines = csv_text.strip().split("\n")
    assert lines[0].split(",") == list(INSTANCE_COLUMNS)
    _, rows = instances(mask)
    assert len(lines) - 1 == len(rows)
    skip = INSTANCE_COLUMNS.index("mean_probability")
    for line, row in zip(lines[1:], rows):
        ours = line.split(",")
        theirs = [str(row.get(c, "")) for c in INSTANCE_COLUMNS]
        assert ours[:skip] + ours[skip + 1:] == theirs[:skip] + theirs[skip + 1:]
        assert 0 < float(ours[skip]) <= 1
    counts_csv = d.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const l = window.bloodsegTryIt.last;
        import(new URL('../_static/tryit/count.js', location.href).href)
          .then((m) => done(m.countsCsv(l.name, l.counts)));""")
    written = write_counts_csv([{"image": PHOTOS[1].name, **count_cells(mask)}], tmp_path / "counts.csv")
    assert counts_csv == written.read_text().replace("\r\n", "\n")


def test_not_an_image_is_refused_with_a_message(page):
    path = page.files / "notes.jpg"
    path.write_text("this is a shopping list, not a photograph\n")
    got = _upload(page, path)
    assert not got["ok"] and got["refusal"]
    text = _message(page.driver)
    assert "not an image" in text and "JPEG or PNG" in text, text
    assert page.driver.execute_script("return document.querySelector('.tryit-result').hidden")


def test_a_16_bit_tiff_is_refused_with_what_to_do(page):
    path = page.files / "smear16.tif"
    cv2.imwrite(str(path), read_image(PHOTOS[0]).astype(np.uint16) * 257)
    got = _upload(page, path)
    assert not got["ok"] and got["refusal"]
    text = _message(page.driver)
    assert "TIFF" in text and "8-bit PNG or JPEG" in text, text


def test_a_20_megapixel_photograph_is_shrunk_with_a_message(page):
    path = page.files / "big.jpg"
    big = cv2.resize(read_image(PHOTOS[2]), (5477, 3652), interpolation=cv2.INTER_LINEAR)   # 20.0 MP
    cv2.imwrite(str(path), big, [cv2.IMWRITE_JPEG_QUALITY, 85])
    got = _upload(page, path)
    assert got["ok"], got
    limit = page.settings["limits"]["max_pixels"]
    assert got["width"] * got["height"] <= limit
    text = _message(page.driver)
    assert "5477×3652" in text and "shrank" in text, text
    assert got["counts"]["n_white"] >= 1
    print(f"\n20 MP photograph: shrunk to {got['width']}x{got['height']}, factor {got['factor']:.3f}, "
          f"{got['counts']['n_white']} white and {got['counts']['n_red']} red cells")


def test_a_browser_without_webassembly_gets_a_message(page):
    d = page.driver
    script = d.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": "delete window.WebAssembly;"})
    try:
        d.get(page.base + "book/try_it.html")
        assert tryit.wait_ready(d, 30) == "unavailable"
        assert "no WebAssembly" in _message(d)
    finally:
        d.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": script["identifier"]})


def test_a_page_opened_from_a_file_says_to_serve_it(page):
    d = page.driver
    d.get((page.root / "book" / "try_it.html").as_uri())
    assert tryit.wait_ready(d, 30) == "unavailable"
    text = _message(d)
    assert "web server" in text and "http.server" in text, text
