// The "Try it on your own smear" page: a photograph in (dropped, picked or one of the vendored BCCD
// samples), the shipped network run on it in this browser (pipeline.js), the overlay, the counts
// and the files out. boot.js has already checked WebAssembly and the like and loads this module.
//
// For the tests and for the curious, window.bloodsegTryIt holds the state: `ready` (a promise),
// `runUrl(url)`, `runFile(file)`, and `last` (the last result or refusal).

import { loadRuntime } from './loader.js';
import { segmentPhotograph } from './pipeline.js';
import { encodeGreyPng } from './png.js';
import { cellsCsv, countsCsv } from './count.js';

const BASE = new URL('.', import.meta.url).href;          // .../_static/tryit/
const app = document.getElementById('tryit-app');

// ---------------------------------------------------------------- the page's parts
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') e.className = v; else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

const fileInput = el('input', { type: 'file', accept: 'image/*,.tif,.tiff', class: 'tryit-file', id: 'tryit-file' });
const pick = el('button', { type: 'button', class: 'tryit-button', onclick: () => fileInput.click() }, 'Choose a photograph…');
const drop = el('div', { class: 'tryit-drop', tabindex: '0', 'aria-label': 'Drop a smear photograph here' },
  el('p', {}, 'Drop a smear photograph here, or ', pick),
  el('p', { class: 'tryit-small' }, 'JPEG, PNG, WebP or BMP, 8 bits per channel. It stays on your computer: ' +
    'nothing is uploaded, the network runs in this page.'),
  fileInput);
const samples = el('div', { class: 'tryit-samples' });
const status = el('p', { class: 'tryit-status', role: 'status', 'aria-live': 'polite' }, 'Loading…');
const message = el('div', { class: 'tryit-message', role: 'alert', hidden: '' });
const result = el('div', { class: 'tryit-result', hidden: '' });
app.replaceChildren(drop,
  el('p', { class: 'tryit-small' }, 'Or click one of the sixteen BCCD photographs that ship with bloodseg:'),
  samples, status, message, result);

function say(text) { status.textContent = text; }
function tell(kind, text) {          // kind: 'refusal' (nothing was run) or 'warning' (it ran, but note this)
  message.hidden = false;
  message.className = `tryit-message tryit-${kind}`;
  message.textContent = text;
}
function clearMessage() { message.hidden = true; message.textContent = ''; }
const yieldToBrowser = () => new Promise((r) => setTimeout(r, 0));   // let the status line repaint

// ---------------------------------------------------------------- state shared with tests
// runs: photographs segmented; attempts: files given to it (segmented or refused)
const api = window.bloodsegTryIt = { ready: null, last: null, busy: false, runs: 0, attempts: 0, runtime: null };

// ---------------------------------------------------------------- reading a file
/** What the first bytes of a file say it is, when a browser cannot decode it. */
function sniff(bytes) {
  const s = String.fromCharCode(...bytes.subarray(0, 8));
  if (s.startsWith('II*\0') || s.startsWith('MM\0*')) return 'tiff';
  if (s.startsWith('%PDF')) return 'pdf';
  if (bytes[0] === 0x89 && s.startsWith('\x89PNG')) return bytes[24] === 16 ? 'png16' : 'png';
  return null;
}

/** A decoded photograph as an OpenCV.js BGR Mat, with notes; or a refusal (an Error whose
 *  `refusal` is true). Large photographs are shrunk to settings.limits.max_pixels. */
