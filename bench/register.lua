-- wrk script: PUT /register with a different port on every request (10,000 distinct
-- workers, then re-registrations), and a JSON summary of the latency at the end.
local counter = 0
request = function()
  counter = counter + 1
  local port = 10000 + (counter % 10000)
  local body = string.format(
    '{"name":"bench","host":"127.0.0.1","port":%d,"version":"1.0.0","tags":["resize","png"],' ..
    '"description":"benchmark worker","health":{"url":"http://127.0.0.1:%d/health","interval":300}}', port, port)
  return wrk.format("PUT", "/register", {["Content-Type"] = "application/json"}, body)
end

done = function(summary, latency, requests)
  io.write(string.format('JSON {"requests":%d,"seconds":%.3f,"errors":%d,"non2xx":%d,"p50_ms":%.3f,"p99_ms":%.3f}\n',
    summary.requests, summary.duration / 1e6,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status, latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
