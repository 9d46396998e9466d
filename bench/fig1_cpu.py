#!/usr/bin/env python3
"""Figure 1: CPU µs per proxied request, HTTP/1.1 keep-alive, 50 connections (wrk -c50).

Small (18 B), 1 KiB and 100 KiB responses with 1 worker each (proxy pinned to core 0,
wrk + origin on core 1), then small responses with 2 workers each (nothing pinned).
Plus HTTP/2 (h2c, h2load -c50 -m10) with 1 worker. nginx and dynagate alternate,
ROUNDS rounds, medians. CPU = utime+stime of the proxy processes ÷ requests completed.
"""
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from common import *  # noqa: E402,F401


def run_h2(system, seconds, cpus):
    """h2load -c50 -m10 for about `seconds` (request count sized from a warm-up run)."""
    def h2load(n):
        cmd = pinned(["h2load", "-c50", "-m10", "-t1", "-n", str(n), "-H", f":authority: {HOST}",
                      f"http://127.0.0.1:{system.h2_port}/"], cpus)
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600).stdout
        m = re.search(r"(\d+) succeeded, (\d+) failed", out)
        rps = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out)
        if not (m and rps):
            raise RuntimeError(f"h2load output not understood:\n{out[-1500:]}")
        return int(m.group(1)), int(m.group(2)), float(rps.group(1))

    _, _, warm_rps = h2load(20000)
    pids = system.pids()
    c0 = cpu_seconds(pids)
    ok, failed, rps = h2load(int(warm_rps * seconds))
    c1 = cpu_seconds(system.pids())
    return {"requests": ok, "errors": failed, "rps": rps, "cpu_s": c1 - c0,
            "cpu_us_per_req": (c1 - c0) * 1e6 / ok if ok else None}


def main():
    ensure_tools()
    raise_nofile()
    secs = 2 if QUICK else 10
    origin = start_origin()
    cases = [(1, "/", "small"), (1, "/1k", "1 KiB"), (1, "/100k", "100 KiB"), (2, "/", "small")]
    if QUICK:
        cases = [(1, "/", "small")]
    raw = []
    rows = []
    for workers in (1, 2):
        todo = [c for c in cases if c[0] == workers]
        if not todo:
            continue
        cpus = PROXY_CPU if workers == 1 else None
        load_cpus = LOAD_CPU if workers == 1 else None
        threads = 1 if workers == 1 else 2
        ngx = start_nginx_proxy(workers, cpus)
        ngx.port, ngx.h2_port = NGINX_PORT, NGINX_H2_PORT
        dg = Dynagate(workers, cpus)
        dg.h2_port = dg.port
        dg.setup_basic()
        systems = {"nginx": ngx, "dynagate": dg}
        for _, path, label in todo:
            for name, s in systems.items():   # warm-up: pools, page cache, allocator
                wrk(s.port, 1, path=path, cpus=load_cpus, threads=threads)
            res = {"nginx": [], "dynagate": []}
            for rnd in range(ROUNDS):
                order = ["nginx", "dynagate"] if rnd % 2 == 0 else ["dynagate", "nginx"]
                for name in order:
                    r = cpu_per_request(systems[name], secs, 50, path, threads, load_cpus)
                    r.update(system=name, workers=workers, size=label, round=rnd)
                    raw.append(r)
                    res[name].append(r)
                    log(f"  w{workers} {label:7} {name:8} round {rnd}: {r['rps']:9.0f} req/s "
                        f"{r['cpu_us_per_req']:6.2f} µs/req errors={r['errors']}")
                    if r["requests"] == 0:
                        raise SystemExit(f"{name} completed no request")
            n = median([x["cpu_us_per_req"] for x in res["nginx"]])
            d = median([x["cpu_us_per_req"] for x in res["dynagate"]])
            ratios = [a["cpu_us_per_req"] / b["cpu_us_per_req"]
                      for a, b in zip(res["dynagate"], res["nginx"])]
            headline = workers == 1 and label == "small"
            rows.append(row(f"CPU µs/request, HTTP/1.1 {label}, {workers} worker(s)", n, d, "µs",
                            "≤ 1.0× nginx (stretch 0.8×)" if headline else "≤ 1.0× nginx",
                            limit=1.0, ratio=median(ratios),
                            note=f"req/s nginx {median([x['rps'] for x in res['nginx']]):,.0f}, "
                                 f"dynagate {median([x['rps'] for x in res['dynagate']]):,.0f}; "
                                 f"errors nginx {sum(x['errors'] for x in res['nginx'])}, "
                                 f"dynagate {sum(x['errors'] for x in res['dynagate'])}"))
            if headline:
                # Throughput with the proxy pinned to one core is also the max rate used by fig 3.
                rows[-1]["nginx_rps"] = median([x["rps"] for x in res["nginx"]])
                rows[-1]["dynagate_rps"] = median([x["rps"] for x in res["dynagate"]])
        if workers == 1 and not QUICK and os.environ.get("BENCH_H2", "1") == "1":
            res = {"nginx": [], "dynagate": []}
            for rnd in range(ROUNDS):
                order = ["nginx", "dynagate"] if rnd % 2 == 0 else ["dynagate", "nginx"]
                for name in order:
                    try:
                        r = run_h2(systems[name], secs, load_cpus)
                    except Exception as e:  # h2 is informational: never fail the run on it
                        log(f"  h2 {name}: {e}")
                        continue
                    r.update(system=name, workers=1, size="small h2", round=rnd)
                    raw.append(r)
                    res[name].append(r)
                    log(f"  h2c small {name:8} round {rnd}: {r['rps']:9.0f} req/s "
                        f"{r['cpu_us_per_req']:6.2f} µs/req errors={r['errors']}")
            if res["nginx"] and res["dynagate"]:
                rows.append(row("CPU µs/request, HTTP/2 h2c small, 50 conns × 10 streams, 1 worker",
                                median([x["cpu_us_per_req"] for x in res["nginx"]]),
                                median([x["cpu_us_per_req"] for x in res["dynagate"]]), "µs",
                                "info", note="h2load -c50 -m10"))
        ngx.stop()
        dg.stop()
    origin.stop()
    save("fig1", rows, raw)


if __name__ == "__main__":
    main()
