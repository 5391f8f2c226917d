// Loading the runtime: the settings, OpenCV.js, onnxruntime-web and the ONNX network, all from
// this book's own _static/tryit/ folder (nothing from a CDN). The three large files are stored
// gzipped (.gz); the browser unpacks them with its DecompressionStream, so any static web server
// can serve them as they are.

/** The bytes of `url` (unpacked when it ends in .gz) as an ArrayBuffer. */
export async function fetchBytes(url, what) {
  let response;
  try {
    response = await fetch(url);
  } catch (err) {
    throw new Error(`could not load ${what} from ${url} (${err.message})`);
  }
  if (!response.ok) {
    throw new Error(`could not load ${what}: ${url} answered HTTP ${response.status}. ` +
      'The book was probably built without it; see "If the page does not work" below.');
  }
  let body = response.body;
  if (url.endsWith('.gz')) body = body.pipeThrough(new DecompressionStream('gzip'));
  return new Response(body).arrayBuffer();
}

/** Run a classic script (from a URL) and wait until it has run. */
function runScript(src) {
  return new Promise((resolve, reject) => {
    const s = document.createElement('script');
    s.src = src;
    s.onload = resolve;
    s.onerror = () => reject(new Error(`could not run ${src}`));
    document.head.appendChild(s);
  });
}

/** OpenCV.js (one file, its WebAssembly inside). Resolves to {cv}, the namespace once it is ready:
 *  wrapped in an object because this build's namespace has a then() method (an Emscripten
 *  module), and a promise resolved with such an object would call it again and again. */
export async function loadOpenCV(url) {
  const bytes = await fetchBytes(url, 'OpenCV.js');
  const blobUrl = URL.createObjectURL(new Blob([bytes], { type: 'text/javascript' }));
  try {
    await runScript(blobUrl);
  } finally {
    URL.revokeObjectURL(blobUrl);
  }
  const cv = window.cv;
  if (cv instanceof Promise) return { cv: await cv };
  if (!cv.Mat) {
    await new Promise((resolve) => {
      if (cv.calledRun) resolve(); else cv.onRuntimeInitialized = resolve;
    });
  }
  return { cv };
}

/** onnxruntime-web, its WebAssembly build only, one thread (no cross-origin isolation needed). */
export async function loadOrt(vendor, settings) {
  await runScript(vendor + settings.vendor.ort_js);
  const ort = window.ort;
  ort.env.wasm.numThreads = 1;
  ort.env.wasm.proxy = false;
  ort.env.wasm.wasmPaths = vendor;            // where it finds its .mjs glue
  ort.env.wasm.wasmBinary = await fetchBytes(vendor + settings.vendor.ort_wasm, 'the onnxruntime WebAssembly');
  return ort;
}

/** Everything the page needs: {settings, cv, ort, session} (an object that holds cv, never cv
 *  itself: see loadOpenCV). `say(text)` reports progress. */
export async function loadRuntime(base, say) {
  say('Loading the settings…');
  const response = await fetch(base + 'model/settings.json');
  if (!response.ok) {
    throw new Error(`its settings are missing (${base}model/settings.json answered HTTP ${response.status}): ` +
      'the book was built without the page\'s files');
  }
  const settings = await response.json();
  if (!settings.vendor) {
    throw new Error('the book was built without the page\'s runtime (onnxruntime-web and OpenCV.js, which ' +
      '`make setup` fetches with npm). Run make setup on a machine with npm, then build the book again');
  }
  const vendor = base + 'vendor/';
  const mb = (n) => `${(n / 1e6).toFixed(1)} MB`;
  say(`Loading OpenCV.js (${mb(settings.weight.files['vendor/' + settings.vendor.opencv])})…`);
  const { cv } = await loadOpenCV(vendor + settings.vendor.opencv);
  say(`Loading onnxruntime-web (${mb(settings.weight.files['vendor/' + settings.vendor.ort_wasm])})…`);
  const ort = await loadOrt(vendor, settings);
  say(`Loading the network (${mb(settings.weight.files['model/' + settings.onnx.file])})…`);
  const model = await fetchBytes(base + 'model/' + settings.onnx.file, 'the network');
  const session = await ort.InferenceSession.create(new Uint8Array(model),
    { executionProviders: ['wasm'], graphOptimizationLevel: 'all' });
  return { settings, cv, ort, session };
}
