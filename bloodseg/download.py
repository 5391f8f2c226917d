"""Download the full BCCD dataset (367 smears, white-cell masks, VOC boxes, splits), checksummed.

:func:`download_bccd` fills a folder with exactly the layout of ``data/bccd`` (see
:func:`bloodseg.prepare_bccd`) and checks every file against the SHA-256 in
``bloodseg/data/bccd_registry.txt`` (pooch registry format, one ``path sha256:HEX`` a line;
:func:`write_registry` regenerates it from a verified copy).

Where the files come from. Unless a mirror is given, each file is fetched from its original public
repository at a pinned commit (every byte checked identical: git blob hashes at those commits):

* ``images/BloodImage_NNNNN.jpg``   <- Banik et al., ``wbc_nucleus_seg_localz/Datasets/Input/BCCD/``
  (the re-encoded BCCD copy shipped with the masks; only 9 are byte-identical to Shenggan's JPEGs)
* ``wbc_masks/BloodImage_Mask_NNNNN.png`` <- Banik et al., ``.../Datasets/Ground Truth/BCCD/``
* ``wbc_labels.csv``                <- Banik et al., ``.../Datasets/Input/BCCD/labels.csv``
* ``LICENSE-wbc-masks.txt``         <- Banik et al., ``LICENSE`` (MIT, 2020)
* ``annotations/BloodImage_NNNNN.xml`` <- Shenggan/BCCD_Dataset, ``BCCD/Annotations/``
* ``splits/{train,val,test,trainval}.txt`` <- Shenggan/BCCD_Dataset, ``BCCD/ImageSets/Main/``
* ``LICENSE-bccd.txt``              <- Shenggan/BCCD_Dataset, ``LICENSE`` (MIT, 2017)
* ``README.md``                     -- this project's provenance note; no upstream, so it comes only
  from a mirror and is skipped otherwise (nothing reads it).

A mirror (``mirror=`` or ``$BLOODSEG_BCCD_MIRROR``) is an ``http(s)://`` base URL, a ``file://``
URL or a local folder holding the ``data/bccd`` layout, e.g. a copy of ``data/bccd`` itself.
Nothing is downloaded at import time.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Iterable
from urllib.parse import unquote, urlparse

from .errors import DataError

__all__ = ["download_bccd", "read_registry", "write_registry", "upstream_url", "REGISTRY",
           "BCCD_UPSTREAM", "BANIK_UPSTREAM", "MIRROR_ENV"]

#: The packaged checksums of every file of the dataset.
REGISTRY = Path(__file__).parent / "data" / "bccd_registry.txt"
#: Environment variable that replaces the upstream repositories with a mirror.
MIRROR_ENV = "BLOODSEG_BCCD_MIRROR"
#: github.com/Shenggan/BCCD_Dataset (MIT) at its newest commit d272fb1 (2019-11-21).
BCCD_UPSTREAM = ("https://raw.githubusercontent.com/Shenggan/BCCD_Dataset/"
                 "d272fb14cdff6e473fafeeeba32aba5f560e9e43/")
#: github.com/ParthaPratimBanik/An-Automatic-Nucleus-Segmentation-and-CNN-Model-based-Classification-
#: Method-of-White-Blood-Cell (MIT), the masks of Banik et al. 2020, at its newest commit d8ee339 (2023-07-02).
BANIK_UPSTREAM = ("https://raw.githubusercontent.com/ParthaPratimBanik/An-Automatic-Nucleus-Segmentation-and-"
                  "CNN-Model-based-Classification-Method-of-White-Blood-Cell/"
                  "d8ee339ad22dc30d3acdc2d653ab5768eae10ab3/")
_BANIK_BCCD = BANIK_UPSTREAM + "wbc_nucleus_seg_localz/Datasets/"
# Local name (a folder ends in "/") -> upstream URL (prefix); see the module docstring.
_UPSTREAM = {
    "images/": _BANIK_BCCD + "Input/BCCD/",
    "wbc_masks/": _BANIK_BCCD + "Ground%20Truth/BCCD/",
    "wbc_labels.csv": _BANIK_BCCD + "Input/BCCD/labels.csv",
    "LICENSE-wbc-masks.txt": BANIK_UPSTREAM + "LICENSE",
    "annotations/": BCCD_UPSTREAM + "BCCD/Annotations/",
    "splits/": BCCD_UPSTREAM + "BCCD/ImageSets/Main/",
    "LICENSE-bccd.txt": BCCD_UPSTREAM + "LICENSE",
}


def upstream_url(name: str) -> str | None:
    """The pinned upstream URL of the dataset file ``name`` (e.g. ``images/BloodImage_00001.jpg``),
    or None for a file that exists only in the re-packaged copy (``README.md``)."""
    for local, url in _UPSTREAM.items():
        if name == local or (local.endswith("/") and name.startswith(local)):
            return url + name[len(local):]
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_registry(src, out=REGISTRY) -> int:
    """Write the registry of every file under ``src`` (sorted ``relative/path sha256:HEX`` lines)
    to ``out``; return the number of files. Run it on a copy that was checked by hand."""
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"folder not found: {src.absolute()}; give the verified BCCD copy (data/bccd)")
    files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*")
                   if p.is_file() and not p.name.startswith("."))
    Path(out).write_text("".join(f"{name} sha256:{_sha256(src / name)}\n" for name in files))
    return len(files)


def read_registry(path=REGISTRY) -> dict[str, str]:
    """``{relative path: sha256 hex}`` from a registry file."""
    entries = {}
    for line in Path(path).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, digest = line.split()
            entries[name] = digest.removeprefix("sha256:")
    return entries


def _source(name: str, mirror: str | None) -> str | Path | None:
    """Where ``name`` comes from: a URL, a local Path, or None (no upstream and no mirror)."""
    if mirror is None:
        return upstream_url(name)
    if mirror.startswith(("http://", "https://")):
        return mirror.rstrip("/") + "/" + name
    folder = Path(unquote(urlparse(mirror).path)) if mirror.startswith("file://") else Path(mirror)
    return folder / name


def _fetch(name: str, expected: str, out: Path, source: str | Path) -> bool:
    """Make ``out/name`` a verified copy of ``source``; return False when it already was one."""
    dest = out / name
    if dest.is_file() and _sha256(dest) == expected:
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    os.close(fd)
    try:
        if isinstance(source, Path):
            if not source.is_file():
                raise DataError(f"{source} not found in the local mirror; check the --mirror folder "
                                "(it needs the layout of data/bccd: images/, wbc_masks/, ...)")
            shutil.copyfile(source, tmp)
        else:
            import pooch  # imported here: only a download needs pooch and requests
            import requests
            try:
                pooch.HTTPDownloader(timeout=60)(source, tmp, None)
            except requests.RequestException as err:
                raise DataError(f"could not download {source} ({type(err).__name__}: {err}); check the "
                                f"network, or give another copy with --mirror URL|FOLDER "
                                f"(or ${MIRROR_ENV})") from None
        actual = _sha256(Path(tmp))
        if actual != expected:
            raise DataError(f"{name} from {source} does not match its checksum: expected sha256 {expected}, "
                            f"got {actual}; the file was not kept. The mirror holds a different or damaged "
                            "copy: check it, or use another with --mirror")
        os.replace(tmp, dest)
        return True
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def download_bccd(out, mirror: str | os.PathLike | None = None, progress: bool = False, workers: int = 8,
                  files: Iterable[str] | None = None) -> Path:
    """Download the full BCCD dataset into ``out`` (the ``data/bccd`` layout) and return ``out``.

    ``mirror``: an ``http(s)://`` base URL, a ``file://`` URL or a local folder with the
    ``data/bccd`` layout; default ``$BLOODSEG_BCCD_MIRROR``, else the two pinned upstream
    repositories (module docstring). Every file is checked against its SHA-256 in the registry: a
    file already in ``out`` with the right hash is kept (so an interrupted run resumes), a damaged
    or partial one is fetched again, and a download with the wrong hash is refused
    (:class:`~bloodseg.errors.DataError`; nothing is left behind). Each file is written to a
    temporary name and renamed, so ``out`` never holds a half-written file under a real name.
    ``workers`` files are fetched at a time; ``progress`` shows a bar; ``files`` restricts the
    download to some names of the registry (tests, or a partial copy).
    """
    out = Path(out)
    registry = read_registry()
    names = sorted(registry) if files is None else list(files)
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise DataError(f"not files of the BCCD dataset: {', '.join(unknown[:5])}; see {REGISTRY}")
    mirror = os.fspath(mirror) if mirror else os.environ.get(MIRROR_ENV) or None
    jobs = {name: _source(name, mirror) for name in names}
    jobs = {name: src for name, src in jobs.items() if src is not None}   # README.md without a mirror
    out.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm
    with ThreadPoolExecutor(max(1, workers)) as pool, \
            tqdm(total=len(jobs), unit="file", disable=not progress, desc="BCCD") as bar:
        futures = [pool.submit(_fetch, name, registry[name], out, src) for name, src in jobs.items()]
        try:
            for future in as_completed(futures):
                future.result()
                bar.update()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return out
