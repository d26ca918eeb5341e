// hiervision web page: pick or drop an image, POST it to /predict, draw the class tree as SVG.
// Plain browser JavaScript, no build step and no outside requests.
//
// A small tree (at most MAX_DRAWN nodes) is read whole from /taxonomy and drawn whole. A big one (10^5
// nodes) is never downloaded: the page reads the nodes it draws from /taxonomy/nodes (a node and a page of
// its children) and the answer's neighbourhood from /predict?siblings=K: the predicted path with its most
// probable siblings at each level, and the top-k alternative paths. Every node with children opens and
// closes on a click; "+ N more" lists the next page of a node's children.
//
// Answer options (the form fields of /predict, sent with each image): a minimum probability and per-level
// thresholds roll the answer up its path (the record's `rollup`: each node's probability against its
// threshold, and why it stopped), "only classes within…" restricts it to a subtree (the record's `allowed`).
// Changing an option predicts the last image again.
"use strict";

const NS = "http://www.w3.org/2000/svg";
const BOX_W = 150, BOX_H = 38, COL = 200, ROW = 46, PAD = 12;
const MAX_DRAWN = 160, PAGE = 30, SIBLINGS = 6;
const SHOWN_ABOVE = 0.001;  // a big tree's answer carries the probability of every node at least this likely
// the tree as far as the page knows it: id -> {id, name, parent, depth, numKids (null: not known yet),
// shown (the children drawn when open), offset (children listed so far, in id order), open}
let tree = null;  // {big, n, nodes: Map}
let scores = new Map();  // id -> the current answer's probability of that node
let answer = null;  // the current /predict record
let lastFile = null;  // the last image picked: predicted again when an option changes
let asked = 0;  // requests sent so far: only the latest one's answer is shown

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

async function getJSON(url) {
  const r = await fetch(url);
  const body = await r.json();
  if (!r.ok) throw new Error(body.detail || r.statusText);
  return body;
}

// the node `id` (created on first sight); known facts about it are filled in as they arrive
function node(id, name, parent) {
  let v = tree.nodes.get(id);
  if (!v) {
    const depth = parent === undefined || parent < 0 ? 0 : tree.nodes.get(parent).depth + 1;
    v = { id, name, parent, depth, numKids: null, shown: [], offset: 0, open: false };
    tree.nodes.set(id, v);
  }
  return v;
}

function addShown(v, id) { if (!v.shown.includes(id)) v.shown.push(id); }

// the next page of v's children from the server, added to those drawn
async function loadChildren(v) {
  const start = v.shown.length;
  while (v.shown.length === start && (v.numKids === null || v.offset < v.numKids)) {
    const body = await getJSON(`/taxonomy/nodes?ids=${v.id}&offset=${v.offset}&limit=${PAGE}`);
    const got = body.nodes[0];
    v.name = got.name;
    v.numKids = got.num_children;
    v.offset += got.children.length;
    for (const c of got.children) { node(c.id, c.name, v.id).numKids = c.num_children; addShown(v, c.id); }
    if (!got.children.length) break;
  }
}

async function loadTree() {
  const health = await getJSON("/health");
  const n = (health.nodes ?? health.classes) + 1;
  tree = { big: n > MAX_DRAWN, n, nodes: new Map() };
  if (tree.big) {
    const root = node(0, "root", -1);
    await loadChildren(root);
    root.open = true;
  } else {
    const tax = await getJSON("/taxonomy");
    const byId = [...tax.nodes].sort((a, b) => a.id - b.id);
    for (const t of byId) tree.nodes.set(t.id, { id: t.id, name: t.name, parent: t.parent, depth: 0,
                                                 numKids: 0, shown: [], offset: 0, open: true });
    for (const t of byId) if (t.parent >= 0) { const p = tree.nodes.get(t.parent); p.shown.push(t.id); p.numKids++; }
    const order = [tree.nodes.get(0)];  // depths top-down (a child's id may be smaller than its parent's)
    for (let k = 0; k < order.length; k++) {
      const v = order[k];
      v.offset = v.numKids;
      for (const id of v.shown) { const c = tree.nodes.get(id); c.depth = v.depth + 1; order.push(c); }
    }
  }
  const nodes = health.nodes === undefined ? "" : ` · ${health.nodes} nodes`;
  $("model").textContent = `${health.classes} classes${nodes} · depth ${health.max_depth} · ${health.model}`;
  showDefaults(health.answers);
  fillNodeNames();
  draw();
}

