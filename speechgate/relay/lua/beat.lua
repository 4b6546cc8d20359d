-- KEYS: audio_streams, audio_client, lease_client, then per subject: lease_subject, audio_subject,
--       then per stream: its session's resume key
-- ARGV: lease_until_ms, lease_key_ttl_ms, audio_ttl_s, subject count, then per stream: stream_id,
--       audio total today, subject index (1-based), live (1) or ended (0), mark, replay budget,
--       seconds its session has left
-- Each stream's total is kept in a hash; only what it adds to the stored one is counted, so a
-- write that ran although its caller timed out, and the caller's retry, count once. An ended
-- stream leaves its mark for the connection that may continue its session.
local until_ms, lease_ttl, audio_ttl, nsub = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local added, client_added = {}, 0
for j = 1, nsub do added[j] = 0 end
local n = 0
for i = 5, #ARGV, 7 do
  n = n + 1
  local id, total, j = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local seen = tonumber(redis.call('hget', KEYS[1], id)) or 0
  if total > seen then
    redis.call('hset', KEYS[1], id, ARGV[i + 1])
    added[j] = added[j] + total - seen
    client_added = client_added + total - seen
  end
  if ARGV[i + 3] == '1' then
    redis.call('zadd', KEYS[3], until_ms, id)
    redis.call('zadd', KEYS[2 + 2 * j], until_ms, id)
  elseif redis.call('zrem', KEYS[3], id) == 1 then  -- the first write of its end, not a repeat
    redis.call('zrem', KEYS[2 + 2 * j], id)
    local left = tonumber(ARGV[i + 6])
    if tonumber(ARGV[i + 4]) > 0 and left > 0 then
      local resume = KEYS[3 + 2 * nsub + n]
      redis.call('hset', resume, 'mark', ARGV[i + 4], 'budget', ARGV[i + 5])
      redis.call('expire', resume, left)
    end
  end
end
redis.call('expire', KEYS[1], audio_ttl)
local totals = {redis.call('incrbyfloat', KEYS[2], client_added)}
redis.call('expire', KEYS[2], audio_ttl)
redis.call('pexpire', KEYS[3], lease_ttl)
for j = 1, nsub do
  redis.call('pexpire', KEYS[2 + 2 * j], lease_ttl)
  totals[j + 1] = redis.call('incrbyfloat', KEYS[3 + 2 * j], added[j])
  redis.call('expire', KEYS[3 + 2 * j], audio_ttl)
end
return totals
