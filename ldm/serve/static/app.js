// ldm serve's page: a plain client of the server's A1111 API (/sdapi/v1) and its queue route.
// No framework, no build step, nothing fetched from outside the server: the page works offline.
// Routes used (request/response shapes: A1111's modules/api/models.py):
//   GET  sdapi/v1/samplers, schedulers, sd-models, options   the form's choices
//   POST sdapi/v1/txt2img     images (base64 PNG) + info (JSON string with infotexts, seed)
//   GET  sdapi/v1/progress    progress, eta_relative, state, current_image (the live preview)
//   POST sdapi/v1/interrupt, skip, png-info, options          GET queue (ComfyUI's shape)
// The infotext reader is static/infotext.js (loaded first).
// URLs are relative, so the page also works behind a proxy that mounts the server under a path.
// Auth: basic auth is the browser's own (it resends the credentials it was asked for); a token
// given as /#token=... (or /?token=...) is kept for the tab and sent as "Authorization: Bearer".
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_BUSY_MS = 400; // progress polling while a job runs (ours or another client's)
const POLL_IDLE_MS = 2000; // ... and while the server is idle

// busy: our txt2img requests in flight; active: the server's last /progress showed a job
const state = { busy: 0, active: false, samplers: [], schedulers: [], token: null, pollTimer: 0 };

// ---- talking to the server ----------------------------------------------------------------

