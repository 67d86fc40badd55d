// The smolchat page in a real headless Chromium (Debian's), driven by playwright-core.
// Usage: node chat.mjs BASE_URL XSS_TOKEN XSS_CONVERSATION_ID ARTIFACT_DIR QUEUED_BASE_URL
// (QUEUED_BASE_URL: a server that answers one at a time, so that a second answer waits)
// Prints "N passed, M failed" at the end and exits non-zero on any failure.
import { chromium } from "playwright-core";
import { mkdirSync, readFileSync } from "node:fs";

const [base, xssToken, xssConversation, artifacts, queuedBase] = process.argv.slice(2);
mkdirSync(artifacts, { recursive: true });
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});

let passed = 0, failed = 0;
async function check(name, fn) {
  try {
    await fn();
    passed++;
    console.log(`ok - ${name}`);
  } catch (e) {
    failed++;
    console.log(`FAILED - ${name}: ${e.stack || e}`);
  }
}
function assert(cond, msg) { if (!cond) throw new Error(msg); }
const shot = (page, name) => page.screenshot({ path: `${artifacts}/${name}.png`, fullPage: true });
const lastAnswer = (page) => page.locator("li.msg.assistant .body").last();

async function newUser() {
  const ctx = await browser.newContext({ viewport: { width: 1100, height: 760 } });
  const page = await ctx.newPage();
  page.on("dialog", (d) => d.accept(page.__dialogAnswer ?? undefined));
  await page.goto(base);
  await page.waitForSelector("#status:has-text('connected')");
  return { ctx, page };
}

async function ask(page, text) {
  await page.fill("#input", text);
  await page.press("#input", "Enter");
}

// Records the most messages of `selector` the page ever showed until `stop` is called.
async function watchCount(page, selector) {
  await page.evaluate((sel) => {
    window.__most = document.querySelectorAll(sel).length;
    window.__watch = new MutationObserver(() => {
      window.__most = Math.max(window.__most, document.querySelectorAll(sel).length);
    });
    window.__watch.observe(document.getElementById("messages"), { childList: true, subtree: true });
  }, selector);
  return () => page.evaluate(() => { window.__watch.disconnect(); return window.__most; });
}

const alice = await newUser();
const { page } = alice;

await check("a message streams in and is answered", async () => {
  // A short answer may be done within a few frames: watch for the streaming state rather
  // than hope to catch it.
  const streamed = await watchCount(page, "li.msg.assistant.streaming .body.cursor");
  await page.evaluate(() => {
    window.__keep = new MutationObserver(() => {
      window.__first ??= document.querySelector("li.msg.assistant.streaming");
    });
    window.__keep.observe(document.getElementById("messages"), { childList: true, subtree: true });
  });
  await ask(page, "What is the capital of France?");
  await page.waitForSelector("li.msg.user >> text=What is the capital of France?");
  await page.waitForSelector("li.msg.assistant.complete", { timeout: 60000 });
  assert((await streamed()) === 1, "the answer was shown streaming, with a cursor");
  const same = await page.evaluate(() => {
    window.__keep.disconnect();
    return window.__first?.isConnected && window.__first.classList.contains("complete");
  });
  assert(same, "the answer is finished in the element it streamed into");
  const text = await lastAnswer(page).innerText();
  assert(text.trim().length > 0, "an answer");
  const meta = await page.locator("li.msg.assistant .meta").last().innerText();
  assert(/tokens\/s/.test(meta) && /first token/.test(meta), `speed shown: ${meta}`);
  await page.waitForSelector("#conversations li >> text=What is the capital of France?");
  await shot(page, "02-answered");
});

await check("regenerate makes a second version, and the arrows move between them", async () => {
  const first = await lastAnswer(page).innerText();
  const most = await watchCount(page, "li.msg.assistant");
  await page.locator("li.msg.assistant .meta button:has-text('Regenerate')").last().click();
  await page.waitForSelector("li.msg.assistant .meta >> text=2/2", { timeout: 60000 });
  const shown = await most();
  assert(shown === 1, `the new version replaces the old one on screen (${shown} answers shown at once)`);
  await page.locator("li.msg.assistant .meta button[aria-label='previous version']").last().click();
  await page.waitForSelector("li.msg.assistant .meta >> text=1/2");
  assert((await lastAnswer(page).innerText()) === first, "the first version is back");
  await shot(page, "02b-branches");
});

