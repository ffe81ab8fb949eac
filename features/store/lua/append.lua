-- Atomic, idempotent, bounded append of actions to users' streams in Feast's Redis
-- layout (see features/encoding.py). KEYS[i]: the i-th action's user hash key.
-- ARGV[1], per action: u32-length-prefixed event_id, token varints, action varint,
-- time varint, time ms (decimal), Timestamp proto bytes; then a u8 want_history.
-- ARGV[2] (optional, '': none): the source offsets the call applied ('topic:partition=offset'
-- words); the namespace's applied-offsets hash (applied.lua) is then a key after the users'.
-- It is checked before anything is written and set after every append: all in the one call.
-- ARGV[3] (optional, '': none): now (ms); the namespace's deleted-users marker (a sorted set
-- of user keys scored by the end of their grace period, features/store/deletion.py) is then
-- the last key: an action of a user in it whose grace period has not ended gets status 4
-- and nothing is written for that user.
-- Reply: an array. First, one status byte per action (1 appended, 0 duplicate, 2
-- duplicate still in the stream, 3 refused, 4 deleted); then, per action, the user's stored token and
-- action Values before it (the history, in their int64 list wrappers; empty when not
-- wanted, and for a duplicate the stream no longer holds), or for a refused action the
-- reason and ''. Idempotency: the last W appended event ids of the user, in B buckets (see
-- rebucket).
--
-- Per-user isolation: before anything is written for a user, check_user checks its state
-- (the key's type, every field the append parses, the window buckets the batch touches).
-- A user it refuses gets status 3 for each of its actions and nothing written; the other
-- users of the batch are appended as usual. An unforeseen error while appending for a user
-- (a Lua error, not a Redis one) refuses that user's remaining actions the same way. The
-- full check of the stream fields costs about what the append does, so it is skipped when
-- the fields are exactly as this script last wrote them: each append records their byte
-- lengths and item count (M_SIG); a state written otherwise (Feast, a copy, another writer)
-- gets the full check.
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
local TTL_MS = __TTL_MS__  -- the user's state expires this long after its last append (0: never)
local B_STR = tostring(B)
local F_TOK, F_ACT, F_EID, F_TIM = __F_TOK__, __F_ACT__, __F_EID__, __F_TIM__
local F_TS, P_TS, P_N, P_LAST = __F_TS__, __P_TS__, __P_N__, __P_LAST__
local M_LEN, M_MAX, M_TOTAL = __M_LEN__, __M_MAX__, __M_TOTAL__
local M_SEEN_B, SEEN_PREFIX, M_SIG = __M_SEEN_B__, __SEEN_PREFIX__, __M_SIG__
local REFUSED = 3
local DELETED = 4
local MAX_BUCKETS = 4096  -- a stored window's bucket count the checks accept (besides B)

-- A refusal: an error without a position, so that its message reaches the caller as written.
local function refuse(msg) error(msg, 0) end

-- Redis commands go through call: an error of Redis itself (out of memory, a read-only
-- replica) is no fault of a user's state, and reason() turns it into the whole call's
-- error (the caller retries the batch; appends are idempotent), never into a refusal.
local SERVER = {}
local function call(...)
  local r = redis.pcall(...)
  if type(r) == 'table' and r.err then error({[SERVER] = r.err}) end
  return r
end

-- What the append records of the stream fields it wrote (M_SIG): their byte lengths and
-- the item count. Equal on the next call: the fields are as written, and were checked then.
local function signature(tok, act, eids, tim, n)
  return #tok .. ':' .. #act .. ':' .. #eids .. ':' .. #tim .. ':' .. n
end

local function read_varint(s, pos)
  local result, mult = 0, 1
  while true do
    local b = string.byte(s, pos)
    if b == nil then refuse('a varint runs past the end of its field') end
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
    for _, s in ipairs(call('HMGET', key, unpack(names))) do
      if s then records(s, recs) end
    end
    table.sort(recs, function(x, y) return x[2] < y[2] end)
    call('HDEL', key, unpack(names))
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
  call('HSET', key, unpack(hset))
  return buckets
end

-- One action (a: as parsed by the main loop); cur: the user's fields as check_user read
-- them (the user's first action of the batch), else nil (read here).
local function append_one(key, a, cur)
  local eid, tokv, actv, timv, ms_str, ts, want, b = unpack(a)
  local fb = SEEN_PREFIX .. b
  cur = cur or call('HMGET', key, F_TOK, F_ACT, F_EID, F_TIM, M_LEN, M_MAX, M_TOTAL, M_SEEN_B, fb)
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
                M_LEN, tostring(n), M_TOTAL, tostring(total), P_N, '\32' .. varint(total),
                M_SIG, signature(tok, act, eids, tim, n)}
  -- Feast's event timestamp of both views is the newest event time seen (events may
  -- arrive out of time order; the stream keeps arrival order).
  local ms = tonumber(ms_str)
  if cur[6] == false or ms > tonumber(cur[6]) then
    for _, x in ipairs({M_MAX, ms_str, F_TS, ts, P_TS, ts, P_LAST, '\32' .. timv}) do
      hset[#hset + 1] = x
    end
  end
  call('HSET', key, unpack(hset))
  if TTL_MS > 0 then call('PEXPIRE', key, TTL_MS) end
  -- The history: the stream's stored values as they were (the caller strips the wrapper;
  -- no copy is made here).
  if want then return 1, vt, va end
  return 1, '', ''
