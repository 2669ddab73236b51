#!/usr/bin/env python3
"""Saturation of one node (issue 12): rooms of 1 publisher (VP8 at KBPS + Opus) and
PER_ROOM subscribers are added until the node no longer keeps up; then the load is set
to 80 % of the highest rate the node forwarded, and run again for loss and latency.

Each run is one `scripts/bench-forward.sh` run (node pinned to NODE_CPU, counting
receivers in a network namespace behind a veth pair on LOAD_CPU, see that script), so
run as root from the repository root, after `cargo build --release -p meridian`:

    PER_ROOM="50 200 500" scripts/bench-saturate.py

Environment (besides bench-forward.sh's NODE_BIN, LOADGEN_BIN, WORKERS, NODE_CPU,
LOAD_CPU, DURATION, WARMUP, EXTRA_NODE_ARGS):
    PER_ROOM   subscribers per room, one sweep each (default "50 200 500")
    KBPS       each publisher's VP8 bitrate (default 1000)
    FPS        its frames per second (default 30)
    MAX_SUBS   no step has more subscribers than this (default 1500)
    OUT        JSON lines of every run (default /tmp/bench-saturate.jsonl)
    LABEL      prefix of each run's label (default "sat")

The node is saturated in a step when its CPU is at ≥ 95 % of the cores it is pinned
to, when more than 0.5 % of the counted packets are lost, or when the receivers count
less than 95 % of what the publishers offer (a publisher's packets, as the first
step measured them, times the room's subscribers). Rates are the receivers' counts
and µs per packet the node's CPU time (/proc) over them.
A sweep goes from one room to as many as the last step's CPU per room says make
95 % (at least one more each step) until a step is saturated or MAX_SUBS is reached;
a step whose load generator fails (joins time out at an overloaded node) counts as
saturated. The 80 % run takes the fewest rooms that can offer 80 % of the highest
forwarded rate and lowers the frame rate and bitrate together (the same packets
per frame) so that they offer just that. Prints one summary
line per sweep and appends every run's JSON line (with "sweep" and "step") to OUT.
"""

import json
import math
import os
import subprocess
import sys
import tempfile

PER_ROOM = [int(x) for x in os.environ.get("PER_ROOM", "50 200 500").split()]
KBPS = int(os.environ.get("KBPS", "1000"))
FPS = int(os.environ.get("FPS", "30"))
MAX_SUBS = int(os.environ.get("MAX_SUBS", "1500"))
OUT = os.environ.get("OUT", "/tmp/bench-saturate.jsonl")
LABEL = os.environ.get("LABEL", "sat")
NODE_CPUS = len(os.environ.get("NODE_CPU", "0").split(","))
# Opus at 20 ms frames: 50 packets/s a publisher whatever the video bitrate.
AUDIO_PPS = 50.0


def run(per_room, rooms, kbps, step, fps=FPS):
    """One bench-forward.sh run; returns its JSON line."""
    with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as f:
        out = f.name
    env = dict(
        os.environ,
        SUBS=str(per_room * rooms),
        PUBS=str(rooms),
        ROOMS=str(rooms),
        KBPS=str(kbps),
        FPS=str(fps),
        FLOOR="0",
        OUT=out,
        LABEL=f"{LABEL}-{per_room}-{step}",
    )
    done = subprocess.run(["scripts/bench-forward.sh"], env=env, stdout=sys.stderr)
    with open(out) as f:
        lines = f.read().strip().splitlines()
    os.unlink(out)
    if done.returncode != 0 or not lines:
        print(f"  {per_room}/room × {rooms}: the run failed", file=sys.stderr)
        return None
    line = json.loads(lines[-1])
    line.update(sweep=per_room, step=step, kbps=kbps, fps=fps)
    with open(OUT, "a") as f:
        f.write(json.dumps(line) + "\n")
    return line


def us_per_packet(line):
    """Node CPU µs per packet the receivers counted. The receivers' count, not the
    node's counters: a saturated node's HTTP thread answers the load generator's
    metrics scrape late, so its counters describe a different window than /proc's CPU
    time (rates of twice the offered load were read that way)."""
    return line["node_cpu_pct"] / 100.0 * 1e6 / max(line["counted_pps"], 1.0)


def saturated(line, per_room, pub_pps):
    cpu = line["node_cpu_pct"] / NODE_CPUS
    offered = line["rooms"] * per_room * pub_pps
    return (cpu >= 95.0 or line["counted_loss_pct"] > 0.5
            or line["counted_pps"] < 0.95 * offered)


def describe(line):
    return (f"{line['counted_pps']:.0f} pkt/s, node {line['node_cpu_pct']:.0f} %, "
            f"{us_per_packet(line):.2f} µs/pkt, loss {line['counted_loss_pct']:.3f} %, "
            f"receivers' latency p50/p99 {line['counted_latency_us_p50'] / 1000:.1f}/"
            f"{line['counted_latency_us_p99'] / 1000:.1f} ms, node p50/p99 ≤ "
            f"{line['node_forward_latency_us_p50_bucket'] / 1000:.2f}/"
            f"{line['node_forward_latency_us_p99_bucket'] / 1000:.2f} ms, "
            f"load generator {line.get('loadgen_cpu_pct') or 0:.0f} %")


def sweep(per_room):
    rooms, best, last, pub_pps = 1, None, None, None
    while per_room * rooms <= MAX_SUBS:
        line = run(per_room, rooms, KBPS, f"r{rooms}")
        if line is None:
            break
        print(f"  {per_room}/room × {rooms}: {describe(line)}", file=sys.stderr)
        # A publisher's packets/s, from the first (lightest) step's node counters.
        pub_pps = pub_pps or line["node_received_pps"] / rooms
        if best is None or line["counted_pps"] > best["counted_pps"]:
            best = line
        last = line
        if saturated(line, per_room, pub_pps):
            break
        # Towards 95 % of the node's CPU by the last step's cost per room, then past it.
        cpu = line["node_cpu_pct"] / NODE_CPUS
        rooms = max(rooms + 1, int(rooms * 95.0 / max(cpu, 1.0)))
    if best is None:
        return
    if last is not None and not saturated(last, per_room, pub_pps):
        print(f"{per_room}/room: not saturated at {MAX_SUBS} subscribers", file=sys.stderr)
    # The fewest rooms that can offer 80 %, with the video's frame rate and bitrate
    # lowered together (same packets per frame) to offer just that.
    target = 0.8 * best["counted_pps"]
    rooms = max(1, math.ceil(target / (per_room * pub_pps)))
    factor = (target / (rooms * per_room) - AUDIO_PPS) / (pub_pps - AUDIO_PPS)
    fps = max(1, round(FPS * factor))
    kbps = max(50, round(KBPS * fps / FPS))
    at80 = run(per_room, rooms, kbps, "p80", fps)
    if at80 is None:
        return
    summary = {
        "sweep": per_room, "saturation_pps": best["counted_pps"],
        "saturation_us_per_packet": us_per_packet(best),
        "saturation_node_cpu_pct": best["node_cpu_pct"], "rooms": rooms,
        "at80_kbps": kbps, "at80_fps": fps, "at80": describe(at80),
        "at80_of_saturation_pct": 100.0 * at80["counted_pps"] / best["counted_pps"],
    }
    print(json.dumps(summary))
    print(f"{per_room}/room: saturation {describe(best)}; at 80 % ({rooms} rooms, {kbps} kbit/s, {fps} fps): "
          f"{describe(at80)}", file=sys.stderr)


for per_room in PER_ROOM:
    sweep(per_room)
