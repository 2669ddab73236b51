#!/usr/bin/env python3
"""Plots the regions benchmark (scripts/bench-regions.sh): locality per region and
glass-to-glass latency p50/p95 per region pair (plus the probe RTT medians that show
the injected WAN delay). Usage: plot-regions.py RESULT.json OUT.png"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

result = json.load(open(sys.argv[1]))
fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.5))

pct = result.get("in_region_bytes_pct")
ax1.bar(["in-region", "cross-region"], [pct or 0, 100 - (pct or 0)], color=["#2a7", "#c44"])
ax1.set_ylim(0, 100)
ax1.set_ylabel("% of media bytes forwarded")
copies = result.get("copies_per_boundary_max")
saving = result.get("egress_saving_pct")
extra = []
if copies is not None:
    extra.append(f"copies/boundary max {copies}")
if saving is not None:
    extra.append(f"egress saving {saving:.0f} %")
boundary = result.get("boundary_cost_saving_pct")
if boundary is not None:
    extra.append(f"boundary cost saving {boundary:.0f} %")
ax1.set_title("Locality (goal: in-region ≥ 80 %)" + ("\n" + ", ".join(extra) if extra else ""))

pairs = list(result["latency_ms_p95_by_pair"].keys())
p50 = [result["latency_ms_p50_by_pair"].get(p) for p in pairs]
p95 = [result["latency_ms_p95_by_pair"].get(p) for p in pairs]
xs = range(len(pairs))
ax2.bar([x - 0.2 for x in xs], [v or 0 for v in p50], width=0.4, label="p50")
ax2.bar([x + 0.2 for x in xs], [v or 0 for v in p95], width=0.4, label="p95")
wan = result.get("wan_one_way_ms", {})
for x, (pair, v) in enumerate(zip(pairs, p95)):
    if v is None:
        ax2.text(x, 1, "not measured", rotation=90, ha="center", va="bottom", fontsize=8)
    elif pair in wan:
        # The goal: the injected one-way delay + less than 10 ms.
        ax2.plot([x - 0.4, x + 0.4], [wan[pair] + 10] * 2, color="k", lw=1)
ax2.plot([], [], color="k", lw=1, label="injected + 10 ms")
ax2.set_xticks(list(xs), pairs)
ax2.set_ylabel("ms")
ax2.set_title("Glass-to-glass latency by region pair")
ax2.legend()

rtt = result.get("probe_rtt_ms_median", {})
names = [k for k in rtt if rtt[k] is not None]
ax3.bar(names, [rtt[k] for k in names], color="#47a")
ax3.set_ylabel("ms")
ax3.set_title("Probe RTT median (2 × injected one-way delay)")
ax3.tick_params(axis="x", rotation=45)

fo = result.get("region_failover_ms_p95")
fig.suptitle(f"Meridian regions: {result['victim']} killed, re-home to media p95 {fo:.0f} ms" if fo else "Meridian regions")
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=100)
print(f"plot saved to {sys.argv[2]}", file=sys.stderr)
