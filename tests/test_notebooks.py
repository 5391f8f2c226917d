"""The chapters are committed as clean executed notebooks (the book shows what really ran)."""
import json
from pathlib import Path

import pytest

BOOK = Path(__file__).resolve().parent.parent / "book"
NOTEBOOKS = sorted(p for p in BOOK.glob("*.ipynb"))


def test_there_are_chapters():
    toc = (BOOK.parent / "_toc.yml").read_text()
    listed = [line.split("file:")[1].strip() for line in toc.splitlines() if "file:" in line]
    nb_listed = [f for f in listed if (BOOK.parent / f"{f}.ipynb").exists()]
    assert nb_listed, "the table of contents lists no notebook chapter"
    for f in listed:  # every TOC entry exists as a notebook or a markdown page
        assert (BOOK.parent / f"{f}.ipynb").exists() or (BOOK.parent / f"{f}.md").exists(), f
    assert {f"book/{p.stem}" for p in NOTEBOOKS} <= set(listed), "a notebook is missing from _toc.yml"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_executed_and_clean(path):
    nb = json.loads(path.read_text())
    # the hidden install cell (first code cell, see tests/test_book_html.py) is not part of the run
    code = [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()
            and "BLOODSEG_REPOSITORY" not in "".join(c["source"])]
    assert code, "a chapter without code"
    counts = [c["execution_count"] for c in code]
    assert None not in counts, "cells that were never executed"
    assert counts == sorted(counts) and len(set(counts)) == len(counts), \
        f"execution counts out of order (run the notebook top to bottom): {counts}"
    for c in code:
        for out in c.get("outputs", []):
            assert out["output_type"] != "error", f"error output in cell: {''.join(c['source'])[:80]}"
            text = "".join(out.get("text", "")) if out["output_type"] == "stream" else ""
            assert "Traceback" not in text
    assert any(c.get("outputs") for c in code), "no outputs at all"
    first = "".join(code[0]["source"]) + json.dumps(code[0].get("outputs", []))
    assert "start_run" in first and "profile" in first, "the first cell must print profile and device"
    last = json.dumps(code[-1].get("outputs", []))
    assert "wall time" in last, "the last cell must print the wall time"
    md = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown").lower()
    assert "you will learn" in md or "what you will" in md, "chapters open with what the reader will learn"
    assert "summary" in md, "chapters end with a summary"
