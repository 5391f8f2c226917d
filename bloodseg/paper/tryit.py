"""The book's "Try it on your own smear" page: its files, its parity with Python, its weight and speed.

The page (``book/try_it.md``, code in ``book/_static/tryit/``) runs the shipped Segmenter in the
reader's browser: the network is an ONNX file run by onnxruntime-web in WebAssembly, the image
operations are OpenCV.js's and the page's own JavaScript, each step mirroring a Python function
(``book/_static/tryit/pipeline.js`` lists them). This module provides the Python side:

* :func:`write_assets` — what the book build adds to ``_static/tryit/`` (the Sphinx extension
  ``book/_ext/tryit_assets.py`` calls it): the network exported from the shipped checkpoint by
  :func:`bloodseg.export.export_onnx` (so the page can never drift from it), ``settings.json`` (the
  ONNX file's own metadata, the constants of the colour and scale rules, the sizes of the files),
  the vendored sample photographs and the npm runtime fetched by ``make setup``;
* :func:`site` — a minimal web site with the page's markup (taken from ``book/try_it.md``) and
  those files, for the tests and the measurements without building the whole book; :func:`serve`
  serves a folder on localhost and :func:`chromium` starts headless Chromium;
* :func:`run_in_page` — one photograph through the page (its mask, counts, factor and timings);
* :func:`measure` — the parity table (every vendored photograph, page against
  ``Segmenter.predict``), the page weight and the time per photograph in Chromium next to
  ``bloodseg predict`` on the same CPU: ``python -m bloodseg.paper.tryit measure [BOOK_HTML]``
  writes ``book/results/tryit/measured.json`` and the ``measured.md`` the page includes;
  ``python -m bloodseg.paper.tryit shots DIR [BOOK_HTML]`` takes the page's screenshots.
"""
from __future__ import annotations

import base64
import contextlib
import functools
import gzip
import hashlib
import http.server
import inspect
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

__all__ = ["ROOT", "PAGE_SOURCE", "OWN_FILES", "VENDOR_DIR", "VENDOR_FILES", "LIMITS", "rule_parameters",
           "write_assets", "page_markup", "site", "serve", "chromium", "run_in_page", "agreement",
           "measure", "screenshots", "main"]

#: The repository root (a clone; the page's sources are not package data).
ROOT = Path(__file__).resolve().parents[2]
#: The page's source, and the folder of its own scripts and style.
PAGE_SOURCE = ROOT / "book" / "try_it.md"
OWN_FILES = ROOT / "book" / "_static" / "tryit"
#: Where ``make setup`` puts the npm runtime (git-ignored), and the files the page loads from it.
VENDOR_DIR = ROOT / ".venv" / "tryit_vendor"
VENDOR_FILES = {"ort_js": "ort.wasm.min.js", "ort_mjs": "ort-wasm-simd-threaded.mjs",
                "ort_wasm": "ort-wasm-simd-threaded.wasm.gz", "opencv": "opencv.js.gz"}
#: Photographs above ``max_pixels`` are shrunk to it in the page (with a message); above
#: ``refuse_pixels`` they are refused (a browser tab's memory).
LIMITS = {"max_pixels": 2_000_000, "refuse_pixels": 100_000_000}
#: The name of the exported network in the build.
ONNX_NAME = "bccd-nodes-unet-w16.onnx.gz"


_NO_OUTLINE = inspect.Parameter("outline", inspect.Parameter.KEYWORD_ONLY, default=0)


def _default(fn, name):
    return inspect.signature(fn).parameters[name].default


