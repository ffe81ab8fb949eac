-- Claim a unique full semantic ID per item, atomically, in order. KEYS[1]: the project's
-- index hash: field 's' .. sid -> item id (decimal), 'i' .. item id -> sid, where sid is
-- the ID's tokens as protobuf varints. ARGV[1], per claim: u32-length-prefixed item id
-- (decimal) and prefix varints, then u16 n and n u32 candidates for the last token.
-- An item that holds an ID keeps it; otherwise it gets its first free candidate.
-- Reply: per claim, the sid the item holds ('' when every candidate is another item's).
local idx = KEYS[1]
local out = {}
while pos <= #blob do
  local item = field()
  local prefix = field()
  local n
  n, pos = struct.unpack('<I2', blob, pos)
  local held = redis.call('HGET', idx, 'i' .. item)
  if held then
    pos = pos + 4 * n
  else
    held = ''
    for _ = 1, n do
      local c
      c, pos = struct.unpack('<I4', blob, pos)
      if held == '' then
        local sid = prefix .. varint(c)
        if redis.call('HSETNX', idx, 's' .. sid, item) == 1 then
          redis.call('HSET', idx, 'i' .. item, sid)
          held = sid
        end
      end
    end
  end
  out[#out + 1] = held
end
return out
