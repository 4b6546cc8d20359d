-- KEYS[1]: the token's revocation key. ARGV: when it may lapse (epoch s), the events channel, the
-- event. Revokes once: a token already revoked is left as it is and nothing is published again
-- (one token revoked 20,000 times once cost every relay a publish each). Set and publish are one
-- step, so no retry is needed to publish after a set.
if redis.call('set', KEYS[1], '1', 'EXAT', ARGV[1], 'NX') then
  redis.call('publish', ARGV[2], ARGV[3])
  return 1
end
return 0