function readToken() {
  const m = /(?:^|[?#&])token=([^&#]+)/.exec(location.search + location.hash);
  if (m) {
    sessionStorage.setItem("ldm-token", decodeURIComponent(m[1]));
    const query = new URLSearchParams(location.search);
    query.delete("token");
    const rest = query.toString();
    history.replaceState(null, "", location.pathname + (rest ? `?${rest}` : "")); // off screen
  }
  state.token = sessionStorage.getItem("ldm-token");
}

class ApiError extends Error {}

// The server's error bodies differ by protocol: FastAPI {detail}, A1111 {error, errors},
// OpenAI {error: {message}}. One line of text for the message box.
function errorText(status, body) {
  let d = body && (body.detail ?? body.errors ?? body.error ?? body.message);
  if (d && typeof d === "object" && !Array.isArray(d)) d = d.message ?? JSON.stringify(d);
  if (Array.isArray(d)) d = d.map((e) => (e && e.msg) || JSON.stringify(e)).join("; ");
  if (status === 401) d = `${d || "unauthorized"} (log in, or open the page as /#token=...)`;
  return `${status}: ${d || "request failed"}`;
}

async function api(path, body) {
  const init = { headers: {}, credentials: "same-origin" };
  if (state.token) init.headers.Authorization = `Bearer ${state.token}`;
  if (body !== undefined) {
    init.method = "POST";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  const text = await res.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = { detail: text.slice(0, 200) };
  }
  if (!res.ok) throw new ApiError(errorText(res.status, data));
  return data;
}

function say(text, isError = false) {
  const box = $("message");
  box.textContent = text;
  box.classList.toggle("error", isError);
}

// ---- the form's choices -------------------------------------------------------------------

function fillSelect(select, items, valueOf, labelOf) {
  select.replaceChildren(
    ...items.map((item) => {
      const opt = document.createElement("option");
      opt.value = valueOf(item);
      opt.textContent = labelOf(item);
      return opt;
    })
  );
}

async function loadChoices() {
  const [samplers, schedulers] = await Promise.all([
    api("sdapi/v1/samplers"),
    api("sdapi/v1/schedulers").catch(() => []), // an older A1111-shaped server has none
  ]);
  // A1111: [{name, aliases, options}], [{name, label, aliases, ...}]; plain strings also taken
  const norm = (x) => (typeof x === "string" ? { name: x, label: x, aliases: [] } : x);
  state.samplers = samplers.map(norm);
  state.schedulers = schedulers.map(norm);
  const modelDefault = { name: "", label: "model default" };
  const samplerChoices = [modelDefault, ...state.samplers];
  fillSelect($("sampler_name"), samplerChoices, (s) => s.name, (s) => s.label || s.name);
  fillSelect($("scheduler"), state.schedulers, (s) => s.name, (s) => s.label || s.name);
  $("scheduler").disabled = state.schedulers.length === 0;
  document.body.dataset.ready = "1"; // the form is usable (tests wait for this)
  loadModels().catch(() => {}); // optional: the selector only shows with several models
}

async function loadModels() {
  const [models, options] = await Promise.all([api("sdapi/v1/sd-models"), api("sdapi/v1/options")]);
  if (models.length < 2) return;
  fillSelect($("model"), models, (m) => m.title, (m) => m.model_name || m.title);
  $("model").value = options.sd_model_checkpoint;
  $("model-row").hidden = false;
}

async function switchModel() {
  say("switching model...");
  try {
    await api("sdapi/v1/options", { sd_model_checkpoint: $("model").value });
    say(`model: ${$("model").value}`);
  } catch (e) {
    say(e.message, true);
  }
}

// ---- generating ---------------------------------------------------------------------------

function num(id) {
  return Number($(id).value);
}

// The A1111 txt2img body; an empty field is left out, so the server uses the model's default.
function formRequest() {
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    seed: $("seed").value === "" ? -1 : num("seed"),
    batch_size: num("batch_size") || 1,
    n_iter: num("n_iter") || 1,
    send_images: true,
    save_images: false,
  };
  for (const id of ["sampler_name", "steps", "cfg_scale", "width", "height"]) {
    if ($(id).value !== "") body[id] = id === "sampler_name" ? $(id).value : num(id);
  }
  if (state.schedulers.length) body.scheduler = $("scheduler").value;
  return body;
}

async function generate(event) {
  event.preventDefault();
  const body = formRequest();
  state.busy += 1;
  poll(0);
  say(`generating "${body.prompt.slice(0, 60)}"...`);
  try {
    const res = await api("sdapi/v1/txt2img", body);
    const info = typeof res.info === "string" ? JSON.parse(res.info) : res.info || {};
    const texts = info.infotexts || [];
    // A1111 keeps images[i] and infotexts[i] aligned (a grid, when returned, comes first)
    res.images.forEach((b64, i) => addCard(b64, texts[i] ?? texts[0] ?? "", info.all_seeds?.[i]));
    const how = info.interrupted ? "interrupted after" : "done:";
    say(`${how} ${res.images.length} image(s), seed ${info.seed}`);
  } catch (e) {
    say(e instanceof ApiError ? e.message : `${e}`, true);
  } finally {
    state.busy -= 1;
    poll(0);
  }
}

function addCard(b64, infotext, seed) {
  const card = $("card-template").content.firstElementChild.cloneNode(true);
  const url = `data:image/png;base64,${b64}`;
  card.querySelector("img").src = url;
  card.querySelector(".infotext").textContent = infotext;
  const link = card.querySelector(".download");
  link.href = url;
  link.download = `ldm-${seed ?? "image"}.png`;
  card.querySelector(".reuse").addEventListener("click", () => reuse(infotext));
  $("gallery").prepend(card);
}

async function post(path, done) {
  try {
    await api(path, {});
    say(done);
  } catch (e) {
    say(e.message, true);
  }
}

// ---- progress, live preview and queue -----------------------------------------------------

function formatEta(seconds) {
  if (!(seconds > 0)) return "";
  if (seconds < 60) return `ETA ${seconds.toFixed(1)} s`;
  return `ETA ${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
}

function showProgress(p) {
  const st = p.state || {};
  const active = st.job_count > 0 || p.progress > 0 || state.busy > 0;
  state.active = active;
  const pct = active ? Math.round(100 * Math.min(1, Math.max(0, p.progress || 0))) : 0;
  $("progress-fill").style.width = `${pct}%`;
  $("progress").setAttribute("aria-valuenow", String(pct));
  const parts = [];
  if (active) {
    parts.push(`${pct}%`);
    if (st.sampling_steps) parts.push(`step ${st.sampling_step}/${st.sampling_steps}`);
    if (st.job_count > 1) parts.push(`batch ${(st.job_no ?? 0) + 1}/${st.job_count}`);
    if (st.queue_pending > 0) parts.push(`${st.queue_pending} waiting`); // ldm's addition
    parts.push(formatEta(p.eta_relative));
  }
  $("progress-text").textContent = active ? parts.filter(Boolean).join(" · ") : "idle";
  const preview = $("preview");
  if (active && p.current_image) {
    preview.src = `data:image/png;base64,${p.current_image}`;
    preview.hidden = false;
  } else if (!active) {
    preview.hidden = true;
  }
}

// A queue entry: ComfyUI's [number, prompt_id, prompt, extra_data, outputs] or an object.
function describeJob(job) {
  const [number, id, graph] = Array.isArray(job) ? job : [job.number, job.id, job];
  let text = "";
  for (const node of Object.values(graph || {})) {
    const inputs = node && node.inputs;
    if (inputs && typeof inputs.text === "string") {
      text = inputs.text; // the first CLIPTextEncode: ComfyUI's default graph's positive prompt
      break;
    }
  }
  // ldm lists other protocols' jobs with a summary: {source, prompt, images}
  if (!text && graph && typeof graph.prompt === "string") text = graph.prompt;
  const from = graph && typeof graph.source === "string" ? `${graph.source}: ` : "";
  const count = graph && graph.images > 1 ? ` (${graph.images} images)` : "";
  return `#${number ?? "?"} ${from}${text || id || ""}${count}`.trim();
}

function showQueue(q) {
  const items = [
    ...(q.queue_running || []).map((j) => ["running", j]),
    ...(q.queue_pending || []).map((j) => ["pending", j]),
  ];
  const list = $("queue");
  list.replaceChildren(
    ...items.map(([kind, job]) => {
      const li = document.createElement("li");
      li.className = kind;
      li.textContent = `${kind}: ${describeJob(job)}`;
      return li;
    })
  );
  if (!items.length) {
    const li = document.createElement("li");
    li.textContent = "empty";
    list.replaceChildren(li);
  }
}

async function pollOnce() {
  const [p, q] = await Promise.all([
    api("sdapi/v1/progress?skip_current_image=false").catch(() => null),
    api("queue").catch(() => null),
  ]);
  if (p) showProgress(p);
  if (q) showQueue(q);
}

function poll(delay) {
  clearTimeout(state.pollTimer);
  state.pollTimer = setTimeout(async () => {
    if (!document.hidden) await pollOnce();
    poll(state.busy > 0 || state.active ? POLL_BUSY_MS : POLL_IDLE_MS);
  }, delay);
}

// ---- reuse settings: A1111 infotext (parsed by infotext.js) -> form -------------------------

function applyInfotext(text) {
  const { prompt, negative, params } = parseInfotext(text);
  const missed = [];
  $("prompt").value = prompt;
  $("negative_prompt").value = negative;
  const fields = { Steps: "steps", "CFG scale": "cfg_scale", Seed: "seed" };
  for (const [label, id] of Object.entries(fields)) {
    if (label in params) $(id).value = String(Number(params[label]));
  }
  const size = /^(\d+)x(\d+)$/.exec(params.Size || "");
  if (size) [$("width").value, $("height").value] = [size[1], size[2]];
  if ("Sampler" in params) {
    const { sampler, schedule } = matchSampler(
      params.Sampler,
      params["Schedule type"],
      state.samplers,
      state.schedulers
    );
    if (sampler) $("sampler_name").value = sampler.name;
    else missed.push(`sampler "${params.Sampler}"`);
    if (schedule) $("scheduler").value = schedule.name;
    else if (state.schedulers.length && params["Schedule type"]) {
      missed.push(`schedule "${params["Schedule type"]}"`);
    }
  }
  return missed;
}

function reuse(text, from = "the image") {
  const missed = applyInfotext(text);
  const tail = missed.length ? `; this server has no ${missed.join(", ")}` : "";
  say(`settings from ${from}${tail}`, missed.length > 0);
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function reuseFile(file) {
  if (!file) return;
  try {
    const res = await api("sdapi/v1/png-info", { image: await readAsDataURL(file) });
    if (!res.info) {
      say(`${file.name} carries no generation settings`, true);
      return;
    }
    reuse(res.info, file.name);
  } catch (e) {
    say(e.message, true);
  }
}

// ---- wiring -------------------------------------------------------------------------------

function wireDrop() {
  const zone = $("drop");
  // Dropping anywhere on the page reuses the file (and never navigates away to it).
  document.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("over");
  });
  document.addEventListener("dragleave", () => zone.classList.remove("over"));
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    reuseFile(e.dataTransfer && e.dataTransfer.files[0]);
  });
  $("png-file").addEventListener("change", (e) => {
    reuseFile(e.target.files[0]);
    e.target.value = ""; // choosing the same file again fires change again
  });
}

function main() {
  readToken();
  $("form").addEventListener("submit", generate);
  $("form").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("form").requestSubmit(); // as A1111
  });
  $("random-seed").addEventListener("click", () => ($("seed").value = "-1"));
  $("interrupt").addEventListener("click", () => post("sdapi/v1/interrupt", "interrupting..."));
  $("skip").addEventListener("click", () => post("sdapi/v1/skip", "skipping this batch..."));
  $("model").addEventListener("change", switchModel);
  wireDrop();
  loadChoices().catch((e) => say(`cannot load the sampler list: ${e.message}`, true));
  poll(0);
}

main();
