// The BatchNorm tab (bnprobe). TensorBoard imports this module in an iframe whose document is
// data/plugin_entry.html?name=batchnorm with <base href="plugin/batchnorm/">, so relative URLs
// ("runs", "heatmap?...") reach the plugin's routes. Plain ES module, no build step, no library.
// The iframe URL's own query (?run=..&metric=..&layer=..) chooses a view (tests, screenshots).
import { listen } from './host.js';

const STAGES = ['train', 'val', 'probe'];
let SCALE = null;

async function getJSON(url) {
  const r = await fetch(url);
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status} ${await r.text()}`);
  return r.json();
}

function el(tag, attrs = {}, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'text') e.textContent = v; else e.setAttribute(k, v);
  }
  for (const k of kids) if (k != null) e.append(k);
  return e;
}

const hex = (h) => [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16));
const mix = (a, b, k) => a.map((x, i) => Math.round(x * (1 - k) + b[i] * k));

// The fixed scale (bnprobe.figures.scale_colours): share of the threshold -> colour.
function scaleColour(share) {
  if (share === null || !Number.isFinite(share)) return hex(SCALE.missing);
  const stops = SCALE.stops, top = SCALE.top;
  for (let i = stops.length - 1; i >= 0; i--) {
    const lo = stops[i][0];
    if (share >= lo || i === 0) {
      const hi = i + 1 < stops.length ? stops[i + 1][0] : top;
      const k = Math.min(1, Math.max(0, (share - lo) / (hi - lo)));
      return mix(hex(stops[i][1]), hex(stops[i][2]), k);
    }
  }
  return hex(SCALE.missing);
}
const share = (v, lim) => (v === null ? null : lim.above ? v / lim.value : (1 - v) / (1 - lim.value));
function band(v, lim) {
  if (v === null || !lim) return '';
  const s = share(v, lim);
  return s > 1 ? SCALE.bands[2] : s >= SCALE.edges[0] ? SCALE.bands[1] : SCALE.bands[0];
}

function legend() {
  const box = el('div', { class: 'bn-legend', id: 'bn-legend' }, el('b', { text: 'colour:' }));
  const text = ['healthy: below ½ of the threshold', 'borderline: ½ to 1×', 'past the threshold'];
  for (const [i, s] of [0.3, 0.8, 1.5].entries()) {
    const span = el('span', { text: text[i] });
    span.style.background = `rgb(${scaleColour(s)})`;
    if (i === 2) span.style.color = '#fff';
    box.append(span);
  }
  const grey = el('span', { text: 'not measured' });
  grey.style.background = SCALE.missing;
  box.append(grey, el('span', { class: 'bn-note', text: 'thresholds: bnprobe.Thresholds() defaults' }));
  return box;
}

function findingsTable(run, found, onLayer) {
  if (found === null) return el('p', { class: 'bn-findings', 'data-run': run, 'data-count': '-1', text: 'No bnprobe store in this run: no findings.' });
  if (!found.length) return el('p', { class: 'bn-findings bn-ok', 'data-run': run, 'data-count': '0', text: 'No findings: no BatchNorm problem found.' });
  const t = el('table', { class: 'bn-findings', 'data-run': run, 'data-count': String(found.length) },
    el('tr', {}, ...['severity', 'kind', 'layer', 'step', 'what and what to do'].map((h) => el('th', { text: h }))));
  for (const f of found) {
    const tr = el('tr', { 'data-kind': f.kind, 'data-severity': f.severity, 'data-layer': f.layer, title: 'show this layer' },
      el('td', {}, el('span', { class: `bn-sev bn-sev-${f.severity}`, text: f.severity })),
      el('td', { text: f.kind }), el('td', { text: f.layer }), el('td', { text: f.step ?? '' }),
      el('td', {}, el('div', { text: f.message }), el('div', { class: 'bn-advice', text: `Fix: ${f.advice}` })));
    tr.addEventListener('click', () => onLayer(f.layer));
    t.append(tr);
  }
  return t;
}

function drawHeatmap(hm, width, tip, onLayer, flagged = new Set()) {
  const nL = hm.layers.length, nS = hm.steps.length, lim = hm.limit;
  const cw = Math.max(1, Math.min(40, Math.floor(width / Math.max(1, nS))));
  const ch = Math.max(3, Math.min(18, Math.floor(560 / Math.max(1, nL))));
  const canvas = el('canvas', { class: 'bn-canvas', width: nS * cw, height: nL * ch });
  const ctx = canvas.getContext('2d');
  let vmax = 0;
  for (const row of hm.values) for (const v of row) if (v !== null && v > vmax) vmax = v;
  const img = ctx.createImageData(nS * cw, nL * ch);
  for (let i = 0; i < nL; i++) for (let j = 0; j < nS; j++) {
    const v = hm.values[i][j];
    const c = lim ? scaleColour(share(v, lim)) : v === null ? hex(SCALE.missing)
      : mix(hex(SCALE.no_threshold[0]), hex(SCALE.no_threshold[1]), vmax > 0 ? v / vmax : 0);
    for (let y = i * ch; y < (i + 1) * ch; y++) for (let x = j * cw; x < (j + 1) * cw; x++) {
      const o = 4 * (y * nS * cw + x);
      img.data[o] = c[0]; img.data[o + 1] = c[1]; img.data[o + 2] = c[2]; img.data[o + 3] = 255;
    }
  }
  ctx.putImageData(img, 0, 0);
  const cell = (ev) => [Math.floor(ev.offsetY / ch), Math.floor(ev.offsetX / cw)];
  canvas.addEventListener('mousemove', (ev) => {
    const [i, j] = cell(ev);
    if (i < 0 || i >= nL || j < 0 || j >= nS) return;
    const v = hm.values[i][j], last = j + 1 < nS ? hm.steps[j + 1] - 1 : null;
    const steps = last !== null && last > hm.steps[j] ? `steps ${hm.steps[j]}..${last} (max)` : `step ${hm.steps[j]}`;
    tip.textContent = `${hm.layers[i]}\n${steps}\n${hm.metric} = ${v === null ? 'n/a' : v.toPrecision(5)}` +
      (lim ? `  ${band(v, lim)} (threshold ${lim.value})` : '');
    tip.style.left = `${ev.clientX + 14}px`; tip.style.top = `${ev.clientY + 14}px`; tip.style.display = 'block';
  });
  canvas.addEventListener('mouseleave', () => { tip.style.display = 'none'; });
  canvas.addEventListener('click', (ev) => { const [i] = cell(ev); if (i >= 0 && i < nL) onLayer(hm.layers[i]); });
  // A label per row when rows are tall enough, else every k-th; a row past the threshold is
  // always labelled (in red, with a marker) and its neighbours give way to it.
  const every = Math.max(1, Math.ceil(12 / ch));
  const bad = hm.values.map((row) => lim !== null && row.some((v) => v !== null && share(v, lim) > 1));
  const flag = hm.layers.map((name) => flagged.has(name));
  const shown = bad.map((b, i) => b || flag[i]);
  for (let i = 0; i < nL; i++) {
    if (shown[i] || i % every) continue;
    let free = true;
    for (let k = Math.max(0, i - every + 1); k < Math.min(nL, i + every); k++) if (bad[k] || flag[k]) free = false;
    shown[i] = free;
  }
  const labels = el('div', { class: 'bn-labels' });
  for (const [i, name] of hm.layers.entries()) {
    const mark = bad[i] || flag[i] ? '▶ ' : '';
    const d = el('div', { text: shown[i] ? mark + name : '', 'data-layer': name, title: flag[i] ? `${name}: has findings` : name });
    if (flag[i]) { d.classList.add('bn-flag'); d.setAttribute('data-flagged', '1'); }
    if (bad[i]) { d.classList.add('bn-bad'); d.setAttribute('data-past', '1'); }
    d.style.height = `${ch}px`; d.style.lineHeight = `${ch}px`;
    if (shown[i] && ch < 12) { d.style.overflow = 'visible'; d.style.position = 'relative'; d.style.zIndex = bad[i] ? '2' : '1'; }
    d.addEventListener('click', () => onLayer(name));
    labels.append(d);
  }
  const limText = lim ? `threshold ${lim.value} (${lim.name})` : 'no threshold: shade relative to the largest value';
  return el('div', { class: 'bn-hm', 'data-run': hm.run, 'data-stage': hm.stage, 'data-metric': hm.metric,
    'data-layers': String(nL), 'data-cols': String(nS), 'data-past-threshold': String(hm.past),
    'data-first-layer': hm.layers[0] ?? '' },
  el('h3', { text: `${hm.stage} · ${hm.metric} · ${nL} layers · ${limText}` }),
  el('div', { class: 'bn-grid' }, labels,
    el('div', {}, canvas, el('div', { class: 'bn-steps' }, el('span', { text: `step ${hm.steps[0]}` }),
      nS > 1 ? el('span', { text: `step ${hm.steps[nS - 1]}` }) : null))));
}

// A small SVG line chart with an HTML legend under it: series [{name, points: [[step, value]],
// colour, dash}], limits [{value, label, colour}] drawn as dashed lines. Few points get markers
// (a probe or validation stage has one point per epoch).
function lineChart(title, series, limits = []) {
  const W = 330, H = 160, L = 48, R = 10, T = 8, B = 20;
  series = series.filter((s) => s.points.some((p) => p[1] !== null));
  const fig = el('figure', { class: 'bn-fig', 'data-title': title }, el('figcaption', { text: title }));
  const pts = series.flatMap((s) => s.points.filter((p) => p[1] !== null));
  const ns = 'http://www.w3.org/2000/svg';
  const svg = document.createElementNS(ns, 'svg');
  svg.setAttribute('width', W); svg.setAttribute('height', H); svg.setAttribute('class', 'bn-chart');
  fig.append(svg);
  const add = (tag, attrs, text) => { const e = document.createElementNS(ns, tag); for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v); if (text != null) e.textContent = text; svg.append(e); return e; };
  if (!pts.length) { add('text', { x: L, y: H / 2 }, 'not measured in this run'); return fig; }
  let x0 = Math.min(...pts.map((p) => p[0])), x1 = Math.max(...pts.map((p) => p[0]));
  let y0 = Math.min(...pts.map((p) => p[1])), y1 = Math.max(...pts.map((p) => p[1]));
  for (const lim of limits) { y0 = Math.min(y0, lim.value, 0); y1 = Math.max(y1, lim.value * 1.15); }
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const X = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R), Y = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  add('rect', { x: L, y: T, width: W - L - R, height: H - T - B, fill: '#fff', stroke: '#ccc' });
  for (const y of [y0, (y0 + y1) / 2, y1]) add('text', { x: L - 4, y: Y(y) + 4, 'text-anchor': 'end' }, Number(y.toPrecision(3)).toString());
  const xs = pts.map((p) => p[0]);
  add('text', { x: L, y: H - 5 }, `step ${Math.min(...xs)}`);
  if (Math.max(...xs) > Math.min(...xs)) add('text', { x: W - R, y: H - 5, 'text-anchor': 'end' }, `step ${Math.max(...xs)}`);
  for (const lim of limits) {
    add('line', { x1: L, x2: W - R, y1: Y(lim.value), y2: Y(lim.value), stroke: lim.colour, 'stroke-dasharray': '5 3', 'stroke-width': 1.2 });
  }
  const key = el('div', { class: 'bn-key' });
  for (const s of series) {
    const ok = s.points.filter((p) => p[1] !== null);
    const d = ok.map((p, i) => `${i ? 'L' : 'M'}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join('');
    add('path', { d, fill: 'none', stroke: s.colour, 'stroke-width': 1.6, 'stroke-dasharray': s.dash || '' });
    if (ok.length <= 30) for (const p of ok) add('circle', { cx: X(p[0]), cy: Y(p[1]), r: 2.6, fill: s.dash ? '#fff' : s.colour, stroke: s.colour });
    const sw = el('span', { class: 'bn-swatch' });
    sw.style.borderTop = `2px ${s.dash ? 'dashed' : 'solid'} ${s.colour}`;
    key.append(el('span', {}, sw, s.name));
  }
  for (const lim of limits) {
    const sw = el('span', { class: 'bn-swatch' });
    sw.style.borderTop = `2px dashed ${lim.colour}`;
    key.append(el('span', {}, sw, lim.label));
  }
  fig.append(key);
  return fig;
}

