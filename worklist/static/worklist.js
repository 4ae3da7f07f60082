"use strict";
// Worklist: fetches /api/studies with the filters, one page at a time, renders the table, polls for new drafts.
(() => {
  const table = document.getElementById("worklist");
  const body = table.querySelector("tbody");
  const refreshMs = Number(table.dataset.refreshMs) || 5000;
  const statusLine = document.getElementById("refresh-status");
  const filters = {
    state: document.getElementById("f-state"),
    modality: document.getElementById("f-modality"),
    priority: document.getElementById("f-priority"),
    accession: document.getElementById("f-accession"),
  };
  let sort = "priority";
  let order = "asc";
  let known = null; // ids seen in the previous refresh, to highlight new rows
  let offset = 0; // the first entry of the page shown (the API gives pages: limit, offset, has_more)
  let pageSize = 0;

  function query() {
    const params = new URLSearchParams();
    const state = filters.state.value;
    if (state === "") { params.append("state", "draft ready"); params.append("state", "in review"); }
    else if (state !== "all") { params.append("state", state); }
    for (const key of ["modality", "priority", "accession"]) {
      if (filters[key].value.trim()) params.set(key, filters[key].value.trim());
    }
    params.set("sort", sort);
    params.set("order", order);
    if (offset) params.set("offset", offset);
    return params.toString();
  }

  function cell(text, className) {
    const td = document.createElement("td");
    if (className) {
      const pill = document.createElement("span");
      pill.className = "pill " + className;
      pill.textContent = text;
      td.appendChild(pill);
    } else {
      td.textContent = text;
    }
    return td;
  }

  function render(studies) {
    const ids = new Set(studies.map((s) => s.id));
    body.replaceChildren();
    for (const s of studies) {
      const tr = document.createElement("tr");
      tr.dataset.id = s.id;
      tr.dataset.testid = "study-row";
      if (known && !known.has(s.id)) tr.classList.add("new");
      tr.appendChild(cell(s.priority, s.priority));
      const state = cell(s.claimed_by ? s.state + " by " + s.claimed_by : s.state, "s-" + s.state.replace(" ", "-"));
      const ai = s.ai_disagreement;
      if (ai && (ai.text_only || ai.box_only)) {  // the AI draft's text and boxes disagree: say so on the row
        const flag = document.createElement("span");
        flag.className = "pill disagree";
        flag.dataset.testid = "ai-disagreement";
        flag.textContent = "AI text/boxes disagree";
        flag.title = ai.text_only + " statement(s) without image evidence, " + ai.box_only + " box(es) not in the text";
        state.append(" ", flag);
      }
      tr.appendChild(state);
      tr.appendChild(cell(s.modality));
      tr.appendChild(cell(s.accession));
      tr.appendChild(cell(s.description || ""));
      tr.appendChild(cell(s.age_years === null ? "" : s.age_years + " y"));
      tr.appendChild(cell(new Date(s.received_at).toLocaleString()));
      if (s.viewer_url) {  // the hospital's own viewer (RADDRAFT_VIEWER_URL_TEMPLATE)
        const td = document.createElement("td");
        const link = document.createElement("a");
        link.href = s.viewer_url;
        link.target = "_blank";
        link.rel = "noopener noreferrer";
        link.dataset.testid = "open-in-viewer";
        link.textContent = "Open in viewer";
        link.addEventListener("click", (event) => event.stopPropagation());
        td.appendChild(link);
        tr.appendChild(td);
      }
      tr.addEventListener("click", () => { window.location.href = "/studies/" + s.id; });
      body.appendChild(tr);
    }
    known = ids;
    document.getElementById("empty").hidden = studies.length > 0;
    for (const th of table.querySelectorAll("th[data-sort]")) {
      th.classList.toggle("sorted-asc", th.dataset.sort === sort && order === "asc");
      th.classList.toggle("sorted-desc", th.dataset.sort === sort && order === "desc");
    }
  }

  async function refresh() {
    try {
      const response = await fetch("/api/studies?" + query(), { credentials: "same-origin" });
      if (response.status === 401) { window.location.href = "/login"; return; }
      const data = await response.json();
      if (!response.ok) { statusLine.textContent = data.error || "refresh failed"; return; }
      render(data.studies);
      pageSize = data.limit;
      const pager = document.getElementById("pager");
      pager.hidden = !(data.has_more || offset > 0);
      document.getElementById("page-prev").disabled = offset === 0;
      document.getElementById("page-next").disabled = !data.has_more;
      document.getElementById("page-info").textContent = data.studies.length
        ? "entries " + (offset + 1) + "–" + (offset + data.studies.length) : "no entries on this page";
      statusLine.textContent = "updated " + new Date().toLocaleTimeString() + " · " + data.studies.length + " studies"
        + (data.has_more || offset > 0 ? " on this page" : "");
    } catch (err) {
      statusLine.textContent = "refresh failed: " + err;
    }
  }

  document.getElementById("page-prev").addEventListener("click", () => {
    offset = Math.max(0, offset - pageSize); refresh();
  });
  document.getElementById("page-next").addEventListener("click", () => { offset += pageSize; refresh(); });
  for (const th of table.querySelectorAll("th[data-sort]")) {
    th.addEventListener("click", () => {
      offset = 0;
      if (sort === th.dataset.sort) order = order === "asc" ? "desc" : "asc";
      else { sort = th.dataset.sort; order = "asc"; }
      refresh();
    });
  }
  for (const input of Object.values(filters)) {
    input.addEventListener(input.tagName === "SELECT" ? "change" : "input", () => { offset = 0; refresh(); });
  }
  refresh();
  setInterval(refresh, refreshMs);
})();
