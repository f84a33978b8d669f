#!/usr/bin/env bash
# Starts a throwaway shopgraph server and runs the browser checks against it:
#   e2e/graphql-ws-check.mjs  (reference graphql-ws client from node)
#   e2e/demo.e2e.mjs          (Chromium: /demo/ storefront, admin feed, /graphiql)
#   e2e/cors.e2e.mjs          (Chromium: a page on another origin calls /graphql)
#
#   SHOPGRAPH_BIN=../target/debug/shopgraph bash e2e/run.sh     (from frontend-demo/)
#
# The server gets LISTEN_ADDR=127.0.0.1:0, a fresh SQLite file, ORDER_TTL=3s,
# SWEEP_INTERVAL=2s, ADMIN_TOKEN=e2e-admin, a random REDIS_KEY_PREFIX and
# CORS_ALLOWED_ORIGINS=http://127.0.0.1:<a free port> (the cors check's page).
# REDIS_URL is passed through when set; when it is not set and no Redis answers
# on 127.0.0.1:6379 but redis-server is installed, a private one is started.
# Exits non-zero if a check fails; the last line is "N passed, M failed".
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEMO_DIR="$(cd "$HERE/.." && pwd)"
REPO_DIR="$(cd "$DEMO_DIR/.." && pwd)"
BIN="${SHOPGRAPH_BIN:-$DEMO_DIR/../target/debug/shopgraph}"
case "$BIN" in /*) ;; *) BIN="$(cd "$DEMO_DIR" && cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")" ;; esac
STARTUP_TIMEOUT="${STARTUP_TIMEOUT:-60}"
ADMIN="e2e-admin"

if [ ! -x "$BIN" ]; then
  echo "run.sh: no shopgraph binary at $BIN (build it, or set SHOPGRAPH_BIN)" >&2
  echo "0 passed, 1 failed"
  exit 1
fi

TMP="$(mktemp -d "${TMPDIR:-/tmp}/shopgraph-e2e.XXXXXX")"
SERVER_PID=""
REDIS_PID=""
cleanup() {
  local pid
  # the current server (the demo check may have restarted it)
  [ -f "$TMP/server.pid" ] && SERVER_PID="$(cat "$TMP/server.pid")"
  for pid in $SERVER_PID $REDIS_PID; do
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null
    fi
  done
  wait 2>/dev/null
  if [ "${KEEP_E2E_TMP:-}" = "1" ]; then echo "run.sh: kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The demo must be built: the server serves frontend-demo/dist at /demo/.
if [ ! -f "$DEMO_DIR/dist/index.html" ]; then
  echo "run.sh: building the demo (frontend-demo/dist)"
  ( cd "$DEMO_DIR" && { [ -d node_modules ] || npm ci --no-audit --no-fund; } && npm run build ) || {
    echo "run.sh: demo build failed" >&2; echo "0 passed, 1 failed"; exit 1; }
elif [ ! -d "$DEMO_DIR/node_modules" ]; then
  ( cd "$DEMO_DIR" && npm ci --no-audit --no-fund ) || { echo "0 passed, 1 failed"; exit 1; }
fi

# Redis: the given one, a local default one, or a private one.
if [ -z "${REDIS_URL:-}" ]; then
  if command -v redis-cli >/dev/null && redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; then
    :
  elif command -v redis-server >/dev/null; then
    REDIS_PORT="$(node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})')"
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$TMP" \
      >"$TMP/redis.log" 2>&1 &
    REDIS_PID=$!
    for _ in $(seq 1 50); do redis-cli -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG && break; sleep 0.1; done
    export REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
    echo "run.sh: started a private redis-server on port $REDIS_PORT"
  else
    echo "run.sh: warning: no REDIS_URL and no Redis on 127.0.0.1:6379; the server may not be ready" >&2
  fi
fi

free_port() { node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'; }
CORS_ALLOWED_PORT="$(free_port)"
PREFIX="e2e-$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n'):"
echo "run.sh: starting $BIN serve (REDIS_KEY_PREFIX=$PREFIX${REDIS_URL:+, REDIS_URL=$REDIS_URL})"
# The server is started by a script so that the demo check can restart it on
# the same port ($SHOPGRAPH_RESTART) and watch open pages come back. No
# JWT_SECRET: like a default deployment, a restart invalidates customer tokens.
SERVER_PORT="$(free_port)"
cat >"$TMP/start-server.sh" <<START
#!/usr/bin/env bash
# starts the e2e server in the background; its pid goes to $TMP/server.pid
cd "$REPO_DIR" || exit 1
: >"$TMP/server.out"
LISTEN_ADDR=127.0.0.1:$SERVER_PORT \\
  DATABASE_URL="sqlite://$TMP/e2e.db" \\
  ORDER_TTL=3s \\
  SWEEP_INTERVAL=2s \\
  ADMIN_TOKEN="$ADMIN" \\
  REDIS_KEY_PREFIX="$PREFIX" \\
  ${REDIS_URL:+REDIS_URL="$REDIS_URL"} \\
  CORS_ALLOWED_ORIGINS="http://127.0.0.1:$CORS_ALLOWED_PORT" \\
  DEMO_DIR="$DEMO_DIR/dist" \\
  "$BIN" serve >"$TMP/server.out" 2>>"$TMP/server.err" &
echo \$! >"$TMP/server.pid"
# waits for the listening line (or the process's end)
for _ in \$(seq 1 $((STARTUP_TIMEOUT * 10))); do
  grep -q 'listening on http://' "$TMP/server.out" 2>/dev/null && exit 0
  kill -0 "\$(cat "$TMP/server.pid")" 2>/dev/null || exit 1
  sleep 0.1
done
exit 1
START
cat >"$TMP/restart-server.sh" <<RESTART
#!/usr/bin/env bash
# SIGTERM, wait for the exit, stay down for \${1:-3} s, start again on the same port
pid="\$(cat "$TMP/server.pid")"
kill -TERM "\$pid" 2>/dev/null
for _ in \$(seq 1 200); do kill -0 "\$pid" 2>/dev/null || break; sleep 0.1; done
kill -9 "\$pid" 2>/dev/null
sleep "\${1:-3}"
exec bash "$TMP/start-server.sh"
RESTART
bash "$TMP/start-server.sh"
SERVER_PID="$(cat "$TMP/server.pid" 2>/dev/null)"
URL="$(grep -m1 -oE 'listening on http://[^[:space:]]+' "$TMP/server.out" 2>/dev/null | sed 's/^listening on //')"
if [ -z "$URL" ]; then
  echo "run.sh: the server did not print 'listening on http://HOST:PORT' within ${STARTUP_TIMEOUT}s" >&2
  echo "--- server stdout" >&2; tail -n 40 "$TMP/server.out" >&2
  echo "--- server stderr" >&2; tail -n 40 "$TMP/server.err" >&2
  echo "0 passed, 1 failed"
  exit 1
fi
URL="${URL%/}"
echo "run.sh: server at $URL"

export SHOPGRAPH_URL="$URL" ADMIN_TOKEN="$ADMIN" CORS_ALLOWED_PORT SHOPGRAPH_RESTART="$TMP/restart-server.sh"
PASSED=0
FAILED=0
STATUS=0
run_check() {
  local name="$1"; shift
  echo "run.sh: --- $name"
  local out rc line
  out="$TMP/$name.out"
  ( cd "$DEMO_DIR" && "$@" ) 2>&1 | tee "$out"
  rc=${PIPESTATUS[0]}
  line="$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$out" | tail -n1)"
  if [ -n "$line" ]; then
    PASSED=$((PASSED + $(echo "$line" | cut -d' ' -f1)))
    FAILED=$((FAILED + $(echo "$line" | cut -d' ' -f3)))
  fi
  if [ "$rc" -ne 0 ]; then
    STATUS=1
    [ -z "$line" ] || [ "$(echo "$line" | cut -d' ' -f3)" != "0" ] || FAILED=$((FAILED + 1))
    [ -n "$line" ] || FAILED=$((FAILED + 1))
  fi
}
run_check graphql-ws-check node e2e/graphql-ws-check.mjs
run_check demo-e2e node e2e/demo.e2e.mjs
run_check cors-e2e node e2e/cors.e2e.mjs

if [ "$STATUS" -ne 0 ]; then
  echo "--- server stderr (last 40 lines)"
  tail -n 40 "$TMP/server.err"
fi
echo "${PASSED} passed, ${FAILED} failed"
exit "$STATUS"
