import './style.css';
import type { Client } from 'graphql-ws';
import {
  ApiError,
  describeError,
  formatMoney,
  gql,
  isNetworkError,
  liveClient,
  randomString,
  reachability,
  type ConnState,
} from './api';

// ---------------------------------------------------------------- types ---

interface Product {
  id: string;
  sku: string;
  name: string;
  priceCents: number;
  currency: string;
  stock: number;
}

type OrderStatus = 'PENDING_PAYMENT' | 'PAID' | 'CANCELLED';

interface Order {
  id: string;
  status: OrderStatus;
  totalCents: number;
  currency: string;
  createdAt?: string;
  expiresAt: string;
  paidAt?: string | null;
  cancelledAt?: string | null;
  cancelReason?: string | null;
  lines?: { quantity: number; product: { id: string; name: string; sku: string } }[];
}

interface CancelEvent {
  reason: string;
  cancelledAt: string;
  order: { id: string; totalCents: number; currency: string; customer: { email: string } };
}

// ------------------------------------------------------------ documents ---

const ORDER_FIELDS = `id status totalCents currency createdAt expiresAt paidAt cancelledAt cancelReason
  lines { quantity product { id name sku } }`;

const Q_PRODUCTS = `query Products { products(first: 50) { nodes { id sku name priceCents currency stock } } }`;
const Q_ME = `query Me { me { id email } }`;
const Q_ORDERS = `query MyOrders { orders(first: 10) { nodes { ${ORDER_FIELDS} } } }`;
const Q_ORDER = `query Order($id: ID!) { order(id: $id) { ${ORDER_FIELDS} } }`;
const M_REGISTER = `mutation Register($email: String!, $password: String!) {
  registerCustomer(email: $email, password: $password) { token customer { id email } } }`;
const M_LOGIN = `mutation Login($email: String!, $password: String!) {
  login(email: $email, password: $password) { token customer { id email } } }`;
const M_CREATE_ORDER = `mutation CreateOrder($input: CreateOrderInput!) { createOrder(input: $input) { ${ORDER_FIELDS} } }`;
const M_PAY = `mutation Pay($id: ID!) { payOrder(id: $id) { ${ORDER_FIELDS} } }`;
const M_CANCEL = `mutation Cancel($id: ID!) { cancelOrder(id: $id) { ${ORDER_FIELDS} } }`;
const M_CREATE_PRODUCT = `mutation CreateProduct($input: CreateProductInput!) {
  createProduct(input: $input) { id sku name priceCents currency stock } }`;
const S_ORDER_UPDATED = `subscription OrderUpdated($orderId: ID!) {
  orderUpdated(orderId: $orderId) { id status cancelReason paidAt cancelledAt expiresAt } }`;
const S_ORDER_CANCELLED = `subscription AllCancellations {
  orderCancelled { reason cancelledAt order { id totalCents currency customer { email } } } }`;

// -------------------------------------------------------------- storage ---

const LS = {
  token: 'shopgraph.demo.customerToken',
  email: 'shopgraph.demo.customerEmail',
  admin: 'shopgraph.demo.adminToken',
};
const store = {
  get: (k: string) => {
    try {
      return localStorage.getItem(k);
    } catch {
      return null;
    }
  },
  set: (k: string, v: string | null) => {
    try {
      if (v === null) localStorage.removeItem(k);
      else localStorage.setItem(k, v);
    } catch {
      /* private mode: keep it in memory only */
    }
  },
};

// ------------------------------------------------------------------ dom ---

const $ = <T extends HTMLElement = HTMLElement>(id: string) => document.getElementById(id) as T;

function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Record<string, string | undefined> = {},
  ...children: (Node | string)[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined) continue;
    if (k === 'class') el.className = v;
    else el.setAttribute(k, v);
  }
  el.append(...children);
  return el;
}

function setConn(el: HTMLElement, state: ConnState, detail?: string) {
  el.dataset.state = state;
  const label = el.querySelector('.label')!;
  label.textContent = detail && state !== 'live' ? `${state} · ${detail}` : state;
}

