-- Shared by the scripts (prepended to each): protobuf varints, and the u32-length-prefixed
-- fields of their one argument blob (ARGV[1]), read in order by field().
local blob, pos = ARGV[1], 1

local function varint(n)
  local out = {}
  while n >= 128 do
    out[#out + 1] = string.char(n % 128 + 128)
    n = math.floor(n / 128)
  end
  out[#out + 1] = string.char(n)
  return table.concat(out)
end

local function field()
  local n
  n, pos = struct.unpack('<I4', blob, pos)
  local v = string.sub(blob, pos, pos + n - 1)
  pos = pos + n
  return v
end
