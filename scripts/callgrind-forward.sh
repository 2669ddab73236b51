#!/usr/bin/env bash
# Instructions per forwarded packet of the media core, noise-free (issue 12).
#
# Runs the core's forwarding bench (crates/meridian-media/benches/forward.rs: 1
# publisher, SUBS subscribers, real str0m peers in memory, virtual time) under
# callgrind twice, with SECS_A and SECS_B seconds of media, counting only instructions
# inside `Sfu::handle_datagram` and `Sfu::handle_timeout` (--toggle-collect). The
# difference between the two runs divided by the difference in forwarded packets is
# the cost per forwarded packet with connection set-up cancelled out. Then prints the
# functions the difference goes to (self cost, and inclusive for the str0m stages).
#
#   CARGO_TARGET_DIR=target/release-bench cargo bench -p meridian-media --bench forward --no-run
#   scripts/callgrind-forward.sh target/release-bench/release/deps/forward-<hash> [label]
#
# Environment: SUBS (default 50), SECS_A (2), SECS_B (4), OUT (directory, default /tmp).
# The two runs go in parallel (2 cores); each takes a few minutes under valgrind.
set -euo pipefail
BIN=${1:?usage: $0 <forward bench binary> [label]}
LABEL=${2:-run}
SUBS=${SUBS:-50}
SECS_A=${SECS_A:-2}
SECS_B=${SECS_B:-4}
OUT=${OUT:-/tmp}
for s in "$SECS_A" "$SECS_B"; do
  NO_CPU_CLOCK=1 SUBS=$SUBS SECS=$s valgrind --tool=callgrind \
    --toggle-collect='meridian_media::Sfu::handle_datagram' \
    --toggle-collect='meridian_media::Sfu::handle_timeout' \
    --callgrind-out-file="$OUT/cg-$LABEL-$s.out" "$BIN" --bench > "$OUT/cg-$LABEL-$s.log" 2>&1 &
done
wait
for s in "$SECS_A" "$SECS_B"; do
  callgrind_annotate --auto=no --threshold=100 "$OUT/cg-$LABEL-$s.out" > "$OUT/cg-$LABEL-$s.self.txt"
  callgrind_annotate --auto=no --inclusive=yes --threshold=100 "$OUT/cg-$LABEL-$s.out" > "$OUT/cg-$LABEL-$s.incl.txt"
done
python3 - "$OUT/cg-$LABEL-$SECS_A" "$OUT/cg-$LABEL-$SECS_B" "$LABEL" <<'PY'
import re, sys
a, b, label = sys.argv[1:4]
def fwd(p):
    return int(re.search(r'rtp packets forwarded\s+(\d+)', open(p + '.log').read()).group(1))
def refs(p):
    return int(re.search(r'I\s+refs:\s+([\d,]+)', open(p + '.log').read()).group(1).replace(',', ''))
def load(p):
    d = {}
    for line in open(p):
        m = re.match(r'\s*([\d,]+) \(\s*[\d.]+%\)\s+(.*?)(?: \[.*\])?$', line)
        if m and 'PROGRAM TOTALS' not in line:
            d[m.group(2)] = d.get(m.group(2), 0) + int(m.group(1).replace(',', ''))
    return d
n = fwd(b) - fwd(a)
total = (refs(b) - refs(a)) / n
print(f"{label}: {fwd(a)} -> {fwd(b)} forwarded, {refs(a)} -> {refs(b)} instructions: "
      f"{total:.0f} instructions per forwarded packet")
short = lambda k: re.sub(r'^.*?/(str0m[^/]*|dimpl[^/]*|is-[^/]*|meridian-media)/', r'\1/', k)[-110:]
for kind in ('self', 'incl'):
    x, y = load(a + f'.{kind}.txt'), load(b + f'.{kind}.txt')
    diff = sorted(((y.get(k, 0) - x.get(k, 0)) / n, k) for k in set(x) | set(y))
    diff.reverse()
    print(f"--- {kind} cost per forwarded packet (top 25) ---")
    skip = ('main', 'lang_start', 'backtrace', 'Harness::', '???')
    diff = [(v, k) for v, k in diff if not any(x in k for x in skip)]
    for v, k in diff[:25]:
        print(f"{v:8.0f} {100 * v / total:5.1f} %  {short(k)}")
PY
