// Job page: poll the JSON API until the job is terminal, then re-render; drive the opacity slider.
(function () {
  "use strict";
  var slider = document.getElementById("opacity");
  var heat = document.getElementById("cam-layer");
  var out = document.getElementById("opacity-value");
  if (slider && heat) {
    var apply = function () {
      heat.style.opacity = String(slider.value / 100);
      if (out) { out.textContent = slider.value + "%"; }
    };
    slider.addEventListener("input", apply);
    apply();
  }

  var status = document.getElementById("job-status");
  if (!status || status.dataset.terminal === "true") { return; }
  var current = status.dataset.status;
  var delay = 1000;
  function poll() {
    fetch(status.dataset.api, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (resp) {
        if (resp.status === 401) { window.location.reload(); return null; }
        return resp.ok ? resp.json() : null;
      })
      .then(function (job) {
        if (job && job.status && job.status !== current) {
          // The server renders every state; a reload shows the new one in full.
          window.location.reload();
          return;
        }
        delay = Math.min(delay * 1.5, 10000);
        window.setTimeout(poll, delay);
      })
      .catch(function () { window.setTimeout(poll, 5000); });
  }
  window.setTimeout(poll, delay);
})();
