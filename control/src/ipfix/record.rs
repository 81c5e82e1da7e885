//! IPFIX messages of NAT events: the records (RFC 8158 information elements), their templates,
//! the encoder that packs them into messages under [`MAX_MESSAGE`] bytes, and a decoder (for
//! tests and for checking what a collector received).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use xlb_engine::natlog::{NatEvent, NatEventKind};

/// IPFIX version number.
pub const VERSION: u16 = 10;
pub const TEMPLATE_SET: u16 = 2;
pub const TEMPLATE_V4: u16 = 256;
pub const TEMPLATE_V6: u16 = 257;
/// Largest message sent.
pub const MAX_MESSAGE: usize = 1400;

/// natEvent values (IANA "natEvent Values").
pub const NAT_SESSION_CREATE: u8 = 4;
pub const NAT_SESSION_DELETE: u8 = 5;

// Information elements.
const OBSERVATION_TIME_MS: u16 = 323;
const NAT_EVENT: u16 = 230;
const PROTOCOL: u16 = 4;
const SRC_V4: u16 = 8;
const SRC_V6: u16 = 27;
const SRC_PORT: u16 = 7;
const POST_SRC_V4: u16 = 225;
const POST_SRC_V6: u16 = 281;
const POST_SRC_PORT: u16 = 227;
const DST_V4: u16 = 12;
const DST_V6: u16 = 28;
const DST_PORT: u16 = 11;
const POST_DST_V4: u16 = 226;
const POST_DST_V6: u16 = 282;
const POST_DST_PORT: u16 = 228;

/// The fields of a template, in record order: (information element, length).
fn fields(v6: bool) -> [(u16, u16); 11] {
    let (a, src, post_src, dst, post_dst) = if v6 {
        (16, SRC_V6, POST_SRC_V6, DST_V6, POST_DST_V6)
    } else {
        (4, SRC_V4, POST_SRC_V4, DST_V4, POST_DST_V4)
    };
    [
        (OBSERVATION_TIME_MS, 8),
        (NAT_EVENT, 1),
        (PROTOCOL, 1),
        (src, a),
        (SRC_PORT, 2),
        (post_src, a),
        (POST_SRC_PORT, 2),
        (dst, a),
        (DST_PORT, 2),
        (post_dst, a),
        (POST_DST_PORT, 2),
    ]
}

fn record_len(v6: bool) -> usize {
    fields(v6).iter().map(|(_, l)| usize::from(*l)).sum()
}

/// One NAT event as exported (and as [`decode`] reads it back).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatRecord {
    pub unix_ms: u64,
    /// [`NAT_SESSION_CREATE`] or [`NAT_SESSION_DELETE`].
    pub event: u8,
    pub proto: u8,
    pub src: SocketAddr,
    pub post_src: SocketAddr,
    pub dst: SocketAddr,
    pub post_dst: SocketAddr,
}

impl NatRecord {
    /// `e` with its time on the wall clock: `mono_now` is the workers' clock when `wall_now`
    /// was read.
    pub fn from_event(e: &NatEvent, mono_now: u64, wall_now: SystemTime) -> NatRecord {
        let age = Duration::from_nanos(mono_now.saturating_sub(e.at));
        let at = wall_now.checked_sub(age).unwrap_or(UNIX_EPOCH);
        let ep = |(a, p): (xlb_engine::Addr, u16)| SocketAddr::new(a.to_ip(), p);
        NatRecord {
            unix_ms: at
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            event: match e.kind {
                NatEventKind::Create => NAT_SESSION_CREATE,
                NatEventKind::Delete => NAT_SESSION_DELETE,
            },
            proto: e.proto,
            src: ep(e.src),
            post_src: ep(e.post_src),
            dst: ep(e.dst),
            post_dst: ep(e.post_dst),
        }
    }

    fn is_v6(&self) -> bool {
        self.src.is_ipv6()
    }

