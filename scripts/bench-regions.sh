#!/usr/bin/env bash
# The multi-region simulation (docs/benchmarks.md, "Regions"): three regions (eu, us,
# ap) in network namespaces made here, each with its own throwaway Postgres cluster
# (its own event log) and two `meridian serve` nodes; clients (`meridian loadgen
# --login`) in each region's namespace probe every region, log in and join the
# nearest. Most rooms have members of one region; two rooms span regions (`x3`: a
# publisher in eu, subscribers in eu, us and ap; `xua`: a publisher in us, subscribers
# in ap), so their parts in each region are linked by cross-region relay links. Between
# regions every packet crosses a router namespace whose TUN device
# is served by `meridian-netsim` (str0m-netem): EU–US 40 ms, US–AP 75 ms, EU–AP 110 ms
# one way (+ WAN_LOSS). Midway both nodes of VICTIM are SIGKILLed; its clients re-home
# to their next region, and the other regions' parts of `x3` keep running. The
# subscribers in ap of the cross rooms measure before the failure (they leave 2 s
# before it). The last line printed is one JSON object.
#
# Root only (ip netns). Everything made here is removed on every exit path.
# Knobs (env): ROOMS (per region, 4), PUBS (per room, 1), SUBS (per room, 2),
# DURATION (s of measurement, 24), KILL_AT (s after the clients start, 16),
# VICTIM (ap), WAN_LOSS (0%), MERIDIAN_BIN / NETSIM_BIN (default: a debug build),
# KEEP=1 (keep the work folder with every log), PLOT=FILE.png (where the plot of
# locality, latency per region pair and probe RTTs goes; default target/bench-regions.png).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[ "$(id -u)" -eq 0 ] || { echo "bench-regions: needs root (ip netns)" >&2; exit 1; }

ROOMS=${ROOMS:-4}
PUBS=${PUBS:-1}
SUBS=${SUBS:-2}
DURATION=${DURATION:-24}
KILL_AT=${KILL_AT:-16}
VICTIM=${VICTIM:-ap}
WAN_LOSS=${WAN_LOSS:-0%}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
REGIONS=(eu us ap)
NET=10.213 # region i is $NET.i.0/24: .2 and .3 nodes, .4 Postgres, .5 clients
TAG="mrg$$"

if [ -z "${MERIDIAN_BIN:-}" ] || [ -z "${NETSIM_BIN:-}" ]; then
  cargo build -q -p meridian -p meridian-netsim
fi
BIN=${MERIDIAN_BIN:-$ROOT/target/debug/meridian}
NETSIM=${NETSIM_BIN:-$ROOT/target/debug/meridian-netsim}

WORK=$(mktemp -d /tmp/meridian-regions.XXXXXX)
chmod 755 "$WORK"
PIDS=()
cleanup() {
  set +e
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
  for r in "${REGIONS[@]}"; do
    [ -d "$WORK/pg-$r" ] && runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/pg-$r" -m immediate stop >/dev/null 2>&1
  done
  for ns in "$TAG-wan" "${REGIONS[@]/#/$TAG-}"; do ip netns del "$ns" 2>/dev/null; done
  if [ -n "${KEEP:-}" ]; then
    echo "bench-regions: kept $WORK" >&2
  else
    rm -rf "$WORK" 2>/dev/null || { sleep 1; rm -rf "$WORK"; }
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "bench-regions: $*" >&2; }
in_ns() { local ns=$1; shift; ip netns exec "$TAG-$ns" "$@"; }

# ---- network: a router namespace, one namespace per region ----
ip netns add "$TAG-wan"
in_ns wan sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 \
  net.ipv4.conf.default.rp_filter=0 net.ipv4.conf.all.send_redirects=0
