#!/usr/bin/python3
"""tests/bench/plot.py RESULTS.json OUTDIR [SUFFIX] - draw bench.svg and bench.png.

Panels, every bar a target of the same run: connections/s as a ratio
to direct at each concurrency, relay CPU per connection, latency added at
c=1, bulk throughput as a ratio to direct, memory per held connection, and
the rows under a real systemd (systemd-nspawn machine): connections/s
ratios beside the same relay's under systemd-socket-activate, and CPU per
connection of the relay, of the machine's PID 1 and of the whole machine.  Whiskers span the rounds
(min..max); dashed lines are the targets from DESIGN.md.
"""

import json
import os
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"limit": "#555555", "peer": "#8fa8c8", "ref": "#c8c8a0",
          "alpnd": "#d9642b"}


def bars(ax, names, S, keys, labels, title, ylabel, lines=()):
    n = len(keys)
    width = 0.8 / n
    for i, (k, lab) in enumerate(zip(keys, labels)):
        xs, ys, lo, hi, cols = [], [], [], [], []
        for j, name in enumerate(names):
            s = S[name]
            v = s.get(k)
            if v is None:
                continue
            xs.append(j + (i - (n - 1) / 2) * width)
            ys.append(v)
            mn, mx = s.get(k + "_min"), s.get(k + "_max")
            lo.append(v - mn if mn is not None else 0)
            hi.append(mx - v if mx is not None else 0)
            cols.append(COLORS.get(s["group"], "#999999"))
        alpha = 1.0 - min(0.3, 0.75 / max(n - 1, 1)) * i
        ax.bar(xs, ys, width * 0.95, color=cols, alpha=alpha,
               yerr=[lo, hi], capsize=2, ecolor="black", label=lab,
               edgecolor="black", linewidth=0.3)
        for x, y in zip(xs, ys):
            ax.text(x, y, "%.2f" % y if abs(y) < 10 else "%.0f" % y,
                    ha="center", va="bottom", fontsize=6, rotation=90)
    for y, lab in lines:
        ax.axhline(y, ls="--", lw=0.8, color="black")
        ax.text(len(names) - 0.5, y, " " + lab, va="center", fontsize=7)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([S[n]["label"] for n in names], rotation=30, ha="right",
                       fontsize=7)
    if n > 1:
        ax.legend(fontsize=7, loc="upper right")
    ax.tick_params(axis="y", labelsize=7)


def systemd_panels(axs, S, SS, sysd, cs):
    lab, twin = sysd.get("labels", {}), sysd.get("twin", {})
    names = [n for n in ("direct", "nginx", "listen", "perconn")
             if n in SS and not SS[n].get("broken")]
    group = {"direct": "limit", "nginx": "peer", "listen": "alpnd", "perconn": "alpnd"}
    # one bar group per row: systemd at c=1/8/32, then s-s-a at c=1/8/32
    P = {}
    for n in names:
        p = {"label": lab.get(n, n), "group": group[n]}
        for c in cs:
            for k in ("", "_min", "_max"):
                p["sd_c%d%s" % (c, k)] = SS[n].get("rate_ratio_c%d%s" % (c, k))
                p["ssa_c%d%s" % (c, k)] = S.get(twin.get(n), {}).get(
                    "rate_ratio_c%d%s" % (c, k))
        for k in ("relay", "pid1", "machine"):
            p[k] = SS[n].get("%s_us_c8" % k)
        P[n] = p
    keys = ["sd_c%d" % c for c in cs] + ["ssa_c%d" % c for c in cs]
    top = max([v for p in P.values() for k, v in p.items()
               if k[:3] in ("sd_", "ssa") and v is not None] or [1.0])
    if top > 2.0:       # a load spike on direct: do not squash the rest
        for p in P.values():
            for k, v in p.items():
                if k[:3] in ("sd_", "ssa") and v is not None:
                    p[k] = min(v, 2.0)
        axs[0].text(0.01, 0.97, "bars cut at 2.0 (max %.2f)" % top,
                    transform=axs[0].transAxes, fontsize=7, va="top")
    bars(axs[0], names, P, keys,
         ["systemd c=%d" % c for c in cs] + ["s-s-a c=%d" % c for c in cs],
         "Under a real systemd (nspawn): conn/s ratio to direct, beside "
         "systemd-socket-activate", "x direct", [(1.0, "1.00")])
    bars(axs[1], names, P, ["relay", "pid1", "machine"],
         ["relay (+ PID 1's reaped children)", "PID 1 itself", "whole machine"],
         "Under a real systemd: CPU per connection (c=8)", "microseconds (log)")
    axs[1].set_yscale("symlog", linthresh=100)


