// The network on a photograph — mirrors bloodseg.infer.predict_probabilities (with _probabilities,
// _probability_bands, _pad_to, _window, _starts and _softmax) and bloodseg.preprocess.clahe_on_luma
// / image_to_tensor:
//
//   1. resize the photograph by the factor (OpenCV INTER_AREA when shrinking, INTER_LINEAR when
//      enlarging; the size rounded as Python's round() does);
//   2. CLAHE on the luma (Y of YUV), U and V untouched;
//   3. RGB in [0, 1], reflect-padded to a multiple of 16;
//   4. one pass of the network when the padded image fits one tile, else overlapping tiles
//      blended with a window (a linear ramp over the overlap);
//   5. softmax, and the class probabilities resized back to the photograph's size (bilinear,
//      half-pixel centres, as torch.nn.functional.interpolate(align_corners=False)).
//
// The network itself is the ONNX file the book exported from the shipped checkpoint, run by
// onnxruntime-web in WebAssembly.

import { roundHalfEven } from './morphology.js';

/** bloodseg.preprocess.clahe_on_luma: CLAHE (OpenCV's, clip limit and tile grid from the
 *  settings) on the Y channel of YUV; returns a new BGR Mat. */
export function claheOnLuma(cv, bgr, clahe) {
  const yuv = new cv.Mat();
  cv.cvtColor(bgr, yuv, cv.COLOR_BGR2YUV);
  const planes = new cv.MatVector();
  cv.split(yuv, planes);
  const y = planes.get(0);
  const equalised = new cv.Mat();
  const op = new cv.CLAHE(clahe.clip_limit, new cv.Size(clahe.tile_grid[0], clahe.tile_grid[1]));
  op.apply(y, equalised);
  planes.set(0, equalised);
  cv.merge(planes, yuv);
  const out = new cv.Mat();
  cv.cvtColor(yuv, out, cv.COLOR_YUV2BGR);
  yuv.delete(); planes.delete(); y.delete(); equalised.delete(); op.delete();
  return out;
}

/** The photograph resized by `factor` as bloodseg.infer.predict_probabilities resizes it. */
export function resizeBy(cv, bgr, factor) {
  const w = Math.max(1, roundHalfEven(bgr.cols * factor));
  const h = Math.max(1, roundHalfEven(bgr.rows * factor));
  const out = new cv.Mat();
  cv.resize(bgr, out, new cv.Size(w, h), 0, 0, factor < 1 ? cv.INTER_AREA : cv.INTER_LINEAR);
  return out;
}

/** bloodseg.infer._window: 1-D blending weights, a ramp from 0.05 to 1 over the overlap (as
 *  torch.linspace in float32), flat in the middle. */
function window1d(size, overlap) {
  const w = new Float32Array(size).fill(1);
  if (overlap > 0) {
    const ramp = new Float32Array(overlap);
    const step = overlap > 1 ? (1.0 - 0.05) / (overlap - 1) : 0;
    // torch.linspace fills the first half from the start and the second half from the end
    for (let i = 0; i < overlap; i++) ramp[i] = i < (overlap >> 1) ? 0.05 + step * i : 1.0 - step * (overlap - 1 - i);
    for (let i = 0; i < overlap; i++) w[i] = ramp[i];                     // w[:overlap] = ramp
    for (let i = 0; i < overlap; i++) w[size - overlap + i] = ramp[overlap - 1 - i];  // w[-overlap:] = ramp.flip(0)
  }
  return w;
}

/** bloodseg.infer._starts: tile origins along one side. */
function starts(length, tile, stride) {
  if (length <= tile) return [0];
  const s = [];
  for (let v = 0; v < length - tile; v += stride) s.push(v);
  s.push(length - tile);
  return [...new Set(s)].sort((a, b) => a - b);
}

/** Reflect an index into [0, n) as numpy/torch 'reflect' padding does (the edge not repeated),
 *  or clamp it ('edge'/'replicate', for images too small to reflect). */
function padIndex(i, n, reflect) {
  if (i < n) return i;
  return reflect ? 2 * (n - 1) - i : n - 1;
}

/** softmax over the classes of logits (C x h x w, Float32Array) into probs at (y0, x0). */
function softmaxInto(logits, C, th, tw) {
  const out = new Float32Array(C * th * tw);
  const plane = th * tw;
  for (let i = 0; i < plane; i++) {
    let m = -Infinity;
    for (let c = 0; c < C; c++) m = Math.max(m, logits[c * plane + i]);
    let s = 0;
    for (let c = 0; c < C; c++) s += Math.exp(logits[c * plane + i] - m);
    for (let c = 0; c < C; c++) out[c * plane + i] = Math.exp(logits[c * plane + i] - m) / s;
  }
  return out;
}

/** Class probabilities (Float32Array, C planes of h x w) of the network on a BGR Mat at its own
 *  size: CLAHE, padding, tiles, softmax (bloodseg.infer._probabilities). */
