"use strict";
// The master's status page: asks api/status every second and redraws from its answer. Every
// string from the master (queue, worker and host names, kinds, labels, errors) goes into the page
// as textContent or as an attribute set through the DOM, never as markup: peers chose them.
// Cells that show numbers carry data-field and the raw number in data-value, so that tests and
// scripts read the page without parsing formatted text.

const REFRESH_MS = 1000;
// A fetch not answered by then is abandoned, and the next one started, rather than waiting on
// a master that accepted the connection and hung.
const FETCH_TIMEOUT_MS = 5000;
const CHART_SPAN_MIN_MS = 60 * 1000;
const CHART_SPAN_MAX_MS = 10 * 60 * 1000;
// Samples averaged for the throughput tile: one interval alone jumps with every batch.
const THROUGHPUT_SAMPLES = 5;
// Characters of an error shown in the failures table; the cell's title holds all of it.
const ERROR_SHOWN = 140;
// The lowest latency a log axis shows: the master's histograms start at 1 ms.
const LATENCY_FLOOR_MS = 0.1;

const numbers = new Intl.NumberFormat("en-US");

let lastStatus = null;  // the last status shown, kept when the master stops answering
let lastOkAt = 0;       // Date.now() when it came

function $(id) {
  return document.getElementById(id);
}

function tile(name) {
  return document.querySelector(`[data-tile="${name}"]`);
}

function make(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = String(text);
  return e;
}

function fmtInt(n) {
  return Number.isFinite(n) ? numbers.format(n) : "–";
}

