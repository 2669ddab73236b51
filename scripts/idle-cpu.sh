#!/bin/bash
# CPU of an idle node (no rooms): all threads, user + system, over SECS seconds after
# 8 s of start-up, with each thread name's share (issue 12). Time on CPU comes from
# /proc/<pid>/task/*/schedstat (nanoseconds; the clock ticks of /proc/<pid>/stat are
# 10 ms, too coarse for an idle node).
#   scripts/idle-cpu.sh BIN LABEL SECS [serve flags…]
#   scripts/idle-cpu.sh target/release/meridian idle 60 --media-workers 2
#   scripts/idle-cpu.sh target/release/meridian idle-pg 60 --database-url postgres://postgres@127.0.0.1:5432/test
BIN=$1; LABEL=$2; SECS=$3; shift 3
D=$(mktemp -d /tmp/idle.XXXX)
$BIN serve --data-dir $D --http-addr 127.0.0.1:0 --media-addr 127.0.0.1:0 --wt-addr 127.0.0.1:0 --internal-listen 127.0.0.1:0 "$@" > $D/log 2>&1 &
PID=$!
sleep 8
# Nanoseconds on CPU per thread name (threads of one name added up).
on_cpu() {
  for t in /proc/$PID/task/*; do
    echo "$(cat $t/comm 2>/dev/null) $(cut -d' ' -f1 $t/schedstat 2>/dev/null)"
  done | awk 'NF == 2 { ns[$1] += $2 } END { for (k in ns) print k, ns[k] }'
}
before=$(on_cpu)
sleep $SECS
after=$(on_cpu)
kill $PID; wait $PID 2>/dev/null
awk -v label="$LABEL" -v secs="$SECS" -v cores="$(nproc)" '
  NR == FNR { b[$1] = $2; next }
  { d = $2 - b[$1]; total += d; if (d > 0) lines = lines sprintf("   %s: %.1f ms\n", $1, d / 1e6) }
  END { printf "%s: %.3f %% of a core (%.1f ms in %d s; %d cores)\n%s", label, total / 1e7 / secs, total / 1e6, secs, cores, lines }
' <(echo "$before") <(echo "$after")
grep -q "lease acquired" $D/log || { echo "the node did not start:"; tail -5 $D/log; }
rm -rf $D
