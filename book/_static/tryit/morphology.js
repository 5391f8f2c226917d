// Binary-image tools that the Python side takes from scipy.ndimage, written out in plain
// JavaScript so that they give the same answers, label for label:
//
//   label(...)       <-> scipy.ndimage.label (labels numbered in raster order of each
//                        component's first pixel, 4- or 8-connected)
//   fillHoles(...)   <-> scipy.ndimage.binary_fill_holes (the background is 4-connected)
//   edt(...)         <-> scipy.ndimage.distance_transform_edt (exact Euclidean distance to the
//                        nearest 0 pixel, in float64)
//   reconstruct(...) <-> bloodseg.count._reconstruct (grey-level reconstruction by dilation,
//                        8-connected)
//
// Images are flat typed arrays in row-major order (index = y * width + x), as in numpy.

/** Connected components of `binary` (any array, non-zero = foreground).
 *  Returns {labels: Int32Array, n}. `eight`: 8-connected (true) or 4-connected (false). */
export function label(binary, width, height, eight) {
  const labels = new Int32Array(width * height);
  const stack = new Int32Array(width * height);
  let n = 0;
  for (let start = 0; start < binary.length; start++) {
    if (!binary[start] || labels[start]) continue;
    n += 1;                       // a new component: its first pixel in raster order
    labels[start] = n;
    let top = 0;
    stack[top++] = start;
    while (top > 0) {
      const p = stack[--top];
      const y = (p / width) | 0, x = p - y * width;
      for (let dy = -1; dy <= 1; dy++) {
        const yy = y + dy;
        if (yy < 0 || yy >= height) continue;
        for (let dx = -1; dx <= 1; dx++) {
          if ((dx === 0 && dy === 0) || (!eight && dx !== 0 && dy !== 0)) continue;
          const xx = x + dx;
          if (xx < 0 || xx >= width) continue;
          const q = yy * width + xx;
          if (binary[q] && !labels[q]) { labels[q] = n; stack[top++] = q; }
        }
      }
    }
  }
  return { labels, n };
}

/** Pixel count of every label 0..n (numpy's bincount). */
export function bincount(labels, n) {
  const counts = new Float64Array(n + 1);
  for (let i = 0; i < labels.length; i++) counts[labels[i]] += 1;
  return counts;
}

/** `binary` with its holes filled: background pixels that no 4-connected path of background
 *  joins to the image border become foreground. Returns a Uint8Array of 0/1. */
export function fillHoles(binary, width, height) {
  const outside = new Uint8Array(width * height);
  const stack = new Int32Array(width * height);
  let top = 0;
  const push = (q) => { if (!binary[q] && !outside[q]) { outside[q] = 1; stack[top++] = q; } };
  for (let x = 0; x < width; x++) { push(x); push((height - 1) * width + x); }
  for (let y = 0; y < height; y++) { push(y * width); push(y * width + width - 1); }
  while (top > 0) {
    const p = stack[--top];
    const y = (p / width) | 0, x = p - y * width;
    if (x > 0) push(p - 1);
    if (x < width - 1) push(p + 1);
    if (y > 0) push(p - width);
    if (y < height - 1) push(p + width);
  }
  const out = new Uint8Array(width * height);
  for (let i = 0; i < out.length; i++) out[i] = outside[i] ? 0 : 1;
  return out;
}

/** One-dimensional squared distance transform (Felzenszwalb & Huttenlocher 2012): d[q] = min over
 *  p of (q - p)^2 + f[p], for f of length n (Infinity where there is no source); v, z: work arrays.
 *  Exact for integer inputs. */
function dt1d(f, n, d, v, z) {
  let first = 0;
  while (first < n && f[first] === Infinity) first++;
  if (first === n) { d.fill(Infinity, 0, n); return; }
  let k = 0;
  v[0] = first; z[0] = -Infinity; z[1] = Infinity;
  const meet = (q, p) => ((f[q] + q * q) - (f[p] + p * p)) / (2 * q - 2 * p);
  for (let q = first + 1; q < n; q++) {
    if (f[q] === Infinity) continue;
    let s = meet(q, v[k]);
    while (s <= z[k]) { k -= 1; s = meet(q, v[k]); }   // z[0] = -Infinity stops it
    k += 1; v[k] = q; z[k] = s; z[k + 1] = Infinity;
  }
  k = 0;
  for (let q = 0; q < n; q++) {
    while (z[k + 1] < q) k += 1;
    const p = v[k];
    d[q] = (q - p) * (q - p) + f[p];
  }
}

/** Euclidean distance of every foreground pixel to the nearest background (0) pixel; 0 on the
 *  background. Float64Array, as scipy.ndimage.distance_transform_edt. */
export function edt(binary, width, height) {
  const n = Math.max(width, height);
  const f = new Float64Array(n), d = new Float64Array(n), z = new Float64Array(n + 1);
  const v = new Int32Array(n);
  const sq = new Float64Array(width * height);
  for (let x = 0; x < width; x++) {            // columns
    for (let y = 0; y < height; y++) f[y] = binary[y * width + x] ? Infinity : 0;
    dt1d(f, height, d, v, z);
    for (let y = 0; y < height; y++) sq[y * width + x] = d[y];
  }
  const out = new Float64Array(width * height);
  for (let y = 0; y < height; y++) {            // rows
    for (let x = 0; x < width; x++) f[x] = sq[y * width + x];
    dt1d(f, width, d, v, z);
    for (let x = 0; x < width; x++) out[y * width + x] = Math.sqrt(d[x]);
  }
  return out;
}

