"""The reliable fetch's one Lua script: pop and record in the same atomic step.

:data:`FETCH_LUA` first removes the acknowledgements made since the last fetch (from
``unacked``, its index and the consumer's in-flight hash), renews the consumer's lease
in ``pipeline:consumers``, then pops up to "most" messages from the first non-empty
lists in the order given, writing each into ``unacked``/``unacked_index`` and the
in-flight hash before the script returns: nothing can fall between the pop and the
record (:mod:`pipeline.worker.fetch`).
"""

from __future__ import annotations

__all__ = ["FETCH_LUA"]

# KEYS: unacked, unacked_index, in-flight hash, consumers zset, then the lists in order.
# ARGV: now, deadline, consumer id, most messages, acks n, then n delivery tags to ack.
# Acks first (removed from unacked, its index and the in-flight hash), then pops up to
# "most" messages, recording each. Returns {list, message, list, message, ...}.
FETCH_LUA = """
local n_acks = tonumber(ARGV[5])
for i = 6, 5 + n_acks do
  redis.call('HDEL', KEYS[1], ARGV[i])
  redis.call('ZREM', KEYS[2], ARGV[i])
  redis.call('HDEL', KEYS[3], ARGV[i])
end
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[3])
local most, out = tonumber(ARGV[4]), {}
for i = 5, #KEYS do
  while #out < 2 * most do
    local item = redis.call('RPOP', KEYS[i])
    if not item then break end
    local props = cjson.decode(item)['properties']
    local tag = props['delivery_tag']
    local info = props['delivery_info'] or {}
    redis.call('HSET', KEYS[1], tag, '[' .. item .. ',' .. cjson.encode(info['exchange'] or '')
               .. ',' .. cjson.encode(info['routing_key'] or '') .. ']')
    redis.call('ZADD', KEYS[2], ARGV[1], tag)
    redis.call('HSET', KEYS[3], tag, KEYS[i] .. '\\n' .. item)
    out[#out + 1] = KEYS[i]
    out[#out + 1] = item
  end
  if #out >= 2 * most then break end
end
return out
"""
