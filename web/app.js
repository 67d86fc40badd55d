// smolchat's page: one module, no build step. It speaks docs/PROTOCOL.md over one WebSocket,
// renders model output as markdown through marked and sanitizes it with DOMPurify (model
// output is untrusted), and survives reloads and reconnects by asking for a snapshot.
import { marked } from "/vendor/marked.esm.js";
import DOMPurify from "/vendor/purify.es.mjs";

const $ = (id) => document.getElementById(id);
// A sign-in link made on another device (#link=CODE) is taken out of the address at once.
function takeLinkCode() {
  if (!location.hash.startsWith("#link=")) return null;
  const code = location.hash.slice(6);
  history.replaceState(null, "", location.pathname + location.search);
  try { return decodeURIComponent(code); } catch { return code; }
}
const linkCode = takeLinkCode();
const LIST_PAGE = 100;
const state = {
  ws: null,
  backoff: 500,
  current: location.hash.slice(1) || null,
  conversation: null,
  messages: [],
  pendingText: null,
  thinkingSince: {},
  siblings: {},
  listed: LIST_PAGE,
};

function status(text) { $("status").textContent = text; }

function notice(text, isError = false) {
  const n = $("notice");
  n.hidden = !text;
  n.textContent = text || "";
  n.classList.toggle("error", isError);
}

// The message of an error response, or its text.
async function errorMessage(r) {
  const text = await r.text();
  try { return JSON.parse(text).message || text; } catch { return text; }
}

function send(msg) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) {
    state.ws.send(JSON.stringify(msg));
    return true;
  }
  notice("Not connected yet — trying again in a moment.", true);
  return false;
}

function connect() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${proto}//${location.host}/ws`);
  state.ws = ws;
  status("connecting…");
  ws.onopen = () => {
    state.backoff = 500;
    state.reopening = false;
    status("connected");
    if (state.current) send({ type: "open", conversation_id: state.current });
  };
  ws.onmessage = (e) => handle(JSON.parse(e.data));
  ws.onclose = (e) => {
    // This browser's login went (signed out from another device, or another tab signed in
    // with a link): a reload takes up the cookie as it is now, and says why.
    if (e.code === 4401) {
      sessionStorage.setItem("smolchat-notice", `This browser's sign-in changed: ${e.reason || "signed out"}.`);
      history.replaceState(null, "", location.pathname);
      return location.reload();
    }
    status("reconnecting…");
    setTimeout(connect, state.backoff);
    state.backoff = Math.min(state.backoff * 2, 10000);
  };
}

const friendly = {
  busy: "The server is busy right now. Try again in a moment.",
  rate_limited: "You are sending messages quickly — wait a few seconds.",
  too_many_generations: "Another answer of yours is still being written; wait for it to finish.",
  already_generating: "An answer is still being written here; stop it or wait.",
  conversations_moving: "Your conversations are moving to your other device's sign-in; try again in a moment.",
  message_too_long: "That message is too long.",
  not_found: "This conversation does not exist (any more).",
  too_many_conversations: "You have as many conversations as this server keeps per person: delete one to start another.",
  too_many_new_users: "Too many new people have started chatting from your network this hour. Try again later.",
};