// what an image is answered under when no option is set (serve --within/--min-prob, or the export's)
function showDefaults(answers) {
  const said = [];
  if (answers && answers.within) said.push(`answers ${answers.within} (${answers.allowed_classes} classes)`);
  if (answers && answers.min_prob) {
    said.push("thresholds " + Object.entries(answers.min_prob).map(([d, p]) => `${d}=${p}`).join(","));
  }
  $("defaults").hidden = !said.length;
  $("defaults").textContent = said.length ? `Server defaults: ${said.join("; ")}. An option set here replaces its default.` : "";
}

// the "only classes within…" suggestions: every known node by name, or by its path where names repeat
function fillNodeNames() {
  const known = [...tree.nodes.values()].filter((v) => v.id !== 0);
  const count = new Map();
  for (const v of known) count.set(v.name, (count.get(v.name) || 0) + 1);
  const pathOf = (v) => {
    const names = [];
    for (let u = v; u && u.id !== 0; u = tree.nodes.get(u.parent)) names.unshift(u.name);
    return names.join("/");
  };
  $("node-names").replaceChildren(...known.slice(0, 5000).map((v) => {
    const o = document.createElement("option");
    o.value = count.get(v.name) > 1 ? pathOf(v) : v.name;
    return o;
  }));
}

// the answer's nodes in the tree: the path with its siblings, the alternatives' paths, all opened
async function reveal(result) {
  tree.nodes.get(0).open = true;
  if (tree.big) {
    for (const v of tree.nodes.values()) v.open = v.id === 0;  // what was opened for the previous image closes
    const on = new Set(result.path_ids);
    for (const level of result.siblings) {
      const p = tree.nodes.get(level.parent);
      p.numKids = level.num_children;
      p.shown = [];
      p.offset = 0;  // "+ N more" lists the rest from the first page on
      // the path's node first, then its siblings, most probable first
      for (const c of [...level.nodes].sort((a, b) => on.has(b.id) - on.has(a.id))) {
        node(c.id, c.name, level.parent).numKids = c.num_children;
        addShown(p, c.id);
        scores.set(c.id, c.probability);
      }
      p.open = true;
    }
  }
  for (const alt of [{ path: result.path, path_ids: result.path_ids }, ...result.top_k]) {
    alt.path_ids.forEach((id, i) => {
      const parent = i ? alt.path_ids[i - 1] : 0;
      node(id, alt.path[i], parent);
      addShown(tree.nodes.get(parent), id);
      tree.nodes.get(parent).open = true;
    });
  }
  result.path_ids.forEach((id, i) => scores.set(id, result.node_probabilities[i]));
  // how many children the alternatives' nodes have: one request for all of them
  const unknown = [...tree.nodes.values()].filter((v) => v.numKids === null).map((v) => v.id).slice(0, 256);
  if (unknown.length) {
    const body = await getJSON(`/taxonomy/nodes?ids=${unknown.join(",")}&limit=0`);
    for (const got of body.nodes) tree.nodes.get(got.id).numKids = got.num_children;
  }
}

// the drawn tree: open nodes' shown children, depth first; a `more` box stands for the children not listed
// yet. A small tree is drawn as before: each leaf gets a row, a parent sits at the middle of its children.
// A big one is packed by column: a node takes the first free row of its column at or below its parent's,
// so the predicted path (first at each level) runs along the top row with its siblings stacked under it.
function layout() {
  const more = [], y = new Map(), kids = new Map(), free = [];
  let rows = 0;
  const take = (depth, from) => {
    const r = Math.max(from, free[depth] || 0);
    free[depth] = r + 1;
    rows = Math.max(rows, r + 1);
    return r;
  };
  (function place(v, from) {
    const shown = v.open ? v.shown.map((id) => tree.nodes.get(id)) : [];
    const rest = v.open && v.numKids !== null ? v.numKids - v.shown.length : 0;
    kids.set(v.id, shown);
    if (tree.big) {
      const r = take(v.depth, from);
      y.set(v.id, r * ROW);
      shown.forEach((c) => place(c, r));
      if (rest > 0) more.push({ parent: v, rest, y: take(v.depth + 1, r) * ROW });
      return;
    }
    shown.forEach((c) => place(c, 0));
    if (rest > 0) more.push({ parent: v, rest, y: rows++ * ROW });
    const ys = [...shown.map((c) => y.get(c.id)), ...(rest > 0 ? [more[more.length - 1].y] : [])];
    y.set(v.id, ys.length ? (ys[0] + ys[ys.length - 1]) / 2 : rows++ * ROW);
  })(tree.nodes.get(0), 0);
  return { y, kids, rows, more };
}

