#!/bin/bash
# CPU of an idle node (no rooms): all threads, user + system, from /proc, over SECS
# seconds after 8 s of start-up, with the ticks of each thread name (issue 12).
#   scripts/idle-cpu.sh BIN LABEL SECS [serve flags…]
#   scripts/idle-cpu.sh target/release/meridian idle 60 --media-workers 2
BIN=$1; LABEL=$2; SECS=$3; shift 3
D=$(mktemp -d /tmp/idle.XXXX)
$BIN serve --data-dir $D --http-addr 127.0.0.1:0 --media-addr 127.0.0.1:0 --wt-addr 127.0.0.1:0 --internal-listen 127.0.0.1:0 "$@" > $D/log 2>&1 &
PID=$!
sleep 8
t0=$(awk '{print $14+$15}' /proc/$PID/stat)
declare -A before
for t in /proc/$PID/task/*; do before[$(cat $t/comm)]=$(( ${before[$(cat $t/comm)]:-0} + $(awk '{print $14+$15}' $t/stat) )); done
sleep $SECS
t1=$(awk '{print $14+$15}' /proc/$PID/stat)
declare -A after
for t in /proc/$PID/task/*; do after[$(cat $t/comm)]=$(( ${after[$(cat $t/comm)]:-0} + $(awk '{print $14+$15}' $t/stat) )); done
tck=$(getconf CLK_TCK)
echo "$LABEL: $(( t1 - t0 )) ticks in ${SECS}s = $(echo "scale=3; ($t1-$t0)*100/$tck/$SECS" | bc) % of a core; threads: $(nproc) cores"
for k in "${!after[@]}"; do d=$(( ${after[$k]} - ${before[$k]:-0} )); [ $d -gt 0 ] && echo "   $k: $d ticks"; done
kill $PID; wait $PID 2>/dev/null; rm -rf $D