function handle(ev) {
  const mine = ev.conversation_id === undefined || ev.conversation_id === state.current;
  switch (ev.type) {
    case "conversation_created":
      openConversation(ev.conversation.id);
      refreshList();
      break;
    case "snapshot":
      if (ev.conversation.id !== state.current) break;
      state.reopening = false;
      state.conversation = ev.conversation;
      state.messages = ev.messages;
      state.siblings = ev.siblings || {};
      if (ev.streaming) {
        const m = state.messages.find((x) => x.id === ev.streaming.message_id);
        if (m) Object.assign(m, { content: ev.streaming.content, reasoning: ev.streaming.reasoning, status: "streaming", ahead: ev.streaming.ahead });
      }
      $("title").textContent = ev.conversation.title || "New chat";
      fillSettings();
      renderAll();
      if (state.pendingText) {
        const content = state.pendingText;
        state.pendingText = null;
        send({ type: "send", conversation_id: state.current, content });
      }
      break;
    case "user_message":
    case "message_started": {
      if (!mine) break;
      const m = ev.message;
      // A new message hangs under its parent: whatever was shown below the parent belongs to
      // another version now (a regenerate or an edit), so the shown branch ends at the parent.
      const at = m.parent_id ? state.messages.findIndex((x) => x.id === m.parent_id) : -1;
      if (m.parent_id && at < 0) {
        reopen(); // out of step: start afresh
        break;
      }
      state.messages.splice(at + 1, Infinity, m);
      if (ev.siblings.length > 1) state.siblings[m.id] = ev.siblings;
      if (ev.type === "message_started") state.thinkingSince[m.id] = Date.now();
      notice("");
      renderAll();
      break;
    }
    case "queued": {
      if (!mine) break;
      const m = state.messages.find((x) => x.id === ev.message_id);
      if (!m || m.content || m.reasoning) break;
      m.ahead = ev.ahead;
      schedulePatch(m.id);
      break;
    }
    case "delta": {
      if (!mine) break;
      const m = state.messages.find((x) => x.id === ev.message_id);
      if (!m) break;
      delete m.ahead;
      if (ev.channel === "reasoning") m.reasoning += ev.text;
      else {
        if (!m.content && m.reasoning) m.thoughtSeconds = secondsSince(m.id);
        m.content += ev.text;
      }
      schedulePatch(m.id);
      break;
    }
    case "message_done": {
      if (!mine) break;
      refreshList();
      const i = state.messages.findIndex((x) => x.id === ev.message.id);
      if (i < 0) break;
      const m = (state.messages[i] = { ...ev.message, thoughtSeconds: state.messages[i].thoughtSeconds });
      // Finished in place, like the streaming: an opened reasoning block or a selection stays.
      const li = messageNode(m.id);
      if (li) keepingScroll(() => {
        li.classList.remove("streaming");
        li.classList.add(m.status);
        patchStreaming(li, m);
        const meta = li.querySelector(".meta");
        if (meta) meta.replaceWith(metaElement(m));
        else li.append(metaElement(m));
      });
      showControls();
      break;
    }
    case "branch_changed":
      if (mine) reopen();
      break;
    case "busy":
      if (mine) notice(`The server is busy: ${ev.queue_len} ahead of you. Try again in a moment.`, true);
      break;
    case "notice":
      if (mine) notice(ev.text);
      break;
    case "renamed":
      if (ev.conversation.id === state.current) $("title").textContent = ev.conversation.title;
      refreshList();
      break;
    case "deleted":
      if (ev.conversation_id === state.current) openConversation(null);
      refreshList();
      break;
    case "error":
      if (ev.code === "subscription_ended" && ev.conversation_id === state.current) {
        reopen();
        break;
      }
      // A refused reopen (its error names no conversation, only the request) may be retried.
      if (ev.request_id === "reopen" || ev.conversation_id === state.current) state.reopening = false;
      if (mine) notice(friendly[ev.code] || ev.message, true);
      break;
  }
}

// Asks for a fresh snapshot of the open conversation, once until it comes.
function reopen() {
  if (!state.reopening && send({ type: "open", conversation_id: state.current, request_id: "reopen" }))
    state.reopening = true;
}

function secondsSince(id) {
  const t = state.thinkingSince[id];
  return t ? Math.max(1, Math.round((Date.now() - t) / 1000)) : undefined;
}

function renderAll() {
  const list = $("messages");
  list.replaceChildren(...state.messages.map(messageElement));
  showControls();
  list.scrollTop = list.scrollHeight;
}

function showControls() {
  const generating = state.messages.some((m) => m.status === "streaming");
  $("stop").hidden = !generating;
  $("send").hidden = generating;
}

// Keeps the newest text in view unless the reader has scrolled up.
function keepingScroll(change) {
  const list = $("messages");
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  change();
  if (atBottom) list.scrollTop = list.scrollHeight;
}

function messageNode(id) { return $("messages").querySelector(`li.msg[data-id="${id}"]`); }

