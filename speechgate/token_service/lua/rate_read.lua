-- The window rate_hit.lua computes, read without counting (`speechgate quotas show`).
-- KEYS: the previous then the current window's key of one check. ARGV: its window (s).
-- Returns {used, reset_ms}: the weighted count rate_hit.lua compares with the limit, and the time
-- until the current window moves on. Writes nothing: a window that is over counts as the
-- previous one here, where rate_hit.lua would rename it.
local expiry = tonumber(ARGV[1]) * 1000
local prev = tonumber(redis.call('get', KEYS[1])) or 0
local prev_ttl = math.max(redis.call('pttl', KEYS[1]), 0)
local cur = tonumber(redis.call('get', KEYS[2])) or 0
local cur_ttl = redis.call('pttl', KEYS[2])
if cur_ttl > 0 and cur_ttl < expiry then
  prev, prev_ttl, cur, cur_ttl = cur, cur_ttl, 0, cur_ttl + expiry
end
local reset = cur_ttl - expiry
if reset <= 0 then reset = expiry end
return {math.floor(prev * prev_ttl / expiry) + cur, reset}
