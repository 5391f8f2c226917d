// THE SCALE RULE — mirrors bloodseg.Segmenter.scale_for when the Segmenter's `scale` setting is
// "auto": on a crop (bloodseg.scale.is_crop) bloodseg.Segmenter._crop_scale (cropScale below), on
// a whole field bloodseg.scale.auto_scale (autoScale below, with bloodseg.scale.red_cell_diameter,
// bloodseg.scale._opened_areas and bloodseg.colour.stain_masks).
//
// A crop — a picture whose shorter side is below rules.scale.crop_side px (bloodseg.scale.CROP_SIDE),
// cut around a few cells — has too few whole red cells to measure: the ones cut by its border look
// small. The network is run at each of rules.scale.crop_factors (bloodseg.scale.CROP_FACTORS) times
// the trained scale, and the factor at which it is most confident (the highest mean, over the
// picture, of its largest class probability) is kept, with the probabilities of that pass.
//
// On a whole field, red cells are the ruler of a smear. The rule finds the red-cell colour (pink in
// Lab, an Otsu cut), measures the typical red-cell diameter with a granulometry (openings by discs
// of growing radius; the radius at which half the red area is gone is the area-weighted median
// cell), and resizes the photograph so that its red cells are as wide, in the network's pixels, as
// those of the training photographs. Close to the trained scale (within the tolerance), the
// trained scale.
//
// Every number comes from the settings exported with the network (settings.json:
// segmenter.red_cell_diameter and segmenter.input_scale; rules.scale, the constants of
// bloodseg.scale and bloodseg.colour). When the Python rule changes, change this module to
// match: the parity test (tests/test_tryit_page.py) compares the factors and masks, on whole
// photographs and on crops.

import { fillHoles } from './morphology.js';
import { claheOnLuma, predictProbabilities } from './network.js';

/** bloodseg.colour.stain_masks: {purple, pink} (Uint8Arrays of 0/1) of a BGR Mat, from the
 *  CLAHE'd image in OpenCV's 8-bit Lab: purple = b* more than `purple_below_median` below the
 *  median b*; pink = a* above an Otsu cut computed on the other pixels. */
export function stainMasks(cv, bgr, rule, clahe) {
  const enhanced = claheOnLuma(cv, bgr, clahe);
  const lab = new cv.Mat();
  cv.cvtColor(enhanced, lab, cv.COLOR_BGR2Lab);
  // a copy: views of OpenCV.js memory go stale when a later call makes its heap grow
  const d = lab.data.slice(), N = bgr.rows * bgr.cols;
  const hist = new Float64Array(256);
  for (let i = 0; i < N; i++) hist[d[3 * i + 2]] += 1;
  const cutB = Math.trunc(histogramMedian(hist, N)) - rule.purple_below_median;
  const purple = new Uint8Array(N), pink = new Uint8Array(N);
  let nRest = 0;
  for (let i = 0; i < N; i++) { purple[i] = d[3 * i + 2] < cutB ? 1 : 0; if (!purple[i]) nRest++; }
  if (nRest > 0) {
    const rest = new cv.Mat(1, nRest, cv.CV_8UC1);
    const rd = rest.data;
    for (let i = 0, k = 0; i < N; i++) if (!purple[i]) rd[k++] = d[3 * i + 1];
    const ignored = new cv.Mat();
    const cutA = cv.threshold(rest, ignored, 0, 255, cv.THRESH_BINARY + cv.THRESH_OTSU);
    for (let i = 0; i < N; i++) pink[i] = d[3 * i + 1] > cutA && !purple[i] ? 1 : 0;
    rest.delete(); ignored.delete();
  }
  enhanced.delete(); lab.delete();
  return { purple, pink };
}

/** numpy.median of 8-bit values given as a histogram of n values. */
function histogramMedian(hist, n) {
  const at = (k) => { let s = 0; for (let v = 0; v < 256; v++) { s += hist[v]; if (s > k) return v; } return 255; };
  return n % 2 ? at((n - 1) / 2) : (at(n / 2 - 1) + at(n / 2)) / 2;
}

/** bloodseg.scale._opened_areas: the area of the opening of `binary` by a disc of each radius
 *  (erosion = distance > r; dilation = distance to the eroded set <= r), with OpenCV's exact
 *  Euclidean distance transform (DIST_MASK_PRECISE), as in Python. It stops (the rest left at 0)
 *  after the first radius whose area is at most `stop` times the first area: red_cell_diameter
 *  reads the areas only up to there, so the answer is the same, sooner. */
function openedAreas(cv, binary, width, height, radii, stop = 0) {
  const src = new cv.Mat(height, width, cv.CV_8UC1);
  src.data.set(binary);
  const inside = new cv.Mat();
  cv.distanceTransform(src, inside, cv.DIST_L2, cv.DIST_MASK_PRECISE);
  const din = inside.data32F.slice();
  const areas = new Float64Array(radii.length);
  const notEroded = new cv.Mat(height, width, cv.CV_8UC1);
  const toEroded = new cv.Mat();
  for (let i = 0; i < radii.length; i++) {
    const r = radii[i];
    const ne = notEroded.data;
    let any = false;
    for (let p = 0; p < din.length; p++) { const e = din[p] > r; ne[p] = e ? 0 : 1; if (e) any = true; }
    if (!any) break;                                   // areas[i:] stay 0
    cv.distanceTransform(notEroded, toEroded, cv.DIST_L2, cv.DIST_MASK_PRECISE);
    const dt = toEroded.data32F;
    let count = 0;
    for (let p = 0; p < dt.length; p++) if (dt[p] <= r) count++;
    areas[i] = count;
    if (i > 0 && count <= stop * areas[0]) break;
  }
  src.delete(); inside.delete(); notEroded.delete(); toEroded.delete();
  return areas;
}

