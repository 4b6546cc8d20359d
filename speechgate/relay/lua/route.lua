-- Choose an upstream for a stream and take one of its slots, in one call.
-- KEYS: for each candidate, its live set then its down flag (upstream_live, upstream_down).
-- ARGV: now_ms, lease_until_ms, stream_id, then each candidate's limit.
-- Returns {index (1-based; 0: none), why}: why is 'full' (some candidate is up but at its limit)
-- or 'down' (every candidate is marked unhealthy) when none is chosen. The least used against its
-- limit wins; at a tie, the one with fewer live streams; then the first (the caller shuffles the
-- candidates, so that a tie is not always the same upstream's).
local now = tonumber(ARGV[1])
local best, best_use, best_n = 0, nil, nil
local up = false
for i = 1, #KEYS / 2 do
  if redis.call('exists', KEYS[2 * i]) == 0 then
    up = true
    local live = KEYS[2 * i - 1]
    redis.call('zremrangebyscore', live, '-inf', now)  -- a dead relay's streams: their leases lapsed
    local limit = tonumber(ARGV[3 + i])
    local n = redis.call('zcard', live)
    local use = n / limit
    if n < limit and (best == 0 or use < best_use or (use == best_use and n < best_n)) then
      best, best_use, best_n = i, use, n
    end
  end
end
if best == 0 then return {0, up and 'full' or 'down'} end
redis.call('zadd', KEYS[2 * best - 1], ARGV[2], ARGV[3])
redis.call('pexpire', KEYS[2 * best - 1], tonumber(ARGV[2]) - now + 60000)
return {best, 'ok'}
