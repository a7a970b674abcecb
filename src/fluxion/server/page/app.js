// fluxion's page: the form posts to /v1/images/generations with stream=true and reads the server-sent events
// (step previews, then the image); the gallery keeps each image with the settings that reproduce it. No libraries,
// no external requests: it works offline, from the server that serves it.
"use strict";

const KEY_STORAGE = "fluxion.apiKey";
const PARTIAL_IMAGES = 3; // the server's most previews per image
const $ = (id) => document.getElementById(id);
let cards = 0;

function apiKey() {
  return $("key").value.trim();
}

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  if (apiKey()) h.Authorization = "Bearer " + apiKey();
  return h;
}

function say(message) {
  $("status").textContent = message || "";
}

async function errorMessage(response) {
  if (response.status === 401) {
    return apiKey() ? "The API key was refused." : "This server needs an API key: enter it at the top.";
  }
  try {
    return (await response.json()).error.message;
  } catch (e) {
    return `HTTP ${response.status}`;
  }
}

async function loadModels() {
  $("generate").disabled = true;
  let response;
  try {
    response = await fetch("/v1/models", { headers: headers(false) });
  } catch (e) {
    return say("The server cannot be reached.");
  }
  if (!response.ok) return say(await errorMessage(response));
  const select = $("model");
  const previous = select.value;
  select.replaceChildren();
  for (const model of (await response.json()).data) select.add(new Option(model.id, model.id));
  if ([...select.options].some((o) => o.value === previous)) select.value = previous;
  $("generate").disabled = false;
  say("");
}

// The settings an image was made with, from the PNG's "fluxion" text chunk (the same record the CLI reads).
function pngSettings(bytes) {
  const view = new DataView(bytes.buffer);
  const latin1 = new TextDecoder("latin1");
  for (let pos = 8; pos + 8 <= bytes.length; ) {
    const length = view.getUint32(pos);
    const type = latin1.decode(bytes.subarray(pos + 4, pos + 8));
    const data = bytes.subarray(pos + 8, pos + 8 + length);
    if (type === "tEXt") {
      const zero = data.indexOf(0);
      if (latin1.decode(data.subarray(0, zero)) === "fluxion") {
        return JSON.parse(latin1.decode(data.subarray(zero + 1)));
      }
    }
    if (type === "IEND") break;
    pos += 12 + length;
  }
  return null;
}

function base64Bytes(b64) {
  return Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
}

function formSettings() {
  const settings = { prompt: $("prompt").value, model: $("model").value, size: $("size").value.trim() };
  for (const name of ["seed", "steps"]) settings[name] = $(name).value === "" ? null : Number($(name).value);
  return settings;
}

function fillForm(settings) {
  $("prompt").value = settings.prompt;
  $("model").value = settings.model;
  $("size").value = settings.size;
  $("seed").value = settings.seed;
  $("steps").value = settings.steps;
}

function newCard(settings, original) {
  const card = $("card").content.firstElementChild.cloneNode(true);
  card.id = `image-${++cards}`;
  card.querySelector(".prompt").textContent = `#${cards} ${settings.prompt}`;
  card.querySelector(".note").textContent = original ? `reproducing #${original.id.split("-")[1]}…` : "starting…";
  showSettings(card, settings);
  $("gallery").prepend(card);
  return card;
}

function showSettings(card, settings) {
  const list = card.querySelector(".settings");
  list.replaceChildren();
  for (const name of ["model", "size", "seed", "steps"]) {
    const value = settings[name];
    const shown = value == null || value === "" ? "default" : value;
    list.append(Object.assign(document.createElement("dt"), { textContent: name }),
                Object.assign(document.createElement("dd"), { textContent: shown }));
  }
}

// Server-sent events from a fetch body (EventSource cannot POST or send a key): yields {event, data}.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (data) yield { event, data: JSON.parse(data) };
    }
  }
}

async function generate(settings, original) {
  const card = newCard(settings, original);
  const body = { model: settings.model, prompt: settings.prompt, stream: true, partial_images: PARTIAL_IMAGES,
                 response_format: "b64_json", output_format: "png" };
  if (settings.size && settings.size !== "auto") body.size = settings.size;
  if (settings.seed != null) body.seed = settings.seed;
  if (settings.steps != null) body.steps = settings.steps;
  try {
    const response = await fetch("/v1/images/generations", { method: "POST", headers: headers(true),
                                                             body: JSON.stringify(body) });
    if (!response.ok) return fail(card, await errorMessage(response));
    for await (const { event, data } of events(response)) {
      if (event.endsWith(".partial_image")) {
        card.querySelector("img").src = "data:image/png;base64," + data.b64_json;
        card.dataset.previews = Number(card.dataset.previews) + 1;
        card.querySelector(".note").textContent = `preview ${data.partial_image_index + 1}`;
      } else if (event.endsWith(".completed")) {
        return finish(card, settings, data, original);
      } else if (event === "error") {
        return fail(card, data.error.message);
      }
    }
    fail(card, "the stream ended without an image");
  } catch (e) {
    fail(card, `request failed: ${e.message}`);
  }
}

function finish(card, requested, data, original) {
  const recorded = pngSettings(base64Bytes(data.b64_json)) || {};
  const settings = { prompt: requested.prompt, model: requested.model, size: data.size, seed: data.seed,
                     steps: recorded.num_inference_steps ?? requested.steps };
  const src = "data:image/png;base64," + data.b64_json;
  card.querySelector("img").src = src;
  card.dataset.seed = settings.seed;
  showSettings(card, settings);
  let note = `job ${data.id}`;
  if (original) {
    const same = original.querySelector("img").src === src;
    card.dataset.identical = same;
    note = same ? `identical to #${original.id.split("-")[1]}` : `differs from #${original.id.split("-")[1]}!`;
  }
  card.querySelector(".note").textContent = note;
  const download = card.querySelector(".download");
  Object.assign(download, { href: src, download: `fluxion-${settings.seed}.png`, hidden: false });
  const button = card.querySelector(".reproduce");
  button.disabled = false;
  button.addEventListener("click", () => {
    fillForm(settings);
    generate(settings, card);
  });
  card.dataset.state = "done";
}

function fail(card, message) {
  card.querySelector(".note").textContent = message;
  card.dataset.state = "error";
  say(message);
}

document.addEventListener("DOMContentLoaded", () => {
  $("key").value = localStorage.getItem(KEY_STORAGE) || "";
  $("key").addEventListener("change", () => {
    if (apiKey()) localStorage.setItem(KEY_STORAGE, apiKey());
    else localStorage.removeItem(KEY_STORAGE);
    loadModels();
  });
  $("form").addEventListener("submit", (event) => {
    event.preventDefault();
    say("");
    generate(formSettings(), null);
  });
  loadModels();
});
