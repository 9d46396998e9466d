-- wrk script: optional Host rotation (BENCH_HOSTS=N -> h0.example .. h{N-1}.example,
-- BENCH_HOST_PREFIX changes the h, BENCH_HOST=name -> one fixed host) and a machine-readable summary line.
-- The same request() path is used whether one host or many, so a 1-route and a
-- 1,000-route run cost wrk the same.
local reqs = {}
local n = tonumber(os.getenv("BENCH_HOSTS") or "0")
local path = os.getenv("BENCH_PATH") or "/"
local prefix = os.getenv("BENCH_HOST_PREFIX") or "h"
if n > 0 then
  for i = 0, n - 1 do
    reqs[#reqs + 1] = wrk.format("GET", path, { Host = prefix .. i .. ".example" })
  end
else
  reqs[1] = wrk.format("GET", path, { Host = os.getenv("BENCH_HOST") or "bench.example" })
end
local i = 0
request = function()
  i = i + 1
  if i > #reqs then i = 1 end
  return reqs[i]
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"err_connect":%d,"err_read":%d,' ..
    '"err_write":%d,"err_status":%d,"err_timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"p999_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.max, latency.mean))
end
