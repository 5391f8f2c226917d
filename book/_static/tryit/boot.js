// The first script of the "Try it on your own smear" page: a plain (non-module) script, so that it
// runs everywhere, even where the page itself cannot. It checks what the page needs and says
// plainly what is missing instead of leaving a blank page; then it loads page.js.
(function () {
  'use strict';
  var app = document.getElementById('tryit-app');
  if (!app) return;
  var base = document.currentScript.src.replace(/[^/]*$/, '');

  function say(kind, text) {
    var box = document.createElement('div');
    box.className = 'tryit-message tryit-' + kind;
    box.setAttribute('role', 'alert');
    box.textContent = text;
    app.innerHTML = '';
    app.appendChild(box);
    document.documentElement.setAttribute('data-tryit', 'unavailable');
  }

  if (location.protocol === 'file:') {
    say('refusal', 'This page runs the network in your browser, and browsers let a page load its ' +
      'WebAssembly and data files only when it comes from a web server, not from a file. Serve the ' +
      'built book, e.g. python -m http.server -d _build/html 8000, then open ' +
      'http://localhost:8000/book/try_it.html (nothing leaves your computer).');
    return;
  }
  if (typeof WebAssembly !== 'object' || typeof WebAssembly.instantiate !== 'function') {
    say('refusal', 'This browser has no WebAssembly (or it is switched off), and the network runs in ' +
      'WebAssembly. Use a current Firefox, Chrome, Edge or Safari with WebAssembly enabled, or run ' +
      'bloodseg predict on your computer.');
    return;
  }
  if (typeof DecompressionStream === 'undefined' || typeof createImageBitmap === 'undefined' ||
      typeof OffscreenCanvas === 'undefined') {
    say('refusal', 'This browser is too old for this page (it lacks DecompressionStream, ' +
      'createImageBitmap or OffscreenCanvas). Use a current Firefox, Chrome, Edge or Safari, or run ' +
      'bloodseg predict on your computer.');
    return;
  }

  // anything that escapes the page's own error handling still gives a message, never a blank page
  function oops(what) {
    var box = app.querySelector('.tryit-message') || document.createElement('div');
    box.className = 'tryit-message tryit-refusal';
    box.hidden = false;
    box.textContent = 'Something went wrong: ' + what + '. Reload the page; if it happens again, please report it.';
    if (!box.parentNode) app.appendChild(box);
  }
  window.addEventListener('error', function (e) { oops(e.message || 'a script error'); });
  window.addEventListener('unhandledrejection', function (e) {
    if (e.reason && e.reason.refusal) return;
    if (document.documentElement.getAttribute('data-tryit') === 'failed') return;  // already reported
    oops(e.reason && e.reason.message ? e.reason.message : String(e.reason));
  });

  var s = document.createElement('script');
  s.type = 'module';
  s.src = base + 'page.js';
  s.onerror = function () {
    say('refusal', 'The page\'s scripts could not be loaded from ' + base + '. The book may have been ' +
      'built without them; see "If the page does not work" below.');
  };
  document.head.appendChild(s);
})();
