// The white-cell cleanup and the cell count, as the Python package does them:
//
//   cleanWhiteCells   <-> bloodseg.postprocess.clean_white_cells (and min_area_at)
//   countCells        <-> bloodseg.count.count_cells, with estimate_red_radius, split_touching
//                         (_h_maxima, _reconstruct, _flood, fill_small_holes) and
//                         label_white_cells / _keep_mostly_visible
//   instances         <-> bloodseg.instances.instances (the rows of `bloodseg count --instances`)
//
// A mask is a Uint8Array (row-major, width x height) of class ids: 0 background, 1 white cell,
// 2 red cell. Class probabilities are a Float32Array of 3 planes (class, row, column).

import { bincount, edt, fillHoles, label, median, pyRound, reconstruct, roundHalfEven, touchesBorder }
  from './morphology.js';

export const BACKGROUND = 0, WHITE_CELL = 1, RED_CELL = 2;

/** bloodseg.postprocess.min_area_at: the cleanup's area for a network run at `factor` (the spec
 *  records the scale its area was chosen at; areas scale with the square of the ratio). */
export function minAreaAt(spec, factor) {
  const area = Number(spec.white_min_area);
  return spec.input_scale == null ? area : area * (Number(spec.input_scale) / factor) ** 2;
}

/** bloodseg.postprocess.clean_white_cells(mask, probs, minArea, fillHoles): white components
 *  (8-connected) smaller than minArea take the most probable other class; then pixels enclosed by
 *  a white cell become white. Returns a new mask. */
export function cleanWhiteCells(mask, probs, width, height, minArea, fill) {
  const N = width * height;
  const out = Uint8Array.from(mask);
  let white = new Uint8Array(N);
  let any = false;
  for (let i = 0; i < N; i++) if (mask[i] === WHITE_CELL) { white[i] = 1; any = true; }
  if (minArea > 0 && any) {
    const { labels, n } = label(white, width, height, true);
    const sizes = bincount(labels, n);
    let changed = false;
    for (let i = 0; i < N; i++) {
      if (white[i] && sizes[labels[i]] < minArea) {
        // argmax over the classes with white set to -inf: background wins ties (numpy's argmax)
        out[i] = probs[RED_CELL * N + i] > probs[BACKGROUND * N + i] ? RED_CELL : BACKGROUND;
        changed = true;
      }
    }
    if (changed) {
      any = false;
      for (let i = 0; i < N; i++) { white[i] = out[i] === WHITE_CELL ? 1 : 0; if (white[i]) any = true; }
    }
  }
  if (fill && any) {
    const filled = fillHoles(white, width, height);
    for (let i = 0; i < N; i++) if (filled[i] && !white[i]) out[i] = WHITE_CELL;
  }
  return out;
}

/** bloodseg.postprocess.keep_crop_cell(mask): on a crop, the white components (8-connected) that
 *  touch the border become background, except the crop's own cell: the white component nearest the
 *  centre (the least squared distance, in half pixels, from the centre to any of its pixels; on a tie
 *  the larger, then the first in raster order). Returns a new mask. */
export function keepCropCell(mask, width, height) {
  const N = width * height;
  const out = Uint8Array.from(mask);
  const white = new Uint8Array(N);
  for (let i = 0; i < N; i++) white[i] = mask[i] === WHITE_CELL ? 1 : 0;
  const { labels, n } = label(white, width, height, true);
  if (n < 2) return out;
  const near = new Float64Array(n + 1).fill(Infinity);
  for (let y = 0; y < height; y++) {
    const dy = 2 * y - (height - 1);
    for (let x = 0; x < width; x++) {
      const k = labels[y * width + x];
      if (!k) continue;
      const dx = 2 * x - (width - 1), d2 = dy * dy + dx * dx;
      if (d2 < near[k]) near[k] = d2;
    }
  }
  const sizes = bincount(labels, n);
  let own = 1;
  for (let k = 2; k <= n; k++) {
    if (near[k] < near[own] || (near[k] === near[own] && sizes[k] > sizes[own])) own = k;
  }
  const cut = touchesBorder(labels, width, height, n);
  cut[own] = 0;
  for (let i = 0; i < N; i++) if (cut[labels[i]]) out[i] = BACKGROUND;
  return out;
}

/** bloodseg.count.estimate_red_radius: the median over red regions (holes filled, 8-connected) of
 *  their largest distance to the outline, regions under 3 px left out. */
