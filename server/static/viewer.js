// stepzip trace viewer. Plain browser JavaScript, no build step, no external resources.
//
// One request per run returns the trace with a grid of variants (every strategy at
// kappa = 0, 0.1, ..., 1), so the slider and the strategy selector only pick among
// variants the server computed: what is shown as [SKIP] and the reduction are the
// server's numbers, never recomputed here.
"use strict";

const KEY_STORE = "stepzip.apiKey";
const STRATEGIES = ["low", "high", "random"];
const KAPPAS = Array.from({length: 11}, (_, i) => i / 10);

const $ = (id) => document.getElementById(id);
const state = {mode: "generate", run: null, grid: null};

// ---- HTTP ---------------------------------------------------------------------------

function apiUrl(path) {
  // Relative to the page, so the viewer works behind a path prefix too.
  return new URL(`..${path}`, window.location.href).toString();
}

async function api(method, path, body) {
  const headers = {"content-type": "application/json"};
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) headers.authorization = `Bearer ${key}`;
  let response;
  try {
    response = await fetch(apiUrl(path), {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body)});
  } catch (err) {
    throw new Error(`cannot reach the server (${err.message})`);
  }
  const data = await response.json().catch(() => null);
  if (!response.ok) throw new Error(describeError(response.status, data));
  return data;
}

function describeError(status, data) {
  const lines = [`HTTP ${status}: ${(data && data.error) || "request failed"}`];
  for (const d of (data && data.details) || []) {
    if (d.field) lines.push(`  ${d.field}: ${d.reason}`);
  }
  if (status === 401) lines.push("Enter the server's API key at the top right.");
  return lines.join("\n");
}

// ---- page state ---------------------------------------------------------------------

function setBusy(message) {
  document.body.dataset.state = "busy";
  $("status").textContent = message;
  $("error").hidden = true;
  $("submit").disabled = true;
  $("answer").disabled = true;
}

function setDone(message) {
  document.body.dataset.state = "ready";
  $("status").textContent = message;
  $("submit").disabled = false;
  $("answer").disabled = false;
}

function showError(err) {
  document.body.dataset.state = "error";
  $("error").textContent = err.message;
  $("error").hidden = false;
  $("status").textContent = "";
  $("submit").disabled = false;
  $("answer").disabled = false;
}

function setMode(mode) {
  state.mode = mode;
  for (const m of ["generate", "score"]) {
    const tab = $(`mode-${m}`);
    tab.classList.toggle("active", m === mode);
    tab.setAttribute("aria-selected", String(m === mode));
  }
  $("reasoning-box").hidden = mode !== "score";
  $("reasoning").required = mode === "score";
  for (const el of document.querySelectorAll(".gen-only")) el.hidden = mode !== "generate";
}

// ---- requests -----------------------------------------------------------------------

function gridVariants() {
  // kappa = 0 prunes nothing whatever the strategy: ask for it once.
  const variants = [];
  for (const strategy of STRATEGIES) {
    for (const ratio of KAPPAS) {
      if (strategy === "low" || ratio > 0) variants.push({strategy, ratio});
    }
  }
  return variants;
}

function problemFields() {
  const problem = $("problem").value;
  const gold = $("gold").value.trim();
  return {problem, gold: gold || null};
}

async function run(event) {
  event.preventDefault();
  const {problem, gold} = problemFields();
  const common = {variants: gridVariants(), answer: false, return_tokens: true};
  try {
    let response;
    if (state.mode === "generate") {
      setBusy("generating…");
      response = await api("POST", "/v1/compress", {
        ...common,
        problems: [{text: problem, ...(gold ? {answer: gold} : {})}],
        sampling: {max_tokens: Number($("max-tokens").value),
                   temperature: Number($("temperature").value)},
      });
    } else {
      setBusy("scoring…");
      response = await api("POST", "/v1/score", {
        ...common,
        pairs: [{problem, reasoning: $("reasoning").value, ...(gold ? {answer: gold} : {})}],
      });
    }
    const trace = response.results[0].traces[0];
    state.run = {problem, gold, trace, delimiter: response.delimiter};
    state.grid = indexVariants(trace.variants);
    $("answers").hidden = true;
    renderTrace();
    const verb = state.mode === "generate" ? "generated" : "scored";
    setDone(`${verb} ${trace.completion_tokens} tokens in ${response.timings.total_s.toFixed(1)} s`
            + ` (${response.model})`);
  } catch (err) {
    showError(err);
  }
}

function indexVariants(variants) {
  const grid = {};
  for (const v of variants) {
    grid[v.strategy] = grid[v.strategy] || {};
    grid[v.strategy][v.ratio.toFixed(1)] = v;
  }
  return grid;
}

function currentVariant() {
  const kappa = Number($("kappa").value).toFixed(1);
  const strategy = kappa === "0.0" ? "low" : $("strategy").value;
  return state.grid[strategy][kappa];
}

async function answer() {
  // /v1/score answers from its variants: the full reasoning (kappa 0) and the one shown.
  const {problem, gold, trace, delimiter} = state.run;
  const v = currentVariant();
  setBusy("answering…");
  try {
    const response = await api("POST", "/v1/score", {
      // The trace's own token ids: its text need not re-encode to the same tokens.
      pairs: [{problem, reasoning_ids: trace.tokens.ids, ...(gold ? {answer: gold} : {})}],
      variants: [{strategy: "low", ratio: 0}, {strategy: v.strategy, ratio: v.ratio}],
      answer: true, delimiter,
    });
    const [full, compressed] = response.results[0].traces[0].variants;
    $("answer-full").textContent = describeAnswer(full);
    $("answer-compressed-title").textContent = `Compressed (${v.strategy}, ` +
      `κ = ${v.ratio.toFixed(1)}, ${percent(compressed.reduction)} fewer tokens)`;
    $("answer-compressed").textContent = describeAnswer(compressed);
    $("answers").hidden = false;
    setDone(`answered in ${response.timings.total_s.toFixed(1)} s`);
  } catch (err) {
    showError(err);
  }
}

