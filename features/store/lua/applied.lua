-- The namespace's record of the source offsets it applied (features/store/redis.py,
-- ``append_batch``'s ``applied``): a hash, field 'topic:partition' -> 'offset@timestamp_ms'
-- (decimal; timestamp -1: unknown) of the highest offset whose record a batch applied.
-- spec: 'topic:partition=offset@timestamp' words (Kafka topic names hold none of ':', '=',
-- '@' or spaces). A field's offset only ever grows (max(old, new); equal: kept); a field
-- that does not start with a decimal offset is replaced.
local function check_applied(key)
  local kind = redis.call('TYPE', key).ok
  if kind ~= 'hash' and kind ~= 'none' then
    error('the applied-offsets record ' .. key .. ' holds a ' .. kind .. ', not a hash: nothing was written', 0)
  end
end

local function record_applied(key, spec)
  for f, v, off in string.gmatch(spec, '(%S+)=((%d+)@%-?%d+)') do
    local old = redis.call('HGET', key, f)
    old = old and tonumber(string.match(old, '^(%d+)'))
    if not old or old < tonumber(off) then redis.call('HSET', key, f, v) end
  end
end
