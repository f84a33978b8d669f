// Offline GraphiQL for shopgraph. Built by `npm run build:graphiql` into
// ../assets/graphiql/ (index.html, graphiql.js, graphiql.css), which the
// server embeds and serves at /graphiql. Nothing is loaded from a CDN.
import { StrictMode } from 'react';
import { createRoot } from 'react-dom/client';
import { GraphiQL } from 'graphiql';
import 'graphiql/style.css';
import { createClient, type Client } from 'graphql-ws';
import { getOperationAST, parse, type DocumentNode } from 'graphql';

type Fetcher = NonNullable<Parameters<typeof GraphiQL>[0]['fetcher']>;
type FetcherParams = Parameters<Fetcher>[0];
type FetcherOpts = NonNullable<Parameters<Fetcher>[1]>;

const HTTP_URL = new URL('/graphql', window.location.href).toString();
const WS_URL = HTTP_URL.replace(/^http/, 'ws'); // http→ws, https→wss

const DEFAULT_QUERY = `# Welcome to shopgraph!
#
# products and product are public. Everything else
# needs a bearer token: in the Headers pane below put
#   {"Authorization": "Bearer <token>"}
# using the token from registerCustomer or login
# (or the server's ADMIN_TOKEN for admin operations).
# The same headers are sent as the websocket
# connection_init payload, so they authenticate
# subscriptions (orderUpdated, orderCancelled) too.
# An "Authorization" of just "Bearer " is ignored.

query Products {
  products(first: 10) {
    nodes { id sku name priceCents currency stock }
  }
}
`;

/** Plain-string headers from what the user typed in the Headers pane. */
function cleanHeaders(headers: FetcherOpts['headers']): Record<string, string> {
  const out: Record<string, string> = {};
  if (headers && typeof headers === 'object') {
    for (const [k, v] of Object.entries(headers)) {
      if (v === undefined || v === null) continue;
      const value = String(v);
      // The default Headers pane holds a placeholder "Bearer " with no token:
      // sending it would make the server refuse every request as UNAUTHENTICATED.
      if (k.toLowerCase() === 'authorization' && /^\s*(bearer)?\s*$/i.test(value)) continue;
      out[k] = value;
    }
  }
  return out;
}

// One websocket client per distinct set of headers: the headers become the
// connection_init payload, which is only sent once per connection.
let ws: { key: string; client: Client } | null = null;
function wsClientFor(headers: Record<string, string>): Client {
  const key = JSON.stringify(headers);
  if (ws && ws.key === key) return ws.client;
  ws?.client.dispose();
  const client = createClient({
    url: WS_URL,
    connectionParams: headers,
    lazy: true,
    retryAttempts: 3,
  });
  ws = { key, client };
  return client;
}

function isSubscription(params: FetcherParams, doc?: DocumentNode): boolean {
  try {
    const ast = doc ?? parse(params.query);
    return getOperationAST(ast, params.operationName ?? undefined)?.operation === 'subscription';
  } catch {
    return false; // let the server report the syntax error
  }
}

async function httpFetch(params: FetcherParams, headers: Record<string, string>) {
  const res = await fetch(HTTP_URL, {
    method: 'POST',
    headers: {
      'Content-Type': 'application/json',
      Accept: 'application/graphql-response+json, application/json',
      ...headers,
    },
    body: JSON.stringify(params),
  });
  const text = await res.text();
  try {
    return JSON.parse(text);
  } catch {
    return { errors: [{ message: `HTTP ${res.status} ${res.statusText}: ${text.slice(0, 500)}` }] };
  }
}

const fetcher: Fetcher = (params, opts) => {
  const headers = cleanHeaders(opts?.headers);
  if (isSubscription(params, opts?.documentAST)) {
    const client = wsClientFor(headers);
    return client.iterate({
      query: params.query,
      operationName: params.operationName ?? undefined,
      variables: params.variables ?? undefined,
    }) as ReturnType<Fetcher>;
  }
  return httpFetch(params, headers);
};

createRoot(document.getElementById('graphiql')!).render(
  <StrictMode>
    <GraphiQL
      fetcher={fetcher}
      defaultQuery={DEFAULT_QUERY}
      defaultHeaders={'{\n  "Authorization": "Bearer "\n}'}
      isHeadersEditorEnabled
      shouldPersistHeaders={false}
    />
  </StrictMode>,
);
