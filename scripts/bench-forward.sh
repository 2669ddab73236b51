#!/usr/bin/env bash
# Forwarding at saturation (issue 12), honestly: one node pinned to CPU 0, the load
# generator pinned to CPU 1 in its own network namespace behind a veth pair (so the
# kernel does the work a NIC path would), subscribers that complete ICE and DTLS and
# then only count SRTP packets in batches (no decrypt), and the kernel floor
# (../shared/tools/kernel-floor/run.sh) measured in the same run.
#
# Run as root from the repository root:
#   cargo build --release -p meridian
#   sudo scripts/bench-forward.sh                      # SUBS="50 200 500", 1 publisher
#   SUBS="200" PUBS=4 KBPS=1000 scripts/bench-forward.sh
#
# Environment:
#   NODE_BIN     node binary (default target/release/meridian)
#   LOADGEN_BIN  load generator binary (default target/release/meridian)
#   SUBS         subscriber counts to run, one run each (default "50 200 500")
#   PUBS         publishers (default 1)
#   ROOMS        rooms the publishers and subscribers are spread over (default 1;
#                a room lives on one media worker, so 2 workers need 2 rooms)
#   KBPS         VP8 bitrate of each publisher, one stream (default 1000) + Opus
#   SIMULCAST    1: publishers send three simulcast layers (150, 500, KBPS kbit/s)
#                instead of one stream at KBPS
#   FPS          video frames per second (default 30)
#   DURATION     measured seconds per run (default 10s), after WARMUP (default 4s)
#   FLOOR        1: run the kernel-floor tool before the first run and after the last
#   OUT          JSON lines appended here (default /tmp/bench-forward.jsonl)
#   LABEL        tag written into each JSON line (e.g. "before", "after")
#   WORKERS      the node's --media-workers (default 1; "" leaves the node's default,
#                one per core it may use)
#   NODE_CPU     CPUs the node is pinned to with taskset (default 0; "0,1" for a
#                2-worker run on this 2-core machine, then the load generator shares
#                CPU 1 with worker 1)
#   LOAD_CPU     CPUs the load generator is pinned to (default 1)
#   COUNT        1 (default): subscribers are counting receivers (`--count-only`);
#                0: full receivers that decrypt and assemble every packet and send
#                TWCC feedback and receiver reports as browsers do (the load generator
#                then costs more per packet than the node: small rooms only)
#   EXTRA_NODE_ARGS, EXTRA_LOADGEN_ARGS  more flags for `meridian serve` / `loadgen`
#                (e.g. `--config F`, `--until-refused`)
#   PERF         if set, a path prefix: the node is profiled with `perf record`
#                (flat, 999 Hz, all its threads) for DURATION seconds, starting
#                PERF_DELAY seconds (default 15) after it started; written to
#                $PERF.<subs>.data (read with `perf report -i ... --sort dso,sym`)
#
# Each run prints the load generator's summary (the node's log is left in
# /tmp/bench-forward.<label>.<subs>.node.log); its JSON line (plus the machine's
# load average and the kernel's UDP drop counters of both sides) goes to $OUT.
# It also prints the node's memory: its resident set when idle, while streaming (one
# second before the window ends) and at its peak (/proc VmRSS, VmHWM), and the growth
# per subscriber.
# The network namespace, veth pair and node are removed on exit, also after failure.
set -euo pipefail
cd "$(dirname "$0")/.."