await check("edit asks again on a new branch, and the old question stays one arrow away", async () => {
  const most = await watchCount(page, "li.msg.user");
  // Cancel puts the question back as it was.
  await page.locator("li.msg.user .meta button:has-text('Edit')").last().click();
  await page.fill("li.msg.user form.editing textarea", "changed my mind");
  await page.click("li.msg.user form.editing button:has-text('Cancel')");
  await page.waitForSelector("li.msg.user .body >> text=What is the capital of France?");
  // A question of two lines is asked again, lines and all.
  await page.locator("li.msg.user .meta button:has-text('Edit')").last().click();
  await page.fill("li.msg.user form.editing textarea", "What is the capital of Italy?\nOne word, please.");
  await page.press("li.msg.user form.editing textarea", "Control+Enter");
  await page.waitForSelector("li.msg.user .meta >> text=2/2", { timeout: 60000 });
  await page.waitForSelector("li.msg.assistant.complete", { timeout: 60000 });
  const shown = await most();
  assert(shown === 1, `the edit replaces the question on screen (${shown} questions shown at once)`);
  const texts = await page.locator("li.msg").allInnerTexts();
  assert(texts.length === 2 && texts[0].includes("Italy"), `one question and its answer: ${texts}`);
  const asked = await page.evaluate(async () => {
    const { messages } = await (await fetch(`/api/conversations/${location.hash.slice(1)}`)).json();
    return messages.find((m) => m.role === "user").content;
  });
  assert(asked === "What is the capital of Italy?\nOne word, please.", `asked with both lines: ${JSON.stringify(asked)}`);
  await page.locator("li.msg.user .meta button[aria-label='previous version']").click();
  await page.waitForSelector("li.msg.user >> text=What is the capital of France?");
  await page.waitForSelector("li.msg.user .meta >> text=1/2");
});

await check("a reload mid-answer shows what was written and goes on", async () => {
  await page.evaluate(() => { document.querySelector("#settings-toggle").click(); });
  await ask(page, "Write a long story about a lighthouse keeper and a storm.");
  await page.waitForFunction(() => {
    const b = [...document.querySelectorAll("li.msg.assistant.streaming .body")].pop();
    return b && b.innerText.length > 40;
  }, null, { timeout: 60000 });
  const before = await lastAnswer(page).innerText();
  await page.reload();
  await page.waitForSelector("li.msg.assistant", { timeout: 30000 });
  const after = await lastAnswer(page).innerText();
  assert(after.length >= before.length - 2, `kept what was written (${after.length} < ${before.length})`);
  await shot(page, "03-after-reload");
  // It goes on in the same element: the text grows in place (a reader's selection survives).
  await page.evaluate(() => { window.__streaming = [...document.querySelectorAll("li.msg.assistant")].pop(); });
  // (A short story may end sooner than 20 more characters: then it must have ended there.)
  await page.waitForFunction((n) => {
    const li = window.__streaming;
    const len = li.querySelector(".body").innerText.length;
    return li.isConnected && (len > n + 20 || (len > n && li.classList.contains("complete")));
  }, before.length, { timeout: 60000 });
});

await check("stop ends the answer", async () => {
  await page.waitForSelector("#stop", { state: "visible" }).catch(() => {});
  if (await page.isVisible("#stop")) {
    await page.click("#stop");
  } else {
    await ask(page, "Write a very long essay about bread.");
    await page.waitForSelector("#stop", { state: "visible" });
    await page.click("#stop");
  }
  await page.waitForSelector("li.msg.assistant .meta >> text=stopped", { timeout: 30000 });
  assert(await page.isHidden("#stop"), "stop button gone");
  await shot(page, "04-stopped");
});