// Deltas arrive faster than a screen refreshes: the streaming message is redrawn at most once
// a frame, in place (its element stays, so a selection or an opened reasoning block stays too).
const patches = new Set();
function schedulePatch(id) {
  if (!patches.size) requestAnimationFrame(flushPatches);
  patches.add(id);
}
function flushPatches() {
  const ids = [...patches];
  patches.clear();
  for (const id of ids) {
    const m = state.messages.find((x) => x.id === id);
    const li = messageNode(id);
    if (m && li) keepingScroll(() => patchStreaming(li, m));
  }
}
function patchStreaming(li, m) {
  if (m.reasoning) {
    const d = li.querySelector("details.reasoning");
    if (d) fillReasoning(d, m);
    else li.prepend(reasoningElement(m));
  }
  li.querySelector(".body").replaceWith(bodyElement(m));
}

function markdown(text) {
  const html = DOMPurify.sanitize(marked.parse(text), { USE_PROFILES: { html: true } });
  const div = document.createElement("div");
  div.innerHTML = html;
  for (const pre of div.querySelectorAll("pre")) {
    const code = pre.querySelector("code") || pre;
    const b = copyButton(() => code.textContent);
    b.className = "copy";
    pre.append(b);
  }
  for (const a of div.querySelectorAll("a")) {
    a.target = "_blank";
    a.rel = "noopener noreferrer";
  }
  return div;
}

function messageElement(m) {
  const li = document.createElement("li");
  li.className = `msg ${m.role} ${m.status}`;
  li.dataset.id = m.id;
  if (m.role === "assistant" && m.reasoning) li.append(reasoningElement(m));
  li.append(bodyElement(m), metaElement(m));
  return li;
}

// Versions, figures and actions under a message.
function metaElement(m) {
  const streaming = m.status === "streaming";
  const meta = document.createElement("div");
  meta.className = "meta";
  const sibs = state.siblings[m.id];
  if (sibs && !streaming) {
    const i = sibs.indexOf(m.id);
    const go = (j) => () => send({ type: "select_branch", conversation_id: state.current, message_id: sibs[j] });
    const nav = document.createElement("span");
    nav.className = "branches";
    const prev = button("‹", go(i - 1));
    prev.disabled = i <= 0;
    prev.setAttribute("aria-label", "previous version");
    const next = button("›", go(i + 1));
    next.disabled = i >= sibs.length - 1;
    next.setAttribute("aria-label", "next version");
    nav.append(prev, span(`${i + 1}/${sibs.length}`), next);
    meta.append(nav);
  }
  if (m.role === "assistant" && !streaming) {
    if (m.tokens_per_second) meta.append(span(`${m.tokens_per_second.toFixed(1)} tokens/s`));
    if (m.ttft_ms) meta.append(span(`first token ${Math.round(m.ttft_ms)} ms`));
    if (m.finish_reason === "stopped") meta.append(span("stopped"));
    if (m.finish_reason === "length") meta.append(span("cut at the length limit"));
    if (m.status === "interrupted") meta.append(span("interrupted (the server restarted)"));
    if (m.status === "error") meta.append(span(m.error || "failed"));
    meta.append(copyButton(() => m.content, "Copy the answer's markdown"));
    meta.append(button("Regenerate", () => send({ type: "regenerate", conversation_id: state.current, message_id: m.id })));
  }
  if (m.role === "user") {
    meta.append(copyButton(() => m.content, "Copy your message"));
    meta.append(button("Edit", () => editInPlace(m)));
  }
  return meta;
}

