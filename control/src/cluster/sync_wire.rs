//! The datagrams of the flow-state sync between cluster nodes: a header and a batch of flow
//! records, big-endian, optionally authenticated with HMAC-SHA256 under a key every node
//! shares (truncated to 16 bytes). Anyone who can reach the sync port can send one, so
//! decoding checks every length and value and refuses the whole datagram on the first
//! error (counted by the caller); it never panics.
//!
//! ```text
//! header  "XLBS" version=1 flags(bit 0: MAC) count:u16 seq:u64 sent_at_ns:u64       24 bytes
//! record  kind proto nat reason name_len name[name_len]
//!         orig_src[16] orig_dst[16] xlat[16] orig_sport orig_dport xlat_port
//!         tcp[20] (state bits wscale[2] next_seq[2]:u32 max_win[2]:u32)
//!         last_seen_ns:u64 (the sender's wall clock, ns since the Unix epoch)
//! trailer MAC[16] when flags bit 0
//! ```

use std::sync::Arc;

use ring::hmac;
use xlb_engine::{
    flow::Nat,
    ruleset::RuleKind,
    tcp::{TcpTrack, TRACK_RECORD_BYTES},
    Addr, FlowState, SyncReason,
};

pub const MAGIC: &[u8; 4] = b"XLBS";
pub const VERSION: u8 = 1;
pub const HEADER_BYTES: usize = 24;
pub const MAC_BYTES: usize = 16;
/// The largest datagram a sender builds (fits a 1500-byte MTU with IPv6 and UDP headers).
pub const MAX_DATAGRAM: usize = 1400;
/// The longest rule name a record carries (longer names are not synced).
pub const MAX_NAME: usize = 64;
const FLAG_MAC: u8 = 1;
const FIXED_RECORD_BYTES: usize = 5 + 3 * 16 + 3 * 2 + TRACK_RECORD_BYTES + 8;

/// One flow's state as synced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub reason: SyncReason,
    /// When the flow's last packet passed the sender, on its wall clock (ns since the epoch).
    pub last_seen_ns: u64,
    pub state: FlowState,
}

/// A decoded datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub seq: u64,
    pub sent_at_ns: u64,
    pub records: Vec<Record>,
}

/// Why a datagram was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireError {
    Short,
    Magic,
    Version,
    /// A MAC was expected and is missing or wrong, or one came without a key here.
    Unauthenticated,
    Record,
    Trailing,
}

/// The shared key of `--cluster-sync-key`.
#[derive(Clone)]
pub struct SyncKey(hmac::Key);

impl std::fmt::Debug for SyncKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SyncKey(..)")
    }
}

impl SyncKey {
    pub fn new(secret: &[u8]) -> SyncKey {
        SyncKey(hmac::Key::new(hmac::HMAC_SHA256, secret))
    }

    fn tag(&self, data: &[u8]) -> [u8; MAC_BYTES] {
        let t = hmac::sign(&self.0, data);
        let mut out = [0u8; MAC_BYTES];
        out.copy_from_slice(&t.as_ref()[..MAC_BYTES]);
        out
    }
}

/// Builds datagrams: records are appended until the next would not fit.
#[derive(Debug)]
pub struct Encoder {
    buf: Vec<u8>,
    count: u16,
    key: Option<SyncKey>,
}

impl Encoder {
    pub fn new(key: Option<SyncKey>) -> Encoder {
        let mut e = Encoder {
            buf: Vec::with_capacity(MAX_DATAGRAM),
            count: 0,
            key,
        };
        e.reset();
        e
    }

