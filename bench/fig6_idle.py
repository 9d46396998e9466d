#!/usr/bin/env python3
"""Figure 6: memory per idle keep-alive client connection.

lib/idle_conns.py (asyncio, core 1) opens N connections, makes one request on each, holds
them idle. Proxy memory = VmRSS of the proxy processes (nginx: master + worker), read
before opening and 2 s after all are open; per connection = growth ÷ N. 1 worker each on
core 0. Kernel socket buffers are not in either figure. Alternated, ROUNDS rounds, medians.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from common import *  # noqa: E402,F401

N = int(os.environ.get("BENCH_IDLE", "1000" if QUICK else "10000"))


def idle_round(system):
    pids = system.pids()
    before = rss_kib(pids)
    p = subprocess.Popen(pinned([sys.executable, os.path.join(LIB, "idle_conns.py"),
                                 str(system.port), str(N), HOST], LOAD_CPU),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    t0 = time.perf_counter()
    line = p.stdout.readline().split()
    open_s = time.perf_counter() - t0
    time.sleep(2)
    after = rss_kib(system.pids())
    p.stdin.close()
    p.wait(30)
    time.sleep(1)
    released = rss_kib(system.pids())
    opened, failed = int(line[1]), int(line[2])
    return {"open": opened, "failed": failed, "open_s": open_s, "rss_before_kib": before,
            "rss_after_kib": after, "rss_released_kib": released,
            "kib_per_conn": (after - before) / opened if opened else None}


def main():
    ensure_tools()
    lim = raise_nofile()
    if lim < N + 100:
        raise SystemExit(f"open-file limit {lim} is below {N + 100}")
    origin = start_origin()
    res = {"nginx": [], "dynagate": []}
    raw = []
    for rnd in range(ROUNDS):
        # Fresh proxies every round: freed memory stays in the allocator, so a second
        # round on the same process would measure reuse, not growth.
        ngx = start_nginx_proxy(1, PROXY_CPU)
        ngx.port = NGINX_PORT
        dg = Dynagate(1, PROXY_CPU, data_dir=os.path.join(WORK, f"dg-idle-{rnd}"))
        dg.setup_basic()
        systems = {"nginx": ngx, "dynagate": dg}
        for s in systems.values():
            wrk(s.port, 1)      # warm: upstream pool and first-request allocations
        order = ["nginx", "dynagate"] if rnd % 2 == 0 else ["dynagate", "nginx"]
        for name in order:
            r = idle_round(systems[name])
            r.update(system=name, round=rnd)
            raw.append(r)
            res[name].append(r)
            log(f"  {name:8} round {rnd}: {r['open']} open ({r['failed']} failed, {r['open_s']:.1f}s) "
                f"RSS {r['rss_before_kib'] / 1024:.1f} -> {r['rss_after_kib'] / 1024:.1f} MiB "
                f"(after close {r['rss_released_kib'] / 1024:.1f}) = {r['kib_per_conn']:.2f} KiB/conn")
            if r["open"] < N * 0.99:
                raise SystemExit(f"{name}: only {r['open']} of {N} connections opened")
        ngx.stop()
        dg.stop()
    n = median([x["kib_per_conn"] for x in res["nginx"]])
    d = median([x["kib_per_conn"] for x in res["dynagate"]])
    rows = [row(f"memory per idle keep-alive connection ({N:,} connections, 1 worker)", n, d,
                "KiB", "≤ 2× nginx", limit=2.0,
                note=f"RSS with {N:,} open: nginx {median([x['rss_after_kib'] for x in res['nginx']]) / 1024:.1f} MiB, "
                     f"dynagate {median([x['rss_after_kib'] for x in res['dynagate']]) / 1024:.1f} MiB; "
                     f"after they close: nginx {median([x['rss_released_kib'] for x in res['nginx']]) / 1024:.1f}, "
                     f"dynagate {median([x['rss_released_kib'] for x in res['dynagate']]) / 1024:.1f} MiB")]
    origin.stop()
    save("fig6", rows, raw)


if __name__ == "__main__":
    main()
