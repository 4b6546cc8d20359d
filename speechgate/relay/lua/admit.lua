-- KEYS: lease_sub, lease_client, session, used, audio_sub, audio_client, resume
-- ARGV: now_ms, lease_ms, max_sub, max_client, stream_id, single_use, session_s, audio_sub_limit,
--       audio_client_limit, may_start, the token's stream id prefix (stream_prefix)
local now = tonumber(ARGV[1])
local started = redis.call('get', KEYS[3])
if started and now >= tonumber(started) + tonumber(ARGV[7]) * 1000 then
  if ARGV[10] ~= '1' then return {0, 'session_over', 0, 0} end
  started = false  -- a token that may still open streams starts a new session
end
if not started and ARGV[10] ~= '1' then return {0, 'expired', 0, 0} end
redis.call('zremrangebyscore', KEYS[1], '-inf', now)
redis.call('zremrangebyscore', KEYS[2], '-inf', now)
if ARGV[6] == '1' then  -- a single-use token holds one stream at a time
  for _, member in ipairs(redis.call('zrange', KEYS[1], 0, -1)) do
    if string.sub(member, 1, #ARGV[11]) == ARGV[11] then return {0, 'in_use', 0, 0} end
  end
end
for i, limit in ipairs({ARGV[3], ARGV[4]}) do
  if redis.call('zcard', KEYS[i]) >= tonumber(limit) then
    local first = redis.call('zrange', KEYS[i], 0, 0, 'WITHSCORES')
    local wait = first[2] and math.ceil((tonumber(first[2]) - now) / 1000) or 1
    return {0, i == 1 and 'subject_streams' or 'client_streams', math.max(wait, 1), 0}
  end
end
if (tonumber(redis.call('get', KEYS[5])) or 0) >= tonumber(ARGV[8]) then return {0, 'subject_audio', 0, 0} end
if (tonumber(redis.call('get', KEYS[6])) or 0) >= tonumber(ARGV[9]) then return {0, 'client_audio', 0, 0} end
if not started and ARGV[6] == '1' then
  if not redis.call('set', KEYS[4], '1', 'NX', 'EX', ARGV[7]) then return {0, 'used', 0, 0} end
end
local until_ms = now + tonumber(ARGV[2])
for i = 1, 2 do
  redis.call('zadd', KEYS[i], until_ms, ARGV[5])
  redis.call('pexpire', KEYS[i], tonumber(ARGV[2]) * 2)
end
local resume = {}
if not started then
  started = now
  -- kept past the session's end, to tell a late reconnect why it is refused
  redis.call('set', KEYS[3], started, 'EX', 2 * tonumber(ARGV[7]))
else  -- a reconnect takes over what the session's last ended connection left (once)
  resume = redis.call('hmget', KEYS[7], 'mark', 'budget')
  redis.call('del', KEYS[7])
end
return {1, 'ok', 0, tonumber(started), resume[1] or false, resume[2] or false}
