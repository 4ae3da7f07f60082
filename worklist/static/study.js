"use strict";
// Study view: the series in a Cornerstone3D stack viewer (worklist/viewer/viewer.js, fed by the gateway's WADO-RS)
// with the AI boxes in SVG over it on their own slice (toggle, zoom, pan, window presets, slice slider, wheel and
// keys), findings review (a accept, r reject, n/p next/previous finding), the grounded draft's sentences (click a
// sentence: its boxes; click a box: its sentences; decide the statements without image evidence), report editor,
// questions, signing. Everything is put in the page with textContent (no HTML from data).
(() => {
  const root = document.getElementById("study");
  const studyId = root.dataset.studyId;
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const $ = (id) => document.getElementById(id);
  const SVG = "http://www.w3.org/2000/svg";
  let doc = null;
  let imageIndex = 0;  // index into doc.images (every slice of the study) of the slice shown
  let viewer = null;  // RaddraftViewer.StackViewer, null while it is not built or has failed
  let stackSeries = null;  // index into doc.series of the stack the viewer holds
  let stackLoading = null;  // the promise of the stack being put in the viewer
  let preset = "image";
  const PRESETS = {  // window width, level of modality values (HU for CT)
    lung: [1500, -600], mediastinum: [350, 50], bone: [2000, 300], brain: [80, 40],
  };
  let answerBoxes = [];
  let selected = null;  // {kind: "sentence" | "finding", index}: what the reader clicked last

  async function api(path, body) {
    const init = { credentials: "same-origin", headers: {} };
    if (body !== undefined) {
      init.method = "POST";
      init.headers = { "Content-Type": "application/json", "X-CSRF-Token": csrf };
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    if (response.status === 401) { window.location.href = "/login"; throw new Error("signed out"); }
    const data = await response.json();
    if (!response.ok) throw new Error(data.error || response.statusText);
    return data;
  }

  async function load() {
    doc = await api("/api/studies/" + studyId);
    $("title").textContent = (doc.modality || "") + " · " + (doc.accession || "no accession");
    const state = doc.claimed_by ? doc.state + " by " + doc.claimed_by : doc.state;
    $("state-badge").textContent = doc.error ? state + ": " + doc.error : state;
    $("take-over").hidden = !doc.can_take_over;
    $("claim-note").hidden = !doc.can_take_over;
    $("claim-note").textContent = doc.can_take_over ? doc.claimed_by + " is reading this report: take it over to "
      + "edit or sign it (" + doc.claimed_by + " can then no longer save)." : "";
    $("prelim-badge").hidden = !doc.preliminary;
    const p = doc.patient;
    $("meta").textContent = [p.name.replaceAll("^", " "), "ID " + p.id, p.sex,
      doc.age_years === null ? "" : doc.age_years + " y", doc.description, doc.study_date,
      doc.model ? "model " + doc.model.name + " " + doc.model.version : ""].filter(Boolean).join(" · ");
    const unbuilt = doc.outputs_not_built || [];
    $("outputs-not-built").hidden = !unbuilt.length;
    $("outputs-not-built").textContent = unbuilt.length ? "Not built: " + unbuilt.join(" · ") : "";
    $("report-findings").value = doc.report.findings;
    $("report-impression").value = doc.report.impression;
    for (const id of ["report-findings", "report-impression", "save-report", "correct-text"]) {
      $(id).disabled = !doc.editable;
    }
    $("correct-form").querySelector("button").disabled = !doc.editable;
    $("sign").hidden = !doc.editable;
    $("sign").disabled = !doc.can_sign;
    $("amend").hidden = !doc.can_amend;
    $("ask-form").querySelector("button").disabled = !doc.can_ask;
    if (!doc.can_ask) $("ask-answer").textContent = "The model is not connected: questions are unavailable.";
    $("sentences-stale").hidden = true;
    if (selected && selected.kind === "sentence" && !(doc.sentences || [])[selected.index]) selected = null;
    renderBanner();
    renderImages();
    renderFindings();
    renderSentences();
    renderVersions();
    highlight();
  }

  function renderBanner() {
    const c = doc.consistency;
    const banner = $("grounding-banner");
    banner.hidden = !(c && c.flagged);
    banner.textContent = c && c.flagged ? "AI text and boxes disagree: " + c.text_only
      + " statement(s) without image evidence, " + c.box_only + " box(es) not in the text"
      + (c.undecided ? " · " + c.undecided + " statement(s) to accept, edit or remove before signing" : "") : "";
  }

  function goToImage(index) {
    if (index === null || index === undefined || !doc.images[index]) return;
    imageIndex = index;
    showImage();
  }

  function selectSentence(s) {
    selected = { kind: "sentence", index: s.index };
    const first = s.findings.map((i) => doc.findings[i]).find((f) => f && f.image !== null);
    if (first) goToImage(first.image);
    highlight();
  }

  function selectFinding(f) {
    selected = { kind: "finding", index: f.index };
    goToImage(f.image);
    highlight();
    const sentence = document.querySelector("#sentences .sentence.selected");
    if (sentence) sentence.scrollIntoView({ block: "nearest" });
  }

  // the selected sentence and its boxes, or the selected box and its sentences
  function highlight() {
    let sentences = new Set();
    let findings = new Set();
    if (selected && selected.kind === "sentence" && doc.sentences[selected.index]) {
      sentences = new Set([selected.index]);
      findings = new Set(doc.sentences[selected.index].findings);
    } else if (selected && selected.kind === "finding" && doc.findings[selected.index]) {
      findings = new Set([selected.index]);
      sentences = new Set(doc.findings[selected.index].sentences);
    }
    for (const el of document.querySelectorAll("#sentences .sentence")) {
      el.classList.toggle("selected", sentences.has(Number(el.dataset.index)));
    }
    for (const el of document.querySelectorAll("#overlay g.box.finding, #findings li[data-index]")) {
      el.classList.toggle("selected", findings.has(Number(el.dataset.index)));
    }
  }

  function flag(text, testid) {
    const el = document.createElement("span");
    el.className = "flag";
    el.dataset.testid = testid;
    el.textContent = text;
    return el;
  }

  function renderSentences() {
    const sentences = doc.sentences || [];
    $("sentences-card").hidden = !doc.grounded;
    const holder = $("sentences");
    holder.replaceChildren();
    const decisions = $("sentence-decisions");
    decisions.replaceChildren();
    if (!doc.grounded) return;
    for (const section of ["findings", "impression"]) {
      const p = document.createElement("p");
      p.className = "sentences";
      p.dataset.section = section;
      const head = document.createElement("span");
      head.className = "section";
      head.textContent = section.toUpperCase() + ":";
      p.appendChild(head);
      for (const s of sentences.filter((x) => x.section === section)) {
        const span = document.createElement("span");
        span.className = "sentence " + s.status + (s.needs_decision ? " undecided" : "");
        span.dataset.index = s.index;
        span.dataset.findings = s.findings.join(" ");
        span.dataset.status = s.status;
        span.dataset.testid = "sentence";
        span.textContent = s.text;
        span.title = s.status === "grounded" ? "shown by finding(s) " + s.findings.map((i) => i + 1).join(", ")
          : s.status === "text_only" ? "no box shows this statement" : "a statement that needs no box";
        span.addEventListener("click", () => selectSentence(s));
        p.append(span);
        if (s.status === "text_only") p.append(flag("not localized by the AI", "not-localized"));
        p.append(" ");
      }
      holder.appendChild(p);
    }
    for (const s of sentences.filter((x) => x.status === "text_only" && x.origin === "ai")) {
      decisions.appendChild(decisionItem(s));
    }
  }

  // accept as stated, edit or remove one AI statement that no box shows
  function decisionItem(s) {
    const li = document.createElement("li");
    li.dataset.index = s.index;
    li.dataset.testid = "sentence-decision";
    const quote = document.createElement("span");
    quote.className = "quote";
    quote.textContent = s.text;
    const state = document.createElement("div");
    state.className = "where";
    state.textContent = s.accepted ? "accepted as stated" : "not localized by the AI: accept, edit or remove it";
    const actions = document.createElement("div");
    actions.className = "actions";
    const accept = document.createElement("button");
    accept.textContent = "Accept as stated";
    accept.className = s.accepted ? "on" : "";
    const input = document.createElement("input");
    input.value = s.text;
    input.setAttribute("aria-label", "Wording of " + s.section + " sentence " + (s.position + 1));
    const edit = document.createElement("button");
    edit.textContent = "Save wording";
    const remove = document.createElement("button");
    remove.textContent = "Remove";
    for (const el of [accept, input, edit, remove]) el.disabled = !doc.editable;
    accept.onclick = () => decide(s, { action: "accept" });
    edit.onclick = () => decide(s, { action: "edit", text: input.value });
    remove.onclick = () => decide(s, { action: "remove" });
    actions.append(accept, input, edit, remove);
    li.append(quote, state, actions);
    li.addEventListener("click", (event) => { if (event.target === quote) selectSentence(s); });
    return li;
  }

  async function decide(s, body) {
    try {
      await api("/api/studies/" + studyId + "/sentences/" + s.index, { ...body, expect: s.text });
      $("sentence-status").textContent = s.section.toUpperCase() + " sentence " + (s.position + 1) + ": "
        + { accept: "accepted as stated", edit: "reworded", remove: "removed" }[body.action];
      await load();
    } catch (err) { $("sentence-status").textContent = "Sentence not saved: " + err.message; }
  }

  function markStale() {
    if (!doc || !doc.grounded) return;
    const dirty = $("report-findings").value !== doc.report.findings
      || $("report-impression").value !== doc.report.impression;
    $("sentences-stale").hidden = !dirty;
    for (const el of $("sentence-decisions").querySelectorAll("button, input")) el.disabled = dirty || !doc.editable;
  }

  function renderImages() {
    const select = $("series-select");
    const options = doc.series.map((series) => {
      const option = document.createElement("option");
      option.value = series.index;
      option.textContent = [series.modality, series.number === null ? "" : "series " + series.number,
        series.description, series.images.length + (series.images.length === 1 ? " image" : " images")]
        .filter(Boolean).join(" · ");
      return option;
    });
    select.replaceChildren(...options);
    select.hidden = doc.series.length < 2;
    $("open-in-viewer").hidden = !doc.viewer_url;
    if (doc.viewer_url) $("open-in-viewer").href = doc.viewer_url;
    if (imageIndex >= doc.images.length) imageIndex = 0;
    showImage();
  }

  function startViewer() {
    if (viewer) return viewer;
    if (!window.RaddraftViewer) {
      viewerError("The image viewer is not built: run scripts/bootstrap.sh (it bundles Cornerstone3D).");
      return null;
    }
    try {
      viewer = new window.RaddraftViewer.StackViewer($("cs-element"));
    } catch (err) {
      viewerError("The image viewer cannot start: " + err.message);
      return null;
    }
    viewer.onRender(rendered);
    new ResizeObserver(() => { viewer.resize(); }).observe($("viewport"));
    $("viewport").dataset.renderer = viewer.renderer();
    return viewer;
  }

  function viewerError(text) {
    $("viewer-error").hidden = !text;
    $("viewer-error").textContent = text;
  }

  // the stack of a series: its metadata from WADO-RS, one image id per slice in the document's slice order
  async function loadSeries(index, slice) {
    const series = doc.series[index];
    const response = await fetch(doc.wado_root + "/series/" + encodeURIComponent(series.series_instance_uid)
      + "/metadata", { credentials: "same-origin", headers: { Accept: "application/dicom+json" } });
    if (response.status === 401) { window.location.href = "/login"; throw new Error("signed out"); }
    if (!response.ok) throw new Error("series metadata: HTTP " + response.status);
    const instances = await response.json();
    const order = series.images.map((i) => [doc.images[i].sop_instance_uid, doc.images[i].frame_number]);
    const ids = viewer.imageIdsFor(doc.wado_root, instances, order);
    stackSeries = index;
    $("series-select").value = index;
    $("slice-slider").max = ids.length - 1;
    await viewer.setStack(ids, slice);
    applyPreset(preset);
  }

  // show doc.images[imageIndex]: its series' stack in the viewer, at its slice
  function showImage() {
    const img = doc.images[imageIndex];
    if (!img || !startViewer()) return;
    const slice = doc.series[img.series].images.indexOf(imageIndex);
    const previous = stackLoading || Promise.resolve();
    stackLoading = previous.then(async () => {
      if (stackSeries !== img.series) await loadSeries(img.series, slice);
      else await viewer.setIndex(slice);
      drawBoxes();  // the findings may have changed (a decision) on the slice already shown
    }).catch((err) => { viewerError("The images cannot be shown: " + err.message); });
  }

  // after each render of the viewport: the slice shown, its window and zoom in the page, the boxes over it
  function rendered() {
    if (stackSeries === null) return;
    const series = doc.series[stackSeries];
    const slice = viewer.index();
    imageIndex = series.images[slice];
    const view = $("viewport");
    const voi = viewer.voiRange();
    view.dataset.image = imageIndex;
    view.dataset.slice = slice;
    view.dataset.series = stackSeries;
    view.dataset.zoom = viewer.zoom().toFixed(4);
    if (voi) {
      view.dataset.voiLower = voi.lower;
      view.dataset.voiUpper = voi.upper;
      $("window-label").textContent = "W " + Math.round(voi.upper - voi.lower) + " L "
        + Math.round((voi.upper + voi.lower) / 2);
    }
    $("slice-slider").value = slice;
    $("slice-label").textContent = "Slice " + (slice + 1) + " / " + series.images.length;
    $("zoom-level").textContent = Math.round(viewer.zoom() * 100) + "%";
    drawBoxes();
  }

  function applyPreset(name) {
    preset = name;
    for (const button of document.querySelectorAll(".preset")) {
      button.classList.toggle("on", button.dataset.preset === name);
    }
    $("viewport").dataset.preset = name;
    if (!viewer || stackSeries === null) return;
    const wl = PRESETS[name];
    viewer.setWindow(wl ? { lower: wl[1] - wl[0] / 2, upper: wl[1] + wl[0] / 2 } : null);
  }

  async function scrollSlices(step) {
    if (!viewer || stackSeries === null) return;
    await stackLoading;
    await viewer.setIndex(viewer.index() + step);
  }

  function box(rect, className, caption) {
    const g = document.createElementNS(SVG, "g");
    g.setAttribute("class", "box " + className);
    // source pixels -> canvas pixels through the viewport's own transform (pan, zoom, flips)
    const a = viewer.imageToCanvas([rect[0], rect[1]]);
    const b = viewer.imageToCanvas([rect[2], rect[3]]);
    const x = Math.min(a[0], b[0]);
    const y = Math.min(a[1], b[1]);
    const r = document.createElementNS(SVG, "rect");
    r.setAttribute("x", x); r.setAttribute("y", y);
    r.setAttribute("width", Math.abs(b[0] - a[0])); r.setAttribute("height", Math.abs(b[1] - a[1]));
    const t = document.createElementNS(SVG, "text");
    t.setAttribute("x", x);
    t.setAttribute("y", Math.max(13, y - 4));
    t.setAttribute("font-size", 13);
    t.textContent = caption;
    g.append(r, t);
    return g;
  }

  function drawBoxes() {
    const svg = $("overlay");
    svg.replaceChildren();
    if (!$("toggle-boxes").checked || !viewer || stackSeries === null) return;
    for (const f of doc.findings) {
      if (f.image !== imageIndex) continue;
      const g = box(f.box, "finding " + f.decision + (f.status ? " " + f.status : ""),
        (f.index + 1) + " " + f.label + (f.decision === "rejected" ? " ✗" : ""));
      g.dataset.index = f.index;
      g.dataset.testid = "box";
      g.addEventListener("click", () => selectFinding(f));
      svg.appendChild(g);
    }
    for (const b of answerBoxes) {
      if (b.image === imageIndex) svg.appendChild(box(b.box, "answer", b.caption));
    }
    if (doc.sentences) highlight();
  }

  // the finding the keys act on: the one selected, else the first on the slice shown
  function currentFinding() {
    if (selected && selected.kind === "finding" && doc.findings[selected.index]) return doc.findings[selected.index];
    return doc.findings.find((f) => f.image === imageIndex) || null;
  }

  function stepFinding(step) {
    const located = doc.findings.filter((f) => f.image !== null);
    if (!located.length) return;
    const current = selected && selected.kind === "finding" ? located.findIndex((f) => f.index === selected.index)
      : -1;
    const next = current < 0 ? (step > 0 ? 0 : located.length - 1)
      : (current + step + located.length) % located.length;
    selectFinding(located[next]);
  }

  function renderFindings() {
    const list = $("findings");
    list.replaceChildren();
    if (doc.findings.length === 0) {
      const li = document.createElement("li");
      li.textContent = "The model localized no finding.";
      list.appendChild(li);
    }
    for (const f of doc.findings) {
      const li = document.createElement("li");
      li.className = f.decision;
      li.dataset.index = f.index;
      li.dataset.testid = "finding";
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = f.label;
      const where = document.createElement("div");
      where.className = "where";
      where.textContent = [f.laterality, f.site, f.decision, f.label !== f.model_label ? "model: " + f.model_label : "",
        f.source === "refer" ? "found by a follow-up question" : "",
        f.status === "grounded" ? "stated in " + f.sentences.length + " sentence(s)" : ""]
        .filter(Boolean).join(" · ");
      const actions = document.createElement("div");
      actions.className = "actions";
      const accept = document.createElement("button");
      accept.textContent = "Accept";
      accept.className = f.decision === "accepted" ? "on" : "";
      accept.dataset.action = "accept";
      const reject = document.createElement("button");
      reject.textContent = "Reject";
      reject.className = f.decision === "rejected" ? "on" : "";
      reject.dataset.action = "reject";
      const input = document.createElement("input");
      input.value = f.label;
      input.setAttribute("aria-label", "Label of finding " + (f.index + 1));
      const rename = document.createElement("button");
      rename.textContent = "Set label";
      rename.dataset.action = "label";
      for (const el of [accept, reject, input, rename]) el.disabled = !doc.editable;
      accept.onclick = () => review(f, "accepted", input.value);
      reject.onclick = () => review(f, "rejected", f.label);
      rename.onclick = () => review(f, f.decision === "pending" ? "accepted" : f.decision, input.value);
      actions.append(accept, reject, input, rename);
      li.append(label);
      if (f.status === "box_only") li.append(flag("localized, not in the text", "box-only"));
      li.append(where, actions);
      if (f.image !== null) {
        const slice = doc.images[f.image];
        const sliceNote = document.createElement("div");
        sliceNote.className = "where slice";
        sliceNote.textContent = "slice " + (doc.series[slice.series].images.indexOf(f.image) + 1)
          + (doc.series.length > 1 ? " of series " + (slice.series + 1) : "");
        li.append(sliceNote);
      }
      // clicking the finding (not its buttons) selects it and shows its slice
      li.addEventListener("click", (event) => { if (!event.target.closest("button, input")) selectFinding(f); });
      list.appendChild(li);
    }
  }

  function renderVersions() {
    const list = $("versions");
    list.replaceChildren();
    $("versions-card").hidden = doc.versions.length === 0;
    for (const v of doc.versions) {
      const li = document.createElement("li");
      li.dataset.testid = "version";
      const head = document.createElement("div");
      head.textContent = "Version " + v.version + " (" + (v.status === "F" ? "final" : "corrected") + ") signed by "
        + v.signed_by + " at " + new Date(v.signed_at).toLocaleString();
      const text = document.createElement("pre");
      text.textContent = "FINDINGS:\n" + v.findings + "\n\nIMPRESSION:\n" + v.impression;
      const sent = document.createElement("div");
      sent.className = "deliveries";
      sent.textContent = v.deliveries.length === 0 ? "No destination configured."
        : v.deliveries.map((d) => (d.kind === "hl7" ? "ORU to " : "SR/GSPS to ") + d.destination + ": " + d.state)
          .join(" · ");
      li.append(head, text, sent);
      list.appendChild(li);
    }
  }

  async function review(f, decision, label) {
    try {
      await api("/api/studies/" + studyId + "/findings/" + f.index, { decision, label });
      await load();
    } catch (err) { $("report-status").textContent = "Finding not saved: " + err.message; }
  }

  function reportText() {
    return { findings: $("report-findings").value, impression: $("report-impression").value };
  }

  $("save-report").onclick = async () => {
    try {
      await api("/api/studies/" + studyId + "/report", reportText());
      $("report-status").textContent = "Draft saved " + new Date().toLocaleTimeString();
      if (doc.grounded) await load();
    } catch (err) { $("report-status").textContent = "Not saved: " + err.message; }
  };

  $("correct-form").onsubmit = async (event) => {
    event.preventDefault();
    try {
      const data = await api("/api/studies/" + studyId + "/correct",
        { ...reportText(), request: $("correct-text").value });
      $("report-findings").value = data.findings;
      $("report-impression").value = data.impression;
      $("correct-status").textContent = "Corrected: " + data.edits.join("; ");
      if (doc.grounded) await load();
    } catch (err) { $("correct-status").textContent = err.message; }
  };

  $("ask-form").onsubmit = async (event) => {
    event.preventDefault();
    const kind = $("ask-kind").value;
    const text = $("ask-text").value;
    $("ask-answer").textContent = "Asking…";
    try {
      const data = await api("/api/studies/" + studyId + "/ask", { image: imageIndex, kind, text });
      answerBoxes = data.boxes.map((b) => ({ box: b, image: data.image, caption: "? " + text }));
      $("ask-answer").textContent = "Model (" + data.instruction + "): " + (data.text || "(no text)")
        + (data.boxes.length ? " · " + data.boxes.length + " box(es) shown in cyan" : "");
      drawBoxes();
    } catch (err) { $("ask-answer").textContent = "No answer: " + err.message; }
  };

  $("sign").onclick = async () => {
    $("sign").disabled = true;
    try {
      const data = await api("/api/studies/" + studyId + "/sign", reportText());
      $("sign-status").textContent = "Signed version " + data.version + " (" + data.status + ")"
        + (data.delivery_errors.length ? " · delivery hand-off failed: " + data.delivery_errors.join("; ") : "");
      await load();
    } catch (err) {
      $("sign-status").textContent = "Not signed: " + err.message;
      $("sign").disabled = false;
    }
  };

  $("amend").onclick = async () => {
    try {
      const data = await api("/api/studies/" + studyId + "/amend", {});
      $("sign-status").textContent = "Amending version " + data.from_version + ": sign again to send a correction";
      await load();
    } catch (err) { $("sign-status").textContent = err.message; }
  };

  $("take-over").onclick = async () => {
    try {
      const data = await api("/api/studies/" + studyId + "/take-over", {});
      $("sign-status").textContent = data.previous ? "Taken over from " + data.previous : "Claimed";
      await load();
    } catch (err) { $("sign-status").textContent = "Not taken over: " + err.message; }
  };

  $("report-findings").addEventListener("input", markStale);
  $("report-impression").addEventListener("input", markStale);

  $("series-select").onchange = () => { goToImage(doc.series[Number($("series-select").value)].images[0]); };
  $("toggle-boxes").onchange = drawBoxes;
  $("zoom-in").onclick = () => { if (viewer) viewer.zoomBy(1.25); };
  $("zoom-out").onclick = () => { if (viewer) viewer.zoomBy(1 / 1.25); };
  $("zoom-fit").onclick = () => { if (viewer) viewer.fit(); };
  for (const button of document.querySelectorAll(".preset")) {
    button.onclick = () => applyPreset(button.dataset.preset);
  }
  $("slice-slider").addEventListener("input", () => {
    if (stackSeries !== null) goToImage(doc.series[stackSeries].images[Number($("slice-slider").value)]);
  });
  document.addEventListener("keydown", (event) => {
    // keys typed into a field (or the slider's own arrows) are theirs; a checkbox or a button does not take them
    const field = event.target.closest("textarea, select, input:not([type=checkbox]):not([type=button])");
    if (field || event.ctrlKey || event.metaKey || event.altKey || !doc) return;
    const keys = {
      ArrowUp: () => scrollSlices(-1), ArrowLeft: () => scrollSlices(-1), ArrowDown: () => scrollSlices(1),
      ArrowRight: () => scrollSlices(1), PageUp: () => scrollSlices(-10), PageDown: () => scrollSlices(10),
      "+": () => viewer && viewer.zoomBy(1.25), "-": () => viewer && viewer.zoomBy(1 / 1.25),
      n: () => stepFinding(1), p: () => stepFinding(-1),
      a: () => { const f = currentFinding(); if (f && doc.editable) review(f, "accepted", f.label); },
      r: () => { const f = currentFinding(); if (f && doc.editable) review(f, "rejected", f.label); },
    };
    const action = keys[event.key];
    if (!action) return;
    event.preventDefault();
    action();
  });

  load().catch((err) => { $("title").textContent = "Cannot load the study: " + err.message; });
})();
