#!/usr/bin/env python3
"""Profile dynagate (and nginx, for comparison) under the figure-1 load.

wrk -t1 -c50 small responses, 1 worker on core 0; `perf record -g` on the proxy process for
the load's duration; `perf report --no-children --percent-limit 2` goes to
results/latest/profile-<system>.txt. BENCH_PERF_CALLGRAPH=dwarf for DWARF unwinding
(the release build keeps line tables but no frame pointers, so -g stacks are shallow;
self-time percentages are exact either way).
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from common import *  # noqa: E402,F401


def profile(system, name, secs, path="/"):
    data = os.path.join(WORK, f"perf-{name}.data")
    cg = os.environ.get("BENCH_PERF_CALLGRAPH")
    cg_args = ["--call-graph", cg] if cg else ["-g"]
    pids = ",".join(str(p) for p in system.pids())
    perf = subprocess.Popen(["perf", "record", *cg_args, "-F", "999", "-o", data, "-p", pids],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    r = cpu_per_request(system, secs, path=path)
    perf.send_signal(signal.SIGINT)
    perf.wait(60)
    out = subprocess.run(["perf", "report", "-i", data, "--no-children", "--percent-limit", "2",
                          "--stdio", "--sort", "dso,symbol", "-g", "none"],
                         capture_output=True, text=True).stdout
    os.makedirs(RESULTS, exist_ok=True)
    dest = os.path.join(RESULTS, f"profile-{name}.txt")
    with open(dest, "w") as f:
        f.write(f"# {name}: {r['rps']:,.0f} req/s, {r['cpu_us_per_req']:.2f} µs/req during the profile\n")
        f.write(out)
    graph = subprocess.run(["perf", "report", "-i", data, "--no-children", "--percent-limit", "2",
                            "--stdio"], capture_output=True, text=True).stdout
    with open(os.path.join(RESULTS, f"profile-{name}-callgraph.txt"), "w") as f:
        f.write(graph)
    by_dso = subprocess.run(["perf", "report", "-i", data, "--no-children", "--stdio",
                             "--sort", "dso", "-g", "none"], capture_output=True, text=True).stdout
    user = subprocess.run(["perf", "report", "-i", data, "--no-children", "--stdio", "--sort",
                           "symbol", "-g", "none", "--percent-limit", "0.7", "--dsos",
                           os.path.basename(dynagate_bin()) if name == "dynagate" else "nginx"],
                          capture_output=True, text=True).stdout
    flat = subprocess.run(["perf", "report", "-i", data, "--no-children", "--stdio", "--sort",
                           "dso,symbol", "-g", "none"], capture_output=True, text=True).stdout
    with open(dest, "a") as f:
        f.write("\n# by shared object\n" + by_dso)
        f.write("\n# self time grouped by crate / library (all samples)\n" + by_crate(flat))
        f.write("\n# the proxy binary's own symbols, ≥ 0.7%\n" + user)
    log(f"  {name}: {r['rps']:,.0f} req/s {r['cpu_us_per_req']:.2f} µs/req -> {dest}")
    return dest


def by_crate(flat):
    """Group `perf report --sort dso,symbol` lines by crate (first path segment) or dso."""
    import re
    groups = {}
    for line in flat.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.*?)\s*$", line)
        if not m:
            continue
        pct, dso, kind, sym = float(m.group(1)), m.group(2), m.group(3), m.group(4)
        if kind == "k":
            key = "kernel"
        elif "libc" in dso:
            key = "libc: " + ("malloc/free" if re.search(r"malloc|free|_int_|realloc|calloc|tcache", sym)
                              else "memcpy/memmove/memset" if re.search(r"mem(cpy|move|set|cmp)", sym)
                              else "other")
        elif "::" not in sym:
            key = dso
        else:
            s2 = sym.lstrip("<").replace("_<", "<")
            key = re.split(r"::|<| ", s2, 1)[0] or sym
            if key in ("core", "alloc", "std"):
                key = "std/core/alloc"
            key = f"{dso}: {key}"
        groups[key] = groups.get(key, 0.0) + pct
    return "".join(f"{v:6.2f}%  {k}\n" for k, v in sorted(groups.items(), key=lambda kv: -kv[1])
                   if v >= 0.3)


def syscalls(system, name, secs):
    """Syscalls per request by kind (perf stat on syscall tracepoints; low overhead)."""
    pids = ",".join(str(p) for p in system.pids())
    outf = os.path.join(WORK, f"stat-{name}.txt")
    perf = subprocess.Popen(["perf", "stat", "-x", ",", "-o", outf, "-e", "syscalls:sys_enter_*",
                             "-p", pids], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    r = wrk(system.port, secs)
    perf.send_signal(signal.SIGINT)
    perf.wait(60)
    counts = {}
    with open(outf) as f:
        for line in f:
            parts = line.split(",")
            if len(parts) > 2 and parts[0].strip().isdigit() and int(parts[0]) > 0:
                counts[parts[2].replace("syscalls:sys_enter_", "")] = int(parts[0])
    # perf counts from attach to SIGINT, a little wider than wrk's window: scale by the
    # requests wrk saw plus the 0.5 s lead-in at the same rate (idle then, so ~0).
    per_req = {k: v / r["requests"] for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}
    dest = os.path.join(RESULTS, f"syscalls-{name}.txt")
    with open(dest, "w") as f:
        f.write(f"# {name}: syscalls per request ({r['requests']:,} requests, wrk -c50)\n")
        f.write(f"total {sum(per_req.values()):.2f}\n")
        for k, v in per_req.items():
            if v >= 0.01:
                f.write(f"{k} {v:.3f}\n")
    log(f"  {name}: {sum(per_req.values()):.2f} syscalls/request -> {dest}")
    return dest


def main():
    ensure_tools()
    need("perf", "linux-perf")
    secs = 3 if QUICK else 10
    origin = start_origin()
    dg = Dynagate(1, PROXY_CPU)
    dg.setup_basic()
    ngx = start_nginx_proxy(1, PROXY_CPU)
    ngx.port = NGINX_PORT
    wrk(dg.port, 1)
    wrk(ngx.port, 1)
    for s, name in ((dg, "dynagate"), (ngx, "nginx")):
        dest = profile(s, name, secs)
        with open(dest) as f:
            lines = [l for l in f if l.strip() and not l.startswith("#")]
        print(f"--- {name}: top entries")
        print("".join(lines[:40]))
        with open(syscalls(s, name, secs)) as f:
            print(f.read())
    dg.stop()
    ngx.stop()
    origin.stop()


if __name__ == "__main__":
    main()
