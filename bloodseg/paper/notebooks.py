"""Keeping the committed notebooks small: figures as JPEG at a set resolution.

A chapter's figures are mostly photographs and photo panels; as PNG they made the notebooks
9.2 MB (chapter 3 alone 4.6 MB). :func:`setup_figures` (called by
:func:`bloodseg.paper.report.start_run`, the first cell of every chapter) makes the inline backend
emit JPEG at :data:`DPI`; :func:`shrink_images` re-encodes the PNG outputs of a notebook that was
executed before, in place and without re-running it. ``tests/test_notebooks.py`` holds the
size limits.
"""
from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

import nbformat

#: Resolution of inline figures, and the JPEG quality of every figure kept in a notebook.
DPI = 80
JPEG_QUALITY = 70
#: Widest figure kept in a notebook, px (the page's text column is about 800 px wide).
MAX_WIDTH = 800


def setup_figures(dpi: int = DPI) -> None:
    """Inline figures as JPEG at ``dpi`` (only inside an IPython kernel; a no-op elsewhere)."""
    import matplotlib
    matplotlib.rcParams["figure.dpi"] = dpi
    matplotlib.rcParams["savefig.dpi"] = dpi
    try:
        from IPython import get_ipython
        from matplotlib_inline.backend_inline import set_matplotlib_formats
    except ImportError:
        return
    if get_ipython() is not None:
        set_matplotlib_formats("jpeg", pil_kwargs={"quality": JPEG_QUALITY})


def _as_jpeg(png_b64: str, quality: int, max_width: int) -> bytes:
    from PIL import Image
    image = Image.open(io.BytesIO(base64.b64decode(png_b64)))
    if image.width > max_width:
        image = image.resize((max_width, round(image.height * max_width / image.width)), Image.LANCZOS)
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        flat = Image.new("RGB", image.size, (255, 255, 255))
        flat.paste(image, mask=image.split()[-1])
        image = flat
    out = io.BytesIO()
    image.convert("RGB").save(out, format="JPEG", quality=quality, optimize=True)
    return out.getvalue()


def shrink_images(path, min_bytes: int = 10_000, quality: int = JPEG_QUALITY,
                  max_width: int = MAX_WIDTH) -> tuple[int, int]:
    """Re-encode every PNG output over ``min_bytes`` of notebook ``path`` as JPEG (at most
    ``max_width`` px wide: the book's text column is narrower) when that is smaller, and every JPEG
    output over ``min_bytes`` at ``quality`` and ``max_width`` when that is smaller; write the
    notebook back atomically. Returns ``(bytes before, bytes after)``."""
    path = Path(path)
    before = path.stat().st_size
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            old = data.get("image/jpeg")
            if old and len(old) >= min_bytes:
                old = "".join(old) if isinstance(old, list) else old
                new = base64.b64encode(_as_jpeg(old, quality, max_width)).decode("ascii")
                if len(new) < len(old):
                    data["image/jpeg"] = new
            png = data.get("image/png")
            if not png or len(png) < min_bytes:
                continue
            png = "".join(png) if isinstance(png, list) else png
            jpeg = _as_jpeg(png, quality, max_width)
            if len(jpeg) * 4 / 3 < len(png):
                del data["image/png"]
                data["image/jpeg"] = base64.b64encode(jpeg).decode("ascii")
    text = nbformat.writes(nb)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return before, path.stat().st_size


def image_bytes(path) -> int:
    """Bytes of the images (base64) in a notebook's outputs."""
    nb = json.loads(Path(path).read_text())
    total = 0
    for cell in nb.get("cells", []):
        for output in cell.get("outputs", []):
            for key, value in output.get("data", {}).items():
                if key.startswith("image/"):
                    total += len("".join(value) if isinstance(value, list) else value)
    return total
