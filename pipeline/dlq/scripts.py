"""The Lua steps of the DLQ and its index (:mod:`pipeline.dlq.index`).

Every script that writes or removes a DLQ list entry updates the index in the same
script (``ix_add``, ``ix_remove``): a crash cannot leave the list and its index apart.
Entries are kombu's Redis messages, oldest at the right end.
"""

from __future__ import annotations

__all__ = ["CHECK_LUA", "FETCH_LUA", "INDEX_LUA", "MOVE_LUA", "PUSH_LUA",
           "REMOVE_LUA", "SELECT_LUA", "TRIM_LUA"]

INDEX_LUA = """
local function ix_dec(key, field)
  if redis.call('HINCRBY', key, field, -1) <= 0 then redis.call('HDEL', key, field) end
end
local function ix_add(p, meta, gmsg)
  local m = cjson.decode(meta)
  local s = tostring(redis.call('INCR', p .. 'seq'))
  local g = p .. 'g:' .. m[3]
  redis.call('ZADD', p .. 'order', s, s)
  redis.call('HSET', p .. 'meta', s, meta)
  redis.call('ZADD', p .. 'ids', 0, 'r:' .. m[1] .. ':' .. s, 0, 'e:' .. m[12] .. ':' .. s)
  redis.call('ZADD', g .. ':seq', s, s)
  redis.call('ZADD', g .. ':first', m[9], s)
  redis.call('ZADD', g .. ':last', m[10], s)
  redis.call('HSETNX', g, 'handler', m[7])
  redis.call('HSETNX', g, 'exception', m[8])
  redis.call('HSETNX', g, 'message', gmsg)
  redis.call('HINCRBY', g, 't:' .. m[4], 1)
  redis.call('HINCRBY', g, 'r:' .. m[6], 1)
  redis.call('HINCRBY', g, 'h:' .. m[11], 1)
  redis.call('ZINCRBY', p .. 'groups', 1, m[3])
  for _, f in ipairs({'t:' .. m[4], 'r:' .. m[6], 'y:' .. m[5]}) do
    redis.call('ZADD', p .. 'f:' .. f, s, s)
    redis.call('SADD', p .. 'facets', f)
  end
  redis.call('ZADD', p .. 'f:last', m[10], s)
end
local function ix_remove(p, s)
  if s == '' then return end
  local meta = redis.call('HGET', p .. 'meta', s)
  if not meta then return end
  local m = cjson.decode(meta)
  local g = p .. 'g:' .. m[3]
  redis.call('HDEL', p .. 'meta', s)
  redis.call('ZREM', p .. 'order', s)
  redis.call('ZREM', p .. 'ids', 'r:' .. m[1] .. ':' .. s, 'e:' .. m[12] .. ':' .. s)
  redis.call('ZREM', g .. ':seq', s)
  redis.call('ZREM', g .. ':first', s)
  redis.call('ZREM', g .. ':last', s)
  ix_dec(g, 't:' .. m[4])
  ix_dec(g, 'r:' .. m[6])
  ix_dec(g, 'h:' .. m[11])
  for _, f in ipairs({'t:' .. m[4], 'r:' .. m[6], 'y:' .. m[5]}) do
    redis.call('ZREM', p .. 'f:' .. f, s)
  end
  redis.call('ZREM', p .. 'f:last', s)
  if tonumber(redis.call('ZINCRBY', p .. 'groups', -1, m[3])) <= 0 then
    redis.call('ZREM', p .. 'groups', m[3])
    redis.call('DEL', g, g .. ':seq', g .. ':first', g .. ':last')
  end
end
local function ix_hash_of(p, s)
  local meta = redis.call('HGET', p .. 'meta', s)
  return meta and string.match(meta, '"(%x+)"%]$')
end
"""

# KEYS: list. ARGV: prefix, hash chars. 'ok' or why the index cannot be used.
CHECK_LUA = INDEX_LUA + """
local p = ARGV[1]
if redis.call('EXISTS', p .. 'ok') == 0 then return 'missing' end
local n = redis.call('LLEN', KEYS[1])
if redis.call('ZCARD', p .. 'order') ~= n then return 'count' end
if n == 0 then return 'ok' end
local ends = {{0, -1}, {-1, 0}}
for _, e in ipairs(ends) do
  local s = redis.call('ZRANGE', p .. 'order', e[2], e[2])[1]
  local raw = redis.call('LINDEX', KEYS[1], e[1])
  if not raw or string.sub(redis.sha1hex(raw), 1, tonumber(ARGV[2])) ~= ix_hash_of(p, s) then
    return 'ends'
  end
end
return 'ok'
"""

# KEYS: list. ARGV: prefix, chunk, seq... -> per seq its raw entry and its indexed hash
# (nil, nil: gone), read atomically: entries near each other by one LRANGE of at most
# ``chunk``, others by LINDEX.
FETCH_LUA = INDEX_LUA + """
local p, chunk = ARGV[1], tonumber(ARGV[2])
local want, out = {}, {}
for i = 3, #ARGV do
  out[2 * (i - 2) - 1], out[2 * (i - 2)] = false, false
  local r = redis.call('ZRANK', p .. 'order', ARGV[i])
  if r then want[#want + 1] = {r, i - 2} end
end
table.sort(want, function(a, b) return a[1] < b[1] end)
local function put(k, raw)
  if raw then out[2 * k - 1], out[2 * k] = raw, ix_hash_of(p, ARGV[k + 2]) or false end
end
local j = 1
while j <= #want do
  local r = want[j][1]
  if j == #want or want[j + 1][1] - r >= chunk then
    put(want[j][2], redis.call('LINDEX', KEYS[1], -(r + 1)))
    j = j + 1
  else
    local page = redis.call('LRANGE', KEYS[1], -(r + chunk), -(r + 1))
    local n = #page
    while j <= #want and want[j][1] < r + chunk do
      put(want[j][2], page[n - (want[j][1] - r)])
      j = j + 1
    end
  end
end
return out
"""