/** Grey-level reconstruction by dilation of `marker` under `limit` (Float32Arrays), 8-connected:
 *  the limit of "dilate by a 3x3 square, then take the minimum with limit", repeated until nothing
 *  changes, which is what bloodseg.count._reconstruct computes with cv2.dilate. Only minima and
 *  maxima of the inputs are taken, so any algorithm that reaches that limit gives the same
 *  numbers; this one is Vincent's (1993) two raster scans and a queue. */
export function reconstruct(marker, limit, width, height) {
  const N = width * height;
  const r = new Float32Array(N);
  for (let i = 0; i < N; i++) r[i] = Math.min(marker[i], limit[i]);
  // forward scan: the neighbours above and to the left
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const p = y * width + x;
      let m = r[p];
      if (x > 0 && r[p - 1] > m) m = r[p - 1];
      if (y > 0) {
        const a = p - width;
        if (r[a] > m) m = r[a];
        if (x > 0 && r[a - 1] > m) m = r[a - 1];
        if (x < width - 1 && r[a + 1] > m) m = r[a + 1];
      }
      r[p] = Math.min(m, limit[p]);
    }
  }
  // backward scan: the neighbours below and to the right; pixels that can still pass a value on go into the queue
  const queue = [];
  for (let y = height - 1; y >= 0; y--) {
    for (let x = width - 1; x >= 0; x--) {
      const p = y * width + x;
      let m = r[p];
      if (x < width - 1 && r[p + 1] > m) m = r[p + 1];
      if (y < height - 1) {
        const b = p + width;
        if (r[b] > m) m = r[b];
        if (x > 0 && r[b - 1] > m) m = r[b - 1];
        if (x < width - 1 && r[b + 1] > m) m = r[b + 1];
      }
      r[p] = Math.min(m, limit[p]);
      const v = r[p];
      const later = [[1, 0], [-1, 1], [0, 1], [1, 1]];   // the neighbours the backward scan saw
      for (const [dx, dy] of later) {
        const xx = x + dx, yy = y + dy;
        if (xx < 0 || xx >= width || yy >= height) continue;
        const q = yy * width + xx;
        if (r[q] < v && r[q] < limit[q]) { queue.push(p); break; }
      }
    }
  }
  // propagate from the queued pixels until stable
  for (let head = 0; head < queue.length; head++) {
    const p = queue[head];
    const y = (p / width) | 0, x = p - y * width;
    const v = r[p];
    for (let dy = -1; dy <= 1; dy++) {
      const yy = y + dy;
      if (yy < 0 || yy >= height) continue;
      for (let dx = -1; dx <= 1; dx++) {
        if (dx === 0 && dy === 0) continue;
        const xx = x + dx;
        if (xx < 0 || xx >= width) continue;
        const q = yy * width + xx;
        if (r[q] < v && r[q] !== limit[q]) {
          r[q] = Math.min(v, limit[q]);
          queue.push(q);
        }
      }
    }
  }
  return r;
}

/** True when any pixel of `labels` on the image border carries label i: a Uint8Array 0..n
 *  (bloodseg.postprocess.touches_border). */
export function touchesBorder(labels, width, height, n) {
  const edge = new Uint8Array(n + 1);
  for (let x = 0; x < width; x++) { edge[labels[x]] = 1; edge[labels[(height - 1) * width + x]] = 1; }
  for (let y = 0; y < height; y++) { edge[labels[y * width]] = 1; edge[labels[y * width + width - 1]] = 1; }
  edge[0] = 0;
  return edge;
}

/** numpy's median of a list of numbers (the mean of the two middle values for an even count). */
export function median(values) {
  const v = Float64Array.from(values).sort();
  const n = v.length;
  if (n === 0) return NaN;
  const h = n >> 1;
  return n % 2 ? v[h] : (v[h - 1] + v[h]) / 2;
}

/** Python's round(x, digits): the nearest decimal, ties to even, on the exact binary value. */
export function pyRound(x, digits = 0) {
  if (!Number.isFinite(x)) return x;
  const exact = Math.abs(x).toFixed(Math.min(100, digits + 60));  // exact for the numbers here
  const dot = exact.indexOf('.');
  const keep = exact.slice(0, dot + 1 + digits).replace(/\.$/, '');
  const rest = exact.slice(dot + 1 + digits);
  let up = false;
  if (rest[0] > '5') up = true;
  else if (rest[0] === '5') {
    if (/[1-9]/.test(rest.slice(1))) up = true;
    else {                                     // an exact tie: round to the even digit
      const last = keep.replace('.', '').slice(-1);
      up = Number(last) % 2 === 1;
    }
  }
  let value = Number(keep);
  if (up) value = Number((value + Math.pow(10, -digits)).toFixed(digits));
  return x < 0 ? -value : value;
}

/** Python's round(x) to an integer: halves go to the even neighbour. */
export function roundHalfEven(x) {
  const f = Math.floor(x), d = x - f;
  if (d > 0.5) return f + 1;
  if (d < 0.5) return f;
  return f % 2 === 0 ? f : f + 1;
}
