//! NAT event logging over IPFIX (RFC 7011 messages, RFC 8158 NAT information elements).
//!
//! Whoever runs SNAT must be able to say which member held which public address and port at a
//! given time. With `--ipfix-collector`, every worker's engine notes each SNAT port allocation
//! and release (and, with `--ipfix-lb-flows`, each load-balancing flow created and removed) in
//! a bounded queue (`xlb_engine::natlog`); the worker moves them, at its next loop iteration,
//! into one bounded channel to this module's thread, which encodes them and sends them over
//! UDP. Nothing of this runs on a worker's packet path; a full queue or channel drops records
//! and counts them lost.
//!
//! Records: one template per address family, sent at start and every
//! [`TEMPLATE_EVERY`] (a UDP collector that starts later learns them then), with
//! `observationTimeMilliseconds` (323), `natEvent` (230: 4 = session create, 5 = session
//! delete; IANA defines no NAT66 values, so IPv6 sessions use the same), `protocolIdentifier`
//! (4), the source address and port as the member (or client) sent them (8/27, 7), after
//! translation (225/281, 227), the destination (12/28, 11) and where it really goes
//! (226/282, 228). For an SNAT flow the source is translated and the destination kept; for a
//! load-balancing flow the other way round.
//!
//! Messages are at most [`MAX_MESSAGE`] bytes (no IP fragments on a 1500-byte path), sent
//! when full or [`FLUSH_EVERY`] after their first record, and never faster than the
//! configured records per second (a token bucket): a backlog waits in the channel, and what
//! the channel cannot hold is lost and counted.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    sync::{Arc, PoisonError},
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crossbeam::channel::{Receiver, Sender};
use xlb_engine::natlog::{NatEvent, NatEventKind};

use crate::plane::Shared;

/// IPFIX version number.
pub const VERSION: u16 = 10;
pub const TEMPLATE_SET: u16 = 2;
pub const TEMPLATE_V4: u16 = 256;
pub const TEMPLATE_V6: u16 = 257;
/// Largest message sent.
pub const MAX_MESSAGE: usize = 1400;
/// A message goes out at most this long after its first record.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Templates are sent again this often.
pub const TEMPLATE_EVERY: Duration = Duration::from_secs(10);
/// Records between the workers and the exporter.
pub const CHANNEL_CAPACITY: usize = 65_536;

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

/// How the exporter runs.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    pub collector: SocketAddr,
    /// Most records sent per second.
    pub max_rate: u32,
    pub domain: u32,
}

/// Bounded token bucket: `rate` tokens a second, at most a tenth of a second's worth saved
/// (at least one message's worth).
#[derive(Debug)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u32, now: Instant) -> Bucket {
        let rate = f64::from(rate.max(1));
        let burst = (rate / 10.0).max(40.0);
        Bucket {
            rate,
            burst,
            tokens: burst,
            at: now,
        }
    }
    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.at = now;
    }
    /// How long until one token is there.
    fn wait(&self) -> Duration {
        if self.tokens >= 1.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - self.tokens) / self.rate)
        }
    }
}

/// The exporter thread and its input.
#[derive(Debug)]
pub struct Exporter {
    tx: Sender<NatEvent>,
    stop: Sender<()>,
    join: JoinHandle<()>,
}

impl Exporter {
    /// Binds a UDP socket toward the collector and starts the thread. The workers' clock is
    /// `clock` (their `now`), to put wall-clock times on their events.
    pub fn spawn(
        opts: ExportOptions,
        shared: Arc<Shared>,
        clock: fn() -> u64,
    ) -> io::Result<Exporter> {
        let bind: SocketAddr = if opts.collector.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(bind)?;
        socket.connect(opts.collector)?;
        let (tx, rx) = crossbeam::channel::bounded(CHANNEL_CAPACITY);
        let (stop, stop_rx) = crossbeam::channel::bounded(1);
        *shared
            .nat_log
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(xlb_api::NatLogStatus {
            collector: opts.collector.to_string(),
            ..Default::default()
        });
        let join = std::thread::Builder::new()
            .name("xlbd-ipfix".into())
            .spawn(move || run(&opts, &socket, &rx, &stop_rx, &shared, clock))?;
        Ok(Exporter { tx, stop, join })
    }