await check("settings: a short answer limit cuts the answer; a bad one is refused and changes nothing", async () => {
  if (await page.isHidden("#settings")) await page.click("#settings-toggle");
  await page.fill("#max-tokens", "4");
  await page.click("#save-settings");
  await page.waitForSelector("#notice >> text=Settings saved.");
  const answers = await page.locator("li.msg.assistant").count();
  await ask(page, "Tell me about the sea.");
  await page.waitForFunction((n) => {
    const all = document.querySelectorAll("li.msg.assistant");
    const last = all[all.length - 1];
    return all.length === n + 1 && last.classList.contains("complete")
      && /cut at the length limit/.test(last.querySelector(".meta").innerText);
  }, answers, { timeout: 60000 });
  await page.fill("#max-tokens", "0");
  await page.click("#save-settings");
  await page.waitForSelector("#notice.error >> text=max_tokens");
  const saved = await page.evaluate(async (id) => (await (await fetch(`/api/conversations/${id}`)).json()).conversation.settings.max_tokens,
    new URL(page.url()).hash.slice(1));
  assert(saved === 4, `the refused value changed nothing (saved: ${saved})`);
  await page.fill("#max-tokens", "512");
  await page.click("#save-settings");
  await page.waitForSelector("#notice >> text=Settings saved.");
  await shot(page, "04b-settings");
});

await check("rename, search and delete work", async () => {
  page.__dialogAnswer = "Paris questions";
  await page.click("#rename");
  await page.waitForSelector("#conversations li >> text=Paris questions");
  page.__dialogAnswer = undefined;
  const [download] = await Promise.all([page.waitForEvent("download"), page.click("#export")]);
  const file = readFileSync(await download.path(), "utf8");
  assert(download.suggestedFilename() === "Paris questions.md", `file name: ${download.suggestedFilename()}`);
  assert(file.startsWith("# Paris questions\n") && /## You\n\n[^]*lighthouse/.test(file)
    && file.includes("## Assistant"), `the export: ${file.slice(0, 300)}`);
  await page.waitForSelector("#status:has-text('connected')"); // the page stayed
  await page.fill("#search", "lighthouse");
  await page.waitForSelector("#search-results li >> text=Paris questions");
  await shot(page, "05-search");
  await page.fill("#search", "");
  await page.dispatchEvent("#search", "input");
  const before = await page.locator("#conversations li").count();
  await page.click("#delete");
  await page.waitForFunction((n) => document.querySelectorAll("#conversations li").length === n - 1, before);
});

await check("another user sees none of the first user's conversations", async () => {
  const bob = await newUser();
  await ask(alice.page, "Remember the word pineapple.");
  await alice.page.waitForSelector("li.msg.assistant.complete", { timeout: 60000 });
  await bob.page.reload();
  await bob.page.waitForSelector("#status:has-text('connected')");
  assert((await bob.page.locator("#conversations li").count()) === 0, "bob's list is empty");
  await bob.page.fill("#search", "pineapple");
  await bob.page.waitForSelector("#search-results >> text=No messages found.");
  await shot(bob.page, "06-other-user");
  await bob.ctx.close();
});

