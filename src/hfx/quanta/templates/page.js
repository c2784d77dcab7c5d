(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("cluster-data").textContent);
  const select = document.getElementById("cluster-select");
  const title = document.getElementById("cluster-title");
  const summary = document.getElementById("summary");
  const list = document.getElementById("examples");
  const clusters = data.clusters;
  let current = 0;

  function span(className, text) {
    const element = document.createElement("span");
    element.className = className;
    element.textContent = text;
    return element;
  }

  function render(example) {
    const item = document.createElement("li");
    item.appendChild(span("context", example.context));
    const mark = document.createElement("mark");
    mark.className = "token";
    mark.title = "token id " + example.token_id;
    mark.textContent = example.shown;
    item.appendChild(mark);
    const loss = example.loss_bits === null ? "nan" : example.loss_bits.toFixed(3);
    item.appendChild(span("loss", loss + " bits · doc " + example.doc_id + " · pos " + example.position));
    return item;
  }

  function show(index) {
    if (!clusters.length) return;
    current = ((index % clusters.length) + clusters.length) % clusters.length;
    const cluster = clusters[current];
    select.value = String(cluster.id);
    title.textContent = cluster.label;
    title.dataset.cluster = String(cluster.id);
    const shown = cluster.examples.length;
    summary.textContent = cluster.summary +
      (shown < cluster.size ? " (showing " + shown + " of " + cluster.size + ", lowest loss first)" : "");
    list.replaceChildren.apply(list, cluster.examples.map(render));
    try { history.replaceState(null, "", "#cluster-" + cluster.id); } catch (error) { /* file: URLs */ }
  }

  function indexOf(id) {
    return clusters.findIndex(function (cluster) { return String(cluster.id) === String(id); });
  }

  select.addEventListener("change", function () { show(indexOf(select.value)); });
  document.getElementById("prev").addEventListener("click", function () { show(current - 1); });
  document.getElementById("next").addEventListener("click", function () { show(current + 1); });
  window.addEventListener("keydown", function (event) {
    if (event.altKey || event.ctrlKey || event.metaKey) return;
    const tag = event.target && event.target.tagName;
    if (tag === "INPUT" || tag === "TEXTAREA") return;
    if (event.key === "ArrowRight") { event.preventDefault(); show(current + 1); }
    else if (event.key === "ArrowLeft") { event.preventDefault(); show(current - 1); }
  }, true);

  const fromHash = indexOf(location.hash.replace(/^#cluster-/, ""));
  show(fromHash >= 0 ? fromHash : 0);
})();