function draw() {
  const svg = $("tree");
  svg.replaceChildren();
  const { y, kids, rows, more } = layout();
  const drawn = [...y.keys()].map((id) => tree.nodes.get(id));
  $("tree-note").hidden = drawn.length === tree.n;
  $("tree-note").textContent = `${tree.n - 1} nodes, ${drawn.length - 1} shown` +
    (answer && tree.big ? `: the predicted path with its ${SIBLINGS - 1} most likely siblings at each level ` +
                          "and the top alternatives" : "") + ". Click a node to show or hide its children.";
  const onPath = new Set(answer ? answer.path_ids : []);
  const onAlt = new Set(answer ? answer.top_k.flatMap((a) => a.path_ids) : []);
  const marks = rollupMarks(answer);
  const x = (v) => v.depth * COL;
  const maxDepth = Math.max(...drawn.map((v) => v.depth), ...more.map((m) => m.parent.depth + 1));
  svg.setAttribute("width", maxDepth * COL + BOX_W + 2 * PAD);
  svg.setAttribute("height", Math.max(rows, 1) * ROW + 2 * PAD);
  const g = el("g", { transform: `translate(${PAD},${PAD})` }, svg);
  const edge = (p, x1, y1, cls) => {
    const x0 = x(p) + BOX_W, y0 = y.get(p.id) + BOX_H / 2, mx = (x0 + x1) / 2;
    el("path", { d: `M${x0},${y0} C${mx},${y0} ${mx},${y1} ${x1},${y1}`, class: cls }, g);
  };
  for (const v of drawn) for (const c of kids.get(v.id)) {
    edge(v, x(c), y.get(c.id) + BOX_H / 2, "edge" + (onPath.has(c.id) ? " on-path" : ""));
  }
  for (const m of more) {
    edge(m.parent, x(m.parent) + COL, m.y + BOX_H / 2, "edge more-edge");
    const b = el("g", { class: "more", "data-parent": m.parent.id,
                        transform: `translate(${x(m.parent) + COL},${m.y})` }, g);
    el("rect", { width: BOX_W, height: BOX_H, rx: 7 }, b);
    const rest = restProbability(m.parent);
    el("text", { x: 9, y: rest === null ? 24 : 16 }, b).textContent = `+ ${m.rest} more`;
    if (rest !== null) el("text", { x: 9, y: 31, class: "prob" }, b).textContent = `${pctRange(rest)} together`;
  }
  for (const v of drawn) drawNode(g, v, x(v), y.get(v.id), onPath.has(v.id), onAlt.has(v.id), marks.get(v.id));
}

// the probability of the children of v not drawn, v's own less its drawn children's, as [low, high] (null where
// unknown): on a big tree a node the answer did not score is only known to lie below SHOWN_ABOVE
function restProbability(v) {
  const own = v.id === 0 ? 1 : probOf(v.id);
  if (own === null || v.shown.some((id) => probOf(id) === null)) return null;
  const known = v.shown.reduce((sum, id) => sum + probOf(id), 0);
  const below = v.shown.filter((id) => !scores.has(id)).length;  // each somewhere in [0, SHOWN_ABOVE)
  const high = (v.id === 0 || scores.has(v.id) ? own : SHOWN_ABOVE) - known;
  return [Math.max(high - below * SHOWN_ABOVE, 0), Math.max(high, 0)];
}

// "x%", or "x–y%" where the two ends differ at one decimal
function pctRange([low, high]) {
  return pct(low) === pct(high) ? pct(high) : `${(100 * low).toFixed(1)}–${pct(high)}`;
}

// the answer in view: the tree card scrolls (sideways, then the page) until the box of `id` is inside the
// screen; the cue on the card's edges says which way more of the tree lies
function bringIntoView(id) {
  const box = $("tree").querySelector(`g.node[data-id="${id}"]`);
  if (box) box.scrollIntoView({ block: "nearest", inline: "center" });
  scrollCue();
}

