// deeprnn playground: reads the form, POSTs /api/generate with stream=true and renders the
// server-sent events (start, token..., done | error) as they arrive. No framework, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const form = $("gen-form");
const output = $("output");
let controller = null;

function fmt(x, digits) {
  return x === null || x === undefined ? "—" : Number(x).toFixed(digits);
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

function setStatus(text) { $("status").textContent = text; }

function renderCard(card) {
  const rows = [
    ["model", card.id],
    ["cell", `${card.cell} (${card.impl}, ${card.input})`],
    ["layers", card.num_layers],
    ["hidden", card.num_hiddens],
    ["parameters", Number(card.parameters).toLocaleString("en")],
    ["corpus", (card.corpus || []).join(", ") || "—"],
    ["vocabulary", `${card.vocab_size} ${card.token}s`],
    ["trained", card.steps === null || card.steps === undefined ? "—" : `${card.steps} steps`],
    ["valid ppl / bpc", `${fmt(card.valid_ppl, 3)} / ${fmt(card.valid_bpc, 3)}`],
    ["test ppl / bpc", `${fmt(card.test_ppl, 3)} / ${fmt(card.test_bpc, 3)}`],
  ];
  const dl = $("card-fields");
  dl.replaceChildren();
  for (const [k, v] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = String(v);
    dl.append(dt, dd);
  }
  const fig = $("curve-fig");
  if (card.curve_url) {
    $("curve").src = card.curve_url;
    fig.hidden = false;
  } else {
    fig.hidden = true;
  }
  const hint = $("vocab-hint");
  if (card.vocabulary) {
    const shown = card.vocabulary.replace(/ /g, "␣");
    hint.innerHTML = "";
    hint.append("Characters the model knows: ");
    const code = document.createElement("code");
    code.textContent = shown;
    hint.append(code);
  } else {
    hint.textContent = `Words from a ${card.vocab_size}-word vocabulary.`;
  }
}

// The models on offer: the server looks again for runs trained or retrained since it started (its --rescan),
// and the page asks for the list again whenever it comes back into view (a tab or window switched back to).
let cards = {};
let shownCard = null;  // the card on show, to redraw it only when it changed (a retrained run)
let suggested = null;  // the prefix the page put in the box, replaced as the picker moves until typed over

function show() {
  const card = cards[$("model").value];
  if (!card) return;
  const box = $("prefix");
  if (suggested === null) suggested = box.value;
  if (card.default_prefix && box.value === suggested) box.value = suggested = card.default_prefix;
  if (JSON.stringify(card) !== JSON.stringify(shownCard)) renderCard(card);
  shownCard = card;
}

async function loadModels() {
  const resp = await fetch("/api/models");
  const data = await resp.json();
  const select = $("model");
  const chosen = select.value;
  const ids = data.models.map((c) => c.id);
  const label = (card) => `${card.id} — ${card.cell} ${card.num_layers}×${card.num_hiddens}`;
  const labels = data.models.map(label);
  if (labels.join("\n") !== Object.values(cards).map(label).join("\n")) {  // a run added, gone or retrained
    select.replaceChildren();
    for (const card of data.models) {
      const opt = document.createElement("option");
      opt.value = card.id;
      opt.textContent = label(card);
      select.append(opt);
    }
    select.value = ids.includes(chosen) ? chosen : data.default;
  }
  $("model-row").hidden = data.models.length < 2;
  cards = Object.fromEntries(data.models.map((c) => [c.id, c]));
  // The prefix box starts as the chosen model's own prefix (the one its run sampled from: "ROMEO:" for a
  // Shakespeare run) and follows the picker until the user types in it.
  show();
}

function refreshModels() {
  loadModels().catch(() => {});  // the list on show stays; a generation names a model that has gone
}

function syncStrategy() {
  const s = $("strategy").value;
  for (const el of document.querySelectorAll(".sampling")) {
    el.hidden = s !== "sample";
  }
  for (const el of document.querySelectorAll(".beam")) el.hidden = s !== "beam";
}

function request() {
  const num = (id, parse) => {
    const raw = $(id).value.trim();
    return raw === "" ? null : parse(raw);
  };
  const body = {
    prefix: $("prefix").value,
    num_preds: num("num_preds", (v) => parseInt(v, 10)),
    strategy: $("strategy").value,
    num_samples: num("num_samples", (v) => parseInt(v, 10)),
    stream: true,
  };
  if (!$("model-row").hidden) body.model = $("model").value;
  const seed = num("seed", (v) => parseInt(v, 10));
  if (seed !== null) body.seed = seed;
  if (body.strategy === "sample") {
    body.temperature = parseFloat($("temperature").value);
    const k = num("top_k", (v) => parseInt(v, 10));
    const p = num("top_p", parseFloat);
    if (k !== null) body.top_k = k;
    if (p !== null) body.top_p = p;
  }
  if (body.strategy === "beam") body.beam_width = num("beam_width", (v) => parseInt(v, 10));
  // an empty box means the server's default (null was refused as "beam_width: Input should be a valid integer")
  for (const key of ["num_preds", "num_samples", "beam_width"]) if (body[key] === null) delete body[key];
  return body;
}

function makeSamples(n, prefix) {
  output.replaceChildren();
  const gens = [];
  for (let i = 0; i < n; i++) {
    const pre = document.createElement("pre");
    pre.className = "sample running";
    pre.dataset.index = String(i);
    const p = document.createElement("span");
    p.className = "prefix";
    p.textContent = prefix;
    const g = document.createElement("span");
    g.className = "gen";
    pre.append(p, g);
    output.append(pre);
    gens.push(g);
  }
  return gens;
}

function parseEvent(block) {
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  return { event, data: data.length ? JSON.parse(data.join("\n")) : null };
}

function finish(state) {
  output.dataset.state = state;
  for (const pre of output.querySelectorAll(".sample")) pre.classList.remove("running");
  $("generate").disabled = false;
  $("stop").disabled = true;
  controller = null;
}

async function generate(ev) {
  ev.preventDefault();
  showError("");
  const body = request();
  controller = new AbortController();
  $("generate").disabled = true;
  $("stop").disabled = false;
  output.dataset.state = "running";
  setStatus("generating…");
  let gens = [];
  let chars = 0;
  try {
    const resp = await fetch("/api/generate", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!resp.ok) {
      let detail = `${resp.status} ${resp.statusText}`;
      try { detail = (await resp.json()).detail || detail; } catch (_) { /* not JSON */ }
      showError(detail);
      setStatus("");
      finish("error");
      return;
    }
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value;
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const { event, data } = parseEvent(buf.slice(0, cut));
        buf = buf.slice(cut + 2);
        if (event === "start") {
          gens = makeSamples(data.num_samples, data.prefix);
          // greedy and beam have no seed: an earlier sample's must not be shown as theirs
          if (data.seed !== null && data.seed !== undefined) output.dataset.seed = String(data.seed);
          else delete output.dataset.seed;
        } else if (event === "token") {
          gens[data.i].textContent += data.text;
          chars += data.text.length;
          setStatus(`${chars} characters…`);
        } else if (event === "done") {
          data.samples.forEach((s, i) => {
            if (gens[i]) gens[i].textContent = s.slice(body.prefix.length);
          });
          const seed = output.dataset.seed ? ` · seed ${output.dataset.seed}` : "";
          setStatus(`done in ${data.elapsed_s.toFixed(2)} s` +
            (data.tokens_per_s ? ` · ${Math.round(data.tokens_per_s).toLocaleString("en")} tokens/s` : "") + seed);
          finish("done");
          return;
        } else if (event === "error") {
          showError(data.detail);
          setStatus("");
          finish("error");
          return;
        }
      }
    }
    finish("done");
  } catch (err) {
    if (err.name === "AbortError") {
      setStatus("stopped");
      finish("stopped");
    } else {
      showError(`request failed: ${err.message}`);
      setStatus("");
      finish("error");
    }
  }
}

$("temperature").addEventListener("input", () => {
  $("temperature-out").textContent = Number($("temperature").value).toFixed(2);
});
$("strategy").addEventListener("change", syncStrategy);
$("stop").addEventListener("click", () => controller && controller.abort());
form.addEventListener("submit", generate);
syncStrategy();
$("model").addEventListener("change", show);
document.addEventListener("visibilitychange", () => { if (!document.hidden) refreshModels(); });
window.addEventListener("focus", refreshModels);
loadModels().catch((err) => showError(`cannot load the model list: ${err.message}`));