let errorTimer: number | undefined;
/**
 * Shows an error. `kind` says what makes it obsolete: `network` errors go
 * once the server answers again, `admin` ones once the admin feed connects.
 */
function showError(context: string, err: unknown, kind: 'network' | 'admin' | 'other' = isNetworkError(err) ? 'network' : 'other') {
  const text = `${context}: ${describeError(err)}`;
  console.warn(text, err);
  $('error-text').textContent = text;
  $('error-banner').dataset.kind = kind;
  $('error-banner').hidden = false;
  window.clearTimeout(errorTimer);
  errorTimer = window.setTimeout(() => ($('error-banner').hidden = true), 15_000);
}

/** Hides the banner if what it shows is of this kind (a newer, other error stays). */
function clearError(kind: 'network' | 'admin') {
  if ($('error-banner').dataset.kind === kind) $('error-banner').hidden = true;
}
reachability.addEventListener('reachable', () => clearError('network'));
$('error-close').addEventListener('click', () => ($('error-banner').hidden = true));

/**
 * Closes a client. graphql-ws's `dispose` rejects (with the close event)
 * when the connection it would close had already failed, e.g. a refused
 * token: that is not an error here.
 */
function disposeQuietly(client: Client | null) {
  if (client) void Promise.resolve(client.dispose()).catch(() => {});
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

// ================================================================ SHOP ====

let token: string | null = store.get(LS.token);
let shopClient: Client | null = null;
const products = new Map<string, Product>();
const productRows = new Map<string, HTMLLIElement>();
const orders = new Map<string, Order>();
const orderCards = new Map<string, HTMLElement>();
const orderSubs = new Map<string, () => void>();
let shopSocketLive = false;

function setIdentity(newToken: string, newEmail: string) {
  token = newToken;
  store.set(LS.token, newToken);
  store.set(LS.email, newEmail);
  $('who').textContent = `signed in as ${newEmail}`;
}

async function registerGuest(): Promise<void> {
  const guestEmail = `guest-${randomString(12).toLowerCase()}@demo.shopgraph.dev`;
  const password = randomString(24);
  const d = await gql<{ registerCustomer: { token: string; customer: { email: string } } }>(M_REGISTER, {
    email: guestEmail,
    password,
  });
  setIdentity(d.registerCustomer.token, d.registerCustomer.customer.email);
}

/** Make sure we hold a token the server accepts; sign up a new guest if not. */
async function ensureCustomer(): Promise<void> {
  if (token) {
    try {
      const d = await gql<{ me: { email: string } | null }>(Q_ME, {}, token);
      if (d.me) {
        setIdentity(token, d.me.email);
        return;
      }
    } catch (e) {
      if (!(e instanceof ApiError && e.code === 'UNAUTHENTICATED')) throw e;
    }
    // refused (401 / UNAUTHENTICATED): never sent again
    token = null;
    store.set(LS.token, null);
  }
  await registerGuest();
}

let reauthRunning: Promise<void> | null = null;
/** The server refused our token (e.g. it restarted with a new JWT secret): start over as a new guest. */
function reauthenticate(): Promise<void> {
  if (!reauthRunning) {
    reauthRunning = (async () => {
      try {
        const hadToken = token;
        await ensureCustomer();
        if (token !== hadToken) {
          forgetOrders('These orders belonged to the previous session and are no longer visible.');
          restartShopSocket();
          await loadOrders();
        }
      } catch (e) {
        showError('Sign-in', e);
      } finally {
        reauthRunning = null;
      }
    })();
  }
  return reauthRunning;
}

async function withAuthRetry<T>(fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (e) {
    if (e instanceof ApiError && e.code === 'UNAUTHENTICATED') {
      await reauthenticate();
      return fn();
    }
    throw e;
  }
}

// ------------------------------------------------------------- products ---

let productsInFlight: Promise<void> | null = null;
let productsAgain = false;

/** Reload products (coalesced: one request in flight, one queued). */
function refreshProducts(): Promise<void> {
  if (productsInFlight) {
    productsAgain = true;
    return productsInFlight;
  }
  productsInFlight = (async () => {
    try {
      do {
        productsAgain = false;
        const d = await gql<{ products: { nodes: Product[] } }>(Q_PRODUCTS);
        renderProducts(d.products.nodes);
      } while (productsAgain);
    } catch (e) {
      showError('Loading products', e);
    } finally {
      productsInFlight = null;
    }
  })();
  return productsInFlight;
}

function renderProducts(list: Product[]) {
  const ul = $('products');
  const seen = new Set<string>();
  list.forEach((p, i) => {
    seen.add(p.id);
    const prev = products.get(p.id);
    products.set(p.id, p);
    let row = productRows.get(p.id);
    if (!row) {
      row = h(
        'li',
        { class: 'product', 'data-testid': 'product-row', 'data-product-id': p.id, 'data-sku': p.sku },
        h('div', { class: 'p-main' }, h('span', { class: 'p-name', 'data-testid': 'product-name' }), h('span', { class: 'p-sku' })),
        h('span', { class: 'p-price', 'data-testid': 'product-price' }),
        h(
          'span',
          { class: 'p-stock' },
          h('b', { 'data-testid': 'product-stock', class: 'stock-value' }),
          h('small', {}, ' in stock'),
        ),
        h('button', { type: 'button', class: 'btn', 'data-testid': 'order-button' }, 'Order 1'),
      );
      row.querySelector('button')!.addEventListener('click', () => placeOrder(p.id));
      productRows.set(p.id, row);
    }
    row.querySelector('.p-name')!.textContent = p.name;
    row.querySelector('.p-sku')!.textContent = p.sku;
    row.querySelector('.p-price')!.textContent = formatMoney(p.priceCents, p.currency);
    const stockEl = row.querySelector<HTMLElement>('.stock-value')!;
    stockEl.textContent = String(p.stock);
    stockEl.dataset.stock = String(p.stock);
    row.classList.toggle('soldout', p.stock <= 0);
    if (prev && prev.stock !== p.stock) {
      row.classList.remove('flash-up', 'flash-down');
      void row.offsetWidth; // restart the animation
      row.classList.add(p.stock > prev.stock ? 'flash-up' : 'flash-down');
    }
    const btn = row.querySelector<HTMLButtonElement>('button')!;
    if (!btn.dataset.busy) btn.disabled = p.stock <= 0;
    btn.textContent = p.stock <= 0 ? 'Sold out' : 'Order 1';
    if (ul.children[i] !== row) ul.insertBefore(row, ul.children[i] ?? null);
  });
  for (const [id, row] of productRows) {
    if (!seen.has(id)) {
      row.remove();
      productRows.delete(id);
      products.delete(id);
    }
  }
  $('products-empty').hidden = list.length > 0;
  $('products-updated').textContent = `updated ${new Date().toLocaleTimeString()}`;
}

// --------------------------------------------------------------- orders ---

async function placeOrder(productId: string) {
  const btn = productRows.get(productId)?.querySelector('button');
  if (btn) {
    btn.disabled = true;
    btn.dataset.busy = '1';
  }
  try {
    const d = await withAuthRetry(() =>
      gql<{ createOrder: Order }>(M_CREATE_ORDER, { input: { lines: [{ productId, quantity: 1 }] } }, token),
    );
    upsertOrder(d.createOrder, true);
    subscribeOrder(d.createOrder.id);
  } catch (e) {
    showError('Placing the order', e);
  } finally {
    if (btn) {
      delete btn.dataset.busy;
      btn.disabled = (products.get(productId)?.stock ?? 0) <= 0;
    }
    void refreshProducts();
  }
}

async function orderAction(id: string, action: 'pay' | 'cancel') {
  const card = orderCards.get(id);
  card?.querySelectorAll('button').forEach((b) => (b.disabled = true));
  setCardError(id, '');
  try {
    const d = await withAuthRetry(() => gql<Record<string, Order>>(action === 'pay' ? M_PAY : M_CANCEL, { id }, token));
    upsertOrder(action === 'pay' ? d.payOrder : d.cancelOrder);
  } catch (e) {
    setCardError(id, describeError(e));
    showError(action === 'pay' ? 'Paying' : 'Cancelling', e);
    renderOrder(id);
  } finally {
    void refreshProducts();
  }
}

function upsertOrder(o: Partial<Order> & { id: string }, isNew = false) {
  const prev = orders.get(o.id);
  const merged = { ...(prev ?? {}), ...o } as Order;
  orders.set(o.id, merged);
  if (!orderCards.has(o.id)) {
    const card = buildCard(merged);
    orderCards.set(o.id, card);
    if (isNew) $('orders').prepend(card);
    else $('orders').append(card);
  }
  renderOrder(o.id);
  $('orders-empty').hidden = orders.size > 0;
}

function buildCard(o: Order): HTMLElement {
  const card = h(
    'article',
    { class: 'order', 'data-testid': 'order-card', 'data-order-id': o.id },
    h(
      'div',
      { class: 'o-head' },
      h('span', { class: 'o-items', 'data-testid': 'order-items' }),
      h('span', { class: 'badge', 'data-testid': 'order-status' }),
    ),
    h(
      'div',
      { class: 'o-body' },
      h('span', { class: 'o-total', 'data-testid': 'order-total' }),
      h('span', { class: 'o-countdown', 'data-testid': 'order-countdown' }),
      h('span', { class: 'o-reason', 'data-testid': 'order-reason' }),
    ),
    h(
      'div',
      { class: 'o-actions' },
      h('button', { type: 'button', class: 'btn', 'data-testid': 'pay-button' }, 'Pay'),
      h('button', { type: 'button', class: 'btn ghost', 'data-testid': 'cancel-button' }, 'Cancel'),
      h('code', { class: 'o-id', title: 'order id' }, o.id),
    ),
    h('p', { class: 'o-error', 'data-testid': 'order-error', role: 'status' }),
  );
  card.querySelector('[data-testid="pay-button"]')!.addEventListener('click', () => orderAction(o.id, 'pay'));
  card.querySelector('[data-testid="cancel-button"]')!.addEventListener('click', () => orderAction(o.id, 'cancel'));
  return card;
}

const STATUS_TEXT: Record<string, string> = {
  PENDING_PAYMENT: 'PENDING_PAYMENT',
  PAID: 'PAID',
  CANCELLED: 'CANCELLED',
};

function renderOrder(id: string) {
  const o = orders.get(id);
  const card = orderCards.get(id);
  if (!o || !card) return;
  card.dataset.status = o.status;
  const badge = card.querySelector<HTMLElement>('[data-testid="order-status"]')!;
  badge.textContent = STATUS_TEXT[o.status] ?? o.status;
  badge.dataset.status = o.status;
  badge.className = `badge ${o.status.toLowerCase()}`;
  const items = (o.lines ?? []).map((l) => `${l.quantity} × ${l.product.name}`).join(', ');
  card.querySelector('[data-testid="order-items"]')!.textContent = items || `Order ${o.id}`;
  card.querySelector('[data-testid="order-total"]')!.textContent = formatMoney(o.totalCents, o.currency);
  const reason = card.querySelector<HTMLElement>('[data-testid="order-reason"]')!;
  if (o.status === 'CANCELLED') {
    reason.textContent = o.cancelReason ? `reason: ${o.cancelReason}` : 'cancelled';
    reason.dataset.reason = o.cancelReason ?? '';
  } else if (o.status === 'PAID') {
    reason.textContent = o.paidAt ? `paid ${new Date(o.paidAt).toLocaleTimeString()}` : 'paid';
    delete reason.dataset.reason;
  } else {
    reason.textContent = '';
    delete reason.dataset.reason;
  }
  const pending = o.status === 'PENDING_PAYMENT';
  card.querySelectorAll<HTMLButtonElement>('.o-actions button').forEach((b) => {
    b.disabled = !pending;
    b.hidden = !pending;
  });
  tickCountdown(o, card);
}

function tickCountdown(o: Order, card: HTMLElement) {
  const el = card.querySelector<HTMLElement>('[data-testid="order-countdown"]')!;
  if (o.status !== 'PENDING_PAYMENT') {
    el.textContent = '';
    el.hidden = true;
    return;
  }
  el.hidden = false;
  const left = Date.parse(o.expiresAt) - Date.now();
  el.dataset.remainingMs = String(Math.max(0, left));
  if (!Number.isFinite(left)) el.textContent = '';
  else if (left <= 0) el.textContent = 'expiring…';
  else if (left < 60_000) el.textContent = `expires in ${(left / 1000).toFixed(1)} s`;
  else {
    const s = Math.ceil(left / 1000);
    el.textContent = `expires in ${Math.floor(s / 60)}:${String(s % 60).padStart(2, '0')}`;
  }
  el.classList.toggle('urgent', left < 10_000);
}

function setCardError(id: string, text: string) {
  const el = orderCards.get(id)?.querySelector('[data-testid="order-error"]');
  if (el) el.textContent = text;
}

function forgetOrders(note: string) {
  for (const unsub of orderSubs.values()) unsub();
  orderSubs.clear();
  for (const [id, card] of orderCards) {
    card.classList.add('stale');
    card.querySelectorAll('button').forEach((b) => {
      b.disabled = true;
      b.hidden = true;
    });
    card.querySelector<HTMLElement>('[data-testid="order-countdown"]')!.hidden = true;
    setCardError(id, note);
  }
  orders.clear();
  orderCards.clear();
}

async function loadOrders() {
  try {
    const d = await withAuthRetry(() => gql<{ orders: { nodes: Order[] } }>(Q_ORDERS, {}, token));
    for (const o of d.orders.nodes) {
      upsertOrder(o);
      if (o.status === 'PENDING_PAYMENT') subscribeOrder(o.id);
    }
  } catch (e) {
    showError('Loading your orders', e);
  }
}

/** Live status of one order: current state first, then each change, then complete. */
function subscribeOrder(id: string) {
  if (!shopClient || orderSubs.has(id)) return;
  const o = orders.get(id);
  if (o && o.status !== 'PENDING_PAYMENT') return;
  const unsubscribe = shopClient.subscribe<{ orderUpdated: Partial<Order> & { id: string } }>(
    { query: S_ORDER_UPDATED, variables: { orderId: id } },
    {
      next: (msg) => {
        if (msg.errors?.length) {
          setCardError(id, describeError(msg.errors));
          return;
        }
        if (msg.data?.orderUpdated) {
          const before = orders.get(id)?.status;
          upsertOrder(msg.data.orderUpdated);
          setCardError(id, '');
          if (before !== msg.data.orderUpdated.status || msg.data.orderUpdated.status !== 'PENDING_PAYMENT') {
            void refreshProducts(); // a status change moves stock
          }
        }
      },
      error: (err) => {
        orderSubs.delete(id);
        setCardError(id, `live updates stopped: ${describeError(err)}`);
      },
      complete: () => {
        orderSubs.delete(id);
      },
    },
  );
  orderSubs.set(id, unsubscribe);
}

function resubscribePending() {
  for (const o of orders.values()) if (o.status === 'PENDING_PAYMENT') subscribeOrder(o.id);
}

let shopGeneration = 0;
function restartShopSocket() {
  for (const unsub of orderSubs.values()) unsub();
  orderSubs.clear();
  disposeQuietly(shopClient);
  // a disposed client still reports its close: only the current one may set the status
  const generation = ++shopGeneration;
  shopClient = liveClient({
    getToken: () => token,
    onState: (s, detail) => {
      if (generation !== shopGeneration) return;
      shopSocketLive = s === 'live';
      setConn($('shop-conn'), s, detail);
      if (s === 'live') clearError('network');
    },
    onConnected: (wasRetry) => {
      if (generation !== shopGeneration) return;
      if (wasRetry) {
        // graphql-ws re-sends active subscriptions itself; make sure any that
        // ended with an error while we were away are back too, and catch up.
        resubscribePending();
        void refreshProducts();
      }
    },
    onClosed: (code) => {
      if (generation !== shopGeneration) return;
      if (code === 4403 || code === 4401) void reauthenticate();
    },
  });
  resubscribePending();
}

/** Fallback while the socket is down: poll overdue pending orders over HTTP. */
async function pollOverdueOrders() {
  if (shopSocketLive) return;
  for (const o of orders.values()) {
    if (o.status !== 'PENDING_PAYMENT' || Date.parse(o.expiresAt) > Date.now()) continue;
    try {
      const d = await gql<{ order: Order | null }>(Q_ORDER, { id: o.id }, token);
      if (d.order) upsertOrder(d.order);
    } catch {
      /* server away: try again later */
    }
  }
}

async function startShop() {
  for (let attempt = 0; ; attempt++) {
    try {
      await ensureCustomer();
      break;
    } catch (e) {
      showError('Signing up a guest customer', e);
      await sleep(Math.min(1000 * 2 ** attempt, 5000));
    }
  }
  restartShopSocket();
  await Promise.all([refreshProducts(), loadOrders()]);

  window.setInterval(() => {
    for (const [id, card] of orderCards) {
      const o = orders.get(id);
      if (o) tickCountdown(o, card);
    }
  }, 200);
  window.setInterval(() => {
    if (document.visibilityState === 'visible') void refreshProducts();
    void pollOverdueOrders();
  }, 2000);

  $('new-guest').addEventListener('click', async () => {
    try {
      await registerGuest();
      forgetOrders('Signed in as a new guest.');
      $('orders').querySelectorAll('.order.stale').forEach((c) => c.remove());
      $('orders-empty').hidden = false;
      restartShopSocket();
    } catch (e) {
      showError('New guest', e);
    }
  });

  const form = $<HTMLFormElement>('signin-form');
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const submitter = (ev as SubmitEvent).submitter as HTMLButtonElement | null;
    const action = submitter?.dataset.action === 'register' ? 'register' : 'login';
    const fd = new FormData(form);
    try {
      const d = await gql<Record<string, { token: string; customer: { email: string } }>>(
        action === 'register' ? M_REGISTER : M_LOGIN,
        { email: String(fd.get('email')), password: String(fd.get('password')) },
      );
      const payload = action === 'register' ? d.registerCustomer : d.login;
      setIdentity(payload.token, payload.customer.email);
      forgetOrders('Signed in as someone else.');
      $('orders').querySelectorAll('.order.stale').forEach((c) => c.remove());
      restartShopSocket();
      await loadOrders();
      (form.closest('details') as HTMLDetailsElement).open = false;
    } catch (e) {
      showError(action === 'register' ? 'Register' : 'Sign in', e);
    }
  });
}

