#!/usr/bin/env bash
# Chaos benchmark (issue 15): a release node impairs its own media socket like netem on
# a pod's interface (`meridian serve --dev --impair …`, egress, seeded: one impaired
# hop, as the article did), and the load generator (2 publishers, 20 subscribers by
# default) measures what its receivers play out. One run per scenario; each prints the
# load generator's summary and appends its JSON line to $OUT; every video frame latency
# goes to $PLOTDIR/<scenario>.txt, and a CDF of them is drawn to $PLOTDIR/latency-cdf.png
# (python3 + matplotlib; installed with pip when missing).
#
# Run from the repository root:
#   cargo build --release -p meridian
#   scripts/bench-chaos.sh                       # every scenario, 60 s each
#   SCENARIOS="clean loss2" DURATION=20s scripts/bench-chaos.sh
#
# Environment:
#   BIN          meridian binary (default target/release/meridian)
#   PUBS, SUBS   publishers and subscribers (default 2 and 20)
#   DURATION     measured time per run (default 60s), after WARMUP (default 5s)
#   SCENARIOS    subset of: clean loss2-hold loss2 loss2-red loss5-red burst-red
#                loss2-fec loss5-fec burst-fec (default: all)
#   OUT          JSON lines appended here (default /tmp/bench-chaos.jsonl)
#   PLOTDIR      latency samples and the PNG (default /tmp/bench-chaos)
#   NODE_CPU, LOAD_CPU  CPUs the node and the load generator are pinned to (0, 1)
#   NODE_ARGS    extra arguments for `meridian serve` (e.g. `--config off.toml` with
#                `[media] rtx_copy_loss = 0` to compare without retransmission copies)
#   TAG          suffix of the scenario names in $OUT and $PLOTDIR (compare variants)
#
# Scenarios (all with delay=200ms,jitter=20ms on the node's egress except `clean`):
#   clean       no impairment (node CPU before chaos)
#   loss2-hold  2 % loss, receivers hold later frames until NACK repairs (no deadline)
#   loss2       2 % loss, receivers with a 100 ms playout deadline (skip + keyframe)
#   loss2-red   the same with audio RED negotiated (redundancy on)
#   loss5-red   5 % loss, deadline, RED
#   burst-red   2 % loss in Gilbert-Elliott bursts of 4 packets on average, deadline, RED
#   loss2-fec, loss5-fec, burst-fec  the three above with video FEC too (`--fec`: the
#               node sends ULPFEC at a rate following each subscriber's reported loss)
# FEC off vs on: SCENARIOS="loss2-red loss2-fec" draws both CDFs in one PNG.
#
# BROWSER (default empty) adds runs of two headless Chromium pages against the same
# binary (tests/browser/chaos-stats.mjs: getStats figures as one JSON line, appended to
# $OUT; needs the built web client and tests/browser/node_modules), after the scenarios:
#   clean (no impairment), red (2 % with audio RED and video FEC, both negotiated by
#   default), nored (2 %, audio RED stripped), nofec (2 %, video FEC stripped).
#   SCENARIOS= BROWSER="clean red nored nofec" DURATION=30s scripts/bench-chaos.sh
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-target/release/meridian}
PUBS=${PUBS:-2}
SUBS=${SUBS:-20}
DURATION=${DURATION:-60s}
WARMUP=${WARMUP:-5s}
SCENARIOS=${SCENARIOS-"clean loss2-hold loss2 loss2-red loss5-red burst-red loss2-fec loss5-fec burst-fec"}
OUT=${OUT:-/tmp/bench-chaos.jsonl}
PLOTDIR=${PLOTDIR:-/tmp/bench-chaos}
NODE_CPU=${NODE_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
HTTP=${HTTP:-127.0.0.1:7990}
MEDIA=${MEDIA:-127.0.0.1:7992}
WT=${WT:-127.0.0.1:7991}
METRICS=${METRICS:-127.0.0.1:7993}
DATA=$(mktemp -d /tmp/bench-chaos.XXXXXX)
NODE_PID=
mkdir -p "$PLOTDIR"

cleanup() {
  if [ -n "$NODE_PID" ]; then kill "$NODE_PID" 2>/dev/null || true; wait "$NODE_PID" 2>/dev/null || true; fi
  rm -rf "$DATA"
}
trap cleanup EXIT

CHAOS="delay=200ms,jitter=20ms"
for scenario in $SCENARIOS; do
  deadline=100ms
  red=()
  case $scenario in
    clean) impair="" ;;
    loss2-hold) impair="$CHAOS,loss=2%"; deadline=off ;;
    loss2) impair="$CHAOS,loss=2%" ;;
    loss2-red) impair="$CHAOS,loss=2%"; red=(--red) ;;
    loss5-red) impair="$CHAOS,loss=5%"; red=(--red) ;;
    burst-red) impair="$CHAOS,loss=2%,burst=4"; red=(--red) ;;
    loss2-fec) impair="$CHAOS,loss=2%"; red=(--red --fec) ;;
    loss5-fec) impair="$CHAOS,loss=5%"; red=(--red --fec) ;;
    burst-fec) impair="$CHAOS,loss=2%,burst=4"; red=(--red --fec) ;;
    *) echo "unknown scenario $scenario" >&2; exit 2 ;;
  esac
  echo "== $scenario: impair ${impair:-none} (node egress), playout deadline $deadline, ${red[*]:-no RED}, $PUBS publishers → $SUBS subscribers, $DURATION"
  echo "   load average: $(cut -d' ' -f1-3 /proc/loadavg)"
  args=(serve --dev --data-dir "$DATA" --http-addr "$HTTP" --media-addr "$MEDIA"
        --wt-addr "$WT" --metrics-listen "$METRICS" --node-id chaos)
  [ -n "$impair" ] && args+=(--impair "$impair" --impair-direction egress --impair-seed 7)
  read -ra extra <<< "${NODE_ARGS:-}"
  args+=("${extra[@]}")
  taskset -c "$NODE_CPU" "$BIN" "${args[@]}" > "$DATA/node.log" 2>&1 &
  NODE_PID=$!
  for _ in $(seq 100); do
    curl -fs "http://$HTTP/healthz" > /dev/null 2>&1 && break
    sleep 0.1
  done
  taskset -c "$LOAD_CPU" "$BIN" loadgen --url "ws://$HTTP/signal" --data-dir "$DATA" \
    --publishers "$PUBS" --subscribers "$SUBS" --duration "$DURATION" --warmup "$WARMUP" \
    --playout-deadline "$deadline" "${red[@]}" --latency-out "$PLOTDIR/$scenario${TAG:-}.txt" \
    --ping-interval 1s --ping-timeout 30s \
    --node-pid "$NODE_PID" --node-metrics "$METRICS" --json | tee "$DATA/loadgen.out"
  tail -n1 "$DATA/loadgen.out" | sed "s/^{/{\"scenario\":\"$scenario${TAG:-}\",\"injected_delay_ms\":$([ -n "$impair" ] && echo 200 || echo 0),/" >> "$OUT"
  echo "   node: $(curl -fs "http://$METRICS/metrics" | grep -E '^meridian_(rtx_copies|fec_bytes)_total' | tr '\n' ' ')"
  kill "$NODE_PID"; wait "$NODE_PID" 2>/dev/null || true; NODE_PID=
  rm -rf "${DATA:?}"/*
done

for run in ${BROWSER:-}; do
  case $run in
    clean) benv=(IMPAIR=off RED=1 FEC=1) ;;
    red) benv=(IMPAIR="$CHAOS,loss=2%" RED=1 FEC=1) ;;
    nored) benv=(IMPAIR="$CHAOS,loss=2%" RED=0 FEC=1) ;;
    nofec) benv=(IMPAIR="$CHAOS,loss=2%" RED=1 FEC=0) ;;
    *) echo "unknown browser run $run" >&2; exit 2 ;;
  esac
  echo "== browser-$run: ${benv[*]}, two Chromium pages, $DURATION"
  env "${benv[@]}" DURATION="${DURATION%s}" MERIDIAN_BIN="$(realpath "$BIN")" node tests/browser/chaos-stats.mjs \
    | sed "s/^{/{\"scenario\":\"browser-$run\",/" | tee -a "$OUT"
done
[ -n "$SCENARIOS" ] || exit 0

if ! python3 -c 'import matplotlib' 2>/dev/null; then
  python3 -m pip install --quiet matplotlib 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages matplotlib
fi
python3 - "$PLOTDIR" $SCENARIOS <<'EOF'
import sys, os
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
plotdir, scenarios = sys.argv[1], sys.argv[2:]
fig, ax = plt.subplots(figsize=(8, 5))
for s in scenarios:
    s += os.environ.get("TAG", "")
    path = os.path.join(plotdir, s + ".txt")
    if not os.path.exists(path):
        continue
    v = sorted(float(l) for l in open(path) if l.strip())
    if not v:
        continue
    ax.plot(v, [(i + 1) / len(v) for i in range(len(v))], label=f"{s} (n={len(v)})")
ax.axvline(200 + 150, color="grey", linestyle=":", label="200 ms injected + 150 ms goal")
ax.set_xlabel("video frame latency, ms (publisher send → subscriber playout)")
ax.set_ylabel("fraction of frames")
ax.set_xscale("log")
ax.grid(True, which="both", alpha=0.3)
ax.legend()
ax.set_title("Frame latency CDF, node-side 200 ms delay + 20 ms jitter")
out = os.path.join(plotdir, "latency-cdf.png")
fig.savefig(out, dpi=110, bbox_inches="tight")
print("plot:", out)
EOF
