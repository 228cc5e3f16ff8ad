// The page of the chat service: the same API a program uses (/v1/...), with the key the person types.
// Plain DOM, no framework, no build step; every text from the service or the model goes in as text.
"use strict";

const KEY_STORAGE = "yollava-key";
const NAME_RE = /^[a-z0-9][a-z0-9_-]{0,63}$/;
const FORMATS = { "image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WebP", "image/gif": "GIF", "image/bmp": "BMP" };

const state = {
  key: null, model: null, limits: null,
  concepts: [], shared: [], poll: null,
  photos: [],          // {file, url, ok, why}
  history: [],         // [{role, content}] sent again with each turn (text only)
  chatPhoto: null,     // {file, url, dataUrl}
  suggestion: { open: false, items: [], index: 0, start: 0 },
};

const $ = (id) => document.getElementById(id);
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) node.append(c);
  return node;
}

class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || `HTTP ${status}`);
    this.status = status; this.code = e.code; this.param = e.param;
  }
}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${state.key}` };
  let payload;
  if (body !== undefined) { headers["Content-Type"] = "application/json"; payload = JSON.stringify(body); }
  const r = await fetch(path, { method, headers, body: payload });
  let data = null;
  try { data = await r.json(); } catch (_) { data = null; }
  if (!r.ok) throw new ApiError(r.status, data);
  return data;
}

// -- the key ----------------------------------------------------------------------------------

async function useKey(key) {
  state.key = key;
  const limits = await api("GET", "/v1/limits");  // also checks the key
  state.limits = limits;
  state.model = limits.model;
  sessionStorage.setItem(KEY_STORAGE, key);
  $("key-section").hidden = true;
  $("app").hidden = false;
  $("session").hidden = false;
  $("teach-section").hidden = !limits.uploads;
  if (limits.uploads) {
    $("min-photos").textContent = limits.uploads.min_photos;
    $("max-photos").textContent = limits.uploads.max_photos;
  }
  await refreshConcepts();
  $("concepts-h").focus?.();
}

function forgetKey() {
  sessionStorage.removeItem(KEY_STORAGE);
  state.key = null;
  clearTimeout(state.poll);
  $("app").hidden = true;
  $("session").hidden = true;
  $("key-section").hidden = false;
  $("concepts").replaceChildren();
  delete $("concepts").dataset.loaded;
  $("shared").replaceChildren();
  $("messages").replaceChildren();
  state.history = [];
  $("key").value = "";
  $("key").focus();
}

// -- concepts ---------------------------------------------------------------------------------

async function refreshConcepts() {
  clearTimeout(state.poll);
  if (!state.key) return;
  let data;
  try {
    data = await api("GET", "/v1/concepts");
  } catch (e) {
    $("concepts-status").textContent = `Could not list concepts: ${e.message}`;
    state.poll = setTimeout(refreshConcepts, 5000);
    return;
  }
  const own = data.data.filter((c) => c.shared_with !== null);
  const shared = data.data.filter((c) => c.shared_with === null);
  const before = new Map(state.concepts.map((c) => [c.name, c.status]));
  state.concepts = own; state.shared = shared;
  renderConcepts();
  $("concepts").dataset.loaded = "true";
  for (const c of own) {
    const was = before.get(c.name);
    if (was && was !== c.status) $("concepts-status").textContent = `<${c.name}> is ${c.status}`;
  }
  const busy = own.some((c) => c.status === "queued" || c.status === "training");
  state.poll = setTimeout(refreshConcepts, busy ? 1500 : 15000);
}

function statusText(c) {
  if (c.status === "ready") return `ready · v${c.version}`;
  if (c.status === "training") return `training · ${Math.round((c.progress || 0) * 100)}%`;
  return c.status;
}

// Items are kept while their concept is unchanged, so polling never takes away what someone is typing
// in a share field; a changed item is rebuilt, keeping the focused field's text and caret.
function renderConcepts() {
  const list = $("concepts");
  const old = new Map([...list.children].map((li) => [li.dataset.name, li]));
  const items = state.concepts.map((c) => {
    const json = JSON.stringify(c);
    const prev = old.get(c.name);
    if (prev && prev.dataset.json === json) return prev;
    const item = conceptItem(c);
    item.dataset.json = json;
    const focused = prev && prev.contains(document.activeElement) ? document.activeElement : null;
    if (focused && focused.id) {
      const again = item.querySelector(`#${CSS.escape(focused.id)}`);
      if (again) { again.value = focused.value; queueMicrotask(() => again.focus()); }
    }
    return item;
  });
  list.replaceChildren(...items);
  $("concepts-empty").hidden = state.concepts.length > 0;
  renderShared();
}