async function decode(blob, name, notes) {
  const { cv, settings } = api.runtime;
  const head = new Uint8Array(await blob.slice(0, 32).arrayBuffer());
  const kind = sniff(head);
  const refuse = (text) => Object.assign(new Error(text), { refusal: true });
  if (kind === 'tiff') {
    throw refuse(`${name} is a TIFF file, which this page cannot read (most browsers cannot, 8-bit or 16-bit). Save the ` +
      'photograph as an 8-bit PNG or JPEG (for a 16-bit TIFF, e.g. with ImageMagick: ' +
      'magick in.tif -depth 8 out.png) and drop that; or run bloodseg predict, which reads TIFF.');
  }
  if (kind === 'pdf') throw refuse(`${name} is a PDF document, not a photograph. Export the page as PNG or JPEG first.`);
  let bitmap;
  try {
    // the stored pixels, as OpenCV reads them: no EXIF rotation, no colour-profile conversion
    bitmap = await createImageBitmap(blob, { imageOrientation: 'none', colorSpaceConversion: 'none',
      premultiplyAlpha: 'none' });
  } catch (err) {
    bitmap = null;   // a browser that does not know these options: try again without them
  }
  try {
    if (!bitmap) bitmap = await createImageBitmap(blob);
  } catch (err) {
    throw refuse(`${name} is not an image this browser can read (${blob.type || 'unknown type'}, ` +
      `${blob.size} bytes). Drop a JPEG or PNG photograph of a stained blood smear.`);
  }
  if (kind === 'png16') {
    notes.push('This is a 16-bit PNG: the browser reads it as 8 bits per channel (bloodseg keeps the high ' +
      'byte), so a few pixels may differ from bloodseg predict by one grey level.');
  }
  const { width, height } = bitmap;
  const limit = settings.limits;
  if (width * height > limit.refuse_pixels) {
    bitmap.close();
    throw refuse(`${name} is ${width}×${height} pixels (${(width * height / 1e6).toFixed(1)} megapixels): ` +
      `too large to open in a web page (the limit is ${limit.refuse_pixels / 1e6} megapixels). Crop it or ` +
      'shrink it first, or run bloodseg predict on it.');
  }
  const canvas = new OffscreenCanvas(width, height);
  const ctx = canvas.getContext('2d', { willReadFrequently: true });
  ctx.drawImage(bitmap, 0, 0);
  bitmap.close();
  const rgba = ctx.getImageData(0, 0, width, height).data;
  let bgr = new cv.Mat(height, width, cv.CV_8UC3);
  const d = bgr.data;
  for (let i = 0, j = 0; i < rgba.length; i += 4, j += 3) { d[j] = rgba[i + 2]; d[j + 1] = rgba[i + 1]; d[j + 2] = rgba[i]; }
  if (width * height > limit.max_pixels) {
    // shrink with OpenCV's INTER_AREA: cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA) in Python
    const s = Math.sqrt(limit.max_pixels / (width * height));
    const w = Math.max(1, Math.floor(width * s)), h = Math.max(1, Math.floor(height * s));
    const small = new cv.Mat();
    cv.resize(bgr, small, new cv.Size(w, h), 0, 0, cv.INTER_AREA);
    bgr.delete();
    bgr = small;
    notes.push(`${name} is ${width}×${height} pixels (${(width * height / 1e6).toFixed(1)} megapixels). ` +
      `The page shrank it to ${w}×${h} (${(w * h / 1e6).toFixed(1)} megapixels, OpenCV INTER_AREA) before ` +
      'segmenting it, to stay within a browser tab\'s memory; the mask and the cell table are at that size. ' +
      'bloodseg predict segments the photograph at its full size.');
  }
  return { bgr, originalWidth: width, originalHeight: height };
}