await check("a link signs another browser in as the same user, with its own conversations along", async () => {
  await page.click("#link-device");
  const link = await page.inputValue("#link-url");
  assert(/\/#link=[0-9a-f]{64}$/.test(link), `a link: ${link}`);
  await page.reload();
  await page.waitForSelector("#status:has-text('connected')");
  const theirs = await page.locator("#conversations li").count();
  assert(theirs > 0, "alice has conversations");
  // Carol, on "another device", has one conversation of her own.
  const carol = await newUser();
  await ask(carol.page, "My favourite colour is teal.");
  await carol.page.waitForSelector("li.msg.assistant.complete", { timeout: 60000 });
  const p = await carol.ctx.newPage();
  let asked = "";
  p.on("dialog", (d) => { asked = d.message(); d.accept(); });
  await p.goto(link);
  await p.waitForFunction((n) => document.querySelectorAll("#conversations li").length === n + 1
    && location.hash === "", theirs, { timeout: 30000 });
  assert(/holds 1 conversation of its own/.test(asked), `asked before moving them: ${asked}`);
  await shot(p, "06b-linked");
  await page.reload();
  await page.waitForFunction((n) => document.querySelectorAll("#conversations li").length === n + 1, theirs);
  await page.fill("#search", "teal");
  await page.waitForSelector("#search-results li small >> text=teal");
  await page.fill("#search", "");
  await page.dispatchEvent("#search", "input");
  // Alice signs her other browsers out: the linked page says so and starts afresh.
  await page.click("#sign-out-others");
  await page.waitForSelector("#notice >> text=Signed out 1 other browser.");
  await p.waitForSelector("#notice >> text=signed out from another device", { timeout: 30000 });
  await p.waitForSelector("#status:has-text('connected')");
  assert((await p.locator("#conversations li").count()) === 0, "the signed-out browser holds nothing");
  assert((await page.locator("#conversations li").count()) === theirs + 1, "alice keeps hers");
  // The link worked once.
  const again = await browser.newContext();
  const q = await again.newPage();
  q.on("dialog", (d) => d.accept());
  await q.goto(link);
  await q.waitForSelector("#notice.error >> text=not valid");
  await again.close();
  // A browser with nothing of its own is asked too, and a "no" uses nothing up.
  await page.click("#link-device");
  const fresh = await page.inputValue("#link-url");
  const other = await browser.newContext();
  const r = await other.newPage();
  let answer = false;
  r.on("dialog", (d) => (answer ? d.accept() : d.dismiss()));
  await r.goto(fresh);
  await r.waitForSelector("#notice >> text=the link was not used");
  await r.waitForSelector("#status:has-text('connected')");
  assert((await r.locator("#conversations li").count()) === 0, "not signed in");
  answer = true;
  await r.goto(fresh);
  await r.waitForFunction((n) => document.querySelectorAll("#conversations li").length === n + 1, theirs, { timeout: 30000 });
  await other.close();
  await carol.ctx.close();
});

await check("a dropped connection comes back by itself and the chat goes on", async () => {
  const ctx = await browser.newContext();
  const p = await ctx.newPage();
  const links = []; // every socket the page opened, proxied to the real server
  await p.routeWebSocket(/\/ws$/, (page) => { links.push({ page, server: page.connectToServer() }); });
  await p.goto(base);
  await p.waitForSelector("#status:has-text('connected')");
  await ask(p, "Say hello.");
  await p.waitForSelector("li.msg.assistant.complete", { timeout: 60000 });
  const { page: pageSide, server } = links.at(-1);
  await server.close({ code: 1011, reason: "dropped by the test" });
  await pageSide.close({ code: 1011, reason: "dropped by the test" });
  await p.waitForSelector("#status:has-text('reconnecting')");
  await p.waitForSelector("#status:has-text('connected')", { timeout: 15000 });
  assert(links.length === 2, `one new socket (${links.length})`);
  await ask(p, "Say goodbye.");
  await p.waitForFunction(() => document.querySelectorAll("li.msg.assistant.complete").length === 2,
    null, { timeout: 60000 });
  const questions = await p.locator("li.msg.user").allInnerTexts();
  assert(questions.length === 2 && questions[0].includes("Say hello."), `the conversation went on: ${questions}`);
  await ctx.close();
});

await check("a tab follows version switches made in another tab, even after a refused reopen", async () => {
  const ctx = await browser.newContext();
  const a = await ctx.newPage();
  let spoiled = 0; // the first reopen of tab A asks for a conversation that does not exist
  await a.routeWebSocket(/\/ws$/, (ws) => {
    const server = ws.connectToServer();
    ws.onMessage((m) => {
      const msg = JSON.parse(m);
      if (msg.request_id === "reopen" && spoiled++ === 0) msg.conversation_id = crypto.randomUUID();
      server.send(JSON.stringify(msg));
    });
  });
  await a.goto(base);
  await a.waitForSelector("#status:has-text('connected')");
  await ask(a, "Name a color.");
  await a.waitForSelector("li.msg.assistant.complete", { timeout: 60000 });
  for (const n of [2, 3]) {
    await a.locator("li.msg.assistant .meta button:has-text('Regenerate')").click();
    await a.waitForSelector(`li.msg.assistant.complete .meta >> text=${n}/${n}`, { timeout: 60000 });
  }
  const b = await ctx.newPage();
  await b.goto(`${base}/${new URL(a.url()).hash}`);
  await b.waitForSelector("li.msg.assistant .meta >> text=3/3");
  await b.locator("li.msg.assistant .meta button[aria-label='previous version']").click();
  await b.waitForSelector("li.msg.assistant .meta >> text=2/3");
  await a.waitForFunction(() => document.querySelector("#notice")?.textContent.includes("does not exist"));
  assert(spoiled === 1, `the spoiled reopen was sent (${spoiled})`);
  await b.locator("li.msg.assistant .meta button[aria-label='previous version']").click();
  await b.waitForSelector("li.msg.assistant .meta >> text=1/3");
  await a.waitForSelector("li.msg.assistant .meta >> text=1/3", { timeout: 15000 });
  assert((await lastAnswer(a).innerText()) === (await lastAnswer(b).innerText()), "both tabs show the first version");
  await ctx.close();
});

await check("markdown from the model renders inert: no script, no handler, no javascript: link", async () => {
  const ctx = await browser.newContext();
  await ctx.addCookies([{ name: "smolchat_token", value: xssToken, url: base }]);
  const p = await ctx.newPage();
  let dialogs = 0;
  p.on("dialog", (d) => { dialogs++; d.dismiss(); });
  await p.goto(`${base}/#${xssConversation}`);
  await p.waitForSelector("li.msg.assistant .body >> text=Here is a table");
  await p.waitForTimeout(500);
  const report = await p.evaluate(() => {
    const body = [...document.querySelectorAll("li.msg.assistant .body")].pop();
    return {
      onerror: body.querySelectorAll("[onerror],[onclick],[onload]").length,
      scripts: body.querySelectorAll("script").length,
      jsLinks: [...body.querySelectorAll("a")].filter((a) => (a.getAttribute("href") || "").toLowerCase().startsWith("javascript")).length,
      pwned: window.__pwned === true,
      code: body.querySelectorAll("pre button.copy").length,
      bold: body.querySelectorAll("strong").length,
      reasoning: [...document.querySelectorAll("li.msg.assistant details.reasoning")].map((d) => ({
        open: d.open, summary: d.querySelector("summary").textContent, text: d.textContent,
        elements: d.querySelectorAll("img").length,
      })),
    };
  });
  const [r] = report.reasoning;
  assert(report.reasoning.length === 1 && !r.open && r.summary === "Reasoning",
    `the reasoning folded under its own summary: ${JSON.stringify(report.reasoning)}`);
  assert(r.text.includes("The user wants a table. <img") && r.elements === 0,
    `the reasoning shown as text: ${JSON.stringify(r)}`);
  assert(report.onerror === 0 && report.scripts === 0 && report.jsLinks === 0, JSON.stringify(report));
  assert(!report.pwned && dialogs === 0, "no script ran");
  assert(report.code === 1 && report.bold === 1, `markdown rendered: ${JSON.stringify(report)}`);
  await shot(p, "07-sanitized");
  await ctx.close();
});

await check("copy buttons copy a code block and a whole answer, with or without the clipboard API", async () => {
  const ctx = await browser.newContext();
  await ctx.grantPermissions(["clipboard-read", "clipboard-write"], { origin: base });
  await ctx.addCookies([{ name: "smolchat_token", value: xssToken, url: base }]);
  const p = await ctx.newPage();
  p.on("dialog", (d) => d.dismiss());
  await p.goto(`${base}/#${xssConversation}`);
  await p.waitForSelector("li.msg.assistant .body >> text=Here is a table");
  // A second page of the same browser reads the clipboard (the first may lose its API).
  const reader = await ctx.newPage();
  await reader.goto(`${base}/healthz`);
  const clipboard = () => reader.evaluate(() => navigator.clipboard.readText());
  const answer = p.locator("li.msg.assistant").last();
  const code = await answer.locator("pre code").textContent();
  await answer.locator("pre button.copy").click();
  await answer.locator("pre button.copy:has-text('Copied')").waitFor();
  assert((await clipboard()) === code, `the code block copied: ${JSON.stringify(await clipboard())}`);

  // As on a plain-HTTP LAN address, where the page gets no clipboard API.
  await p.evaluate(() => Object.defineProperty(Navigator.prototype, "clipboard", { get: () => undefined }));
  await reader.evaluate(() => navigator.clipboard.writeText("before"));
  const raw = await p.evaluate(async (id) => {
    const { messages } = await (await fetch(`/api/conversations/${id}`)).json();
    return messages.filter((m) => m.role === "assistant").pop().content;
  }, xssConversation);
  await answer.locator(".meta button:has-text('Copy')").click();
  await answer.locator(".meta button:has-text('Copied')").waitFor();
  const got = await clipboard();
  assert(got === raw && raw.includes("Here is a table"), `the answer's markdown copied without the API: ${JSON.stringify(got)}`);
  await ctx.close();
});

await check("a long conversation list shows the newest hundred, and Show older the rest", async () => {
  const { ctx, page: p } = await newUser();
  await p.evaluate(async () => {
    for (let i = 0; i < 101; i++) {
      const r = await fetch("/api/conversations", {
        method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ title: `chat ${i}` }),
      });
      if (r.status !== 201) throw new Error(`create ${i}: ${r.status}`);
      if (i === 0) await new Promise((done) => setTimeout(done, 20)); // strictly the oldest
    }
  });
  await p.reload();
  await p.waitForSelector("#conversations li[data-id]");
  const shown = () => p.locator("#conversations li[data-id]").allInnerTexts();
  let titles = await shown();
  assert(titles.length === 100 && !titles.includes("chat 0"), `the newest hundred: ${titles.length}`);
  await p.click("#conversations li.more button:has-text('Show older')");
  await p.waitForFunction(() => document.querySelectorAll("#conversations li[data-id]").length === 101);
  titles = await shown();
  assert(titles[100] === "chat 0" && new Set(titles).size === 101, `then the oldest too: ${titles.slice(-2)}`);
  assert((await p.locator("#conversations li.more").count()) === 0, "nothing older to show");
  await ctx.close();
});