    fn reset(&mut self) {
        self.buf.clear();
        self.buf.extend_from_slice(MAGIC);
        self.buf.push(VERSION);
        self.buf.push(if self.key.is_some() { FLAG_MAC } else { 0 });
        self.buf.extend_from_slice(&[0u8; HEADER_BYTES - 6]);
        self.count = 0;
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Appends `r`; `false` when the datagram is full (finish it and push again) or the
    /// record cannot be synced at all ([`record_bytes`] is `None`).
    pub fn push(&mut self, r: &Record) -> bool {
        let Some(n) = record_bytes(&r.state) else {
            return false;
        };
        let room = MAX_DATAGRAM - if self.key.is_some() { MAC_BYTES } else { 0 };
        if self.buf.len() + n > room || self.count == u16::MAX {
            return false;
        }
        let s = &r.state;
        let b = &mut self.buf;
        b.push(match s.rule_kind {
            RuleKind::LoadBalancing => 0,
            RuleKind::InboundNat => 1,
            RuleKind::Outbound => 2,
        });
        b.push(s.proto);
        b.push(match s.nat {
            Nat::Dnat => 0,
            Nat::Snat => 1,
            Nat::None => 2,
        });
        b.push(match r.reason {
            SyncReason::Noted => 0,
            SyncReason::Refresh => 1,
        });
        b.push(s.rule_name.len() as u8);
        b.extend_from_slice(s.rule_name.as_bytes());
        for a in [s.orig_src, s.orig_dst, s.xlat] {
            b.extend_from_slice(&a.0.to_be_bytes());
        }
        for p in [s.orig_sport, s.orig_dport, s.xlat_port] {
            b.extend_from_slice(&p.to_be_bytes());
        }
        let t = s.tcp.to_record();
        b.extend_from_slice(&t[..4]);
        for w in t[4..].chunks_exact(4) {
            let v = u32::from_ne_bytes([w[0], w[1], w[2], w[3]]);
            b.extend_from_slice(&v.to_be_bytes());
        }
        b.extend_from_slice(&r.last_seen_ns.to_be_bytes());
        self.count += 1;
        true
    }

    /// The finished datagram (sequence number and send time filled in, MAC appended); the
    /// encoder starts the next one at the following push.
    pub fn finish(&mut self, seq: u64, sent_at_ns: u64) -> Vec<u8> {
        self.buf[6..8].copy_from_slice(&self.count.to_be_bytes());
        self.buf[8..16].copy_from_slice(&seq.to_be_bytes());
        self.buf[16..24].copy_from_slice(&sent_at_ns.to_be_bytes());
        if let Some(k) = &self.key {
            let tag = k.tag(&self.buf);
            self.buf.extend_from_slice(&tag);
        }
        let out = self.buf.clone();
        self.reset();
        out
    }
}

/// Bytes of `s`'s record; `None` when it cannot be synced (its rule name is too long).
pub fn record_bytes(s: &FlowState) -> Option<usize> {
    let name = s.rule_name.len();
    (name <= MAX_NAME).then_some(FIXED_RECORD_BYTES + name)
}

/// Decodes a datagram; with `key`, only an authenticated one.
pub fn decode(d: &[u8], key: Option<&SyncKey>) -> Result<Batch, WireError> {
    if d.len() < HEADER_BYTES {
        return Err(WireError::Short);
    }
    if &d[..4] != MAGIC {
        return Err(WireError::Magic);
    }
    if d[4] != VERSION {
        return Err(WireError::Version);
    }
    let has_mac = d[5] & FLAG_MAC != 0;
    if d[5] & !FLAG_MAC != 0 {
        return Err(WireError::Record);
    }
    let body = match (key, has_mac) {
        (Some(k), true) if d.len() >= HEADER_BYTES + MAC_BYTES => {
            let (body, tag) = d.split_at(d.len() - MAC_BYTES);
            if !constant_time_eq(&k.tag(body), tag) {
                return Err(WireError::Unauthenticated);
            }
            body
        }
        (None, false) => d,
        _ => return Err(WireError::Unauthenticated),
    };
    let count = u16::from_be_bytes([body[6], body[7]]);
    let seq = be64(&body[8..16]);
    let sent_at_ns = be64(&body[16..24]);
    let mut r = Reader {
        b: &body[HEADER_BYTES..],
    };
    let mut records = Vec::with_capacity(usize::from(count).min(MAX_DATAGRAM / FIXED_RECORD_BYTES));
    for _ in 0..count {
        records.push(r.record().ok_or(WireError::Record)?);
    }
    if !r.b.is_empty() {
        return Err(WireError::Trailing);
    }
    Ok(Batch {
        seq,
        sent_at_ns,
        records,
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.b.len() < n {
            return None;
        }
        let (head, tail) = self.b.split_at(n);
        self.b = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u16(&mut self) -> Option<u16> {
        let b = self.take(2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }

    fn addr(&mut self) -> Option<Addr> {
        let mut a = [0u8; 16];
        a.copy_from_slice(self.take(16)?);
        Some(Addr(u128::from_be_bytes(a)))
    }

    fn record(&mut self) -> Option<Record> {
        let rule_kind = match self.u8()? {
            0 => RuleKind::LoadBalancing,
            1 => RuleKind::InboundNat,
            2 => RuleKind::Outbound,
            _ => return None,
        };
        let proto = self.u8()?;
        let nat = match self.u8()? {
            0 => Nat::Dnat,
            1 => Nat::Snat,
            2 => Nat::None,
            _ => return None,
        };
        let reason = match self.u8()? {
            0 => SyncReason::Noted,
            1 => SyncReason::Refresh,
            _ => return None,
        };
        let name_len = usize::from(self.u8()?);
        if name_len == 0 || name_len > MAX_NAME {
            return None;
        }
        let name = std::str::from_utf8(self.take(name_len)?).ok()?;
        let (orig_src, orig_dst, xlat) = (self.addr()?, self.addr()?, self.addr()?);
        let (orig_sport, orig_dport, xlat_port) = (self.u16()?, self.u16()?, self.u16()?);
        let t = self.take(TRACK_RECORD_BYTES)?;
        let mut native = [0u8; TRACK_RECORD_BYTES];
        native[..4].copy_from_slice(&t[..4]);
        for (i, w) in t[4..].chunks_exact(4).enumerate() {
            let v = u32::from_be_bytes([w[0], w[1], w[2], w[3]]);
            native[4 + 4 * i..8 + 4 * i].copy_from_slice(&v.to_ne_bytes());
        }
        let tcp = TcpTrack::from_record(&native)?;
        let last_seen_ns = be64(self.take(8)?);
        Some(Record {
            reason,
            last_seen_ns,
            state: FlowState {
                rule_kind,
                rule_name: Arc::from(name),
                proto,
                nat,
                orig_src,
                orig_dst,
                orig_sport,
                orig_dport,
                xlat,
                xlat_port,
                tcp,
                // Filled in by the receiver from `last_seen_ns` and its own clock.
                idle: 0,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn record(name: &str, port: u16, nat: Nat) -> Record {
        Record {
            reason: SyncReason::Noted,
            last_seen_ns: 1_700_000_000_123_456_789,
            state: FlowState {
                rule_kind: if nat == Nat::Snat {
                    RuleKind::Outbound
                } else {
                    RuleKind::LoadBalancing
                },
                rule_name: Arc::from(name),
                proto: 6,
                nat,
                orig_src: Addr::from(Ipv4Addr::new(198, 18, 0, 10)),
                orig_dst: Addr::from(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100)),
                orig_sport: port,
                orig_dport: 80,
                xlat: Addr::from(Ipv4Addr::new(198, 18, 1, 11)),
                xlat_port: 8080,
                tcp: TcpTrack::NONE,
                idle: 0,
            },
        }
    }

    fn full_datagram(key: Option<SyncKey>) -> (Vec<u8>, Vec<Record>) {
        let mut e = Encoder::new(key);
        let mut pushed = Vec::new();
        for i in 0.. {
            let r = record(
                "http",
                40_000 + i,
                if i % 2 == 0 { Nat::Dnat } else { Nat::Snat },
            );
            if !e.push(&r) {
                break;
            }
            pushed.push(r);
        }
        (e.finish(7, 99), pushed)
    }

    #[test]
    fn a_batch_round_trips_and_fills_one_datagram() {
        let (d, pushed) = full_datagram(None);
        assert!(d.len() <= MAX_DATAGRAM);
        assert!(pushed.len() >= 10, "{} records", pushed.len());
        let b = decode(&d, None).unwrap();
        assert_eq!((b.seq, b.sent_at_ns), (7, 99));
        assert_eq!(b.records, pushed);
        // The encoder starts afresh.
        let mut e = Encoder::new(None);
        assert!(e.is_empty());
        assert!(e.push(&record("http", 1, Nat::Dnat)));
        assert_eq!(e.len(), 1);
        assert!(!e.push(&record(&"x".repeat(MAX_NAME + 1), 1, Nat::Dnat)));
    }

    #[test]
    fn tcp_tracking_travels_whole() {
        let mut raw = [0u8; TRACK_RECORD_BYTES];
        raw[0] = 2; // established
        raw[1] = 3;
        raw[2..4].copy_from_slice(&[7, 9]);
        for (i, v) in [0xdead_beef_u32, 1, 0x8000_0000, 65_535].iter().enumerate() {
            raw[4 + 4 * i..8 + 4 * i].copy_from_slice(&v.to_ne_bytes());
        }
        let mut r = record("web", 1, Nat::Dnat);
        r.state.tcp = TcpTrack::from_record(&raw).unwrap();
        let mut e = Encoder::new(None);
        assert!(e.push(&r));
        let got = decode(&e.finish(1, 2), None).unwrap();
        assert_eq!(got.records[0].state.tcp, r.state.tcp);
        assert_eq!(got.records[0].state.tcp.to_record(), raw);
    }

    #[test]
    fn with_a_key_only_authenticated_datagrams_pass() {
        let key = SyncKey::new(b"a shared secret");
        let (d, pushed) = full_datagram(Some(key.clone()));
        assert!(d.len() <= MAX_DATAGRAM);
        assert_eq!(decode(&d, Some(&key)).unwrap().records, pushed);
        assert_eq!(
            decode(&d, Some(&SyncKey::new(b"another"))),
            Err(WireError::Unauthenticated)
        );
        assert_eq!(decode(&d, None), Err(WireError::Unauthenticated));
        let (plain, _) = full_datagram(None);
        assert_eq!(decode(&plain, Some(&key)), Err(WireError::Unauthenticated));
        let mut flipped = d.clone();
        flipped[HEADER_BYTES + 3] ^= 1;
        assert_eq!(
            decode(&flipped, Some(&key)),
            Err(WireError::Unauthenticated)
        );
    }

    #[test]
    fn malformed_datagrams_are_refused() {
        let (d, _) = full_datagram(None);
        assert_eq!(decode(&d[..10], None), Err(WireError::Short));
        let mut m = d.clone();
        m[0] = b'Y';
        assert_eq!(decode(&m, None), Err(WireError::Magic));
        let mut m = d.clone();
        m[4] = 2;
        assert_eq!(decode(&m, None), Err(WireError::Version));
        // Cut inside the last record, one byte too many, a count too high.
        assert_eq!(decode(&d[..d.len() - 1], None), Err(WireError::Record));
        let mut m = d.clone();
        m.push(0);
        assert_eq!(decode(&m, None), Err(WireError::Trailing));
        let mut m = d.clone();
        m[6..8].copy_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(decode(&m, None), Err(WireError::Record));
        // Bad enumerations and a bad TCP state in the first record.
        for (at, v) in [(0, 3u8), (2, 3), (3, 2), (4, 0), (4, 200)] {
            let mut m = d.clone();
            m[HEADER_BYTES + at] = v;
            assert!(decode(&m, None).is_err(), "byte {at} = {v}");
        }
        let mut m = d.clone();
        m[HEADER_BYTES + 5 + 4 + 48 + 6] = 9; // the TCP state byte
        assert_eq!(decode(&m, None), Err(WireError::Record));
    }

    #[test]
    fn random_and_mutated_bytes_never_panic() {
        // A small deterministic generator: every run tries the same inputs.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let (d, _) = full_datagram(None);
        let mut accepted = 0;
        for i in 0..20_000 {
            let mut m = if i % 2 == 0 {
                d.clone()
            } else {
                let n = (next() % 1500) as usize;
                let mut v = MAGIC.to_vec();
                v.push(VERSION);
                v.extend((0..n).map(|_| next() as u8));
                v
            };
            for _ in 0..(next() % 4) {
                if m.is_empty() {
                    break;
                }
                let at = (next() as usize) % m.len();
                m[at] = next() as u8;
            }
            if next() % 3 == 0 {
                let cut = (next() as usize) % (m.len() + 1);
                m.truncate(cut);
            }
            if decode(&m, None).is_ok() {
                accepted += 1;
            }
        }
        // Mutations that hit addresses or ports still decode; the point is no panic.
        assert!(accepted < 20_000);
    }
}
