// THE COLOUR RULE — mirrors bloodseg.stain.match_background (with bloodseg.stain.background_colour
// and bloodseg.stain.white_balance), the first step of bloodseg.Segmenter.prepare when the
// Segmenter's `colour` setting is "background".
//
// A lamp's or a camera's colour cast is one gain per channel. The rule measures the photograph's
// background (the plasma between the cells: the brightest 30% of the pixels) and brings it to the
// background colour of the training photographs with one gain per channel, so the cells keep
// their colour relative to the background.
//
// Every number comes from the settings the book exported with the network (settings.json:
// segmenter.background, the reference colour; rules.colour, the constants of bloodseg.stain).
// When the Python rule changes, change this function to match: the parity test
// (tests/test_tryit_page.py) compares the two on every vendored photograph.
//
// Images are OpenCV.js Mats, BGR, 8 bits per channel, as in the Python package.

/** bloodseg.stain.background_colour: per channel (B, G, R), the median of the pixels whose luma
 *  is at or above its `quantile` (0.7), on every `stride`-th pixel of every `stride`-th row. */
export function backgroundColour(cv, bgr, rule) {
  const { rows: h, cols: w } = bgr;
  const stride = rule.stride;
  const hs = Math.ceil(h / stride), ws = Math.ceil(w / stride);
  const small = new cv.Mat(hs, ws, cv.CV_8UC3);
  const src = bgr.data, dst = small.data;   // (no OpenCV.js call in between: the views stay valid)
  for (let y = 0, k = 0; y < h; y += stride) {
    for (let x = 0; x < w; x += stride, k += 3) {
      const i = (y * w + x) * 3;
      dst[k] = src[i]; dst[k + 1] = src[i + 1]; dst[k + 2] = src[i + 2];
    }
  }
  const grey = new cv.Mat();
  cv.cvtColor(small, grey, cv.COLOR_BGR2GRAY);        // OpenCV's luma, as cv2.COLOR_BGR2GRAY
  const luma = grey.data.slice();
  const pixels = small.data.slice();   // after cvtColor: a fresh view (OpenCV.js memory may have grown)
  const cut = quantileLinear(luma, rule.quantile);
  const channels = [[], [], []];
  for (let k = 0; k < luma.length; k++) {
    if (luma[k] >= cut) for (let c = 0; c < 3; c++) channels[c].push(pixels[3 * k + c]);
  }
  small.delete(); grey.delete();
  return channels.map(medianOf);
}

/** numpy.quantile(values, q) with its default ("linear") method. */
function quantileLinear(values, q) {
  const sorted = Float64Array.from(values).sort();
  const n = sorted.length;
  const virtual = (n - 1) * q;
  const below = Math.floor(virtual);
  const a = sorted[below], b = sorted[Math.min(below + 1, n - 1)];
  const t = virtual - below;
  // numpy's _lerp: a + (b - a) t, computed from b's side when t >= 0.5
  return t >= 0.5 ? b - (b - a) * (1 - t) : a + (b - a) * t;
}

function medianOf(list) {
  const v = Float64Array.from(list).sort();
  const n = v.length, h = n >> 1;
  return n % 2 ? v[h] : (v[h - 1] + v[h]) / 2;
}

/** bloodseg.stain.match_background(image, reference): the photograph with per-channel gains that
 *  bring its background to `reference` (B, G, R), each gain within 1/max_gain..max_gain; a
 *  photograph with a background channel darker than `dark` grey levels (not a bright-field smear)
 *  is left as it is. Returns {image (a new Mat), background, gains (null when left as it is)}. */
export function matchBackground(cv, bgr, reference, rule) {
  const background = backgroundColour(cv, bgr, rule);
  if (background.some((v) => v < rule.dark)) return { image: bgr.clone(), background, gains: null };
  const gains = background.map((bg, c) => Math.min(Math.max(reference[c] / bg, 1 / rule.max_gain), rule.max_gain));
  return { image: whiteBalance(cv, bgr, gains), background, gains };
}

/** bloodseg.stain.white_balance: clip(image * float32(gain) + 0.5, 0, 255) truncated to 8 bits,
 *  per channel, in float32 arithmetic as numpy does it (one lookup table per channel). */
export function whiteBalance(cv, bgr, gains) {
  const luts = gains.map((g) => {
    const g32 = Math.fround(g);
    const lut = new Uint8Array(256);
    for (let v = 0; v < 256; v++) {
      const x = Math.fround(Math.fround(v * g32) + 0.5);
      lut[v] = Math.trunc(Math.min(Math.max(x, 0), 255));
    }
    return lut;
  });
  const out = bgr.clone();
  const d = out.data;
  for (let i = 0; i < d.length; i += 3) {
    d[i] = luts[0][d[i]]; d[i + 1] = luts[1][d[i + 1]]; d[i + 2] = luts[2][d[i + 2]];
  }
  return out;
}
