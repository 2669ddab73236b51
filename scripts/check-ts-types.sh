#!/usr/bin/env bash
# Checks that the web SDK's protocol types (web-client/src/sdk/generated/, written by
# ts-rs from crates/meridian-protocol) match the Rust crate: regenerates them and fails
# when the checked-in files differ (run it, then commit the result, to fix).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
GEN=web-client/src/sdk/generated
rm -rf "$GEN"
cargo test --locked -q -p meridian-protocol --features ts --lib export_bindings >/dev/null
if ! git diff --exit-code --stat -- "$GEN" || [ -n "$(git ls-files --others --exclude-standard -- "$GEN")" ]; then
  echo "check-ts-types: $GEN is out of date with crates/meridian-protocol;" \
    "run scripts/check-ts-types.sh and commit the result" >&2
  git ls-files --others --exclude-standard -- "$GEN" >&2
  exit 1
fi
echo "check-ts-types: $GEN matches crates/meridian-protocol"
