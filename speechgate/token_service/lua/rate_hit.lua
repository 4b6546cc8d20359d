-- KEYS: per check, the previous then the current window's key; last, the client's stats of this minute.
-- ARGV: per check, limit and window (s); last, the subject.
-- Returns {allowed, retry_ms, remaining_1, reset_ms_1, remaining_2, reset_ms_2, ...}.
-- The stats (tokens issued and refused by the limits, per client and per subject, in one hash per
-- minute) ride along in the same round trip: `speechgate quotas` reads them.
local n = (#ARGV - 1) / 2
local allowed = 1
local retry = 0
local out = {0, 0}
for i = 1, n do
  local limit = tonumber(ARGV[2 * i - 1])
  local expiry = tonumber(ARGV[2 * i]) * 1000
  local prev_key, cur_key = KEYS[2 * i - 1], KEYS[2 * i]
  local cur_ttl = redis.call('pttl', cur_key)
  if cur_ttl > 0 and cur_ttl < expiry then
    -- the current window is over: it becomes the previous one, whose weight decays with its TTL
    redis.call('rename', cur_key, prev_key)
    redis.call('set', cur_key, 0, 'PX', cur_ttl + expiry)
    cur_ttl = cur_ttl + expiry
  end
  local prev = tonumber(redis.call('get', prev_key)) or 0
  local prev_ttl = math.max(redis.call('pttl', prev_key), 0)
  local cur = tonumber(redis.call('get', cur_key)) or 0
  local reset = cur_ttl - expiry
  if reset <= 0 then reset = expiry end
  local weighted = math.floor(prev * prev_ttl / expiry) + cur
  if weighted + 1 > limit then
    allowed = 0
    local wait
    if cur + 1 > limit then
      wait = reset + math.max(0, math.ceil(expiry - limit * expiry / cur))
    else
      wait = prev_ttl - math.floor((limit - cur) * expiry / prev) + 1
    end
    retry = math.max(retry, wait)
    out[2 * i + 1] = 0
  else
    out[2 * i + 1] = limit - weighted - 1
  end
  out[2 * i + 2] = reset
end
if allowed == 1 then
  for i = 1, n do
    local cur_key = KEYS[2 * i]
    if redis.call('exists', cur_key) == 1 then
      redis.call('incr', cur_key)
    else
      redis.call('set', cur_key, 1, 'PX', tonumber(ARGV[2 * i]) * 2000)
    end
  end
end
local stats = KEYS[#KEYS]
local outcome = allowed == 1 and 'issued' or 'refused'
redis.call('hincrby', stats, outcome, 1)
redis.call('hincrby', stats, outcome .. ':' .. ARGV[#ARGV], 1)
redis.call('expire', stats, 180)
out[1] = allowed
out[2] = retry
return out
