"""Serve MathJax from the build itself when `make setup` could fetch it (npm), so the built book
renders its equations offline and on machines without internet; otherwise keep Sphinx's CDN."""
from pathlib import Path

STATIC = Path(__file__).resolve().parents[2] / ".venv" / "mathjax_static"


def _use_local(app, config):
    if (STATIC / "mathjax" / "tex-chtml.js").is_file():
        config.mathjax_path = "mathjax/tex-chtml.js"
        config.html_static_path = list(config.html_static_path) + [str(STATIC)]


def setup(app):
    app.connect("config-inited", _use_local, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