// 850 ms, 12.3 s, 4m 05s, 3h 12m, 2d 03h.
function fmtDuration(ms) {
  if (!Number.isFinite(ms) || ms < 0) return "–";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  const s = ms / 1000;
  if (s < 10) return `${s.toFixed(1)} s`;
  if (s < 60) return `${Math.floor(s)} s`;
  const pad = (n) => String(n).padStart(2, "0");
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${pad(Math.floor(s % 60))}s`;
  const h = Math.floor(m / 60);
  if (h < 24) return `${h}h ${pad(m % 60)}m`;
  return `${Math.floor(h / 24)}d ${pad(h % 24)}h`;
}

function fmtRate(perSecond) {
  if (!Number.isFinite(perSecond)) return "–";
  return perSecond < 10 ? perSecond.toFixed(1) : fmtInt(Math.round(perSecond));
}

function fmtClock(ms) {
  return new Date(ms).toLocaleTimeString("en-GB", { hour12: false });
}

// A table cell showing `value` (formatted by `format`) with the raw number in data-value.
function numCell(field, value, format = fmtInt) {
  const td = make("td", "num", format(value));
  td.dataset.field = field;
  td.dataset.value = String(value);
  return td;
}

function textCell(field, text, className) {
  const td = make("td", className ? `text ${className}` : "text", text);
  td.dataset.field = field;
  return td;
}

function setTile(name, value, text, sub) {
  const e = tile(name);
  e.textContent = text;
  e.dataset.value = String(value);
  tile(`${name}-sub`).textContent = sub;
}

function fillTable(id, rows) {
  $(id).tBodies[0].replaceChildren(...rows);
  $(`${id}-empty`).hidden = rows.length > 0;
}

// connected, draining, silent (connected, but no heartbeat for silent_after_ms: the master
// says so) or disconnected.
function workerState(w, silentAfterMs) {
  if (!w.connected) return "disconnected";
  if (w.silent ?? w.heartbeat_age_ms >= silentAfterMs) return "silent";
  return w.draining ? "draining" : "connected";
}

const WORKER_STATE_ORDER = ["connected", "draining", "silent", "disconnected"];

function renderHeader(s) {
  $("master").textContent = s.listen || "–";
  $("version").textContent = s.version || "–";
  $("epoch").textContent = s.epoch === undefined ? "–" : String(s.epoch);
  // With the queues split into partitions, this page counts the ones served here.
  const partitioned = (s.partition_count ?? 0) > 1;
  $("partitions-fact").hidden = !partitioned;
  if (partitioned) {
    const others = (s.other_masters ?? []).join(", ");
    $("partitions").textContent = `${(s.partitions ?? []).join(", ") || "none"} of ` +
        `${s.partition_count}` + (others ? ` · others at ${others}` : "");
  }
  $("updated").textContent = fmtClock(s.time_ms);
  const state = $("state");
  state.textContent = s.state;
  // Serving is green; recovering and stopping pass (amber); a store that cannot write is red.
  const tone = s.state === "serving" ? "ok" : s.state === "store_failing" ? "bad" : "warn";
  state.className = `state state-${tone}`;
  $("reason").textContent = s.reason || "";
  document.title = s.state === "serving" ? `taskmaster · ${s.listen}` : `taskmaster · ${s.state}`;
}

function renderTiles(s, queues, workers) {
  const silentAfter = s.silent_after_ms;
  let connected = 0, draining = 0, silent = 0, slots = 0, busy = 0;
  for (const w of workers) {
    const state = workerState(w, silentAfter);
    if (state === "disconnected") continue;
    connected++;
    if (state === "draining") draining++;
    if (state === "silent") silent++;
    slots += w.slots;
    busy += Math.min(w.slots, w.running + w.stuck);
  }
  const notes = [];
  if (draining) notes.push(`${draining} draining`);
  if (silent) notes.push(`${silent} silent`);
  if (workers.length > connected) notes.push(`${workers.length - connected} gone`);
  setTile("workers", connected, `${fmtInt(connected)} / ${fmtInt(workers.length)}`,
          notes.join(" · ") || (workers.length ? "all connected" : "none has connected"));
  setTile("slots", busy, `${fmtInt(busy)} / ${fmtInt(slots)}`, `${fmtInt(slots - busy)} free`);

  let pending = 0, delayed = 0, leased = 0, dead = 0, failed = 0, oldest = 0;
  for (const q of queues) {
    pending += q.pending;
    delayed += q.delayed;
    leased += q.leased;
    dead += q.dead;
    failed += q.failed;
    oldest = Math.max(oldest, q.oldest_ready_age_ms);
  }
  const oldestText = pending > delayed ? fmtDuration(oldest) : "–";
  setTile("pending", pending, fmtInt(pending),
          `${fmtInt(delayed)} delayed · oldest ${oldestText}`);
  const busyQueues = queues.filter((q) => q.leased > 0).length;
  setTile("leased", leased, fmtInt(leased),
          `in ${fmtInt(busyQueues)} of ${fmtInt(queues.length)} queues`);
  setTile("dead", dead, fmtInt(dead), `${fmtInt(failed)} failed attempts`);

  const history = s.history || { interval_ms: 1000, samples: [] };
  const recent = history.samples.slice(-THROUGHPUT_SAMPLES);
  const seconds = (recent.length * history.interval_ms) / 1000;
  const sum = (key) => recent.reduce((total, x) => total + x[key], 0);
  const completedRate = seconds > 0 ? sum("completed") / seconds : NaN;
  const failedRate = seconds > 0 ? sum("failed") / seconds : NaN;
  setTile("throughput", completedRate, `${fmtRate(completedRate)}/s`,
          `done, last ${fmtInt(seconds)} s · ${fmtRate(failedRate)}/s failed`);
}

function renderQueues(queues) {
  const rows = queues.map((q) => {
    const tr = make("tr");
    tr.dataset.queue = q.queue;
    tr.append(textCell("queue", q.queue, "name"), numCell("pending", q.pending),
              numCell("delayed", q.delayed), numCell("leased", q.leased));
    const done = numCell("done", q.succeeded + q.dead + q.cancelled);
    done.dataset.succeeded = String(q.succeeded);
    done.dataset.cancelled = String(q.cancelled);
    done.title =
      `${fmtInt(q.succeeded)} succeeded, ${fmtInt(q.dead)} dead, ${fmtInt(q.cancelled)} cancelled`;
    const failed = numCell("failed", q.failed);
    failed.title = `${fmtInt(q.retried)} retried, ${fmtInt(q.redelivered)} redelivered`;
    const dead = numCell("dead", q.dead);
    if (q.dead > 0) dead.classList.add("bad");
    const ready = q.pending - q.delayed;
    const oldest = numCell("oldest_ready_age_ms", q.oldest_ready_age_ms,
                           (ms) => (ready > 0 ? fmtDuration(ms) : "–"));
    tr.append(done, failed, dead, oldest);
    return tr;
  });
  fillTable("queues", rows);
  $("queue-count").textContent = queues.length ? String(queues.length) : "";
}

function loadCell(w) {
  const td = make("td", "load");
  td.dataset.field = "running";
  td.dataset.value = String(w.running);
  const bar = make("span", "bar");
  const fill = make("span", "fill");
  const share = w.slots > 0 ? Math.min(1, w.running / w.slots) : 0;
  fill.style.width = `${Math.round(share * 100)}%`;
  if (share >= 1) fill.classList.add("full");
  bar.append(fill);
  td.append(bar, make("span", "num", `${fmtInt(w.running)}/${fmtInt(w.slots)}`));
  td.title = `${fmtInt(w.running)} running on ${fmtInt(w.slots)} slots`;
  return td;
}

function labelsOf(labels) {
  if (Array.isArray(labels)) return labels.map(String);
  return Object.entries(labels || {}).map(([k, v]) => `${k}=${v}`);
}

function renderWorkers(s, workers) {
  const sorted = workers
    .map((w) => ({ w, state: workerState(w, s.silent_after_ms) }))
    .sort((a, b) => WORKER_STATE_ORDER.indexOf(a.state) - WORKER_STATE_ORDER.indexOf(b.state) ||
                    a.w.name.localeCompare(b.w.name));
  const rows = sorted.map(({ w, state }) => {
    const tr = make("tr");
    tr.dataset.worker = w.name;
    tr.dataset.state = state;
    const name = textCell("name", w.name, "name");
    for (const label of labelsOf(w.labels)) name.append(make("span", "chip", label));
    const queues = (w.queues || []).join(", ");
    const kinds = (w.kinds || []).join(", ");
    const kindsCell = textCell("kinds", kinds, "clip");
    kindsCell.title = kinds;
    const stuck = numCell("stuck", w.stuck);
    if (w.stuck > 0) stuck.classList.add("bad");
    const stateCell = textCell("state", "");
    stateCell.append(make("span", `badge badge-${state}`, state));
    const heard = numCell("heartbeat_age_ms", w.heartbeat_age_ms, (ms) => `${fmtDuration(ms)} ago`);
    tr.append(name, textCell("host", w.host), textCell("queues", queues || "all"), kindsCell,
              numCell("slots", w.slots), loadCell(w), stuck, stateCell, heard);
    return tr;
  });
  fillTable("workers", rows);
  $("worker-count").textContent = workers.length ? String(workers.length) : "";
}

function renderFailures(failures) {
  const rows = failures.map((f) => {
    const tr = make("tr");
    tr.dataset.task = String(f.task_id);
    const time = textCell("time_ms", fmtClock(f.time_ms), "time");
    time.dataset.value = String(f.time_ms);
    time.title = new Date(f.time_ms).toString();
    const outcome = textCell("dead", "");
    outcome.dataset.value = f.dead ? "1" : "0";
    outcome.append(make("span", `badge badge-${f.dead ? "dead" : "retrying"}`,
                        f.dead ? "dead" : "retrying"));
    const error = String(f.error || "");
    const errorCell = textCell("error", error.length > ERROR_SHOWN
                                            ? `${error.slice(0, ERROR_SHOWN)}…` : error, "error");
    errorCell.title = error;
    tr.append(time, numCell("task_id", f.task_id, String), textCell("job_id", f.job_id, "mono"),
              textCell("queue", f.queue), textCell("kind", f.kind), textCell("worker", f.worker),
              numCell("attempt", f.attempt), outcome, errorCell);
    return tr;
  });
  fillTable("failures", rows);
  $("failure-count").textContent = failures.length ? String(failures.length) : "";
}

// ---- charts: lines over time on a <canvas>, drawn here without a library ----

const COLORS = {
  completed: "#16a34a",
  failed: "#dc2626",
  wait: "#2563eb",
  run: "#c2410c",
  grid: "#e5e7eb",
  axis: "#6b7280",
  text: "#374151",
};

// A round number at or above `v` (1, 2 or 5 times a power of ten).
function niceCeil(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function fmtAxisMs(ms) {
  if (ms < 1) return `${ms} ms`;
  if (ms < 1000) return `${Math.round(ms)} ms`;
  return ms < 60000 ? `${ms / 1000} s` : `${Math.round(ms / 60000)} min`;
}

function fmtAgo(ms) {
  if (ms <= 0) return "now";
  const m = Math.floor(ms / 60000);
  const s = Math.round((ms % 60000) / 1000);
  if (m === 0) return `-${s}s`;
  return s === 0 ? `-${m}m` : `-${m}m${String(s).padStart(2, "0")}s`;
}

// Draws `series` ([{label, color, dash, fill, points: [[time_ms, value or null]]}]) between
// times t0 and t1 with a linear axis from 0 or, with `log`, a logarithmic one; `format` labels
// the value axis, `empty` says what no data in the window means.
function drawChart(canvas, { series, log, t0, t1, format, empty }) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (width === 0 || height === 0) return;
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  ctx.font = "11px system-ui, -apple-system, 'Segoe UI', sans-serif";
  const left = 58, right = 14, top = 30, bottom = 24;
  const plotW = width - left - right;
  const plotH = height - top - bottom;
  if (plotW <= 0 || plotH <= 0) return;

  let lo = Infinity, hi = 0, count = 0;
  for (const s of series) {
    for (const [t, v] of s.points) {
      if (v === null || t < t0) continue;
      lo = Math.min(lo, v);
      hi = Math.max(hi, v);
      count++;
    }
  }
  let ticks, y;
  if (log) {
    const floor = Math.pow(10, Math.floor(Math.log10(Math.max(count ? lo : 1, LATENCY_FLOOR_MS))));
    let ceil = Math.pow(10, Math.ceil(Math.log10(Math.max(hi, floor * 10))));
    if (ceil <= floor) ceil = floor * 10;
    const decades = Math.round(Math.log10(ceil / floor));
    ticks = [];
    for (let i = 0; i <= decades; i++) ticks.push(floor * Math.pow(10, i));
    y = (v) => top + plotH * (1 - Math.log10(Math.max(v, floor) / floor) / decades);
  } else {
    const max = niceCeil(hi);
    ticks = [0, max / 4, max / 2, (3 * max) / 4, max];
    y = (v) => top + plotH * (1 - v / max);
  }
  const x = (t) => left + (plotW * (t - t0)) / (t1 - t0);

  // Grid and the value axis.
  ctx.lineWidth = 1;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (const tick of ticks) {
    const ty = Math.round(y(tick)) + 0.5;
    ctx.strokeStyle = COLORS.grid;
    ctx.beginPath();
    ctx.moveTo(left, ty);
    ctx.lineTo(left + plotW, ty);
    ctx.stroke();
    ctx.fillStyle = COLORS.axis;
    ctx.fillText(format(tick), left - 6, ty);
  }
  // The time axis: a tick every 10 s to 2 min, whichever gives at most 6.
  const span = t1 - t0;
  const step = [10e3, 15e3, 30e3, 60e3, 120e3].find((s) => span / s <= 6) || 120e3;
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  for (let ago = 0; ago <= span; ago += step) {
    const tx = Math.round(x(t1 - ago)) + 0.5;
    ctx.strokeStyle = COLORS.grid;
    ctx.beginPath();
    ctx.moveTo(tx, top);
    ctx.lineTo(tx, top + plotH);
    ctx.stroke();
    ctx.fillStyle = COLORS.axis;
    ctx.fillText(fmtAgo(ago), Math.min(tx, left + plotW - 12), top + plotH + 6);
  }
  ctx.strokeStyle = COLORS.axis;
  ctx.beginPath();
  ctx.moveTo(left + 0.5, top);
  ctx.lineTo(left + 0.5, top + plotH + 0.5);
  ctx.lineTo(left + plotW, top + plotH + 0.5);
  ctx.stroke();

  // The series: a gap where a sample has no value; a lone value drawn as a dot.
  ctx.save();
  ctx.beginPath();
  ctx.rect(left, top - 2, plotW + 2, plotH + 4);
  ctx.clip();
  for (const s of series) {
    const points = s.points.filter(([t]) => t >= t0 - 2000);
    if (s.fill) {
      ctx.fillStyle = `${s.color}22`;
      ctx.beginPath();
      let open = false;
      let firstX = 0, lastX = 0;
      for (const [t, v] of points) {
        if (v === null) continue;
        if (!open) {
          firstX = x(t);
          ctx.moveTo(firstX, y(0));
          open = true;
        }
        lastX = x(t);
        ctx.lineTo(lastX, y(v));
      }
      if (open) {
        ctx.lineTo(lastX, y(0));
        ctx.lineTo(firstX, y(0));
        ctx.fill();
      }
    }
    ctx.strokeStyle = s.color;
    ctx.fillStyle = s.color;
    ctx.lineWidth = 1.75;
    ctx.lineJoin = "round";
    ctx.setLineDash(s.dash ? [5, 3] : []);
    let run = [];
    const flush = () => {
      if (run.length === 1) {
        ctx.beginPath();
        ctx.arc(run[0][0], run[0][1], 2, 0, 2 * Math.PI);
        ctx.fill();
      } else if (run.length > 1) {
        ctx.beginPath();
        run.forEach(([px, py], i) => (i ? ctx.lineTo(px, py) : ctx.moveTo(px, py)));
        ctx.stroke();
      }
      run = [];
    };
    for (const [t, v] of points) {
      if (v === null) flush();
      else run.push([x(t), y(v)]);
    }
    flush();
  }
  ctx.restore();
  ctx.setLineDash([]);

  // The legend, above the plot.
  ctx.textAlign = "left";
  ctx.textBaseline = "middle";
  let lx = left;
  for (const s of series) {
    ctx.strokeStyle = s.color;
    ctx.lineWidth = 2;
    ctx.setLineDash(s.dash ? [5, 3] : []);
    ctx.beginPath();
    ctx.moveTo(lx, 12);
    ctx.lineTo(lx + 18, 12);
    ctx.stroke();
    ctx.fillStyle = COLORS.text;
    ctx.fillText(s.label, lx + 23, 12);
    lx += 23 + ctx.measureText(s.label).width + 16;
  }
  ctx.setLineDash([]);
  if (count === 0) {
    ctx.fillStyle = COLORS.axis;
    ctx.textAlign = "center";
    ctx.fillText(empty, left + plotW / 2, top + plotH / 2);
  }
}

function drawCharts(s) {
  const history = s.history || { interval_ms: 1000, samples: [] };
  const samples = history.samples;
  const perSecond = 1000 / history.interval_ms;
  // The last minute at least, growing with the history up to ten minutes, in whole minutes.
  const t1 = s.time_ms;
  const have = samples.length ? t1 - samples[0].time_ms : 0;
  const span = Math.min(CHART_SPAN_MAX_MS,
                        Math.max(CHART_SPAN_MIN_MS, Math.ceil(have / 60000) * 60000));
  const t0 = t1 - span;
  const line = (key, scale = 1) =>
    samples.map((x) => [x.time_ms, x[key] === null ? null : x[key] * scale]);
  drawChart($("throughput-chart"), {
    t0, t1, format: (v) => String(Number(v.toPrecision(3))), empty: "no samples yet",
    series: [
      { label: "completed/s", color: COLORS.completed, fill: true,
        points: line("completed", perSecond) },
      { label: "failed/s", color: COLORS.failed, points: line("failed", perSecond) },
    ],
  });
  drawChart($("latency-chart"), {
    t0, t1, format: fmtAxisMs, log: true, empty: "no task started or finished in this window",
    series: [
      { label: "wait p50", color: COLORS.wait, points: line("wait_p50_ms") },
      { label: "wait p99", color: COLORS.wait, dash: true, points: line("wait_p99_ms") },
      { label: "run p50", color: COLORS.run, points: line("run_p50_ms") },
      { label: "run p99", color: COLORS.run, dash: true, points: line("run_p99_ms") },
    ],
  });
}

function render(s) {
  const queues = s.queues || [];
  const workers = s.workers || [];
  renderHeader(s);
  renderTiles(s, queues, workers);
  renderQueues(queues);
  renderWorkers(s, workers);
  renderFailures(s.failures || []);
  drawCharts(s);
  document.body.dataset.statusTime = String(s.time_ms);
  document.body.dataset.loaded = "1";
}

// The banner says why the last refresh failed and how old the data shown is; null hides it.
// `unreachable` says the master did not answer, rather than answered what cannot be shown.
function showProblem(problem, unreachable = false) {
  const banner = $("banner");
  document.body.classList.toggle("stale", problem !== null);
  if (problem === null) {
    banner.hidden = true;
    return;
  }
  banner.hidden = false;
  banner.textContent = lastStatus
    ? `${problem} Showing the last data, from ${fmtDuration(Date.now() - lastOkAt)} ago.`
    : `${problem} No data yet.`;
  if (unreachable && lastStatus) {
    const state = $("state");
    state.textContent = "unreachable";
    state.className = "state state-bad";
    $("reason").textContent = `last heard ${fmtClock(lastStatus.time_ms)}`;
  }
}

// api/status beside this page, without the user and password a URL of the page may carry
// (http://admin:TOKEN@host:7071/): fetch refuses URLs with credentials, and the browser sends
// the ones it authenticated the page with by itself.
const STATUS_URL = (() => {
  const url = new URL("api/status", window.location.href);
  url.username = "";
  url.password = "";
  return url.href;
})();

async function refresh() {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), FETCH_TIMEOUT_MS);
  let status = null;
  try {
    const response = await fetch(STATUS_URL, {
      cache: "no-store",
      signal: abort.signal,
      headers: { Accept: "application/json" },
    });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    status = await response.json();
  } catch (e) {
    const why = e.name === "AbortError" ? `no answer in ${FETCH_TIMEOUT_MS / 1000} s` : e.message;
    showProblem(`Master unreachable (${why}).`, true);
  } finally {
    clearTimeout(timer);
  }
  if (status !== null) {
    try {
      render(status);
      lastStatus = status;
      lastOkAt = Date.now();
      showProblem(null);
    } catch (e) {
      showProblem(`Cannot show the master's status (${e.message}).`);
    }
  }
  setTimeout(refresh, REFRESH_MS);
}

window.addEventListener("resize", () => {
  if (lastStatus) drawCharts(lastStatus);
});
refresh();
