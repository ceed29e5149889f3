// streamflow dashboard: swaps in a live page's fragment from its server-sent events (a task's
// graph, the overview's tables); no dependencies.
// The server renders (and escapes) the fragment; this only swaps it in.
(function () {
  "use strict";
  var box = document.querySelector("[data-live]");
  if (!box || box.hasAttribute("data-done") || !window.EventSource) return;
  var source = new EventSource(box.getAttribute("data-live"));
  source.onmessage = function (event) {
    var doc = JSON.parse(event.data);
    box.querySelector(".live-body").innerHTML = doc.html;
    if (doc.done) {
      box.setAttribute("data-done", "1");
      source.close();
      var cancel = document.getElementById("cancel-task");
      if (cancel) cancel.closest("form").remove();
    }
  };
})();