const COLOURS = { train: '#1565c0', val: '#ef6c00', probe: '#6a1b9a' };

async function showLayer(panel, run, layer) {
  panel.replaceChildren(el('h3', { text: `${layer}: loading…` }));
  panel.setAttribute('data-layer', layer);
  let d;
  try { d = await getJSON(`layer?${new URLSearchParams({ run, layer })}`); } catch (e) { panel.replaceChildren(el('p', { class: 'bn-error', text: e.message })); return; }
  const S = d.series, charts = el('div', { class: 'bn-charts' });
  const pick = (stage, m) => (S[stage] && S[stage][m]) || [];
  const pair = (title, a, b) => lineChart(title, ['train', 'val'].flatMap((st) => [
    { name: `${st} batch`, points: pick(st, a), colour: COLOURS[st] },
    { name: `${st} running`, points: pick(st, b), colour: COLOURS[st], dash: '4 2' }]).filter((s) => s.points.length));
  charts.append(pair('batch vs running mean', 'batch_mean', 'running_mean'));
  charts.append(pair('batch vs running variance', 'batch_var', 'running_var'));
  const limitsOf = (stages, m) => stages.flatMap((st) => { const lim = d.limits[`${st}/${m}`]; return lim ? [{ value: lim.value, label: `${st} threshold ${lim.value}`, colour: st === 'val' ? '#c62828' : '#8e24aa' }] : []; });
  for (const m of ['mean_shift', 'var_shift', 'mean_shift_excess', 'var_shift_excess']) {
    const ss = ['train', 'val'].filter((st) => pick(st, m).length);
    if (!ss.length) continue;
    charts.append(lineChart(m, ss.map((st) => ({ name: st, points: pick(st, m), colour: COLOURS[st] })), limitsOf(ss, m)));
  }
  charts.append(lineChart('gamma / beta drift (train)', [
    { name: 'gamma_drift', points: pick('train', 'gamma_drift'), colour: '#2e7d32' },
    { name: 'beta_drift', points: pick('train', 'beta_drift'), colour: '#795548', dash: '4 2' }]));
  charts.append(lineChart('train/eval gap (probe)', [
    { name: 'local_gap', points: pick('probe', 'local_gap'), colour: COLOURS.probe },
    { name: 'output_gap', points: pick('probe', 'output_gap'), colour: '#888', dash: '4 2' }], limitsOf(['probe'], 'local_gap')));
  const gaps = Object.entries(d.latest).map(([m, x]) => `${m} ${x.value === null ? 'n/a' : x.value.toPrecision(3)} (step ${x.step})`).join(', ');
  panel.replaceChildren(el('h3', { text: `${run} · ${layer}` + (gaps ? ` · latest ${gaps}` : '') }), charts);
  try {
    const c = await getJSON(`channels?${new URLSearchParams({ run, layer, stage: 'train' })}`);
    if (c.step !== null && c.channels.batch_mean && c.channels.running_mean) {
      const idx = (a) => a.map((v, i) => [i, v]);
      const chart = lineChart(`per channel at step ${c.step} (x: channel)`, [
        { name: 'batch mean', points: idx(c.channels.batch_mean), colour: COLOURS.train },
        { name: 'running mean', points: idx(c.channels.running_mean), colour: '#000', dash: '3 2' }]);
      charts.append(chart);
    }
  } catch (e) { /* per-channel rows are optional (BNProbe(per_channel=True)) */ }
}