# ARGV: prefix, keep (0: all), groups (-1: any; n: the next n fingerprints), fingerprints,
# facets (n, then n facet names: t:<tier>, r:<reason>, y:<type>), since us, until us ('':
# open). -> {count, the first ``keep`` seqs}: the entries of those groups in every facet.
SELECT_LUA = """
local p, keep, ng = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if ng == 0 then return {0, {}} end
local tmp_g, tmp_t, tmp = p .. 'tmp:g', p .. 'tmp:t', p .. 'tmp:sel'
local sets = {p .. 'order'}
if ng == 1 then sets[1] = p .. 'g:' .. ARGV[4] .. ':seq' end
if ng > 1 then
  local args = {tmp_g, ng}
  for k = 1, ng do args[#args + 1] = p .. 'g:' .. ARGV[3 + k] .. ':seq' end
  redis.call('ZUNIONSTORE', unpack(args))
  sets[1] = tmp_g
end
local i = 4 + math.max(ng, 0)
local nf = tonumber(ARGV[i])
for k = 1, nf do sets[#sets + 1] = p .. 'f:' .. ARGV[i + k] end
local since, till = ARGV[i + nf + 1], ARGV[i + nf + 2]
if since ~= '' or till ~= '' then
  redis.call('ZRANGESTORE', tmp_t, p .. 'f:last', since ~= '' and since or '-inf',
             till ~= '' and ('(' .. till) or '+inf', 'BYSCORE')
  sets[#sets + 1] = tmp_t
end
local found = sets[1]
if #sets > 1 then
  local args = {tmp, #sets}
  for _, key in ipairs(sets) do args[#args + 1] = key end
  args[#args + 1] = 'WEIGHTS'
  for k = 1, #sets do args[#args + 1] = (k == 1) and 1 or 0 end
  redis.call('ZINTERSTORE', unpack(args))
  found = tmp
end
local count = redis.call('ZCARD', found)
local seqs = redis.call('ZRANGE', found, 0, keep > 0 and keep - 1 or -1)
redis.call('DEL', tmp, tmp_g, tmp_t)
return {count, seqs}
"""

# KEYS: list. ARGV: prefix, (raw entry, seq) * n. A purge: remove each entry with its index.
REMOVE_LUA = INDEX_LUA + """
local removed = 0
for i = 2, #ARGV, 2 do
  if redis.call('LREM', KEYS[1], -1, ARGV[i]) == 1 then
    ix_remove(ARGV[1], ARGV[i + 1])
    removed = removed + 1
  end
end
return removed
"""

# KEYS: list. ARGV: prefix, message, meta, group message. Put one record (``put``).
PUSH_LUA = INDEX_LUA + """
redis.call('LPUSH', KEYS[1], ARGV[2])
ix_add(ARGV[1], ARGV[3], ARGV[4])
return 1
"""

# KEYS: list. ARGV: prefix, (raw entry, list key, message, seq) * n. A replay: remove each
# entry (from the tail end, oldest first) and push its task, with its index entry.
MOVE_LUA = INDEX_LUA + """
local out = {}
for i = 2, #ARGV, 4 do
  if redis.call('LREM', KEYS[1], -1, ARGV[i]) == 1 then
    redis.call('LPUSH', ARGV[i + 1], ARGV[i + 2])
    ix_remove(ARGV[1], ARGV[i + 3])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""

# KEYS: list, evictions counter. ARGV: prefix, max records (0 = no cap), oldest allowed
# dead-lettered-at (0 = no age cap), batch, hash chars. An evicted entry leaves the index
# with it; one that is not the index's oldest marks the index for a rebuild.
TRIM_LUA = INDEX_LUA + """
local p = ARGV[1]
local evicted = {}
local max_n, min_ts, batch = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
while #evicted < batch do
  local n = redis.call('LLEN', KEYS[1])
  if n == 0 then break end
  local evict = max_n > 0 and n > max_n
  if not evict and min_ts > 0 then
    local oldest = redis.call('LINDEX', KEYS[1], -1)
    local ok, doc = pcall(cjson.decode, oldest)
    local ts = ok and doc['headers'] and doc['headers']['pipeline_dead_lettered_at']
    evict = type(ts) == 'number' and ts < min_ts
  end
  if not evict then break end
  local raw = redis.call('RPOP', KEYS[1])
  evicted[#evicted + 1] = raw
  local s = redis.call('ZRANGE', p .. 'order', 0, 0)[1]
  if s and string.sub(redis.sha1hex(raw), 1, tonumber(ARGV[5])) == ix_hash_of(p, s) then
    ix_remove(p, s)
  else
    redis.call('DEL', p .. 'ok')
  end
end
if #evicted > 0 then redis.call('INCRBY', KEYS[2], #evicted) end
return evicted
"""