// Edits a question where it stands, lines and all: Send (or Ctrl+Enter) asks it again on a
// new branch, Cancel (or Escape) puts the message back as it was.
function editInPlace(m) {
  const li = messageNode(m.id);
  const body = li?.querySelector(".body");
  if (!body) return;
  const form = document.createElement("form");
  form.className = "editing";
  const area = document.createElement("textarea");
  area.value = m.content;
  area.rows = Math.min(12, m.content.split("\n").length + 1);
  area.setAttribute("aria-label", "Edit your message");
  const cancel = () => form.replaceWith(bodyElement(m));
  const undo = button("Cancel", cancel);
  undo.type = "button";
  const save = document.createElement("button");
  save.textContent = "Send";
  form.append(area, save, undo);
  form.onsubmit = (e) => {
    e.preventDefault();
    const content = area.value;
    if (!content.trim() || save.disabled) return;
    if (content === m.content) return cancel();
    // The server's user_message redraws the conversation on the new branch.
    if (send({ type: "edit", conversation_id: state.current, message_id: m.id, content })) {
      save.disabled = true; // once; a refusal (a notice) lets it be sent again in a moment
      setTimeout(() => (save.disabled = false), 3000);
    }
  };
  area.onkeydown = (e) => {
    if (e.isComposing) return;
    if (e.key === "Escape") cancel();
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      form.requestSubmit();
    }
  };
  body.replaceWith(form);
  area.focus();
}

function bodyElement(m) {
  const body = document.createElement("div");
  body.className = "body";
  if (m.role === "user") body.textContent = m.content;
  else if (m.status === "streaming" && m.ahead !== undefined) {
    body.append(span(m.ahead ? `Waiting for the model: ${m.ahead} ${m.ahead === 1 ? "answer" : "answers"} ahead of yours…`
      : "Waiting for the model: yours is next…"));
    body.classList.add("waiting");
  } else body.append(markdown(m.content));
  if (m.status === "streaming") body.classList.add("cursor");
  return body;
}

// The model's thinking, open while it thinks and folded once the answer begins (unless the
// reader opened or closed it meanwhile).
function reasoningElement(m) {
  const d = document.createElement("details");
  d.className = "reasoning";
  d.append(document.createElement("summary"), document.createTextNode(""));
  d.ontoggle = () => { if (d.open !== (d.dataset.want === "open")) d.dataset.touched = "1"; };
  setOpen(d, m.status === "streaming" && !m.content);
  fillReasoning(d, m);
  return d;
}
function setOpen(d, open) {
  d.dataset.want = open ? "open" : "closed";
  d.open = open;
}
function fillReasoning(d, m) {
  const thinking = m.status === "streaming" && !m.content;
  d.firstChild.textContent = thinking ? "Thinking…"
    : m.thoughtSeconds ? `Thought for ${m.thoughtSeconds} s` : "Reasoning";
  d.lastChild.textContent = m.reasoning;
  if (!thinking && d.dataset.want === "open" && !d.dataset.touched) setOpen(d, false);
}

// Copies text: through the clipboard API where the page has it (HTTPS, or localhost), else
// through a selected, unseen text area and the older copy command (a server on a LAN address
// over plain HTTP gets no clipboard API).
async function copyText(text) {
  if (window.isSecureContext && navigator.clipboard) {
    try { await navigator.clipboard.writeText(text); return true; } catch {}
  }
  const focused = document.activeElement;
  const area = document.createElement("textarea");
  area.value = text;
  area.readOnly = true;
  area.style.cssText = "position:fixed;top:0;left:0;opacity:0";
  document.body.append(area);
  area.select();
  area.setSelectionRange(0, text.length); // iOS selects nothing with select() alone
  let copied = false;
  try { copied = document.execCommand("copy"); } catch {}
  area.remove();
  focused?.focus?.();
  return copied;
}
function copyButton(text, title = "Copy") {
  const b = button("Copy", async () => {
    b.textContent = (await copyText(text())) ? "Copied" : "Copy failed: select it by hand";
    setTimeout(() => (b.textContent = "Copy"), 2000);
  });
  b.title = title;
  return b;
}
function span(text) { const s = document.createElement("span"); s.textContent = text; return s; }
function button(text, onclick) { const b = document.createElement("button"); b.textContent = text; b.onclick = onclick; return b; }