function describeAnswer(v) {
  const verdict = v.correct === null || v.correct === undefined ? ""
    : v.correct ? "\n✓ correct" : "\n✗ wrong";
  return `${(v.answer_text || "").trim() || "(empty)"}\nextracted: ${v.extracted_answer ?? "none"}`
    + verdict;
}

// ---- rendering ----------------------------------------------------------------------

function percent(x) {
  return `${(100 * x).toFixed(1)} %`;
}

function entropyColour(t) {
  // t in [0, 1]: light blue (confident) to light red (uncertain), mixed in RGB so the
  // middle is a neutral tint rather than a detour through green.
  const low = [205, 225, 250], high = [250, 190, 175];
  const mix = low.map((c, i) => Math.round(c + (high[i] - c) * t));
  return `rgb(${mix.join(", ")})`;
}

function renderTrace() {
  const {trace} = state.run;
  // reduce, not Math.max(...xs): long traces exceed the argument-count limit.
  const scores = trace.steps.map((s) => s.score);
  const lo = scores.reduce((a, b) => Math.min(a, b), Infinity);
  const hi = scores.reduce((a, b) => Math.max(a, b), -Infinity);
  const maxEntropy = trace.tokens.entropies.reduce((a, b) => Math.max(a, b), 1e-9);
  const shade = $("shade-tokens").checked;
  const box = $("steps");
  box.replaceChildren();
  for (const step of trace.steps) {
    const div = document.createElement("div");
    div.className = "step";
    div.dataset.index = step.index;
    const t = hi > lo ? (step.score - lo) / (hi - lo) : 0;
    div.style.background = entropyColour(t);
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = `step ${step.index} · ${step.tokens} tokens · entropy ` +
      `${step.entropy_sum.toFixed(2)} nats (mean ${step.entropy_mean.toFixed(2)}, ` +
      `max ${step.entropy_max.toFixed(2)})`;
    const text = document.createElement("div");
    text.className = "text";
    if (shade) {
      for (let i = step.token_start; i < step.token_end; i++) {
        const span = document.createElement("span");
        span.className = "tok";
        span.textContent = trace.tokens.pieces[i];
        const h = trace.tokens.entropies[i];
        span.title = `${h.toFixed(3)} nats`;
        span.style.background = `rgba(230, 60, 0, ${(0.75 * h / maxEntropy).toFixed(3)})`;
        text.append(span);
      }
    } else {
      text.textContent = step.text;
    }
    div.append(meta, text);
    box.append(div);
  }
  const after = trace.answer_text.trim();
  $("after-reasoning").textContent = after ? `After the reasoning: ${after}` : "";
  $("trace-info").textContent = `${trace.steps.length} steps, ${trace.reasoning_tokens} ` +
    `reasoning tokens, total entropy ${trace.entropy_total.toFixed(1)} nats`;
  $("result").hidden = false;
  renderVariant();
}

function renderVariant() {
  if (!state.grid) return;
  $("kappa-value").textContent = Number($("kappa").value).toFixed(1);
  const v = currentVariant();
  const skipped = new Set(v.skipped_steps);
  for (const div of $("steps").children) {
    div.classList.toggle("skipped", skipped.has(Number(div.dataset.index)));
  }
  const count = $("skip-count");
  count.dataset.skipped = String(v.n_skipped);
  count.textContent = `${v.n_skipped} of ${v.n_steps} steps → [SKIP]`;
  $("reduction").textContent = `token reduction ${percent(v.reduction)} ` +
    `(${v.tokens_before} → ${v.tokens_after})`;
  $("compressed").textContent = v.compressed_text;
}

// ---- examples and key -----------------------------------------------------------------

async function loadExamples() {
  const dataset = $("dataset").value;
  try {
    setBusy("loading examples…");
    const data = await api("GET", `/v1/problems?dataset=${encodeURIComponent(dataset)}&limit=50`);
    const select = $("examples");
    select.replaceChildren(new Option(`pick a problem (${data.data.length})`, ""));
    for (const p of data.data) {
      const option = new Option(p.text.slice(0, 90), p.id);
      option.dataset.text = p.text;
      option.dataset.answer = p.answer ?? "";
      select.append(option);
    }
    select.disabled = false;
    setDone("");
  } catch (err) {
    showError(err);
  }
}

function pickExample() {
  const option = $("examples").selectedOptions[0];
  if (!option || !option.value) return;
  $("problem").value = option.dataset.text;
  $("gold").value = option.dataset.answer;
}

function saveKey(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (key) sessionStorage.setItem(KEY_STORE, key);
  else sessionStorage.removeItem(KEY_STORE);
  $("api-key").value = "";
  showKeyState();
}

function showKeyState() {
  $("key-state").textContent = sessionStorage.getItem(KEY_STORE) ? "key set (this tab)" : "";
}

$("key-form").addEventListener("submit", saveKey);
$("run-form").addEventListener("submit", run);
$("mode-generate").addEventListener("click", () => setMode("generate"));
$("mode-score").addEventListener("click", () => setMode("score"));
$("load-examples").addEventListener("click", loadExamples);
$("examples").addEventListener("change", pickExample);
$("kappa").addEventListener("input", renderVariant);
$("strategy").addEventListener("change", renderVariant);
$("shade-tokens").addEventListener("change", () => state.run && renderTrace());
$("answer").addEventListener("click", answer);
showKeyState();
setMode("generate");
