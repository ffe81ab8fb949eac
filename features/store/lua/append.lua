-- Atomic, idempotent, bounded append of actions to users' streams in Feast's Redis
-- layout (see features/encoding.py). KEYS[i]: the i-th action's user hash key.
-- ARGV[1], per action: u32-length-prefixed event_id, token varints, action varint,
-- time varint, time ms (decimal), Timestamp proto bytes; then a u8 want_history.
-- Reply: an array. First, one status byte per action (1 appended, 0 duplicate, 2
-- duplicate still in the stream); then, per action, the user's stored token and action
-- Values before it (the history, in their int64 list wrappers; empty when not wanted, and
-- for a duplicate the stream no longer holds). Idempotency: the last W appended event ids
-- of the user, in B buckets (see rebucket).
--
-- Cost: Redis' Lua hashes every byte of every string it creates (about 1 ns a byte here),
-- so the script creates only what it must: each stream field once read and once written,
-- one bucket of about W / B ids (never the whole window), and no reply blob (concatenating
-- the histories cost Redis a third of its time; an array of the strings read costs nothing).
--
-- The __NAME__ placeholders are this store's constants, filled in by build_append_lua
-- (features/store/redis.py).
local NC = __NC__
local T = __T__
local W = __W__
local B = __B__
local B_STR = tostring(B)
local F_TOK, F_ACT, F_EID, F_TIM = __F_TOK__, __F_ACT__, __F_EID__, __F_TIM__
local F_TS, P_TS, P_N, P_LAST = __F_TS__, __P_TS__, __P_N__, __P_LAST__
local M_LEN, M_MAX, M_TOTAL = __M_LEN__, __M_MAX__, __M_TOTAL__
local M_SEEN_B, SEEN_PREFIX = __M_SEEN_B__, __SEEN_PREFIX__

local function read_varint(s, pos)
  local result, mult = 0, 1
  while true do
    local b = string.byte(s, pos)
    if b == nil then error('truncated varint') end
    result = result + (b % 128) * mult
    pos = pos + 1
    if b < 128 then return result, pos end
    mult = mult * 128
  end
end

local function skip_varints(s, pos, k)
  for _ = 1, k do
    while string.byte(s, pos) >= 128 do pos = pos + 1 end
    pos = pos + 1
  end
  return pos
end

local function skip_strings(s, pos, k)
  for _ = 1, k do
    local len
    len, pos = read_varint(s, pos + 1)
    pos = pos + len
  end
  return pos
end

-- Value{int64_list_val{packed val}} -> the payload's first and last positions in v (last <
-- first: empty). Positions, not a copy: Redis' Lua hashes every byte of every string it
-- creates, so each intermediate copy of a stream field costs about what reading it does.
local function ints_span(v)
  if not v or #v == 0 then return 1, 0 end
  if string.byte(v, 1) ~= 114 then error('user stream field is not an int64 list') end
  local len, p = read_varint(v, 2)
  if len == 0 then return 1, 0 end
  local len2, p2 = read_varint(v, p + 1)
  return p2, p2 + len2 - 1
end

-- Value{string_list_val{val...}} -> the elements' first and last positions in v
local function strings_span(v)
  if not v or #v == 0 then return 1, 0 end
  if string.byte(v, 1) ~= 98 then error('user stream field is not a string list') end
  local len, p = read_varint(v, 2)
  return p, p + len - 1
end