function scrollCue() {
  const w = $("tree-wrap");
  w.classList.toggle("more-left", w.scrollLeft > 1);
  w.classList.toggle("more-right", w.scrollLeft + w.clientWidth < w.scrollWidth - 1);
}

// the roll-up in the tree: id -> {cls, step}; the node the answer stopped at is "answer-node", the first
// node below it that fell short of its threshold "fell-short", the path's other nodes under it "beyond"
function rollupMarks(result) {
  const marks = new Map();
  const roll = result && result.rollup;
  if (!roll) return marks;
  result.path_ids.forEach((id, i) => {
    const cls = i === roll.depth - 1 ? "answer-node" : i === roll.depth ? "fell-short" : i > roll.depth ? "beyond" : "";
    marks.set(id, { cls, step: roll.trace[i] });
  });
  if (roll.depth === 0) marks.set(0, { cls: "answer-node", step: null });
  return marks;
}

// a node's probability for the tree; on a big tree with an answer, a node without one is below SHOWN_ABOVE
function probOf(id) {
  if (id === 0) return null;
  if (scores.has(id)) return scores.get(id);
  return answer && tree.big ? 0 : null;
}

function drawNode(g, v, x, y, onPath, onAlt, mark) {
  const prob = probOf(v.id);
  const open = v.open && v.shown.length > 0;
  const cls = ["node", onPath && "on-path", onAlt && !onPath && "alt", v.numKids !== 0 && v.id !== 0 && "expandable",
               open && "open", mark && mark.cls].filter(Boolean).join(" ");
  const box = el("g", { class: cls, "data-id": v.id, "data-parent": v.parent, transform: `translate(${x},${y})` }, g);
  if (prob !== null) box.setAttribute("data-prob", prob);
  const light = prob === null ? 97 : 96 - 34 * prob;
  el("rect", { width: BOX_W, height: BOX_H, rx: 7, fill: `hsl(217, 85%, ${light}%)` }, box);
  const label = el("text", { x: 9, y: prob === null ? 24 : 16, class: "name" }, box);
  label.textContent = v.name.length > 20 ? v.name.slice(0, 19) + "…" : v.name;
  const step = mark && mark.step;
  el("title", {}, box).textContent = v.name + (v.numKids ? ` (${v.numKids} children)` : "") +
    (step ? ` · ${pct(step.probability)} ${step.met ? "≥" : "<"} threshold ${pct(step.threshold)}` : "");
  if (prob !== null) {
    const text = scores.has(v.id) ? pct(prob) : `< ${pct(SHOWN_ABOVE)}`;
    el("text", { x: 9, y: 31, class: "prob" }, box).textContent = text;
  }
  if (v.numKids !== 0 && v.id !== 0) el("text", { x: BOX_W - 16, y: 24, class: "toggle" }, box).textContent = open ? "−" : "+";
}

// clicks on the tree: a node opens or closes, "+ N more" lists the next page of children
$("tree").addEventListener("click", async (e) => {
  const target = e.target.closest("g.node.expandable, g.more");
  if (!target) return;
  const v = tree.nodes.get(Number(target.dataset[target.classList.contains("more") ? "parent" : "id"]));
  try {
    if (target.classList.contains("more")) await loadChildren(v);
    else if (v.open && v.shown.length) v.open = false;
    else {
      if (!v.shown.length) await loadChildren(v);
      v.open = true;
    }
    draw();
    if (v.open && v.shown.length) bringIntoView(v.shown[v.shown.length - 1]);
    else scrollCue();
  } catch (err) {
    status("could not load the children of " + v.name + ": " + (err.message || err), true);
  }
});

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
  // a novelty head (hnd) answering an inner node: a kind it has never seen, under that node
  $("novel").hidden = !result.novel;
  $("novel").textContent = result.novel ? `An unknown kind of ${result.path[result.path.length - 1]} (${result.under})` : "";
  showAllowed(result.allowed);
  showRollup(result);
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
}

// the restriction this answer was made under (the record's `allowed`), if any
function showAllowed(allowed) {
  $("allowed").hidden = !allowed;
  $("allowed").textContent = allowed ? `Answers restricted: ${allowed.description} (${allowed.classes} classes)` : "";
}