end

-- ---- checks of a user's stored state (check_user) -----------------------------------

-- An int64 list Value's framing checked (constant cost): the position of its payload
-- (past the end: empty; the value absent or empty, too).
local function ints_frame(v, name)
  if #v == 0 then return 1 end
  if string.byte(v, 1) ~= 114 then refuse(name .. ' is not an int64 list Value') end
  local len, p = read_varint(v, 2)
  if p + len - 1 ~= #v then
    refuse(name .. ' is truncated or overlong: its Value says ' .. len .. ' bytes, ' .. (#v - p + 1) .. ' are stored')
  end
  if len == 0 then return p end
  if string.byte(v, p) ~= 10 then refuse(name .. ' is not an int64 list Value') end
  local n, q = read_varint(v, p + 1)
  if q + n - 1 ~= #v then
    refuse(name .. ' is truncated or overlong: its list says ' .. n .. ' bytes, ' .. (#v - q + 1) .. ' are stored')
  end
  if n > 0 and string.byte(v, #v) >= 128 then refuse(name .. ' ends inside a varint') end
  return q
end

-- the element count of an int64 list Value's payload at q: one byte below 128 ends each varint
local function ints_count(v, q)
  return #(string.gsub(string.sub(v, q), '[\128-\255]+', ''))
end

-- A string list Value's framing checked (constant cost): the position of its first element.
local function strings_frame(v, name)
  if #v == 0 then return 1 end
  if string.byte(v, 1) ~= 98 then refuse(name .. ' is not a string list Value') end
  local len, p = read_varint(v, 2)
  if p + len - 1 ~= #v then
    refuse(name .. ' is truncated or overlong: its Value says ' .. len .. ' bytes, ' .. (#v - p + 1) .. ' are stored')
  end
  return p
end

-- the element count of a string list Value's elements from p, each checked
local function strings_count(v, p, name)
  local n = 0
  while p <= #v do
    if string.byte(v, p) ~= 10 then refuse(name .. ' holds a foreign field at byte ' .. p) end
    local l, q = read_varint(v, p + 1)
    p = q + l
    n = n + 1
  end
  if p ~= #v + 1 then refuse(name .. ' is truncated: its last string runs past the Value') end
  return n
end

-- a decimal counter field (absent: nil)
local function count_field(v, name)
  if not v then return nil end
  if #v > 15 or not string.find(v, '^%d+$') then refuse(name .. ' is not a decimal count') end
  return tonumber(v)
end

-- a window bucket: nothing but NUL id 0xFF seq records (absent: fine)
local function check_bucket(s, name)
  if s and string.gsub(s, '%z[^%z\255]+\255%d+', '') ~= '' then
    refuse(name .. ' is not in the seen-window format (NUL id 0xFF seq records)')
  end
end

-- Check a user's state before anything is written for it; bs: the window buckets (of B)
-- its actions in this batch touch, the first action's first. Raises a refusal, or returns
-- the fields append_one reads for the user's first action.
local function check_user(key, bs)
  local names = {F_TOK, F_ACT, F_EID, F_TIM, M_LEN, M_MAX, M_TOTAL, M_SEEN_B, M_SIG}
  for _, b in ipairs(bs) do names[#names + 1] = SEEN_PREFIX .. b end
  local got = redis.pcall('HMGET', key, unpack(names))
  if got.err then
    local kind = call('TYPE', key).ok
    if kind ~= 'hash' then refuse('the key holds a ' .. kind .. ', not a hash') end
    error({[SERVER] = got.err})
  end
  local tok, act, eids, tim = got[1] or '', got[2] or '', got[3] or '', got[4] or ''
  local len = count_field(got[5], 'the stream length (_hisam:user_stream:len)')
  count_field(got[6], 'the newest event time (_hisam:user_stream:max_ms)')
  count_field(got[7], 'the append count (_hisam:user_stream:total)')
  local nb = count_field(got[8], 'the bucket count (_hisam:user_stream:seen_b)')
  if nb and (nb < 1 or nb > math.max(B, MAX_BUCKETS)) then refuse('the window claims ' .. nb .. ' buckets') end
  local q_tok, q_act = ints_frame(tok, 'sid_tokens'), ints_frame(act, 'actions')
  local q_tim, p_eids = ints_frame(tim, 'event_times_ms'), strings_frame(eids, 'event_ids')
  if not (len and got[9] == signature(tok, act, eids, tim, len)) then
    local n = strings_count(eids, p_eids, 'event_ids')
    local nt, na, nm = ints_count(tok, q_tok), ints_count(act, q_act), ints_count(tim, q_tim)
    if nt ~= n * NC or na ~= n or nm ~= n then
      refuse('the stream holds ' .. n .. ' event ids, ' .. na .. ' actions, ' .. nm .. ' times and ' .. nt ..
             ' tokens (the store keeps ' .. NC .. ' per item)')
    end
    if len and len ~= n then refuse('its length field says ' .. len .. ' items, the stream holds ' .. n) end
    if not len and n > 0 then got[5] = tostring(n) end  -- written without one (Feast): count it
  end
  for i, b in ipairs(bs) do check_bucket(got[9 + i], 'seen-window bucket ' .. b) end
  if nb and nb ~= B then  -- rebucket will read the window's buckets of that count
    local old = {}
    for b = 0, nb - 1 do old[#old + 1] = SEEN_PREFIX .. b end
    for i, s in ipairs(call('HMGET', key, unpack(old))) do
      check_bucket(s, 'seen-window bucket ' .. (i - 1) .. ' of ' .. nb)
    end
  end
  return {got[1], got[2], got[3], got[4], got[5], got[6], got[7], got[8], got[10]}
end

-- A pcall's error as a refusal's reason, but an error of Redis itself (see call) fails the
-- whole call.
local function reason(e)
  if type(e) == 'table' and e[SERVER] then error(e[SERVER], 0) end
  return tostring(e)
end

-- One call appends to every key in order (the same key may repeat). Arguments and
-- reply are each one length-prefixed blob: parsing thousands of separate arguments and
-- reply elements costs the client far more than the appends cost the server. Each user is
-- checked at its first action, before anything is written for it.
local n_acts, applied_key, deleted_key = #KEYS, nil, nil
if ARGV[3] and ARGV[3] ~= '' then
  deleted_key = KEYS[n_acts]
  n_acts = n_acts - 1
  if redis.call('EXISTS', deleted_key) == 1 then  -- a deletion happened: drop the ended grace periods
    redis.call('ZREMRANGEBYSCORE', deleted_key, '-inf', ARGV[3])
  end
  if redis.call('EXISTS', deleted_key) == 0 then deleted_key = nil end
end
if ARGV[2] and ARGV[2] ~= '' then
  applied_key = KEYS[n_acts]
  n_acts = n_acts - 1
  check_applied(applied_key)
end
local acts, touched = {}, {}
for i = 1, n_acts do
  local key = KEYS[i]
  local a = {field(), field(), field(), field(), field(), field()}
  local want
  want, pos = struct.unpack('<B', blob, pos)
  a[7] = want == 1
  a[8] = bucket_of(a[1], B)
  acts[i] = a
  local t = touched[key]
  if not t then
    t = {list = {}}
    touched[key] = t
  end
  if not t[a[8]] then
    t[a[8]] = true
    t.list[#t.list + 1] = a[8]
  end
end

local status, out, verdict = {}, {''}, {}
for i = 1, n_acts do
  local key = KEYS[i]
  local v, cur = verdict[key], nil
  if v == nil then
    if deleted_key and redis.call('ZSCORE', deleted_key, key) then
      v = DELETED
    else
      local ok, got = pcall(check_user, key, touched[key].list)
      if ok then v, cur = true, got else v = reason(got) end
    end
    verdict[key] = v
  end
  local st, tok, act = REFUSED, v, ''
  if v == DELETED then
    st, tok = DELETED, ''
  elseif v == true then
    local ok, s2, t2, a2 = pcall(append_one, key, acts[i], cur)
    if ok then
      st, tok, act = s2, t2, a2
    else
      verdict[key] = 'unexpected error: ' .. reason(s2)
      tok = verdict[key]
    end
  end
  status[i] = string.char(st)
  out[2 * i], out[2 * i + 1] = tok, act
end
out[1] = table.concat(status)
if applied_key then record_applied(applied_key, ARGV[2]) end
return out