// =============================================================== ADMIN ====

let adminToken: string | null = store.get(LS.admin);
let adminClient: Client | null = null;
let adminEvents = 0;
let adminGeneration = 0;

function startAdmin() {
  disposeQuietly(adminClient);
  adminClient = null;
  // a disposed client still reports its close (1000): only the current one may set the status
  const generation = ++adminGeneration;
  const current = () => generation === adminGeneration;
  if (!adminToken) {
    setConn($('admin-conn'), 'idle', 'enter the admin token');
    return;
  }
  const client = liveClient({
    getToken: () => adminToken,
    onState: (s, detail) => {
      if (!current()) return;
      setConn($('admin-conn'), s, detail);
      if (s === 'live') {
        clearError('admin');
        clearError('network');
      }
    },
    onClosed: (code) => {
      if (!current() || code !== 4403) return;
      // retrying a rejected token cannot help: stop until another one is entered
      adminGeneration++;
      disposeQuietly(client);
      setConn($('admin-conn'), 'idle', 'token rejected');
      showError('Admin feed', new Error('the server rejected the admin token (4403)'), 'admin');
    },
  });
  adminClient = client;
  client.subscribe<{ orderCancelled: CancelEvent }>(
    { query: S_ORDER_CANCELLED },
    {
      next: (msg) => {
        if (msg.errors?.length) showError('Admin feed', msg.errors);
        else if (msg.data?.orderCancelled) addFeedItem(msg.data.orderCancelled);
      },
      error: (err) => {
        if (adminClient === client && current()) {
          showError('Admin feed', err, 'admin');
          setConn($('admin-conn'), 'idle', 'subscription ended');
        }
      },
      complete: () => {},
    },
  );
}

