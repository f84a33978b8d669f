// Checks shopgraph's websocket endpoint with the reference graphql-ws client
// (the `ws` package as the WebSocket implementation):
//   an admin subscribes to orderCancelled; a customer registers, creates an
//   order and cancels it; the admin receives exactly one event for it.
//
//   SHOPGRAPH_URL=http://127.0.0.1:8000 ADMIN_TOKEN=… node e2e/graphql-ws-check.mjs
//
// Prints "1 passed, 0 failed" (or "0 passed, 1 failed") and exits non-zero on failure.
import { createClient } from 'graphql-ws';
import WebSocket from 'ws';
import { randomBytes } from 'node:crypto';

const BASE = (process.env.SHOPGRAPH_URL ?? 'http://127.0.0.1:8000').replace(/\/+$/, '');
const ADMIN_TOKEN = process.env.ADMIN_TOKEN ?? '';
const HTTP_URL = `${BASE}/graphql`;
const WS_URL = HTTP_URL.replace(/^http/, 'ws');
const TIMEOUT_MS = 15_000;

const rnd = () => randomBytes(6).toString('hex');

async function gql(query, variables = {}, token) {
  const res = await fetch(HTTP_URL, {
    method: 'POST',
    headers: {
      'content-type': 'application/json',
      accept: 'application/graphql-response+json, application/json',
      ...(token ? { authorization: `Bearer ${token}` } : {}),
    },
    body: JSON.stringify({ query, variables }),
    signal: AbortSignal.timeout(TIMEOUT_MS),
  });
  const text = await res.text();
  let body;
  try {
    body = JSON.parse(text);
  } catch {
    throw new Error(`HTTP ${res.status} with a non-JSON body: ${text.slice(0, 300)}`);
  }
  if (body.errors?.length) {
    const e = body.errors[0];
    throw new Error(`GraphQL error: ${e.message} (${e.extensions?.code ?? 'no code'}) for ${query.slice(0, 60)}…`);
  }
  return body.data;
}

function withTimeout(promise, ms, what) {
  let t;
  return Promise.race([
    promise,
    new Promise((_, reject) => (t = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms))),
  ]).finally(() => clearTimeout(t));
}

