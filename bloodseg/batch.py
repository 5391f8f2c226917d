"""Batch runs of a :class:`~bloodseg.segmenter.Segmenter` over many files (``predict_files``, ``count_files``).

Batch runs stream: one image is read, predicted, written and dropped before the next (only
the small per-image rows are kept). An image that cannot be read or predicted (a
BloodsegError: empty, truncated, not an image, ...) is reported on stderr and skipped; its
row is ``{"image": path, "error": reason}``. An output that cannot be written (disk full)
stops the run: every later image would fail the same way. ``skip_existing=True`` keeps an
image whose outputs are all there and decode (its row gets ``"skipped": True``), so an
interrupted run continues where it stopped. ``progress`` (None: when stderr is a terminal)
shows a tqdm bar with images/s on stderr.
"""
from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

from .classes import overlay
from .errors import BloodsegError
from .instances import _check_pixel_size, _decodes, instance_paths, instances, write_instances, write_probabilities
from .io import _writable_dir, check_output_names, expand_inputs, read_image, read_mask, write_image


def _outputs(f: Path, out_dir, overlays: bool, instances_dir, save_probabilities: bool) -> list[Path]:
    out = []
    if out_dir is not None:
        out += [out_dir / f"{f.stem}.png"] + ([out_dir / f"{f.stem}_overlay.png"] if overlays else [])
    if instances_dir is not None:
        out += list(instance_paths(instances_dir, f.stem))
    if save_probabilities:
        out.append((out_dir if out_dir is not None else instances_dir) / f"{f.stem}_probs.npz")
    return out

def _existing_mask(f: Path, outputs: list[Path], has_mask: bool):
    """The saved mask of ``f`` when every output is there and decodes, else None."""
    try:
        if not all(p.is_file() for p in outputs):
            return None
        for p in outputs[1:] if has_mask else outputs:
            if p.name.endswith("_overlay.png"):
                read_image(p)
            elif not _decodes(p):
                return None
        return read_mask(outputs[0]) if has_mask else True
    except BloodsegError:
        return None

def run_batch(seg, paths, out_dir, overlays, postprocess, skip_existing, progress, instances_dir,
              pixel_size_um, save_probabilities, row_of, what: str) -> list[dict]:
    """The loop behind ``predict_files`` / ``count_files`` of ``seg`` (a Segmenter); ``row_of(f,
    mask, outputs)`` makes an image's row."""
    files = expand_inputs(paths)
    _check_pixel_size(pixel_size_um)
    if out_dir is not None:
        out_dir = _writable_dir(out_dir)
        check_output_names(files, out_dir, ("", "_overlay") if overlays else ("",))
    if instances_dir is not None:
        instances_dir = _writable_dir(instances_dir)
        check_output_names(files, instances_dir, ("_instances",))
    if save_probabilities and out_dir is None and instances_dir is None:
        raise BloodsegError("save_probabilities needs an output folder (the masks' or the instances' folder)")
    if skip_existing and out_dir is None and instances_dir is None:
        raise BloodsegError("skip_existing needs outputs to look for: give a masks or instances folder")
    need_probs = instances_dir is not None or save_probabilities
    show = sys.stderr.isatty() if progress is None else bool(progress)
    bar = tqdm(files, desc=what, unit="image", file=sys.stderr, disable=not show, dynamic_ncols=True)
    rows = []
    for f in bar:
        outputs = _outputs(f, out_dir, overlays, instances_dir, save_probabilities)
        if skip_existing:
            mask = _existing_mask(f, outputs, out_dir is not None)
            if mask is not None:
                rows.append({**row_of(f, mask if out_dir is not None else None, outputs), "skipped": True})
                continue
        try:
            image = read_image(f)
            mask, probs, factor = seg._mask_and_probs(image, postprocess, need_probs)
            cells = instances(mask, probs, pixel_size_um) if instances_dir is not None else None
        except BloodsegError as exc:
            reason = str(exc)
            rows.append({"image": str(f), "error": reason})
            tqdm.write(f"skipped {f.name}: {reason}", file=sys.stderr)
            continue
        if out_dir is not None:
            write_image(out_dir / f"{f.stem}.png", mask)
            if overlays:
                write_image(out_dir / f"{f.stem}_overlay.png", overlay(image, mask))
        if cells is not None:
            write_instances(*cells, instances_dir, f.stem)
        if save_probabilities:
            write_probabilities(outputs[-1], probs)
        row = {**row_of(f, mask, outputs), "scale": factor}
        if cells is not None:
            row["n_cells"] = len(cells[1])
        rows.append(row)
        del image, mask, probs, cells
    bar.close()
    return rows
