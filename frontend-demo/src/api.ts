// Tiny GraphQL helpers: queries and mutations over plain fetch (HTTP POST),
// subscriptions over the reference graphql-ws client.
import { createClient, type Client } from 'graphql-ws';

export const HTTP_URL = new URL('/graphql', window.location.href).toString();
export const WS_URL = HTTP_URL.replace(/^http/, 'ws'); // http→ws, https→wss

export interface GraphQLErrorShape {
  message: string;
  extensions?: { code?: string; [k: string]: unknown };
  path?: (string | number)[];
}

/** An API error with the words of the first GraphQL error and its extensions.code. */
export class ApiError extends Error {
  readonly code: string | undefined;
  readonly errors: GraphQLErrorShape[];
  constructor(errors: GraphQLErrorShape[], fallback = 'Request failed') {
    const first = errors[0];
    super(first?.message || fallback);
    this.name = 'ApiError';
    this.code = first?.extensions?.code;
    this.errors = errors;
  }
}

/** Human-readable text for any error: "message (CODE)". */
export function describeError(err: unknown): string {
  if (err instanceof ApiError) return err.code ? `${err.message} (${err.code})` : err.message;
  if (Array.isArray(err) && err.length && typeof err[0]?.message === 'string') {
    return describeError(new ApiError(err as GraphQLErrorShape[]));
  }
  if (isCloseEvent(err)) {
    return `connection closed (${err.code}${err.reason ? `: ${err.reason}` : ''})`;
  }
  if (err instanceof Error) return err.message;
  return String(err);
}

export function isCloseEvent(x: unknown): x is { code: number; reason: string } {
  return typeof x === 'object' && x !== null && 'code' in x && typeof (x as { code: unknown }).code === 'number' && 'reason' in x;
}

/** Fires `reachable` whenever the server answered an HTTP request (any status). */
export const reachability = new EventTarget();

/** Errors that mean "the server could not be reached", which go away by themselves. */
export function isNetworkError(err: unknown): boolean {
  return (err instanceof ApiError && err.code === 'NETWORK') || isCloseEvent(err);
}

export async function gql<T>(
  query: string,
  variables: Record<string, unknown> = {},
  token?: string | null,
): Promise<T> {
  const headers: Record<string, string> = {
    'Content-Type': 'application/json',
    Accept: 'application/graphql-response+json, application/json',
  };
  if (token) headers.Authorization = `Bearer ${token}`;
  let res: Response;
  try {
    res = await fetch(HTTP_URL, { method: 'POST', headers, body: JSON.stringify({ query, variables }) });
  } catch (e) {
    throw new ApiError([{ message: `Cannot reach the server (${(e as Error).message})`, extensions: { code: 'NETWORK' } }]);
  }
  reachability.dispatchEvent(new Event('reachable'));
  let body: { data?: T | null; errors?: GraphQLErrorShape[] } | undefined;
  const text = await res.text();
  if (res.status === 401) {
    // a refused token (expired, or signed by a key the server no longer has),
    // whatever the body says: the caller drops it
    let message = 'the server refused the token';
    try {
      message = JSON.parse(text)?.errors?.[0]?.message ?? message;
    } catch {
      /* not JSON: keep the generic words */
    }
    throw new ApiError([{ message, extensions: { code: 'UNAUTHENTICATED' } }]);
  }
  try {
    body = JSON.parse(text);
  } catch {
    throw new ApiError([
      { message: `HTTP ${res.status}: ${text.slice(0, 200) || res.statusText}`, extensions: { code: `HTTP_${res.status}` } },
    ]);
  }
  if (body?.errors?.length) throw new ApiError(body.errors);
  if (!res.ok || body?.data == null) {
    throw new ApiError([{ message: `HTTP ${res.status} without data`, extensions: { code: `HTTP_${res.status}` } }]);
  }
  return body.data;
}

export type ConnState = 'idle' | 'connecting' | 'live' | 'reconnecting';

/**
 * A graphql-ws client that never gives up: it reconnects forever (capped
 * back-off) and reports its state. `getToken` is read on every (re)connect,
 * so a refreshed token is used by the next connection_init.
 */
export function liveClient(opts: {
  getToken: () => string | null;
  onState: (s: ConnState, detail?: string) => void;
  onConnected?: (wasRetry: boolean) => void;
  onClosed?: (code: number | undefined, reason: string | undefined) => void;
}): Client {
  let everConnected = false;
  return createClient({
    url: WS_URL,
    lazy: false,
    keepAlive: 10_000,
    retryAttempts: Infinity,
    shouldRetry: () => true,
    retryWait: async (retries) => {
      const ms = Math.min(500 * 2 ** retries, 5_000) + Math.random() * 300;
      await new Promise((r) => setTimeout(r, ms));
    },
    connectionParams: () => {
      const t = opts.getToken();
      return t ? { Authorization: `Bearer ${t}` } : {};
    },
    on: {
      connecting: () => opts.onState(everConnected ? 'reconnecting' : 'connecting'),
      connected: (_socket, _payload, wasRetry) => {
        everConnected = true;
        opts.onState('live');
        opts.onConnected?.(wasRetry);
      },
      closed: (ev) => {
        const ce = isCloseEvent(ev) ? ev : undefined;
        opts.onState(everConnected ? 'reconnecting' : 'connecting', ce ? `closed ${ce.code}` : undefined);
        opts.onClosed?.(ce?.code, ce?.reason);
      },
    },
  });
}

export function formatMoney(cents: number, currency: string): string {
  try {
    return new Intl.NumberFormat(undefined, { style: 'currency', currency }).format(cents / 100);
  } catch {
    return `${(cents / 100).toFixed(2)} ${currency}`;
  }
}

export function randomString(len: number): string {
  const alphabet = 'abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789';
  const bytes = new Uint8Array(len);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => alphabet[b % alphabet.length]).join('');
}