async function check() {
  if (!ADMIN_TOKEN) throw new Error('ADMIN_TOKEN is not set');

  // Something to order.
  const { createProduct: product } = await gql(
    `mutation($input: CreateProductInput!) { createProduct(input: $input) { id sku stock } }`,
    { input: { sku: `wscheck-${rnd()}`, name: 'graphql-ws check', priceCents: 250, currency: 'USD', stock: 50 } },
    ADMIN_TOKEN,
  );

  const { registerCustomer: auth } = await gql(
    `mutation($email: String!, $password: String!) { registerCustomer(email: $email, password: $password) { token customer { id email } } }`,
    { email: `wscheck-${rnd()}@example.test`, password: `pw-${rnd()}-${rnd()}` },
  );

  const placeAndCancel = async () => {
    const { createOrder } = await gql(
      `mutation($input: CreateOrderInput!) { createOrder(input: $input) { id status } }`,
      { input: { lines: [{ productId: product.id, quantity: 1 }] } },
      auth.token,
    );
    const { cancelOrder } = await gql(
      `mutation($id: ID!) { cancelOrder(id: $id) { id status cancelReason } }`,
      { id: createOrder.id },
      auth.token,
    );
    if (cancelOrder.status !== 'CANCELLED') throw new Error(`cancelOrder returned status ${cancelOrder.status}`);
    return createOrder.id;
  };

  // The admin's connection and subscription.
  let acked = false;
  let onAck;
  const ackPromise = new Promise((resolve) => (onAck = resolve));
  let onFail;
  const failPromise = new Promise((_, reject) => (onFail = reject));
  failPromise.catch(() => {});
  const client = createClient({
    url: WS_URL,
    webSocketImpl: WebSocket,
    connectionParams: { Authorization: `Bearer ${ADMIN_TOKEN}` },
    lazy: true,
    retryAttempts: 0,
    on: {
      connected: () => {
        acked = true;
        onAck();
      },
    },
  });
  const events = []; // { orderId, reason }
  const waiters = new Set();
  let subError = null;
  const unsubscribe = client.subscribe(
    { query: `subscription { orderCancelled { reason cancelledAt order { id status customer { email } } } }` },
    {
      next: (msg) => {
        if (msg.errors?.length) {
          subError = new Error(`subscription error: ${msg.errors[0].message} (${msg.errors[0].extensions?.code})`);
        } else {
          const ev = msg.data.orderCancelled;
          events.push({ orderId: ev.order.id, reason: ev.reason, status: ev.order.status, email: ev.order.customer?.email });
        }
        for (const w of waiters) w();
      },
      error: (err) => {
        subError =
          err instanceof Error
            ? err
            : Array.isArray(err)
              ? new Error(`subscription error: ${err[0]?.message} (${err[0]?.extensions?.code})`)
              : new Error(`subscription failed: websocket closed with ${err?.code ?? '?'} ${err?.reason ?? ''}`);
        onFail(subError);
        for (const w of waiters) w();
      },
      complete: () => {},
    },
  );
  const waitFor = (pred, ms, what) =>
    withTimeout(
      new Promise((resolve, reject) => {
        const test = () => {
          if (subError) {
            waiters.delete(test);
            reject(subError);
          } else if (pred()) {
            waiters.delete(test);
            resolve();
          }
        };
        waiters.add(test);
        test();
      }),
      ms,
      what,
    );

  try {
    // graphql-ws has no "subscribed" acknowledgement, so first prove the
    // subscription is live with probe cancellations (each event is then
    // known to have been delivered after the server registered us).
    await withTimeout(
      Promise.race([ackPromise, failPromise]),
      TIMEOUT_MS,
      'connection_ack from the server',
    );
    const deadline = Date.now() + TIMEOUT_MS;
    let live = false;
    while (!live && Date.now() < deadline) {
      const probeId = await placeAndCancel();
      try {
        await waitFor(() => events.some((e) => e.orderId === probeId), 1500, `probe event for ${probeId}`);
        live = true;
      } catch (e) {
        if (subError) throw subError;
      }
    }
    if (!live) throw new Error(`no orderCancelled event reached the admin within ${TIMEOUT_MS} ms (connection acked: ${acked})`);

    // The real check: one order, cancelled once, exactly one event.
    const orderId = await placeAndCancel();
    await waitFor(() => events.some((e) => e.orderId === orderId), TIMEOUT_MS, `orderCancelled for ${orderId}`);
    // Wait a little longer for duplicates that must not come.
    await new Promise((r) => setTimeout(r, 1500));
    const mine = events.filter((e) => e.orderId === orderId);
    if (mine.length !== 1) throw new Error(`expected exactly 1 event for ${orderId}, got ${mine.length}`);
    const ev = mine[0];
    if (ev.reason !== 'CUSTOMER') throw new Error(`expected reason CUSTOMER, got ${ev.reason}`);
    if (ev.status !== 'CANCELLED') throw new Error(`expected order.status CANCELLED in the event, got ${ev.status}`);
    if (ev.email !== auth.customer.email) throw new Error(`expected customer ${auth.customer.email}, got ${ev.email}`);

    // Cancelling again returns the order unchanged and must publish nothing new.
    const { cancelOrder: again } = await gql(
      `mutation($id: ID!) { cancelOrder(id: $id) { id status cancelReason } }`,
      { id: orderId },
      auth.token,
    );
    if (again.status !== 'CANCELLED' || again.cancelReason !== 'CUSTOMER') {
      throw new Error(`second cancelOrder changed the order: ${JSON.stringify(again)}`);
    }
    await new Promise((r) => setTimeout(r, 1000));
    const after = events.filter((e) => e.orderId === orderId).length;
    if (after !== 1) throw new Error(`a repeated cancelOrder published another event (${after} in total)`);
  } finally {
    unsubscribe();
    await client.dispose();
  }
}

const started = Date.now();
try {
  await check();
  console.log(`ok - admin received exactly one orderCancelled event over graphql-ws (${Date.now() - started} ms)`);
  console.log('1 passed, 0 failed');
  process.exit(0);
} catch (e) {
  console.error(`not ok - graphql-ws check: ${e?.stack ?? e}`);
  console.log('0 passed, 1 failed');
  process.exit(1);
}