export async function render() {
  document.head.append(el('link', { rel: 'stylesheet', href: 'style.css' }));
  const tip = el('div', { id: 'bn-tip' });
  const runsBox = el('div', { id: 'bn-runs' });
  const metricSel = el('select', { id: 'bn-metric' });
  const out = el('div', { id: 'bn-out' });
  const controls = el('div', { id: 'bn-controls' }, el('b', { text: 'Runs:' }), runsBox, el('label', {}, 'metric ', metricSel));
  document.body.append(controls, out, tip);
  let info;
  try { info = await getJSON('runs'); } catch (e) { out.append(el('p', { class: 'bn-error', text: e.message })); document.body.setAttribute('data-bn-ready', '1'); return; }
  SCALE = info.scale;
  controls.append(legend());
  const runs = info.runs;
  const qs = new URLSearchParams(location.search);
  const want = { runs: qs.getAll('run'), metric: qs.get('metric'), layer: qs.get('layer') };
  if (!runs.length) { out.append(el('p', { id: 'bn-empty', text: 'No bnprobe data in this logdir yet.' })); document.body.setAttribute('data-bn-ready', '1'); return; }
  for (const [i, r] of runs.entries()) {
    const cb = el('input', { type: 'checkbox', value: r.run });
    cb.checked = want.runs.length ? want.runs.includes(r.run) : i < 3;  // up to 3 runs at first
    runsBox.append(el('label', {}, cb, ` ${r.run} (${r.layers} layers)`));
  }
  const metrics = [...new Set(runs.flatMap((r) => STAGES.flatMap((s) => r.stages[s] || [])))];
  metricSel.replaceChildren(...metrics.map((m) => el('option', { value: m, text: m })));
  metricSel.value = metrics.includes(want.metric) ? want.metric : metrics.includes('mean_shift') ? 'mean_shift' : metrics[0];
  const width = Math.max(300, Math.min(900, window.innerWidth - 260));

  const refresh = async () => {
    document.body.removeAttribute('data-bn-ready');
    out.replaceChildren();
    const chosen = runs.filter((r) => runsBox.querySelector(`input[value="${CSS.escape(r.run)}"]`).checked);
    for (const r of chosen) {
      const section = el('div', { class: 'bn-run', 'data-run': r.run }, el('h2', { text: r.run }));
      const panel = el('div', { class: 'bn-layer' });
      panel.style.display = 'none';
      out.append(section);
      const onLayer = (layer) => { panel.style.display = 'block'; panel.scrollIntoView({ block: 'nearest' }); return showLayer(panel, r.run, layer); };
      let flagged = new Set();
      try {
        const found = (await getJSON(`findings?${new URLSearchParams({ run: r.run })}`)).findings;
        flagged = new Set((found || []).filter((f) => f.severity !== 'info').map((f) => f.layer));
        section.append(findingsTable(r.run, found, onLayer));
      } catch (e) { section.append(el('p', { class: 'bn-error', text: `findings: ${e.message}` })); }
      const stages = STAGES.filter((s) => (r.stages[s] || []).includes(metricSel.value));
      const row = el('div', { class: 'bn-stages' });
      section.append(row, panel);
      if (!stages.length) row.append(el('p', { text: `${metricSel.value} is not logged in this run.` }));
      const each = Math.floor(width / Math.max(1, stages.length)) - 20;
      for (const s of stages) {
        try { row.append(drawHeatmap(await getJSON(`heatmap?${new URLSearchParams({ run: r.run, stage: s, metric: metricSel.value })}`), each, tip, onLayer, flagged)); }
        catch (e) { row.append(el('p', { class: 'bn-error', text: `${s}: ${e.message}` })); }
      }
      if (want.layer) await onLayer(want.layer);
    }
    document.body.setAttribute('data-bn-ready', '1');
  };
  metricSel.addEventListener('change', refresh);
  runsBox.addEventListener('change', refresh);
  listen('experimental.DataReloaded', () => refresh());
  await refresh();
}