NODE_BIN=${NODE_BIN:-target/release/meridian}
LOADGEN_BIN=${LOADGEN_BIN:-target/release/meridian}
SUBS=${SUBS:-"50 200 500"}
PUBS=${PUBS:-1}
ROOMS=${ROOMS:-1}
KBPS=${KBPS:-1000}
LAYERS=--single-layer
[ "${SIMULCAST:-0}" = 1 ] && LAYERS=
FPS=${FPS:-30}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-4s}
FLOOR=${FLOOR:-1}
OUT=${OUT:-/tmp/bench-forward.jsonl}
LABEL=${LABEL:-run}
NODE_CPU=${NODE_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
EXTRA_NODE_ARGS=${EXTRA_NODE_ARGS:-}
EXTRA_LOADGEN_ARGS=${EXTRA_LOADGEN_ARGS:-}
COUNT_ARGS=--count-only
[ "${COUNT:-1}" = 0 ] && COUNT_ARGS=
WORKERS=${WORKERS-1}
WORKER_ARGS=
[ -n "$WORKERS" ] && WORKER_ARGS="--media-workers $WORKERS"

NS=mbench
VH=vmb-h
VN=vmb-n
HOST_IP=10.79.0.1
NS_IP=10.79.0.2
HTTP=$HOST_IP:7890
DATA=$(mktemp -d /tmp/bench-forward.XXXXXX)
NODE_PID=

cleanup() {
  if [ -n "$NODE_PID" ]; then kill "$NODE_PID" 2>/dev/null || true; wait "$NODE_PID" 2>/dev/null || true; fi
  ip netns del "$NS" 2>/dev/null || true
  ip link del "$VH" 2>/dev/null || true
  rm -rf "$DATA"
}
trap cleanup EXIT
cleanup_net() { ip netns del "$NS" 2>/dev/null || true; ip link del "$VH" 2>/dev/null || true; }

udp_drops() { # RcvbufErrors SndbufErrors of a netns ("" = host)
  local cmd=(cat /proc/net/snmp)
  [ -n "$1" ] && cmd=(ip netns exec "$1" cat /proc/net/snmp)
  "${cmd[@]}" | awk '/^Udp:/ { if (h) { print $6, $7 } else { h = 1 } }'
}

floor() {
  if [ "$FLOOR" = 1 ]; then
    echo "== kernel floor ($1)"
    /work/shared/tools/kernel-floor/run.sh | tee -a /dev/stderr \
      | sed "s/^{/{\"label\":\"$LABEL\",\"kernel_floor\":\"$1\",/" >> "$OUT"
  fi
}

cleanup_net
floor before

ip netns add "$NS"
ip link add "$VH" type veth peer name "$VN"
ip link set "$VN" netns "$NS"
ip addr add "$HOST_IP/24" dev "$VH"
ip link set "$VH" up
ip netns exec "$NS" ip addr add "$NS_IP/24" dev "$VN"
ip netns exec "$NS" ip link set "$VN" up
ip netns exec "$NS" ip link set lo up

for subs in $SUBS; do
  echo "== $LABEL: $PUBS publisher(s) at $KBPS kbit/s → $subs subscribers, node ($WORKER_ARGS) on CPU $NODE_CPU, load generator on CPU $LOAD_CPU"
  echo "   load average: $(cut -d' ' -f1-3 /proc/loadavg)"
  # shellcheck disable=SC2086
  taskset -c "$NODE_CPU" "$NODE_BIN" serve --data-dir "$DATA" --http-addr "$HTTP" \
    --media-addr "$HOST_IP:7892" --wt-addr "$HOST_IP:7891" --internal-listen "$HOST_IP:7893" --node-id bench \
    $WORKER_ARGS $EXTRA_NODE_ARGS > "$DATA/node.log" 2>&1 &
  NODE_PID=$!
  for _ in $(seq 100); do
    curl -fs "http://$HTTP/healthz" > /dev/null 2>&1 && break
    sleep 0.1
  done
  rss_idle=$(awk '/^VmRSS/ {print $2}' "/proc/$NODE_PID/status")
  # The node's resident set one second before the measured window ends (every
  # subscriber joined and streaming).
  (sleep $(( ${WARMUP%s} + ${DURATION%s} - 1 )); awk '/^VmRSS/ {print $2}' "/proc/$NODE_PID/status" > "$DATA/rss") &
  if [ -n "${PERF:-}" ]; then
    (sleep "${PERF_DELAY:-15}"; perf record -F 999 -o "$PERF.$subs.data" -p "$NODE_PID" \
      -- sleep "${DURATION%s}") > "$DATA/perf.log" 2>&1 &
  fi
  host_before=$(udp_drops "")
  ns_before=$(udp_drops "$NS")
  load_before=$(cut -d' ' -f1 /proc/loadavg)
  ip netns exec "$NS" taskset -c "$LOAD_CPU" "$LOADGEN_BIN" loadgen \
    --url "ws://$HTTP/signal" --data-dir "$DATA" --bind-ip "$NS_IP" \
    --publishers "$PUBS" --subscribers "$subs" --rooms "$ROOMS" $LAYERS \
    --layer-kbps "150,500,$KBPS" --fps "$FPS" $COUNT_ARGS \
    --duration "$DURATION" --warmup "$WARMUP" \
    --ping-interval 1s --ping-timeout 30s \
    --node-pid "$NODE_PID" --node-metrics "https://$HOST_IP:7893" --json $EXTRA_LOADGEN_ARGS \
    | tee "$DATA/loadgen.out"
  # The node's resident set while streaming and at its peak (VmHWM: joins included)
  # against its idle one.
  rss_peak=$(awk '/^VmHWM/ {print $2}' "/proc/$NODE_PID/status")
  rss_run=$(cat "$DATA/rss" 2>/dev/null || echo "$rss_idle")
  echo "   node memory: idle RSS ${rss_idle} KiB, streaming ${rss_run} KiB ($(( (rss_run - rss_idle) / subs )) KiB per subscriber), peak ${rss_peak} KiB ($(( (rss_peak - rss_idle) / subs )) KiB per subscriber)"
  read -r h_rcv h_snd <<< "$host_before"
  read -r n_rcv n_snd <<< "$ns_before"
  read -r h_rcv2 h_snd2 <<< "$(udp_drops "")"
  read -r n_rcv2 n_snd2 <<< "$(udp_drops "$NS")"
  tail -n1 "$DATA/loadgen.out" | sed "s/^{/{\"label\":\"$LABEL\",\"loadavg\":$load_before,\"node_rcvbuf_drops\":$((h_rcv2 - h_rcv)),\"node_sndbuf_drops\":$((h_snd2 - h_snd)),\"loadgen_rcvbuf_drops\":$((n_rcv2 - n_rcv)),/" >> "$OUT"
  echo "   UDP drops during the run (whole run, joins included): node receive $((h_rcv2 - h_rcv)), node send $((h_snd2 - h_snd)), load generator receive $((n_rcv2 - n_rcv))"
  kill "$NODE_PID"; wait "$NODE_PID" 2>/dev/null || true; NODE_PID=
  cp "$DATA/node.log" "/tmp/bench-forward.$LABEL.$subs.node.log"
  rm -rf "${DATA:?}"/*
done

cleanup_net
floor after
echo "results appended to $OUT"