export function estimateRedRadius(red, width, height) {
  const fallback = Math.max(Math.min(width, height) / 20.0, 2.0);
  if (!red.some((v) => v)) return fallback;
  const filled = fillHoles(red, width, height);
  const { labels, n } = label(filled, width, height, true);
  if (n === 0) return fallback;
  const dist = edt(filled, width, height);
  const peaks = new Float64Array(n + 1);
  for (let i = 0; i < labels.length; i++) if (labels[i] && dist[i] > peaks[labels[i]]) peaks[labels[i]] = dist[i];
  const kept = [];
  for (let k = 1; k <= n; k++) if (peaks[k] >= 3.0) kept.push(peaks[k]);
  return kept.length ? median(kept) : fallback;
}

/** bloodseg.postprocess.fill_small_holes: holes (4-connected) up to maxArea pixels filled. */
function fillSmallHoles(binary, width, height, maxArea) {
  const filled = fillHoles(binary, width, height);
  const holes = new Uint8Array(binary.length);
  let any = false;
  for (let i = 0; i < holes.length; i++) if (filled[i] && !binary[i]) { holes[i] = 1; any = true; }
  const out = Uint8Array.from(binary, (v) => (v ? 1 : 0));
  if (!any) return out;
  const { labels, n } = label(holes, width, height, false);
  const sizes = bincount(labels, n);
  for (let i = 0; i < out.length; i++) if (labels[i] && sizes[labels[i]] <= maxArea) out[i] = 1;
  return out;
}

/** bloodseg.count._h_maxima: pixels of the regional maxima of `height` (Float32Array) at least
 *  h high. numpy computes height - float32(h) and the comparison in float32; so does this. */
function hMaxima(height, width, h) {
  const h32 = Math.fround(h);
  const marker = new Float32Array(height.length);
  for (let i = 0; i < marker.length; i++) marker[i] = Math.fround(height[i] - h32);
  const rec = reconstruct(marker, height, width, height.length / width);
  const cut = Math.fround(h - 1e-3);
  const out = new Uint8Array(height.length);
  for (let i = 0; i < out.length; i++) out[i] = Math.fround(height[i] - rec[i]) >= cut ? 1 : 0;
  return out;
}

/** bloodseg.count._flood: watershed by flooding from `markers` down `height` inside `allowed`,
 *  levels `step` apart from the top; at each level the labelled regions grow one ring of
 *  8-neighbours at a time (all pixels of a ring at once), a pixel taking the label of its highest
 *  labelled neighbour (the first of them, in numpy's neighbour order, on a tie).
 *
 *  Python tries every waiting pixel at every ring. Here a ring tries only the pixels that can have
 *  gained a labelled neighbour: at the first ring of a level, that level's new pixels (a pixel left
 *  waiting from an earlier level had no labelled neighbour when that level ended, and nothing has
 *  been labelled since); at the next rings, the waiting neighbours of the pixels labelled by the
 *  ring before. Same labels, in time proportional to the pixels instead of pixels x rings. */
