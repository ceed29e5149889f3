// streamflow dashboard: swaps in a live page's fragments from its server-sent events (a task's
// graph, events and result; the overview's tables); no dependencies.
// The server renders (and escapes) each fragment; this only swaps it into the element of the
// same id. Nothing around a fragment moves: a scroll box keeps its position, or keeps
// following the newest rows when it was scrolled to its end.
(function () {
  "use strict";
  var box = document.querySelector("[data-live]");
  if (!box || box.hasAttribute("data-done") || !window.EventSource) return;

  function atEnd(scroller) {
    return scroller.scrollTop + scroller.clientHeight >= scroller.scrollHeight - 4;
  }

  function swap(id, html) {
    var target = document.getElementById(id);
    if (!target) return;
    var scroller = target.closest(".timeline");
    var follow = scroller && scroller.scrollTop > 0 && atEnd(scroller);
    target.innerHTML = html;
    if (follow) scroller.scrollTop = scroller.scrollHeight;
  }

  var source = new EventSource(box.getAttribute("data-live"));
  source.onmessage = function (event) {
    var doc = JSON.parse(event.data);
    Object.keys(doc.parts).forEach(function (id) { swap(id, doc.parts[id]); });
    if (doc.ended) {
      // Turned off, not removed: the title row keeps its layout.
      var cancel = document.getElementById("cancel-task");
      if (cancel) cancel.disabled = true;
    }
    if (doc.done) {
      box.setAttribute("data-done", "1");
      source.close();
    }
  };
})();
