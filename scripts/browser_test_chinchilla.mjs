// Drives the scaling-law page in headless Chromium over the DevTools protocol (plain
// WebSocket, no npm packages) and checks that what a person sees matches GET /v1/chinchilla.
// Usage: node [--experimental-websocket] browser_test_chinchilla.mjs BASE_URL CDP_WS_URL
// (normally run by browser_test_chinchilla.sh, which starts the server and the browser).
// Exits 1 on the first failed check. SCREENSHOT=path.png saves the final page.
import { writeFileSync } from "node:fs";

const [base, cdpUrl] = process.argv.slice(2);
if (!base || !cdpUrl) {
  console.error("usage: browser_test_chinchilla.mjs BASE_URL CDP_WS_URL");
  process.exit(2);
}
const deadline = setTimeout(() => fail("timed out after 90 s"), 90_000);

let passed = 0;
function fail(msg) {
  console.error(`browser_test_chinchilla: FAIL: ${msg}`);
  console.error(`${passed} passed, 1 failed`);
  process.exit(1);
}
function check(cond, msg) {
  if (!cond) fail(msg);
  passed += 1;
  console.log(`ok - ${msg}`);
}

// ---- a minimal CDP client ----
const ws = new WebSocket(cdpUrl);
await new Promise((resolve, reject) => {
  ws.onopen = resolve;
  ws.onerror = () => reject(new Error(`cannot connect to ${cdpUrl}`));
}).catch((e) => fail(e.message));
let nextId = 0;
const pending = new Map();
const listeners = [];
const pageErrors = [];
ws.onmessage = (ev) => {
  const msg = JSON.parse(ev.data);
  if (msg.id !== undefined && pending.has(msg.id)) {
    const { resolve, reject } = pending.get(msg.id);
    pending.delete(msg.id);
    if (msg.error) reject(new Error(`${msg.error.message} (${msg.error.code})`));
    else resolve(msg.result);
    return;
  }
  if (msg.method === "Runtime.exceptionThrown") {
    pageErrors.push(msg.params.exceptionDetails.exception?.description ?? msg.params.exceptionDetails.text);
  }
  if (msg.method === "Runtime.consoleAPICalled" && msg.params.type === "error") {
    pageErrors.push(msg.params.args.map((a) => a.value ?? a.description).join(" "));
  }
  for (const l of listeners) l(msg);
};
function send(method, params = {}, sessionId) {
  const id = ++nextId;
  ws.send(JSON.stringify({ id, method, params, sessionId }));
  return new Promise((resolve, reject) => pending.set(id, { resolve, reject }));
}

const { targetId } = await send("Target.createTarget", { url: "about:blank" });
const { sessionId } = await send("Target.attachToTarget", { targetId, flatten: true });
const page = (method, params) => send(method, params, sessionId);
await page("Page.enable");
await page("Runtime.enable");

async function evaluate(expression) {
  const r = await page("Runtime.evaluate", { expression, returnByValue: true, awaitPromise: true });
  if (r.exceptionDetails) fail(`page threw evaluating ${expression}: ${r.exceptionDetails.text}`);
  return r.result.value;
}
async function waitFor(expression, what, ms = 15_000) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await evaluate(expression);
    if (v) return v;
    if (Date.now() > end) fail(`waited ${ms} ms for ${what} (${expression})`);
    await new Promise((r) => setTimeout(r, 50));
  }
}
async function press(key, code, keyCode, times = 1) {
  for (let i = 0; i < times; i++) {
    await page("Input.dispatchKeyEvent", { type: "keyDown", key, code, windowsVirtualKeyCode: keyCode });
    await page("Input.dispatchKeyEvent", { type: "keyUp", key, code, windowsVirtualKeyCode: keyCode });
  }
}
async function click(x, y) {
  for (const type of ["mouseMoved", "mousePressed", "mouseReleased"]) {
    await page("Input.dispatchMouseEvent", { type, x, y, button: "left", clickCount: 1 });
  }
}

