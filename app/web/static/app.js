// The page: pick primitive tasks and/or classes, see the composite model's figures (POST
// /models with Accept: application/json) and its accuracy-vs-size front over the experts'
// widths (POST /models/plan, a plot with a slider that downloads the chosen point), download
// it, and run it here with onnxruntime-web on the user's image or on one of the CIFAR-100
// test images shipped under /samples/ (offered to models of their 32x32 input only), saying
// "none of these" when the model's reject rule refuses the image.

const ORT_URL = "/vendor/ort/ort.wasm.min.mjs";
const MISSING_ORT = "onnxruntime-web is not installed on this server, so models cannot run in the " +
  "browser (downloads still work). Install it with `npm ci --prefix app/web` and restart the service.";

const $ = (id) => document.getElementById(id);
const state = {
  tasks: [], formats: {}, model: null, request: null, sessions: new Map(), image: null, plan: null,
  truth: null,  // { label, index } of the sample image being run; null for the user's own image
  lastRun: null,  // { model, shape, input, outputs } of the last image run
  samples: null,  // /samples/index.json, or null when the server has none
};

const percent = (x) => x == null ? "n/a" : `${(x * 100).toFixed(2)} %`;
const count = (n) => n.toLocaleString("en-US");
const size = (n) => n >= 1e6 ? `${(n / 1e6).toFixed(2)} MB` : `${(n / 1e3).toFixed(1)} kB`;