    fn encode(&self, out: &mut Vec<u8>) {
        let addr = |out: &mut Vec<u8>, a: IpAddr| match a {
            IpAddr::V4(v4) => out.extend_from_slice(&v4.octets()),
            IpAddr::V6(v6) => out.extend_from_slice(&v6.octets()),
        };
        out.extend_from_slice(&self.unix_ms.to_be_bytes());
        out.push(self.event);
        out.push(self.proto);
        for ep in [self.src, self.post_src, self.dst, self.post_dst] {
            addr(out, ep.ip());
            out.extend_from_slice(&ep.port().to_be_bytes());
        }
    }
}

/// Builds IPFIX messages for one observation domain.
#[derive(Debug)]
pub struct Encoder {
    domain: u32,
    /// Data records sent before the current message (the header's sequence number).
    sequence: u32,
    msg: Vec<u8>,
    /// Where the open data set starts in `msg`, and its template.
    open_set: Option<(usize, u16)>,
    records: usize,
}

impl Encoder {
    pub fn new(domain: u32) -> Encoder {
        Encoder {
            domain,
            sequence: 0,
            msg: Vec::with_capacity(MAX_MESSAGE),
            open_set: None,
            records: 0,
        }
    }

    /// Records in the message being built.
    pub fn pending(&self) -> usize {
        self.records
    }

    fn start(&mut self) {
        if self.msg.is_empty() {
            self.msg.extend_from_slice(&VERSION.to_be_bytes());
            self.msg.extend_from_slice(&[0, 0]); // length, at finish
            self.msg.extend_from_slice(&[0; 4]); // export time, at finish
            self.msg.extend_from_slice(&self.sequence.to_be_bytes());
            self.msg.extend_from_slice(&self.domain.to_be_bytes());
        }
    }

    fn close_set(&mut self) {
        if let Some((at, _)) = self.open_set.take() {
            let len = (self.msg.len() - at) as u16;
            self.msg[at + 2..at + 4].copy_from_slice(&len.to_be_bytes());
        }
    }

    /// Adds the template set (both templates) to the message being built.
    pub fn add_templates(&mut self) {
        self.start();
        self.close_set();
        let at = self.msg.len();
        self.msg.extend_from_slice(&TEMPLATE_SET.to_be_bytes());
        self.msg.extend_from_slice(&[0, 0]);
        for (id, v6) in [(TEMPLATE_V4, false), (TEMPLATE_V6, true)] {
            let f = fields(v6);
            self.msg.extend_from_slice(&id.to_be_bytes());
            self.msg.extend_from_slice(&(f.len() as u16).to_be_bytes());
            for (ie, len) in f {
                self.msg.extend_from_slice(&ie.to_be_bytes());
                self.msg.extend_from_slice(&len.to_be_bytes());
            }
        }
        let len = (self.msg.len() - at) as u16;
        self.msg[at + 2..at + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// Whether `r` still fits in the message being built.
    pub fn fits(&self, r: &NatRecord) -> bool {
        let template = if r.is_v6() { TEMPLATE_V6 } else { TEMPLATE_V4 };
        let set_header = match self.open_set {
            Some((_, t)) if t == template => 0,
            _ => 4,
        };
        let header = if self.msg.is_empty() { 16 } else { 0 };
        self.msg.len() + header + set_header + record_len(r.is_v6()) <= MAX_MESSAGE
    }

    /// Adds a data record (check [`fits`](Self::fits) first).
    pub fn add(&mut self, r: &NatRecord) {
        self.start();
        let template = if r.is_v6() { TEMPLATE_V6 } else { TEMPLATE_V4 };
        if !matches!(self.open_set, Some((_, t)) if t == template) {
            self.close_set();
            self.open_set = Some((self.msg.len(), template));
            self.msg.extend_from_slice(&template.to_be_bytes());
            self.msg.extend_from_slice(&[0, 0]);
        }
        r.encode(&mut self.msg);
        self.records += 1;
    }

    /// The finished message (empty when nothing was added) and how many data records it
    /// carries; the encoder starts the next one.
    pub fn finish(&mut self, export_time: SystemTime) -> (Vec<u8>, usize) {
        if self.msg.is_empty() {
            return (Vec::new(), 0);
        }
        self.close_set();
        let len = self.msg.len() as u16;
        self.msg[2..4].copy_from_slice(&len.to_be_bytes());
        let secs = export_time
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as u32);
        self.msg[4..8].copy_from_slice(&secs.to_be_bytes());
        let records = std::mem::take(&mut self.records);
        self.sequence = self.sequence.wrapping_add(records as u32);
        let mut out = Vec::with_capacity(MAX_MESSAGE);
        std::mem::swap(&mut out, &mut self.msg);
        (out, records)
    }
}

/// What [`decode`] found in one message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decoded {
    pub sequence: u32,
    pub domain: u32,
    pub export_secs: u32,
    /// Template ids defined in the message.
    pub templates: Vec<u16>,
    pub records: Vec<NatRecord>,
}

