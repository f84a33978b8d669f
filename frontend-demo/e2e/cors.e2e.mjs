// Browser check of CORS_ALLOWED_ORIGINS: a page served from another origin
// (a tiny static server here, on its own port) calls shopgraph's /graphql
// with fetch, as a storefront on another domain would.
//
//   SHOPGRAPH_URL=http://127.0.0.1:41234 CORS_ALLOWED_PORT=41300 node e2e/cors.e2e.mjs
//
// The server must run with CORS_ALLOWED_ORIGINS=http://127.0.0.1:$CORS_ALLOWED_PORT.
// The page from that origin gets the catalog (a POST with content-type and
// authorization headers, so Chromium sends a preflight first, and a GET);
// the same page from another port is blocked by Chromium. Uses playwright-core
// with the system Chromium (CHROMIUM_PATH, default /usr/bin/chromium).
// Prints "N passed, M failed" and exits non-zero on failure.
import { chromium } from 'playwright-core';
import { createServer } from 'node:http';

const BASE = (process.env.SHOPGRAPH_URL ?? '').replace(/\/+$/, '');
const ALLOWED_PORT = Number(process.env.CORS_ALLOWED_PORT ?? 0);
const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';
const T = 15_000;

if (!BASE || !ALLOWED_PORT) {
  console.error('Set SHOPGRAPH_URL and CORS_ALLOWED_PORT (the server allows http://127.0.0.1:$CORS_ALLOWED_PORT).');
  console.log('0 passed, 1 failed');
  process.exit(2);
}

const PAGE = `<!doctype html><meta charset="utf-8"><title>other-origin storefront</title>
<p id="out">loading</p>`;

/** A static server for the storefront page; resolves once listening. */
function serve(port) {
  const server = createServer((req, res) => {
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
    res.end(PAGE);
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', () => resolve(server));
  });
}

/** Runs in the page: the catalog over POST (preflighted) and GET; returns what happened. */
async function callShopgraph(base) {
  const query = '{ products(first: 5) { nodes { id sku } } }';
  const outcome = {};
  try {
    const res = await fetch(`${base}/graphql`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: 'Bearer ' },
      body: JSON.stringify({ query }),
    });
    const body = await res.json();
    outcome.post = { status: res.status, ok: Array.isArray(body?.data?.products?.nodes) || body?.errors?.[0]?.extensions?.code };
  } catch (e) {
    outcome.post = { blocked: String(e) };
  }
  try {
    const res = await fetch(`${base}/graphql?query=${encodeURIComponent(query)}`);
    const body = await res.json();
    outcome.get = { status: res.status, ok: Array.isArray(body?.data?.products?.nodes), cache: res.headers.get('cache-control') };
  } catch (e) {
    outcome.get = { blocked: String(e) };
  }
  return outcome;
}

const tests = [];
const test = (name, fn) => tests.push({ name, fn });
const assert = (cond, msg) => {
  if (!cond) throw new Error(msg);
};

let browser;
let allowedServer;
let otherServer;
const preflights = [];

test('a page on the allowed origin reads the catalog (preflighted POST and GET)', async () => {
  const page = await browser.newPage();
  page.on('request', (r) => r.method() === 'OPTIONS' && preflights.push(r.url()));
  await page.goto(`http://127.0.0.1:${ALLOWED_PORT}/`, { timeout: T });
  const outcome = await page.evaluate(callShopgraph, BASE);
  // An empty bearer is refused with UNAUTHENTICATED: readable means CORS let it through.
  assert(outcome.post?.ok && !outcome.post.blocked, `POST from the allowed origin: ${JSON.stringify(outcome.post)}`);
  assert(outcome.get?.ok, `GET from the allowed origin: ${JSON.stringify(outcome.get)}`);
  await page.close();
});

test('the same page on another origin is blocked by the browser', async () => {
  const page = await browser.newPage();
  const consoleLines = [];
  page.on('console', (m) => consoleLines.push(m.text()));
  await page.goto(`http://127.0.0.1:${otherServer.address().port}/`, { timeout: T });
  const outcome = await page.evaluate(callShopgraph, BASE);
  assert(outcome.post?.blocked, `POST from a disallowed origin was not blocked: ${JSON.stringify(outcome.post)}`);
  assert(outcome.get?.blocked, `GET from a disallowed origin was not blocked: ${JSON.stringify(outcome.get)}`);
  assert(
    consoleLines.some((l) => /Access-Control-Allow-Origin|CORS/i.test(l)),
    `Chromium did not say it was CORS: ${consoleLines.join(' | ')}`,
  );
  await page.close();
});

let passed = 0;
let failed = 0;
try {
  allowedServer = await serve(ALLOWED_PORT);
  otherServer = await serve(0);
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--no-first-run'],
  });
  for (const { name, fn } of tests) {
    try {
      await fn();
      passed++;
      console.log(`ok ${passed + failed} - ${name}`);
    } catch (e) {
      failed++;
      console.log(`not ok ${passed + failed} - ${name}\n  ${String(e?.stack ?? e).split('\n').join('\n  ')}`);
    }
  }
} catch (e) {
  failed++;
  console.log(`not ok - setup: ${e?.stack ?? e}`);
} finally {
  await browser?.close().catch(() => {});
  allowedServer?.close();
  otherServer?.close();
}
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
