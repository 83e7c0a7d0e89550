// fedcrm officer pages: point read-outs on the ε burn-down charts (no dependencies).
"use strict";
document.querySelectorAll("figure.chart").forEach(function (figure) {
  var readout = figure.querySelector("output.readout");
  figure.querySelectorAll("circle.point").forEach(function (point) {
    point.addEventListener("mouseenter", function () {
      figure.querySelectorAll("circle.point.active").forEach(function (p) { p.classList.remove("active"); });
      point.classList.add("active");
      readout.textContent = "run " + point.dataset.run + ", round " + point.dataset.round +
        ": cumulative ε = " + Number(point.dataset.epsilon).toPrecision(4);
    });
  });
  figure.dataset.ready = "true";
});