// the roll-up (the record's `rollup`): where the answer stopped and why, then each node of the path with its
// probability against its threshold; the node stopped at and the first node that fell short are marked
function showRollup(result) {
  const roll = result.rollup;
  $("rollup").hidden = !roll;
  if (!roll) return;
  $("rollup-node").textContent = roll.depth ? `${roll.node} · p = ${pct(roll.probability)}` : "root: no class sure enough";
  $("rollup-node").dataset.id = roll.depth ? roll.path_ids[roll.depth - 1] : 0;
  $("why").textContent = roll.why;
  $("why").className = roll.stopped ? "stopped" : "reached";
  $("trace").replaceChildren(...roll.trace.map((step, i) => {
    const li = document.createElement("li");
    li.dataset.id = result.path_ids[i];
    li.className = [step.met ? "met" : "short", i === roll.depth - 1 && "answer-node",
                    i === roll.depth && "fell-short"].filter(Boolean).join(" ");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = step.node;
    const p = document.createElement("span");
    p.className = "prob";
    p.textContent = pct(step.probability);
    const cmp = document.createElement("span");
    cmp.className = "cmp";
    cmp.textContent = `${step.met ? "≥" : "<"} ${pct(step.threshold)}`;
    const mark = document.createElement("span");
    mark.className = "mark";
    mark.textContent = i === roll.depth - 1 ? "✓ answer" : i === roll.depth ? "✗ fell short" : "";
    li.append(name, p, cmp, mark);
    return li;
  }));
}

// forget the previous image's answer: a new upload, good or bad, never shows it beside its own result
function clearAnswer() {
  $("answer").hidden = true;
  $("path").replaceChildren();
  $("topk").tBodies[0].replaceChildren();
  $("hedged").hidden = true;
  $("allowed").hidden = true;
  $("novel").hidden = true;
  $("rollup").hidden = true;
  $("trace").replaceChildren();
  answer = null;
  scores = new Map();
  if (tree) draw();
}

// the answer options as form fields (only those set); a number the browser cannot read is an error here
function addOptions(form) {
  const minProb = $("min-prob");
  if (minProb.validity.badInput) throw new Error("min_prob: a probability threshold must be a number in [0, 1]");
  const fields = { min_prob: minProb.value, min_prob_at: $("min-prob-at").value, within: $("within").value };
  for (const [k, v] of Object.entries(fields)) if (v.trim()) form.append(k, v.trim());
}

async function predict(file) {
  const mine = ++asked;
  lastFile = file;
  clearAnswer();
  delete document.body.dataset.state;
  $("preview").src = URL.createObjectURL(file);
  $("preview").hidden = false;
  $("drop-text").hidden = true;
  status(`predicting ${file.name}…`);
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    if (!tree) throw new Error("the model's tree is not loaded");
    addOptions(form);
    const query = tree.big ? `siblings=${SIBLINGS}&scores_above=${SHOWN_ABOVE}` : "node_scores=true";
    const r = await fetch(`/predict?${query}`, { method: "POST", body: form });
    const body = await r.json();
    if (!r.ok) throw new Error(body.detail || r.statusText);
    if (mine !== asked) return;  // a newer image or option is being answered
    const result = body.results[0];
    if (result.node_scores) result.node_scores.forEach((s, id) => scores.set(id, s));
    for (const [id, s] of Object.entries(result.scores_above || {})) scores.set(Number(id), s);
    await reveal(result);
    answer = result;
    show(result);
    draw();
    bringIntoView(result.path_ids[result.path_ids.length - 1] ?? 0);
    status(`${file.name}: done`);
    document.body.dataset.state = "done";
  } catch (e) {
    if (mine !== asked) return;
    status(String(e.message || e), true);
    document.body.dataset.state = "error";
  }
}

// a changed option answers the last image again
for (const id of ["min-prob", "min-prob-at", "within"]) {
  $(id).addEventListener("change", () => { if (lastFile) predict(lastFile); });
}

$("tree-wrap").addEventListener("scroll", scrollCue, { passive: true });
window.addEventListener("resize", scrollCue);
$("picker").addEventListener("change", (e) => { if (e.target.files[0]) predict(e.target.files[0]); });
const drop = $("drop");
for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
drop.addEventListener("drop", (e) => { if (e.dataTransfer.files[0]) predict(e.dataTransfer.files[0]); });
loadTree().catch((e) => status("could not load the model's tree: " + (e.message || e), true));
