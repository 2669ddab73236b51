#!/usr/bin/env bash
# Runs Meridian locally: builds the web client when web-client/dist is missing or older
# than its sources (npm ci && npm run build), builds the node (release; the first build
# takes several minutes), starts `meridian serve --dev` with any extra flags given, and
# prints the address to open once the node answers on /healthz.
#   scripts/run.sh                         # http://127.0.0.1:7880/  (dev mode: join with an identity and a name)
#   scripts/run.sh --http-addr 0.0.0.0:8080 --public-ip 203.0.113.7
#   MERIDIAN_NO_DEV=1 scripts/run.sh       # without dev mode: the page asks for a token
#   MERIDIAN_RUN_PROFILE=debug scripts/run.sh   # a debug build (faster to build, slower media)
# Keys and the event log go to ./meridian-data (created owner-only, 0700; git-ignored).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WEB="$ROOT/web-client"
stale() {
  [ -f "$WEB/dist/index.html" ] || return 0
  [ -n "$(find "$WEB/src" "$WEB/index.html" "$WEB/package-lock.json" "$WEB/vite.config.ts" \
      -newer "$WEB/dist/index.html" -print -quit 2>/dev/null)" ]
}
if stale; then
  command -v npm >/dev/null 2>&1 || { echo "run.sh: npm is needed to build the web client (Node.js >= 20.19)" >&2; exit 1; }
  echo "run.sh: building the web client (web-client/dist)" >&2
  (cd "$WEB" && npm ci --no-audit --no-fund --loglevel=error && npm run build --silent)
fi
PROFILE="${MERIDIAN_RUN_PROFILE:-release}"
case "$PROFILE" in
  release) BIN="$ROOT/target/release/meridian"; BUILD=(--release) ;;
  debug) BIN="$ROOT/target/debug/meridian"; BUILD=() ;;
  *) echo "run.sh: MERIDIAN_RUN_PROFILE is release or debug" >&2; exit 1 ;;
esac
if [ ! -x "$BIN" ]; then
  echo "run.sh: building Meridian ($PROFILE). The first build takes several minutes; later runs start at once." >&2
fi
cargo build "${BUILD[@]}" --quiet -p meridian
DEV=(--dev)
[ -n "${MERIDIAN_NO_DEV:-}" ] && DEV=()
# Where the page will be: the --http-addr given (flag or env), else the default.
HTTP="${MERIDIAN_HTTP_ADDR:-127.0.0.1:7880}"
DATA="${MERIDIAN_DATA_DIR:-meridian-data}"
prev=""
for a in "$@"; do
  case "$prev" in --http-addr) HTTP="$a" ;; --data-dir) DATA="$a" ;; esac
  case "$a" in --http-addr=*) HTTP="${a#--http-addr=}" ;; --data-dir=*) DATA="${a#--data-dir=}" ;; esac
  prev="$a"
done
# The data dir holds the token signing key: owner-only.
[ -d "$DATA" ] || mkdir -m 700 -p "$DATA"
PROBE="${HTTP/0.0.0.0/127.0.0.1}"
PROBE="${PROBE/\[::\]/[::1]}"
"$BIN" serve --web-root "$WEB/dist" "${DEV[@]}" "$@" &
PID=$!
trap 'kill -TERM "$PID" 2>/dev/null || true' INT TERM
for _ in $(seq 1 300); do
  if ! kill -0 "$PID" 2>/dev/null; then
    wait "$PID" || exit $?
    exit 0
  fi
  if curl -fsS -o /dev/null --max-time 1 "http://$PROBE/healthz" 2>/dev/null; then
    if [ ${#DEV[@]} -gt 0 ]; then
      echo "run.sh: Meridian is up: open http://$PROBE/ and join with an identity and a display name (dev mode)" >&2
    else
      echo "run.sh: Meridian is up: open http://$PROBE/?token=<token> (meridian token create --room demo --identity me --publish)" >&2
    fi
    break
  fi
  sleep 0.2
done
wait "$PID"