function flood(height, markers, allowed, width, hgt, step = 0.5) {
  const W = width + 2, H = hgt + 2;              // padded by one pixel, as np.pad(..., 1)
  const lab = new Int32Array(W * H);
  const h = new Float32Array(W * H).fill(-Infinity);
  let anyMarker = false, top = -Infinity, nTodo = 0;
  for (let y = 0; y < hgt; y++) {
    for (let x = 0; x < width; x++) {
      const i = y * width + x, p = (y + 1) * W + (x + 1);
      lab[p] = markers[i];
      h[p] = height[i];
      if (markers[i]) anyMarker = true;
      if (allowed[i] && height[i] > top) top = height[i];
      if (allowed[i] && !markers[i]) nTodo++;
    }
  }
  if (nTodo === 0 || !anyMarker) return unpad(lab, W, width, hgt);
  // the waiting pixels in increasing flat index (np.flatnonzero), and their level
  // ceil((max - h) / step), computed in float32 as numpy does for a float32 array
  const todo = new Int32Array(nTodo), level = new Int32Array(nTodo);
  let maxLevel = 0;
  for (let y = 0, k = 0; y < hgt; y++) {
    for (let x = 0; x < width; x++) {
      const i = y * width + x;
      if (!allowed[i] || markers[i]) continue;
      const p = (y + 1) * W + (x + 1);
      todo[k] = p;
      level[k] = Math.ceil(Math.fround(Math.fround(top - h[p]) / step));
      if (level[k] > maxLevel) maxLevel = level[k];
      k++;
    }
  }
  // a stable sort by level (np.argsort(kind="stable")): a counting sort
  const start = new Int32Array(maxLevel + 2);
  for (let k = 0; k < nTodo; k++) start[level[k] + 1]++;
  for (let l = 0; l <= maxLevel; l++) start[l + 1] += start[l];
  const order = new Int32Array(nTodo), fill = start.slice();
  for (let k = 0; k < nTodo; k++) order[fill[level[k]]++] = todo[k];
  const offsets = [];
  for (const dy of [-1, 0, 1]) for (const dx of [-1, 0, 1]) if (dy || dx) offsets.push(dy * W + dx);
  const waiting = new Uint8Array(W * H);
  const seen = new Int32Array(W * H);            // the ring that last listed a pixel (no duplicates)
  let ring = 0;
  for (let l = 0; l <= maxLevel; l++) {
    let candidates = order.subarray(start[l], start[l + 1]);
    for (const p of candidates) waiting[p] = 1;
    while (candidates.length) {
      // one ring: every candidate with a labelled neighbour takes the label of its highest one,
      // all of them from the labels as they were before the ring
      const reached = [], labels = [];
      for (const p of candidates) {
        if (!waiting[p]) continue;
        let best = -Infinity, bestLabel = 0;
        for (const o of offsets) {
          const q = lab[p + o];
          if (q > 0 && (bestLabel === 0 || h[p + o] > best)) { best = h[p + o]; bestLabel = q; }
        }
        if (bestLabel) { reached.push(p); labels.push(bestLabel); }
      }
      if (!reached.length) break;
      for (let j = 0; j < reached.length; j++) { lab[reached[j]] = labels[j]; waiting[reached[j]] = 0; }
      ring += 1;
      const next = [];
      for (const p of reached) {
        for (const o of offsets) {
          const q = p + o;
          if (waiting[q] && seen[q] !== ring) { seen[q] = ring; next.push(q); }
        }
      }
      candidates = next;
    }
  }
  return unpad(lab, W, width, hgt);
}

function unpad(lab, W, width, height) {
  const out = new Int32Array(width * height);
  for (let y = 0; y < height; y++) for (let x = 0; x < width; x++) out[y * width + x] = lab[(y + 1) * W + x + 1];
  return out;
}

/** bloodseg.count._keep_mostly_visible: segments under minArea dropped, border segments under
 *  borderShare * typical dropped (typical null: the median interior segment when there are 3 or
 *  more, else fallback); the rest numbered 1..k in order. */
function keepMostlyVisible(labels, width, height, n, minArea, typical, borderShare = 0.5, fallback = null) {
  if (n === 0) return { labels, n: 0 };
  const areas = bincount(labels, n);
  const edge = touchesBorder(labels, width, height, n);
  const keep = new Uint8Array(n + 1);
  for (let k = 1; k <= n; k++) keep[k] = areas[k] >= minArea ? 1 : 0;
  if (typical === null) {
    const interior = [];
    for (let k = 1; k <= n; k++) if (keep[k] && !edge[k]) interior.push(areas[k]);
    typical = interior.length >= 3 ? median(interior) : fallback;
  }
  if (typical !== null) {
    for (let k = 1; k <= n; k++) keep[k] = keep[k] && (!edge[k] || areas[k] >= borderShare * typical) ? 1 : 0;
  }
  const renumber = new Int32Array(n + 1);
  let m = 0;
  for (let k = 1; k <= n; k++) if (keep[k]) renumber[k] = ++m;
  const out = new Int32Array(labels.length);
  for (let i = 0; i < out.length; i++) out[i] = renumber[labels[i]];
  return { labels: out, n: m };
}

/** cv2.dilate(binary, cv2.getStructuringElement(MORPH_ELLIPSE, (s, s))), s = 2 max(round(r), 1) + 1,
 *  as bloodseg.count._disc and split_touching use it. The disc is OpenCV.js's own; the dilation
 *  is done here by stamping the disc around each foreground pixel (the peaks are few), which gives
 *  OpenCV's answer (pixels outside the image add nothing) far faster than a dense dilation. */
function dilateByDisc(cv, binary, width, height, radius) {
  const size = 2 * Math.max(roundHalfEven(radius), 1) + 1;
  const disc = cv.getStructuringElement(cv.MORPH_ELLIPSE, new cv.Size(size, size));
  const kernel = disc.data.slice();
  disc.delete();
  const a = size >> 1;                             // the anchor: the disc's centre
  const stamp = [];                                // dst(q + a - k) = 1 for a source pixel q, kernel cell k
  for (let ky = 0; ky < size; ky++) for (let kx = 0; kx < size; kx++) if (kernel[ky * size + kx]) stamp.push([a - kx, a - ky]);
  const out = new Uint8Array(width * height);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      if (!binary[y * width + x]) continue;
      for (const [dx, dy] of stamp) {
        const xx = x + dx, yy = y + dy;
        if (xx >= 0 && xx < width && yy >= 0 && yy < height) out[yy * width + xx] = 1;
      }
    }
  }
  return out;
}

