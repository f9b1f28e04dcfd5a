//! A Cluster's topology as the backend needs it: which master serves each slot, read with
//! `CLUSTER SLOTS`. The subscriber compares it over time to notice failovers; reads of
//! many keys group their commands by master with it, one pipeline per master.

use redis::Value;

use super::keys::hash_tag;

/// A slot range and the master serving it: first and last slot, host, port, node id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct SlotOwner {
    pub(super) first: u16,
    pub(super) last: u16,
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) node_id: String,
}

/// The masters and their slots, sorted by slot, from a `CLUSTER SLOTS` reply.
pub(super) fn from_cluster_slots(reply: &[Value]) -> Vec<SlotOwner> {
    let mut owners: Vec<SlotOwner> = reply.iter().filter_map(slot_owner).collect();
    owners.sort_unstable();
    owners
}

/// One entry of `CLUSTER SLOTS`: `[first, last, [host, port, id, ...], replicas...]`.
fn slot_owner(entry: &Value) -> Option<SlotOwner> {
    let Value::Array(entry) = entry else {
        return None;
    };
    let (Some(Value::Int(first)), Some(Value::Int(last)), Some(Value::Array(master))) =
        (entry.first(), entry.get(1), entry.get(2))
    else {
        return None;
    };
    let text = |value: Option<&Value>| match value {
        Some(Value::BulkString(bytes)) => String::from_utf8(bytes.clone()).ok(),
        Some(Value::SimpleString(text)) => Some(text.clone()),
        _ => None,
    };
    let Some(Value::Int(port)) = master.get(1) else {
        return None;
    };
    Some(SlotOwner {
        first: u16::try_from(*first).ok()?,
        last: u16::try_from(*last).ok()?,
        host: text(master.first())?,
        port: u16::try_from(*port).ok()?,
        node_id: text(master.get(2)).unwrap_or_default(),
    })
}

/// How many slots a Cluster has.
const SLOTS: u32 = 16384;

/// Whether `owners` (sorted) gives every slot of the Cluster a master.
pub(super) fn covers_every_slot(owners: &[SlotOwner]) -> bool {
    let mut next: u32 = 0;
    for owner in owners {
        if u32::from(owner.first) > next {
            return false;
        }
        next = next.max(u32::from(owner.last) + 1);
    }
    next == SLOTS
}

/// The master serving `key`'s slot, if `owners` (sorted) covers it.
pub(super) fn owner_of<'a>(owners: &'a [SlotOwner], key: &[u8]) -> Option<&'a SlotOwner> {
    let slot = slot_of(key);
    let index = owners.partition_point(|owner| owner.last < slot);
    owners.get(index).filter(|owner| owner.first <= slot)
}

/// The Cluster slot of a key: CRC16 (XMODEM) of its hash tag, modulo 16384.
pub(super) fn slot_of(key: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in hash_tag(key) {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc & 0x3fff
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_redis_slots() {
        // Values from `CLUSTER KEYSLOT`.
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
        assert_eq!(slot_of(b"123456789"), 0x31c3 & 0x3fff);
    }

    #[test]
    fn owners_are_found_by_slot() {
        let owner = |first, last, port| SlotOwner {
            first,
            last,
            host: "h".into(),
            port,
            node_id: String::new(),
        };
        let owners = vec![
            owner(0, 5460, 1),
            owner(5461, 10922, 2),
            owner(10923, 16383, 3),
        ];
        assert_eq!(owner_of(&owners, b"foo").map(|o| o.port), Some(3));
        assert_eq!(owner_of(&owners[..1], b"foo").map(|o| o.port), None);
        assert!(covers_every_slot(&owners));
        assert!(!covers_every_slot(&owners[..2]));
        assert!(!covers_every_slot(&[owners[0].clone(), owners[2].clone()]));
        assert!(!covers_every_slot(&[]));
    }
}