// ---------------------------------------------------------------- drawing
function bgrToCanvas(bgr, canvas) {
  const w = bgr.cols, h = bgr.rows, d = bgr.data;
  canvas.width = w; canvas.height = h;
  const ctx = canvas.getContext('2d');
  const img = ctx.createImageData(w, h);
  for (let i = 0, j = 0; j < d.length; i += 4, j += 3) {
    img.data[i] = d[j + 2]; img.data[i + 1] = d[j + 1]; img.data[i + 2] = d[j]; img.data[i + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
}

/** bloodseg.classes.overlay: every cell faintly tinted with its class colour (alpha) and outlined
 *  (`outline` px inside the cell, erosion by a 3x3 square with replicated borders) in a colour
 *  that stands out against its stain. */
function overlayCanvas(cv, bgr, mask, canvas, palette, style) {
  const w = bgr.cols, h = bgr.rows, d = bgr.data.slice();
  canvas.width = w; canvas.height = h;
  const ctx = canvas.getContext('2d');
  const img = ctx.createImageData(w, h);
  // numpy's arithmetic: (1 - alpha) * image in float32, plus alpha * colour in float64, stored as
  // float32, + 0.5 in float32, clipped and truncated to 8 bits
  const keep = Math.fround(1 - style.alpha);
  const tint = (v, colour) => {
    const x = Math.fround(Math.fround(keep * v) + style.alpha * colour);
    return Math.trunc(Math.min(Math.max(Math.fround(x + 0.5), 0), 255));
  };
  for (let p = 0; p < w * h; p++) {
    const i = 4 * p, j = 3 * p, m = mask[p];
    const rgb = [d[j + 2], d[j + 1], d[j]];
    for (let c = 0; c < 3; c++) img.data[i + c] = m ? tint(rgb[c], palette[m][c]) : rgb[c];
    img.data[i + 3] = 255;
  }
  if (style.outline > 0) {
    const kernel = cv.Mat.ones(3, 3, cv.CV_8U);
    for (const cls of [1, 2]) {
      const inside = new cv.Mat(h, w, cv.CV_8UC1);
      const id = inside.data;
      for (let p = 0; p < w * h; p++) id[p] = mask[p] === cls ? 1 : 0;
      const eroded = new cv.Mat();
      cv.erode(inside, eroded, kernel, new cv.Point(-1, -1), style.outline, cv.BORDER_REPLICATE);
      const e = eroded.data;
      const colour = style.outline_rgb[cls];
      for (let p = 0; p < w * h; p++) {
        if (mask[p] === cls && !e[p]) for (let c = 0; c < 3; c++) img.data[4 * p + c] = colour[c];
      }
      inside.delete(); eroded.delete();
    }
    kernel.delete();
  }
  ctx.putImageData(img, 0, 0);
}

function download(blob, filename) {
  const a = el('a', { href: URL.createObjectURL(blob), download: filename });
  document.body.append(a);
  a.click();
  setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
}

/** An error's text; OpenCV.js throws bare numbers (C++ exception pointers) that it can explain. */
function errorText(err) {
  if (err instanceof Error) return err.message;
  const cv = api.runtime && api.runtime.cv;
  if (typeof err === 'number' && cv && cv.exceptionFromPtr) {
    try { return `OpenCV: ${cv.exceptionFromPtr(err).msg}`; } catch (e) { /* fall through */ }
  }
  if (typeof err === 'number') return `an error inside OpenCV.js (${err}); the photograph may be too large for this browser's memory`;
  return String(err);
}

function fmt(ms) { return ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${Math.round(ms)} ms`; }

function showResult(name, bgr, out, notes, decodeMs) {
  const { settings } = api.runtime;
  const stem = name.replace(/\.[^.]*$/, '') || 'photograph';
  const palette = settings.rules.palette_rgb;
  const photo = el('canvas', { class: 'tryit-canvas', 'aria-label': `the photograph ${name}` });
  const overlay = el('canvas', { class: 'tryit-canvas', 'aria-label': `the overlay of ${name}` });
  bgrToCanvas(bgr, photo);
  overlayCanvas(api.runtime.cv, bgr, out.mask, overlay, palette, settings.rules.overlay);
  const line = settings.rules.overlay.outline_rgb;
  const swatch = (c) => el('span', { class: 'tryit-swatch',
    style: `background: rgb(${palette[c].join(',')}); border: 2px solid rgb(${line[c].join(',')})` });
  const c = out.counts;
  const seg = settings.segmenter;
  const trained = seg.input_scale, rule = settings.rules.scale;
  const factor = Number(out.factor.toPrecision(4));
  let scaleText = `${factor} (the trained scale: the red cells could not be measured)`;
  if (out.crop) {
    // bloodseg.Segmenter._crop_scale: the three passes and the one kept
    const { passes, chosen } = out.crop;
    const r4 = (x) => Number(x.toPrecision(4));
    const best = passes[chosen];
    const tied = passes.filter((p, i) => i !== chosen && Math.abs(p.confidence - best.confidence) <= rule.crop_tie);
    scaleText = `${factor}: a crop: the network was most confident at ${r4(best.factor)} ` +
      `(${best.multiple} × the trained scale ${trained}) of the ${passes.length} factors it ran at. Its mean ` +
      `confidence (the largest class probability, averaged over the picture): ` +
      passes.map((p, i) => `${p.confidence.toFixed(4)} at ${r4(p.factor)} (${p.multiple} × ${trained})` +
        (i === chosen ? ', kept' : '')).join('; ') +
      (tied.length ? ' (a tie goes to the smaller factor)' : '') + '. The mask is that pass\'s. A crop is a ' +
      `picture whose shorter side is under ${rule.crop_side} px (this one: ${Math.min(bgr.cols, bgr.rows)} px): ` +
      'too few of its red cells are whole to measure them, so the network\'s confidence chooses the scale.';
  } else if (out.diameter !== null) {
    scaleText = `${factor}: the red cells measure ${out.diameter.toFixed(1)} px across, ` +
      `${(out.diameter * trained).toFixed(1)} px at the trained scale ${trained}, against the ${seg.red_cell_diameter} px ` +
      'the network was trained on; ' + (out.factor === trained
      ? `within ${Math.round(100 * rule.tolerance)} %, so the trained scale`
      : 'so resized by that' + (out.factor === rule.lo || out.factor === rule.hi
        ? ` (the rule's limit: it keeps factors within ${rule.lo}-${rule.hi})` : ''));
  }
  const colourText = out.gains
    ? `background (B, G, R) ${out.background.map((v) => v.toFixed(0)).join(', ')} brought to ` +
      `${seg.background.map((v) => v.toFixed(0)).join(', ')} (gains ${out.gains.map((g) => g.toFixed(3)).join(', ')})`
    : seg.colour === 'background' ? 'left as it is (its background is too dark for a bright-field smear)' : 'none';
  const rows = [
    ['White cells', `${c.n_white}`],
    ['Red cells', `${c.n_red} (typical red-cell radius ${c.red_radius_px} px)`],
    ['Scale factor used', scaleText],
    ['Network input', `${out.networkWidth}×${out.networkHeight} px, ${out.tiles} tile${out.tiles > 1 ? 's' : ''}`],
    ['Colour rule', colourText],
    ['Photograph', `${bgr.cols}×${bgr.rows} px`],
    ['Time taken', `${fmt(out.ms.total)} in this browser (colour ${fmt(out.ms.colour)}, ` +
      (out.crop ? `scale and network ${fmt(out.ms.scale)} (${out.crop.passes.length} passes), `
        : `scale ${fmt(out.ms.scale)}, network ${fmt(out.ms.network)}, `) +
      `cleanup ${fmt(out.ms.cleanup)}, counting ${fmt(out.ms.count)}; ` +
      `reading the file ${fmt(decodeMs)})`],
  ];
  const table = el('table', { class: 'tryit-table' },
    el('tbody', {}, ...rows.map(([k, v]) => el('tr', {}, el('th', { scope: 'row' }, k), el('td', {}, v)))));
  const maskButton = el('button', { type: 'button', class: 'tryit-button', onclick: async () =>
    download(await encodeGreyPng(out.mask, out.width, out.height), `${stem}.png`) }, 'Download the mask (PNG)');
  const csvButton = el('button', { type: 'button', class: 'tryit-button', onclick: () =>
    download(new Blob([cellsCsv(out.rows)], { type: 'text/csv' }), `${stem}_cells.csv`) },
  'Download the cells (CSV)');
  const countsButton = el('button', { type: 'button', class: 'tryit-button', onclick: () =>
    download(new Blob([countsCsv(name, out.counts)], { type: 'text/csv' }), `${stem}_counts.csv`) },
  'Download the counts (CSV)');
  const overlayButton = el('button', { type: 'button', class: 'tryit-button', onclick: () =>
    overlay.toBlob((b) => download(b, `${stem}_overlay.png`), 'image/png') }, 'Download the overlay (PNG)');
  result.replaceChildren(
    el('h3', {}, `Result for ${name}`),
    el('div', { class: 'tryit-figures' },
      el('figure', {}, photo, el('figcaption', {}, 'The photograph')),
      el('figure', {}, overlay, el('figcaption', {}, 'The overlay: ', swatch(1), ' white cells, ', swatch(2), ' red cells'))),
    table,
    el('p', {}, maskButton, ' ', csvButton, ' ', countsButton, ' ', overlayButton),
    el('p', { class: 'tryit-small' }, `The mask holds 0 (background), 1 (white cell) and 2 (red cell) in one ` +
      'grey channel, as bloodseg predict writes it (it looks black in an image viewer); the cells table has ' +
      'the columns of bloodseg count --instances, the counts table those of bloodseg count --out.'));
  result.hidden = false;
  if (notes.length) tell('warning', notes.join(' '));
}

// ---------------------------------------------------------------- one run
async function run(blob, name) {
  if (api.busy) { tell('warning', 'Still working on the previous photograph; try again in a moment.'); return null; }
  api.busy = true;
  clearMessage();
  const notes = [];
  let bgr = null;
  try {
    await api.ready;
    say(`Reading ${name}…`);
    await yieldToBrowser();
    const t0 = performance.now();
    const decoded = await decode(blob, name, notes);
    bgr = decoded.bgr;
    const decodeMs = performance.now() - t0;
    if (notes.length) tell('warning', notes.join(' '));
    const out = await segmentPhotograph(api.runtime, bgr, async (step) => { say(`${name}: ${step}…`); await yieldToBrowser(); });
    showResult(name, bgr, out, notes, decodeMs);
    say(`${name}: ${out.counts.n_white} white cell${out.counts.n_white === 1 ? '' : 's'}, ${out.counts.n_red} red ` +
      `cells, in ${fmt(out.ms.total)}.`);
    api.runs += 1;
    api.last = { ok: true, name, notes, decodeMs, ...out, probs: undefined };
    return api.last;
  } catch (err) {
    result.hidden = true;
    if (err.refusal) {
      tell('refusal', err.message);
      say(`${name}: not segmented.`);
    } else {
      tell('refusal', `Something went wrong with ${name}: ${errorText(err)}. Please report it with the photograph.`);
      say(`${name}: failed.`);
      console.error(err);
    }
    api.last = { ok: false, name, refusal: Boolean(err.refusal), message: errorText(err) };
    return api.last;
  } finally {
    if (bgr) bgr.delete();
    api.busy = false;
    api.attempts += 1;
  }
}

api.runFile = (file) => run(file, file.name);
api.runUrl = async (url) => {
  const response = await fetch(url);
  return run(await response.blob(), decodeURIComponent(url.split('/').pop()));
};

// ---------------------------------------------------------------- inputs
fileInput.addEventListener('change', () => { if (fileInput.files[0]) api.runFile(fileInput.files[0]); fileInput.value = ''; });
for (const ev of ['dragenter', 'dragover']) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add('tryit-over'); });
for (const ev of ['dragleave', 'drop']) drop.addEventListener(ev, () => drop.classList.remove('tryit-over'));
drop.addEventListener('drop', (e) => {
  e.preventDefault();
  const file = e.dataTransfer.files[0];
  if (file) api.runFile(file); else tell('refusal', 'That was not a file: drop a photograph from your computer.');
});
drop.addEventListener('keydown', (e) => { if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); fileInput.click(); } });

// ---------------------------------------------------------------- start
api.ready = (async () => {
  try {
    api.runtime = await loadRuntime(BASE, say);
  } catch (err) {
    tell('refusal', `The segmenter could not be loaded: ${errorText(err)}`);
    say('Not ready.');
    throw err;
  }
  const { settings } = api.runtime;
  for (const s of settings.samples) {
    const url = BASE + 'samples/' + s.file;
    samples.append(el('button', { type: 'button', class: 'tryit-sample', title: s.file,
      onclick: () => api.runUrl(url) }, el('img', { src: url, alt: s.file, loading: 'lazy' })));
  }
  say(`Ready: the shipped network (${settings.onnx.solver} solver, ${settings.onnx.source}) runs in this page. ` +
    'Drop a photograph or click a sample.');
  document.documentElement.dataset.tryit = 'ready';
})();
api.ready.catch(() => { document.documentElement.dataset.tryit = 'failed'; });