/** bloodseg.count.split_touching(red, radius=None): touching red cells split by a
 *  distance-transform watershed. Returns {labels, n, r}. */
export function splitTouching(cv, binary, width, height) {
  const r = estimateRedRadius(binary, width, height);
  if (!binary.some((v) => v)) return { labels: new Int32Array(width * height), n: 0, r };
  const solid = fillSmallHoles(binary, width, height, Math.trunc(Math.PI * (0.7 * r) ** 2));
  const dist = Float32Array.from(edt(solid, width, height));
  const hm = hMaxima(dist, width, 0.1 * r);
  const deep = Math.fround(0.4 * r);
  const peaks = new Uint8Array(dist.length);
  for (let i = 0; i < peaks.length; i++) peaks[i] = hm[i] && dist[i] >= deep && solid[i] ? 1 : 0;
  const grown = dilateByDisc(cv, peaks, width, height, 0.25 * r);
  for (let i = 0; i < grown.length; i++) grown[i] = grown[i] && solid[i] ? 1 : 0;
  const { labels: markers, n: nMarkers } = label(grown, width, height, true);
  const labels = flood(dist, markers, solid, width, height);
  const lonely = new Uint8Array(labels.length);
  for (let i = 0; i < lonely.length; i++) lonely[i] = solid[i] && labels[i] === 0 ? 1 : 0;
  const { labels: relabel, n: k } = label(lonely, width, height, true);
  for (let i = 0; i < lonely.length; i++) if (lonely[i]) labels[i] = relabel[i] + nMarkers;
  const kept = keepMostlyVisible(labels, width, height, nMarkers + k, 0.15 * Math.PI * r * r, null, 0.5,
    Math.PI * r * r);
  return { labels: kept.labels, n: kept.n, r };
}

/** bloodseg.count.label_white_cells(mask, minArea, typical). */
function labelWhiteCells(mask, width, height, minArea, typical) {
  const white = Uint8Array.from(mask, (v) => (v === WHITE_CELL ? 1 : 0));
  const filled = fillHoles(white, width, height);
  const { labels, n } = label(filled, width, height, true);
  return keepMostlyVisible(labels, width, height, n, minArea, typical);
}

/** bloodseg.count.count_cells(mask): {n_white, n_red, red_radius_px, white_fraction,
 *  red_fraction, height, width} and the label images (white_labels, red_labels). */
export function countCells(cv, mask, width, height) {
  const red = Uint8Array.from(mask, (v) => (v === RED_CELL ? 1 : 0));
  const split = splitTouching(cv, red, width, height);
  const r = split.r;
  const white = labelWhiteCells(mask, width, height, 0.25 * Math.PI * r * r, 2.5 * Math.PI * r * r);
  let nw = 0, nr = 0;
  for (let i = 0; i < mask.length; i++) { if (mask[i] === WHITE_CELL) nw++; else if (mask[i] === RED_CELL) nr++; }
  return {
    n_white: white.n, n_red: split.n, red_radius_px: pyRound(r, 2),
    white_fraction: mask.length ? nw / mask.length : 0, red_fraction: mask.length ? nr / mask.length : 0,
    height, width, white_labels: white.labels, red_labels: split.labels,
  };
}

/** bloodseg.instances.instances(mask, probs): one row per cell, white cells first (ids 1..),
 *  then red cells; a white cell keeps the pixels it shares with a red segment. */