// The newest conversations, as many as shown so far: "Show older" adds a page of them.
// Only the newest request's answer is shown (an older one may come back later).
let listRequests = 0;
async function refreshList() {
  const request = ++listRequests;
  const r = await fetch(`/api/conversations?limit=${state.listed}`);
  if (request !== listRequests) return;
  if (!r.ok) return notice(`The conversation list did not load: ${await errorMessage(r)}`, true);
  const { conversations, next } = await r.json();
  if (request !== listRequests) return;
  const current = conversations.find((c) => c.id === state.current);
  if (current) $("title").textContent = current.title || "New chat";
  const items = conversations.map((c) => {
    const li = document.createElement("li");
    li.textContent = c.title || "New chat";
    li.dataset.id = c.id;
    if (c.id === state.current) li.classList.add("active");
    li.onclick = () => openConversation(c.id);
    return li;
  });
  if (next) {
    const more = button("Show older", () => { state.listed += LIST_PAGE; refreshList(); });
    more.className = "more";
    const li = document.createElement("li");
    li.className = "more";
    li.append(more);
    items.push(li);
  }
  $("conversations").replaceChildren(...items);
}

function openConversation(id) {
  if (state.current && state.current !== id) send({ type: "close", conversation_id: state.current });
  state.current = id;
  state.messages = [];
  state.reopening = false;
  history.replaceState(null, "", id ? `#${id}` : "#");
  notice("");
  document.body.classList.remove("show-sidebar");
  $("title").textContent = id ? "…" : "smolchat";
  renderAll();
  if (id) send({ type: "open", conversation_id: id });
  for (const li of $("conversations").children) li.classList.toggle("active", li.dataset.id === id);
}

function fillSettings() {
  const c = state.conversation;
  $("system-prompt").value = c.system_prompt;
  $("temperature").value = c.settings.temperature;
  $("top-p").value = c.settings.top_p;
  $("max-tokens").value = c.settings.max_tokens;
  $("reasoning").checked = c.reasoning;
}

$("composer").onsubmit = (e) => {
  e.preventDefault();
  const content = $("input").value;
  if (!content.trim()) return;
  if (!state.current) {
    state.pendingText = content;
    send({ type: "create" });
  } else if (!send({ type: "send", conversation_id: state.current, content })) {
    return;
  }
  $("input").value = "";
};
$("input").onkeydown = (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
};
$("stop").onclick = () => send({ type: "stop", conversation_id: state.current });
$("new-chat").onclick = () => send({ type: "create" });
$("rename").onclick = () => {
  if (!state.current) return;
  const title = prompt("New title", $("title").textContent);
  if (title && title.trim()) send({ type: "rename", conversation_id: state.current, title: title.trim() });
};
// Fetched first, so that a refusal is a notice rather than a page of JSON.
$("export").onclick = async () => {
  if (!state.current) return;
  const r = await fetch(`/api/conversations/${state.current}/export`);
  if (!r.ok) return notice(await errorMessage(r), true);
  const disposition = r.headers.get("content-disposition") || "";
  const utf8 = /filename\*=UTF-8''([^;]+)/.exec(disposition)?.[1];
  let name = /filename="([^"]+)"/.exec(disposition)?.[1] || "conversation.md";
  try { if (utf8) name = decodeURIComponent(utf8); } catch {}
  const a = document.createElement("a");
  a.href = URL.createObjectURL(await r.blob());
  a.download = name;
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
};
$("delete").onclick = () => {
  if (state.current && confirm("Delete this conversation? This cannot be undone.")) {
    send({ type: "delete", conversation_id: state.current });
  }
};
// On a phone the header has no room: the settings panel carries the same buttons.
for (const b of document.querySelectorAll("[data-for]")) b.onclick = () => $(b.dataset.for).click();
$("settings-toggle").onclick = () => { $("settings").hidden = !$("settings").hidden; };
$("toggle-sidebar").onclick = () => document.body.classList.toggle("show-sidebar");
$("save-settings").onclick = async () => {
  if (!state.current) return;
  const old = state.conversation.settings;
  // An empty field keeps what is saved (Number("") would be 0).
  const num = (id, was) => ($(id).value.trim() === "" ? was : Number($(id).value));
  const settings = {
    ...old,
    temperature: num("temperature", old.temperature),
    top_p: num("top-p", old.top_p),
    max_tokens: num("max-tokens", old.max_tokens),
  };
  const r = await fetch(`/api/conversations/${state.current}`, {
    method: "PATCH",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ system_prompt: $("system-prompt").value, settings, reasoning: $("reasoning").checked }),
  });
  if (r.ok) {
    state.conversation = await r.json();
    notice("Settings saved.");
  } else {
    notice(await errorMessage(r), true); // the fields keep what was typed, to be corrected
  }
};
let searchTimer;
$("search").oninput = () => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(async () => {
    const q = $("search").value.trim();
    const results = $("search-results");
    results.hidden = !q;
    $("conversations").hidden = !!q;
    if (!q) return;
    const r = await fetch(`/api/conversations?q=${encodeURIComponent(q)}`);
    const { results: hits } = await r.json();
    results.replaceChildren(...hits.map((h) => {
      const li = document.createElement("li");
      li.textContent = h.title || "New chat";
      const small = document.createElement("small");
      small.textContent = h.snippet;
      li.append(small);
      li.onclick = () => { $("search").value = ""; $("search").oninput(); openConversation(h.conversation_id); };
      return li;
    }));
    if (!hits.length) results.replaceChildren(span("No messages found."));
  }, 250);
};