function conceptItem(c) {
  const item = el("li", { class: "concept", "data-name": c.name, "data-status": c.status });
  item.append(el("div", { class: "concept-head" },
    el("span", { class: "concept-name", text: `<${c.name}>` }),
    el("span", { class: `badge ${c.status}`, text: statusText(c) })));
  if (c.status === "queued" || c.status === "training") {
    const pid = `progress-${c.name}`;
    item.append(el("label", { for: pid, class: "sr-only", text: `Training <${c.name}>` }),
      el("progress", { id: pid, max: "100", value: String(Math.round((c.progress || 0) * 100)) }),
      el("p", { class: "detail", text: c.status === "queued" ? "Waiting for a training job…"
        : `Training: ${c.stage || "working"}` + (c.version ? ` (v${c.version} answers meanwhile)` : "") }));
  }
  if (c.status === "failed") {
    item.append(el("p", { class: "detail reason", text: `Failed: ${c.reason || "unknown reason"}` +
      (c.version ? ` (v${c.version} still answers)` : "") }));
  }
  const m = c.metrics || {};
  const shown = [["weighted", "weighted"], ["positive_acc", "on photos of it"], ["negative_acc", "on others"]]
    .filter(([k]) => typeof m[k] === "number");
  if (c.version && shown.length) {
    item.append(el("p", { class: "detail", text: "Held-out recognition: " + shown.map(([k, label]) => `${label} ${m[k].toFixed(2)}`).join(", ") }));
  }
  if (c.version) item.append(sharingBlock(c));
  item.append(el("div", { class: "actions" },
    el("button", { type: "button", class: "danger", "aria-label": `Delete <${c.name}>`, text: "Delete",
      disabled: c.status === "training", onclick: () => deleteConcept(c.name) })));
  return item;
}

function renderShared() {
  const shared = $("shared");
  shared.replaceChildren();
  $("shared-h").hidden = state.shared.length === 0;
  for (const c of state.shared) {
    shared.append(el("li", { class: "concept", "data-name": c.id },
      el("div", { class: "concept-head" }, el("span", { class: "concept-name", text: `<${c.id}>` }),
        el("span", { class: "badge ready", text: `v${c.version}` }))));
  }
}

function sharingBlock(c) {
  const box = el("div", { class: "sharing" });
  const grants = el("ul", { class: "grants", "aria-label": `<${c.name}> is shared with` });
  for (const t of c.shared_with || []) {
    grants.append(el("li", {}, el("button", { type: "button", class: "secondary", "aria-label": `Stop sharing <${c.name}> with ${t}`,
      text: `${t} ✕`, onclick: () => changeShare(c.name, t, "DELETE") })));
  }
  box.append(el("p", { class: "detail", text: (c.shared_with || []).length ? "Shared with:" : "Not shared." }), grants);
  const id = `share-${c.name}`;
  const input = el("input", { id, autocomplete: "off", spellcheck: "false", maxlength: "64" });
  const form = el("form", { class: "share-form", onsubmit: (ev) => { ev.preventDefault(); changeShare(c.name, input.value.trim(), "PUT"); } },
    el("label", { for: id, text: `Share <${c.name}> with tenant` }), input,
    el("button", { type: "submit", class: "secondary", text: "Share" }));
  box.append(form);
  return box;
}

async function changeShare(name, tenant, method) {
  if (!NAME_RE.test(tenant)) { $("concepts-status").textContent = `"${tenant}" is not a tenant name`; return; }
  try {
    await api(method, `/v1/concepts/${encodeURIComponent(name)}/shares/${encodeURIComponent(tenant)}`);
    $("concepts-status").textContent = method === "PUT" ? `<${name}> shared with ${tenant}` : `<${name}> no longer shared with ${tenant}`;
  } catch (e) {
    $("concepts-status").textContent = `Sharing failed: ${e.message}`;
  }
  await refreshConcepts();
}