function addFeedItem(ev: CancelEvent) {
  adminEvents++;
  const li = h(
    'li',
    { class: 'feed-item', 'data-testid': 'admin-feed-item', 'data-order-id': ev.order.id, 'data-reason': ev.reason },
    h('span', { class: `badge reason ${ev.reason.toLowerCase()}` }, ev.reason),
    h(
      'span',
      { class: 'f-main' },
      h('code', { class: 'f-id' }, ev.order.id),
      h('span', { class: 'f-email' }, ev.order.customer?.email ?? ''),
    ),
    h('span', { class: 'f-total' }, formatMoney(ev.order.totalCents, ev.order.currency)),
    h('time', { class: 'f-time', datetime: ev.cancelledAt }, new Date(ev.cancelledAt).toLocaleTimeString()),
  );
  const feed = $('admin-feed');
  feed.prepend(li);
  while (feed.children.length > 200) feed.lastElementChild!.remove();
  $('admin-feed-empty').hidden = true;
  $('admin-count').textContent = `${adminEvents} event${adminEvents === 1 ? '' : 's'}`;
}

function initAdminForms() {
  const input = $<HTMLInputElement>('admin-token');
  input.value = adminToken ?? '';
  $<HTMLFormElement>('admin-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    adminToken = input.value.trim() || null;
    store.set(LS.admin, adminToken);
    startAdmin();
  });
  $('admin-forget').addEventListener('click', () => {
    adminToken = null;
    input.value = '';
    store.set(LS.admin, null);
    startAdmin();
  });
  const pf = $<HTMLFormElement>('product-form');
  pf.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const fd = new FormData(pf);
    const out = $('product-form-result');
    try {
      const d = await gql<{ createProduct: Product }>(
        M_CREATE_PRODUCT,
        {
          input: {
            sku: String(fd.get('sku')),
            name: String(fd.get('name')),
            priceCents: Number(fd.get('priceCents')),
            currency: String(fd.get('currency')).toUpperCase(),
            stock: Number(fd.get('stock')),
          },
        },
        adminToken,
      );
      out.textContent = `Created ${d.createProduct.sku} (${d.createProduct.id})`;
      pf.reset();
    } catch (e) {
      out.textContent = describeError(e);
      showError('Create product', e);
    }
  });
}

// ================================================================ TABS ====

type Tab = 'shop' | 'admin';
const started = { shop: false, admin: false };

function showTab(tab: Tab) {
  $('view-shop').hidden = tab !== 'shop';
  $('view-admin').hidden = tab !== 'admin';
  document.querySelectorAll<HTMLButtonElement>('.tab[data-tab]').forEach((b) => {
    b.setAttribute('aria-selected', String(b.dataset.tab === tab));
  });
  const url = new URL(window.location.href);
  if (tab === 'admin') url.searchParams.set('admin', '1');
  else url.searchParams.delete('admin');
  history.replaceState(null, '', url);
  if (!started[tab]) {
    started[tab] = true;
    if (tab === 'shop') void startShop();
    else startAdmin();
  }
}

document.querySelectorAll<HTMLButtonElement>('.tab[data-tab]').forEach((b) =>
  b.addEventListener('click', () => showTab(b.dataset.tab as Tab)),
);
initAdminForms();
const params = new URLSearchParams(window.location.search);
showTab(['1', 'true', ''].includes(params.get('admin') ?? 'no') ? 'admin' : 'shop');