$("link-device").onclick = async () => {
  document.body.classList.remove("show-sidebar");
  const r = await fetch("/api/link", { method: "POST" });
  if (!r.ok) return notice(await errorMessage(r), true);
  const { code, expires_in_s } = await r.json();
  notice(`Open this link on your other device within ${Math.round(expires_in_s / 60)} minutes (it works once). `
    + "Whoever opens it is signed in as you, so keep it to yourself.");
  const link = document.createElement("input");
  link.id = "link-url";
  link.readOnly = true;
  link.value = `${location.origin}/#link=${encodeURIComponent(code)}`;
  const copy = copyButton(() => link.value);
  $("notice").append(document.createElement("br"), link, copy);
  link.select();
};

// Signs this browser in with a link from another device, once its user says so (a link
// someone else made would put what they type next into that someone's hands). A browser with
// conversations of its own is asked again whether they go along (they would be hidden).
async function redeemLink(code) {
  if (!confirm("Sign this browser in as the account that made this link?\n\n"
    + "Only go on with a link you made yourself on your other device: whoever made it will see "
    + "everything you write here.")) {
    return notice("Not signed in: the link was not used.");
  }
  const post = (merge) => fetch("/api/link/redeem", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ code, merge }),
  });
  try {
    let r = await post(false);
    if (r.status === 409) {
      const body = await r.clone().json().catch(() => ({}));
      if (body.code === "would_hide_conversations") {
        if (!confirm(`${body.message[0].toUpperCase()}${body.message.slice(1)}.\n\n`
          + "Move them to the account that made the link? Other browsers signed in as this one "
          + "stay signed in, but without them.")) {
          return notice("Not signed in: this browser keeps its own conversations.");
        }
        r = await post(true);
      }
    }
    if (r.ok) return location.replace("/");
    notice(await errorMessage(r), true);
  } catch (e) {
    notice(`Could not sign in: ${e.message}`, true);
  }
}

// A link pasted into the address bar of a page already open.
window.addEventListener("hashchange", () => {
  const code = takeLinkCode();
  if (code) redeemLink(code);
});

$("sign-out-others").onclick = async () => {
  if (!confirm("Sign out every other browser and program that uses your conversations? They start afresh, without them.")) return;
  const r = await fetch("/api/logins/sign-out-others", { method: "POST" });
  if (!r.ok) return notice(await errorMessage(r), true);
  const { signed_out } = await r.json();
  notice(signed_out ? `Signed out ${signed_out} other ${signed_out === 1 ? "browser" : "browsers"}.` : "No other browser was signed in.");
};

const told = sessionStorage.getItem("smolchat-notice");
if (told) {
  sessionStorage.removeItem("smolchat-notice");
  notice(told);
}
if (linkCode) await redeemLink(linkCode);
refreshList();
connect();