    /// Where the workers put their events (bounded: a full channel is a lost record).
    pub fn sender(&self) -> Sender<NatEvent> {
        self.tx.clone()
    }

    /// Sends what is queued (within the rate, at most 2 s more) and stops.
    pub fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.join.join();
    }
}

fn run(
    opts: &ExportOptions,
    socket: &UdpSocket,
    rx: &Receiver<NatEvent>,
    stop: &Receiver<()>,
    shared: &Shared,
    clock: fn() -> u64,
) {
    let mut enc = Encoder::new(opts.domain);
    let mut bucket = Bucket::new(opts.max_rate, Instant::now());
    let mut next_templates = Instant::now();
    let mut first_record_at: Option<Instant> = None;
    let mut stopping: Option<Instant> = None;
    let (mut sent, mut messages, mut lost) = (0u64, 0u64, 0u64);
    let send = |enc: &mut Encoder, sent: &mut u64, messages: &mut u64, lost: &mut u64| {
        let (msg, records) = enc.finish(SystemTime::now());
        if msg.is_empty() {
            return;
        }
        match socket.send(&msg) {
            Ok(_) => {
                *sent += records as u64;
                *messages += 1;
            }
            // An unreachable collector (ICMP port unreachable) or a full socket buffer: the
            // records are lost, counted; the next message tries again.
            Err(_) => *lost += records as u64,
        }
        if let Some(s) = shared
            .nat_log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
        {
            s.records_sent = *sent;
            s.messages_sent = *messages;
            s.records_lost = *lost;
        }
    };
    loop {
        let now = Instant::now();
        if stopping.is_none() && stop.try_recv().is_ok() {
            stopping = Some(now + Duration::from_secs(2));
        }
        if stopping.is_some_and(|t| now >= t) {
            break;
        }
        if now >= next_templates {
            next_templates = now + TEMPLATE_EVERY;
            if enc.pending() > 0 {
                send(&mut enc, &mut sent, &mut messages, &mut lost);
                first_record_at = None;
            }
            enc.add_templates();
            send(&mut enc, &mut sent, &mut messages, &mut lost);
        }
        if first_record_at.is_some_and(|t| now >= t + FLUSH_EVERY) {
            send(&mut enc, &mut sent, &mut messages, &mut lost);
            first_record_at = None;
        }
        bucket.refill(now);
        let wait = bucket.wait();
        if !wait.is_zero() {
            std::thread::sleep(wait.min(FLUSH_EVERY));
            continue;
        }
        // Wake for the flush of the open message, the next templates, or a stop request.
        let wake = first_record_at
            .map_or(next_templates, |t| (t + FLUSH_EVERY).min(next_templates))
            .min(now + Duration::from_millis(50));
        let event = if stopping.is_some() {
            rx.try_recv().ok()
        } else {
            // Timed out, or every worker is gone (the stop request follows).
            rx.recv_deadline(wake).ok()
        };
        match event {
            Some(e) => {
                let r = NatRecord::from_event(&e, clock(), SystemTime::now());
                if !enc.fits(&r) {
                    send(&mut enc, &mut sent, &mut messages, &mut lost);
                    first_record_at = None;
                }
                enc.add(&r);
                first_record_at.get_or_insert(now);
                bucket.tokens -= 1.0;
            }
            None if stopping.is_some() => break,
            None => {}
        }
    }
    send(&mut enc, &mut sent, &mut messages, &mut lost);
    // What could not be sent before the end.
    let left = rx.len() as u64;
    if let Some(s) = shared
        .nat_log
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_mut()
    {
        s.records_lost = lost + left;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: u16, v6: bool, event: u8) -> NatRecord {
        let ip = |last: u8| -> IpAddr {
            if v6 {
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, u16::from(last)))
            } else {
                IpAddr::V4(Ipv4Addr::new(198, 18, 1, last))
            }
        };
        NatRecord {
            unix_ms: 1_800_000_000_000 + u64::from(i),
            event,
            proto: 6,
            src: SocketAddr::new(ip(11), 40_000 + i),
            post_src: SocketAddr::new(ip(100), 1024 + i),
            dst: SocketAddr::new(ip(50), 443),
            post_dst: SocketAddr::new(ip(50), 443),
        }
    }

    #[test]
    fn messages_carry_templates_and_records_of_both_families_and_count_sequence() {
        let mut enc = Encoder::new(7);
        enc.add_templates();
        let a = rec(1, false, NAT_SESSION_CREATE);
        let b = rec(2, true, NAT_SESSION_DELETE);
        let c = rec(3, false, NAT_SESSION_DELETE);
        for r in [&a, &b, &c] {
            assert!(enc.fits(r));
            enc.add(r);
        }
        let t = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let (msg, n) = enc.finish(t);
        assert_eq!(n, 3);
        // Header: version, length, export time, sequence 0, domain.
        assert_eq!(&msg[0..2], &[0, 10]);
        assert_eq!(usize::from(u16::from_be_bytes([msg[2], msg[3]])), msg.len());
        let d = decode(&msg).unwrap();
        assert_eq!((d.sequence, d.domain, d.export_secs), (0, 7, 1_800_000_000));
        assert_eq!(d.templates, [TEMPLATE_V4, TEMPLATE_V6]);
        assert_eq!(d.records, [a, b, c]);
        // The template set's bytes: set 2, then template 256 with 11 fields, 323/8 first.
        assert_eq!(&msg[16..18], &[0, 2]);
        assert_eq!(&msg[20..24], &[1, 0, 0, 11]);
        assert_eq!(&msg[24..28], &[0x01, 0x43, 0, 8]);
        // The next message's sequence number counts the 3 records sent.
        enc.add(&a);
        let (msg, _) = enc.finish(t);
        assert_eq!(decode(&msg).unwrap().sequence, 3);
        assert_eq!(
            enc.finish(t),
            (Vec::new(), 0),
            "nothing pending: no message"
        );
    }

    #[test]
    fn messages_stay_under_the_size_limit() {
        let mut enc = Encoder::new(1);
        let mut sizes = Vec::new();
        for i in 0..200 {
            let r = rec(i, i % 3 == 0, NAT_SESSION_CREATE);
            if !enc.fits(&r) {
                sizes.push(enc.finish(SystemTime::now()).0.len());
            }
            enc.add(&r);
        }
        sizes.push(enc.finish(SystemTime::now()).0.len());
        assert!(sizes.len() > 5, "{sizes:?}");
        assert!(sizes.iter().all(|&s| s <= MAX_MESSAGE), "{sizes:?}");
    }

    #[test]
    fn events_get_wall_clock_times_from_their_age() {
        let e = NatEvent {
            at: 5_000_000_000,
            kind: NatEventKind::Delete,
            nat: xlb_engine::flow::Nat::Snat,
            proto: 17,
            rule: 0,
            src: (xlb_engine::Addr::from_v4_bytes([198, 18, 1, 11]), 5353),
            post_src: (xlb_engine::Addr::from_v4_bytes([198, 19, 0, 100]), 2048),
            dst: (xlb_engine::Addr::from_v4_bytes([198, 19, 0, 50]), 53),
            post_dst: (xlb_engine::Addr::from_v4_bytes([198, 19, 0, 50]), 53),
        };
        let wall = UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let r = NatRecord::from_event(&e, 7_500_000_000, wall);
        assert_eq!(r.unix_ms, 2_000_000_000_000 - 2_500);
        assert_eq!((r.event, r.proto), (NAT_SESSION_DELETE, 17));
        assert_eq!(r.post_src, "198.19.0.100:2048".parse().unwrap());
    }

    #[test]
    fn the_bucket_bounds_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100, t0);
        assert_eq!(b.burst, 40.0, "at least one message's worth");
        b.tokens = 0.0;
        assert_eq!(b.wait(), Duration::from_millis(10));
        b.refill(t0 + Duration::from_millis(50));
        assert!((b.tokens - 5.0).abs() < 1e-6);
        b.refill(t0 + Duration::from_secs(10));
        assert_eq!(b.tokens, 40.0, "capped");
    }
}
