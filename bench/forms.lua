-- wrk script: POSTs url-encoded forms read from a file (one per line), rotating through them in order.
--   wrk -t1 -c64 -d6s -s bench/forms.lua http://127.0.0.1:PORT/api/key/activate -- FORMS [STOP_AFTER]
-- done() prints one line "WRK_JSON {...}" that bench/run.py reads.
-- With STOP_AFTER (one pass over the forms, say), wrk prints "WRK_PASS {...}" and exits once that many
-- answers arrived: thread:stop() would leave wrk waiting out its whole duration.

local requests = {}
local index = 0
local answered = 0
local failed = 0
local stop_after = 0

function init(args)
  local headers = {
    ["Content-Type"] = "application/x-www-form-urlencoded",
    ["User-Agent"] = "Python-urllib/3.11",
    ["Accept-Encoding"] = "identity",
  }
  for line in io.lines(args[1]) do
    if #line > 0 then
      requests[#requests + 1] = wrk.format("POST", wrk.path, headers, line)
    end
  end
  stop_after = tonumber(args[2] or "0")
  if stop_after == 0 then
    response = nil -- wrk then skips parsing answers: the fastest request cycle
  end
end

function request()
  index = index % #requests + 1
  return requests[index]
end

function response(status, headers, body)
  answered = answered + 1
  if status ~= 200 then
    failed = failed + 1
  end
  if answered >= stop_after then
    io.write(string.format('WRK_PASS {"answered": %d, "failed": %d}\n', answered, failed))
    io.flush()
    os.exit(0)
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect_errors": %d, "read_errors": %d,'
      .. ' "write_errors": %d, "status_errors": %d, "timeouts": %d, "latency_mean_us": %.1f,'
      .. ' "latency_p50_us": %d, "latency_p99_us": %d, "latency_max_us": %d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(99), latency.max))
end