async function problem(response) {
  try {
    const body = await response.json();
    return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

function selected() {
  return [...document.querySelectorAll("#tasks input:checked")].map((box) => box.value);
}

function weights() {
  return document.querySelector("#weights input:checked").value;
}

function classes() {
  return $("classes").value.split(",").map((name) => name.trim()).filter(Boolean);
}

// The body of POST /models and POST /models/plan for the current choice, or null.
function queryBody() {
  const tasks = selected();
  const names = classes();
  if (!tasks.length && !names.length) return null;
  return { ...(tasks.length && { tasks }), ...(names.length && { classes: names }), options: { weights: weights() } };
}

async function loadTasks() {
  const response = await fetch("/tasks");
  if (!response.ok) {
    $("pool").textContent = `No pool to serve: ${await problem(response)}`;
    return;
  }
  const pool = await response.json();
  state.tasks = pool.tasks;
  state.formats = pool.formats;
  $("pool").textContent = `Pool ${pool.pool_id}, version ${pool.pool_version}: ${pool.tasks.length} ` +
    `primitive tasks over a shared library of ${count(pool.library.params)} parameters.`;
  const fieldset = $("tasks");
  for (const task of pool.tasks) {
    const label = document.createElement("label");
    label.className = "task";
    label.innerHTML = `<input type="checkbox" name="task"><span class="name"></span>` +
      `<span class="classes"></span><span class="stats"></span>`;
    label.querySelector("input").value = task.name;
    label.querySelector(".name").append(...breakable(task.name));
    label.querySelector(".classes").textContent = task.classes.join(", ");
    label.querySelector(".stats").textContent =
      `expert ${count(task.params)} params, ${size(task.onnx_bytes)} · accuracy ${percent(task.val_acc)}`;
    fieldset.append(label);
  }
  fieldset.addEventListener("change", refresh);
  $("class-names").replaceChildren(...pool.tasks.flatMap((task) => task.classes).map((name) => {
    const option = document.createElement("option");
    option.value = name;
    return option;
  }));
  $("classes").addEventListener("input", refresh);
  $("plan-slider").addEventListener("input", (event) => choosePoint(Number(event.target.value)));
  for (const radio of document.querySelectorAll("#weights input")) {
    const format = pool.formats[radio.value];
    if (format && !format.available) {
      radio.disabled = true;
      $("weights-note").textContent = `${radio.value} is not offered by this pool: ${format.reason}`;
    }
  }
  $("weights").addEventListener("change", refresh);
}

// Long names such as large_man-made_outdoor_things may wrap after "_" and "-".
function breakable(name) {
  return name.split(/(?<=[_-])/).flatMap((part, i) => i ? [document.createElement("wbr"), part] : [part]);
}

let debounce;
function refresh() {
  clearTimeout(debounce);
  debounce = setTimeout(describeModel, 120);
}

function showModel(model) {
  state.model = model;
  const figures = $("figures");
  figures.hidden = !model;
  delete figures.dataset.tasks;
  for (const id of ["download-onnx", "download-ort"]) {
    $(id).setAttribute("aria-disabled", String(!model));
    if (!model) $(id).removeAttribute("href");
  }
  if (!model) {
    showSamples(null);
    drawPlan(null);
    $("result").hidden = true;
    return;
  }
  figures.dataset.tasks = model.tasks.join("+");
  figures.dataset.id = model.id;
  $("acc").textContent = percent(model.val_acc);
  $("acc").dataset.value = String(model.val_acc);
  $("params").textContent = count(model.params);
  $("bytes").textContent = size(model.bytes);
  $("flops").textContent = count(model.flops);
  $("acc-formats").textContent = Object.entries(model.val_acc_by_format)
    .map(([format, acc]) => `${format} ${percent(acc)}`).join(" · ");
  $("labels").textContent = model.labels.join(", ");
  showClassAccuracy(model);
  showSamples(model);
  const onnx = new URL(model.download_url, location.href);
  const ortFile = new URL(onnx);
  ortFile.searchParams.set("format", "ort");
  $("download-onnx").href = onnx.pathname + onnx.search;
  $("download-ort").href = ortFile.pathname + ortFile.search;
  $("download-onnx").textContent = `Download .onnx (${model.weights})`;
  $("download-ort").textContent = `Download .ort (${model.weights}, mobile)`;
  for (const id of ["download-onnx", "download-ort"]) $(id).setAttribute("download", "");
  if (state.image) predict();
}

// Per-class validation accuracy as bars, in the model's output order, when the metadata has
// `val_acc_by_class` ({label: accuracy}); hidden otherwise. Returns whether bars are shown.
export function showClassAccuracy(model) {
  const byClass = model?.val_acc_by_class;
  const labels = byClass ? model.labels.filter((label) => typeof byClass[label] === "number") : [];
  $("class-acc").replaceChildren(...labels.map((label) => {
    const acc = byClass[label];
    const item = document.createElement("li");
    item.dataset.label = label;
    item.dataset.value = String(acc);
    item.innerHTML = `<span class="label"></span><span class="value"></span>` +
      `<span class="track" aria-hidden="true"><span class="bar"></span></span>`;
    item.querySelector(".label").append(...breakable(label));
    item.querySelector(".value").textContent = `${(acc * 100).toFixed(1)} %`;
    item.querySelector(".bar").style.width = `${acc * 100}%`;
    return item;
  }));
  $("class-acc-box").hidden = !labels.length;
  return labels.length > 0;
}

async function describeModel() {
  const body = queryBody();
  state.request?.abort();
  $("model-error").textContent = "";
  $("selection").textContent = !body ? "Select at least one task or name a class." :
    "Composite task: " + [...(body.tasks ?? []), ...(body.classes ?? []).map((name) => `class ${name}`)].join(" + ");
  if (!body) {
    showModel(null);
    return;
  }
  const request = state.request = new AbortController();
  $("figures").setAttribute("aria-busy", "true");
  try {
    const response = await fetch("/models", {
      method: "POST", signal: request.signal,
      headers: { "Content-Type": "application/json", "Accept": "application/json" },
      body: JSON.stringify(body),
    });
    if (!response.ok) {
      showModel(null);
      $("model-error").textContent = await problem(response);
      return;
    }
    showModel(await response.json());
    await describePlan(body, request.signal);
  } catch (error) {
    if (error.name !== "AbortError") $("model-error").textContent = `Request failed: ${error.message}`;
  } finally {
    if (state.request === request) $("figures").setAttribute("aria-busy", "false");
  }
}

// --- The accuracy-vs-size front ---------------------------------------------------------

async function describePlan(body, signal) {
  const response = await fetch("/models/plan", {
    method: "POST", signal, headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  drawPlan(response.ok ? await response.json() : { points: [], unavailable: await problem(response) });
}

const SVG = "http://www.w3.org/2000/svg";
const PLOT = { left: 48, right: 390, top: 14, bottom: 150 };

function svg(name, attributes, text) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, String(value));
  if (text != null) element.textContent = text;
  return element;
}

// The front of POST /models/plan as a plot (x: parameters, y: validation accuracy), one
// circle per point, and the slider over the points; null hides it. Returns the points drawn.
export function drawPlan(plan) {
  state.plan = plan;
  const box = $("plan-box");
  const points = plan?.points ?? [];
  box.hidden = !plan;
  $("plan-note").textContent = plan?.unavailable ? `One point only: ${plan.unavailable}` : "";
  const plot = $("plan-plot");
  if (!points.length) {
    plot.replaceChildren();
    box.dataset.points = "0";
    $("plan-slider").disabled = true;
    $("plan-download").setAttribute("aria-disabled", "true");
    $("plan-download").removeAttribute("href");
    $("plan-point").textContent = "";
    return 0;
  }
  const span = (values) => [Math.min(...values), Math.max(...values)];
  const [x0, x1] = span(points.map((p) => p.params));
  const [y0, y1] = span(points.map((p) => p.val_acc));
  const x = (v) => x1 === x0 ? (PLOT.left + PLOT.right) / 2 : PLOT.left + (v - x0) / (x1 - x0) * (PLOT.right - PLOT.left);
  const y = (v) => y1 === y0 ? (PLOT.top + PLOT.bottom) / 2 : PLOT.bottom - (v - y0) / (y1 - y0) * (PLOT.bottom - PLOT.top);
  plot.replaceChildren(
    svg("line", { class: "axis", x1: PLOT.left - 8, y1: PLOT.bottom + 8, x2: PLOT.right, y2: PLOT.bottom + 8 }),
    svg("line", { class: "axis", x1: PLOT.left - 8, y1: PLOT.top, x2: PLOT.left - 8, y2: PLOT.bottom + 8 }),
    svg("text", { x: PLOT.left, y: 176 }, `${count(x0)} params`),
    svg("text", { x: PLOT.right, y: 176, "text-anchor": "end" }, `${count(x1)}`),
    svg("text", { x: 2, y: PLOT.bottom + 4 }, percent(y0)),
    svg("text", { x: 2, y: PLOT.top + 4 }, percent(y1)),
    svg("polyline", { class: "front", points: points.map((p) => `${x(p.params)},${y(p.val_acc)}`).join(" ") }),
    ...points.map((p, i) => {
      const circle = svg("circle", { cx: x(p.params), cy: y(p.val_acc), r: 5, "data-index": i });
      circle.append(svg("title", {}, pointText(p)));
      circle.addEventListener("click", () => choosePoint(i));
      return circle;
    }),
  );
  box.dataset.points = String(points.length);
  const slider = $("plan-slider");
  slider.max = String(points.length - 1);
  slider.disabled = points.length < 2;
  // Start at the point of the model described above, else at the most accurate one.
  const current = points.findIndex((p) => p.id === state.model?.id);
  choosePoint(current >= 0 ? current : points.length - 1);
  return points.length;
}

function pointText(point) {
  const widths = Object.entries(point.widths).map(([task, ks]) => `${task} ${ks}`).join(", ");
  return `${percent(point.val_acc)} · ${count(point.params)} params · ${size(point.bytes)} · ` +
    `${count(point.macs)} MACs · widths ${widths}`;
}

function choosePoint(index) {
  const point = state.plan.points[index];
  $("plan-slider").value = String(index);
  $("plan-box").dataset.chosen = String(index);
  for (const circle of $("plan-plot").querySelectorAll("circle")) {
    circle.classList.toggle("chosen", circle.dataset.index === String(index));
  }
  $("plan-point").textContent = pointText(point);
  const link = $("plan-download");
  link.href = point.download_url;
  link.dataset.id = point.id;
  link.setAttribute("aria-disabled", "false");
}

// --- Try it ----------------------------------------------------------------------------

let ortModule;
async function runtime() {
  if (!ortModule) {
    ortModule = import(ORT_URL).then((ort) => {
      ort.env.wasm.wasmPaths = "/vendor/ort/";
      ort.env.wasm.numThreads = 1;  // threads need cross-origin isolation; these models are tiny
      return ort;
    });
  }
  return ortModule;
}

async function session(model) {
  const ort = await runtime();
  if (!state.sessions.has(model.id)) {
    const loading = (async () => {
      const response = await fetch(model.download_url);
      if (!response.ok) throw new Error(`download failed: ${await problem(response)}`);
      const bytes = new Uint8Array(await response.arrayBuffer());
      return ort.InferenceSession.create(bytes, { executionProviders: ["wasm"] });
    })();
    state.sessions.set(model.id, loading);
    loading.catch(() => state.sessions.delete(model.id));
  }
  return { ort, session: await state.sessions.get(model.id) };
}

// Python's round() (halves to even), with which poe_core.data.load_photo sizes the resized photo.
const roundHalfEven = (x) => {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 ? r - 1 : r;
};

// Where a width x height photo lands on the model's input (metadata `input`), as
// poe_core.data.load_photo makes it: the photo resized (bilinear) so that its shorter side
// is `resize_shorter_side`, then its central square of the input's size cut out. A pool of
// images stored at its input size (CIFAR-100) states neither: the shorter side goes to the
// input's side. Returns the resized size and the crop's top-left corner in it.
export function photoToInput(input, width, height) {
  const [, , inputHeight, inputWidth] = input.shape;
  const resize = input.resize_shorter_side ?? Math.max(inputHeight, inputWidth);
  const scale = resize / Math.min(width, height);
  const resized = { width: Math.max(resize, roundHalfEven(width * scale)),
                    height: Math.max(resize, roundHalfEven(height * scale)) };
  return { ...resized, left: Math.floor((resized.width - inputWidth) / 2),
           top: Math.floor((resized.height - inputHeight) / 2) };
}

// NCHW float32 input: the photo resized and center-cropped as above, RGB pixels / 255, then
// (x - mean) / std, as the model's metadata says.
function tensorData(model) {
  const [, channels, height, width] = model.input.shape;
  const canvas = $("preview");
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  const image = state.image;
  const box = photoToInput(model.input, image.width, image.height);
  context.imageSmoothingEnabled = true;
  context.imageSmoothingQuality = "high";
  context.drawImage(image, -box.left, -box.top, box.width, box.height);
  const pixels = context.getImageData(0, 0, width, height).data;
  const data = new Float32Array(channels * height * width);
  const { mean, std } = model.input;
  for (let c = 0; c < channels; c++) {
    for (let i = 0; i < height * width; i++) {
      data[c * height * width + i] = (pixels[i * 4 + c] / 255 - mean[c]) / std[c];
    }
  }
  return data;
}

// The input and outputs of the last run, for checking the page against onnxruntime elsewhere.
export const lastRun = () => state.lastRun;

function top5(model, scores) {
  let probabilities = Array.from(scores);
  if (model.output === "logits") {
    const max = Math.max(...probabilities);
    const exps = probabilities.map((x) => Math.exp(x - max));
    const total = exps.reduce((a, b) => a + b, 0);
    probabilities = exps.map((x) => x / total);
  }
  return probabilities.map((p, i) => ({ label: model.labels[i], p }))
    .sort((a, b) => b.p - a.p).slice(0, 5);
}

async function predict() {
  const model = state.model;
  const list = $("top5");
  $("runtime-error").textContent = "";
  if (!model) {
    $("run-status").textContent = "Select tasks or classes first: the image runs on the selected model.";
    return;
  }
  $("run-status").textContent = "Running…";
  $("result").hidden = false;
  list.dataset.state = "running";
  try {
    const { ort, session: runner } = await session(model);
    const [, channels, height, width] = model.input.shape;
    const data = tensorData(model);
    const input = new ort.Tensor("float32", data, [1, channels, height, width]);
    const started = performance.now();
    const outputs = await runner.run({ [runner.inputNames[0]]: input });
    const elapsed = performance.now() - started;
    if (state.model !== model) return;  // the selection changed meanwhile; its own run follows
    const scores = outputs[runner.outputNames[0]].data;
    state.lastRun = { model: model.id, shape: [1, channels, height, width], input: Array.from(data),
                      outputs: Array.from(scores) };
    const best = top5(model, scores);
    showTruth(model, best[0].label);
    showVerdict(model, scores);
    list.replaceChildren(...best.map(({ label, p }) => {
      const item = document.createElement("li");
      item.dataset.label = label;
      item.innerHTML = `<span class="label"></span> <span class="p"></span><span class="bar"></span>`;
      item.querySelector(".label").textContent = label;
      item.querySelector(".p").textContent = percent(p);
      item.querySelector(".bar").style.width = `${Math.max(1, p * 100)}%`;
      return item;
    }));
    list.dataset.state = "done";
    $("result").scrollIntoView({ block: "nearest" });
    list.dataset.model = model.id;
    $("run-status").textContent = `Ran ${model.tasks.join(" + ")} (${model.weights}) in ${elapsed.toFixed(1)} ms ` +
      `with onnxruntime-web ${ort.env.versions?.web ?? ""}.`;
  } catch (error) {
    list.dataset.state = "error";
    $("run-status").textContent = "";
    $("runtime-error").textContent = `Could not run the model: ${error.message ?? error}`;
  }
}

// The model's reject rule (metadata `reject`) on one image's outputs: its score, and whether
// the image is accepted as one of the model's classes (score >= threshold) or is "none of
// these". null when the rule's score cannot be computed from the outputs (energy from
// probabilities).
export function rejectVerdict(model, outputs) {
  const rule = model.reject;
  if (!rule) return null;
  const values = Array.from(outputs);
  const top = Math.max(...values);
  let score;
  if (model.output === "probabilities") {
    if (rule.score !== "max_softmax") return null;
    score = top;
  } else {
    const total = values.reduce((sum, v) => sum + Math.exp(v - top), 0);
    score = rule.score === "max_softmax" ? 1 / total : top + Math.log(total);
  }
  return { score, accepted: score >= rule.threshold };
}

export function showVerdict(model, outputs) {
  const line = $("verdict");
  const verdict = rejectVerdict(model, outputs);
  delete line.dataset.accepted;
  if (!verdict) {
    line.textContent = "";
    return null;
  }
  line.dataset.accepted = String(verdict.accepted);
  const name = model.reject.score === "max_softmax" ? "max softmax" : "energy";
  line.textContent = verdict.accepted
    ? `One of this model's classes (${name} ${verdict.score.toFixed(3)} ≥ ${model.reject.threshold.toFixed(3)}).`
    : `None of these: ${name} ${verdict.score.toFixed(3)} is below the threshold ` +
      `${model.reject.threshold.toFixed(3)}, so the image is likely none of this model's classes.`;
  return verdict;
}

function showTruth(model, top1) {
  const truth = state.truth;
  const line = $("truth");
  delete line.dataset.correct;
  if (!truth) {
    line.textContent = "";
    return;
  }
  const known = model.labels.includes(truth.label);
  line.textContent = `CIFAR-100 test image ${truth.index}, labelled ${truth.label}: ` + (!known
    ? "not one of this model's classes."
    : top1 === truth.label ? "the top-1 class is right." : `the top-1 class is wrong.`);
  if (known) line.dataset.correct = String(top1 === truth.label);
}

const DECODE = { colorSpaceConversion: "none", premultiplyAlpha: "none" };

async function useImage(source, truth = null) {
  try {
    state.image = await createImageBitmap(source, DECODE);
  } catch {
    $("runtime-error").textContent = "This image cannot be decoded by the browser.";
    return;
  }
  state.truth = truth;
  await predict();
}

async function useFile(file) {
  if (!file || !file.type.startsWith("image/")) {
    $("runtime-error").textContent = "That is not an image file.";
    return;
  }
  for (const sample of $("samples").querySelectorAll("[aria-pressed]")) sample.removeAttribute("aria-pressed");
  await useImage(file);
}

async function loadSamples() {
  try {
    const response = await fetch("/samples/index.json");
    if (response.ok) state.samples = await response.json();
  } catch {
    state.samples = null;  // the page works without them
  }
  showSamples(state.model);
}

const sampleUrl = (label, index) =>
  "/samples/" + state.samples.file.replace("{label}", encodeURIComponent(label)).replace("{index}", index);

// Whether the shipped samples enter the model as they are: the model's input is their
// size and photoToInput neither resizes nor crops them (a pool of images stored at their
// size, CIFAR-100's). On a photo pool of another input size they would be resampled
// images of another data set, so none is offered.
export function samplesFit(input, samples) {
  const [height, width] = samples.size;
  const box = photoToInput(input, width, height);
  return box.width === width && box.height === height && box.left === 0 && box.top === 0 &&
    input.shape[2] === height && input.shape[3] === width;
}

// The input a model takes, in words: "64×64 photos (shorter side resized to 72, central 64×64)".
function inputWords(input) {
  const [, , height, width] = input.shape;
  const side = input.resize_shorter_side;
  return side == null ? `${width}×${height} images`
    : `${width}×${height} photos (shorter side resized to ${side}, central ${width}×${height})`;
}

// The shipped test images of the model's classes, one group per class in output order;
// when they do not fit the model's input, a note that says so instead.
function showSamples(model) {
  const fit = Boolean(model && state.samples && samplesFit(model.input, state.samples));
  const note = $("samples-note");
  note.hidden = !model || !state.samples || fit;
  if (!note.hidden) {
    const [height, width] = state.samples.size;
    note.textContent = `No one-click test images for this model: the page's sample images are ${width}×${height}, ` +
      `from the ${state.samples.source}, and this model takes ${inputWords(model.input)}. Try a photo of your own.`;
  }
  const images = fit ? state.samples.images : {};
  const labels = model ? model.labels.filter((label) => images[label]?.length) : [];
  const box = $("samples");
  if (box.dataset.labels === labels.join(",")) {
    $("samples-box").hidden = !labels.length;
    return;
  }
  box.dataset.labels = labels.join(",");
  box.replaceChildren(...labels.map((label) => {
    const group = document.createElement("figure");
    group.className = "sample-class";
    group.innerHTML = "<figcaption></figcaption><div></div>";
    group.querySelector("figcaption").append(...breakable(label));
    group.querySelector("div").append(...images[label].map((index, n) => {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "sample";
      button.dataset.label = label;
      button.dataset.index = String(index);
      const image = document.createElement("img");
      image.src = sampleUrl(label, index);
      [image.height, image.width] = state.samples.size;
      image.alt = `Run on ${label}, test image ${n + 1}`;
      button.append(image);
      button.addEventListener("click", async () => {
        for (const other of box.querySelectorAll("[aria-pressed]")) other.removeAttribute("aria-pressed");
        button.setAttribute("aria-pressed", "true");
        try {
          await image.decode();
        } catch {
          $("runtime-error").textContent = `The sample image ${image.src} could not be loaded.`;
          return;
        }
        await useImage(image, { label, index });
      });
      return button;
    }));
    return group;
  }));
  $("samples-box").hidden = !labels.length;
}

function setUpTryIt() {
  const input = $("image");
  const camera = $("camera");
  const drop = $("drop");
  input.addEventListener("change", () => useFile(input.files[0]));
  camera.addEventListener("change", () => useFile(camera.files[0]));
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (!input.disabled) useFile(event.dataTransfer.files[0]);
  });
  runtime().then(() => { input.disabled = camera.disabled = false; }, () => {
    $("runtime-error").textContent = MISSING_ORT;
  });
}

setUpTryIt();
loadSamples();
loadTasks().catch((error) => { $("pool").textContent = `Could not load the tasks: ${error.message}`; });
