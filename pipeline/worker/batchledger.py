"""The ledger calls of a batch: every begin in one script call, then per event one
call that settles it done and starts the next.

The steps are the ledger's own (:mod:`pipeline.worker.ledger`: the begin and settle
scripts, composed here, not rewritten); what changes is how many calls carry
them. A batch's tries share their tier, attempt and budget state, so one call
begins them all (each one to run claimed *pending*), and the done settle of one
event carries the *start* of the next, written on the batch's
:class:`~pipeline.worker.settlestream.SettleStream` without waiting. Once the stream's
replies are off, that settle goes out as three plain commands (the done mark, the
running mark deleted, the next mark started with ``SET ... XX``) rather than a script
call: the same marks (``test_ledger.py`` checks both forms), at a third of Redis's time.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from pipeline.core.state import Keys
from pipeline.worker.ledger import (
    BEGIN_LUA,
    DONE,
    RUNNING_TTL_S,
    SETTLE_LUA,
    SETTLED_TTL_S,
    START_LUA,
    Begin,
    Ledger,
    Try,
    verdict,
)
from pipeline.worker.settlestream import Call, SettleStream
from pipeline.worker.wire import registered, resp

__all__ = ["BatchLedger", "plain_done"]


# KEYS: the retry budget key prefix, then per try: done mark, settled mark, running mark.
# ARGV: the begin's 1-8, host and pid, then one delivery token per try. Every try
# begins pending; returns one begin verdict per try, a plain 'run' as the integer 1
# (most of them: the cheapest reply to read).
_BEGIN_MANY_LUA = (
    "local function begin(KEYS, ARGV)\n" + BEGIN_LUA + "\nend\n"
    """
local out = {}
for i = 1, (#KEYS - 1) / 3 do
  local v = begin({KEYS[3 * i - 1], KEYS[3 * i], KEYS[3 * i + 1], KEYS[1]},
                 {ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8],
                  ARGV[9 + i], ARGV[9], '1'})
  if v[1] == 'run' and #v == 1 then out[i] = 1 else out[i] = v end
