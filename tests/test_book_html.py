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


# ----------------------------------------------------------------------------- the book as a course

NOTEBOOK_PAGES = [p for p in toc_files() if (ROOT / f"{p}.ipynb").exists()]
CHAPTER_NUMBERS = {int(m.group(1)) for p in NOTEBOOK_PAGES if (m := re.match(r"book/(\d+)_", p))}


def _wait_for_page(browser, html: Path) -> None:
    browser.get(html.as_uri())
    browser.execute_script("return document.readyState")


@pytest.mark.parametrize("page", NOTEBOOK_PAGES)
def test_chapter_has_exercises_with_collapsed_solutions(built_book, browser, page):
    _wait_for_page(browser, built_book / f"{page}.html")
    headings = browser.execute_script(
        "return Array.from(document.querySelectorAll('main h2, article h2'))"
        ".map(h => h.textContent.replace('#', '').trim());")
    assert "Exercises" in headings, f"{page}: no Exercises section ({headings})"
    # exercises come last: no h2 after them
    assert headings[-1] == "Exercises", f"{page}: the Exercises section is not the last one"
    dropdowns = browser.execute_script("""
        const sec = document.querySelector('section#exercises');
        if (!sec) return null;
        return Array.from(sec.querySelectorAll('details')).map(d => {
            const summary = d.querySelector('summary');
            const body = d.querySelector('.sd-summary-content') || d.lastElementChild;
            // a closed <details> keeps its body laid out but not rendered: ask what is visible
            return [d.open, summary.textContent.trim(), body !== summary && body.checkVisibility(),
                    d.getBoundingClientRect().height - summary.getBoundingClientRect().height];
        });""")
    assert dropdowns, f"{page}: no hint or solution dropdown in the exercises"
    for is_open, title, body_visible, extra_height in dropdowns:
        assert not is_open, f"{page}: dropdown '{title}' is open on load"
        assert not body_visible and extra_height < 5, f"{page}: the body of dropdown '{title}' is visible on load"
        assert title in ("Solution", "Hint"), title


@pytest.mark.parametrize("page", NOTEBOOK_PAGES)
def test_hidden_input_cells_have_a_toggle(built_book, browser, page):
    _wait_for_page(browser, built_book / f"{page}.html")
    cells = browser.execute_script("""
        return Array.from(document.querySelectorAll('.cell.tag_hide-input')).map(c => {
            const d = c.querySelector('details');
            const src = c.querySelector('.cell_input');
            return [d ? d.open : null, d ? d.querySelector('summary').textContent.trim() : '',
                    src ? src.checkVisibility() : null];
        });""")
    assert cells, f"{page}: the hidden install cell is missing"
    for is_open, summary, input_visible in cells:
        assert is_open is False, f"{page}: a hide-input cell has no closed toggle"
        assert "show" in summary.lower(), f"{page}: toggle text {summary!r}"
        assert input_visible is False, f"{page}: hidden input is visible on load"


@pytest.mark.parametrize("page", toc_files())
def test_no_page_refers_to_a_missing_chapter(built_book, browser, page):
    _wait_for_page(browser, built_book / f"{page}.html")
    text = browser.find_element("css selector", "main, article").text
    for m in re.finditer(r"\b[Cc]hapters? (\d+)((?:,? (?:and |or )?\d+)*)", text):
        numbers = [int(n) for n in re.findall(r"\d+", m.group(0))]
        missing = [n for n in numbers if n not in CHAPTER_NUMBERS]
        assert not missing, f"{page}: '{m.group(0)}' refers to a chapter that does not exist"
    assert not re.search(r"(?:\bthe |\ba |\()chapter on \w+", text, re.I), f"{page}: refers to a chapter by topic"
    links = browser.execute_script(
        "return Array.from(document.querySelectorAll('main a[href], article a[href]'))"
        ".map(a => a.getAttribute('href'));")
    for href in links:
        if re.match(r"^[a-z]+:", href) or href.startswith("#"):
            continue
        target = (built_book / page).parent / href.split("#")[0]
        assert target.exists(), f"{page}: broken link {href}"


# ----------------------------------------------------------------------------- install cell (no browser)

def _repository_url() -> str:
    return yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]


def _first_code_cell(page: str) -> dict:
    import nbformat
    nb = nbformat.read(ROOT / f"{page}.ipynb", as_version=4)
    return next(c for c in nb.cells if c.cell_type == "code")


