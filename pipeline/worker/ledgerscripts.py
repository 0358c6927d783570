"""The ledger's Lua scripts: a try's begin, a batch's start, its settle.

Each runs atomically in the state store's Redis; :mod:`pipeline.worker.ledger`
says what they decide and :mod:`pipeline.worker.batchledger` composes them for
batches. :data:`BEGIN_GATED_LUA` and :data:`SETTLE_RECORDED_LUA` fold the circuit
breakers' steps (:mod:`pipeline.worker.breaker`) into a single try's begin and settle:
one round trip before the handler, one after. The retry budget is counted here in
buckets of ``window / buckets`` seconds (``<budget prefix><bucket>``: ``first``,
``retry``, ``ok`` counts).
"""

from __future__ import annotations

from pipeline.dlq.scripts import INDEX_LUA
from pipeline.worker.breaker import ALLOW_LUA, RECORD_LUA

__all__ = ["BEGIN_ARGS", "BEGIN_GATED_LUA", "BEGIN_LUA", "SETTLE_LUA", "SETTLE_RECORDED_LUA",
           "START_LUA", "TAKE_OVER_LUA"]

BEGIN_ARGS = 11  # how many ARGV the begin script takes (the gated one appends after them)

# KEYS: done mark, settled mark, running mark, budget key prefix
# ARGV: now, attempt, budget on (1/0), ratio, min per window, window_s, buckets, ttl_s,
#       token, "<host> <pid>", pending (1/0). The running mark is
#       "<token> <host> <pid> <server time>", "~<token> ..." while pending (claimed by a
#       batch, not started); 'lost' returns it with its age in seconds by the server's clock.
BEGIN_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {'done'} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {'settled'} end
local t = redis.call('TIME')
local server_now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local cur = redis.call('GET', KEYS[3])
if cur then
  if string.sub(cur, 1, #ARGV[9] + 1) == ARGV[9] .. ' '
     or string.sub(cur, 1, #ARGV[9] + 2) == '~' .. ARGV[9] .. ' ' then return {'run'} end
  local began = tonumber(string.match(cur, '(%S+)$')) or 0
  return {'lost', cur, tostring(server_now - began)}
end
if ARGV[3] == '1' then
  local now, attempt = tonumber(ARGV[1]), tonumber(ARGV[2])
  local window, buckets = tonumber(ARGV[6]), tonumber(ARGV[7])
  local b = math.floor(now / (window / buckets))
  local bkey = KEYS[4] .. b
  if attempt == 1 then
    redis.call('HINCRBY', bkey, 'first', 1)
  else
    local first, retried, ok = 0, 0, 0
    for i = 0, buckets - 1 do
      local c = redis.call('HMGET', KEYS[4] .. (b - i), 'first', 'retry', 'ok')
      first = first + (tonumber(c[1]) or 0)
      retried = retried + (tonumber(c[2]) or 0)
      ok = ok + (tonumber(c[3]) or 0)
    end
    -- a retry that succeeded gave its charge back: only failing retries spend it
    if math.max(retried - ok, 0) >= math.max(tonumber(ARGV[5]), tonumber(ARGV[4]) * first) then
      redis.call('INCR', KEYS[4] .. 'exhausted')
      return {'over_budget'}
    end
    redis.call('HINCRBY', bkey, 'retry', 1)
  end
  redis.call('EXPIRE', bkey, math.ceil(window * 2))
end
local mark = ARGV[9] .. ' ' .. ARGV[10] .. ' ' .. string.format('%.3f', server_now)
if ARGV[11] == '1' then mark = '~' .. mark end
redis.call('SET', KEYS[3], mark, 'EX', tonumber(ARGV[8]))
return {'run'}
"""

# A pending try whose batch was lost before it started: clear the mark left behind
# (if still that one) and begin afresh. KEYS, ARGV: the begin's, then the expected mark.
TAKE_OVER_LUA = (
    "local function begin(KEYS, ARGV)\n" + BEGIN_LUA + "\nend\n"
    "if redis.call('GET', KEYS[3]) == ARGV[12] then redis.call('DEL', KEYS[3]) end\n"
    "return begin(KEYS, ARGV)\n"
)

# A batch starts a pending try: "~<token> ..." becomes "<token> ...". KEYS: running mark.
# ARGV: token, ttl_s. Returns 0 when the mark is not this delivery's pending one.
START_LUA = """
local cur = redis.call('GET', KEYS[1])
if not cur or string.sub(cur, 1, #ARGV[1] + 2) ~= '~' .. ARGV[1] .. ' ' then return 0 end
redis.call('SET', KEYS[1], string.sub(cur, 2), 'EX', tonumber(ARGV[2]))
return 1
"""

# KEYS: settled mark, running mark, done mark, target (schedule zset or DLQ list)
#       [, retry budget bucket: a retry's success gives back its charge there]
# ARGV: kind (done|schedule|push|none; recheck: schedule, leave the try unsettled),
#       settled ttl_s, done ttl_s, only if running (1/0: began and not merely pending),
#       member or message, score, push: DLQ index prefix ('' = none), index meta, group message,
#       [budget bucket ttl_s]
SETTLE_LUA = INDEX_LUA + """
local kind, done_ttl = ARGV[1], tonumber(ARGV[3])
-- settled already; a success keeps only its done mark, so a success sent again (its
-- reply lost) is found by that mark: it must not refund or count a call twice
local seen
if kind == 'done' and done_ttl > 0 then seen = redis.call('EXISTS', KEYS[1], KEYS[3])
else seen = redis.call('EXISTS', KEYS[1]) end
if seen > 0 then
  if kind == 'done' and done_ttl > 0 then redis.call('SET', KEYS[3], '1', 'EX', done_ttl) end
  return 0
end
if ARGV[4] == '1' then
  local cur = redis.call('GET', KEYS[2])
  if not cur or string.sub(cur, 1, 1) == '~' then return 0 end
end
if kind == 'recheck' then
  redis.call('ZADD', KEYS[4], tonumber(ARGV[6]), ARGV[5])
  return 1
end
if kind == 'done' then
  if done_ttl > 0 then redis.call('SET', KEYS[3], '1', 'EX', done_ttl) end
  if KEYS[5] then
    redis.call('HINCRBY', KEYS[5], 'ok', 1)
    redis.call('EXPIRE', KEYS[5], tonumber(ARGV[10]))
  end
elseif kind == 'schedule' then
  redis.call('ZADD', KEYS[4], tonumber(ARGV[6]), ARGV[5])
elseif kind == 'push' then
  redis.call('LPUSH', KEYS[4], ARGV[5])
  if ARGV[7] ~= '' then ix_add(ARGV[7], ARGV[8], ARGV[9]) end
end
if kind ~= 'done' or done_ttl == 0 then
  redis.call('SET', KEYS[1], kind, 'EX', tonumber(ARGV[2]))
end
redis.call('DEL', KEYS[2])
return 1
"""

# The begin, then (if it says 'run') the breakers of the handler's downstreams, in
# order. KEYS: the begin's 4, then per downstream its breaker hash and probe leases.
# ARGV: the begin's BEGIN_ARGS, then per downstream the allow script's 5. Returns the begin's
# reply; a 'run' carries {'run', '', '0', i, state, retry_in}: i the first downstream
# that denied (1-based; '0': every one allowed), and the leases granted before it are
# given back.
BEGIN_GATED_LUA = (
    "local function begin(KEYS, ARGV)\n" + BEGIN_LUA + "\nend\n"
    "local function allow(KEYS, ARGV)\n" + ALLOW_LUA + "\nend\n"
    f"local nb = {BEGIN_ARGS}\n" + """
local v = begin({KEYS[1], KEYS[2], KEYS[3], KEYS[4]}, {unpack(ARGV, 1, nb)})
if v[1] ~= 'run' then return v end
local granted = {}
for i = 1, (#KEYS - 4) / 2 do
  local k = {KEYS[3 + 2 * i], KEYS[4 + 2 * i]}
  local a = allow(k, {unpack(ARGV, nb - 4 + 5 * i, nb + 5 * i)})
  if a[1] == 0 then
    for _, g in ipairs(granted) do redis.call('ZREM', g[1], g[2]) end
    return {'run', '', '0', tostring(i), a[2], a[3]}
  end
  if a[4] then granted[#granted + 1] = {k[2], a[4]} end
end
return {'run', '', '0', '0'}
""")

# The settle, then the outcome of each downstream call the handler made, recorded only
# when this settle wrote (a settle retried after a lost reply records nothing twice);
# otherwise, or for an outcome of '-' (no call counted), only the probe lease is given
# back. KEYS: the settle's (ARGV[1] of them), then per downstream its breaker hash and
# probe leases. ARGV: the settle's count of keys and of args, the settle's args, then
# per downstream the record script's 9. Returns {written (0/1), state per downstream}.
SETTLE_RECORDED_LUA = (
    "local function settle(KEYS, ARGV)\n" + SETTLE_LUA + "\nend\n"
    "local function record(KEYS, ARGV)\n" + RECORD_LUA + "\nend\n" + """
local nk, na = tonumber(ARGV[1]), tonumber(ARGV[2])
local written = settle({unpack(KEYS, 1, nk)}, {unpack(ARGV, 3, 2 + na)})
local out = {written}
for i = 1, (#KEYS - nk) / 2 do
  local k = {KEYS[nk + 2 * i - 1], KEYS[nk + 2 * i]}
  local a = {unpack(ARGV, 3 + na + 9 * (i - 1), 2 + na + 9 * i)}
  if written == 1 and a[2] ~= '-' then out[#out + 1] = record(k, a)
  else
    if a[8] ~= '' then redis.call('ZREM', k[2], a[8]) end
    out[#out + 1] = ''
  end
end
return out
""")
