"""Build-time files of the "Try it on your own smear" page (book/try_it.md).

At every build this extension exports the shipped checkpoint's network to ONNX (with the calibrated
solver, :func:`bloodseg.export.export_onnx`), so the page can never drift from the checkpoint, and
writes it with its ``settings.json`` (the ONNX file's own metadata and the constants of the colour
and scale rules), the vendored BCCD photographs and the npm runtime that ``make setup`` fetched
(onnxruntime-web and OpenCV.js, in .venv/tryit_vendor/) into ``_build/tryit_static/tryit/``, which is
added to the static files with the page's own scripts (book/_static/tryit/): everything the page
loads is served from ``_build/html/_static/tryit/``. :func:`bloodseg.paper.tryit.write_assets` does
the work; it takes a few seconds.
"""
import time
from pathlib import Path

from sphinx.util import logging

ROOT = Path(__file__).resolve().parents[2]
OWN = ROOT / "book" / "_static"
logger = logging.getLogger(__name__)


def _write(app, config):
    from bloodseg.paper.tryit import VENDOR_DIR, write_assets

    out = Path(app.doctreedir).parent / "tryit_static"
    t0 = time.perf_counter()
    settings = write_assets(out / "tryit", vendor=VENDOR_DIR, own=OWN / "tryit")
    config.html_static_path = list(config.html_static_path) + [str(OWN), str(out)]
    logger.info(f"tryit: network exported from {settings['onnx']['checkpoint']} ({settings['onnx']['solver']}), "
                f"{settings['weight']['total_bytes'] / 1e6:.1f} MB for the page, {time.perf_counter() - t0:.1f} s")
    if settings["vendor"] is None:
        # not a warning: a build without npm is still a good build; the page says what is missing
        logger.info("tryit: note: onnxruntime-web / OpenCV.js are missing (make setup fetches them with npm); "
                    "the 'Try it' page will say that its runtime is missing")


def setup(app):
    app.connect("config-inited", _write, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
