#!/usr/bin/env bash
# Runs every Meridian test on a fresh machine: installs what the tests need
# (Debian's chromium, Node.js/npm when missing, the npm packages of web-client/ and
# tests/browser/, Debian's postgresql when missing; later the deploy tools, see
# scripts/install-deploy-tools.sh), starts the local Postgres if it is down, then runs
# the Rust test suite, checks the SDK's generated protocol types against the Rust crate,
# the web client's unit tests (vitest), build and API reference (typedoc), and the
# headless-Chromium tests against the real binary serving that build.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-test-deps.sh
bash scripts/start-postgres.sh

export CARGO_TERM_COLOR=never
# Style, lints and docs first: they fail fast.
cargo fmt --all -- --check
# Merge-conflict markers left in any tracked file (docs included; the compiler sees only code).
if git grep -nE '^(<<<<<<<|>>>>>>>) ' -- . ':!*.lock' >&2; then
  echo "test.sh: merge-conflict markers in the files above" >&2
  exit 1
fi
cargo clippy --locked --workspace --all-targets -- -D warnings
RUSTDOCFLAGS=-Dwarnings cargo doc --locked --workspace --no-deps
cargo build --locked -p meridian
# Includes tests/tests/fuzz_replay.rs: every fuzz/ target's corpus replayed, then
# FUZZ_SECS (20) seconds of mutated inputs per target (stable toolchain, no cargo-fuzz).
FUZZ_SECS="${FUZZ_SECS:-20}" cargo test --locked --workspace --no-fail-fast
# The attacker soak (issue 17): a bounded run of every attack, the spoofed-STUN one from
# a network namespace it creates (root); fails if the media room loses a track.
SOAK_SECS="${SOAK_SECS:-30}" cargo test --locked -p meridian --bench soak
bash scripts/check-ts-types.sh

(cd web-client && npm test && npm run build && npm run docs)
if [ -n "$(git status --porcelain -- web-client/docs/sdk-api)" ]; then
  echo "test.sh: web-client/docs/sdk-api is out of date with the SDK: run" \
    "(cd web-client && npm run docs) and commit it" >&2
  git status --short -- web-client/docs/sdk-api >&2
  exit 1
fi

MERIDIAN_BIN="$PWD/target/debug/meridian" npm --prefix tests/browser test

# deploy/: the chart rendered and validated for 1 and 3 regions, rules, image lint; broken values refused.
bash scripts/check-deploy.sh
bash deploy/tests/test-check-deploy.sh