async function deleteConcept(name) {
  if (!window.confirm(`Delete <${name}>? Its versions, photos and shares go.`)) return;
  try {
    await api("DELETE", `/v1/concepts/${encodeURIComponent(name)}`);
    $("concepts-status").textContent = `<${name}> deleted`;
  } catch (e) {
    $("concepts-status").textContent = `Delete failed: ${e.message}`;
  }
  await refreshConcepts();
}

// -- teaching: photos -------------------------------------------------------------------------

function checkPhoto(file) {
  const lim = state.limits.uploads;
  if (!FORMATS[file.type]) return Promise.resolve(`not a PNG, JPEG, WebP, GIF or BMP image (${file.type || "unknown type"})`);
  if (file.size > lim.max_image_bytes) return Promise.resolve(`${(file.size / 1048576).toFixed(1)} MiB, more than ${(lim.max_image_bytes / 1048576).toFixed(1)} MiB`);
  return new Promise((resolve) => {
    const img = new Image();
    const url = URL.createObjectURL(file);
    img.onload = () => {
      URL.revokeObjectURL(url);
      const px = img.naturalWidth * img.naturalHeight;
      resolve(px > lim.max_image_pixels ? `${img.naturalWidth}×${img.naturalHeight} pixels, more than ${lim.max_image_pixels}` : null);
    };
    img.onerror = () => { URL.revokeObjectURL(url); resolve("cannot be read as an image"); };
    img.src = url;
  });
}

async function addPhotos(files) {
  for (const file of files) {
    const why = await checkPhoto(file);
    state.photos.push({ file, url: URL.createObjectURL(file), ok: why === null, why });
  }
  renderThumbs();
}

function renderThumbs() {
  const list = $("thumbs");
  list.replaceChildren();
  state.photos.forEach((p, i) => {
    const li = el("li", { class: p.ok ? "" : "bad" }, p.ok
      ? el("img", { src: p.url, alt: `Photo ${i + 1}: ${p.file.name}` })
      : el("span", { class: "nophoto", text: p.file.name }));
    if (!p.ok) li.append(el("span", { class: "why", text: p.why }));
    li.append(el("button", { type: "button", class: "secondary", "aria-label": `Remove photo ${i + 1} (${p.file.name})`,
      text: "Remove", onclick: () => { URL.revokeObjectURL(p.url); state.photos.splice(i, 1); renderThumbs(); } }));
    list.append(li);
  });
  teachMessages(validateTeach(false));
}

function validateTeach(forSubmit) {
  const out = [];
  const lim = state.limits && state.limits.uploads;
  if (!lim) return out;
  const name = $("teach-name").value.trim();
  if (forSubmit && !NAME_RE.test(name)) out.push({ bad: true, text: `Name "${name}": use 1-64 of a-z, 0-9, - and _, starting with a letter or digit.` });
  const bad = state.photos.filter((p) => !p.ok);
  for (const p of bad) out.push({ bad: true, text: `${p.file.name}: ${p.why}. Remove it.` });
  const good = state.photos.filter((p) => p.ok).length;
  if (state.photos.length || forSubmit) {
    if (good < lim.min_photos) out.push({ bad: true, text: `${good} photo(s); at least ${lim.min_photos}.` });
    else if (good > lim.max_photos) out.push({ bad: true, text: `${good} photos; at most ${lim.max_photos}.` });
    else if (!bad.length) out.push({ bad: false, text: `${good} photos ready.` });
  }
  return out;
}

function teachMessages(items) {
  $("teach-messages").replaceChildren(...items.map((m) => el("p", { class: m.bad ? "bad" : "good", text: m.text })));
}