in_ns wan ip link set lo up
for i in 1 2 3; do
  r=${REGIONS[$((i - 1))]}
  ip netns add "$TAG-$r"
  ip link add "$TAG-$r" type veth peer name "$TAG-w$r"
  ip link set "$TAG-$r" netns "$TAG-$r"
  ip link set "$TAG-w$r" netns "$TAG-wan"
  in_ns "$r" ip link set lo up
  for h in 2 3 4 5; do in_ns "$r" ip addr add "$NET.$i.$h/24" dev "$TAG-$r"; done
  in_ns "$r" ip link set "$TAG-$r" up
  in_ns "$r" ip route add default via "$NET.$i.1"
  in_ns wan ip addr add "$NET.$i.1/24" dev "$TAG-w$r"
  in_ns wan sysctl -qw "net.ipv4.conf.$TAG-w$r.rp_filter=0"
  in_ns wan ip link set "$TAG-w$r" up
done
# Every packet between regions goes into the TUN device (table 200); what netsim
# writes back (iif mrwan0) is routed normally.
# (`ip netns exec` execs the program: $! is its own pid, so kill reaches it.)
ip netns exec "$TAG-wan" "$NETSIM" --tun mrwan0 --seed 7 \
  --region "eu=$NET.1.0/24" --region "us=$NET.2.0/24" --region "ap=$NET.3.0/24" \
  --link "eu:us=40ms,$WAN_LOSS" --link "us:ap=75ms,$WAN_LOSS" --link "eu:ap=110ms,$WAN_LOSS" \
  --stats "$WORK/wan.json" 2>"$WORK/netsim.err" &
PIDS+=($!)
for _ in $(seq 1 100); do in_ns wan ip link show mrwan0 >/dev/null 2>&1 && break; sleep 0.05; done
in_ns wan ip link set mrwan0 up
in_ns wan sysctl -qw net.ipv4.conf.mrwan0.rp_filter=0
in_ns wan ip rule add iif mrwan0 lookup main pref 100
in_ns wan ip route add default dev mrwan0 table 200
in_ns wan ip rule add lookup 200 pref 200

# ---- one Postgres cluster per region: each region's own log ----
for i in 1 2 3; do
  r=${REGIONS[$((i - 1))]}
  install -d -o postgres -m 700 "$WORK/pg-$r"
  runuser -u postgres -- "$PGBIN/initdb" -D "$WORK/pg-$r" -A trust -U postgres >/dev/null
  echo "host all all $NET.0.0/16 trust" >>"$WORK/pg-$r/pg_hba.conf"
  in_ns "$r" runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/pg-$r" -w -l "$WORK/pg-$r/server.log" \
    -o "-h $NET.$i.4 -p 5432 -k $WORK/pg-$r -c fsync=off -c max_connections=200" start >/dev/null
done

# ---- one internal CA for every region (cross-region relay control is mutual TLS) ----
PKI_NAMES=(--name 127.0.0.1)
for i in 1 2 3; do for h in 2 3; do PKI_NAMES+=(--name "$NET.$i.$h"); done; done
"$BIN" config pki "$WORK/pki" "${PKI_NAMES[@]}" >/dev/null

# ---- keys: one token key for every node, and the identity provider's key ----
mkdir -p "$WORK/keys" "$WORK/idp"
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$WORK/keys/dev-1.es256.pem" 2>/dev/null
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$WORK/idp.pem" 2>/dev/null
openssl pkey -in "$WORK/idp.pem" -pubout -out "$WORK/idp/idp-1.es256.pub.pem" 2>/dev/null

