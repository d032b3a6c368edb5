"use strict";
// The Explorer: asks the server's /v1/explain (or reads the data embedded by `mtkit explore`) and
// draws it. It computes nothing about the model itself: every number comes from the answer.
const $ = (id) => document.getElementById(id);
const MODE = JSON.parse($("explorer-mode").textContent);
const SVG = "http://www.w3.org/2000/svg";
let data = JSON.parse($("explorer-data").textContent);
let asked = 0;  // requests sent; an answer to an older one is dropped

function el(tag, attrs = {}, text) {
  const node = tag === "svg" || ["g", "rect", "text", "path", "title", "line"].includes(tag)
    ? document.createElementNS(SVG, tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}
const fixed = (x, n = 4) => (x === null || x === undefined ? "" : Number(x).toFixed(n));
const prob = (lp) => (Math.exp(lp) * 100).toFixed(1) + "%";

function setState(state, message = "") {
  document.body.dataset.state = state;
  $("status").textContent = message;
  if (state !== "error") { $("error").hidden = true; $("error").textContent = ""; }
}
function fail(message) {
  document.body.dataset.state = "error";
  $("status").textContent = "";
  $("error").hidden = false;
  $("error").textContent = message;
}

// ---------------------------------------------------------------------------------------------
// Asking the server.

async function post(path, body) {
  let response;
  try {
    response = await fetch(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  } catch (e) {
    throw new Error("The server does not answer: is `mtkit serve` still running? (" + e.message + ")");
  }
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = answer.detail;
    const said = Array.isArray(detail)
      ? detail.map((d) => (d.loc ? d.loc.filter((x) => x !== "body").join(".") + ": " : "") + d.msg).join("; ")
      : detail || response.statusText;
    throw new Error(`The server refused (${response.status}): ${said}`);
  }
  return answer;
}

async function explainNow(withWhatif = false) {
  const text = $("text").value;
  if (!text.trim()) { fail("Type a sentence to translate: the box is empty."); return; }
  const beam = Number($("beam").value), alpha = Number($("alpha").value);
  if (!Number.isInteger(beam) || beam < 1 || beam > 16) { fail("Beam size: a whole number from 1 to 16."); return; }
  if (!(alpha >= 0 && alpha <= 5)) { fail("Length penalty α: a number from 0 to 5."); return; }
  const body = { text, beam_size: beam, alpha };
  if (!$("target-field").hidden) body.target_lang = $("target").value;  // a model of several target languages
  const whatif = $("whatif-text").value;
  if (withWhatif && !whatif.trim()) { fail("What if: type a translation to score."); return; }
  if (withWhatif || (data && data.whatif && data.whatif.text === whatif)) body.translation = whatif;
  const mine = ++asked;
  setState("busy", "translating…");
  try {
    const answer = await post("/v1/explain", body);
    if (mine !== asked) return;
    data = answer;
    render();
  } catch (e) {
    if (mine === asked) fail(e.message);
  }
}

let timer = null;
function soon() { clearTimeout(timer); timer = setTimeout(() => explainNow(false), 350); }

// ---------------------------------------------------------------------------------------------
// Drawing.

function render() {
  $("warnings").replaceChildren(...data.warnings.map((w) => el("li", {}, w)));
  if (!MODE.live) { $("text").value = data.source.text; }
  $("beam").value = data.settings.beam_size;
  $("alpha").value = data.settings.alpha;
  renderTokens();
  renderSearch();
  renderAttention();
  renderWhatif();
  document.body.dataset.version = Number(document.body.dataset.version) + 1;
  setState("ready", "");
}

function chips(target, pieces, ids, kind) {
  target.replaceChildren(...pieces.map((p, i) => {
    const chip = el("span", { class: "piece", "data-kind": kind, "data-index": i, title: `id ${ids[i]}` }, p);
    chip.append(el("small", {}, String(ids[i])));
    return chip;
  }));
}

function renderTokens() {
  const best = data.beam.hypotheses[0];
  chips($("src-pieces"), data.source.pieces, data.source.ids, "source");
  chips($("tgt-pieces"), best.pieces, best.ids.concat([data.eos_id]), "target");
  $("beam-translation").textContent = data.beam.translation;
  $("beam-score").textContent = `score ${fixed(best.score)}`;
  const greedy = data.greedy.hypotheses[0];
  $("greedy-translation").textContent = data.greedy.translation;
  $("greedy-score").textContent = `score ${fixed(greedy.score)}`;
  const part = data.parting, k = data.settings.beam_size;
  let said;
  if (part === null) said = "Greedy and beam search agree on every subword.";
  else {
    const piece = (h) => (part.at < h.pieces.length ? h.pieces[part.at] : "</s>");
    said = `They part at subword ${part.at + 1}: greedy took “${piece(greedy)}”, beam search's winner has “${piece(best)}”. ` +
      { pruned: "Beam search weighed greedy's subword there and pruned it: other prefixes were more likely at that step.",
        kept: "Beam search kept greedy's subword alive, but other hypotheses finished with better scores first.",
        finished: "Beam search finished that hypothesis too, with a lower score.",
        stopped: `Beam search had greedy's subword among its candidates when it stopped (it stops once ${k} hypotheses have finished).`,
        unseen: `Greedy's subword was not even among beam search's ${2 * k} best candidates there.` }[part.greedy_fate];
    said += best.score >= greedy.score
      ? ` Looking further than one step paid off: ${fixed(best.score)} against greedy's ${fixed(greedy.score)}.`
      : ` Here greedy scores better (${fixed(greedy.score)} against ${fixed(best.score)}): beam search is not an exact search.`;
  }
  $("parting").textContent = said;
}

function drawTree(box, tree, upTo) {
  const byStep = [];
  for (const n of tree) (byStep[n.step] ||= []).push(n);
  const y = {};
  const dx = 96, dy = 24, w = 84, h = 18;
  byStep.forEach((nodes, s) => {
    nodes.sort((p, q) => (s === 0 ? 0 : y[p.parent] - y[q.parent]) || q.log_prob - p.log_prob);
    nodes.forEach((n, i) => { y[n.id] = i; });
  });
  const rows = Math.max(...byStep.map((n) => n.length));
  const svg = el("svg", { width: dx * byStep.length + 20, height: dy * rows + 10 });
  const shown = tree.filter((n) => n.step <= upTo);
  for (const n of shown) {
    if (n.parent === null) continue;
    const p = tree[n.parent];
    const x1 = 10 + p.step * dx + w, y1 = 5 + y[p.id] * dy + h / 2, x2 = 10 + n.step * dx, y2 = 5 + y[n.id] * dy + h / 2;
    svg.append(el("path", { class: "edge" + (n.best ? " best" : ""), d: `M${x1},${y1} C${x1 + 8},${y1} ${x2 - 8},${y2} ${x2},${y2}` }));
  }
  for (const n of shown) {
    const g = el("g", { class: `node ${n.fate}` + (n.best ? " best" : ""), transform: `translate(${10 + n.step * dx},${5 + y[n.id] * dy})`,
                        "data-step": n.step, "data-fate": n.fate, tabindex: "0" });
    g.append(el("rect", { width: w, height: h, rx: 3 }));
    g.append(el("text", { x: 4, y: 13 }, n.piece.length > 9 ? n.piece.slice(0, 8) + "…" : n.piece));
    const said = n.fate === "root" ? "start of the output" :
      `${n.piece}: total log-probability ${fixed(n.log_prob)}` +
      ({ finished: `; finished, score ${fixed(n.score)}`, kept: "; lived on", pruned: "; pruned",
         stopped: "; still a candidate when the search stopped" }[n.fate]);
    g.append(el("title", {}, said));
    const tell = () => { $(box.id + "-info").textContent = `step ${n.step}: ${said}`; };
    g.addEventListener("mouseenter", tell);
    g.addEventListener("focus", tell);
    svg.append(g);
  }
  box.replaceChildren(svg);
}

function renderSearch() {
  const steps = Math.max(...data.beam.tree.map((n) => n.step), ...data.greedy.tree.map((n) => n.step));
  const slider = $("step");
  const atEnd = Number(slider.value) >= Number(slider.max) || document.body.dataset.version === "0";
  slider.max = steps;
  if (atEnd || Number(slider.value) > steps) slider.value = steps;
  $("beam-size-note").textContent = `(beam size ${data.settings.beam_size}, α ${data.settings.alpha})`;
  drawSteps();
  const rows = data.beam.hypotheses.map((h, i) => {
    const tr = el("tr", { class: i === 0 ? "winner" : "" });
    for (const v of [i + 1, h.text, fixed(h.log_prob), h.length, fixed(h.penalty), fixed(h.score)]) tr.append(el("td", {}, String(v)));
    return tr;
  });
  $("finished").tBodies[0].replaceChildren(...rows);
}

function drawSteps() {
  const upTo = Number($("step").value);
  $("step-out").textContent = `${upTo} of ${$("step").max}`;
  drawTree($("beam-tree"), data.beam.tree, upTo);
  drawTree($("greedy-tree"), data.greedy.tree, upTo);
}

function options(select, labels) {
  const was = select.value;
  select.replaceChildren(...labels.map(([value, text]) => el("option", { value }, text)));
  if (labels.some(([value]) => value === was)) select.value = was;
}

function renderAttention() {
  const layers = data.attention.cross.length, heads = data.attention.cross[0].length;
  options($("layer"), [...Array(layers).keys()].map((l) => [String(l), `${l + 1}`]));
  options($("head"), [["mean", "mean of heads"], ...[...Array(heads).keys()].map((h) => [String(h), `${h + 1}`])]);
  drawAttention();
}

function pick(weights) {
  // weights: [layer][head][row][column] -> the chosen layer's head, or the mean of its heads
  const l = Number($("layer").value), head = $("head").value;
  const heads = weights[l];
  if (head !== "mean") return heads[Number(head)];
  return heads[0].map((row, i) => row.map((_, j) => heads.reduce((s, hh) => s + hh[i][j], 0) / heads.length));
}

function heatmap(box, matrix, rowPieces, colPieces, name, masked) {
  const table = el("table", { "data-map": name });
  const head = el("tr", {}, undefined);
  head.append(el("th", {}, ""));
  colPieces.forEach((p, j) => head.append(el("th", { scope: "col", tabindex: "0", "data-col": j }, p)));
  table.append(el("thead")); table.tHead.append(head);
  const body = el("tbody");
  matrix.forEach((row, i) => {
    const tr = el("tr");
    tr.append(el("th", { scope: "row", tabindex: "0", "data-row": i }, rowPieces[i]));
    row.forEach((w, j) => {
      const hidden = masked && j > i;
      const td = el("td", { class: hidden ? "masked" : "", "data-weight": w,
                            title: hidden ? `${rowPieces[i]} cannot see ${colPieces[j]}: it comes later (masked)` :
                              `${rowPieces[i]} → ${colPieces[j]}: ${fixed(w, 3)}` });
      if (!hidden) td.style.background = `rgba(37, 99, 235, ${w})`;
      tr.append(td);
    });
    body.append(tr);
  });
  table.append(body);
  const light = (headers, weights) => {
    const top = Math.max(...weights);
    headers.forEach((th, k) => {
      th.classList.toggle("lit", weights[k] === top);
      th.style.background = `rgba(234, 88, 12, ${weights[k]})`;
      th.dataset.weight = weights[k];
    });
  };
  const cols = [...head.querySelectorAll("th[data-col]")], rows = [...body.querySelectorAll("th[data-row]")];
  const clear = () => { for (const th of cols.concat(rows)) { th.classList.remove("lit"); th.style.background = ""; delete th.dataset.weight; } };
  rows.forEach((th, i) => { const on = () => { clear(); th.classList.add("lit"); light(cols, matrix[i]); mirror(name, "row", matrix[i]); };
    th.addEventListener("mouseenter", on); th.addEventListener("focus", on); });
  cols.forEach((th, j) => { const on = () => { clear(); th.classList.add("lit"); light(rows, matrix.map((r) => r[j])); mirror(name, "col", matrix.map((r) => r[j])); };
    th.addEventListener("mouseenter", on); th.addEventListener("focus", on); });
  table.addEventListener("mouseleave", () => { clear(); mirror(null); });
  box.replaceChildren(table);
}

function mirror(name, axis, weights) {
  // Cross-attention also lights the subword chips of section 1: source chips for an output row.
  document.querySelectorAll(".piece.lit").forEach((c) => { c.classList.remove("lit"); c.style.background = ""; });
  if (name !== "cross") return;
  const kind = axis === "row" ? "source" : "target";
  document.querySelectorAll(`.piece[data-kind=${kind}]`).forEach((c) => {
    const w = weights[Number(c.dataset.index)];
    if (w === undefined) return;
    c.style.background = `rgba(234, 88, 12, ${w})`;
    if (w === Math.max(...weights)) c.classList.add("lit");
  });
}

function drawAttention() {
  const src = data.source.pieces, tgt = data.beam.hypotheses[0].pieces;
  // The decoder reads its start token (<s>; <pad> in a Marian model: the tree's root) and what it wrote before.
  const inputs = [data.beam.tree[0].piece].concat(tgt.slice(0, -1));
  heatmap($("cross"), pick(data.attention.cross), tgt, src, "cross", false);
  heatmap($("encoder"), pick(data.attention.encoder), src, src, "encoder", false);
  heatmap($("decoder"), pick(data.attention.decoder), inputs, inputs, "decoder", true);
}

function renderWhatif() {
  const w = data.whatif;
  if (!w) { $("whatif-summary").textContent = ""; $("whatif-table").tBodies[0].replaceChildren(); return; }
  if (!MODE.live) $("whatif-text").value = w.text;
  const best = data.beam.hypotheses[0];
  $("whatif-summary").textContent = `The model's log-probability of it: ${fixed(w.log_prob)}; score ${fixed(w.score)} ` +
    `(length ${w.length} with </s>, α ${data.settings.alpha}); beam search's translation scores ${fixed(best.score)}. ` +
    (w.at_limit ? "It reaches the length limit, where the search forces </s> at no cost. " : "") +
    (w.parts_at === null ? "The model would have written every subword of it." :
      `It parts from the model's choice at subword ${w.parts_at + 1}.`);
  $("whatif-summary").dataset.score = fixed(w.score);
  $("whatif-table").tBodies[0].replaceChildren(...w.tokens.map((t, i) => {
    const tr = el("tr", { class: t.id !== t.choice ? "parts" : "" });
    for (const v of [t.piece, prob(t.log_prob), t.choice_piece, prob(t.choice_log_prob)]) tr.append(el("td", {}, v));
    return tr;
  }));
}

// ---------------------------------------------------------------------------------------------

function start() {
  $("step").addEventListener("input", drawSteps);
  $("step-back").addEventListener("click", () => { $("step").value = Number($("step").value) - 1; drawSteps(); });
  $("step-on").addEventListener("click", () => { $("step").value = Number($("step").value) + 1; drawSteps(); });
  $("layer").addEventListener("change", drawAttention);
  $("head").addEventListener("change", drawAttention);
  if (MODE.live) {
    $("text").addEventListener("input", soon);
    $("beam").addEventListener("input", soon);
    $("alpha").addEventListener("input", soon);
    $("target").addEventListener("change", soon);
    $("whatif-go").addEventListener("click", () => explainNow(true));
    $("whatif-text").addEventListener("keydown", (e) => { if (e.key === "Enter") explainNow(true); });
    fetch("/v1/model").then((r) => r.json()).then((m) => {
      $("about").textContent = `Model: ${m.source_language} → ${m.target_language}, ${m.parameters.toLocaleString("en")} parameters, ` +
        `step ${m.step}` + (m.valid_bleu ? `, validation BLEU ${m.valid_bleu.toFixed(1)}` : "") + ". Every number below comes from it.";
      $("src-lang").textContent = m.source_language ? `(${m.source_language})` : "";
      if (m.target_languages.length > 1) {
        options($("target"), m.target_languages.map((t) => [t, t]));
        $("target-field").hidden = false;
        $("about").textContent = `Model: ${m.directions.join(", ")}, ${m.parameters.toLocaleString("en")} parameters. ` +
          "Every number below comes from it.";
      }
      $("beam").value = m.decode.beam_size;
      $("alpha").value = m.decode.alpha;
    }).catch(() => fail("The server does not answer: is `mtkit serve` still running?"));
  } else {
    for (const id of ["text", "beam", "alpha", "whatif-text", "whatif-go"]) $(id).disabled = true;
    $("about").textContent = "A saved page (mtkit explore): the sentence and its search are fixed; changing them needs `mtkit serve`.";
  }
  if (data) render();
}
start();