function submitTeach(ev) {
  ev.preventDefault();
  const problems = validateTeach(true).filter((m) => m.bad);
  if (problems.length) { teachMessages(problems); (NAME_RE.test($("teach-name").value.trim()) ? $("teach-photos") : $("teach-name")).focus(); return; }
  const form = new FormData();
  form.append("name", $("teach-name").value.trim());
  const description = $("teach-description").value.trim();
  if (description) form.append("description", description);
  for (const p of state.photos) form.append("photos", p.file, p.file.name);
  const xhr = new XMLHttpRequest();  // fetch has no upload progress
  xhr.open("POST", "/v1/concepts");
  xhr.setRequestHeader("Authorization", `Bearer ${state.key}`);
  const bar = $("upload-progress");
  $("upload-box").hidden = false; bar.value = 0;
  $("teach-submit").disabled = true;
  xhr.upload.onprogress = (e) => { if (e.lengthComputable) bar.value = Math.round(100 * e.loaded / e.total); };
  xhr.onload = () => {
    $("teach-submit").disabled = false; $("upload-box").hidden = true;
    let body = null;
    try { body = JSON.parse(xhr.responseText); } catch (_) { body = null; }
    if (xhr.status === 202) {
      teachMessages([{ bad: false, text: `<${body.name}> sent (${state.photos.length} photos): it is ${body.status}; follow it under Your concepts.` }]);
      state.photos.forEach((p) => URL.revokeObjectURL(p.url));
      state.photos = []; $("thumbs").replaceChildren(); $("teach-form").reset();
      refreshConcepts();
    } else {
      const e = new ApiError(xhr.status, body);
      teachMessages([{ bad: true, text: `Not accepted (${xhr.status}): ${e.message}` }]);
    }
  };
  xhr.onerror = () => { $("teach-submit").disabled = false; $("upload-box").hidden = true; teachMessages([{ bad: true, text: "The upload did not reach the service." }]); };
  xhr.send(form);
}

// -- chat -------------------------------------------------------------------------------------

function conceptNames() {
  return [...state.concepts.filter((c) => c.version).map((c) => c.name), ...state.shared.map((c) => c.id)];
}

function updateSuggestions() {
  const input = $("chat-input");
  const upto = input.value.slice(0, input.selectionStart);
  const m = /<([a-z0-9_\/-]*)$/.exec(upto);
  const s = state.suggestion;
  s.items = m ? conceptNames().filter((n) => n.startsWith(m[1])).slice(0, 8) : [];
  s.open = s.items.length > 0;
  s.start = m ? m.index : 0;
  s.index = Math.min(s.index, Math.max(0, s.items.length - 1));
  renderSuggestions();
}

function renderSuggestions() {
  const s = state.suggestion, list = $("suggestions"), input = $("chat-input");
  list.replaceChildren();
  list.hidden = !s.open;
  input.setAttribute("aria-expanded", String(s.open));
  if (!s.open) { input.removeAttribute("aria-activedescendant"); return; }
  s.items.forEach((name, i) => {
    list.append(el("li", { id: `suggestion-${i}`, role: "option", "aria-selected": String(i === s.index),
      text: `<${name}>`, onmousedown: (ev) => { ev.preventDefault(); acceptSuggestion(i); } }));
  });
  input.setAttribute("aria-activedescendant", `suggestion-${s.index}`);
}

function acceptSuggestion(i) {
  const s = state.suggestion, input = $("chat-input");
  const name = s.items[i];
  const before = input.value.slice(0, s.start), after = input.value.slice(input.selectionStart);
  input.value = `${before}<${name}> ${after.replace(/^[a-z0-9_\/-]*>?/, "")}`;
  const caret = before.length + name.length + 3;
  input.setSelectionRange(caret, caret);
  s.open = false; s.items = []; s.index = 0;
  renderSuggestions();
}

function chatKeydown(ev) {
  const s = state.suggestion;
  if (s.open) {
    if (ev.key === "ArrowDown") { ev.preventDefault(); s.index = (s.index + 1) % s.items.length; renderSuggestions(); return; }
    if (ev.key === "ArrowUp") { ev.preventDefault(); s.index = (s.index - 1 + s.items.length) % s.items.length; renderSuggestions(); return; }
    if (ev.key === "Enter" || ev.key === "Tab") { ev.preventDefault(); acceptSuggestion(s.index); return; }
    if (ev.key === "Escape") { ev.preventDefault(); s.open = false; renderSuggestions(); return; }
  }
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); $("chat-form").requestSubmit(); }
}

function readDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function chooseChatPhoto() {
  const file = $("chat-photo").files[0];
  $("chat-error").textContent = "";
  if (!file) return;
  const lim = state.limits.chat;
  if (!FORMATS[file.type]) { $("chat-error").textContent = `${file.name}: not a PNG, JPEG, WebP, GIF or BMP image`; $("chat-photo").value = ""; return; }
  if (file.size > lim.max_image_bytes) { $("chat-error").textContent = `${file.name}: larger than ${lim.max_image_bytes} bytes`; $("chat-photo").value = ""; return; }
  if (state.chatPhoto) URL.revokeObjectURL(state.chatPhoto.url);
  state.chatPhoto = { file, url: URL.createObjectURL(file), dataUrl: await readDataUrl(file) };
  const preview = $("chat-photo-preview");
  preview.replaceChildren(el("img", { src: state.chatPhoto.url, alt: `Attached: ${file.name}` }),
    el("button", { type: "button", class: "secondary", text: "Remove photo", onclick: clearChatPhoto }));
}

