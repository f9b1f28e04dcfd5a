//! The Lua scripts: every change that touches several keys is one atomic script, and
//! every script touches the keys of one Cluster slot only (see `keys.rs`), which its
//! first key (`KEYS[1]`) names, so that a Cluster client routes it to the slot's node.
//! A script of a room bucket gets the bucket's base (`P{rooms:N}:`) as `KEYS[1]` and
//! builds its keys from it. Changes that span slots (a connection's rooms and the rooms'
//! members) are steps of one script each, ordered so that an interrupted change is
//! completed or undone by whoever comes next (see "Steps across slots" in `mod.rs`).
//!
//! Times are Redis's own clock (`TIME`, in milliseconds), so instances on skewed hosts
//! agree on every deadline.

use redis::Script;

use super::keys::PubSub;

/// Helpers shared by the scripts, prepended to each. `PUBLISH_TOPIC` (set before it) is
/// the command topic channels are published with.
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

-- Publishes a presence change to the room's presence topic (in bucket `b`), from inside
-- the script that made it: announcements are ordered exactly as the changes, and a change
-- whose reply is lost is still announced. It goes as the envelope the subscribers parse
-- (tag 'p' in src/backend/redis/envelope.rs): room, connection id, kind, state (JSON
-- text; empty for a cleared state), timestamp. Each instance renders the push itself.
-- `state` is JSON text, 'null', or nil. `now` is the script's clock reading if it took
-- one (nil: read it).
local function announce(b, kind, cid, room, state, now)
  if state == nil or state == 'null' then state = '' end
  local ts = string.format('%.0f', now or now_ms())
  redis.call(PUBLISH_TOPIC, b .. 'topic:presence:' .. room,
    'p' .. u32(#room) .. room .. u32(#cid) .. cid .. u32(#kind) .. kind
      .. u32(#state) .. state .. u32(#ts) .. ts)
end

-- Makes a connection present in a room until `deadline` (extending its presence there),
-- announcing its join when it was not present.
local function make_present(b, cid, room, deadline)
  if redis.call('ZADD', b .. 'presence:' .. room, deadline, cid) == 1 then
    announce(b, 'join', cid, room, nil)
  end
  redis.call('ZADD', b .. 'presence-expiry', deadline, cid .. '\n' .. room)
end

-- Removes a connection from a room: its membership when `part` is 'member', its presence
-- and state when 'presence' (announcing its leave if it was present), both when 'all'.
-- Returns {whether it was a member, whether it is (or was, for 'all') present}. Doing it
-- again changes and announces nothing: whoever removes the presence entry announces,
-- exactly once.
local function leave(b, cid, room, part)
  local member = 0
  if part ~= 'presence' then
    member = redis.call('ZREM', b .. 'room:' .. room, cid)
    if member == 1 and redis.call('EXISTS', b .. 'room:' .. room) == 0 then
      redis.call('SREM', b .. 'rooms', room)
    end
  end
  if part == 'member' then
    return {member, redis.call('ZSCORE', b .. 'presence:' .. room, cid) and 1 or 0}
  end
  local present = redis.call('ZREM', b .. 'presence:' .. room, cid)
  local entry = cid .. '\n' .. room
  redis.call('ZREM', b .. 'presence-expiry', entry)
  redis.call('HDEL', b .. 'presence-states:' .. room, cid)
  redis.call('ZREM', b .. 'state-expiry', entry)
  if present == 1 then announce(b, 'leave', cid, room, nil) end
  return {member, present}
end

-- Whether a connection's presence in a room is still live.
local function is_present(b, cid, room, now)
  local deadline = redis.call('ZSCORE', b .. 'presence:' .. room, cid)
  return deadline and tonumber(deadline) > now
end

-- The ms until the earliest score of the sorted sets `keys` lapses (0 when one has),
-- or -1 when they are empty.
local function next_due(keys, now)
  local due = -1
  for _, key in ipairs(keys) do
    local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    if first[2] then
      local left = math.max(0, tonumber(first[2]) - now)
      if due < 0 or left < due then due = left end
    end
  end
  return due
end
"#;

/// How long a channel's position outlives its last write when nothing of the channel is
/// kept, or a read of a channel never written: a day.
const POSITION_TTL_MS: u64 = 24 * 60 * 60 * 1000;

/// Every script, loaded once per backend.
pub(super) struct Scripts {
    pub(super) heartbeat: Script,
    pub(super) enter: Script,
    pub(super) register: Script,
    pub(super) route: Script,
    pub(super) enter_room: Script,
    pub(super) join: Script,
    pub(super) leave: Script,
    pub(super) release: Script,
    pub(super) all_room_metadata: Script,
    pub(super) delete_room_metadata: Script,
    pub(super) refresh_presence: Script,
    pub(super) presence: Script,
    pub(super) set_state: Script,
    pub(super) clear_state: Script,
    pub(super) sweep_instances: Script,
    pub(super) sweep_rooms: Script,
    pub(super) write_channel: Script,
    pub(super) read_history: Script,
    pub(super) record_cas: Script,
    pub(super) metadata_cas: Script,
}

impl Scripts {
    /// The scripts, publishing topics on `topics` pub/sub.
    pub(super) fn new(topics: PubSub) -> Self {
        let library = format!(
            "local PUBLISH_TOPIC = '{}'\nlocal POSITION_TTL_MS = {POSITION_TTL_MS}\n{LIBRARY}",
            topics.publish_command()
        );
        let script = |body: &str| Script::new(&format!("{library}\n{body}"));
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
            // KEYS[1] the instance's connections, KEYS[2] every connection, KEYS[3]
            // instances; ARGV[1] connection id, ARGV[2] instance id. The registry's half of
            // registering a connection: returns 0, changing nothing, when the instance is
            // not registered (it was swept, or Redis restarted empty: its heartbeat is
            // about to close its connections), so that no connection is kept in a set
            // that no sweep will ever read.
            register: script(
                r"
                if not redis.call('ZSCORE', KEYS[3], ARGV[2]) then return 0 end
                local t = redis.call('TIME')
                local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
                redis.call('SADD', KEYS[1], ARGV[1])
                redis.call('ZADD', KEYS[2], 'NX', now_us, ARGV[1])
                return 1
                ",
            ),
            // KEYS[1] conn hash; ARGV[1] prefix; ARGV[2] envelope. Publishes on the
            // holder's channel; returns how many instances received it (0 when the
            // connection is unknown or its instance no longer listens). Single Redis only:
            // on a Cluster the holder's channel is another slot's.
            route: script(
                r"
                local iid = redis.call('HGET', KEYS[1], 'instance')
                if not iid then return 0 end
                return redis.call('PUBLISH', ARGV[1] .. 'instance:{' .. iid .. '}', ARGV[2])
                ",
            ),
            // KEYS[1] conn hash, KEYS[2] its rooms; ARGV[1] room. A join's first step:
            // returns 0 when the connection is not registered, else notes the room.
            enter_room: script(
                r"
                if redis.call('HEXISTS', KEYS[1], 'instance') == 0 then return 0 end
                redis.call('SADD', KEYS[2], ARGV[1])
                return 1
                ",
            ),
            // KEYS[1] room bucket; ARGV[1] connection id, ARGV[2] room, ARGV[3] presence
            // ttl ms (0: not tracked). A join's second step: makes the connection a member
            // (and present); announces the join when it became present.
            join: script(
                r"
                local b, cid, room = KEYS[1], ARGV[1], ARGV[2]
                local order = redis.call('INCR', b .. 'join-order')
                redis.call('ZADD', b .. 'room:' .. room, 'NX', order, cid)
                redis.call('SADD', b .. 'rooms', room)
                local ttl = tonumber(ARGV[3])
                if ttl > 0 then make_present(b, cid, room, now_ms() + ttl) end
                return 1
                ",
            ),
            // KEYS[1] room bucket; ARGV[1] connection id, ARGV[2] room, ARGV[3] what to
            // remove: 'member', 'presence' or 'all' (see `leave` above). Returns {whether
            // the connection was a member, whether it is or was present}.
            leave: script(
                r"
                return leave(KEYS[1], ARGV[1], ARGV[2], ARGV[3])
                ",
            ),
            // KEYS[1] conn hash, KEYS[2] its rooms. Forgetting's first step: the
            // connection is no longer registered (joins and metadata writes fail from now
            // on); returns its rooms, which stay noted until the connection is dropped.
            release: script(
                r"
                redis.call('HDEL', KEYS[1], 'instance')
                return redis.call('SMEMBERS', KEYS[2])
                ",
            ),
            // KEYS[1] room bucket. Returns {room, metadata, ...} for the bucket's rooms
            // with metadata.
            all_room_metadata: script(
                r"
                local b = KEYS[1]
                local out = {}
                for _, room in ipairs(redis.call('SMEMBERS', b .. 'rooms-with-meta')) do
                  local meta = redis.call('GET', b .. 'room-meta:' .. room)
                  if meta then
                    out[#out + 1] = room
                    out[#out + 1] = meta
                  end
                end
                return out
                ",
            ),
            // KEYS[1] room bucket; ARGV[1] room.
            delete_room_metadata: script(
                r"
                redis.call('DEL', KEYS[1] .. 'room-meta:' .. ARGV[1])
                redis.call('SREM', KEYS[1] .. 'rooms-with-meta', ARGV[1])
                return 1
                ",
            ),
            // KEYS[1] room bucket; ARGV: (connection id, room, ttl ms) triples, rooms of
            // this bucket. Extends presence where the connection is still a member;
            // announces a join where it had lapsed.
            refresh_presence: script(
                r"
                local b = KEYS[1]
                local now = now_ms()
                for i = 1, #ARGV, 3 do
                  local cid, room, ttl = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
                  if redis.call('ZSCORE', b .. 'room:' .. room, cid) then
                    make_present(b, cid, room, now + ttl)
                  end
                end
                return 1
                ",
            ),
            // KEYS[1] room bucket; ARGV[1] room. Returns {id, state or nil, ...} for the
            // present connections in join order.
            presence: script(
                r"
                local b, room = KEYS[1], ARGV[1]
                local now = now_ms()
                local out = {}
                for _, cid in ipairs(redis.call('ZRANGE', b .. 'room:' .. room, 0, -1)) do
                  if is_present(b, cid, room, now) then
                    out[#out + 1] = cid
                    out[#out + 1] = redis.call('HGET', b .. 'presence-states:' .. room, cid)
                  end
                end
                return out
                ",
            ),
            // KEYS[1] room bucket; ARGV[1] connection id, ARGV[2] room, ARGV[3] state
            // JSON, ARGV[4] expiry ms (0: none), ARGV[5] 1 to announce. Returns 0 when the
            // connection is not present.
            set_state: script(
                r"
                local b, cid, room = KEYS[1], ARGV[1], ARGV[2]
                local now = now_ms()
                if not is_present(b, cid, room, now) then return 0 end
                redis.call('HSET', b .. 'presence-states:' .. room, cid, ARGV[3])
                local entry = cid .. '\n' .. room
                local expire = tonumber(ARGV[4])
                if expire > 0 then
                  redis.call('ZADD', b .. 'state-expiry', now + expire, entry)
                else
                  redis.call('ZREM', b .. 'state-expiry', entry)
                end
                if ARGV[5] == '1' then announce(b, 'state', cid, room, ARGV[3], now) end
                return 1
                ",
            ),
            // KEYS[1] room bucket; ARGV[1] connection id, ARGV[2] room. Returns 0 when
            // the connection is not present; announces `state: null` when it had a state.
            clear_state: script(
                r"
                local b, cid, room = KEYS[1], ARGV[1], ARGV[2]
                if not is_present(b, cid, room, now_ms()) then return 0 end
                redis.call('ZREM', b .. 'state-expiry', cid .. '\n' .. room)
                if redis.call('HDEL', b .. 'presence-states:' .. room, cid) == 1 then
                  announce(b, 'state', cid, room, 'null')
                end
                return 1
                ",
            ),
            // KEYS[1] instances, KEYS[2] dead connections; ARGV[1] the registry's base,
            // ARGV[2] most connections to hand out. Claims lapsed instances (ZREM succeeds
            // for exactly one sweeper) and moves their connections to the dead ones, so
            // that an instance that comes back starts with an empty set. Hands out dead
            // connections to forget: {ms until the next deadline (0: work is left, -1:
            // none), {connection id, ...}}. They stay in the set until forgotten, so a
            // sweeper that stops half-way leaves them to the next.
            sweep_instances: script(
                r"
                local instances, dead, base = KEYS[1], KEYS[2], ARGV[1]
                local limit = tonumber(ARGV[2])
                local now = now_ms()
                for _, iid in ipairs(redis.call('ZRANGEBYSCORE', instances, '-inf', now, 'LIMIT', 0, limit)) do
                  if redis.call('ZREM', instances, iid) == 1 then
                    local set = base .. 'instance:' .. iid
                    if redis.call('EXISTS', set) == 1 then
                      redis.call('SUNIONSTORE', dead, dead, set)
                      redis.call('DEL', set)
                    end
                  end
                end
                local cids = redis.call('SRANDMEMBER', dead, limit)
                if #cids > 0 then return {0, cids} end
                return {next_due({instances}, now), cids}
                ",
            ),
            // KEYS[1] room bucket; ARGV[1] most entries of each kind per run. Claims
            // lapsed presence and states with ZREM, which succeeds for exactly one
            // sweeper, and announces what it removes. Returns ms until the next deadline
            // (0: work is left), or -1.
            sweep_rooms: script(
                r"
                local b, limit = KEYS[1], tonumber(ARGV[1])
                local now = now_ms()
                local presence = redis.call('ZRANGEBYSCORE', b .. 'presence-expiry', '-inf', now, 'LIMIT', 0, limit)
                for _, entry in ipairs(presence) do
                  if redis.call('ZREM', b .. 'presence-expiry', entry) == 1 then
                    local cid, room = split_entry(entry)
                    if cid then
                      redis.call('ZREM', b .. 'presence:' .. room, cid)
                      redis.call('HDEL', b .. 'presence-states:' .. room, cid)
                      redis.call('ZREM', b .. 'state-expiry', entry)
                      announce(b, 'leave', cid, room, nil)
                    end
                  end
                end
                local states = redis.call('ZRANGEBYSCORE', b .. 'state-expiry', '-inf', now, 'LIMIT', 0, limit)
                for _, entry in ipairs(states) do
                  if redis.call('ZREM', b .. 'state-expiry', entry) == 1 then
                    local cid, room = split_entry(entry)
                    if cid and redis.call('HDEL', b .. 'presence-states:' .. room, cid) == 1 then
                      announce(b, 'state', cid, room, 'null')
                    end
                  end
                end
                if #presence == limit or #states == limit then return 0 end
                return next_due({b .. 'presence-expiry', b .. 'state-expiry'}, now)
                ",
            ),
            // KEYS[1] history list, KEYS[2] the kept messages' total size, KEYS[3] the
            // list's length as the previous write left it (kept for plain channels only),
            // KEYS[4] the channel's position (not for plain channels); ARGV[1] message,
            // ARGV[2] how many to keep (0: none), ARGV[3] how many bytes to keep, ARGV[4]
            // the publish command, ARGV[5] pub/sub channel, ARGV[6] the channel's name,
            // ARGV[7] '1' for a plain channel, ARGV[8] the epoch to start if the channel
            // has none. Keeps the message, gives it the next offset and publishes it in
            // one step, so history, positions and live messages never disagree: the
            // envelope (tag 'h' in envelope.rs: channel, message, epoch, offset) is built
            // here, a plain channel's payload is the bare text. The oldest messages go
            // while more than the count or the bytes are kept; each write pops only what
            // it pushed out, so it costs O(1) amortised. Other processes may push to a
            // plain channel's list: when its length is not what the previous write left,
            // the size is counted again, in one pass. Returns {epoch, offset}, or
            // {'', 0} for a plain channel.
            write_channel: script(
                r"
                local list, bytes_key, length_key, position = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
                local plain = ARGV[7] == '1'
                local message, keep, keep_bytes = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
                local epoch, offset = '', 0
                if not plain then
                  redis.call('HSETNX', position, 'epoch', ARGV[8])
                  epoch = redis.call('HGET', position, 'epoch')
                  offset = redis.call('HINCRBY', position, 'offset', 1)
                  if keep == 0 then redis.call('HSET', position, 'gap', offset) end
                end
                if keep > 0 then
                  -- Absent: a history kept before sizes were counted, or a plain one
                  -- that only other processes wrote so far.
                  local recount = redis.call('EXISTS', bytes_key) == 0
                  if not recount and plain then
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
                  redis.call('LPUSH', list, message)
                  local total = redis.call('INCRBY', bytes_key, #message)
                  local length = redis.call('LLEN', list)
                  while length > 0 and (length > keep or total > keep_bytes) do
                    local oldest = redis.call('RPOP', list)
                    total = redis.call('DECRBY', bytes_key, #oldest)
                    length = length - 1
                  end
                  if length == 0 then
                    redis.call('DEL', bytes_key)
                    if plain then redis.call('DEL', length_key) end
                  elseif plain then
                    redis.call('SET', length_key, length)
                  end
                end
                if not plain then
                  -- A stream that keeps nothing lasts a day after its last write: its
                  -- position only ever says 'nothing missed', and channels written that
                  -- way (one per user, say) must not leave a key each forever.
                  if redis.call('EXISTS', list) == 1 then
                    redis.call('PERSIST', position)
                  else
                    redis.call('PEXPIRE', position, POSITION_TTL_MS)
                  end
                end
                if plain then
                  redis.call(ARGV[4], ARGV[5], message)
                else
                  local channel, at = ARGV[6], string.format('%.0f', offset)
                  redis.call(ARGV[4], ARGV[5], 'h' .. u32(#channel) .. channel
                    .. u32(#message) .. message .. u32(#epoch) .. epoch .. u32(#at) .. at)
                end
                return {epoch, offset}
                ",
            ),
            // KEYS[1] history list, KEYS[2] the channel's position; ARGV[1] most messages
            // to return, ARGV[2] the longest message to return (longer ones are skipped:
            // only other processes, writing a plain channel's list, can keep one),
            // ARGV[3] bytes after which to stop, ARGV[4] the offset the reader holds ('':
            // none), ARGV[5] '=' and its epoch ('': the current one), ARGV[6] the most messages
            // a recovery returns, ARGV[7] the epoch to start if the channel has none,
            // ARGV[8] '1' for a plain channel (no positions).
            // Returns {epoch, offset of the newest message, 1 when recovered, messages}.
            // Recovered: the messages are exactly those after ARGV[4], all kept (none
            // since the gap), within the bounds. Otherwise the newest messages, newest
            // first, up to and including the one that takes the total past ARGV[3]: the
            // caller sees that older ones were left out. Reads in chunks, so that a long
            // list written by others is never copied whole.
            read_history: Script::new(&format!(
                "local POSITION_TTL_MS = {POSITION_TTL_MS}\n{}",
                r"
                local list, position = KEYS[1], KEYS[2]
                local limit, longest, budget = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
                local epoch, offset, gap = '', 0, 0
                if ARGV[8] ~= '1' then
                  -- A reader of a channel never written makes its epoch (so that a
                  -- recovery from offset 0 knows the stream it started in), for a day:
                  -- reads of names nobody writes leave no key behind for good.
                  if redis.call('HSETNX', position, 'epoch', ARGV[7]) == 1 then
                    redis.call('PEXPIRE', position, POSITION_TTL_MS)
                  end
                  local stored = redis.call('HMGET', position, 'epoch', 'offset', 'gap')
                  epoch, offset, gap = stored[1], tonumber(stored[2] or '0'), tonumber(stored[3] or '0')
                  local since = tonumber(ARGV[4])
                  if since and (ARGV[5] == '' or ARGV[5] == '=' .. epoch) and since <= offset
                    and since >= gap and offset - since <= tonumber(ARGV[6])
                    and offset - since <= redis.call('LLEN', list) then
                    local missed, out, total, start = offset - since, {}, 0, 0
                    local complete = true
                    while complete and start < missed do
                      local last = math.min(start + 99, missed - 1)
                      for _, message in ipairs(redis.call('LRANGE', list, start, last)) do
                        total = total + #message
                        if #message > longest or total > budget then
                          complete = false
                          break
                        end
                        out[#out + 1] = message
                      end
                      start = last + 1
                    end
                    if complete then return {epoch, offset, 1, out} end
                  end
                end
                local out, total, start = {}, 0, 0
                -- A step of 0 would never advance: no limit, nothing read.
                if limit < 1 then return {epoch, offset, 0, out} end
                local step = math.min(limit, 100)
                while true do
                  local chunk = redis.call('LRANGE', list, start, start + step - 1)
                  for _, message in ipairs(chunk) do
                    if #message <= longest then
                      out[#out + 1] = message
                      total = total + #message
                      if #out >= limit or total > budget then return {epoch, offset, 0, out} end
                    end
                  end
                  if #chunk < step then return {epoch, offset, 0, out} end
                  start = start + step
                end
                "
            )),
            // KEYS[1] the record, KEYS[2] its bucket's id index; ARGV[1] record id, ARGV[2]
            // the write token the writer read ('' for no record), ARGV[3] the new value JSON
            // ('' deletes), ARGV[4] the new version, ARGV[5] a fresh token, then (publish
            // command, channel, envelope) triples to publish. Compare-and-set: returns 0,
            // changing nothing, when another write got in since the read.
            record_cas: script(
                r"
                local key, id = KEYS[1], ARGV[1]
                local current = redis.call('HGET', key, 'token') or ''
                if current ~= ARGV[2] then return 0 end
                if ARGV[3] == '' then
                  redis.call('DEL', key)
                  redis.call('ZREM', KEYS[2], id)
                else
                  redis.call('HSET', key, 'value', ARGV[3], 'version', ARGV[4], 'token', ARGV[5])
                  redis.call('ZADD', KEYS[2], 0, id)
                end
                for i = 6, #ARGV, 3 do
                  redis.call(ARGV[i], ARGV[i + 1], ARGV[i + 2])
                end
                return 1
                ",
            ),
            // KEYS[1] the metadata (JSON text), KEYS[2] a hash that must hold field
            // ARGV[3] ('' for none; KEYS[2] is then KEYS[1] again); ARGV[1] '1' when the
            // writer read metadata, else '0'; ARGV[2] the metadata it read; ARGV[4] the new
            // metadata; ARGV[5] a set to add ARGV[6] to ('' for none). Compare-and-set on
            // the value itself: metadata written back unchanged in between merges to the
            // same result. Returns -1, changing nothing, when the required field is
            // missing, 0 when another write got in since the read.
            metadata_cas: script(
                r"
                if ARGV[3] ~= '' and redis.call('HEXISTS', KEYS[2], ARGV[3]) == 0 then
                  return -1
                end
                local current = redis.call('GET', KEYS[1])
                if ARGV[1] == '1' then
                  if current ~= ARGV[2] then return 0 end
                elseif current then
                  return 0
                end
                redis.call('SET', KEYS[1], ARGV[4])
                if ARGV[5] ~= '' then redis.call('SADD', ARGV[5], ARGV[6]) end
                return 1
                ",
            ),
        }
    }
}
