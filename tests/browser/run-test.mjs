// Runs the browser scenario against a running outpost node and checks the node's request log.
//
//   node run-test.mjs --homeserver http://127.0.0.1:PORT --log /path/to/node.log
//
// Serves dist/ (built by `vite build`) from its own loopback port, so every client request is
// cross-origin and exercises CORS; drives two tabs (alice, bob) in headless Debian Chromium.
// Exits non-zero if a step fails or if the node answered any request with 5xx, with a 404/405
// other than a spec-legitimate M_NOT_FOUND, or with M_UNRECOGNIZED.
import { createServer } from "node:http";
import { mkdtempSync, readFileSync, rmSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, extname, normalize } from "node:path";
import { parseArgs } from "node:util";
import { chromium } from "playwright-core";

const { values: args } = parseArgs({
  options: {
    homeserver: { type: "string" },
    log: { type: "string" },
    chromium: { type: "string", default: process.env.CHROMIUM || "/usr/bin/chromium" },
  },
});
if (!args.homeserver || !args.log) {
  console.error("usage: node run-test.mjs --homeserver URL --log NODE_LOG");
  process.exit(2);
}
const HERE = new URL(".", import.meta.url).pathname;
const DIST = join(HERE, "dist");

/** 404 M_NOT_FOUND answers that are the spec's way of saying "nothing there" to a client. */
const LEGIT_NOT_FOUND = [
  /^\/_matrix\/client\/v3\/user\/[^/]+\/account_data\/[^/]+$/, // unset account data (e.g. secret storage)
  /^\/_matrix\/client\/v3\/user\/[^/]+\/rooms\/[^/]+\/account_data\/[^/]+$/,
  /^\/_matrix\/client\/v3\/room_keys\/version$/, // no key backup on the server
  /^\/_matrix\/client\/v3\/profile\/[^/]+\/[^/]+$/, // unset profile field
];

function serveDist() {
  const types = { ".html": "text/html", ".js": "text/javascript", ".wasm": "application/wasm", ".css": "text/css" };
  const server = createServer((req, res) => {
    const path = normalize(decodeURIComponent(new URL(req.url, "http://x").pathname)).replace(/^(\.\.[/\\])+/, "");
    const file = join(DIST, path === "/" ? "index.html" : path);
    if (!file.startsWith(DIST) || !existsSync(file)) {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { "Content-Type": types[extname(file)] || "application/octet-stream" });
    res.end(readFileSync(file));
  });
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve(server)));
}

function step(name) {
  console.log(`--- ${name}`);
}

function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
  console.log(`ok: ${what}`);
}

/** Requests from the node's log: `outpost::http` lines with method, path, status, errcode. */
function requestLog(path) {
  const re = /outpost::http: request method=(\S+) path="([^"]*)" status=(\d+)(?: errcode="([^"]*)")?/;
  return readFileSync(path, "utf8")
    .split("\n")
    .map((line) => line.match(re))
    .filter(Boolean)
    .map(([, method, path, status, errcode]) => ({ method, path, status: Number(status), errcode: errcode || "" }));
}

function judge(requests) {
  const bad = [];
  const notable = new Map();
  for (const r of requests) {
    if (r.method === "OPTIONS") continue;
    const shape = r.path.replace(/@[^/]+/g, "{user}").replace(/![^/]+/g, "{room}").replace(/\$[^/]+/g, "{event}");
    if (r.status >= 400) {
      const key = `${r.status} ${r.errcode} ${r.method} ${shape}`;
      notable.set(key, (notable.get(key) || 0) + 1);
    }
    const legit = r.status === 404 && r.errcode === "M_NOT_FOUND" && LEGIT_NOT_FOUND.some((p) => p.test(r.path));
    if (r.status >= 500 || r.errcode === "M_UNRECOGNIZED" || ((r.status === 404 || r.status === 405) && !legit)) {
      bad.push(`${r.status} ${r.errcode} ${r.method} ${shape}`);
    }
  }
  return { bad: [...new Set(bad)], notable };
}