def main():
    res = json.load(open(sys.argv[1]))
    out = sys.argv[2]
    S = res["summary"]
    cfg = res["config"]
    names = [n for n in res["order"] if not S[n].get("broken")]
    sysd = res.get("systemd", {})
    SS = sysd.get("summary") or {}
    fig, axs = plt.subplots(4 if SS else 3, 2, figsize=(15, 20 if SS else 15))
    cs = cfg["concs"]
    bars(axs[0][0], names, S, ["rate_ratio_c%d" % c for c in cs],
         ["c=%d" % c for c in cs],
         "New TLS connections/s, ratio to direct", "x direct",
         [(0.5, "0.50"), (0.9, "0.90")])
    xs = [j for j, n in enumerate(names) if S[n].get("cpu_ratio_c8") is not None]
    axs[0][0].scatter(xs, [S[names[j]]["cpu_ratio_c8"] for j in xs], marker="D",
                      color="black", s=18, zorder=5, label="CPU-cost ratio c=8")
    axs[0][0].legend(fontsize=7, loc="upper right")
    rel = [n for n in names if n != "direct"]
    bars(axs[0][1], rel, S, ["cpu_us_conn_c1", "cpu_us_conn_c8", "cpu_us_conn_c32"],
         ["c=1", "c=8", "c=32"],
         "Relay CPU per connection (all its processes, cgroup)", "microseconds")
    bars(axs[2][0], names, S, ["p50_added_us", "p99_added_us"], ["p50", "p99"],
         "Latency added per connection at c=1", "microseconds over direct")
    axs[2][0].set_yscale("symlog", linthresh=100)
    bars(axs[1][0], names, S, ["bulk_tls_ratio", "bulk_raw_ratio"],
         ["HTTPS download", "raw TCP after ClientHello"],
         "Bulk throughput (%d MiB), ratio to direct" % (cfg["bulk_bytes"] >> 20),
         "x direct", [(0.95, "0.95")])
    for i, k in enumerate(("bulk_tls_cpu_ratio", "bulk_raw_cpu_ratio")):
        xs = [j for j, n in enumerate(names) if S[n].get(k) is not None]
        axs[1][0].scatter([j + (i - 0.5) * 0.4 for j in xs],
                          [S[names[j]][k] for j in xs], marker="D", color="black",
                          s=14, zorder=5, label="CPU-cost ratio" if i == 0 else None)
    axs[1][0].legend(fontsize=7, loc="upper right")
    bars(axs[1][1], rel, S, ["cpu_s_gib_tls", "cpu_s_gib_raw"],
         ["HTTPS download", "raw TCP"], "Relay CPU per GiB relayed", "CPU seconds / GiB")
    mem = [n for n in names if S[n].get("pss_kib_per_conn") is not None
           and n != "direct"]
    bars(axs[2][1], mem, S, ["pss_kib_per_conn", "memcg_kib_per_conn"],
         ["PSS (user)", "memcg (user + kernel)"],
         "Memory per held connection (%d idle)" % cfg["hold"], "KiB",
         [(128, "128 KiB")])
    if SS:
        systemd_panels(axs[3], S, SS, sysd, cs)
    fig.suptitle("alpnd make bench - %s - %d round(s), %s" % (
        res["meta"].get("cpus", ""), cfg["rounds"],
        "quick" if cfg.get("quick") else "full"), fontsize=11)
    fig.tight_layout()
    suffix = sys.argv[3] if len(sys.argv) > 3 else ""
    for ext in ("svg", "png"):
        fig.savefig(os.path.join(out, "bench." + ext + suffix), dpi=90,
                    format=ext)


if __name__ == "__main__":
    main()