function clearChatPhoto() {
  if (state.chatPhoto) URL.revokeObjectURL(state.chatPhoto.url);
  state.chatPhoto = null;
  $("chat-photo").value = "";
  $("chat-photo-preview").replaceChildren();
}

function addMessage(role, text, photoUrl) {
  const li = el("li", { class: role }, el("span", { class: "who", text: role === "user" ? "You" : role === "assistant" ? "Assistant" : "Error" }));
  if (photoUrl) li.append(el("img", { src: photoUrl, alt: "Photo sent with this message" }));
  const body = el("span", { class: "text", text: text || "" });
  li.append(body);
  $("messages").append(li);
  li.scrollIntoView({ block: "nearest" });
  return { li, body };
}

async function sendChat(ev) {
  ev.preventDefault();
  const input = $("chat-input");
  const text = input.value.trim();
  if (!text && !state.chatPhoto) return;
  $("chat-error").textContent = "";
  const photo = state.chatPhoto;
  const content = photo ? [{ type: "image_url", image_url: { url: photo.dataUrl } }, { type: "text", text: text || "What is in this photo?" }] : text;
  addMessage("user", text, photo && photo.url);
  input.value = ""; state.chatPhoto = null; $("chat-photo").value = ""; $("chat-photo-preview").replaceChildren();
  const messages = [...state.history, { role: "user", content }];
  const answer = addMessage("assistant", "");
  answer.li.setAttribute("aria-busy", "true");
  answer.li.dataset.chunks = "0";
  $("chat-send").disabled = true;
  let full = "";
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { Authorization: `Bearer ${state.key}`, "Content-Type": "application/json" },
      body: JSON.stringify({ model: state.model, messages, stream: true, max_tokens: 64, temperature: 0 }),
    });
    if (!r.ok) { let b = null; try { b = await r.json(); } catch (_) { b = null; } throw new ApiError(r.status, b); }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", done = false;
    while (!done) {
      const { value, done: end } = await reader.read();
      if (end) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") { done = true; break; }
          const chunk = JSON.parse(data);
          if (chunk.error) throw new ApiError(500, chunk);
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && delta.content) {
            full += delta.content;
            answer.body.textContent = full;
            answer.li.dataset.chunks = String(Number(answer.li.dataset.chunks) + 1);
          }
        }
      }
    }
    answer.li.dataset.done = "true";
    state.history = [...state.history, { role: "user", content: text || "What is in this photo?" }, { role: "assistant", content: full || " " }];
  } catch (e) {
    answer.li.className = "error";
    answer.body.textContent = e.message;
    answer.li.dataset.done = "error";
  } finally {
    answer.li.removeAttribute("aria-busy");
    $("chat-send").disabled = false;
    input.focus();
  }
}

// -- wiring -----------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("key-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    $("key-error").textContent = "";
    try { await useKey($("key").value.trim()); }
    catch (e) { state.key = null; $("key-error").textContent = e.status === 401 ? "This key is not valid." : `Could not reach the service: ${e.message}`; $("key").focus(); }
  });
  $("forget-key").addEventListener("click", forgetKey);
  $("teach-photos").addEventListener("change", (ev) => { addPhotos([...ev.target.files]); ev.target.value = ""; });
  const drop = $("drop");
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => { ev.preventDefault(); drop.classList.remove("over"); addPhotos([...ev.dataTransfer.files]); });
  $("teach-name").addEventListener("input", () => teachMessages(validateTeach(false)));
  $("teach-form").addEventListener("submit", submitTeach);
  $("chat-form").addEventListener("submit", sendChat);
  $("chat-input").addEventListener("input", updateSuggestions);
  $("chat-input").addEventListener("keydown", chatKeydown);
  $("chat-input").addEventListener("blur", () => { state.suggestion.open = false; renderSuggestions(); });
  $("chat-photo").addEventListener("change", chooseChatPhoto);
  $("chat-clear").addEventListener("click", () => { state.history = []; $("messages").replaceChildren(); $("chat-input").focus(); });
  const saved = sessionStorage.getItem(KEY_STORAGE);
  if (saved) useKey(saved).catch(() => forgetKey());
});
