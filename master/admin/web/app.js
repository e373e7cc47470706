"use strict";
// Fills the page from /api/status every second. Every string from the master is put in with
// textContent, never as HTML: queue names, worker names and errors come from peers.
function row(table, cells, header) {
  const tr = table.insertRow();
  for (const c of cells) {
    const td = document.createElement(header ? "th" : "td");
    td.textContent = String(c);
    tr.appendChild(td);
  }
}
async function refresh() {
  try {
    const response = await fetch("api/status", { cache: "no-store" });
    const s = await response.json();
    document.getElementById("state").textContent = s.state;
    const queues = document.getElementById("queues");
    queues.replaceChildren();
    row(queues, ["queue", "pending", "leased", "succeeded", "dead"], true);
    for (const q of s.queues || []) row(queues, [q.queue, q.pending, q.leased, q.succeeded, q.dead]);
    const workers = document.getElementById("workers");
    workers.replaceChildren();
    row(workers, ["worker", "host", "slots", "running"], true);
    for (const w of s.workers || []) row(workers, [w.name, w.host, w.slots, w.running]);
    const failures = document.getElementById("failures");
    failures.replaceChildren();
    for (const f of s.failures || []) row(failures, [f.task_id, f.kind, f.error]);
  } catch (e) {
    document.getElementById("state").textContent = "unreachable: " + e;
  }
}
refresh();
setInterval(refresh, 1000);