export function instances(counted, probs, width, height) {
  const N = width * height;
  const nWhite = counted.n_white;
  const labels = new Int32Array(N);
  for (let i = 0; i < N; i++) {
    const w = counted.white_labels[i], r = counted.red_labels[i];
    labels[i] = w > 0 ? w : r > 0 ? r + nWhite : 0;
  }
  // ids that a white cell covered entirely disappear: number the rest 1..n again
  const maxId = nWhite + counted.n_red;
  const present = new Uint8Array(maxId + 1);
  for (let i = 0; i < N; i++) present[labels[i]] = 1;
  const lookup = new Int32Array(maxId + 1);
  const kinds = [];
  let n = 0;
  for (let k = 1; k <= maxId; k++) if (present[k]) { lookup[k] = ++n; kinds.push(k <= nWhite ? WHITE_CELL : RED_CELL); }
  for (let i = 0; i < N; i++) labels[i] = lookup[labels[i]];
  const area = new Float64Array(n + 1), cx = new Float64Array(n + 1), cy = new Float64Array(n + 1);
  const x0 = new Int32Array(n + 1).fill(width), y0 = new Int32Array(n + 1).fill(height);
  const x1 = new Int32Array(n + 1), y1 = new Int32Array(n + 1);
  const prob = new Float64Array(n + 1);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const i = y * width + x, k = labels[i];
      if (!k) continue;
      area[k] += 1; cx[k] += x; cy[k] += y;
      if (x < x0[k]) x0[k] = x;
      if (y < y0[k]) y0[k] = y;
      if (x + 1 > x1[k]) x1[k] = x + 1;
      if (y + 1 > y1[k]) y1[k] = y + 1;
      if (probs) prob[k] += probs[kinds[k - 1] * N + i];
    }
  }
  const border = touchesBorder(labels, width, height, n);
  const rows = [];
  for (let k = 1; k <= n; k++) {
    const a = area[k];
    rows.push({
      id: k, class: kinds[k - 1] === WHITE_CELL ? 'white' : 'red', area_px: a, area_um2: '',
      centroid_x: pyRound(cx[k] / a, 2), centroid_y: pyRound(cy[k] / a, 2),
      x0: x0[k], y0: y0[k], x1: x1[k], y1: y1[k],
      equivalent_diameter_px: pyRound(Math.sqrt(4 * a / Math.PI), 2),
      mean_probability: probs ? pyRound(prob[k] / a, 4) : '',
      touches_border: Boolean(border[k]),
    });
  }
  return { labels, rows };
}

/** bloodseg.instances.INSTANCE_COLUMNS: the columns of `<stem>_cells.csv`. */
export const INSTANCE_COLUMNS = ['id', 'class', 'area_px', 'area_um2', 'centroid_x', 'centroid_y', 'x0', 'y0',
  'x1', 'y1', 'equivalent_diameter_px', 'mean_probability', 'touches_border'];

/** A number as Python's repr() writes a float: "12.0", "0.25", "5e-05". */
export function pyFloat(x) {
  if (!Number.isFinite(x)) return x > 0 ? 'inf' : x < 0 ? '-inf' : 'nan';
  if (x === 0) return Object.is(x, -0) ? '-0.0' : '0.0';
  const a = Math.abs(x);
  if (a < 1e-4 || a >= 1e16) {                       // Python switches to exponent notation here
    const [m, e] = x.toExponential().split('e');
    const exp = Number(e);
    return `${m}e${exp < 0 ? '-' : '+'}${String(Math.abs(exp)).padStart(2, '0')}`;
  }
  const t = String(x);
  return Number.isInteger(x) ? `${t}.0` : t;
}

/** A value as Python's csv module writes it (floats as repr(), True/False). */
function pyText(v, isFloat) {
  if (typeof v === 'boolean') return v ? 'True' : 'False';
  if (typeof v === 'number' && isFloat) return pyFloat(v);
  return String(v);
}

/** The per-cell table as `bloodseg count --instances` writes `<stem>_cells.csv`. */
export function cellsCsv(rows) {
  const floats = new Set(['centroid_x', 'centroid_y', 'equivalent_diameter_px', 'mean_probability']);
  const lines = [INSTANCE_COLUMNS.join(',')];
  for (const row of rows) lines.push(INSTANCE_COLUMNS.map((c) => pyText(row[c], floats.has(c))).join(','));
  return lines.join('\n') + '\n';
}

/** bloodseg.count.COUNT_COLUMNS: the columns of `bloodseg count --out counts.csv`. */
export const COUNT_COLUMNS = ['image', 'n_white', 'n_red', 'red_radius_px', 'white_fraction', 'red_fraction',
  'height', 'width'];

/** The counts of one photograph as `bloodseg count --out` writes its row (floats rounded to 5
 *  decimals, bloodseg.count.write_counts_csv); `image` is the file's name. */
export function countsCsv(image, counts) {
  const floats = new Set(['red_radius_px', 'white_fraction', 'red_fraction']);
  const row = { image, ...counts };
  const cells = COUNT_COLUMNS.map((c) => (floats.has(c) ? pyFloat(pyRound(row[c], 5)) : String(row[c])));
  const quote = (t) => (/[",\n\r]/.test(t) ? `"${t.replace(/"/g, '""')}"` : t);   // csv.QUOTE_MINIMAL
  return `${COUNT_COLUMNS.join(',')}\n${cells.map(quote).join(',')}\n`;
}
