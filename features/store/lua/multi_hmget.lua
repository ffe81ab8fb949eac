-- HMGET of the same three fields (ARGV) on every key; one blob of u32-length-prefixed
-- values (length 0: absent).
local out = {}
for _, key in ipairs(KEYS) do
  local v = redis.call('HMGET', key, ARGV[1], ARGV[2], ARGV[3])
  for j = 1, 3 do
    local x = v[j] or ''
    out[#out + 1] = struct.pack('<I4', #x) .. x
  end
end
return table.concat(out)
