-- Delete users from one namespace, atomically (features/store/deletion.py). KEYS[i], i <= n:
-- the i-th deletion's user hash key (stream, profile counters and seen window: everything
-- of the user in this namespace); KEYS[n + 1]: the namespace's applied record (applied.lua);
-- KEYS[n + 2]: its deleted-users marker, a sorted set of user keys scored by the end of
-- their grace period (epoch ms), which the append script reads.
-- ARGV[1], per deletion: u32-length-prefixed 'topic:partition', offset and Kafka timestamp
-- (decimal; -1: unknown) of its source record. ARGV[2]: now (ms); ARGV[3]: the end of a new grace period (ms); ARGV[4]:
-- the applied record's spec of the call ('topic:partition=offset@ts' words).
-- A deletion whose source record is at or below the applied record of its partition (and not
-- produced after it: a recreated topic starts its offsets again) was applied before (a
-- redelivery, a replay): nothing is done for it, so a replay never deletes
-- what a user wrote after its grace period ended. Markers whose grace period ended are
-- removed. Reply: per deletion, 1 (deleted) or 0 (applied before), then the end of the
-- user's grace period now (0: no marker).
local n = #KEYS - 2
local applied_key, deleted_key = KEYS[n + 1], KEYS[n + 2]
check_applied(applied_key)
local kind = redis.call('TYPE', deleted_key).ok
if kind ~= 'zset' and kind ~= 'none' then
  error('the deleted-users marker ' .. deleted_key .. ' holds a ' .. kind .. ', not a sorted set: nothing deleted', 0)
end
local now, until_ms = ARGV[2], ARGV[3]
redis.call('ZREMRANGEBYSCORE', deleted_key, '-inf', now)
local out = {}
for i = 1, n do
  local src, off, ts = field(), tonumber(field()), tonumber(field())
  local rec = redis.call('HGET', applied_key, src)
  local old = rec and tonumber(string.match(rec, '^(%d+)'))
  local old_ts = rec and tonumber(string.match(rec, '@(%-?%d+)$') or '-1')
  if old and off <= old and not (ts >= 0 and old_ts >= 0 and ts > old_ts) then
    out[#out + 1] = 0
  else
    redis.call('DEL', KEYS[i])
    redis.call('ZADD', deleted_key, 'GT', until_ms, KEYS[i])
    out[#out + 1] = 1
  end
  out[#out + 1] = tonumber(redis.call('ZSCORE', deleted_key, KEYS[i]) or '0')
end
if ARGV[4] ~= '' then record_applied(applied_key, ARGV[4]) end
return out
