#!/usr/bin/env bash
# Runs each fuzz target in fuzz/ for a bounded time (default 20 s each, FUZZ_SECS to
# change) from the seed corpus in fuzz/corpus/<target>. New inputs go to a scratch
# directory, so the repository stays clean; a crash leaves its input under
# fuzz/artifacts/<target>/ and fails the script (turn it into a regression test).
#
# cargo fuzz needs nightly-only compiler flags (sanitizer coverage); RUSTC_BOOTSTRAP=1
# lets the stable toolchain accept them. cargo-fuzz is installed from crates.io when
# missing.
#   scripts/fuzz.sh                  # every target, 20 s each
#   FUZZ_SECS=300 scripts/fuzz.sh jwt_verify
#   FUZZ_RELEASE=1 FUZZ_SECS=600 scripts/fuzz.sh   # optimised build: far more runs per second
set -euo pipefail
cd "$(dirname "$0")/.."

export RUSTC_BOOTSTRAP=1
SECS="${FUZZ_SECS:-20}"
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install --locked cargo-fuzz
fi
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
  TARGETS=(signaling_decode sdp_offer jwt_verify datagram_router)
fi
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
cd fuzz
# Debug assertions on (--dev) unless FUZZ_RELEASE=1; one build for every target.
PROFILE=(--dev)
if [ "${FUZZ_RELEASE:-0}" = 1 ]; then PROFILE=(); fi
cargo fuzz build "${PROFILE[@]}"
for t in "${TARGETS[@]}"; do
  mkdir -p "$SCRATCH/$t"
  echo "fuzz.sh: $t for ${SECS}s"
  cargo fuzz run "${PROFILE[@]}" "$t" "$SCRATCH/$t" "corpus/$t" -- \
    -max_total_time="$SECS" -max_len=65536 -rss_limit_mb=2048 -timeout=10 -print_final_stats=1
done
echo "fuzz.sh: no crash in ${#TARGETS[@]} target(s)"
