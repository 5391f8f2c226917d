// One photograph, from pixels to mask and counts: the path of bloodseg.Segmenter.segment() with
// the settings of the shipped checkpoint (what `bloodseg predict` and `bloodseg count` do without
// options), step by step:
//
//   1. Segmenter.prepare     -> colour_rule.js  matchBackground  (bloodseg.stain.match_background)
//   2. Segmenter.scale_for   -> scale_rule.js   on a crop (isCrop, bloodseg.scale.is_crop):
//                                                  cropScale (bloodseg.Segmenter._crop_scale), the
//                                                  network at each crop factor, the most confident
//                                                  pass kept; on a whole field: autoScale
//                                                  (bloodseg.scale.auto_scale)
//   3. predict_probabilities -> network.js      predictProbabilities (bloodseg.infer); on a crop,
//                                                  the chosen pass of step 2, as Segmenter.segment
//   4. argmax, then clean_white_cells at min_area_at(spec, factor), then on a crop with
//      crop_cells 'centre' keep_crop_cell                      -> count.js (bloodseg.postprocess)
//   5. count_cells and instances -> count.js (bloodseg.count, bloodseg.instances)
//
// The settings (settings.json) are the ONNX file's own metadata, written when the book was built.

import { matchBackground } from './colour_rule.js';
import { autoScale, cropScale, isCrop } from './scale_rule.js';
import { predictProbabilities } from './network.js';
import { cleanWhiteCells, countCells, instances, keepCropCell, minAreaAt } from './count.js';

const now = () => performance.now();

/** Segment and count one photograph. `rt`: {cv, ort, session, settings}; `bgr`: an OpenCV.js
 *  Mat (8-bit BGR, not changed). `progress(text)`: called between the steps.
 *  Returns the mask (Uint8Array, 0/1/2), the class probabilities, the counts, the per-cell rows,
 *  the factor and what the colour and scale rules measured (`crop`: null on a whole field; on a
 *  crop, the confidence of each pass and the one chosen), and the time of each step (ms; on a crop
 *  ms.scale holds the network's passes and ms.network is 0). */
export async function segmentPhotograph(rt, bgr, progress = async () => {}) {
  const { cv, ort, session, settings } = rt;
  const seg = settings.segmenter;
  const width = bgr.cols, height = bgr.rows, N = width * height;
  const ms = {};
  if (seg.tta) throw new Error('this network asks for test-time flips (tta), which the page does not do');

  // 1. the colour rule (Segmenter.prepare)
  let t = now();
  await progress('colour: matching the background');
  let colour = { image: bgr.clone(), background: null, gains: null };
  if (seg.colour === 'background') colour = matchBackground(cv, bgr, seg.background, settings.rules.colour);
  const prepared = colour.image;
  ms.colour = now() - t;

  // 2. the scale rule (Segmenter.scale_for): on a crop, Segmenter._crop_scale runs the network at
  //    each crop factor and Segmenter.segment keeps the chosen pass's probabilities
  t = now();
  let scale = { factor: seg.input_scale, diameter: null, crop: null };
  let net = null;
  try {
    if (seg.scale === 'auto' && isCrop(prepared, settings.rules.scale)) {
      let pass = '';
      const crop = await cropScale(cv, ort, session, prepared, seg.input_scale, settings,
        (i, n, f) => {
          pass = `scale: a crop, the network at ${Number(f.toPrecision(4))} (${i} of ${n})`;
          return progress(pass);
        },
        (done, total) => (total > 1 ? progress(`${pass}, tile ${done} of ${total}`) : undefined));
      scale = { factor: crop.factor, diameter: null, crop: { passes: crop.passes, chosen: crop.chosen } };
      net = crop.net;
    } else if (seg.scale === 'auto') {
      await progress('scale: measuring the red cells');
      const measured = autoScale(cv, prepared, seg.red_cell_diameter, seg.input_scale, settings.rules.scale,
        settings.rules.clahe);
      scale = { ...measured, crop: null };
    }
    ms.scale = now() - t;

    // 3. the network (bloodseg.infer.predict_probabilities at that factor), unless the crop rule ran it
    t = now();
    if (net === null) {
      await progress('network: running');
      net = await predictProbabilities(cv, ort, session, prepared, scale.factor, settings,
        (done, total) => progress(`network: tile ${done} of ${total}`));
    }
  } finally {
    prepared.delete();
  }
  const factor = scale.factor;
  const probs = net.probs;
  ms.network = now() - t;

  // 4. argmax over the classes (the first on a tie, as torch), then the white-cell cleanup
  t = now();
  await progress('cleanup');
  const C = seg.class_names.length;
  const raw = new Uint8Array(N);
  for (let i = 0; i < N; i++) {
    let best = 0, bestP = probs[i];
    for (let c = 1; c < C; c++) if (probs[c * N + i] > bestP) { bestP = probs[c * N + i]; best = c; }
    raw[i] = best;
  }
  const spec = seg.postprocess;
  let mask = spec ? cleanWhiteCells(raw, probs, width, height, minAreaAt(spec, factor), spec.fill_white_holes) : raw;
  // the crop rule (Segmenter._crop_rule): on a crop, the white cells its border cuts go, but its own
  if (seg.crop_cells === 'centre' && Math.min(width, height) < settings.rules.scale.crop_side) {
    mask = keepCropCell(mask, width, height);
  }
  ms.cleanup = now() - t;

  // 5. counting (bloodseg.count.count_cells) and one row per cell (bloodseg.instances.instances)
  t = now();
  await progress('counting');
  const counted = countCells(cv, mask, width, height);
  const cells = instances(counted, probs, width, height);
  ms.count = now() - t;
  ms.total = ms.colour + ms.scale + ms.network + ms.cleanup + ms.count;

  const { white_labels: _w, red_labels: _r, ...counts } = counted;
  return {
    mask, probs, width, height, factor, counts, rows: cells.rows, ms,
    diameter: scale.diameter, crop: scale.crop, background: colour.background, gains: colour.gains,
    networkWidth: net.networkWidth, networkHeight: net.networkHeight, tiles: net.tiles,
  };
}