/** bloodseg.scale.red_cell_diameter: the typical red-cell diameter in pixels of a BGR Mat, or
 *  null when it cannot tell (too little red-cell colour, or no size stands out). */
export function redCellDiameter(cv, bgr, rule, clahe) {
  const { rows: h, cols: w } = bgr;
  if (Math.min(h, w) < 16) return null;
  const pink = fillHoles(stainMasks(cv, bgr, rule, clahe).pink, w, h);
  const top = Math.min(h, w) / 4.0;
  const n = Math.floor(Math.log(top / rule.min_radius) / Math.log(rule.ratio)) + 1;
  if (n < 3) return null;
  const radii = Float64Array.from({ length: n }, (_, i) => rule.min_radius * rule.ratio ** i);
  // the area-weighted quartiles and median: the fractions of the red area that a disc removes
  const QUANTILES = [0.75, 0.5, 0.25];
  const areas = openedAreas(cv, pink, w, h, radii, Math.min(...QUANTILES));
  if (areas[0] < rule.min_fraction * h * w) return null;
  // the radius at which the opened area falls to q of the area that survives the smallest disc
  // (interpolated on log radius); q = 0.5: the area-weighted median cell
  const fallsTo = (q) => {
    let j = -1;
    for (let i = 0; i < n; i++) if (areas[i] <= q * areas[0]) { j = i; break; }
    if (j < 0) return null;
    const a0 = areas[j - 1], a1 = areas[j];
    const t = a0 > a1 ? (a0 - q * areas[0]) / (a0 - a1) : 0.0;
    return radii[j - 1] * rule.ratio ** t;
  };
  const [r25, r50, r75] = QUANTILES.map(fallsTo);
  if (r50 === null || r25 === null || r75 === null || r75 / r25 > rule.max_spread) return null;
  return 2.0 * r50;
}

/** bloodseg.scale.auto_scale(image, target_diameter, trained_scale): the factor that brings the
 *  red cells to `target` network pixels, clamped to [lo, hi]; the trained scale when they cannot
 *  be measured or the factor is within `tolerance` of it. Returns {factor, diameter}. */
export function autoScale(cv, bgr, target, trainedScale, rule, clahe) {
  const d = redCellDiameter(cv, bgr, rule, clahe);
  if (d === null || !(d > 0)) return { factor: trainedScale, diameter: d };
  const factor = target / d;
  if (Math.abs(factor / trainedScale - 1.0) <= rule.tolerance) return { factor: trainedScale, diameter: d };
  return { factor: Math.min(Math.max(factor, rule.lo), rule.hi), diameter: d };
}

/** bloodseg.scale.is_crop: whether a picture is a crop (its shorter side below rule.crop_side px),
 *  not a whole field. */
export function isCrop(bgr, rule) {
  return Math.min(bgr.rows, bgr.cols) < rule.crop_side;
}

/** The mean over the pixels of the largest class probability (`probs`: C planes of N pixels), as
 *  float(probs.max(0).values.mean()) in Python: summed in double precision, then rounded to
 *  float32 as torch's float32 mean is. */
export function meanConfidence(probs, C, N) {
  let sum = 0;
  for (let i = 0; i < N; i++) {
    let m = probs[i];
    for (let c = 1; c < C; c++) if (probs[c * N + i] > m) m = probs[c * N + i];
    sum += m;
  }
  return Math.fround(sum / N);
}

/** bloodseg.Segmenter._crop_scale: on a crop, the network at each of rule.crop_factors x the
 *  trained scale; the factor with the highest mean confidence is kept (a later factor must beat
 *  the best so far by more than rule.crop_tie, so a tie goes to the earlier, smaller factor), with
 *  its pass of the network, which the pipeline then uses for the mask. Returns {factor, net
 *  (predictProbabilities' answer at that factor), passes: [{multiple, factor, confidence, tiles}],
 *  chosen (index into passes)}. `onPass(i, n, factor)` is called before each pass. */
export async function cropScale(cv, ort, session, bgr, trainedScale, settings, onPass, onTile) {
  const rule = settings.rules.scale;
  const C = settings.segmenter.class_names.length, N = bgr.rows * bgr.cols;
  const passes = [];
  let best = null;
  for (let i = 0; i < rule.crop_factors.length; i++) {
    const multiple = rule.crop_factors[i];
    const factor = multiple * trainedScale;
    if (onPass) await onPass(i + 1, rule.crop_factors.length, factor);
    const net = await predictProbabilities(cv, ort, session, bgr, factor, settings, onTile);
    const confidence = meanConfidence(net.probs, C, N);
    passes.push({ multiple, factor, confidence, tiles: net.tiles });
    if (best === null || confidence > best.confidence + rule.crop_tie) best = { factor, net, confidence, chosen: i };
  }
  return { factor: best.factor, net: best.net, passes, chosen: best.chosen };
}
