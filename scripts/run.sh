#!/usr/bin/env bash
# Runs Meridian locally: builds the web client when web-client/dist is missing or older
# than its sources (npm ci && npm run build), then `meridian serve --dev` (release build)
# with any extra flags given, and prints the address to open.
#   scripts/run.sh                         # http://127.0.0.1:7880/  (dev mode: join with any name)
#   scripts/run.sh --http-addr 0.0.0.0:8080 --public-ip 203.0.113.7
#   MERIDIAN_NO_DEV=1 scripts/run.sh       # without dev mode: the page asks for a token
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

DEV=(--dev)
[ -n "${MERIDIAN_NO_DEV:-}" ] && DEV=()
echo "run.sh: open http://127.0.0.1:7880/ (or the --http-addr you gave)${DEV:+ and join with any name (dev mode)}" >&2
exec cargo run --release -p meridian -- serve --web-root "$WEB/dist" "${DEV[@]}" "$@"