await check("an answer that waits for the model says so until it starts", async () => {
  const open = async () => {
    const ctx = await browser.newContext();
    const p = await ctx.newPage();
    await p.goto(queuedBase);
    await p.waitForSelector("#status:has-text('connected')");
    return { ctx, p };
  };
  const [first, second] = [await open(), await open()];
  await second.p.fill("#input", "What is two plus two?");
  await ask(first.p, "Write a very long story about a lighthouse keeper and her cat.");
  await first.p.waitForFunction(() => document.querySelector("li.msg.assistant.streaming .body")?.innerText.length > 0,
    null, { timeout: 30000 });
  await second.p.press("#input", "Enter");
  await second.p.waitForSelector("li.msg.assistant.streaming .body.waiting >> text=yours is next", { timeout: 30000 });
  await shot(second.p, "09-queued");
  if (await first.p.isVisible("#stop")) await first.p.click("#stop"); // else it ended by itself
  await second.p.waitForSelector("li.msg.assistant.complete", { timeout: 60000 });
  const left = await second.p.locator("li.msg.assistant .body.waiting").count();
  assert(left === 0 && (await lastAnswer(second.p).innerText()).trim().length > 0, "the note gave way to the answer");
  await first.ctx.close();
  await second.ctx.close();
});

await check("phone-sized screen and dark mode", async () => {
  const ctx = await browser.newContext({ viewport: { width: 390, height: 800 }, colorScheme: "dark" });
  const p = await ctx.newPage();
  await p.goto(base);
  await p.waitForSelector("#status:has-text('connected')");
  assert(await p.isVisible("#toggle-sidebar"), "menu button on a phone");
  assert(await p.isVisible("#input"), "composer visible");
  await ask(p, "Hello from a phone.");
  await p.waitForSelector("li.msg.assistant.complete", { timeout: 60000 });
  await shot(p, "08-phone-dark");
  // Rename and delete, from the settings panel (the header has no room for them).
  assert(await p.isHidden("#delete"), "no delete button in a phone's header");
  await p.click("#settings-toggle");
  p.on("dialog", (d) => d.accept(d.type() === "prompt" ? "From my phone" : undefined));
  await p.click(".narrow-actions button:has-text('Rename')");
  await p.waitForSelector("#title:has-text('From my phone')");
  const [download] = await Promise.all([p.waitForEvent("download"), p.click(".narrow-actions button:has-text('Export')")]);
  assert(download.suggestedFilename() === "From my phone.md", `exported: ${download.suggestedFilename()}`);
  await p.click(".narrow-actions button:has-text('Delete')");
  await p.waitForFunction(() => document.querySelectorAll("#messages li.msg").length === 0);
  const left = await p.evaluate(async () => (await (await fetch("/api/conversations")).json()).conversations.length);
  assert(left === 0, `deleted (${left} left)`);
  await ctx.close();
});

await browser.close();
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