// What the page shows: each number span's exact value (data-value) and its text.
const readout = () => evaluate(`(() => {
  const out = {};
  for (const el of document.querySelectorAll("span[id][data-value]")) {
    out[el.id] = { value: el.dataset.value, text: el.textContent };
  }
  out.status = { state: document.getElementById("status").dataset.state,
                 flops: document.getElementById("status").dataset.flops,
                 text: document.getElementById("status").textContent };
  out.slider = document.getElementById("log-flops").value;
  out.iaVisible = !document.getElementById("ia-row").hidden;
  out.cursorX = document.getElementById("plot-cursor")?.getAttribute("x1") ?? null;
  return out;
})()`);

async function endpoint(query) {
  const resp = await fetch(`${base}/v1/chinchilla?${query}`);
  return { status: resp.status, body: await resp.json() };
}

// Every number the page shows equals the endpoint's JSON value, to the last bit.
function sameNumbers(shown, plan, label) {
  const pairs = [
    ["flops", plan.flops],
    ["rule-params", plan.rule_of_thumb.params],
    ["rule-tokens", plan.rule_of_thumb.tokens],
    ["rule-ratio", plan.rule_of_thumb.tokens_per_param],
    ["rule-loss", plan.rule_of_thumb.loss],
    ["opt-params", plan.compute_optimal.params],
    ["opt-tokens", plan.compute_optimal.tokens],
    ["opt-ratio", plan.compute_optimal.tokens_per_param],
    ["opt-loss", plan.compute_optimal.loss],
    ["kaplan-params", plan.kaplan2020.params],
  ];
  const ia = plan.inference_aware;
  if (ia) {
    pairs.push(
      ["ia-params", ia.params], ["ia-tokens", ia.tokens], ["ia-loss", ia.loss_target],
      ["ia-inference-tokens", ia.inference_tokens], ["ia-train-flops", ia.train_flops],
      ["ia-inference-flops", ia.inference_flops], ["ia-total-flops", ia.total_flops],
      ["ia-saving", ia.saving_vs_compute_optimal],
    );
  }
  for (const [id, want] of pairs) {
    const got = shown[id] ? Number(shown[id].value) : NaN;
    if (got !== want) fail(`${label}: #${id} shows ${shown[id]?.value} but the endpoint says ${want}`);
  }
  check(true, `${label}: ${pairs.length} numbers equal the endpoint's`);
}

// The human units, computed here independently of the page's code.
function human(x) {
  for (const [scale, unit] of [[1e12, "T"], [1e9, "B"], [1e6, "M"], [1e3, "K"], [1, ""]]) {
    if (x >= scale * 0.9995) {
      const v = x / scale;
      return (v >= 99.95 ? v.toFixed(0) : v >= 9.995 ? v.toFixed(1) : v.toFixed(2)) + unit;
    }
  }
  return x.toExponential(2);
}

// ---- 1. load ----
const loaded = new Promise((resolve) => listeners.push((m) => m.method === "Page.loadEventFired" && resolve()));
await page("Page.navigate", { url: `${base}/chinchilla` });
await loaded;
await waitFor(`document.getElementById("status").dataset.state === "ok"`, "first answer");
let shown = await readout();
check(shown.slider === "22", `slider starts at 1e22 (value ${shown.slider})`);
let { body: plan } = await endpoint("flops=1e22&fit=hoffmann2022");
sameNumbers(shown, plan, "C = 1e22");
check(shown["rule-params"].text === "9.13B" && shown["rule-tokens"].text === "183B",
  `rule of thumb at 1e22 reads ${shown["rule-params"].text} params, ${shown["rule-tokens"].text} tokens`);
check(shown["rule-loss"].text.startsWith("2.14") && Number(shown["rule-loss"].text).toFixed(3) === "2.146",
  `rule-of-thumb loss reads ${shown["rule-loss"].text}`);
check(!shown.iaVisible, "no inference-aware row without T");
const polylines = await evaluate(`document.querySelectorAll("#plot polyline").length`);
check(polylines === 6, `plot draws 6 frontier lines (N and D for two fits and the rule), got ${polylines}`);
const cursor0 = shown.cursorX;

// ---- 2. move the slider with the keyboard: 20 steps of 0.05 = one decade ----
await evaluate(`document.getElementById("log-flops").focus()`);
await press("ArrowRight", "ArrowRight", 39, 20);
await waitFor(`document.getElementById("log-flops").value === "23" &&
  document.getElementById("status").dataset.state === "ok" &&
  document.getElementById("status").dataset.flops === String(1e23)`, "the answer for 1e23");
