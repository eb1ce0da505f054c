// The feature dashboard viewer. Data arrive as scripts calling nndIndex / nndVocab / nndCards
// (file:// pages may not fetch()). Text is put in with textContent only, never as HTML.
"use strict";

const S = { about: null, rows: [], shown: [], vocab: {}, cards: {}, waiting: {}, loaded: {},
            sort: "freq", desc: true, page: 0, per: 50, query: "", open: null };

function nndVocab(v) { S.vocab = v; }

function nndIndex(about, cols) {
  S.about = about;
  S.rows = cols.i.map((i, r) => ({ layer: cols.layer[r], i: i, freq: cols.freq[r], max: cols.max[r],
                                   mean: cols.mean[r], top: cols.top[r] }));
}

function nndCards(layer, block, cards) {
  for (const c of cards) S.cards[layer + "/" + c.i] = c;
  const key = layer + "-" + block;
  S.loaded[key] = true;
  for (const f of S.waiting[key] || []) f();
  delete S.waiting[key];
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function tokText(id) {
  const t = S.vocab[String(id)];
  return t === undefined ? "<" + id + ">" : t.replace(/\n/g, "⏎");
}

function fmt(x) { return x === 0 ? "0" : Math.abs(x) < 1e-3 ? x.toExponential(2) : String(+x.toPrecision(3)); }

function name(row) { return S.about.source_layers.length > 1 ? "L" + row.layer + "/" + row.i : String(row.i); }

// ---- the index --------------------------------------------------------------------------
function applyView() {
  const q = S.query.toLowerCase();
  S.shown = q ? S.rows.filter(r => r.top.toLowerCase().split("\u241f").some(t => t.includes(q))) : S.rows.slice();
  const k = S.sort, sign = S.desc ? -1 : 1;
  S.shown.sort((a, b) => sign * (a[k] - b[k]) || a.layer - b.layer || a.i - b.i);
  S.page = Math.min(S.page, Math.max(0, Math.ceil(S.shown.length / S.per) - 1));
  renderIndex();
}

function renderIndex() {
  const body = document.querySelector("#latents tbody");
  body.replaceChildren();
  for (const r of S.shown.slice(S.page * S.per, (S.page + 1) * S.per)) {
    const tr = el("tr", { class: "latent", "data-latent": r.layer + "/" + r.i },
      el("td", {}, name(r)), el("td", {}, fmt(r.freq)), el("td", {}, fmt(r.max)), el("td", {}, fmt(r.mean)),
      el("td", { class: "toks" }, r.top.split("\u241f").map(t => JSON.stringify(t)).join(" ")));
    tr.addEventListener("click", () => openCard(r.layer, r.i));
    body.append(tr);
  }
  document.getElementById("count").textContent = S.shown.length + " latents";
  const pages = Math.max(1, Math.ceil(S.shown.length / S.per));
  document.getElementById("page").textContent = "page " + (S.page + 1) + " of " + pages;
  for (const th of document.querySelectorAll("th[data-key]")) th.classList.toggle("sorted", th.dataset.key === S.sort);
}

// ---- a card -----------------------------------------------------------------------------
function loadCards(layer, i, then) {
  const block = Math.floor(i / S.about.block), key = layer + "-" + block;
  if (S.loaded[key]) return then();
  if (!S.waiting[key]) {
    S.waiting[key] = [];
    document.body.append(el("script", { src: "data/cards/L" + key + ".js" }));
  }
  S.waiting[key].push(then);
}

function openCard(layer, i) {
  S.open = layer + "/" + i;
  loadCards(layer, i, () => renderCard(layer, S.cards[layer + "/" + i]));
}

function histogram(counts, edges) {
  const W = 320, H = 90, n = counts.length, top = Math.max(1, ...counts);
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", W); svg.setAttribute("height", H + 16); svg.setAttribute("class", "hist");
  counts.forEach((c, b) => {
    const r = document.createElementNS(ns, "rect"), h = (H * c) / top;
    r.setAttribute("x", (b * W) / n); r.setAttribute("y", H - h);
    r.setAttribute("width", Math.max(1, W / n - 1)); r.setAttribute("height", h); r.setAttribute("fill", "#4477aa");
    svg.append(r);
  });
  for (const b of [0, n / 2, n]) {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", Math.min(W - 30, (b * W) / n)); t.setAttribute("y", H + 13); t.setAttribute("font-size", "10");
    t.textContent = "1e" + edges[b]; svg.append(t);
  }
  return svg;
}

function context(c, scale) {
  const div = el("div", { class: "ctx" }, el("span", { class: "act" }, fmt(c.a)));
  c.t.forEach((tok, j) => {
    const strength = scale > 0 ? Math.max(0, Math.min(1, c.v[j] / scale)) : 0;
    const span = el("span", { class: j === c.c ? "tok hot" : "tok", title: fmt(c.v[j]) }, tokText(tok));
    if (strength > 0) span.style.background = "rgba(255, 120, 0, " + (0.15 + 0.85 * strength).toFixed(2) + ")";
    div.append(span);
  });
  return div;
}

function renderCard(layer, c) {
  const box = document.getElementById("card");
  const label = S.about.source_layers.length > 1 ? "latent L" + layer + "/" + c.i : "latent " + c.i;
  box.replaceChildren(el("h2", {}, label),
    el("div", { class: "muted" }, "frequency " + fmt(c.freq) + " (" + c.count + " tokens; denser than " +
       Math.round(100 * c.rank) + "% of latents) · mean " + fmt(c.mean) + " · max " + fmt(c.max)));
  box.append(el("h3", {}, "nonzero activations (log10 bins)"), histogram(c.hist, S.about.hist_log10_edges));
  const up = el("ol", {}), down = el("ol", {});
  for (const [t, v] of c.up) up.append(el("li", {}, JSON.stringify(tokText(t)) + " +" + fmt(v)));
  for (const [t, v] of c.down) down.append(el("li", {}, JSON.stringify(tokText(t)) + " " + fmt(v)));
  box.append(el("h3", {}, "logit effects (direct path)"),
    el("div", { class: "logits" }, el("div", {}, "promotes", up), el("div", {}, "suppresses", down)));
  const top = el("div", { id: "top-contexts" });
  for (const x of c.top) top.append(context(x, c.max));
  box.append(el("h3", {}, "top activations"), top);
  if (c.q && c.q.length) {
    const q = el("div", { id: "quantile-contexts" }), per = Math.ceil(c.q.length / 4);
    for (let g = 3; g >= 0; g--) {
      const part = c.q.slice(g * per, (g + 1) * per);
      if (!part.length) continue;
      q.append(el("div", { class: "muted" }, "quantile " + (25 * g) + "–" + (25 * (g + 1)) + "%"));
      for (const x of part.slice().reverse()) q.append(context(x, c.max));
    }
    box.append(el("h3", {}, "random activations, by quantile"), q);
  }
  for (const tr of document.querySelectorAll("tr.latent"))
    tr.classList.toggle("open", tr.dataset.latent === layer + "/" + c.i);
}

// ---- start ------------------------------------------------------------------------------
function nndStart() {
  const a = S.about;
  document.getElementById("about").textContent = a.lm + " · " + a.label + (a.k ? " k=" + a.k : "") + " · " +
    S.rows.length + " latents · " + a.rows_scanned + " tokens scanned · " + a.checkpoint;
  const params = new URLSearchParams(location.hash.slice(1));
  S.query = params.get("q") || "";
  if (params.get("sort")) S.sort = params.get("sort");
  if (params.get("per")) S.per = Math.max(1, parseInt(params.get("per"), 10));
  document.getElementById("search").value = S.query;
  document.getElementById("search").addEventListener("input", e => { S.query = e.target.value; S.page = 0; applyView(); });
  for (const th of document.querySelectorAll("th[data-key]"))
    th.addEventListener("click", () => { S.desc = S.sort === th.dataset.key ? !S.desc : true; S.sort = th.dataset.key; applyView(); });
  document.getElementById("prev").addEventListener("click", () => { S.page = Math.max(0, S.page - 1); renderIndex(); });
  document.getElementById("next").addEventListener("click", () => {
    S.page = Math.min(Math.ceil(S.shown.length / S.per) - 1, S.page + 1); renderIndex(); });
  applyView();
  const card = /^(?:L?(\d+)\/)?(\d+)$/.exec(params.get("card") || "");
  if (card) openCard(card[1] !== undefined ? +card[1] : a.source_layers[0], +card[2]);
}