def rule_parameters() -> dict:
    """The constants of the steps the page mirrors, read from the Python modules (so that a changed
    constant reaches the page at the next build; a changed rule is caught by the parity test)."""
    from .. import classes, preprocess, scale, stain

    return {
        "colour": {"mirrors": "bloodseg.stain.match_background",
                   "quantile": _default(stain.background_colour, "quantile"),
                   "stride": 4,      # background_colour reads every 4th pixel of every 4th row
                   "dark": 32,       # match_background leaves a background darker than this as it is
                   "max_gain": float(stain.MAX_GAIN)},
        "scale": {"mirrors": "bloodseg.Segmenter.scale_for: bloodseg.Segmenter._crop_scale on a crop "
                             "(bloodseg.scale.is_crop), bloodseg.scale.auto_scale on a whole field",
                  "crop_side": int(scale.CROP_SIDE), "crop_factors": [float(c) for c in scale.CROP_FACTORS],
                  "crop_tie": 1e-9,   # Segmenter._crop_scale: a later factor must be more confident by more than this
                  "lo": _default(scale.auto_scale, "lo"), "hi": _default(scale.auto_scale, "hi"),
                  "tolerance": _default(scale.auto_scale, "tolerance"), "ratio": float(scale.RATIO),
                  "min_radius": float(getattr(scale, "_MIN_RADIUS", 2.0)),
                  "min_fraction": float(getattr(scale, "_MIN_FRACTION", 0.02)),
                  "max_spread": float(getattr(scale, "_MAX_SPREAD", 2.5)),
                  "purple_below_median": 12},   # bloodseg.colour.stain_masks: b* < median - 12
        "clahe": {"mirrors": "bloodseg.preprocess.clahe_on_luma",
                  "clip_limit": float(_default(preprocess.clahe_on_luma, "clip_limit")),
                  "tile_grid": list(_default(preprocess.clahe_on_luma, "tile_grid"))},
        "overlay": {"mirrors": "bloodseg.classes.overlay", "alpha": float(_default(classes.overlay, "alpha")),
                    "outline": int(inspect.signature(classes.overlay).parameters.get("outline", _NO_OUTLINE).default),
                    "outline_rgb": np.asarray(getattr(classes, "OUTLINE_BGR", classes.PALETTE_BGR))[:, ::-1].astype(int).tolist()},
        "palette_rgb": classes.PALETTE_BGR[:, ::-1].astype(int).tolist(),
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _gzip_file(src: Path, dst: Path) -> None:
    with open(src, "rb") as fin, open(dst, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as fout:
            shutil.copyfileobj(fin, fout)


def write_assets(dest, vendor=VENDOR_DIR, own=OWN_FILES) -> dict:
    """Write the page's generated files into ``dest`` (the build's ``_static/tryit/``):
    ``model/`` (the ONNX network exported now from the shipped checkpoint, gzipped, and
    ``settings.json``), ``samples/`` (the vendored BCCD photographs) and ``vendor/`` (the npm runtime
    from ``vendor``, when ``make setup`` fetched it). ``own``: the page's own scripts, counted in
    the page weight. Returns the settings written (``settings["vendor"]`` is None without the runtime)."""
    import onnx

    from ..bccd import bccd_sample_dir
    from ..export import export_onnx
    from ..segmenter import SHIPPED_NAME, Segmenter, shipped_checkpoint

    dest = Path(dest)
    for sub in ("model", "samples", "vendor"):
        shutil.rmtree(dest / sub, ignore_errors=True)
        (dest / sub).mkdir(parents=True)
    ckpt = shipped_checkpoint()
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(Segmenter.load(ckpt, device="cpu"), Path(tmp) / "net.onnx")
        meta = {p.key: json.loads(p.value) for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
        unpacked = onnx_path.stat().st_size
        onnx_sha = _sha256(onnx_path)
        _gzip_file(onnx_path, dest / "model" / ONNX_NAME)
    sample_dir = bccd_sample_dir()
    samples = []
    for f in sorted((sample_dir / "images").glob("*.jpg")):
        shutil.copyfile(f, dest / "samples" / f.name)
        samples.append({"file": f.name})
    shutil.copyfile(sample_dir / "LICENSE-bccd.txt", dest / "samples" / "LICENSE-bccd.txt")
    vendor = Path(vendor) if vendor is not None else None
    have_vendor = vendor is not None and all((vendor / f).is_file() for f in VENDOR_FILES.values())
    if have_vendor:
        for f in sorted(vendor.iterdir()):
            if f.is_file() and not f.name.startswith("."):
                shutil.copyfile(f, dest / "vendor" / f.name)
    settings = {
        "what": "settings of the 'Try it on your own smear' page, written by bloodseg.paper.tryit.write_assets "
                "when the book was built; 'segmenter' is the ONNX file's own metadata (bloodseg.segmenter)",
        "segmenter": meta["bloodseg.segmenter"],
        "model": meta.get("bloodseg.model"),
        "onnx": {"file": ONNX_NAME, "bytes_unpacked": unpacked, "sha256_unpacked": onnx_sha,
                 "solver": meta.get("bloodseg.solver"), "source": f"exported from {SHIPPED_NAME} when the book was built",
                 "checkpoint": SHIPPED_NAME, "checkpoint_sha256": _sha256(ckpt)},
        "rules": rule_parameters(),
        "limits": dict(LIMITS),
        "samples": samples,
        "vendor": {k: v for k, v in VENDOR_FILES.items()} if have_vendor else None,
    }
    files = {}
    roots = [(dest, "")] + ([(Path(own), "")] if own is not None and Path(own).is_dir() else [])
    for root, prefix in roots:
        for f in sorted(root.rglob("*")):
            if f.is_file() and not f.name.startswith(".") and f.name != "settings.json":
                files[prefix + f.relative_to(root).as_posix()] = f.stat().st_size
    settings["weight"] = {"files": files, "total_bytes": sum(files.values()),
                          "note": "every file of _static/tryit/ (settings.json excepted); the page loads all of them"}
    (dest / "model" / "settings.json").write_text(json.dumps(settings, indent=1, default=float) + "\n")
    return settings


# ----------------------------------------------------------------------------- a site to test the page

BEGIN, END = "<!-- tryit:begin -->", "<!-- tryit:end -->"


def page_markup(source: Path = PAGE_SOURCE) -> str:
    """The page's HTML, as written in ``book/try_it.md`` between the ``tryit:begin`` and
    ``tryit:end`` markers (the same markup the book shows)."""
    text = Path(source).read_text()
    m = re.search(re.escape(BEGIN) + r"(.*?)" + re.escape(END), text, re.S)
    if not m:
        raise ValueError(f"{source} has no {BEGIN} ... {END} block")
    return m.group(1)


def site(root, vendor=VENDOR_DIR) -> dict:
    """A minimal web site in ``root`` laid out as the built book: ``book/try_it.html`` (the page's
    markup, :func:`page_markup`) and ``_static/tryit/`` (the page's scripts and
    :func:`write_assets`). Returns the settings."""
    root = Path(root)
    static = root / "_static" / "tryit"
    if static.exists():
        shutil.rmtree(static)
    shutil.copytree(OWN_FILES, static)
    settings = write_assets(static, vendor)
    (root / "book").mkdir(parents=True, exist_ok=True)
    (root / "book" / "try_it.html").write_text(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Try it on your own smear"
        "</title></head>\n<body><main><h1>Try it on your own smear</h1>\n" + page_markup() + "\n</main></body></html>\n")
    return settings


class _Quiet(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm",
                      ".gz": "application/gzip", ".json": "application/json"}

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve(folder):
    """Serve ``folder`` on an ephemeral localhost port; yields its base URL (``http://127.0.0.1:PORT/``)."""
    handler = functools.partial(_Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def chromium(width: int = 1280, height: int = 1400):
    """Headless Chromium through selenium (the flags of tests/test_book_html.py), or None when
    Chromium or chromedriver is not installed."""
    chrome, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chrome and driver):
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run",
                 f"--window-size={width},{height}"):
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service(driver), options=opts)
    drv.set_page_load_timeout(60)
    drv.set_script_timeout(300)
    return drv


def wait_ready(driver, timeout: float = 120) -> str:
    """Wait until the page is ready (or has said why it cannot be); returns ``ready``,
    ``failed`` or ``unavailable``."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        state = driver.execute_script("return document.documentElement.dataset.tryit || ''")
        if state:
            return state
        time.sleep(0.2)
    return "timeout"


_RUN = """
const [what, done] = [arguments[0], arguments[arguments.length - 1]];
const api = window.bloodsegTryIt;
api.ready.then(() => api.runUrl(what)).then((r) => {
  if (!r.ok) { done(r); return; }
  let s = '';
  for (let i = 0; i < r.mask.length; i += 0x8000) s += String.fromCharCode.apply(null, r.mask.subarray(i, i + 0x8000));
  done({ok: true, name: r.name, mask: btoa(s), width: r.width, height: r.height, counts: r.counts,
        factor: r.factor, diameter: r.diameter, crop: r.crop, gains: r.gains, background: r.background, ms: r.ms,
        decode_ms: r.decodeMs, n_rows: r.rows.length, tiles: r.tiles, notes: r.notes,
        network: [r.networkWidth, r.networkHeight]});
}, (e) => done({ok: false, message: String(e)}));
"""


def run_in_page(driver, url: str) -> dict:
    """Run the page (already open and ready) on the photograph at ``url``; returns its result
    with ``mask`` as a ``uint8`` array, or ``{"ok": False, "message"...}``."""
    r = driver.execute_async_script(_RUN, url)
    if r.get("ok"):
        r["mask"] = np.frombuffer(base64.b64decode(r["mask"]), np.uint8).reshape(r["height"], r["width"])
    return r


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of pixels where two masks give the same class."""
    if a.shape != b.shape:
        return 0.0
    return float((a == b).mean())


# ----------------------------------------------------------------------------- measurements

def _page_weight_in_browser(driver) -> dict:
    """Bytes the open page fetched (resource timing: body sizes as sent, the page itself included)."""
    return driver.execute_script("""
        const e = performance.getEntriesByType('resource');
        const nav = performance.getEntriesByType('navigation')[0];
        const items = e.map((r) => [r.name.replace(location.origin, ''), r.encodedBodySize]);
        if (nav) items.push([location.pathname, nav.encodedBodySize]);
        return {total_bytes: items.reduce((s, x) => s + x[1], 0), files: Object.fromEntries(items)};""")


def _python_predict_times(seg, images, threads=None) -> list[float]:
    import torch
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        seg.predict(images[0])      # warm-up, untimed
        out = []
        for im in images:
            t = time.perf_counter()
            seg.predict(im)
            out.append(time.perf_counter() - t)
        return out
    finally:
        torch.set_num_threads(before)


def measure(out_dir=None, book_html=None, log=print) -> dict:
    """The parity table, page weight and timings, side by side on this CPU; writes
    ``measured.json`` and ``measured.md`` into ``out_dir`` (default ``book/results/tryit``).
    ``book_html``: a built book's ``_build/html``, whose real page is also weighed in Chromium."""
    import torch

    from ..bccd import bccd_sample_dir
    from ..count import count_cells
    from ..io import read_image
    from ..scale import red_cell_diameter
    from ..segmenter import Segmenter, shipped_checkpoint
    from .records import provenance, write_record

    t_all = time.perf_counter()
    out_dir = Path(out_dir) if out_dir is not None else ROOT / "book" / "results" / "tryit"
    photos = sorted((bccd_sample_dir() / "images").glob("*.jpg"))
    seg = Segmenter.load(shipped_checkpoint(), device="cpu")
    driver = chromium()
    if driver is None:
        raise RuntimeError("Chromium and chromedriver are needed (apt-get install chromium chromium-driver)")
    rows, page_ms, page_seg_ms = [], [], []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            settings = site(tmp)
            if settings["vendor"] is None:
                raise RuntimeError("the npm runtime is missing: run make setup (needs npm)")
            with serve(tmp) as base:
                driver.get(base + "book/try_it.html")
                t_load = time.perf_counter()
                state = wait_ready(driver)
                load_s = time.perf_counter() - t_load
                if state != "ready":
                    raise RuntimeError(f"the page did not get ready: {state}")
                run_in_page(driver, base + "_static/tryit/samples/" + photos[0].name)   # warm-up, untimed
                seg.predict(read_image(photos[0]))                                       # warm-up, untimed
                for f in photos:
                    image = read_image(f)
                    page = run_in_page(driver, base + "_static/tryit/samples/" + f.name)
                    t = time.perf_counter()
                    ref = seg.segment(image)
                    py_s = time.perf_counter() - t
                    c_page, c_py = page["counts"], count_cells(ref.mask)
                    d_py = red_cell_diameter(seg.prepare(image))
                    row = {"photo": f.name, "agreement": agreement(page["mask"], ref.mask),
                           "pixels_differ": int((page["mask"] != ref.mask).sum()),
                           "white_page": c_page["n_white"], "white_python": c_py["n_white"],
                           "red_page": c_page["n_red"], "red_python": c_py["n_red"],
                           "factor_page": page["factor"], "factor_python": ref.factor,
                           "diameter_page": page["diameter"], "diameter_python": d_py,
                           "page_ms": round(page["ms"]["total"], 1),
                           "page_segment_ms": round(page["ms"]["total"] - page["ms"]["count"], 1),
                           "python_segment_ms": round(1000 * py_s, 1)}
                    rows.append(row)
                    page_ms.append(page["ms"]["total"])
                    page_seg_ms.append(row["page_segment_ms"])
                    log(f"{f.name}: agreement {100 * row['agreement']:.3f} %, white {row['white_page']}/"
                        f"{row['white_python']}, red {row['red_page']}/{row['red_python']}, page "
                        f"{row['page_ms']:.0f} ms, python {row['python_segment_ms']:.0f} ms")
                weight_browser = _page_weight_in_browser(driver)
            if book_html is not None and (Path(book_html) / "book" / "try_it.html").is_file():
                with serve(book_html) as base:
                    driver.get(base + "book/try_it.html")
                    wait_ready(driver)
                    book_weight = _page_weight_in_browser(driver)
            else:
                book_weight = None
        images = [read_image(f) for f in photos]
        py_threads = _python_predict_times(seg, images)
        py_one = _python_predict_times(seg, images, threads=1)
        with tempfile.TemporaryDirectory() as tmp:
            cli = [str(Path(sys.executable).with_name("bloodseg")), "predict", "--ckpt", str(shipped_checkpoint()),
                   "--out", tmp, *map(str, photos)]
            t = time.perf_counter()
            subprocess.run(cli, check=True, capture_output=True)
            cli_s = time.perf_counter() - t
    finally:
        driver.quit()
    browser = driver.capabilities.get("browserVersion", "?")
    med = lambda xs: float(np.median(xs))  # noqa: E731
    record = {
        "what": "the 'Try it on your own smear' page (book/try_it.md) in headless Chromium against the Python "
                "package on the same CPU: every vendored BCCD photograph (640x480) through the page and through "
                "Segmenter.segment (the shipped checkpoint, default settings, as bloodseg predict), the masks "
                "compared pixel by pixel and counted with bloodseg.count.count_cells; page times are the page's "
                "own (performance.now, after the runtime has loaded and one warm-up photograph), one WebAssembly "
                "thread; Python times are Segmenter.predict per photograph after one warm-up, with torch's "
                "default threads and with one thread, and the bloodseg predict command's wall time for all "
                "16 photographs (start-up and file writing included)",
        "chromium": browser, "onnx_solver": settings["onnx"]["solver"],
        "rows": rows,
        "min_agreement": min(r["agreement"] for r in rows),
        "white_counts_equal": all(r["white_page"] == r["white_python"] for r in rows),
        "red_counts_equal": sum(r["red_page"] == r["red_python"] for r in rows),
        "page_weight": {"tryit_folder_bytes": settings["weight"]["total_bytes"],
                        "fetched_by_test_page_bytes": weight_browser["total_bytes"],
                        "fetched_by_book_page_bytes": None if book_weight is None else book_weight["total_bytes"],
                        "onnx_unpacked_bytes": settings["onnx"]["bytes_unpacked"],
                        "files": settings["weight"]["files"]},
        "load_s": round(load_s, 2),
        "timing_ms": {"page_median": round(med(page_ms), 1), "page_segment_median": round(med(page_seg_ms), 1),
                      "python_predict_median": round(1000 * med(py_threads), 1),
                      "python_predict_median_1_thread": round(1000 * med(py_one), 1),
                      "python_threads": torch.get_num_threads(),
                      "cli_per_photo_incl_startup": round(1000 * cli_s / len(photos), 1),
                      "cli_total_s": round(cli_s, 2)},
        "provenance": provenance("python -m bloodseg.paper.tryit measure" + (" _build/html" if book_html else ""), t_all,
                                 threads=f"page: 1 WebAssembly thread; torch {torch.get_num_threads()} thread(s)"),
    }
    write_record(record, out_dir / "measured.json")
    (out_dir / "measured.md").write_text(measured_markdown(record))
    log(f"wrote {out_dir / 'measured.json'} and measured.md")
    return record


def _mb(n) -> str:
    return f"{n / 1e6:.1f} MB"


def _diameters(rows) -> str:
    """How the red-cell diameters measured by the page's scale rule compare with Python's."""
    pairs = [(r.get("diameter_page"), r.get("diameter_python")) for r in rows]
    if any((a is None) != (b is None) for a, b in pairs):
        return "On some photographs one side measured a red-cell diameter and the other did not."
    both = [(a, b) for a, b in pairs if a is not None]
    if not both:
        return "Neither side could measure the red cells of any photograph."
    worst = max(abs(a - b) for a, b in both)
    same = "to the last digit" if worst == 0 else f"to within {worst:.2g} px"
    none = len(pairs) - len(both)
    tail = f" (on {none} photograph(s) neither side could measure them, and both used the trained scale)" if none else ""
    return f"The red-cell diameters that the scale rule measured agree {same}{tail}."


def measured_markdown(record: dict) -> str:
    """The page's "How it was checked" numbers, as Markdown (written by :func:`measure`)."""
    from .records import provenance_line

    t = record["timing_ms"]
    w = record["page_weight"]
    lines = ["| photograph | pixels that agree | white cells, page / Python | red cells, page / Python | scale factor, page / Python |",
             "| --- | --- | --- | --- | --- |"]
    for r in record["rows"]:
        lines.append(f"| {r['photo']} | {100 * r['agreement']:.4f} % ({r['pixels_differ']} differ) | "
                     f"{r['white_page']} / {r['white_python']} | "
                     f"{r['red_page']} / {r['red_python']} | {r['factor_page']:g} / {r['factor_python']:g} |")
    n = len(record["rows"])
    big = {k: v for k, v in w["files"].items() if v > 1e6}
    weight_parts = ", ".join(f"{k.split('/')[-1]} {_mb(v)}" for k, v in sorted(big.items(), key=lambda kv: -kv[1]))
    book = (f" The built book's page fetched {_mb(w['fetched_by_book_page_bytes'])} in all, the theme's files included."
            if w.get("fetched_by_book_page_bytes") else "")
    text = [
        f"**Parity.** Each of the {n} vendored BCCD photographs (640×480), through the page in headless Chromium "
        f"{record['chromium']} and through `Segmenter.predict` in Python: at least "
        f"{100 * record['min_agreement']:.4f} % of the pixels get the same class (at most "
        f"{max(r['pixels_differ'] for r in record['rows'])} of {640 * 480:,} differ), the white-cell count is "
        f"{'the same on every photograph' if record['white_counts_equal'] else 'NOT the same on every photograph'}, "
        f"and the red-cell count on {record['red_counts_equal']} of {n}. {_diameters(record['rows'])}",
        "",
        "\n".join(lines),
        "",
        f"**Page weight.** {_mb(w['tryit_folder_bytes'])} for the page's folder, all of which the page loads "
        f"({weight_parts}; the rest is the sixteen sample photographs and the page's own scripts); the network "
        f"is {_mb(w['onnx_unpacked_bytes'])} once unpacked. In headless Chromium the page without the book around it "
        f"fetched {_mb(w['fetched_by_test_page_bytes'])}.{book} It was ready {record['load_s']:.1f} s after it "
        "was opened from a local server.",
        "",
        f"**Time per 640×480 photograph, on the same CPU.** The page: {t['page_segment_median']:.0f} ms to segment "
        f"(colour and scale rules, network, cleanup) and {t['page_median']:.0f} ms with the counting, one "
        f"WebAssembly thread (median of {n}). Python, `Segmenter.predict` as `bloodseg predict` runs it: "
        f"{t['python_predict_median']:.0f} ms with {t['python_threads']} torch thread(s), "
        f"{t['python_predict_median_1_thread']:.0f} ms with one; the `bloodseg predict` command took "
        f"{t['cli_total_s']:.1f} s for all {n} ({t['cli_per_photo_incl_startup']:.0f} ms a photograph, start-up and "
        "writing the masks and overlays included).",
        "",
        "The two sides ran one after the other on the same CPU, a machine shared with other jobs: the load "
        "average in the line below says how busy it was, and times on a quiet machine are shorter.",
        "",
        f"<small>{provenance_line(record)}; CPU: {record['provenance']['cpu']}.</small>",
        "",
    ]
    return "\n".join(text)


def screenshots(out_dir, book_html=None, vendor=VENDOR_DIR) -> list[Path]:
    """Screenshots of the page: empty (ready), a result on a vendored photograph, and a refusal
    (a text file given to it), written to ``out_dir``. ``book_html``: a built book's
    ``_build/html`` (the page as the book shows it), else the minimal :func:`site`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    driver = chromium(1280, 1500)
    if driver is None:
        raise RuntimeError("Chromium and chromedriver are needed")
    paths = []

    def shot(name, selector=None):
        if selector:
            driver.execute_script("document.querySelector(arguments[0]).scrollIntoView({block: 'start'});"
                                  "window.scrollBy(0, -80);", selector)
        else:
            driver.execute_script("window.scrollTo(0, 0)")
        time.sleep(0.3)
        paths.append(out_dir / name)
        driver.save_screenshot(str(paths[-1]))

    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(book_html) if book_html is not None else Path(tmp)
            if book_html is None:
                site(tmp, vendor)
            bad = Path(tmp) / "shopping-list.jpg"
            bad.write_text("not a photograph\n")
            with serve(folder) as base:
                driver.get(base + "book/try_it.html")
                wait_ready(driver)
                shot("1-empty.png", "#tryit-app")
                samples = sorted((folder / "_static" / "tryit" / "samples").glob("*.jpg"))
                run_in_page(driver, base + "_static/tryit/samples/" + samples[-1].name)
                shot("2-result.png", ".tryit-result")
                driver.find_element("css selector", "#tryit-file").send_keys(str(bad))
                t0 = time.time()
                while time.time() - t0 < 30 and not driver.execute_script(
                        "return window.bloodsegTryIt.attempts > 1 && !window.bloodsegTryIt.busy"):
                    time.sleep(0.2)
                shot("3-refusal.png", "#tryit-app")
    finally:
        driver.quit()
    return paths


USAGE = """usage: python -m bloodseg.paper.tryit measure [BOOK_HTML]   parity, weight and timings -> book/results/tryit/
       python -m bloodseg.paper.tryit shots DIR [BOOK_HTML]   screenshots of the page into DIR
BOOK_HTML: a built book's _build/html, whose page is also weighed / photographed (default: a minimal page)"""


def run_record(args, command: str) -> None:
    """``bloodseg record tryit [--work BUILT_HTML]``: :func:`measure` (parity, page weight, timings);
    ``--work`` names a built book's ``_build/html`` whose page is weighed too."""
    measure(book_html=args.work)


def main(argv=None) -> int:
    """The two maintainer commands (positional arguments only: the package's one command line is
    ``bloodseg``, in cli.py)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["measure"] and len(args) <= 2:
        measure(book_html=args[1] if len(args) == 2 else None)
    elif args[:1] == ["shots"] and len(args) in (2, 3):
        for path in screenshots(args[1], args[2] if len(args) == 3 else None):
            print(path)
    else:
        print(USAGE, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