# ---- the region directory, the same in every node's config ----
# The directory's prices, written once: every region's entry and the result's cost
# figures read them from here.
cat >"$WORK/prices.json" <<'JSON'
{"in_region_per_gb": 0.0, "cross_region_per_gb": 0.02, "internet_per_gb": 0.09, "remote_client_per_gb": 0.15}
JSON
# As a TOML inline table (every value written as a float).
PRICES_TOML=$(jq -r 'to_entries
  | map("\(.key) = \(.value | tostring | if test("[.eE]") then . else . + ".0" end)")
  | "{ \(join(", ")) }"' "$WORK/prices.json")
DIRECTORY=""
for i in 1 2 3; do
  r=${REGIONS[$((i - 1))]}
  DIRECTORY+="
[[regions]]
id = \"$r\"
signal_urls = [\"ws://$NET.$i.2:7880/signal\", \"ws://$NET.$i.3:7880/signal\"]
probe_url = \"http://$NET.$i.2:7880/probe\"
relay_addr = \"$NET.$i.2:7883\"
log = \"postgres://postgres@$NET.$i.4:5432/postgres\"
prices = $PRICES_TOML
"
done
declare -A NODE_PIDS
for i in 1 2 3; do
  r=${REGIONS[$((i - 1))]}
  for h in 2 3; do
    id="$r-$h"
    mkdir -p "$WORK/$id/keys" "$WORK/$id/internal"
    chmod 700 "$WORK/$id/keys"
    cp "$WORK/pki/"* "$WORK/$id/internal/"
    install -m 600 "$WORK/keys/dev-1.es256.pem" "$WORK/$id/keys/"
    cat >"$WORK/$id.toml" <<EOF
[node]
id = "$id"
region = "$r"
data_dir = "$WORK/$id"
database_url = "postgres://postgres@$NET.$i.4:5432/postgres"
[http]
addr = "$NET.$i.$h:7880"
[media]
addr = "$NET.$i.$h:7882"
[webtransport]
addr = "$NET.$i.$h:7881"
[internal]
listen = "$NET.$i.$h:7883"
[cluster]
checkpoint_interval_secs = 0
[login]
identity_keys_dir = "$WORK/idp"
$DIRECTORY
EOF
    "$BIN" config check "$WORK/$id.toml" >/dev/null
    ip netns exec "$TAG-$r" env RUST_LOG=warn "$BIN" serve --config "$WORK/$id.toml" >"$WORK/$id.out" 2>"$WORK/$id.err" &
    NODE_PIDS[$id]=$!
    PIDS+=($!)
  done
done
for i in 1 2 3; do
  r=${REGIONS[$((i - 1))]}
  for h in 2 3; do
    ok=""
    for _ in $(seq 1 100); do
      if in_ns "$r" curl -sf -o /dev/null "http://$NET.$i.$h:7880/readyz"; then ok=1; break; fi
      sleep 0.1
    done
    [ -n "$ok" ] || { log "node $r-$h did not become ready"; cat "$WORK/$r-$h.err" >&2; exit 1; }
  done
done
log "3 regions × 2 nodes ready; WAN eu-us 40 ms, us-ap 75 ms, eu-ap 110 ms one way (loss $WAN_LOSS)"

# ---- clients: each region's rooms, members all of that region ----
for i in 1 2 3; do
  r=${REGIONS[$((i - 1))]}
  ip netns exec "$TAG-$r" "$BIN" loadgen --login "http://$NET.$i.2:7880" --identity-key "$WORK/idp.pem" \
    --identity-kid idp-1 --publishers $((ROOMS * PUBS)) --subscribers $((ROOMS * SUBS)) \
    --rooms "$ROOMS" --room-prefix "$r-room" --bind-ip "$NET.$i.5" --layer-kbps 60,120,250 \
    --fps 15 --warmup 3s --duration "${DURATION}s" --json >"$WORK/lg-$r.out" 2>"$WORK/lg-$r.err" &
  PIDS+=($!)
  eval "LG_$r=$!"
done
# ---- clients of the rooms that span regions ----
# x3: publisher (+1 subscriber) in eu, SUBS subscribers in us (the whole run, through
# the failure) and in ap; xua: publisher in us, SUBS subscribers in ap. The clients in
# ap measure before the failure. Their warm-up (6 s from start) covers probing every
# region (~1.4 s from ap), the join, discovery and the link's set-up over the WAN.
CROSS_WARMUP=6
SHORT=$((KILL_AT - CROSS_WARMUP - 2))
cross_lg() { # name region-index region room pubs subs duration-s
  ip netns exec "$TAG-$3" "$BIN" loadgen --login "http://$NET.$2.2:7880" --identity-key "$WORK/idp.pem" \
    --identity-kid idp-1 --publishers "$5" --subscribers "$6" --rooms 1 --room-prefix "$4" \
    --bind-ip "$NET.$2.5" --layer-kbps 60,120,250 --fps 15 --warmup "${CROSS_WARMUP}s" --duration "${7}s" --json \
    >"$WORK/lg-$1.out" 2>"$WORK/lg-$1.err" &
  PIDS+=($!)
  eval "LG_$1=$!"
}
cross_lg x3eu 1 eu x3 1 1 "$DURATION"
sleep 1 # the publisher first: the subscribers' first frames then come from the relay
cross_lg x3us 2 us x3 0 "$SUBS" "$((DURATION - CROSS_WARMUP + 3))"
cross_lg x3ap 3 ap x3 0 "$SUBS" "$SHORT"
cross_lg xuaus 2 us xua 1 0 "$SHORT"
sleep 1
cross_lg xuaap 3 ap xua 0 "$SUBS" "$SHORT"

metrics_of() { # region index, region, host → "in_region cross_region copies_max relay_packets_in" of the node
  local pki="$WORK/pki" # the shared internal CA's operator certificate (mutual TLS)
  in_ns "$2" curl -sf --cacert "$pki/ca.pem" --cert "$pki/client.pem" --key "$pki/client.key" \
    "https://$NET.$1.$3:7883/metrics" 2>/dev/null |
    awk '/^meridian_media_bytes_total\{path="in_region"/ {i+=$2}
      /^meridian_media_bytes_total\{path="cross_region"/ {c+=$2}
      /^meridian_region_boundary_copies_max\{/ {if ($2 > m) m = $2}
      /^meridian_relay_packets_total\{direction="in"/ {p+=$2}
      END {printf "%d %d %d %d\n", i, c, m, p}'
}
sleep "$((KILL_AT - 1))"
IN=0
CROSS=0
COPIES=0
declare -A IN_BY
for i in 1 2 3; do
  r=${REGIONS[$((i - 1))]}
  IN_BY[$r]=0
  for h in 2 3; do
    read -r a b m _ < <(metrics_of "$i" "$r" "$h")
    IN=$((IN + a))
    IN_BY[$r]=$((IN_BY[$r] + a))
    CROSS=$((CROSS + b))
    [ "$m" -gt "$COPIES" ] && COPIES=$m
  done
done
sleep 1
cp "$WORK/wan.json" "$WORK/wan-before.json" 2>/dev/null || echo '{"pairs":[]}' >"$WORK/wan-before.json"
us_relay_in() { # relay packets us's nodes received so far (x3: eu's tracks)
  local sum=0 p
  for h in 2 3; do read -r _ _ _ p < <(metrics_of 2 us "$h"); sum=$((sum + p)); done
  echo "$sum"
}
log "killing both nodes of $VICTIM (SIGKILL)"
US_RELAY_AT_KILL=$(us_relay_in)
for h in 2 3; do kill -9 "${NODE_PIDS[$VICTIM-$h]}"; done
sleep 6
US_RELAY_AFTER=$(( $(us_relay_in) - US_RELAY_AT_KILL ))

for r in "${REGIONS[@]}" x3eu x3us x3ap xuaus xuaap; do
  pid_var="LG_$r"
  wait "${!pid_var}" || { log "loadgen $r failed"; tail -20 "$WORK/lg-$r.err" >&2; exit 1; }
done
sleep 1.2 # one more WAN stats write

last_json() { tail -n 1 "$1"; }
EU=$(last_json "$WORK/lg-eu.out")
US=$(last_json "$WORK/lg-us.out")
AP=$(last_json "$WORK/lg-ap.out")
VJ=$(last_json "$WORK/lg-$VICTIM.out")
X3US=$(last_json "$WORK/lg-x3us.out")
X3AP=$(last_json "$WORK/lg-x3ap.out")
XUAAP=$(last_json "$WORK/lg-xuaap.out")
X3EU=$(last_json "$WORK/lg-x3eu.out")
jq -cn \
  --argjson eu "$EU" --argjson us "$US" --argjson ap "$AP" --argjson victim "$VJ" \
  --argjson x3us "$X3US" --argjson x3ap "$X3AP" --argjson xuaap "$XUAAP" --argjson x3eu "$X3EU" \
  --argjson copies "$COPIES" --argjson in_eu "${IN_BY[eu]}" --argjson in_us "${IN_BY[us]}" \
  --argjson in_ap "${IN_BY[ap]}" --argjson us_relay_after "$US_RELAY_AFTER" \
  --argjson wan "$(cat "$WORK/wan.json")" --argjson wan_before "$(cat "$WORK/wan-before.json")" \
  --argjson p "$(cat "$WORK/prices.json")" \
  --arg victim_name "$VICTIM" --argjson in_bytes "$IN" --argjson cross_bytes "$CROSS" \
  --argjson rooms "$ROOMS" --arg loss "$WAN_LOSS" '
  def med(r; to): (r.region_rtts // [] | map(select(.region == to)) | .[0].samples_ms // [] | sort) as $s
    | if ($s | length) == 0 then null else $s[(($s | length) / 2 | floor)] end;
  $p.internet_per_gb as $internet | $p.cross_region_per_gb as $cross | $p.remote_client_per_gb as $remote |
  {
    bench: "regions",
    regions: ["eu", "us", "ap"],
    nodes_per_region: 2,
    rooms: (3 * $rooms + 2),
    rooms_spanning_regions: {"x3": ["eu", "us", "ap"], "xua": ["us", "ap"]},
    wan_one_way_ms: {"eu-us": 40, "us-ap": 75, "eu-ap": 110},
    wan_loss: $loss,
    in_region_bytes_pct: (if ($in_bytes + $cross_bytes) > 0 then ($in_bytes * 100 / ($in_bytes + $cross_bytes)) else null end),
    in_region_bytes: $in_bytes,
    cross_region_bytes: $cross_bytes,
    in_region_bytes_by_region: {eu: $in_eu, us: $in_us, ap: $in_ap},
    egress_formula: "multi = client bytes x internet + relayed cross-region bytes x cross_region; one region (eu) = eu client bytes x internet + other regions client bytes x remote_client (prices of the directory: \($internet), \($cross), \($remote) per GB)",
    copies_per_boundary_max: $copies,
    egress_cost_multi_region: (($in_bytes * $internet + $cross_bytes * $cross) / 1e9),
    egress_cost_one_region: (($in_eu * $internet + ($in_us + $in_ap) * $remote) / 1e9),
    egress_saving_pct: (if ($in_eu + $in_us + $in_ap) > 0 then
      (100 * (1 - ($in_bytes * $internet + $cross_bytes * $cross) / ($in_eu * $internet + ($in_us + $in_ap) * $remote))) else null end),
    boundary_formula: "spending on media crossing a region boundary (cross-region transfer, transit, NAT; internet egress to each client left out, as it is paid either way): multi = relayed cross-region bytes x cross_region; one region (eu) = other regions client bytes x (remote_client - internet)",
    boundary_cost_multi_region: ($cross_bytes * $cross / 1e9),
    boundary_cost_one_region: (($in_us + $in_ap) * ($remote - $internet) / 1e9),
    boundary_cost_saving_pct: (if ($in_us + $in_ap) > 0 then
      (100 * (1 - ($cross_bytes * $cross) / (($in_us + $in_ap) * ($remote - $internet)))) else null end),
    latency_ms_p50_by_pair: {"eu-eu": $eu.latency_ms_p50, "us-us": $us.latency_ms_p50, "ap-ap": $ap.latency_ms_p50,
      "eu-us": $x3us.latency_ms_p50, "us-ap": $xuaap.latency_ms_p50, "eu-ap": $x3ap.latency_ms_p50},
    latency_ms_p95_by_pair: {"eu-eu": $eu.latency_ms_p95, "us-us": $us.latency_ms_p95, "ap-ap": $ap.latency_ms_p95,
      "eu-us": $x3us.latency_ms_p95, "us-ap": $xuaap.latency_ms_p95, "eu-ap": $x3ap.latency_ms_p95},
    latency_breakdown_ms_by_pair: ({"eu-eu": $eu, "us-us": $us, "ap-ap": $ap, "eu-us": $x3us, "us-ap": $xuaap, "eu-ap": $x3ap}
      | map_values(.latency_breakdown_ms // null | if . == null then null else map_values({p50, p95}) end)),
    cross_room_tracks_received: {"x3@eu": "\($x3eu.tracks_received)", "x3@us": "\($x3us.tracks_received)",
      "x3@ap": "\($x3ap.tracks_received)", "xua@ap": "\($xuaap.tracks_received)"},
    x3_us_through_failure: {relay_packets_into_us_in_6s_after_failure: $us_relay_after,
      rehomes: $x3us.rehomes, clients_failed: $x3us.clients_failed,
      tracks_received: $x3us.tracks_received, latency_ms_p95: $x3us.latency_ms_p95},
    probe_rtt_ms_median: {
      "eu->eu": med($eu; "eu"), "eu->us": med($eu; "us"), "eu->ap": med($eu; "ap"),
      "us->eu": med($us; "eu"), "us->us": med($us; "us"), "us->ap": med($us; "ap"),
      "ap->eu": med($ap; "eu"), "ap->us": med($ap; "us"), "ap->ap": med($ap; "ap")},
    regions_chosen: {eu: $eu.regions_chosen, us: $us.regions_chosen, ap: $ap.regions_chosen},
    victim: $victim_name,
    region_failover_ms_p50: $victim.rehome_to_media_ms_p50,
    region_failover_ms_p95: $victim.rehome_to_media_ms_p95,
    region_failover_ms_max: $victim.rehome_to_media_ms_max,
    region_failover_joined_ms_p95: $victim.rehome_to_joined_ms_p95,
    rehomed_clients: $victim.rehomes,
    rehomed_receivers_with_media: $victim.rehome_to_media_samples,
    victim_clients: ($victim.publishers + $victim.subscribers),
    clients_failed: ($eu.clients_failed + $us.clients_failed + $ap.clients_failed
      + $x3eu.clients_failed + $x3us.clients_failed + $x3ap.clients_failed + $xuaap.clients_failed),
    tracks_received: {eu: "\($eu.tracks_received)/\($eu.tracks_expected)", us: "\($us.tracks_received)/\($us.tracks_expected)", ap: "\($ap.tracks_received)/\($ap.tracks_expected)"},
    wan_packets_before_failure: ($wan_before.pairs | map({key: "\(.from)->\(.to)", value: .packets_out}) | from_entries),
    wan_packets_total: ($wan.pairs | map({key: "\(.from)->\(.to)", value: .packets_out}) | from_entries),
    wan_drops: ($wan.overflow_drops + $wan.reader_drops),
    measured: "bytes and copies from the metrics of the nodes 1 s before the failure; cross pairs from the subscribers of x3 (eu→us, eu→ap) and xua (us→ap)"
  }' >"$WORK/result.json"
PLOT=${PLOT:-$ROOT/target/bench-regions.png}
# Debian's python3 (matplotlib from apt), not a pyenv shim that cannot see it.
PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3
if ! "$PY" -c "import matplotlib" 2>/dev/null; then
  log "installing python3-matplotlib for the plot (apt-get)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-matplotlib >/dev/null 2>&1 || true
fi
mkdir -p "$(dirname "$PLOT")"
"$PY" "$ROOT/scripts/plot-regions.py" "$WORK/result.json" "$PLOT" || log "no plot: $PLOT"
cat "$WORK/result.json"
