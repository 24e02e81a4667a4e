// Sorting and filtering of the leaderboard tables: no dependencies, no network.
"use strict";
function sortTable(table, th) {
  const col = th.dataset.col, numeric = th.dataset.type === "number";
  const dir = th.getAttribute("aria-sort") === "descending" ? "ascending" : "descending";
  table.querySelectorAll("th[aria-sort]").forEach(h => h.removeAttribute("aria-sort"));
  th.setAttribute("aria-sort", dir);
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  const key = r => r.querySelector(`td[data-col="${col}"]`).dataset.value;
  const name = r => r.querySelector('td[data-col="backbone"]').dataset.value;
  rows.sort((a, b) => {
    const x = key(a), y = key(b);
    if (x === "" && y !== "") return 1;
    if (y === "" && x !== "") return -1;
    let c = numeric ? Number(x) - Number(y) : x.localeCompare(y);
    if (dir === "descending") c = -c;
    return c !== 0 ? c : name(a).localeCompare(name(b));
  });
  rows.forEach(r => body.appendChild(r));
}
function applyFilters(table) {
  const selects = document.querySelectorAll(`select.filter[data-table="${table.id}"]`);
  const want = {};
  selects.forEach(s => { if (s.value !== "") want[s.dataset.axis] = s.value; });
  table.querySelectorAll("th.setting").forEach(th => {
    let show = true;
    for (const axis of Object.keys(want)) {
      if (axis in th.dataset && th.dataset[axis] !== want[axis]) show = false;
    }
    th.classList.toggle("hidden", !show);
    table.querySelectorAll(`td[data-col="${th.dataset.col}"]`).forEach(td => td.classList.toggle("hidden", !show));
  });
  Array.from(table.tBodies[0].rows).forEach(r => {
    const hide = ("family" in want && r.dataset.family !== want.family) ||
      ("size" in want && r.dataset.size !== want.size);
    r.classList.toggle("hidden", hide);
  });
}
document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("table.board").forEach(table => {
    table.querySelectorAll("th.sortable").forEach(th => th.addEventListener("click", () => sortTable(table, th)));
  });
  document.querySelectorAll("select.filter").forEach(s => s.addEventListener("change", () => {
    applyFilters(document.getElementById(s.dataset.table));
  }));
});
