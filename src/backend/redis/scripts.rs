//! The Lua scripts: every change that touches several keys is one atomic script.
//!
//! Scripts compute key names from the prefix (`ARGV[1]`), so they target a single Redis
//! or a primary with replicas, not Redis Cluster. Times are Redis's own clock (`TIME`, in
//! milliseconds), so instances on skewed hosts agree on every deadline.

use redis::Script;

/// Helpers shared by the scripts, prepended to each.
const LIBRARY: &str = r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- An expiry entry names a connection and a room; connection ids never hold a newline.
-- Returns nil for an entry of another shape (only external writes can make one).
local function split_entry(entry)
  local i = string.find(entry, '\n', 1, true)
  if not i then return nil end
  return string.sub(entry, 1, i - 1), string.sub(entry, i + 1)
end

local function u32(n)
  return struct.pack('<I4', n)
end

-- Publishes a presence change to the room's presence topic, from inside the script that
-- made it: announcements are ordered exactly as the changes, and a change whose reply is
-- lost is still announced. It goes as the envelope the subscribers parse (tag 'p' in
-- src/backend/redis/envelope.rs): room, connection id, kind, state (JSON text; empty for
-- a cleared state), timestamp. Each instance renders the push itself. `state` is JSON
-- text, 'null', or nil. `now` is the script's clock reading if it took one (nil: read it).
local function announce(p, kind, cid, room, state, now)
  if state == nil or state == 'null' then state = '' end
  local ts = string.format('%.0f', now or now_ms())
  redis.call('PUBLISH', p .. 'topic:presence:' .. room,
    'p' .. u32(#room) .. room .. u32(#cid) .. cid .. u32(#kind) .. kind
      .. u32(#state) .. state .. u32(#ts) .. ts)
end

-- Makes a connection present in a room until `deadline` (extending its presence there),
-- announcing its join when it was not present.
local function make_present(p, cid, room, deadline)
  if redis.call('ZADD', p .. 'presence:' .. room, deadline, cid) == 1 then
    announce(p, 'join', cid, room, nil)
  end
  redis.call('ZADD', p .. 'presence-expiry', deadline, cid .. '\n' .. room)
end

-- Removes a connection from a room with its presence and state there, announcing its
-- leave if it was present. Returns whether it was a member.
local function leave(p, cid, room)
  local member = redis.call('ZREM', p .. 'room:' .. room, cid)
  if member == 1 and redis.call('EXISTS', p .. 'room:' .. room) == 0 then
    redis.call('SREM', p .. 'rooms', room)
  end
  redis.call('SREM', p .. 'conn:' .. cid .. ':rooms', room)
  local present = redis.call('ZREM', p .. 'presence:' .. room, cid)
  local entry = cid .. '\n' .. room
  redis.call('ZREM', p .. 'presence-expiry', entry)
  redis.call('HDEL', p .. 'presence-states:' .. room, cid)
  redis.call('ZREM', p .. 'state-expiry', entry)
  if present == 1 then announce(p, 'leave', cid, room, nil) end
  return member
end

-- Forgets a connection: its rooms (announcing its leaves), metadata and routing.
local function forget(p, cid)
  for _, room in ipairs(redis.call('SMEMBERS', p .. 'conn:' .. cid .. ':rooms')) do
    leave(p, cid, room)
  end
  redis.call('DEL', p .. 'conn:' .. cid .. ':rooms', p .. 'conn:' .. cid)
  redis.call('ZREM', p .. 'connections', cid)
end

-- Whether a connection's presence in a room is still live.
local function is_present(p, cid, room, now)
  local deadline = redis.call('ZSCORE', p .. 'presence:' .. room, cid)
  return deadline and tonumber(deadline) > now
end
"#;

fn script(body: &str) -> Script {
    Script::new(&format!("{LIBRARY}\n{body}"))
}

/// Every script, loaded once per backend.
pub(super) struct Scripts {
    pub(super) heartbeat: Script,
    pub(super) enter: Script,
    pub(super) register: Script,
    pub(super) route: Script,
    pub(super) detach: Script,
    pub(super) unregister: Script,
    pub(super) join: Script,
    pub(super) leave: Script,
    pub(super) members_with_metadata: Script,
    pub(super) all_room_metadata: Script,
    pub(super) refresh_presence: Script,
    pub(super) presence: Script,
    pub(super) set_state: Script,
    pub(super) clear_state: Script,
    pub(super) sweep: Script,
    pub(super) write_channel: Script,
    pub(super) read_history: Script,
    pub(super) record_cas: Script,
    pub(super) metadata_cas: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Scripts {
            // KEYS[1] instances; ARGV[1] instance id; ARGV[2] ttl ms. Extends the
            // instance's deadline but never adds it: returns 0, changing nothing, when it
            // is missing (Redis restarted empty, or it was swept while alive). A heartbeat
            // that runs late and whose reply is lost so cannot hide that from the next.
            heartbeat: script(
                r"
                if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
                redis.call('ZADD', KEYS[1], now_ms() + tonumber(ARGV[2]), ARGV[1])
                return 1
                ",
            ),
            // KEYS[1] instances; ARGV[1] instance id; ARGV[2] ttl ms. Adds the instance
            // (or extends its deadline).
            enter: script(
                r"
                redis.call('ZADD', KEYS[1], now_ms() + tonumber(ARGV[2]), ARGV[1])
                return 1
                ",
            ),
            // ARGV[1] prefix, ARGV[2] instance id, ARGV[3] connection id.
            register: script(
                r"
                local p, iid, cid = ARGV[1], ARGV[2], ARGV[3]
                local t = redis.call('TIME')
                local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
                redis.call('HSET', p .. 'conn:' .. cid, 'instance', iid)
                redis.call('SADD', p .. 'instance:' .. iid .. ':connections', cid)
                redis.call('ZADD', p .. 'connections', 'NX', now_us, cid)
                return 1
                ",
            ),
            // KEYS[1] conn hash; ARGV[1] prefix; ARGV[2] envelope. Publishes on the
            // holder's channel; returns how many instances received it (0 when the
            // connection is unknown or its instance no longer listens).
            route: script(
                r"
                local iid = redis.call('HGET', KEYS[1], 'instance')
                if not iid then return 0 end
                return redis.call('PUBLISH', ARGV[1] .. 'instance:' .. iid, ARGV[2])
                ",
            ),
            // KEYS[1] instances, KEYS[2] instance connections; ARGV[1] prefix;
            // ARGV[2] instance id.
            detach: script(
                r"
                for _, cid in ipairs(redis.call('SMEMBERS', KEYS[2])) do
                  forget(ARGV[1], cid)
                end
                redis.call('DEL', KEYS[2])
                redis.call('ZREM', KEYS[1], ARGV[2])
                return 1
                ",
            ),
            // KEYS[1] instance connections; ARGV[1] prefix; ARGV[2] connection id.
            unregister: script(
                r"
                redis.call('SREM', KEYS[1], ARGV[2])
                forget(ARGV[1], ARGV[2])
                return 1
                ",
            ),
            // ARGV[1] prefix, ARGV[2] connection id, ARGV[3] room, ARGV[4] presence ttl ms
            // (0: not tracked). Returns 0 when the connection is not registered, else 1;
            // announces the join when it became present.
            join: script(
                r"
                local p, cid, room = ARGV[1], ARGV[2], ARGV[3]
                if redis.call('HEXISTS', p .. 'conn:' .. cid, 'instance') == 0 then return 0 end
                local order = redis.call('INCR', p .. 'join-order')
                redis.call('ZADD', p .. 'room:' .. room, 'NX', order, cid)
                redis.call('SADD', p .. 'conn:' .. cid .. ':rooms', room)
                redis.call('SADD', p .. 'rooms', room)
                local ttl = tonumber(ARGV[4])
                if ttl > 0 then make_present(p, cid, room, now_ms() + ttl) end
                return 1
                ",
            ),
            // ARGV[1] prefix, ARGV[2] connection id, ARGV[3] room. Returns whether the
            // connection was a member.
            leave: script(
                r"
                return leave(ARGV[1], ARGV[2], ARGV[3])
                ",
            ),
            // ARGV[1] prefix, ARGV[2] room. Returns {id, metadata or nil, ...} in join order.
            members_with_metadata: script(
                r"
                local p = ARGV[1]
                local out = {}
                for _, cid in ipairs(redis.call('ZRANGE', p .. 'room:' .. ARGV[2], 0, -1)) do
                  out[#out + 1] = cid
                  out[#out + 1] = redis.call('HGET', p .. 'conn:' .. cid, 'meta')
                end
                return out
                ",
            ),
            // ARGV[1] prefix. Returns {room, metadata, ...} for every room with metadata.
            all_room_metadata: script(
                r"
                local p = ARGV[1]
                local out = {}
                for _, room in ipairs(redis.call('SMEMBERS', p .. 'rooms-with-meta')) do
                  local meta = redis.call('HGET', p .. 'room-meta:' .. room, 'meta')
                  if meta then
                    out[#out + 1] = room
                    out[#out + 1] = meta
                  end
                end
                return out
                ",
            ),
            // ARGV[1] prefix, then for each connection: its id, its room count n, and n
            // pairs (room, ttl ms). Extends presence where the connection is still a
            // member; announces a join where it had lapsed.
            refresh_presence: script(
                r"
                local p = ARGV[1]
                local now = now_ms()
                local i = 2
                while i <= #ARGV do
                  local cid, rooms = ARGV[i], tonumber(ARGV[i + 1])
                  i = i + 2
                  for _ = 1, rooms do
                    local room, ttl = ARGV[i], tonumber(ARGV[i + 1])
                    i = i + 2
                    if redis.call('ZSCORE', p .. 'room:' .. room, cid) then
                      make_present(p, cid, room, now + ttl)
                    end
                  end
                end
                return 1
                ",
            ),
            // ARGV[1] prefix, ARGV[2] room. Returns {id, metadata or nil, state or nil, ...}
            // for the present connections in join order.
            presence: script(
                r"
                local p, room = ARGV[1], ARGV[2]
                local now = now_ms()
                local out = {}
                for _, cid in ipairs(redis.call('ZRANGE', p .. 'room:' .. room, 0, -1)) do
                  if is_present(p, cid, room, now) then
                    out[#out + 1] = cid
                    out[#out + 1] = redis.call('HGET', p .. 'conn:' .. cid, 'meta')
                    out[#out + 1] = redis.call('HGET', p .. 'presence-states:' .. room, cid)
                  end
                end
                return out
                ",
            ),
            // ARGV[1] prefix, ARGV[2] connection id, ARGV[3] room, ARGV[4] state JSON,
            // ARGV[5] expiry ms (0: none), ARGV[6] 1 to announce. Returns 0 when the
            // connection is not present.
            set_state: script(
                r"
                local p, cid, room = ARGV[1], ARGV[2], ARGV[3]
                local now = now_ms()
                if not is_present(p, cid, room, now) then return 0 end
                redis.call('HSET', p .. 'presence-states:' .. room, cid, ARGV[4])
                local entry = cid .. '\n' .. room
                local expire = tonumber(ARGV[5])
                if expire > 0 then
                  redis.call('ZADD', p .. 'state-expiry', now + expire, entry)
                else
                  redis.call('ZREM', p .. 'state-expiry', entry)
                end
                if ARGV[6] == '1' then announce(p, 'state', cid, room, ARGV[4], now) end
                return 1
                ",
            ),
            // ARGV[1] prefix, ARGV[2] connection id, ARGV[3] room. Returns 0 when the
            // connection is not present; announces `state: null` when it had a state.
            clear_state: script(
                r"
                local p, cid, room = ARGV[1], ARGV[2], ARGV[3]
                if not is_present(p, cid, room, now_ms()) then return 0 end
                redis.call('ZREM', p .. 'state-expiry', cid .. '\n' .. room)
                if redis.call('HDEL', p .. 'presence-states:' .. room, cid) == 1 then
                  announce(p, 'state', cid, room, 'null')
                end
                return 1
                ",
            ),
            // ARGV[1] prefix, ARGV[2] most entries of each kind per run. Claims dead
            // instances and lapsed entries with ZREM (or SPOP), which succeeds for
            // exactly one sweeper, and announces what it removes. A dead instance's
            // connections go to `P dead-connections` and are forgotten a batch per run.
            // Returns ms until the next deadline, 0 when work is left, or -1.
            sweep: script(
                r"
                local p, limit = ARGV[1], tonumber(ARGV[2])
                local now = now_ms()
                local dead = p .. 'dead-connections'
                for _, iid in ipairs(redis.call('ZRANGEBYSCORE', p .. 'instances', '-inf', now, 'LIMIT', 0, limit)) do
                  if redis.call('ZREM', p .. 'instances', iid) == 1 then
                    local set = p .. 'instance:' .. iid .. ':connections'
                    if redis.call('EXISTS', set) == 1 then
                      redis.call('SUNIONSTORE', dead, dead, set)
                      redis.call('DEL', set)
                    end
                  end
                end
                for _, cid in ipairs(redis.call('SPOP', dead, limit)) do
                  forget(p, cid)
                end
                for _, entry in ipairs(redis.call('ZRANGEBYSCORE', p .. 'presence-expiry', '-inf', now, 'LIMIT', 0, limit)) do
                  if redis.call('ZREM', p .. 'presence-expiry', entry) == 1 then
                    local cid, room = split_entry(entry)
                    if cid then
                      redis.call('ZREM', p .. 'presence:' .. room, cid)
                      redis.call('HDEL', p .. 'presence-states:' .. room, cid)
                      redis.call('ZREM', p .. 'state-expiry', entry)
                      announce(p, 'leave', cid, room, nil)
                    end
                  end
                end
                for _, entry in ipairs(redis.call('ZRANGEBYSCORE', p .. 'state-expiry', '-inf', now, 'LIMIT', 0, limit)) do
                  if redis.call('ZREM', p .. 'state-expiry', entry) == 1 then
                    local cid, room = split_entry(entry)
                    if cid and redis.call('HDEL', p .. 'presence-states:' .. room, cid) == 1 then
                      announce(p, 'state', cid, room, 'null')
                    end
                  end
                end
                if redis.call('EXISTS', dead) == 1 then return 0 end
                local next_due = -1
                for _, key in ipairs({'instances', 'presence-expiry', 'state-expiry'}) do
                  local first = redis.call('ZRANGE', p .. key, 0, 0, 'WITHSCORES')
                  if first[2] then
                    local due = math.max(0, tonumber(first[2]) - now)
                    if next_due < 0 or due < next_due then next_due = due end
                  end
                end
                return next_due
                ",
            ),
            // ARGV[1] history list key, ARGV[2] message, ARGV[3] how many to keep (0:
            // none), ARGV[4] pub/sub channel, ARGV[5] its payload (an envelope, or a plain
            // channel's bare text), ARGV[6] the key of the kept messages' total size,
            // ARGV[7] how many bytes to keep, ARGV[8] for a plain channel the key of the
            // list's length as the previous write left it ('' otherwise). Keeps the
            // message and publishes it in one step, so history and live messages never
            // disagree. The oldest messages go while more than the count or the bytes are
            // kept; each write pops only what it pushed out, so it costs O(1) amortised.
            // Other processes may push to a plain channel's list: when its length is not
            // what the previous write left, the size is counted again, in one pass.
            write_channel: script(
                r"
                local list, bytes_key, length_key = ARGV[1], ARGV[6], ARGV[8]
                local keep, keep_bytes = tonumber(ARGV[3]), tonumber(ARGV[7])
                if keep > 0 then
                  -- Absent: a history kept before sizes were counted, or a plain one
                  -- that only other processes wrote so far.
                  local recount = redis.call('EXISTS', bytes_key) == 0
                  if not recount and length_key ~= '' then
                    local left = tonumber(redis.call('GET', length_key) or '-1')
                    recount = left ~= redis.call('LLEN', list)
                  end
                  if recount then
                    local total, start = 0, 0
                    repeat
                      local chunk = redis.call('LRANGE', list, start, start + 999)
                      for _, message in ipairs(chunk) do total = total + #message end
                      start = start + 1000
                    until #chunk < 1000
                    redis.call('SET', bytes_key, total)
                  end
                  redis.call('LPUSH', list, ARGV[2])
                  local total = redis.call('INCRBY', bytes_key, #ARGV[2])
                  local length = redis.call('LLEN', list)
                  while length > 0 and (length > keep or total > keep_bytes) do
                    local oldest = redis.call('RPOP', list)
                    total = redis.call('DECRBY', bytes_key, #oldest)
                    length = length - 1
                  end
                  if length == 0 then
                    redis.call('DEL', bytes_key)
                    if length_key ~= '' then redis.call('DEL', length_key) end
                  elseif length_key ~= '' then
                    redis.call('SET', length_key, length)
                  end
                end
                redis.call('PUBLISH', ARGV[4], ARGV[5])
                return 1
                ",
            ),
            // KEYS[1] history list; ARGV[1] most messages to return, ARGV[2] the longest
            // message to return (longer ones are skipped: only other processes, writing a
            // plain channel's list, can keep one), ARGV[3] bytes after which to stop.
            // Returns the newest messages, newest first, up to and including the one that
            // takes the total past ARGV[3]: the caller sees that older ones were left out.
            // Reads in chunks, so that a long list written by others is never copied whole.
            read_history: Script::new(
                r"
                local limit, longest, budget = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
                local out, total, start = {}, 0, 0
                -- A step of 0 would never advance: no limit, nothing read.
                if limit < 1 then return out end
                local step = math.min(limit, 100)
                while true do
                  local chunk = redis.call('LRANGE', KEYS[1], start, start + step - 1)
                  for _, message in ipairs(chunk) do
                    if #message <= longest then
                      out[#out + 1] = message
                      total = total + #message
                      if #out >= limit or total > budget then return out end
                    end
                  end
                  if #chunk < step then return out end
                  start = start + step
                end
                ",
            ),
            // ARGV[1] prefix, ARGV[2] record id, ARGV[3] the write token the writer read
            // ('' for no record), ARGV[4] the new value JSON ('' deletes), ARGV[5] the new
            // version, ARGV[6] a fresh token, then (channel, envelope) pairs to publish.
            // Compare-and-set: returns 0, changing nothing, when another write got in
            // since the read.
            record_cas: script(
                r"
                local p, id = ARGV[1], ARGV[2]
                local key = p .. 'record:' .. id
                local current = redis.call('HGET', key, 'token') or ''
                if current ~= ARGV[3] then return 0 end
                if ARGV[4] == '' then
                  redis.call('DEL', key)
                  redis.call('ZREM', p .. 'record-ids', id)
                else
                  redis.call('HSET', key, 'value', ARGV[4], 'version', ARGV[5], 'token', ARGV[6])
                  redis.call('ZADD', p .. 'record-ids', 0, id)
                end
                for i = 7, #ARGV, 2 do
                  redis.call('PUBLISH', ARGV[i], ARGV[i + 1])
                end
                return 1
                ",
            ),
            // KEYS[1] the hash holding `meta`; ARGV[1] '1' when the writer read a
            // `meta`, else '0'; ARGV[2] the `meta` it read; ARGV[3] a field that must exist
            // ('' for none); ARGV[4] the new `meta`; ARGV[5] a set to add ARGV[6] to ('' for
            // none). Compare-and-set on the value itself: a `meta` written back unchanged
            // in between merges to the same result. Returns -1, changing nothing, when the
            // required field is missing, 0 when another write got in since the read.
            metadata_cas: script(
                r"
                if ARGV[3] ~= '' and redis.call('HEXISTS', KEYS[1], ARGV[3]) == 0 then
                  return -1
                end
                local current = redis.call('HGET', KEYS[1], 'meta')
                if ARGV[1] == '1' then
                  if current ~= ARGV[2] then return 0 end
                elseif current then
                  return 0
                end
                redis.call('HSET', KEYS[1], 'meta', ARGV[4])
                if ARGV[5] ~= '' then redis.call('SADD', ARGV[5], ARGV[6]) end
                return 1
                ",
            ),
        }
    }
}