/// Reads back a message of this exporter (our own check of what collectors get): header,
/// template sets (their field lists must be this exporter's), data sets of both templates.
pub fn decode(msg: &[u8]) -> Result<Decoded, String> {
    let be16 = |b: &[u8], i: usize| -> Result<u16, String> {
        b.get(i..i + 2)
            .map(|s| u16::from_be_bytes([s[0], s[1]]))
            .ok_or_else(|| format!("truncated at {i}"))
    };
    let be32 = |b: &[u8], i: usize| -> Result<u32, String> {
        b.get(i..i + 4)
            .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
            .ok_or_else(|| format!("truncated at {i}"))
    };
    if be16(msg, 0)? != VERSION {
        return Err("not IPFIX (version 10)".into());
    }
    let len = usize::from(be16(msg, 2)?);
    if len != msg.len() {
        return Err(format!("length {len} but {} bytes", msg.len()));
    }
    let mut d = Decoded {
        export_secs: be32(msg, 4)?,
        sequence: be32(msg, 8)?,
        domain: be32(msg, 12)?,
        ..Decoded::default()
    };
    let mut at = 16;
    while at < len {
        let (id, set_len) = (be16(msg, at)?, usize::from(be16(msg, at + 2)?));
        if set_len < 4 || at + set_len > len {
            return Err(format!("bad set length {set_len} at {at}"));
        }
        let body = &msg[at + 4..at + set_len];
        match id {
            TEMPLATE_SET => {
                let mut i = 0;
                while i + 4 <= body.len() {
                    let (tid, n) = (be16(body, i)?, usize::from(be16(body, i + 2)?));
                    let mut got = Vec::new();
                    for k in 0..n {
                        got.push((be16(body, i + 4 + 4 * k)?, be16(body, i + 6 + 4 * k)?));
                    }
                    if got[..] != fields(tid == TEMPLATE_V6)[..] {
                        return Err(format!("template {tid}: unexpected fields {got:?}"));
                    }
                    d.templates.push(tid);
                    i += 4 + 4 * n;
                }
            }
            TEMPLATE_V4 | TEMPLATE_V6 => {
                let v6 = id == TEMPLATE_V6;
                let n = record_len(v6);
                if body.len() % n != 0 {
                    return Err(format!("data set of {} bytes, records of {n}", body.len()));
                }
                for rec in body.chunks(n) {
                    d.records.push(decode_record(rec, v6));
                }
            }
            other => return Err(format!("unknown set {other}")),
        }
        at += set_len;
    }
    Ok(d)
}

fn decode_record(b: &[u8], v6: bool) -> NatRecord {
    let a = if v6 { 16 } else { 4 };
    let mut i = 10;
    let mut ep = || {
        let ip = if v6 {
            let mut o = [0u8; 16];
            o.copy_from_slice(&b[i..i + 16]);
            IpAddr::V6(Ipv6Addr::from(o))
        } else {
            IpAddr::V4(Ipv4Addr::new(b[i], b[i + 1], b[i + 2], b[i + 3]))
        };
        let port = u16::from_be_bytes([b[i + a], b[i + a + 1]]);
        i += a + 2;
        SocketAddr::new(ip, port)
    };
    let (src, post_src, dst, post_dst) = (ep(), ep(), ep(), ep());
    let mut ms = [0u8; 8];
    ms.copy_from_slice(&b[..8]);
    NatRecord {
        unix_ms: u64::from_be_bytes(ms),
        event: b[8],
        proto: b[9],
        src,
        post_src,
        dst,
        post_dst,
    }
}