shown = await readout();
({ body: plan } = await endpoint("flops=1e23&fit=hoffmann2022"));
sameNumbers(shown, plan, "keyboard to C = 1e23");
check(shown.cursorX !== cursor0, `plot cursor moved (${cursor0} -> ${shown.cursorX})`);
check(shown["opt-params"].text === human(plan.compute_optimal.params),
  `compute-optimal N reads ${shown["opt-params"].text}`);

// ---- 3. move the slider with the mouse: click at 80% of its track ----
const rect = await evaluate(`(() => { const r = document.getElementById("log-flops").getBoundingClientRect();
  return { x: r.x, y: r.y, w: r.width, h: r.height }; })()`);
await click(rect.x + rect.w * 0.8, rect.y + rect.h / 2);
await waitFor(`(() => { const v = Number(document.getElementById("log-flops").value);
  return v > 24 && document.getElementById("status").dataset.state === "ok" &&
    document.getElementById("status").dataset.flops === String(Number(Math.pow(10, v).toPrecision(3))); })()`, "the answer after the click");
shown = await readout();
check(Number(shown.slider) > 24 && Number(shown.slider) < 27, `mouse moved the slider to ${shown.slider}`);
({ body: plan } = await endpoint(`flops=${encodeURIComponent(shown.flops.value)}&fit=hoffmann2022`));
sameNumbers(shown, plan, `mouse to C = ${shown.flops.text}`);

// ---- 4. another fit and lifetime inference tokens ----
await evaluate(`(() => { const s = document.getElementById("fit"); s.value = "besiroglu2024";
  s.dispatchEvent(new Event("change")); })()`);
await evaluate(`document.getElementById("inference-tokens").focus()`);
await page("Input.insertText", { text: "1e13" });
await waitFor(`document.getElementById("status").dataset.state === "ok" &&
  !document.getElementById("ia-row").hidden &&
  document.getElementById("fit-name").textContent === "besiroglu2024"`, "the inference-aware answer");
shown = await readout();
({ body: plan } = await endpoint(`flops=${encodeURIComponent(shown.flops.value)}&fit=besiroglu2024&inference_tokens=1e13`));
sameNumbers(shown, plan, "besiroglu2024 with T = 1e13");
check(shown["ia-saving"].text === (100 * plan.inference_aware.saving_vs_compute_optimal).toFixed(1) + "%",
  `saving reads ${shown["ia-saving"].text}`);
check(await evaluate(`!!document.getElementById("dot-ia-params")`), "plot marks the inference-aware model");

// ---- 5. a bad value shows the endpoint's error message ----
await evaluate(`(() => { const i = document.getElementById("inference-tokens"); i.select(); })()`);
await page("Input.insertText", { text: "-5" });
await waitFor(`document.getElementById("status").dataset.state === "error"`, "the error for T = -5");
shown = await readout();
const bad = await endpoint(`flops=${encodeURIComponent(shown.flops.value)}&fit=besiroglu2024&inference_tokens=-5`);
check(bad.status === 422 && shown.status.text === bad.body.error.message,
  `error shown: "${shown.status.text}"`);

check(pageErrors.length === 0, `no script errors in the page ${pageErrors.join("; ")}`);

if (process.env.SCREENSHOT) {
  await evaluate(`(() => { const i = document.getElementById("inference-tokens"); i.select(); })()`);
  await page("Input.insertText", { text: "1e13" });
  await waitFor(`document.getElementById("status").dataset.state === "ok"`, "the answer before the screenshot");
  const { data } = await page("Page.captureScreenshot", { format: "png", captureBeyondViewport: true });
  writeFileSync(process.env.SCREENSHOT, Buffer.from(data, "base64"));
  console.log(`screenshot: ${process.env.SCREENSHOT}`);
}

clearTimeout(deadline);
console.log(`browser_test_chinchilla: ${passed} passed, 0 failed`);
await send("Target.closeTarget", { targetId }).catch(() => {});
ws.close();
process.exit(0);
