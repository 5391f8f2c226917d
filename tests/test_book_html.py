"""Build the book from the committed notebook outputs (no re-execution) and look at every chapter
page in headless Chromium, as a reader would: title, figures actually loaded, rendered maths, and
no traceback on the page."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc.get("parts", []):
        files += [c["file"] for c in part.get("chapters", [])]
    return files


@pytest.fixture(scope="module")
def built_book(tmp_path_factory):
    out = tmp_path_factory.mktemp("book")
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    config["execute"]["execute_notebooks"] = "off"  # show what is committed, run nothing
    # paths in a config are relative to the config file; this copy lives elsewhere
    config["sphinx"]["local_extensions"] = {k: str(ROOT / v) for k, v in
                                            config["sphinx"]["local_extensions"].items()}
    cfg = out / "_config.yml"
    cfg.write_text(yaml.safe_dump(config))
    jb = Path(sys.executable).with_name("jupyter-book")
    proc = subprocess.run([str(jb), "build", str(ROOT), "--config", str(cfg), "--toc",
                           str(ROOT / "_toc.yml"), "--path-output", str(out), "-W", "-n",
                           "--keep-going"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"book build failed (warnings are errors):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return out / "_build" / "html"


@pytest.fixture(scope="module")
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("Chromium and chromedriver are not installed (Debian: apt-get install chromium "
                    "chromium-driver; .ci/run installs them when it runs as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run",
                 "--window-size=1280,2000"):
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service(driver), options=opts)
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


def _has_maths(source: Path) -> bool:
    text = source.read_text()
    return bool(re.search(r"\$[^$\n]+\$|\\\\\(|\\begin\{", text))


@pytest.mark.parametrize("page", toc_files())
def test_chapter_page_renders(built_book, browser, page):
    html = built_book / f"{page}.html"
    assert html.exists(), f"{page} was not built"
    browser.get(html.as_uri())
    # wait for MathJax (if any) to typeset
    browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const t0 = Date.now();
        (function wait() {
          const mj = window.MathJax;
          if (mj && mj.startup && mj.startup.promise) { mj.startup.promise.then(() => done(true)); }
          else if (Date.now() - t0 > 5000) { done(false); }
          else { setTimeout(wait, 100); }
        })();""")
    titles = browser.execute_script(
        "return Array.from(document.querySelectorAll('h1')).filter(h => h.offsetParent !== null)"
        ".map(h => h.textContent.replace('#', '').trim());")
    assert titles and titles[0], f"{page}: no visible title"
    assert titles[0].lower() in browser.title.lower()
    body = browser.find_element("css selector", "main, article").text
    assert "Traceback" not in body and "Error" not in body.split("\n")[0]
    source = ROOT / f"{page}.ipynb"
    if source.exists():
        images = browser.execute_script(
            "return Array.from(document.querySelectorAll('main img, article img'))"
            ".map(i => [i.getAttribute('src'), i.complete, i.naturalWidth, i.naturalHeight]);")
        figures = [i for i in images if "_images/" in (i[0] or "")]  # not the theme's logos
        assert figures, f"{page}: a chapter without a figure"
        broken = [i for i in figures if not (i[1] and i[2] > 0 and i[3] > 0)]
        assert not broken, f"{page}: images that did not load: {broken}"
    if _has_maths(source if source.exists() else ROOT / f"{page}.md"):
        n = browser.execute_script("return document.querySelectorAll('mjx-container').length;")
        assert n > 0, f"{page}: maths in the source but none rendered by MathJax"
