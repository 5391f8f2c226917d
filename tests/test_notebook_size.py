"""The committed notebooks stay small: figures as JPEG (bloodseg.paper.notebooks), limits per file."""
from __future__ import annotations

import base64
from pathlib import Path

import nbformat
import pytest

from bloodseg.paper.notebooks import image_bytes, shrink_images

BOOK = Path(__file__).resolve().parents[1] / "book"
NOTEBOOKS = sorted(BOOK.glob("*.ipynb"))
TOTAL_LIMIT = 3_400_000        # bytes, all committed notebooks together (3.0 MB before chapter 10)
EACH_LIMIT = 1_100_000         # bytes, any one notebook


def test_notebooks_together_stay_under_the_limit():
    sizes = {p.name: p.stat().st_size for p in NOTEBOOKS}
    assert sum(sizes.values()) <= TOTAL_LIMIT, sizes


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_each_notebook_is_small_and_has_no_large_png(path):
    assert path.stat().st_size <= EACH_LIMIT
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            png = output.get("data", {}).get("image/png", "")
            # shrink_images keeps a PNG only where JPEG is not smaller (small line plots)
            assert len(png) < 50_000, "a large PNG figure: run bloodseg.paper.notebooks.shrink_images"


def test_shrink_images_turns_a_large_png_into_a_smaller_jpeg(tmp_path):
    import io

    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    photo = (rng.random((600, 1600, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="PNG")
    png = base64.b64encode(buf.getvalue()).decode()
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell("x", outputs=[nbformat.v4.new_output(
        "display_data", data={"image/png": png, "text/plain": "<Figure>"})]))
    path = tmp_path / "n.ipynb"
    nbformat.write(nb, path)
    before, after = shrink_images(path)
    assert after < before
    out = nbformat.read(path, as_version=4).cells[0].outputs[0]["data"]
    assert "image/png" not in out and out["text/plain"] == "<Figure>"
    image = Image.open(io.BytesIO(base64.b64decode(out["image/jpeg"])))
    assert image.format == "JPEG" and image.width == 800 and image.height == 300
    assert image_bytes(path) == len(out["image/jpeg"])