end
return out
""")

# The same verdicts and marks for a batch's first attempts (what a batch message's
# tries are), with the steps they share done once, not per try: the server time, the
# running mark's tail, and the retry budget's count (one HINCRBY of the tries that
# began). Three commands per try instead of seven; checked against the loop above,
# state by state, in tests/integration/test_ledger.py. Same KEYS and ARGV; when every
# try is to run (the usual case) the reply is the running marks' tail (" <host> <pid>
# <server time>", what a start keeps after the token), one string to read.
_BEGIN_FIRSTS_LUA = """
local t = redis.call('TIME')
local server_now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local tail = ' ' .. ARGV[9] .. ' ' .. string.format('%.3f', server_now)
local ttl = tonumber(ARGV[8])
local out, began, every_run = {}, 0, true
for i = 1, (#KEYS - 1) / 3 do
  local token = ARGV[9 + i]
  if redis.call('EXISTS', KEYS[3 * i - 1], KEYS[3 * i]) > 0 then
    every_run = false
    if redis.call('EXISTS', KEYS[3 * i - 1]) == 1 then out[i] = {'done'}
    else out[i] = {'settled'} end
  else
    local cur = redis.call('GET', KEYS[3 * i + 1])
    if not cur then
      redis.call('SET', KEYS[3 * i + 1], '~' .. token .. tail, 'EX', ttl)
      began = began + 1
      out[i] = 1
    elseif string.sub(cur, 1, #token + 1) == token .. ' '
           or string.sub(cur, 1, #token + 2) == '~' .. token .. ' ' then
      out[i] = 1
    else
      local since = tonumber(string.match(cur, '(%S+)$')) or 0
      out[i] = {'lost', cur, tostring(server_now - since)}
      every_run = false
    end
  end
end
if ARGV[3] == '1' and began > 0 then
  local window, buckets = tonumber(ARGV[6]), tonumber(ARGV[7])
  local bkey = KEYS[1] .. math.floor(tonumber(ARGV[1]) / (window / buckets))
  redis.call('HINCRBY', bkey, 'first', began)
  redis.call('EXPIRE', bkey, math.ceil(window * 2))
end
if every_run then return tail end
return out
"""

# A start that finds no claim of its own (taken over: the event may run twice) notes
# the token in the batch's list (KEYS[2] here, KEYS[6] below), read when the batch
# ends: the stream may not be reading replies.
_NOTE_LOST = """
local function note_lost(key, token)
  redis.call('RPUSH', key, token)
  redis.call('EXPIRE', key, 3600)
end
"""

# KEYS: running mark, the batch's lost-claims list. ARGV: token, ttl_s. Returns 1/0.
_START_NOTED_LUA = (
    "local function start(KEYS, ARGV)\n" + START_LUA + "\nend\n" + _NOTE_LOST + """
local started = start({KEYS[1]}, ARGV)
if started == 0 then note_lost(KEYS[2], ARGV[1]) end
return started
""")

# KEYS: settled mark, running mark, done mark, the next try's running mark, the retry
#       budget bucket a retry's success gives its charge back to (KEYS[1] when unused),
#       the batch's lost-claims list.
# ARGV: settled ttl_s, done ttl_s, the next try's token ('': none), running ttl_s,
#       the budget bucket's ttl_s ('0': not a retry). Returns one integer (cheap to
#       read): settled (1/0) + 2 * (started + 1), started 1/0, or -1 with no next try.
_DONE_THEN_START_LUA = (
    "local function settle(KEYS, ARGV)\n" + SETTLE_LUA + "\nend\n"
    "local function start(KEYS, ARGV)\n" + START_LUA + "\nend\n" + _NOTE_LOST + """
local budget = nil
if ARGV[5] ~= '0' then budget = KEYS[5] end
local settled = settle({KEYS[1], KEYS[2], KEYS[3], KEYS[1], budget},
                       {'done', ARGV[1], ARGV[2], '0', '', '0', '', '', '', ARGV[5]})
local started = -1
if ARGV[3] ~= '' then started = start({KEYS[4]}, {ARGV[3], ARGV[4]}) end
if started == 0 then note_lost(KEYS[6], ARGV[3]) end
return settled + 2 * (started + 1)
""")


# KEYS: the batch's lost-claims list. Returns its tokens and deletes it.
_TAKE_LOST_LUA = """
local tokens = redis.call('LRANGE', KEYS[1], 0, -1)
redis.call('DEL', KEYS[1])
return tokens
"""

RUN = Begin("run")  # the verdict of a try to run (most of a batch's)
_RUNNING_TTL = str(RUNNING_TTL_S)  # a started try's running mark lives this long (s)


def plain_done(done: str, ttl_s: str, running: str, start: tuple[str, str] | None) -> bytes:
    """``SET done 1 EX ttl_s``, ``DEL running`` and, with ``start`` (a running mark and
    its started value), ``SET mark value XX EX`` :data:`RUNNING_TTL_S`, packed at once:
    :func:`~pipeline.worker.wire.resp` of each, a third of its time (one per event)."""
    text = (f"*5\r\n$3\r\nSET\r\n${len(done)}\r\n{done}\r\n$1\r\n1\r\n$2\r\nEX\r\n"
            f"${len(ttl_s)}\r\n{ttl_s}\r\n*2\r\n$3\r\nDEL\r\n${len(running)}\r\n{running}\r\n")
    if start is not None:
        mark, value = start
        text += (f"*6\r\n$3\r\nSET\r\n${len(mark)}\r\n{mark}\r\n${len(value)}\r\n{value}\r\n"
                 f"$2\r\nXX\r\n$2\r\nEX\r\n${len(_RUNNING_TTL)}\r\n{_RUNNING_TTL}\r\n")
    if text.isascii():  # a character is a byte: the lengths hold
        return text.encode()
    commands = [["SET", done, "1", "EX", ttl_s], ["DEL", running]]
    if start is not None:
        commands.append(["SET", *start, "XX", "EX", _RUNNING_TTL])
    return b"".join(map(resp, commands))


class BatchLedger:
    """One batch's session with the ledger: its scripts and its stream."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.stream = SettleStream(ledger.client)
        self.lost_key = f"{Keys.prefix}batch-lost:{uuid.uuid4().hex}"  # claims found taken
        self._started: dict[str, Try] = {}  # token -> the try it started, for the log
        self._tail: str | None = None  # the running marks' tail, when the begin gave it
        self._done_ttl = str(ledger.done_ttl_s) if ledger.done_ttl_s else ""
        client = ledger.client
        self._begin_many = registered(client, _BEGIN_MANY_LUA)
        self._begin_firsts = registered(client, _BEGIN_FIRSTS_LUA)
        self._done_then_start = registered(client, _DONE_THEN_START_LUA)
        self._start = registered(client, _START_NOTED_LUA)
        self._take_lost = registered(client, _TAKE_LOST_LUA)

    def begin_many(self, tries: list[Try],
                   meanwhile: Callable[[], object] | None = None) -> list[Begin]:
        """Every try's verdict, those to run claimed pending: one call on ``stream``
        when the tries share their tier, attempt and budget state (a batch's do), else
        (or when that call fails) the ledger's pipelined begins. Its reply is read
        before any settle is written: the stream then stops reading replies.
        ``meanwhile`` (pure work) runs while Redis begins them."""
        shared = {(t.tier_name, t.attempt, t.charged) for t in tries}
        if len(shared) == 1:
            replies = self.stream.begin_many([self._begin_call(tries)], meanwhile)
            if replies is not None:
                if isinstance(replies[0], bytes):  # every one to run: the marks' tail
                    self._tail = replies[0].decode()
                    return [RUN] * len(tries)
                return [RUN if reply == 1 else verdict(reply) for reply in replies[0]]
        return self.ledger.begin_many(tries)

    def _begin_call(self, tries: list[Try]) -> Call:
        """One begin call for ``tries`` (sharing their tier, attempt and budget state):
        the shared arguments once, then each try's three keys and its token."""
        shared_keys, args = self.ledger.begin_call(tries[0], pending=True)
        keys = [shared_keys[3]]
        done = self.ledger.done_key
        for task_id, key, _ in (t.ids for t in tries):
            keys += (done(task_id), Keys.settled(task_id, key), Keys.running(task_id, key))
        script = self._begin_firsts if tries[0].attempt == 1 else self._begin_many
        return Call(script, keys, [*args[:8], args[9], *(t.ids[2] for t in tries)],
                    what="begin")

    def start(self, t: Try) -> None:
        """Start a pending try (its handler runs next), without waiting."""
        keys, args = self.ledger.start_call(t)
        self._started[t.ids[2]] = t
        self.stream.send([Call(self._start, [*keys, self.lost_key], args,
                               what=f"start {t.ids[0]} {t.ids[1]}")])

    def settle_done(self, t: Try, following: Try | None, redo: Callable[[], object]) -> None:
        """Settle ``t`` done and start ``following`` (pending), without waiting;
        ``redo`` settles ``t`` synchronously if the call cannot be confirmed."""
        if self._tail is None or t.refunds or not self._done_ttl or not self.stream.quiet:
            if following is not None:  # a script start notes a claim taken over: by token
                self._started[following.ids[2]] = following
            self.stream.send([self._done_call(t, following, redo)])
            return
        # the script's effect as plain commands (a script call costs Redis several times
        # their time): the done mark, the running mark gone, and the next try started:
        # its pending mark "~<token><tail>" becomes "<token><tail>" (XX: not if it is gone)
        task_id, key, _ = t.ids
        done = self.ledger.done_key(task_id)
        start = None if following is None else (Keys.running(*following.ids[:2]),
                                                 following.ids[2] + self._tail)
        # what the close checks (applied_if) and redoes; its script is never written
        call = Call(self._done_then_start, [], [], f"settle {task_id} {key}", redo,
                    (Keys.settled(task_id, key), done))
        self.stream.send_plain(call, plain_done(done, self._done_ttl, Keys.running(task_id, key),
                                                start))

    def close(self) -> list[str]:
        """Confirm (or redo) what was sent (:meth:`SettleStream.close`); returns the
        tries whose start found their claim taken over."""
        confirmed = self.stream.close([Call(self._take_lost, [self.lost_key], [],
                                            what="lost")])
        tokens = next((reply for what, reply in confirmed if what == "lost"), None)
        if not isinstance(tokens, list):  # not read: the list expires
            return []
        started = (self._started.get(bytes(t).decode(errors="replace")) for t in tokens)
        return ["?" if t is None else f"{t.ids[0]} {t.ids[1]}" for t in started]

    def _done_call(self, t: Try, following: Try | None, redo: Callable[[], object]) -> Call:
        task_id, key, _ = t.ids
        if t.refunds:  # a retry's success: its budget bucket and the bucket's ttl
            skeys, sargs = self.ledger.settle_call(task_id, key, DONE, budget=t)
            keys = [*skeys[:3], skeys[0], skeys[4], self.lost_key]
            args: list[object] = [SETTLED_TTL_S, sargs[2], "", RUNNING_TTL_S, sargs[-1]]
        else:  # the settle call's keys and arguments, without building the rest
            settled = Keys.settled(task_id, key)
            keys = [settled, Keys.running(task_id, key), self.ledger.done_key(task_id),
                    settled, settled, self.lost_key]
            args = [SETTLED_TTL_S, self.ledger.done_ttl_s, "", RUNNING_TTL_S, 0]
        if following is not None:
            next_task, next_key, next_token = following.ids
            keys[3], args[2] = Keys.running(next_task, next_key), next_token
        return Call(self._done_then_start, keys, args, what=f"settle {task_id} {key}",
                    redo=redo, applied_if=(keys[0], keys[2]))
