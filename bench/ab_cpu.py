#!/usr/bin/env python3
"""Before/after: CPU µs per request of two dynagate binaries and nginx in one run.

    bench/ab_cpu.py BEFORE_BIN AFTER_BIN [PATH]

Figure 1's set-up (HTTP/1.1 keep-alive, wrk -c50, 1 worker pinned to core 0, wrk and the
origin on core 1, small responses unless PATH says otherwise: /1k, /100k). The three
proxies run side by side on their own ports and every round measures each of them, in
an order that rotates from round to round, so a machine that speeds up or slows down
during the run moves all three alike. Reports per-round ratios after ÷ before and each
÷ nginx, and their medians. BENCH_ROUNDS (default 10), BENCH_SECONDS (default 5).
"""
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from common import *  # noqa: E402,F401


def main():
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    before_bin, after_bin = sys.argv[1], sys.argv[2]
    path = sys.argv[3] if len(sys.argv) > 3 else "/"
    rounds = int(os.environ.get("BENCH_ROUNDS", "10"))
    secs = int(os.environ.get("BENCH_SECONDS", "5"))
    ensure_tools()
    raise_nofile()
    start_origin()
    ngx = start_nginx_proxy(1, PROXY_CPU)
    ngx.port = NGINX_PORT
    systems = {"nginx": ngx}
    for i, (name, binary) in enumerate([("before", before_bin), ("after", after_bin)]):
        os.environ["DYNAGATE_BIN"] = binary
        dg = Dynagate(1, PROXY_CPU, name=f"ab-{name}", port=DG_PORT + 10 * i,
                      admin_port=DG_ADMIN_PORT + 10 * i, registry_port=DG_REGISTRY_PORT + 10 * i)
        dg.setup_basic()
        systems[name] = dg
    for s in systems.values():  # warm-up: pools, page cache, allocator
        wrk(s.port, 1, path=path, cpus=LOAD_CPU)
    names = list(systems)
    per = {n: [] for n in names}
    for rnd in range(rounds):
        order = names[rnd % 3:] + names[:rnd % 3]
        for n in order:
            r = cpu_per_request(systems[n], secs, 50, path, 1, LOAD_CPU)
            if not r["requests"] or r["errors"]:
                raise SystemExit(f"{n}: {r}")
            per[n].append(r["cpu_us_per_req"])
        log(f"round {rnd}: " + "  ".join(f"{n} {per[n][-1]:6.2f}" for n in names) + " µs/req")
    ab = [a / b for a, b in zip(per["after"], per["before"])]
    bn = [a / b for a, b in zip(per["before"], per["nginx"])]
    an = [a / b for a, b in zip(per["after"], per["nginx"])]
    med = statistics.median
    print(f"path {path}, {rounds} rounds of {secs} s, µs/request medians: nginx {med(per['nginx']):.2f}, "
          f"before {med(per['before']):.2f}, after {med(per['after']):.2f}")
    print(f"after ÷ before: median {med(ab):.3f} (per round {' '.join(f'{x:.2f}' for x in ab)})")
    print(f"before ÷ nginx: median {med(bn):.3f}; after ÷ nginx: median {med(an):.3f}")
    for s in systems.values():
        s.stop()


if __name__ == "__main__":
    main()
