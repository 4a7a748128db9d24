"""The web page of ``emollama serve``: one HTML document, its style and script inline (no build step).

It asks ``/v1/health`` and ``/v1/run`` (with the bearer token when the server wants one: the page asks
for it and keeps it in the tab's sessionStorage), sends a dropped or picked clip to ``/v1/predict``, and
shows the label, a bar per label's probability, the reasoning, the face-track warnings and the contact
sheet (fetched with the token, shown as a blob), then keeps each clip in a list for the session. "Timeline"
sends the clip to ``/v1/timeline`` and shows the plot of its probabilities over time.
"""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>emollama</title>
<style>
  :root { --fg: #1d2430; --muted: #5b6474; --line: #d9dee7; --accent: #2f6fdf; --warn: #9a5b00; --bad: #b3261e; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg); background: #f6f7f9; }
  header { padding: 14px 24px; background: #fff; border-bottom: 1px solid var(--line); display: flex; gap: 16px; align-items: baseline; flex-wrap: wrap; }
  header h1 { font-size: 19px; margin: 0; }
  header .run { color: var(--muted); font-size: 13px; }
  main { display: grid; grid-template-columns: minmax(320px, 1fr) 300px; gap: 18px; padding: 18px 24px; max-width: 1280px; }
  section, aside { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 16px; }
  .note { background: #fff4e0; border: 1px solid #f0c36d; color: #6b4500; border-radius: 6px; padding: 8px 12px; margin: 12px 24px 0; max-width: 1232px; }
  #drop { border: 2px dashed #9fb3d9; border-radius: 8px; padding: 22px; text-align: center; color: var(--muted); cursor: pointer; }
  #drop.over { background: #eef3fd; border-color: var(--accent); }
  .row { display: flex; gap: 8px; margin-top: 10px; align-items: center; flex-wrap: wrap; }
  input[type=text], input[type=password] { flex: 1; min-width: 160px; padding: 7px 9px; border: 1px solid var(--line); border-radius: 6px; font: inherit; }
  button { padding: 7px 14px; border: 0; border-radius: 6px; background: var(--accent); color: #fff; font: inherit; cursor: pointer; }
  button:disabled { background: #9aa7bd; cursor: default; }
  #status { color: var(--muted); margin-top: 10px; min-height: 1.4em; }
  #status.error { color: var(--bad); }
  #result { margin-top: 12px; display: none; }
  #label { font-size: 28px; font-weight: 650; text-transform: capitalize; }
  #label small { font-size: 14px; color: var(--muted); font-weight: 400; text-transform: none; margin-left: 8px; }
  .bars { margin: 10px 0 4px; }
  .bar { display: grid; grid-template-columns: 90px 1fr 56px; gap: 8px; align-items: center; margin: 3px 0; font-size: 13px; }
  .bar .track { background: #edf0f5; border-radius: 4px; height: 16px; overflow: hidden; }
  .bar .fill { background: #8fb0ea; height: 100%; }
  .bar.top .fill { background: var(--accent); }
  .bar .v { text-align: right; font-variant-numeric: tabular-nums; color: var(--muted); }
  h3 { font-size: 14px; margin: 16px 0 6px; color: var(--muted); text-transform: uppercase; letter-spacing: .04em; }
  #reasoning { white-space: pre-wrap; }
  #warnings li { color: var(--warn); }
  #face { color: var(--muted); font-size: 13px; }
  #sheet { max-width: 100%; border: 1px solid var(--line); border-radius: 4px; display: none; }
  #history { list-style: none; padding: 0; margin: 0; }
  #history li { padding: 7px 6px; border-bottom: 1px solid var(--line); cursor: pointer; font-size: 13px; }
  #history li:hover { background: #f2f5fa; }
  #history .lab { font-weight: 600; text-transform: capitalize; }
  #history .err { color: var(--bad); }
  #history .src { color: var(--muted); }
  #auth { display: none; }
</style>
</head>
<body>
<header><h1>emollama</h1><span class="run" id="run">connecting...</span></header>
<div class="note" id="note" hidden></div>
<main>
  <section>
    <div class="row" id="auth"><input type="password" id="token" placeholder="bearer token (this server wants one)">
      <button id="save-token" type="button">Use token</button></div>
    <div id="drop" tabindex="0">Drop a video clip here, or click to pick one
      <input type="file" id="file" accept="video/*,.mkv,.ts,.mts,.m2ts,.webm,.gif" hidden></div>
    <div class="row"><input type="text" id="subtitle" placeholder="what the person says (optional)">
      <button id="send" type="button" disabled>Predict</button>
      <button id="timeline" type="button" disabled title="a long video: windows of 4 s every 2 s, inside each shot">Timeline</button></div>
    <div id="status"></div>
    <div id="result">
      <div id="label"></div>
      <div class="bars" id="bars"></div>
      <h3>Reasoning</h3><div id="reasoning"></div>
      <ul id="warnings"></ul>
      <h3>Face crops and global frame</h3>
      <div id="face"></div>
      <img id="sheet" alt="contact sheet: the face crops the model used, then the global frame">
    </div>
    <div id="tl" style="display:none">
      <h3>Emotion over time</h3>
      <div id="tl-info"></div>
      <img id="tl-plot" style="max-width:100%" alt="each label's probability over time, shot cuts marked">
    </div>
  </section>
  <aside><h3 style="margin-top:0">Clips sent</h3><ul id="history"></ul></aside>
</main>
<script>
const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("emollama-token") || "";
let picked = null;
const results = [];

function headers() { return token ? { Authorization: "Bearer " + token } : {}; }
function status(text, error) { $("status").textContent = text; $("status").className = error ? "error" : ""; }
function pct(x) { return x == null ? "-" : Math.round(100 * x) + "%"; }

async function api(path, options) {
  const r = await fetch(path, { ...(options || {}), headers: { ...headers(), ...((options || {}).headers || {}) } });
  if (r.status === 401) { $("auth").style.display = "flex"; throw new Error("this server wants a bearer token"); }
  return r;
}

async function connect() {
  try {
    const r = await api("/v1/run");
    const run = await r.json();
    $("auth").style.display = "none";
    $("run").textContent = `run ${run.name} · ${run.profile} profile · ${run.prompt_style} prompts · ` +
      `${Object.keys(run.feature_sets).length} feature sets · labels: ${run.labels.join(", ")}`;
    if (run.note) { $("note").hidden = false; $("note").textContent = run.note; }
    status("");
  } catch (e) { $("run").textContent = "not connected"; status(e.message, true); }
}

function pick(file) {
  picked = file;
  $("send").disabled = !file;
  $("timeline").disabled = !file;
  $("drop").firstChild.textContent = file ? file.name + " (" + (file.size / 1048576).toFixed(1) + " MB) " : "Drop a video clip here, or click to pick one";
}

async function send() {
  if (!picked) return;
  const body = new FormData();
  body.append("file", picked, picked.name);
  if ($("subtitle").value.trim()) body.append("subtitle", $("subtitle").value.trim());
  $("send").disabled = true;
  status("sending " + picked.name + "...");
  const t0 = performance.now();
  try {
    const r = await api("/v1/predict", { method: "POST", body });
    const d = await r.json();
    if (!r.ok) { const e = { file: picked.name, error: d.detail || r.statusText }; results.unshift(e); history(); status(e.error, true); return; }
    results.unshift(d); history(); show(d);
    status(`${d.extracted ? "extracted now" : "read from the store"} · ${((performance.now() - t0) / 1000).toFixed(2)} s`);
  } catch (e) { status(e.message, true); }
  finally { $("send").disabled = !picked; }
}

async function show(d) {
  $("result").style.display = "block";
  const probs = Object.entries(d.probabilities || {}).sort((a, b) => b[1] - a[1]);
  $("label").innerHTML = '<span id="label-name"></span> <small></small>';
  $("label-name").textContent = d.label || "-";
  $("label").querySelector("small").textContent = probs.length ? "p = " + probs[0][1].toFixed(3) : "";
  $("bars").innerHTML = "";
  for (const [name, p] of probs) {
    const row = document.createElement("div"); row.className = "bar" + (name === d.label ? " top" : "");
    row.dataset.label = name;
    row.innerHTML = `<span></span><div class="track"><div class="fill"></div></div><span class="v"></span>`;
    row.children[0].textContent = name; row.querySelector(".fill").style.width = (100 * p).toFixed(1) + "%";
    row.children[2].textContent = p.toFixed(3);
    $("bars").append(row);
  }
  $("reasoning").textContent = d.reasoning || "(no reasoning text)";
  $("warnings").innerHTML = "";
  for (const w of (d.warnings || [])) { const li = document.createElement("li"); li.textContent = w; $("warnings").append(li); }
  const f = d.face;
  $("face").textContent = !f ? "no face information (an imported clip)" : !f.found ? "no face found: whole frames were used" :
    `main face seen in ${pct(1 - (f.absent ?? 0))} of ${f.frames} sampled frames (detected ${pct(f.detected)}, ` +
    `interpolated ${pct(f.interpolated)}) · ${f.shots || 1} shot(s)` + (f.weak ? " · weak track" : "");
  $("sheet").style.display = "none";
  if (d.sheet_url) {
    const r = await api(d.sheet_url);
    if (r.ok) { $("sheet").src = URL.createObjectURL(await r.blob()); $("sheet").style.display = "block"; }
  }
}

async function sendTimeline() {
  if (!picked) return;
  const body = new FormData();
  body.append("file", picked, picked.name);
  if ($("subtitle").value.trim()) body.append("subtitle", $("subtitle").value.trim());
  $("timeline").disabled = true;
  status("timeline of " + picked.name + "...");
  const t0 = performance.now();
  try {
    const r = await api("/v1/timeline", { method: "POST", body });
    const d = await r.json();
    if (!r.ok) { results.unshift({ file: picked.name, error: d.detail || r.statusText }); history(); status(d.detail, true); return; }
    results.unshift({ file: picked.name, timeline: d }); history();
    showTimeline(d);
    status(`${d.windows.length} windows · ${((performance.now() - t0) / 1000).toFixed(2)} s`);
  } catch (e) { status(e.message, true); }
  finally { $("timeline").disabled = !picked; }
}

async function showTimeline(d) {
  $("tl").style.display = "block";
  const extracted = d.windows.filter((w) => w.extracted).length;
  $("tl-info").textContent = `${d.windows.length} windows of ${d.settings.window} s every ${d.settings.hop} s over ` +
    `${d.duration.toFixed(1)} s · ${d.cuts.length} shot cut(s) · ${extracted} extracted now`;
  const r = await api(d.plot_url);
  if (r.ok) $("tl-plot").src = URL.createObjectURL(await r.blob());
}

function history() {
  $("history").innerHTML = "";
  results.forEach((d, i) => {
    const li = document.createElement("li");
    const name = document.createElement("div"); name.textContent = d.file; li.append(name);
    const what = document.createElement("div");
    if (d.error) { what.className = "err"; what.textContent = d.error; }
    else if (d.timeline) {
      what.className = "src"; what.textContent = `timeline: ${d.timeline.windows.length} windows, ${d.timeline.cuts.length} cut(s)`;
      li.onclick = () => showTimeline(d.timeline);
    }
    else {
      what.innerHTML = `<span class="lab"></span> <span class="src"></span>`;
      what.children[0].textContent = d.label;
      what.children[1].textContent = `${Math.max(...Object.values(d.probabilities)).toFixed(2)} · ` +
        (d.extracted ? "extracted" : "store") + ((d.warnings || []).length ? " · ⚠" : "");
      li.onclick = () => show(d);
    }
    li.append(what); $("history").append(li);
  });
}

$("drop").onclick = () => $("file").click();
$("drop").onkeydown = (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); };
$("file").onchange = () => pick($("file").files[0] || null);
$("drop").ondragover = (e) => { e.preventDefault(); $("drop").classList.add("over"); };
$("drop").ondragleave = () => $("drop").classList.remove("over");
$("drop").ondrop = (e) => { e.preventDefault(); $("drop").classList.remove("over"); pick(e.dataTransfer.files[0] || null); };
$("send").onclick = send;
$("timeline").onclick = sendTimeline;
$("save-token").onclick = () => { token = $("token").value.trim(); sessionStorage.setItem("emollama-token", token); connect(); };
connect();
</script>
</body>
</html>
"""
