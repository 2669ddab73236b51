#!/usr/bin/env bash
# Join time per transport and per store: one release node (embedded SQLite, or the
# local Postgres in a fresh database), one publisher and 100 subscribers joining one room
# one after the other; prints `joined` and first-frame p50/p95 for each combination.
#   scripts/bench-join.sh [runs per combination, default 1]
# Needs the release binary (cargo build --release -p meridian) and, for Postgres,
# 127.0.0.1:5432 (scripts/start-postgres.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-1}"
BIN=target/release/meridian
[ -x "$BIN" ] || { echo "bench-join: build first: cargo build --release -p meridian" >&2; exit 1; }
WORK="$(mktemp -d /tmp/meridian-bench-join.XXXXXX)"
NODE=""
cleanup() {
  [ -n "$NODE" ] && kill "$NODE" 2>/dev/null && wait "$NODE" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

start_node() { # $1 = sqlite|postgres
  local db=()
  rm -rf "$WORK/data" && mkdir -p "$WORK/data"
  if [ "$1" = postgres ]; then
    psql -q -h 127.0.0.1 -U postgres -d postgres -c "DROP DATABASE IF EXISTS meridian_bench_join" \
      -c "CREATE DATABASE meridian_bench_join" >/dev/null
    db=(--database-url postgres://postgres@127.0.0.1:5432/meridian_bench_join)
  fi
  "$BIN" serve --dev --data-dir "$WORK/data" "${db[@]}" --http-addr 127.0.0.1:7890 \
    --wt-addr 127.0.0.1:7891 --media-addr 127.0.0.1:7892 >"$WORK/node.log" 2>&1 &
  NODE=$!
  for _ in $(seq 1 100); do
    curl -sf http://127.0.0.1:7890/healthz >/dev/null && return 0
    sleep 0.1
  done
  echo "bench-join: the node did not start; its log:" >&2
  cat "$WORK/node.log" >&2
  exit 1
}

printf '%-9s %-4s %-22s %-22s\n' store tr 'joined p50/p95 ms' 'first frame p50/p95 ms'
for store in sqlite postgres; do
  for tr in ws wt; do
    for _ in $(seq 1 "$RUNS"); do
      start_node "$store"
      out="$("$BIN" loadgen --url ws://127.0.0.1:7890/signal --transport "$tr" --data-dir "$WORK/data" \
        --publishers 1 --subscribers 100 --warmup 2s --duration 3s --layer-kbps 50,100,200 --json | tail -1)"
      printf '%-9s %-4s %-22s %-22s\n' "$store" "$tr" \
        "$(jq -r '"\(.join_ms_p50*10|round/10) / \(.join_ms_p95*10|round/10)"' <<<"$out")" \
        "$(jq -r '"\(.first_frame_ms_p50*10|round/10) / \(.first_frame_ms_p95*10|round/10)"' <<<"$out")"
      kill "$NODE"; wait "$NODE" 2>/dev/null || true; NODE=""
    done
  done
done