-- Value{int64_list_val{kept .. new}} and Value{string_list_val{kept .. new}}, each built
-- in one concatenation (no intermediate copy of the kept part)
local function ints_value(kept, new)
  local n = #kept + #new
  if n == 0 then return '\114\0' end
  local vn = varint(n)
  return '\114' .. varint(1 + #vn + n) .. '\10' .. vn .. kept .. new
end

local function strings_value(kept, new)
  return '\98' .. varint(#kept + #new) .. kept .. new
end

-- A duplicate: nothing is written. If the stream still holds it, status 2 and the
-- history before it (its sample can be sent again); else status 0 and no history.
local function duplicate(cur, eid, want)
  if not want then return 0, '', '' end
  local eids = string.sub(cur[3] or '', strings_span(cur[3]))
  local p, i = 1, 0
  while p <= #eids do
    local len, q = read_varint(eids, p + 1)
    i = i + 1
    if len == #eid and string.sub(eids, q, q + len - 1) == eid then
      local tok0 = string.sub(cur[1] or '', ints_span(cur[1]))
      local act0 = string.sub(cur[2] or '', ints_span(cur[2]))
      return 2, ints_value(string.sub(tok0, 1, skip_varints(tok0, 1, (i - 1) * NC) - 1), ''),
             ints_value(string.sub(act0, 1, skip_varints(act0, 1, i - 1) - 1), '')
    end
    p = q + len
  end
  return 0, '', ''
end

-- The seen window: bucket b of B holds, in append order, the ids whose
-- sha1(id) % B is b, each as '\0' .. id .. '\255' .. seq (seq: the user's append count
-- when it was appended; ids are UTF-8 without NUL, so neither byte occurs in them). An id
-- is remembered while seq > total - W. A bucket is pruned of forgotten ids when written.
local function bucket_of(eid, nb)
  return tonumber(string.sub(redis.sha1hex(eid), 1, 8), 16) % nb
end

-- the seq of eid's record in bucket s, or nil
local function seq_in(s, eid)
  local p = string.find(s, '\0' .. eid .. '\255', 1, true)
  if p == nil then return nil end
  local q = p + #eid + 2
  local e = string.find(s, '\0', q, true)
  return tonumber(string.sub(s, q, (e or #s + 1) - 1))
end

-- bucket s without its leading records of seq <= limit (records are in seq order)
local function prune(s, limit)
  local p = 1
  while p <= #s do
    local q = string.find(s, '\255', p, true) + 1
    local e = string.find(s, '\0', q, true) or #s + 1
    if tonumber(string.sub(s, q, e - 1)) > limit then break end
    p = e
  end
  if p == 1 then return s end
  return string.sub(s, p)
end

-- every remembered (id, seq) of bucket string s, appended to recs
local function records(s, recs)
  local p = 1
  while p <= #s do
    local q = string.find(s, '\255', p, true)
    local e = string.find(s, '\0', q + 1, true) or #s + 1
    recs[#recs + 1] = {string.sub(s, p + 1, q - 1), tonumber(string.sub(s, q + 1, e - 1))}
    p = e
  end
end

-- Rewrite a user's window into B buckets from buckets of another count (W changed), or
-- from none (a stream written through Feast, which keeps no window: its ids count as
-- seen). Once per user and bucket count.
local function rebucket(key, cur, total)
  local recs = {}
  if cur[8] then  -- buckets of another count
    local nb = tonumber(cur[8])
    local names = {}
    for b = 0, nb - 1 do names[#names + 1] = SEEN_PREFIX .. b end
    for _, s in ipairs(redis.call('HMGET', key, unpack(names))) do
      if s then records(s, recs) end
    end
    table.sort(recs, function(x, y) return x[2] < y[2] end)
    redis.call('HDEL', key, unpack(names))
  elseif cur[3] then  -- a stream with no window (written through Feast)
    local ve = cur[3]
    local p, e = strings_span(ve)
    local ids = {}
    while p <= e do
      local len, q = read_varint(ve, p + 1)
      ids[#ids + 1] = string.sub(ve, q, q + len - 1)
      p = q + len
    end
    for i, id in ipairs(ids) do recs[#recs + 1] = {id, total - #ids + i} end
  end
  local parts = {}
  for _, r in ipairs(recs) do
    if r[2] > total - W then
      local b = bucket_of(r[1], B)
      parts[b] = parts[b] or {}
      local t = parts[b]
      t[#t + 1] = '\0' .. r[1] .. '\255' .. r[2]
    end
  end
  local hset = {M_SEEN_B, tostring(B)}
  local buckets = {}
  for b, t in pairs(parts) do
    buckets[b] = table.concat(t)
    hset[#hset + 1] = SEEN_PREFIX .. b
    hset[#hset + 1] = buckets[b]
  end
  redis.call('HSET', key, unpack(hset))
  return buckets
end

local function append_one(key, eid, tokv, actv, timv, ms_str, ts, want)
  local b = bucket_of(eid, B)
  local fb = SEEN_PREFIX .. b
  local cur = redis.call('HMGET', key, F_TOK, F_ACT, F_EID, F_TIM, M_LEN, M_MAX, M_TOTAL, M_SEEN_B, fb)
  local total = tonumber(cur[7] or '0')
  local bucket = cur[9] or ''
  if cur[8] ~= B_STR and (cur[8] or cur[3]) then
    bucket = rebucket(key, cur, total)[b] or ''
  end
  local seq = seq_in(bucket, eid)
  if seq and seq > total - W then
    return duplicate(cur, eid, want)
  end

  local n = tonumber(cur[5] or '0') + 1
  local drop = 0
  if n > T then
    drop = n - T
    n = T
  end
  -- Each field: the part kept (past the dropped items) and the new item, concatenated once.
  local vt, va, ve, vm = cur[1] or '', cur[2] or '', cur[3] or '', cur[4] or ''
  local t0, t1 = ints_span(vt)
  local a0, a1 = ints_span(va)
  local m0, m1 = ints_span(vm)
  local e0, e1 = strings_span(ve)
  local tok = ints_value(string.sub(vt, skip_varints(vt, t0, drop * NC), t1), tokv)
  local act = ints_value(string.sub(va, skip_varints(va, a0, drop), a1), actv)
  local tim = ints_value(string.sub(vm, skip_varints(vm, m0, drop), m1), timv)
  local eids = strings_value(string.sub(ve, skip_strings(ve, e0, drop), e1), '\10' .. varint(#eid) .. eid)
  total = total + 1
  bucket = prune(bucket, total - W) .. '\0' .. eid .. '\255' .. total

  local hset = {F_TOK, tok, F_ACT, act, F_EID, eids, F_TIM, tim, fb, bucket, M_SEEN_B, B_STR,
                M_LEN, tostring(n), M_TOTAL, tostring(total), P_N, '\32' .. varint(total)}
  -- Feast's event timestamp of both views is the newest event time seen (events may
  -- arrive out of time order; the stream keeps arrival order).
  local ms = tonumber(ms_str)
  if cur[6] == false or ms > tonumber(cur[6]) then
    for _, x in ipairs({M_MAX, ms_str, F_TS, ts, P_TS, ts, P_LAST, '\32' .. timv}) do
      hset[#hset + 1] = x
    end
  end
  redis.call('HSET', key, unpack(hset))
  -- The history: the stream's stored values as they were (the caller strips the wrapper;
  -- no copy is made here).
  if want then return 1, vt, va end
  return 1, '', ''
end

-- One call appends to every key in order (the same key may repeat). Arguments and
-- reply are each one length-prefixed blob: parsing thousands of separate arguments and
-- reply elements costs the client far more than the appends cost the server.
local status, out = {}, {''}
for i, key in ipairs(KEYS) do
  local eid = field()
  local tokv = field()
  local actv = field()
  local timv = field()
  local ms_str = field()
  local ts = field()
  local want
  want, pos = struct.unpack('<B', blob, pos)
  local appended, tok, act = append_one(key, eid, tokv, actv, timv, ms_str, ts, want == 1)
  status[i] = string.char(appended)
  out[2 * i], out[2 * i + 1] = tok, act
end
out[1] = table.concat(status)
return out
