#!/usr/bin/env python3
"""Print the results of the last run (results/latest/*.json) as one markdown table.

`report.py [RESULTS_DIR] [COMMAND...]` — the command is echoed into the header.
"""
import glob
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from common import RESULTS, dynagate_bin, fmt, verdict, REPO  # noqa: E402

TITLES = {
    "fig1": "1. CPU per request",
    "fig2": "2. 1,000 routes + upstreams",
    "fig3": "3. Latency at a fixed rate",
    "fig4": "4. Churn under load",
    "fig5": "5. Scale: 10,000 upstreams",
    "fig6": "6. Idle keep-alive connections",
    "fig7": "7. Streaming 1 GiB",
    "fig8": "8. Service registry",
    "fig9": "9. Health checks, balancing",
}


def sh(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip() or \
            subprocess.run(cmd, capture_output=True, text=True, timeout=10).stderr.strip()
    except Exception:
        return "?"


def machine():
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with open("/proc/meminfo") as f:
        mem = f"{int(f.readline().split()[1]) / (1 << 20):.1f} GiB"
    rev = sh("git", "-C", REPO, "rev-parse", "--short", "HEAD")
    dirty = " + uncommitted changes" if sh("git", "-C", REPO, "status", "--porcelain", "--", "crates") else ""
    return {
        "nproc": os.cpu_count(), "cpu": model, "memory": mem, "kernel": platform.release(),
        "nginx": sh("nginx", "-v").replace("nginx version: ", ""),
        "wrk": sh("wrk", "-v").splitlines()[0] if sh("wrk", "-v") else "?",
        "dynagate": f"{os.path.basename(dynagate_bin())} built from {rev}{dirty}",
    }


def main():
    d = sys.argv[1] if len(sys.argv) > 1 else RESULTS
    cmd = " ".join(sys.argv[2:]) or "bench/run"
    files = sorted(glob.glob(os.path.join(d, "fig*.json")))
    if not files:
        print(f"no results in {d}")
        return 1
    m = machine()
    first = json.load(open(files[0]))
    print(f"Run {first['time'][:10]} — `{cmd}` — {first['rounds']} round(s), alternating"
          f"{' (quick)' if first['quick'] else ''}\n")
    print(f"Machine: nproc {m['nproc']}, {m['cpu']}, {m['memory']}, Linux {m['kernel']}; "
          f"{m['nginx']}; {m['wrk']}; {m['dynagate']}\n")
    print("| figure | metric | nginx | dynagate | unit | ratio | target | verdict |")
    print("|---|---|---|---|---|---|---|---|")
    notes = []
    for path in files:
        fig = json.load(open(path))
        for r in fig["rows"]:
            print(f"| {TITLES.get(fig['figure'], fig['figure'])} | {r['metric']} | {fmt(r['nginx'])} | "
                  f"{fmt(r['dynagate'])} | {r['unit']} | {fmt(r['ratio'])} | {r['target']} | "
                  f"{verdict(r['ok'])} |")
            if r.get("note"):
                notes.append(f"- {fig['figure']} — {r['metric']}: {r['note']}")
    print("\nNotes:\n" + "\n".join(notes))
    print("\nMachine load (1/5/15-min load average from /proc/loadavg; 2 = both cores busy) "
          "at the start and end of each figure — other engineers build on this machine:")
    for path in files:
        fig = json.load(open(path))
        st = fig.get("started", {})
        print(f"- {fig['figure']}: {st.get('time', '?')} {'/'.join(st.get('loadavg', []))} → "
              f"{fig['time'][11:]} {'/'.join(fig.get('loadavg', []))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