export async function probabilitiesAtNetworkSize(cv, ort, session, bgr, settings, onTile) {
  const { tile, overlap } = settings.segmenter;
  const C = settings.segmenter.class_names.length;
  const enhanced = settings.segmenter.clahe ? claheOnLuma(cv, bgr, settings.rules.clahe) : bgr.clone();
  const h = enhanced.rows, w = enhanced.cols;
  const src = enhanced.data.slice();
  enhanced.delete();
  const ph = (16 - (h % 16)) % 16, pw = (16 - (w % 16)) % 16;
  const reflect = ph < h && pw < w;
  const H = h + ph, W = w + pw;
  const th = Math.min(tile, H), tw = Math.min(tile, W);
  const wy = window1d(th, Math.min(overlap, th >> 1)), wx = window1d(tw, Math.min(overlap, tw >> 1));
  const ys = starts(H, th, th - overlap), xs = starts(W, tw, tw - overlap);
  const single = ys.length === 1 && xs.length === 1;
  const probs = new Float32Array(C * h * w);
  const weight = single ? null : new Float32Array(h * w);
  let done = 0;
  for (const y0 of ys) {
    for (const x0 of xs) {
      // the tile as a float32 RGB tensor in [0, 1], 1 x 3 x th x tw (BGR -> RGB)
      const x = new Float32Array(3 * th * tw);
      for (let yy = 0; yy < th; yy++) {
        const sy = padIndex(y0 + yy, h, reflect);
        for (let xx = 0; xx < tw; xx++) {
          const sx = padIndex(x0 + xx, w, reflect);
          const i = (sy * w + sx) * 3, o = yy * tw + xx;
          x[o] = src[i + 2] / 255; x[th * tw + o] = src[i + 1] / 255; x[2 * th * tw + o] = src[i] / 255;
        }
      }
      const feeds = { image: new ort.Tensor('float32', x, [1, 3, th, tw]) };
      const result = await session.run(feeds);
      const logits = result.logits.data;
      const p = softmaxInto(logits, C, th, tw);
      result.logits.dispose?.();
      // accumulate the tile's probabilities (weighted by the window when there are several tiles)
      for (let yy = 0; yy < th; yy++) {
        const Y = y0 + yy;
        if (Y >= h) continue;
        for (let xx = 0; xx < tw; xx++) {
          const X = x0 + xx;
          if (X >= w) continue;
          const o = yy * tw + xx;
          if (single) {
            for (let c = 0; c < C; c++) probs[c * h * w + Y * w + X] = p[c * th * tw + o];
          } else {
            const win = Math.fround(wy[yy] * wx[xx]);
            for (let c = 0; c < C; c++) probs[c * h * w + Y * w + X] += p[c * th * tw + o] * win;
            weight[Y * w + X] += win;
          }
        }
      }
      done += 1;
      if (onTile) await onTile(done, ys.length * xs.length);
    }
  }
  if (!single) for (let c = 0; c < C; c++) for (let i = 0; i < h * w; i++) probs[c * h * w + i] /= weight[i];
  return { probs, width: w, height: h, tiles: ys.length * xs.length };
}

/** torch.nn.functional.interpolate(probs[None], size=(H, W), mode="bilinear",
 *  align_corners=False): each plane resized to W x H. */
export function resizeProbabilities(probs, C, h, w, H, W) {
  const out = new Float32Array(C * H * W);
  const sy = Math.fround(h / H), sx = Math.fround(w / W);
  const x0s = new Int32Array(W), x1s = new Int32Array(W), lx = new Float32Array(W);
  for (let X = 0; X < W; X++) {
    const src = Math.max(Math.fround(Math.fround(sx * (X + 0.5)) - 0.5), 0);
    const i0 = Math.floor(src);
    x0s[X] = i0; x1s[X] = i0 + (i0 < w - 1 ? 1 : 0); lx[X] = Math.fround(src - i0);
  }
  for (let Y = 0; Y < H; Y++) {
    const src = Math.max(Math.fround(Math.fround(sy * (Y + 0.5)) - 0.5), 0);
    const j0 = Math.floor(src), j1 = j0 + (j0 < h - 1 ? 1 : 0);
    const ly = Math.fround(src - j0);
    for (let c = 0; c < C; c++) {
      const base = c * h * w, ob = c * H * W + Y * W;
      for (let X = 0; X < W; X++) {
        const a = probs[base + j0 * w + x0s[X]], b = probs[base + j0 * w + x1s[X]];
        const d = probs[base + j1 * w + x0s[X]], e = probs[base + j1 * w + x1s[X]];
        const top = (1 - lx[X]) * a + lx[X] * b, bottom = (1 - lx[X]) * d + lx[X] * e;
        out[ob + X] = (1 - ly) * top + ly * bottom;
      }
    }
  }
  return out;
}

/** bloodseg.infer.predict_probabilities(model, image, input_scale=factor): probabilities at the
 *  photograph's own size. Returns {probs, networkWidth, networkHeight, tiles}. */
export async function predictProbabilities(cv, ort, session, bgr, factor, settings, onTile) {
  const C = settings.segmenter.class_names.length;
  if (factor === 1.0) {
    const r = await probabilitiesAtNetworkSize(cv, ort, session, bgr, settings, onTile);
    return { probs: r.probs, networkWidth: r.width, networkHeight: r.height, tiles: r.tiles };
  }
  const small = resizeBy(cv, bgr, factor);
  const r = await probabilitiesAtNetworkSize(cv, ort, session, small, settings, onTile);
  small.delete();
  const probs = resizeProbabilities(r.probs, C, r.height, r.width, bgr.rows, bgr.cols);
  return { probs, networkWidth: r.width, networkHeight: r.height, tiles: r.tiles };
}
