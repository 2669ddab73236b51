#!/usr/bin/env bash
# Installs what the browser end-to-end test (tests/browser) needs, idempotently:
#   - Debian's chromium at /usr/bin/chromium (apt-get update only when installing)
#   - tests/browser/node_modules and web-client/node_modules via `npm ci`, each redone
#     when its package-lock.json changes
# Never downloads a browser build of its own. Fast (< 2 s) when all is installed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BROWSER_DIR="$ROOT/tests/browser"
export DEBIAN_FRONTEND=noninteractive
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
fi

if [ ! -x /usr/bin/chromium ]; then
  echo "install-test-deps: installing chromium (Debian package)"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    chromium fonts-liberation >/dev/null
fi
[ -x /usr/bin/chromium ] || { echo "install-test-deps: /usr/bin/chromium still missing" >&2; exit 1; }

if ! command -v npm >/dev/null 2>&1; then
  echo "install-test-deps: installing nodejs + npm (Debian packages)"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi

for DIR in "$BROWSER_DIR" "$ROOT/web-client"; do
  STAMP="$DIR/node_modules/.lockfile.sha256"
  WANT="$(sha256sum "$DIR/package-lock.json" | cut -d' ' -f1)"
  if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "install-test-deps: npm ci in ${DIR#"$ROOT"/}"
    (cd "$DIR" && npm ci --no-audit --no-fund --loglevel=error)
    echo "$WANT" > "$STAMP"
  fi
done
echo "install-test-deps: ok (chromium: $(/usr/bin/chromium --version 2>/dev/null | head -1), node $(node --version))"