async function main() {
  const web = await serveDist();
  const origin = `http://127.0.0.1:${web.address().port}`;
  const userDataDir = mkdtempSync(join(tmpdir(), "outpost-chromium-"));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: args.chromium,
    headless: true,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  let failed = null;
  try {
    const tab = async (name) => {
      const page = await context.newPage();
      page.on("console", (m) => console.log(`[${name}] ${m.type()}: ${m.text()}`.slice(0, 2000)));
      page.on("pageerror", (e) => console.log(`[${name}] pageerror: ${e.message}`));
      await page.goto(`${origin}/`);
      await page.waitForFunction(() => window.t !== undefined);
      return page;
    };
    const alice = await tab("alice");
    const bob = await tab("bob");
    const hs = args.homeserver;

    step("register + log in both users");
    const a = await alice.evaluate(([hs]) => window.t.login(hs, "alice", "alice-password-1"), [hs]);
    const b = await bob.evaluate(([hs]) => window.t.login(hs, "bob", "bob-password-1"), [hs]);
    check(a.userId.startsWith("@alice:") && b.userId.startsWith("@bob:"), "both users logged in");

    step("media: upload from alice, authenticated download and thumbnail from bob (cross-origin)");
    const up = await alice.evaluate(() => window.t.uploadImage());
    check(up.contentUri.startsWith("mxc://"), `uploaded ${up.contentUri}`);
    const file = await bob.evaluate(([m]) => window.t.fetchMedia(m), [up.contentUri]);
    check(file.status === 200 && file.size === up.size && file.type === "image/png", `download ok (${JSON.stringify(file)})`);
    check(file.dims?.[0] === 300 && file.dims?.[1] === 200, "downloaded image decodes at 300x200");
    const thumb = await bob.evaluate(([m]) => window.t.fetchMedia(m, 96, 96), [up.contentUri]);
    check(thumb.status === 200 && thumb.dims?.[0] === 96 && thumb.dims?.[1] === 96, `thumbnail ok (${JSON.stringify(thumb)})`);

    step("start Rust crypto and sync in both tabs");
    await alice.evaluate(() => window.t.startSync());
    await bob.evaluate(() => window.t.startSync());
    check(true, "both clients synced");

    step("alice creates an encrypted DM with bob; bob accepts");
    const roomId = await alice.evaluate(([u]) => window.t.createEncryptedDm(u), [b.userId]);
    const joined = await bob.evaluate(() => window.t.acceptInvite());
    check(joined.roomId === roomId, "bob joined the DM");
    check(joined.isDirect, "bob's invite is is_direct");
    await alice.evaluate(([r, u]) => window.t.waitMember(r, u, "join"), [roomId, b.userId]);
    check(await alice.evaluate(([r]) => window.t.isEncrypted(r), [roomId]), "alice sees the room encrypted");
    check(await bob.evaluate(([r]) => window.t.isEncrypted(r), [roomId]), "bob sees the room encrypted");

    step("encrypted messages both ways, decrypted in the browser");
    await alice.evaluate(([r]) => window.t.send(r, "hello bob, this is secret"), [roomId]);
    const got = await bob.evaluate(([r]) => window.t.waitMessage(r, "hello bob, this is secret"), [roomId]);
    check(got.encrypted && got.wireType === "m.room.encrypted" && !got.decryptionFailure, `bob decrypted alice's message (${JSON.stringify(got)})`);
    check(got.algorithm === "m.megolm.v1.aes-sha2", "megolm was used");
    await bob.evaluate(([r]) => window.t.send(r, "hi alice, got it"), [roomId]);
    const back = await alice.evaluate(([r]) => window.t.waitMessage(r, "hi alice, got it"), [roomId]);
    check(back.encrypted && !back.decryptionFailure && back.sender === b.userId, `alice decrypted bob's reply (${JSON.stringify(back)})`);

    await alice.evaluate(() => window.t.stop());
    await bob.evaluate(() => window.t.stop());
  } catch (e) {
    failed = e;
    console.error(`FAILED: ${e.stack || e}`);
  } finally {
    await context.close();
    web.close();
    rmSync(userDataDir, { recursive: true, force: true });
  }

  step("node request log");
  const requests = requestLog(args.log);
  const { bad, notable } = judge(requests);
  console.log(`${requests.length} requests logged`);
  for (const [k, n] of notable) console.log(`  ${n}× ${k}`);
  if (requests.length === 0) {
    console.error("no requests in the node log: was it started with RUST_LOG=info,outpost::http=debug?");
    process.exit(1);
  }
  if (bad.length) {
    console.error("requests the node could not serve:");
    for (const b of bad) console.error(`  ${b}`);
  }
  const ok = !failed && bad.length === 0;
  console.log(ok ? "1 passed, 0 failed" : "0 passed, 1 failed");
  process.exit(ok ? 0 : 1);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