def _install_url(source: str) -> str:
    m = re.search(r'^BLOODSEG_REPOSITORY = "([^"]+)"$', source, re.M)
    assert m, "the install cell does not set BLOODSEG_REPOSITORY"
    return m.group(1)


@pytest.mark.parametrize("page", NOTEBOOK_PAGES)
def test_first_code_cell_is_the_install_cell(page):
    cell = _first_code_cell(page)
    src = cell.source
    assert _install_url(src) == _repository_url(), "install URL differs from _config.yml repository.url"
    assert 'f"bloodseg @ git+{BLOODSEG_REPOSITORY}"' in src
    assert "hide-input" in cell.metadata.get("tags", []), "the install cell is not tagged hide-input"
    assert "NBVAL_CHECK_OUTPUT" not in src, "the install cell's output depends on the machine"
    assert "profile_name()" in src and "cuda" in src, "the install cell must print profile and device"
    # pip runs only in the `except ImportError` branch
    import ast
    tree = ast.parse(src)
    tries = [n for n in ast.walk(tree) if isinstance(n, ast.Try)]
    assert len(tries) == 1 and len(tries[0].handlers) == 1
    handler = tries[0].handlers[0]
    assert isinstance(handler.type, ast.Name) and handler.type.id == "ImportError"
    pip_calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and "pip" in ast.unparse(n)]
    in_handler = [n for n in ast.walk(handler) if isinstance(n, ast.Call) and "pip" in ast.unparse(n)]
    assert pip_calls and pip_calls == in_handler, "pip is called outside the ImportError branch"
    # every chapter carries the same install cell
    assert src == _first_code_cell(NOTEBOOK_PAGES[0]).source


def test_install_cell_is_a_no_op_when_bloodseg_is_importable(monkeypatch, capsys):
    import subprocess as sp
    calls = []
    monkeypatch.setattr(sp, "check_call", lambda *a, **k: calls.append(a))
    monkeypatch.setenv("BLOODSEG_PROFILE", "smoke")
    exec(compile(_first_code_cell(NOTEBOOK_PAGES[0]).source, "install-cell", "exec"), {})
    assert calls == [], "the install cell ran pip although bloodseg is importable"
    out = capsys.readouterr().out
    assert "profile smoke (from BLOODSEG_PROFILE)" in out and "device c" in out, out


def test_install_cell_installs_from_the_repository_when_bloodseg_is_missing(monkeypatch, capsys):
    import subprocess as sp
    real = sys.modules["bloodseg"] if "bloodseg" in sys.modules else __import__("bloodseg")
    calls = []

    def fake_pip(cmd, *a, **k):     # "install" = make the real package importable again
        calls.append(cmd)
        monkeypatch.setitem(sys.modules, "bloodseg", real)
        return 0

    monkeypatch.setitem(sys.modules, "bloodseg", None)       # import bloodseg -> ImportError
    monkeypatch.setattr(sp, "check_call", fake_pip)
    monkeypatch.delenv("BLOODSEG_PROFILE", raising=False)
    exec(compile(_first_code_cell(NOTEBOOK_PAGES[0]).source, "install-cell", "exec"), {})
    assert len(calls) == 1
    cmd = calls[0]
    assert cmd[:4] == [sys.executable, "-m", "pip", "install"]
    assert cmd[-1] == f"bloodseg @ git+{_repository_url()}"
    assert "profile " in capsys.readouterr().out


def test_binder_environment_matches_requirements():
    def pins(path):
        return [ln.strip() for ln in path.read_text().splitlines()
                if ln.strip() and not ln.lstrip().startswith(("#", "-", "."))]
    binder = ROOT / "binder" / "requirements.txt"
    assert pins(binder) == pins(ROOT / "requirements.txt"), "binder/requirements.txt lost a pin"
    lines = [ln.strip() for ln in binder.read_text().splitlines()]
    assert "." in lines or "-e ." in lines, "binder does not install the package itself"
    assert not any(ln.startswith("-r") for ln in lines), "'-r ../requirements.txt' does not work on Binder"
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["html"]["use_download_button"], "keep the .ipynb download button"
    assert config["launch_buttons"]["binderhub_url"]


def test_no_page_shows_a_widget_that_needs_a_kernel(built_book):
    """A built page has no kernel: an explorer's controls would be dead there. Their cells carry
    ``remove-output`` and a static figure of the same settings stands beside them."""
    for page in NOTEBOOK_PAGES:
        html = (built_book / f"{page}.html").read_text()
        assert "application/vnd.jupyter.widget-view+json" not in html, \
            f"{page}: widget controls on the built page (tag the cell remove-output, show a static figure)"
