// The search page's script: reads the filters, POSTs the search as JSON, draws the hits.
// Every text from the database is set with textContent (never as HTML), and images come only
// from this server's /thumbnail route, fetched and shown as blob: URLs (the page's CSP
// allows nothing else), so a row's image reference never reaches the browser.
"use strict";

const state = { like: null, options: null, seq: 0 };
const $ = (id) => document.getElementById(id);

function words(input) {
  return input.value.split(",").map((w) => w.trim()).filter((w) => w);
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

async function loadOptions() {
  const response = await fetch("/api/options");
  const options = await response.json();
  state.options = options;
  for (const color of options.colors) {
    const label = el("label", "color-choice");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = color;
    box.name = "color";
    box.addEventListener("change", rerun);
    const swatch = el("span", "swatch");
    swatch.style.background = color;  // the names are CSS color keywords
    label.append(box, swatch, document.createTextNode(color));
    $("colors").append(label);
  }
  for (const language of options.languages) {
    const label = el("label", "language-choice");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = language;
    box.name = "language";
    box.addEventListener("change", rerun);
    label.append(box, document.createTextNode(" has " + language));
    $("languages").append(label);
  }
  for (const mode of options.modes) {
    const option = el("option", "", mode);
    option.value = mode;
    if (mode !== "caption" && !options.image_model) {
      option.disabled = true;
      option.textContent = mode + " (no image model)";
    }
    $("mode").append(option);
  }
}

function query() {
  const checked = (name) =>
    [...document.querySelectorAll(`input[name=${name}]:checked`)].map((b) => b.value);
  const body = {
    colors: checked("color"),
    languages: checked("language"),
    tags: words($("tags")),
    users: words($("users")),
    mode: $("mode").value || null,
    top_k: Number($("top-k").value),
  };
  if (state.like) body.like_id = state.like.item_id;
  else body.text = $("text").value;
  return body;
}

function rerun() {
  if (state.like || $("text").value.trim()) run();
}

async function run() {
  const seq = ++state.seq;  // an older answer arriving late must not replace a newer one
  $("status").textContent = "Searching…";
  document.body.dataset.state = "searching";
  let response, answer;
  try {
    response = await fetch("/api/search", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(query()),
    });
    answer = await response.json();
  } catch (err) {
    answer = { error: "network", message: "the page's server did not answer" };
    response = { ok: false };
  }
  if (seq !== state.seq) return;
  if (!response.ok) {
    $("status").textContent = "Search failed: " + (answer.message || answer.error);
    $("hits").replaceChildren();
    $("notes").replaceChildren();
    document.body.dataset.state = "failed";
    return;
  }
  draw(answer);
  document.body.dataset.state = "done";
}

function draw(answer) {
  const n = answer.hits.length;
  $("status").textContent =
    (n ? `${n} hit${n === 1 ? "" : "s"}` : "No matching items") + `, ranked by ${answer.mode}`;
  $("notes").replaceChildren(...answer.notes.map((note) => el("li", "", note)));
  $("hits").replaceChildren(...answer.hits.map((hit, i) => card(hit, i + 1, answer.mode)));
}

function card(hit, rank, mode) {
  const node = $("hit-template").content.firstElementChild.cloneNode(true);
  node.dataset.itemId = hit.item_id;
  node.dataset.userId = hit.user_id;
  node.querySelector(".rank").textContent = "#" + rank;
  node.querySelector(".item-id").textContent = hit.item_id;
  node.querySelector(".user-id").textContent = hit.user_id;
  const captions = node.querySelector(".captions");
  const languages = Object.keys(hit.captions || {});
  if (!languages.length) captions.append(el("dt", "", "caption"), el("dd", "", hit.caption));
  for (const language of languages) {
    const dd = el("dd", "", hit.captions[language]);
    dd.lang = language;
    captions.append(el("dt", "", language), dd);
  }
  const colors = node.querySelector(".colors");
  for (const color of hit.dominant_colors) {
    const chip = el("span", "color-chip", color);
    const swatch = el("span", "swatch");
    swatch.style.background = color;
    chip.prepend(swatch);
    colors.append(chip);
  }
  const tags = node.querySelector(".tags");
  for (const tag of hit.style_tags) tags.append(el("span", "tag style", tag));
  for (const tag of hit.object_tags) tags.append(el("span", "tag object", tag));
  const scores = node.querySelector(".scores");
  // Fused: the reciprocal-rank-fusion score (k = 60), else the signal's cosine similarity.
  const label = mode === "both" ? "fused score (RRF) " : "similarity ";
  scores.append(el("span", "score", label + hit.score.toFixed(4)));
  for (const s of hit.signals) {
    const line = `${s.signal} #${s.rank} · ${s.similarity.toFixed(3)} (${s.model}, ${s.dimensions} dims)`;
    const span = el("span", "signal", line);
    span.dataset.signal = s.signal;
    scores.append(span);
  }
  if (hit.filters_met.length) {
    node.querySelector(".filters-met").textContent = "matched: " + hit.filters_met.join(", ");
  }
  node.querySelector(".more").addEventListener("click", () => likeThis(hit));
  thumbnail(node.querySelector(".thumb"), hit);
  return node;
}

async function thumbnail(box, hit) {
  box.dataset.state = "loading";
  try {
    const response = await fetch(hit.thumbnail);
    if (response.ok && response.headers.get("content-type") === "image/jpeg") {
      const img = document.createElement("img");
      img.alt = hit.caption;
      img.src = URL.createObjectURL(await response.blob());
      img.addEventListener("load", () => URL.revokeObjectURL(img.src), { once: true });
      box.replaceChildren(img);
      box.dataset.state = "shown";
      return;
    }
    const answer = await response.json().catch(() => ({}));
    placeholder(box, answer.error);
  } catch (err) {
    placeholder(box, "network");
  }
}

function placeholder(box, code) {
  const reason = /^[a-z_]{1,40}$/.test(code || "") ? code : "image_error";
  const p = el("div", "placeholder");
  p.append(el("span", "", "no picture"), el("code", "reason", reason));
  box.replaceChildren(p);
  box.dataset.state = "failed";
  box.dataset.reason = reason;
}

function likeThis(hit) {
  state.like = hit;
  $("like-id").textContent = hit.item_id;
  $("like-user").textContent = hit.user_id;
  $("like").hidden = false;
  window.scrollTo(0, 0);
  run();
}

function clearLike() {
  state.like = null;
  $("like").hidden = true;
  rerun();
}

document.addEventListener("DOMContentLoaded", async () => {
  await loadOptions();
  $("search").addEventListener("submit", (event) => {
    event.preventDefault();
    state.like = null;
    $("like").hidden = true;
    run();
  });
  $("like-clear").addEventListener("click", clearLike);
  for (const id of ["mode", "top-k"]) $(id).addEventListener("change", rerun);
  for (const id of ["tags", "users"]) {
    $(id).addEventListener("keydown", (event) => {
      if (event.key === "Enter") rerun();
    });
  }
  document.body.dataset.ready = "1";
});
