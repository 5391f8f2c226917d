"""bloodseg.download: the checksummed BCCD downloader, against a local HTTP server on 127.0.0.1.

The served files are a small subset of the dataset taken from the vendored sample
(bloodseg/data/bccd_sample: its images, masks, boxes and licences are byte-identical to the full
copy), so these tests need no network and no full copy. The registry test and the full-size run
use the full copy ($BLOODSEG_BCCD, else ../shared/data/bccd next to the repository) and are skipped
without it.
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import socket
import threading
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bloodseg import download
from bloodseg.download import (BANIK_UPSTREAM, BCCD_UPSTREAM, MIRROR_ENV, REGISTRY, download_bccd, read_registry,
                               upstream_url, write_registry)
from bloodseg.errors import DataError

SUBSET = ["LICENSE-bccd.txt", "LICENSE-wbc-masks.txt",
          "annotations/BloodImage_00001.xml", "annotations/BloodImage_00003.xml",
          "images/BloodImage_00001.jpg", "images/BloodImage_00003.jpg",
          "wbc_masks/BloodImage_Mask_00001.png", "wbc_masks/BloodImage_Mask_00003.png"]
SAMPLE = REGISTRY.parent / "bccd_sample"     # the vendored sample, next to the registry
FULL = Path(os.environ.get("BLOODSEG_BCCD", Path(__file__).parents[2] / "shared" / "data" / "bccd"))
needs_full = pytest.mark.skipif(not (FULL / "images").is_dir(),
                                reason=f"the full BCCD copy is not here ({FULL}; set $BLOODSEG_BCCD)")


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def leftovers(out: Path) -> list[Path]:
    """Temporary files a download may have left behind."""
    return [p for p in out.rglob("*") if p.name.endswith(".part")]


@pytest.fixture(autouse=True)
def no_mirror_env(monkeypatch):
    monkeypatch.delenv(MIRROR_ENV, raising=False)


@pytest.fixture
def mirror(tmp_path):
    """A copy of the SUBSET in the data/bccd layout."""
    root = tmp_path / "mirror"
    for name in SUBSET:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SAMPLE / name, root / name)
    return root


@pytest.fixture
def serve():
    """``serve(folder) -> (base URL, requested paths)``: a threaded HTTP server on 127.0.0.1."""
    servers = []

    def start(folder):
        requested = []

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self):
                requested.append(self.path.lstrip("/"))
                super().do_GET()

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}", requested

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_registry_lines_and_upstream_urls():
    registry = read_registry()
    lines = REGISTRY.read_text().splitlines()
    assert lines == sorted(lines) and len(lines) == len(registry) == 1106
    assert all(len(h) == 64 and set(h) <= set("0123456789abcdef") for h in registry.values())
    kinds = Counter(name.split("/")[0] for name in registry)
    assert (kinds["images"], kinds["wbc_masks"], kinds["annotations"], kinds["splits"]) == (367, 367, 364, 4)
    # every file but the re-packaging note has a pinned upstream URL in one of the two repositories
    assert upstream_url("README.md") is None
    assert upstream_url("wbc_masks/BloodImage_Mask_00001.png") == (
        BANIK_UPSTREAM + "wbc_nucleus_seg_localz/Datasets/Ground%20Truth/BCCD/BloodImage_Mask_00001.png")
    assert upstream_url("splits/val.txt") == BCCD_UPSTREAM + "BCCD/ImageSets/Main/val.txt"
    for name in registry:
        if name != "README.md":
            assert upstream_url(name).startswith((BANIK_UPSTREAM, BCCD_UPSTREAM)), name


@needs_full
def test_registry_lists_every_file_of_the_full_copy():
    on_disk = {p.relative_to(FULL).as_posix(): sha256(p) for p in FULL.rglob("*") if p.is_file()}
    assert read_registry() == on_disk


def test_write_registry_round_trip(tmp_path):
    src = tmp_path / "src"
    (src / "b").mkdir(parents=True)
    (src / "b" / "x.txt").write_bytes(b"x")
    (src / "a.txt").write_bytes(b"")
    out = tmp_path / "registry.txt"
    assert write_registry(src, out) == 2
    assert out.read_text() == (f"a.txt sha256:{hashlib.sha256(b'').hexdigest()}\n"
                               f"b/x.txt sha256:{hashlib.sha256(b'x').hexdigest()}\n")
    assert read_registry(out) == {"a.txt": hashlib.sha256(b"").hexdigest(), "b/x.txt": hashlib.sha256(b"x").hexdigest()}


def test_download_over_http_verifies_every_file(mirror, serve, tmp_path):
    url, requested = serve(mirror)
    out = tmp_path / "out"
    assert download_bccd(out, mirror=url, files=SUBSET) == out
    registry = read_registry()
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == SUBSET
    assert all(sha256(out / name) == registry[name] for name in SUBSET)
    assert sorted(requested) == SUBSET


def test_second_run_fetches_nothing(mirror, serve, tmp_path):
    url, requested = serve(mirror)
    download_bccd(tmp_path / "out", mirror=url, files=SUBSET, workers=1)
    assert len(requested) == len(SUBSET)
    download_bccd(tmp_path / "out", mirror=url, files=SUBSET, workers=1)
    assert len(requested) == len(SUBSET)


def test_partial_file_is_fetched_again(mirror, serve, tmp_path):
    out = tmp_path / "out"
    partial, complete = "images/BloodImage_00003.jpg", "images/BloodImage_00001.jpg"
    (out / "images").mkdir(parents=True)
    (out / partial).write_bytes((mirror / partial).read_bytes()[:1000])     # an interrupted download
    shutil.copyfile(mirror / complete, out / complete)                        # a finished one
    url, requested = serve(mirror)
    download_bccd(out, mirror=url, files=[partial, complete])
    assert requested == [partial]
    assert (out / partial).read_bytes() == (mirror / partial).read_bytes()


def test_corrupt_mirror_is_refused(mirror, serve, tmp_path):
    bad = "wbc_masks/BloodImage_Mask_00003.png"
    data = bytearray((mirror / bad).read_bytes())
    data[len(data) // 2] ^= 0x01
    (mirror / bad).write_bytes(bytes(data))
    url, _ = serve(mirror)
    out = tmp_path / "out"
    with pytest.raises(DataError) as err:
        download_bccd(out, mirror=url, files=SUBSET)
    message = str(err.value)
    assert bad in message and read_registry()[bad] in message and sha256(mirror / bad) in message
    assert "mirror" in message
    assert not (out / bad).exists() and leftovers(out) == []


@pytest.mark.parametrize("form", ["folder", "path", "file-url", "env"])
def test_local_folder_mirror(mirror, tmp_path, monkeypatch, form):
    source = {"folder": str(mirror), "path": mirror, "file-url": mirror.as_uri(), "env": None}[form]
    if form == "env":
        monkeypatch.setenv(MIRROR_ENV, str(mirror))
    out = download_bccd(tmp_path / "out", mirror=source, files=SUBSET)
    assert all((out / name).read_bytes() == (mirror / name).read_bytes() for name in SUBSET)
    assert leftovers(out) == []


def test_env_mirror_url_is_used(mirror, serve, tmp_path, monkeypatch):
    url, requested = serve(mirror)
    monkeypatch.setenv(MIRROR_ENV, url)
    download_bccd(tmp_path / "out", files=SUBSET[:2])
    assert sorted(requested) == SUBSET[:2]


def test_without_mirror_files_come_from_upstream(serve, tmp_path, monkeypatch):
    """The default source: each file from its upstream path (here served locally); README.md,
    which exists only in the re-packaged copy, is skipped."""
    upstream = tmp_path / "upstream"
    (upstream / "Input" / "BCCD").mkdir(parents=True)
    shutil.copyfile(SAMPLE / "images/BloodImage_00001.jpg", upstream / "Input/BCCD/BloodImage_00001.jpg")
    shutil.copyfile(SAMPLE / "LICENSE-bccd.txt", upstream / "LICENSE")
    url, requested = serve(upstream)
    monkeypatch.setattr(download, "_UPSTREAM", {"images/": f"{url}/Input/BCCD/", "LICENSE-bccd.txt": f"{url}/LICENSE"})
    out = download_bccd(tmp_path / "out", files=["LICENSE-bccd.txt", "README.md", "images/BloodImage_00001.jpg"])
    assert sorted(requested) == ["Input/BCCD/BloodImage_00001.jpg", "LICENSE"]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "LICENSE-bccd.txt", "images", "images/BloodImage_00001.jpg"]


def test_unreachable_mirror_is_a_data_error(tmp_path):
    with socket.socket() as s:                         # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(DataError, match="--mirror") as err:
        download_bccd(tmp_path / "out", mirror=url, files=SUBSET[:1])
    assert f"{url}/{SUBSET[0]}" in str(err.value)
    assert leftovers(tmp_path / "out") == []


def test_missing_file_on_mirror_is_a_data_error(serve, tmp_path):
    url, _ = serve(tmp_path)                           # serves an empty folder: 404
    with pytest.raises(DataError, match=f"{url}/images/BloodImage_00001.jpg.*--mirror"):
        download_bccd(tmp_path / "out", mirror=url, files=["images/BloodImage_00001.jpg"])
    with pytest.raises(DataError, match="not found in the local mirror"):
        download_bccd(tmp_path / "out", mirror=str(tmp_path / "nowhere"), files=SUBSET[:1])


def test_unknown_file_is_refused(tmp_path):
    with pytest.raises(DataError, match="not files of the BCCD dataset: images/nope.jpg"):
        download_bccd(tmp_path / "out", mirror=str(tmp_path), files=["images/nope.jpg"])


@needs_full
def test_full_download_reproduces_the_copy(serve, tmp_path):
    url, requested = serve(FULL)
    out = download_bccd(tmp_path / "bccd", mirror=url)
    assert len(requested) == 1106
    copied = {p.relative_to(out).as_posix(): sha256(p) for p in out.rglob("*") if p.is_file()}
    assert copied == {p.relative_to(FULL).as_posix(): sha256(p) for p in FULL.rglob("*") if p.is_file()}
