// hiervision web page: pick or drop an image, POST it to /predict, draw the class tree as SVG.
// Plain browser JavaScript, no build step and no outside requests.
"use strict";

const NS = "http://www.w3.org/2000/svg";
const BOX_W = 150, BOX_H = 38, COL = 200, ROW = 46, PAD = 12, MAX_DRAWN = 160;
let tree = null;  // {names, parents, children, depth}

const $ = (id) => document.getElementById(id);
const pct = (p) => (100 * p).toFixed(1) + "%";

function el(tag, attrs, parent) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (parent) parent.appendChild(e);
  return e;
}

function status(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "muted";
}

async function loadTree() {
  const [tax, health] = await Promise.all([fetch("/taxonomy").then((r) => r.json()),
                                           fetch("/health").then((r) => r.json())]);
  const n = tax.nodes.length, names = [], parents = [], children = [], depth = [];
  for (const node of tax.nodes) { names[node.id] = node.name; parents[node.id] = node.parent; children[node.id] = []; }
  for (let i = 1; i < n; i++) children[parents[i]].push(i);
  depth[0] = 0;
  const order = [0];
  for (let k = 0; k < order.length; k++) for (const c of children[order[k]]) { depth[c] = depth[order[k]] + 1; order.push(c); }
  tree = { names, parents, children, depth, n };
  $("model").textContent = `${health.classes} classes · depth ${tax.max_depth} · ${health.model}`;
  draw(null);
}

// which nodes to draw: the whole tree when small, else the predicted path and its siblings
function visible(result) {
  if (tree.n <= MAX_DRAWN) return new Set(tree.names.keys());
  const keep = new Set([0, ...tree.children[0]]);
  for (const id of (result ? result.path_ids : [])) { keep.add(id); tree.children[id].forEach((c) => keep.add(c)); }
  return keep;
}

function draw(result) {
  const svg = $("tree");
  svg.replaceChildren();
  const keep = visible(result);
  $("tree-note").hidden = keep.size === tree.n;
  $("tree-note").textContent = `${tree.n - 1} classes: showing the top level, the predicted path and the ` +
    "children of each node on it";
  const onPath = new Set(result ? result.path_ids : []);
  const pathProb = new Map(result ? result.path_ids.map((id, i) => [id, result.node_probabilities[i]]) : []);
  const scores = result && result.node_scores ? result.node_scores : null;
  // rows: leaves of the drawn tree in depth-first order; a parent sits at the middle of its children
  const y = [], x = [];
  let row = 0;
  (function place(v) {
    const kids = tree.children[v].filter((c) => keep.has(c));
    kids.forEach(place);
    y[v] = kids.length ? (y[kids[0]] + y[kids[kids.length - 1]]) / 2 : row++ * ROW;
    x[v] = tree.depth[v] * COL;
  })(0);
  const maxDepth = Math.max(...[...keep].map((v) => tree.depth[v]));
  svg.setAttribute("width", maxDepth * COL + BOX_W + 2 * PAD);
  svg.setAttribute("height", Math.max(row, 1) * ROW + 2 * PAD);
  const g = el("g", { transform: `translate(${PAD},${PAD})` }, svg);
  for (const v of keep) {
    if (v === 0) continue;
    const p = tree.parents[v], x0 = x[p] + BOX_W, y0 = y[p] + BOX_H / 2, x1 = x[v], y1 = y[v] + BOX_H / 2, mx = (x0 + x1) / 2;
    el("path", { d: `M${x0},${y0} C${mx},${y0} ${mx},${y1} ${x1},${y1}`,
                 class: "edge" + (onPath.has(v) ? " on-path" : "") }, g);
  }
  for (const v of keep) {
    const prob = pathProb.has(v) ? pathProb.get(v) : (scores ? scores[v] : null);
    const node = el("g", { class: "node" + (onPath.has(v) ? " on-path" : ""), "data-id": v,
                           transform: `translate(${x[v]},${y[v]})` }, g);
    if (prob !== null && v !== 0) node.setAttribute("data-prob", prob);
    const light = prob === null || v === 0 ? 97 : 96 - 34 * prob;
    el("rect", { width: BOX_W, height: BOX_H, rx: 7, fill: `hsl(217, 85%, ${light}%)` }, node);
    const name = tree.names[v];
    const label = el("text", { x: 9, y: prob === null || v === 0 ? 24 : 16, class: "name" }, node);
    label.textContent = name.length > 20 ? name.slice(0, 19) + "…" : name;
    el("title", {}, node).textContent = name;
    if (prob !== null && v !== 0) {
      const t = el("text", { x: 9, y: 31, class: "prob" }, node);
      t.textContent = pct(prob);
    }
  }
}

function show(result) {
  $("answer").hidden = false;
  $("path-prob").textContent = "p = " + pct(result.path_probability);
  $("path-prob").dataset.prob = result.path_probability;
  $("path").replaceChildren(...result.path.map((name, i) => {
    const li = document.createElement("li");
    li.dataset.id = result.path_ids[i];
    li.dataset.prob = result.node_probabilities[i];
    const n = document.createElement("span");
    n.className = "name";
    n.textContent = name;
    const s = document.createElement("span");
    s.className = "prob";
    s.textContent = pct(result.node_probabilities[i]);
    li.append(n, s);
    return li;
  }));
  // the hedged answer, where the server hedges (hiervision serve --hedge-accuracy)
  $("hedged").hidden = !result.hedged;
  if (result.hedged) {
    const where = result.hedged.path.length ? result.hedged.path.join(" › ") : "(root: no class is sure enough)";
    $("hedged").textContent = `Hedged answer: ${where} · p = ${pct(result.hedged.probability)}`;
  }
  const best = result.path_ids.join("/");
  $("topk").tBodies[0].replaceChildren(...result.top_k.map((alt, i) => {
    const tr = document.createElement("tr");
    if (alt.path_ids.join("/") === best) tr.className = "best";
    tr.dataset.prob = alt.probability;
    tr.innerHTML = `<td>${i + 1}</td><td></td><td class="p"><div class="bar"><span></span><b></b></div></td>`;
    tr.children[1].textContent = alt.path.join(" › ");
    tr.querySelector(".bar span").style.width = pct(alt.probability);
    tr.querySelector(".bar b").textContent = pct(alt.probability);
    return tr;
  }));
  draw(result);
}

// forget the previous image's answer: a new upload, good or bad, never shows it beside its own result
function clearAnswer() {
  $("answer").hidden = true;
  $("path").replaceChildren();
  $("topk").tBodies[0].replaceChildren();
  $("hedged").hidden = true;
  if (tree) draw(null);
}

async function predict(file) {
  clearAnswer();
  delete document.body.dataset.state;
  $("preview").src = URL.createObjectURL(file);
  $("preview").hidden = false;
  $("drop-text").hidden = true;
  status(`predicting ${file.name}…`);
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const r = await fetch("/predict?node_scores=true", { method: "POST", body: form });
    const body = await r.json();
    if (!r.ok) throw new Error(body.detail || r.statusText);
    show(body.results[0]);
    status(`${file.name}: done`);
    document.body.dataset.state = "done";
  } catch (e) {
    status(String(e.message || e), true);
    document.body.dataset.state = "error";
  }
}

$("picker").addEventListener("change", (e) => { if (e.target.files[0]) predict(e.target.files[0]); });
const drop = $("drop");
for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
drop.addEventListener("drop", (e) => { if (e.dataTransfer.files[0]) predict(e.dataTransfer.files[0]); });
loadTree().catch((e) => status("could not load the model's tree: " + e, true));
