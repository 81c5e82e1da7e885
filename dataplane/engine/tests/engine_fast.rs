//! The engine's side of the XDP fast path, in virtual time: which flows it publishes and
//! with what words, how it reads back what XDP recorded, and how it expires a flow XDP
//! forwarded with its exact RSTs. A small stand-in for the XDP program ([`FakeXdp`]) does to
//! the shared memory what the real one does when it forwards a frame of a published flow.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::AtomicU32;
use std::sync::Arc;

use common::flags::*;
use common::*;
use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use xlb_engine::config::{AdminState, Config, DrainAction, MemberHealth};
use xlb_engine::fast::{
    self, init_header, line, set_enabled, FastLayout, FastTable, GraceClock, SLOT_TOMBSTONE,
    STATE_FAST, STATE_TCP,
};
use xlb_engine::time::{mins, secs, Nanos, NANOS_PER_MILLI};
use xlb_engine::{compile, Addr, PortId};

const KEYS: [u64; 4] = [
    0x0123_4567_89ab_cdef,
    0x1111_2222_3333_4445,
    7,
    0x9e37_79b9_7f4a_7c15,
];
const LEAD: Nanos = 128 * NANOS_PER_MILLI;
const MS: Nanos = NANOS_PER_MILLI;

/// What the XDP program does to the published table for a frame it forwards: find the
/// line, check it is fast and the frame came in on the right port, check a TCP segment's
/// window (the engine's rule for an established flow), then advance `next_seq`, grow
/// `max_win` and stamp `last_seen`. `None`: the frame would be punted to the worker.
struct FakeXdp {
    mem: &'static [AtomicU32],
    layout: FastLayout,
}

fn seq_le(a: u32, b: u32) -> bool {
    (b.wrapping_sub(a) as i32) >= 0
}

fn ne(b: [u8; 4]) -> u32 {
    u32::from_ne_bytes(b)
}

fn ports(sport: u16, dport: u16) -> u32 {
    let (s, d) = (sport.to_be_bytes(), dport.to_be_bytes());
    ne([s[0], s[1], d[0], d[1]])
}

impl FakeXdp {
    fn words(&self, l: u32) -> [u32; 16] {
        fast::line_words(self.mem, &self.layout, l)
    }

    fn cell(&self, l: u32, w: usize) -> &AtomicU32 {
        &self.mem[self.layout.line_word(l, w)]
    }

    /// The line a frame of these addresses and ports finds.
    fn find(&self, src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, proto: u8) -> Option<u32> {
        fast::lookup(
            self.mem,
            &self.layout,
            ne(src.octets()),
            ne(dst.octets()),
            ports(sport, dport),
            proto,
        )
    }

    fn forward(&self, now: Nanos, port: PortId, frame: &[u8]) -> Option<u32> {
        self.forward_as(now, port, frame, true)
    }

    /// An invocation that read the line's `FAST` bit before the worker cleared it and
    /// commits after: it forwards the frame whatever the bit says now.
    fn forward_in_flight(&self, now: Nanos, port: PortId, frame: &[u8]) -> Option<u32> {
        self.forward_as(now, port, frame, false)
    }

    fn forward_as(&self, now: Nanos, port: PortId, frame: &[u8], check_fast: bool) -> Option<u32> {
        if !fast::is_enabled(self.mem) {
            return None;
        }
        let p = SlicedPacket::from_ethernet(frame).expect("frame parses");
        let Some(NetSlice::Ipv4(ip)) = p.net else {
            return None;
        };
        let (src, dst) = (ip.header().source_addr(), ip.header().destination_addr());
        let (proto, sport, dport) = match &p.transport {
            Some(TransportSlice::Tcp(t)) => (6, t.source_port(), t.destination_port()),
            Some(TransportSlice::Udp(u)) => (17, u.source_port(), u.destination_port()),
            _ => return None,
        };
        let l = self.find(src, dst, sport, dport, proto)?;
        let w = self.words(l);
        if (check_fast && w[line::STATE] & STATE_FAST == 0)
            || w[line::INGRESS_PORT] != u32::from(port)
        {
            return None;
        }
        if let Some(TransportSlice::Tcp(t)) = &p.transport {
            if !t.ack() || t.syn() || t.fin() || t.rst() {
                return None;
            }
            let r = self.words(l ^ 1);
            let end = t.sequence_number().wrapping_add(t.payload().len() as u32);
            let (next, win) = (w[line::NEXT_SEQ], r[line::MAX_WIN]);
            let ahead_ok = seq_le(end, next.wrapping_add(win));
            let behind_ok = seq_le(next.wrapping_sub(win).wrapping_sub(1), end);
            let sent = r[line::NEXT_SEQ];
            let slack = w[line::MAX_WIN].max(66_000);
            let hi = if w[line::STATE] & fast::STATE_PICKED_UP != 0 {
                sent.wrapping_add(slack)
            } else {
                sent
            };
            let ack = t.acknowledgment_number();
            let ack_ok = seq_le(ack, hi) && seq_le(sent.wrapping_sub(slack), ack);
            if !(ahead_ok && behind_ok && ack_ok) {
                return None;
            }
            let wscale = (w[line::STATE] >> fast::STATE_WSCALE_SHIFT) & 0xf;
            fast::advance_serial(self.cell(l, line::NEXT_SEQ), end);
            fast::grow(
                self.cell(l, line::MAX_WIN),
                u32::from(t.window_size()) << wscale,
            );
        }
        fast::advance_serial(self.cell(l, line::LAST_SEEN), fast::to_stamp(now));
        Some(l)
    }
}

struct FastLab {
    lab: Lab,
    xdp: FakeXdp,
    grace: Arc<GraceClock>,
}

impl FastLab {
    fn new(pairs: u32) -> FastLab {
        let mut lab = Lab::new();
        let layout = FastLayout::new(pairs, 1);
        let mem: &'static [AtomicU32] = Box::leak(
            (0..layout.words())
                .map(|_| AtomicU32::new(0))
                .collect::<Vec<_>>()
                .into_boxed_slice(),
        );
        init_header(mem, &layout, KEYS, KEYS);
        set_enabled(mem, true);
        let grace = Arc::new(GraceClock::default());
        let mut table = FastTable::new(mem, layout, 0, Arc::clone(&grace));
        for port in [CLIENT_PORT, BACKEND_PORT, INTERNET_PORT] {
            table.set_port_ok(port, true);
        }
        lab.engine.attach_fast(table);
        FastLab {
            lab,
            xdp: FakeXdp { mem, layout },
            grace,
        }
    }

    /// Runs the engine's timers up to `until` while a grace thread serves every request
    /// (two rounds per request, between two wake-ups of the worker).
    fn run_with_grace(&mut self, until: Nanos) {
        for _ in 0..100_000 {
            let _ = self.grace.serve(|| Ok::<(), ()>(()));
            match self.lab.engine.next_deadline() {
                Some(d) if d <= until => self.lab.advance_to(d.max(self.lab.now)),
                _ => break,
            }
        }
        self.lab.advance_to(until);
    }

    /// Idle from now on: at the `http` rule's deadline (4 minutes, plus the grace) the flow is
    /// gone, and the two RSTs of reset on idle carry exactly what both ends expect next.
    fn expect_exact_idle_reset(&mut self, conn: &Conn) {
        let last = self.lab.now;
        self.run_with_grace(last + mins(4) + 10 * MS);
        assert_eq!(self.lab.engine.flow_count(), 0);
        assert_eq!(self.lab.emitted, conn.expected_idle_rsts(80).to_vec());
    }

    fn only_flow(&self) -> xlb_engine::FlowInfo {
        let flows: Vec<_> = self.lab.engine.flows().collect();
        assert_eq!(flows.len(), 1, "{flows:?}");
        flows[0]
    }

    fn pair(&self) -> Option<u32> {
        self.lab.engine.fast_pair(self.only_flow().id)
    }

    /// The client segment of `conn` carrying `n` bytes, and the conn advanced past them.
    fn client_data(conn: &mut Conn, n: usize) -> Vec<u8> {
        let f = conn
            .client
            .seg(ACK | PSH, conn.c_seq, conn.s_seq, &vec![b'c'; n]);
        conn.c_seq = conn.c_seq.wrapping_add(n as u32);
        f
    }

    fn backend_data(conn: &mut Conn, n: usize) -> Vec<u8> {
        let f = conn
            .backend
            .seg(ACK | PSH, conn.s_seq, conn.c_seq, &vec![b's'; n]);
        conn.s_seq = conn.s_seq.wrapping_add(n as u32);
        f
    }

    fn counters(&self) -> &xlb_engine::Counters {
        self.lab.engine.counters()
    }
}

fn v4(ip: IpAddr) -> Ipv4Addr {
    match ip {
        IpAddr::V4(v) => v,
        IpAddr::V6(_) => panic!("IPv4 expected"),
    }
}

fn macs(dst: [u8; 6], src: [u8; 6]) -> [u32; 3] {
    let b = [dst, src].concat();
    [
        ne([b[0], b[1], b[2], b[3]]),
        ne([b[4], b[5], b[6], b[7]]),
        ne([b[8], b[9], b[10], b[11]]),
    ]
}

#[test]
fn tcp_flow_is_published_once_confirmed_with_the_exact_words_of_both_directions() {
    let mut t = FastLab::new(16);
    let client = Tcp::client(80, 40_000);
    let (_, syn_out) = t.lab.forward(CLIENT_PORT, client.seg(SYN, 1000, 0, &[]));
    assert_eq!(t.pair(), None, "a SYN is not published");
    let syn = seen(&syn_out);
    let backend = Tcp::reply_to(&syn, syn.dst_mac, XLB_MAC[1]);
    t.lab
        .forward(BACKEND_PORT, backend.seg(SYN | ACK, 70_000, 1001, &[]));
    assert_eq!(t.pair(), None, "a half-open flow is not published");
    t.lab
        .forward(CLIENT_PORT, client.seg(ACK, 1001, 70_001, &[]));
    let pair = t
        .pair()
        .expect("published once the client acknowledged the SYN-ACK");
    assert_eq!(t.counters().fast_published, 1);
    assert_eq!(t.lab.engine.fast_published(), 1);

    let info = t.only_flow();
    let b = v4(syn.dst);
    let o = t.xdp.words(2 * pair);
    let r = t.xdp.words(2 * pair + 1);
    assert_eq!(o[line::STATE], STATE_FAST | STATE_TCP);
    assert_eq!(o[line::INGRESS_PORT], u32::from(CLIENT_PORT));
    assert_eq!(o[line::TX_PORT], u32::from(BACKEND_PORT));
    assert_eq!(o[line::PROTO_RULE], 6 | (u32::from(info.rule) << 16));
    assert_eq!(
        o[line::MATCH_SADDR..=line::NEW_PORTS],
        [
            ne(CLIENT.octets()),
            ne(VIP.octets()),
            ports(40_000, 80),
            ne(CLIENT.octets()),
            ne(b.octets()),
            ports(40_000, 8080),
        ]
    );
    assert_eq!(o[line::MACS..line::MACS + 3], macs(syn.dst_mac, XLB_MAC[1]));
    assert_eq!(o[line::NEXT_SEQ], 1001);
    assert_eq!(o[line::MAX_WIN], 64_240);
    assert_eq!(o[line::LAST_SEEN], ((t.lab.now >> 16) + 1) as u32);

    assert_eq!(r[line::STATE], STATE_FAST | STATE_TCP);
    assert_eq!(r[line::INGRESS_PORT], u32::from(BACKEND_PORT));
    assert_eq!(r[line::TX_PORT], u32::from(CLIENT_PORT));
    assert_eq!(r[line::PROTO_RULE], o[line::PROTO_RULE]);
    assert_eq!(
        r[line::MATCH_SADDR..=line::NEW_PORTS],
        [
            ne(b.octets()),
            ne(CLIENT.octets()),
            ports(8080, 40_000),
            ne(VIP.octets()),
            ne(CLIENT.octets()),
            ports(80, 40_000),
        ]
    );
    assert_eq!(r[line::MACS..line::MACS + 3], macs(CLIENT_MAC, XLB_MAC[0]));
    assert_eq!(r[line::NEXT_SEQ], 70_001);
    assert_eq!(r[line::MAX_WIN], 64_240);

    // Both keys lead to their lines.
    assert_eq!(t.xdp.find(CLIENT, VIP, 40_000, 80, 6), Some(2 * pair));
    assert_eq!(t.xdp.find(b, CLIENT, 8080, 40_000, 6), Some(2 * pair + 1));
}

/// A flow is published only once confirmed: the client must acknowledge exactly what the
/// backend sent. A SYN-ACK that carries data (say a server that echoes the SYN's payload)
/// is confirmed by an ACK of its end, not by one of its SYN alone; until then every segment
/// goes through the worker.
#[test]
fn a_tcp_flow_is_published_only_when_the_client_acknowledges_the_syn_acks_end() {
    let mut t = FastLab::new(16);
    let client = Tcp::client(80, 40_001);
    let (_, syn_out) = t
        .lab
        .forward(CLIENT_PORT, client.seg(SYN, 1000, 0, &[7; 20]));
    let syn = seen(&syn_out);
    let backend = Tcp::reply_to(&syn, syn.dst_mac, XLB_MAC[1]);
    t.lab
        .forward(BACKEND_PORT, backend.seg(SYN | ACK, 70_000, 1021, &[7; 20]));
    for _ in 0..3 {
        t.lab
            .forward(CLIENT_PORT, client.seg(ACK, 1021, 70_001, &[1; 64]));
        assert_eq!(
            t.pair(),
            None,
            "acknowledging the SYN alone does not confirm the flow"
        );
    }
    assert_eq!(t.counters().fast_published, 0);
    t.lab
        .forward(CLIENT_PORT, client.seg(ACK, 1021, 70_021, &[]));
    let pair = t
        .pair()
        .expect("published once the client acknowledged the SYN-ACK's data");
    assert_eq!(t.xdp.words(2 * pair + 1)[line::NEXT_SEQ], 70_021);
}

/// A client datagram to VIP:53 (the `dns` rule) from `sport`.
fn query(sport: u16) -> Vec<u8> {
    udp(
        CLIENT_MAC,
        XLB_MAC[0],
        CLIENT.into(),
        sport,
        VIP.into(),
        53,
        b"q",
    )
}

fn answer(q: &Seen) -> Vec<u8> {
    udp(
        backend_mac(q.dst),
        XLB_MAC[1],
        q.dst,
        q.dport,
        q.src,
        q.sport,
        b"a",
    )
}

#[test]
fn udp_flow_is_published_after_the_reply() {
    let mut t = FastLab::new(16);
    let (_, out) = t.lab.forward(CLIENT_PORT, query(40_000));
    let q = seen(&out);
    assert_eq!(t.pair(), None);
    assert!(t
        .xdp
        .forward(t.lab.now, CLIENT_PORT, &query(40_000))
        .is_none());
    t.lab.forward(BACKEND_PORT, answer(&q));
    let pair = t.pair().expect("published after the reply");
    let o = t.xdp.words(2 * pair);
    assert_eq!(o[line::STATE], STATE_FAST);
    assert_eq!(
        o[line::MATCH_SADDR..=line::NEW_PORTS],
        [
            ne(CLIENT.octets()),
            ne(VIP.octets()),
            ports(40_000, 53),
            ne(CLIENT.octets()),
            ne(v4(q.dst).octets()),
            ports(40_000, 5353),
        ]
    );
    assert_eq!(o[line::NEXT_SEQ], 0);
    // XDP now forwards both directions, and only from the right port.
    assert_eq!(
        t.xdp.forward(t.lab.now, CLIENT_PORT, &query(40_000)),
        Some(2 * pair)
    );
    assert_eq!(t.xdp.forward(t.lab.now, BACKEND_PORT, &query(40_000)), None);
    assert_eq!(
        t.xdp.forward(t.lab.now, BACKEND_PORT, &answer(&q)),
        Some(2 * pair + 1)
    );
}

#[test]
fn fast_traffic_keeps_a_flow_alive_and_its_idle_reset_carries_what_xdp_advanced() {
    let mut t = FastLab::new(16);
    let mut conn = establish(&mut t.lab, 80, 40_001);
    let id = t.only_flow().id;
    assert!(t.lab.engine.is_fast_published(id));
    // Ten minutes of traffic that only XDP sees, one segment each way per minute.
    for minute in 1..=10 {
        t.run_with_grace(T0 + mins(minute));
        let f = FastLab::client_data(&mut conn, 100);
        assert!(
            t.xdp.forward(t.lab.now, CLIENT_PORT, &f).is_some(),
            "minute {minute}"
        );
        let f = FastLab::backend_data(&mut conn, 300);
        assert!(
            t.xdp.forward(t.lab.now, BACKEND_PORT, &f).is_some(),
            "minute {minute}"
        );
    }
    let last = t.lab.now;
    assert_eq!(
        t.lab.engine.flow_count(),
        1,
        "alive long after its first deadline"
    );
    assert!(t.lab.emitted.is_empty());
    // The listing shows XDP's time.
    let info = t.only_flow();
    assert!(
        info.last_seen >= last && info.last_seen < last + (1 << 16),
        "{info:?}"
    );
    t.run_with_grace(last + mins(4) - LEAD - MS);
    assert_eq!(t.lab.engine.flow_count(), 1);
    assert!(t.lab.engine.is_fast_published(id));
    t.run_with_grace(last + mins(4) + 10 * MS);
    assert_eq!(t.lab.engine.flow_count(), 0, "expired after real idleness");
    let expected = conn.expected_idle_rsts(80);
    assert_eq!(
        t.lab.emitted,
        expected.to_vec(),
        "exact RSTs from XDP's next_seq"
    );
    assert_eq!(t.counters().fast_unpublished, 1);
    assert_eq!(t.lab.engine.fast_published(), 0);
    assert_eq!(
        t.xdp.find(CLIENT, VIP, 40_001, 80, 6),
        None,
        "keys tombstoned"
    );
}

/// The flow's pair and the time its idle deadline falls, for a flow established at T0 on
/// the `http` rule (4 minutes).
fn due_at_lead(t: &mut FastLab, conn: &Conn) -> Nanos {
    let _ = conn;
    let deadline = T0 + mins(4);
    // Just past the filing at deadline - lead: FAST cleared, a grace asked for.
    t.lab.advance_to(deadline - LEAD + 2 * MS);
    let pair = t.pair().expect("still published");
    assert_eq!(t.xdp.words(2 * pair)[line::STATE] & STATE_FAST, 0);
    assert_eq!(t.xdp.words(2 * pair + 1)[line::STATE] & STATE_FAST, 0);
    assert!(t.grace.take_wanted(), "a grace was asked for");
    deadline
}

#[test]
fn expiry_waits_for_the_grace_then_resets_exactly() {
    let mut t = FastLab::new(16);
    let mut conn = establish(&mut t.lab, 80, 40_002);
    let f = FastLab::client_data(&mut conn, 10);
    assert!(t.xdp.forward(t.lab.now, CLIENT_PORT, &f).is_some());
    let deadline = due_at_lead(&mut t, &conn);
    // XDP punts what it finds without FAST.
    let probe = conn.client.seg(ACK, conn.c_seq, conn.s_seq, &[]);
    assert!(t.xdp.forward(t.lab.now, CLIENT_PORT, &probe).is_none());
    // The grace thread does not run: the flow waits past its deadline.
    t.lab.advance_to(deadline + 5 * MS);
    assert_eq!(t.lab.engine.flow_count(), 1);
    assert!(t.lab.emitted.is_empty());
    let waits = t.counters().fast_grace_waits;
    assert!(waits >= 1, "{waits}");
    // One round is not a grace.
    t.grace.advance();
    t.lab.advance(2 * MS);
    assert_eq!(t.lab.engine.flow_count(), 1);
    assert!(t.counters().fast_grace_waits > waits);
    t.grace.advance();
    t.lab.advance(2 * MS);
    assert_eq!(t.lab.engine.flow_count(), 0);
    assert_eq!(t.lab.emitted, conn.expected_idle_rsts(80).to_vec());
}

/// A grace that took 900 ms (RCU grace periods stretched on a starved host) moves the start
/// of a published flow's expiry to twice that before its deadline, so that its grace has
/// passed when the deadline comes and the reset is not late; quick graces bring the lead back.
#[test]
fn a_slow_grace_starts_expiry_earlier_and_quick_ones_bring_the_lead_back() {
    let mut t = FastLab::new(16);
    t.grace.note_served(900 * NANOS_PER_MILLI);
    let lead = t.grace.expiry_lead(LEAD);
    assert_eq!(lead, 1_800 * NANOS_PER_MILLI);
    let mut conn = establish(&mut t.lab, 80, 40_009);
    let f = FastLab::client_data(&mut conn, 10);
    assert!(t.xdp.forward(t.lab.now, CLIENT_PORT, &f).is_some());
    let deadline = T0 + mins(4);
    t.lab.advance_to(deadline - lead - 2 * MS);
    let pair = t.pair().expect("published");
    assert_ne!(
        t.xdp.words(2 * pair)[line::STATE] & STATE_FAST,
        0,
        "still fast"
    );
    t.lab.advance_to(deadline - lead + 2 * MS);
    assert_eq!(
        t.xdp.words(2 * pair)[line::STATE] & STATE_FAST,
        0,
        "expiry under way"
    );
    assert!(t.grace.take_wanted(), "a grace was asked for");
    // The grace, however slow, ends before the deadline: the reset comes on time, exact.
    t.grace.advance();
    t.grace.advance();
    t.lab.advance_to(deadline - MS);
    assert_eq!(t.lab.engine.flow_count(), 1, "not before its deadline");
    // (The deadline counts from XDP's stamp of the last segment, a few ms after T0.)
    t.lab.advance_to(deadline + 10 * MS);
    assert_eq!(t.lab.engine.flow_count(), 0);
    assert_eq!(t.lab.emitted, conn.expected_idle_rsts(80).to_vec());
    assert_eq!(
        t.counters().fast_grace_waits,
        0,
        "never waited past the deadline"
    );
    // Quick graces after it: the lead decays back to its floor.
    for _ in 0..40 {
        t.grace.note_served(20 * NANOS_PER_MILLI);
    }
    assert_eq!(t.grace.expiry_lead(LEAD), LEAD);
    // Never more than the cap, however long a grace took.
    t.grace.note_served(60_000 * NANOS_PER_MILLI);
    assert_eq!(t.grace.expiry_lead(LEAD), xlb_engine::fast::MAX_EXPIRY_LEAD);
}

#[test]
fn a_packet_between_clearing_fast_and_the_grace_end_revives_the_flow() {
    let mut t = FastLab::new(16);
    let mut conn = establish(&mut t.lab, 80, 40_003);
    let deadline = due_at_lead(&mut t, &conn);
    // XDP punts it; the worker forwards it.
    let f = FastLab::client_data(&mut conn, 10);
    assert!(t.xdp.forward(t.lab.now, CLIENT_PORT, &f).is_none());
    let (port, _) = t.lab.forward(CLIENT_PORT, f);
    assert_eq!(port, BACKEND_PORT);
    let pair = t.pair().expect("still published");
    assert_ne!(
        t.xdp.words(2 * pair)[line::STATE] & STATE_FAST,
        0,
        "fast again at once"
    );
    let seen_at = t.lab.now;
    t.run_with_grace(deadline + 5 * MS);
    assert_eq!(
        t.lab.engine.flow_count(),
        1,
        "the packet moved the deadline"
    );
    assert!(t.lab.emitted.is_empty());
    let pair = t.pair().expect("still published");
    assert_ne!(
        t.xdp.words(2 * pair)[line::STATE] & STATE_FAST,
        0,
        "fast again"
    );
    let f = FastLab::client_data(&mut conn, 10);
    assert!(t.xdp.forward(t.lab.now, CLIENT_PORT, &f).is_some());
    assert!(t.lab.now > seen_at);
    t.expect_exact_idle_reset(&conn);
}

#[test]
fn a_fin_withdraws_the_flow_from_xdp() {
    let mut t = FastLab::new(16);
    let conn = establish(&mut t.lab, 80, 40_004);
    let pair = t.pair().unwrap();
    let fin = conn.client.seg(FIN | ACK, conn.c_seq, conn.s_seq, &[]);
    assert!(
        t.xdp.forward(t.lab.now, CLIENT_PORT, &fin).is_none(),
        "XDP punts a FIN"
    );
    t.lab.forward(CLIENT_PORT, fin);
    assert_eq!(t.pair(), None);
    assert_eq!(t.counters().fast_unpublished, 1);
    assert_eq!(t.xdp.words(2 * pair)[line::STATE], 0);
    assert_eq!(t.xdp.words(2 * pair + 1)[line::STATE], 0);
    assert_eq!(t.xdp.find(CLIENT, VIP, 40_004, 80, 6), None);
    let data = conn.client.seg(ACK, conn.c_seq + 1, conn.s_seq, &[]);
    assert!(t.xdp.forward(t.lab.now, CLIENT_PORT, &data).is_none());
}

/// A published flow's packets are checked only for what a packet can change, its TCP state:
/// a change in the reply direction (the backend's FIN) withdraws it as the client's does, and
/// the closing flow's later packets do not publish it again.
#[test]
fn a_backend_fin_withdraws_the_flow_and_the_closing_flow_stays_slow() {
    let mut t = FastLab::new(16);
    let mut conn = establish(&mut t.lab, 80, 40_005);
    let pair = t.pair().unwrap();
    t.lab
        .forward(CLIENT_PORT, FastLab::client_data(&mut conn, 10));
    t.lab
        .forward(BACKEND_PORT, FastLab::backend_data(&mut conn, 10));
    assert_eq!(t.pair(), Some(pair), "data keeps it published");
    let fin = conn.backend.seg(FIN | ACK, conn.s_seq, conn.c_seq, &[]);
    conn.s_seq = conn.s_seq.wrapping_add(1);
    assert!(
        t.xdp.forward(t.lab.now, BACKEND_PORT, &fin).is_none(),
        "XDP punts a FIN"
    );
    t.lab.forward(BACKEND_PORT, fin);
    assert_eq!(t.pair(), None);
    assert_eq!(t.counters().fast_unpublished, 1);
    assert_eq!(t.xdp.words(2 * pair)[line::STATE], 0);
    assert_eq!(t.xdp.words(2 * pair + 1)[line::STATE], 0);
    assert_eq!(t.xdp.find(CLIENT, VIP, 40_005, 80, 6), None);
    let ack = conn.client.seg(ACK, conn.c_seq, conn.s_seq, &[]);
    t.lab.forward(CLIENT_PORT, ack);
    t.lab
        .forward(CLIENT_PORT, FastLab::client_data(&mut conn, 10));
    assert_eq!(t.pair(), None, "a closing flow is not published again");
    assert_eq!(t.counters().fast_published, 1);
}

#[test]
fn a_withdrawn_pair_is_reused_only_after_a_grace() {
    let mut t = FastLab::new(1);
    let a = establish(&mut t.lab, 80, 40_010);
    let a_id = t.lab.engine.flows().next().unwrap().id;
    assert_eq!(t.lab.engine.fast_pair(a_id), Some(0));
    // The flow ends with an exact RST: withdrawn, its pair deferred.
    t.lab
        .forward(CLIENT_PORT, a.client.seg(RST, a.c_seq, 0, &[]));
    assert_eq!(t.lab.engine.fast_pair(a_id), None);
    let layout = t.xdp.layout;
    let tombstones = (0..layout.index_slots)
        .filter(|&s| {
            t.xdp.mem[layout.slot_word(s)].load(std::sync::atomic::Ordering::Relaxed)
                == SLOT_TOMBSTONE
        })
        .count();
    assert_eq!(tombstones, 2, "both keys tombstoned");
    let epoch = t.grace.epoch();
    let mut b = establish(&mut t.lab, 80, 40_011);
    let b_id = t
        .lab
        .engine
        .flows()
        .find(|f| f.orig.src_port == 40_011)
        .unwrap()
        .id;
    assert_eq!(
        t.lab.engine.fast_pair(b_id),
        None,
        "the only pair is in limbo"
    );
    assert_eq!(t.counters().fast_publish_failed, 1);
    t.grace.advance();
    t.lab.forward(CLIENT_PORT, FastLab::client_data(&mut b, 5));
    assert_eq!(
        t.lab.engine.fast_pair(b_id),
        None,
        "epoch + 1 is not enough"
    );
    assert_eq!(t.counters().fast_publish_failed, 2);
    t.grace.advance();
    assert_eq!(t.grace.epoch(), epoch + 2);
    t.lab.forward(CLIENT_PORT, FastLab::client_data(&mut b, 5));
    assert_eq!(t.lab.engine.fast_pair(b_id), Some(0));
    assert_eq!(t.xdp.find(CLIENT, VIP, 40_011, 80, 6), Some(0));
    assert_eq!(t.xdp.find(CLIENT, VIP, 40_010, 80, 6), None);
}

#[test]
fn a_udp_flow_whose_backend_goes_down_is_withdrawn_and_moves_at_its_next_punted_packet() {
    let mut t = FastLab::new(16);
    let (_, out) = t.lab.forward(CLIENT_PORT, query(40_020));
    let q = seen(&out);
    t.lab.forward(BACKEND_PORT, answer(&q));
    let pair = t.pair().unwrap();
    assert!(t
        .xdp
        .forward(t.lab.now, CLIENT_PORT, &query(40_020))
        .is_some());

    let config = Config::from_toml_str(DEFAULT_CONFIG).unwrap();
    let mut health = MemberHealth::all_healthy();
    health.set_healthy("web", Addr::from(q.dst), false);
    let prev = t.lab.engine.rules();
    let rules = Arc::new(compile(&config, Some(prev), &health, prev.generation() + 1).unwrap());
    t.lab.engine.set_rules(rules);
    t.lab.advance(0);
    assert_eq!(t.pair(), None, "withdrawn after the rule change");
    assert_eq!(t.xdp.words(2 * pair)[line::STATE], 0);
    assert!(t
        .xdp
        .forward(t.lab.now, CLIENT_PORT, &query(40_020))
        .is_none());
    let (port, out) = t.lab.forward(CLIENT_PORT, query(40_020));
    assert_eq!(port, BACKEND_PORT);
    assert_ne!(seen(&out).dst, q.dst, "moved to the healthy member");
    let rule = t.only_flow().rule;
    assert_eq!(t.counters().rule(rule).flows_moved, 1);
}

#[test]
fn reading_back_and_writing_back_never_move_next_seq_backwards() {
    let mut t = FastLab::new(16);
    let mut conn = establish(&mut t.lab, 80, 40_030);
    let id = t.only_flow().id;
    let pair = t.pair().unwrap();
    let first = conn.c_seq;
    let f = FastLab::client_data(&mut conn, 1000);
    assert!(t.xdp.forward(t.lab.now, CLIENT_PORT, &f).is_some());
    assert_eq!(t.xdp.words(2 * pair)[line::NEXT_SEQ], first + 1000);
    // A retransmission of the first half reaches the worker (as a punt would).
    t.lab.now += MS;
    let again = conn.client.seg(ACK | PSH, first, conn.s_seq, &[b'c'; 500]);
    let (port, _) = t.lab.forward(CLIENT_PORT, again);
    assert_eq!(port, BACKEND_PORT);
    assert_eq!(t.xdp.words(2 * pair)[line::NEXT_SEQ], first + 1000);
    let state = t.lab.engine.export_flow(t.lab.now, id).unwrap();
    assert_eq!(state.tcp.next_seq(0), first + 1000);
    // The worker's own advance is written back.
    let f = FastLab::client_data(&mut conn, 10);
    t.lab.forward(CLIENT_PORT, f);
    assert_eq!(t.xdp.words(2 * pair)[line::NEXT_SEQ], first + 1010);
    assert_eq!(
        t.xdp.words(2 * pair)[line::LAST_SEEN],
        ((t.lab.now >> 16) + 1) as u32
    );
}

#[test]
fn a_neighbour_changing_its_mac_withdraws_the_flow_until_its_next_packet() {
    let mut t = FastLab::new(16);
    let mut conn = establish(&mut t.lab, 80, 40_040);
    assert!(t.pair().is_some());
    t.lab.advance(0);
    let idle = t.lab.engine.next_deadline();
    assert!(idle.is_some_and(|d| d > t.lab.now), "settled: {idle:?}");
    let new_mac = [0x02, 0, 0, 0, 0xb9, 0x09];
    t.lab
        .engine
        .next_hops()
        .set_neighbor(conn.backend_ip.into(), BACKEND_PORT, new_mac)
        .unwrap();
    // XDP carries the flow, so no packet reaches the worker: its sleep must end now, not at
    // the flow's idle deadline.
    assert!(
        t.lab.engine.next_deadline().is_some_and(|d| d <= t.lab.now),
        "the worker is woken: {:?}",
        t.lab.engine.next_deadline()
    );
    t.lab.advance(0);
    assert_eq!(t.pair(), None);
    assert!(
        t.lab.engine.next_deadline().is_some_and(|d| d > t.lab.now),
        "and sleeps again once done: {:?}",
        t.lab.engine.next_deadline()
    );
    let f = FastLab::client_data(&mut conn, 10);
    let (_, out) = t.lab.forward(CLIENT_PORT, f);
    assert_eq!(seen(&out).dst_mac, new_mac);
    let pair = t.pair().expect("published again");
    assert_eq!(
        t.xdp.words(2 * pair)[line::MACS..line::MACS + 3],
        macs(new_mac, XLB_MAC[1])
    );
}

/// A neighbour change is checked against the published lines a bounded number of flow slots
/// per `expire` call: each call looks at `budget` slots (the walk's progress shows in which
/// flows are withdrawn), the walk ends after a lap of the table, every flow of that neighbour
/// is withdrawn by then and the others kept, and each is published again, with the new MAC,
/// at its next packet.
#[test]
fn a_neighbour_change_withdraws_its_flows_a_bounded_number_of_slots_per_expire() {
    let mut t = FastLab::new(64);
    let mut conns: Vec<Conn> = (0..12)
        .map(|i| establish(&mut t.lab, 80, 40_060 + i))
        .collect();
    t.lab.advance(0);
    let flows: Vec<_> = t.lab.engine.flows().collect();
    assert_eq!(flows.len(), 12);
    assert!(flows.iter().all(|f| f.id < 12), "slots taken in order");
    let moved = conns[0].backend_ip;
    let on_moved = |f: &xlb_engine::FlowInfo| f.translated.dst == Addr::from(moved);
    let affected = flows.iter().filter(|f| on_moved(f)).count();
    assert!(affected > 0 && affected < 12, "{affected} of 12 on {moved}");
    let new_mac = [0x02, 0, 0, 0, 0xb9, 0x0a];
    t.lab
        .engine
        .next_hops()
        .set_neighbor(moved.into(), BACKEND_PORT, new_mac)
        .unwrap();
    const BUDGET: usize = 4;
    assert!(
        flows.iter().any(|f| on_moved(f) && f.id as usize >= BUDGET),
        "a flow of that neighbour past the first call's slots"
    );
    let capacity = t.lab.engine.config().flow_capacity as usize;
    let mut calls = 0;
    while t.lab.engine.next_deadline().is_some_and(|d| d <= t.lab.now) {
        let done = t.lab.engine.expire(t.lab.now, BUDGET, &mut |_, _| {});
        assert!(done <= BUDGET, "{done} units in one call");
        calls += 1;
        if calls <= 3 {
            for f in &flows {
                let looked_at = (f.id as usize) < calls * BUDGET;
                let published = t.lab.engine.fast_pair(f.id).is_some();
                assert_eq!(
                    published,
                    !(looked_at && on_moved(f)),
                    "after {calls} calls: flow {}",
                    f.id
                );
            }
        }
        assert!(calls <= capacity, "the walk does not end");
    }
    assert_eq!(calls, capacity.div_ceil(BUDGET), "one lap of the table");
    assert_eq!(t.lab.engine.fast_published(), 12 - affected);
    assert_eq!(t.counters().fast_unpublished, affected as u64);
    for conn in conns.iter_mut() {
        let f = FastLab::client_data(conn, 10);
        t.lab.forward(CLIENT_PORT, f);
    }
    assert_eq!(t.lab.engine.fast_published(), 12, "all published again");
    for f in flows.iter().filter(|f| on_moved(f)) {
        let pair = t.lab.engine.fast_pair(f.id).unwrap();
        assert_eq!(
            t.xdp.words(2 * pair)[line::MACS..line::MACS + 3],
            macs(new_mac, XLB_MAC[1])
        );
    }
}

#[test]
fn flows_on_ports_xdp_cannot_serve_and_ipv6_flows_stay_slow() {
    let mut t = FastLab::new(16);
    t.lab.engine.set_fast_port(BACKEND_PORT, false);
    let mut conn = establish(&mut t.lab, 80, 40_050);
    assert_eq!(t.pair(), None);
    t.lab.engine.set_fast_port(BACKEND_PORT, true);
    t.lab
        .forward(CLIENT_PORT, FastLab::client_data(&mut conn, 1));
    assert!(t.pair().is_some());
    t.lab.engine.set_fast_port(CLIENT_PORT, false);
    t.lab.advance(0);
    assert_eq!(t.pair(), None, "withdrawn when its port may no longer");
    assert_eq!(t.counters().fast_unpublished, 1);

    let mut t = FastLab::new(16);
    let c6 = Tcp {
        src_mac: CLIENT_MAC,
        dst_mac: XLB_MAC[0],
        src: CLIENT6.into(),
        dst: VIP6.into(),
        sport: 40_051,
        dport: 80,
    };
    let mut conn = Conn::open(&mut t.lab, c6);
    t.lab
        .forward(CLIENT_PORT, FastLab::client_data(&mut conn, 1));
    assert_eq!(t.pair(), None);
    assert_eq!(t.counters().fast_published, 0);
}

/// The store never hears of the packets XDP forwards: with the fast path attached before the
/// store, a restored flow counts as seen at the restore, so a connection XDP kept busy is not
/// reset at its stale deadline; it is published again at its next packets and expires after
/// real idleness with RSTs exact from what the worker saw since.
#[test]
fn a_restored_flow_counts_as_seen_at_the_restore_and_starts_unpublished() {
    let mut t = FastLab::new(16);
    let mem = vec![0u8; t.lab.engine.store_geometry().bytes()];
    t.lab
        .engine
        .attach_store(t.lab.now, Box::new(mem), 1)
        .unwrap();
    let mut conn = establish(&mut t.lab, 80, 40_060);
    assert!(t.pair().is_some());
    // Ten minutes of traffic only XDP sees, then a crash.
    for minute in 1..=10 {
        t.run_with_grace(T0 + mins(minute));
        let f = FastLab::client_data(&mut conn, 100);
        assert!(t.xdp.forward(t.lab.now, CLIENT_PORT, &f).is_some());
    }
    let mem = t.lab.engine.abandon_store().unwrap();
    let now = t.lab.now + secs(2);

    let mut n = FastLab::new(16);
    n.lab.now = now;
    let report = n.lab.engine.attach_store(now, mem, 1).unwrap();
    assert_eq!(report.flows, 1);
    let info = n.only_flow();
    assert_eq!(
        info.last_seen, now,
        "seen at the restore, not 10 minutes ago"
    );
    assert_eq!(n.pair(), None, "restored flows start unpublished");
    n.lab.advance(MS);
    assert_eq!(n.lab.engine.flow_count(), 1);
    assert!(n.lab.emitted.is_empty());
    // Both directions reach the worker once: published again, exact from then on.
    n.lab
        .forward(CLIENT_PORT, FastLab::client_data(&mut conn, 10));
    n.lab
        .forward(BACKEND_PORT, FastLab::backend_data(&mut conn, 10));
    assert!(n.pair().is_some());
    n.expect_exact_idle_reset(&conn);
}

/// With the memory of the previous process taken over (`FastTable::resume`), a restored flow
/// takes what XDP recorded while no worker ran: its idle time and both next sequence numbers,
/// so that even a direction silent since the crash is reset exactly.
#[test]
fn a_resumed_table_gives_restored_flows_what_xdp_recorded() {
    let mut t = FastLab::new(16);
    let mem = vec![0u8; t.lab.engine.store_geometry().bytes()];
    t.lab
        .engine
        .attach_store(t.lab.now, Box::new(mem), 1)
        .unwrap();
    let mut conn = establish(&mut t.lab, 80, 40_070);
    for minute in 1..=3 {
        t.run_with_grace(T0 + mins(minute));
        let f = FastLab::client_data(&mut conn, 100);
        assert!(t.xdp.forward(t.lab.now, CLIENT_PORT, &f).is_some());
        let f = FastLab::backend_data(&mut conn, 700);
        assert!(t.xdp.forward(t.lab.now, BACKEND_PORT, &f).is_some());
    }
    let last_fast = t.lab.now;
    let store = t.lab.engine.abandon_store().unwrap();
    // No worker runs for a minute; XDP still forwards the client's data.
    let now = last_fast + mins(1);
    let f = FastLab::client_data(&mut conn, 50);
    assert!(t.xdp.forward(now - secs(30), CLIENT_PORT, &f).is_some());
    let last_fast = now - secs(30);

    // A table of another layout is refused.
    let grace = Arc::new(GraceClock::default());
    assert!(FastTable::resume(t.xdp.mem, FastLayout::new(8, 1), 0, Arc::clone(&grace)).is_err());

    let mut lab = Lab::new();
    lab.now = now;
    let mut table = FastTable::resume(t.xdp.mem, t.xdp.layout, 0, Arc::clone(&grace)).unwrap();
    for port in [CLIENT_PORT, BACKEND_PORT, INTERNET_PORT] {
        table.set_port_ok(port, true);
    }
    lab.engine.attach_fast(table);
    let mut n = FastLab {
        lab,
        xdp: FakeXdp {
            mem: t.xdp.mem,
            layout: t.xdp.layout,
        },
        grace,
    };
    // XDP punts the flow from the moment the new process took the table over.
    let probe = conn.client.seg(ACK, conn.c_seq, conn.s_seq, &[]);
    assert!(n.xdp.forward(now, CLIENT_PORT, &probe).is_none());
    n.lab.engine.attach_store(now, store, 1).unwrap();
    let info = n.only_flow();
    assert!(
        info.last_seen >= last_fast && info.last_seen < last_fast + (1 << 16),
        "XDP's last packet, not the restore: {info:?}"
    );
    assert_eq!(n.pair(), None);
    let state = n.lab.engine.export_flow(now, info.id).unwrap();
    assert_eq!(
        (state.tcp.next_seq(0), state.tcp.next_seq(1)),
        (conn.c_seq, conn.s_seq)
    );
    // A grace later the old pair is freed: its keys are gone.
    n.run_with_grace(now + 10 * MS);
    assert_eq!(n.xdp.find(CLIENT, VIP, 40_070, 80, 6), None);
    // Only the client speaks after the restart; the flow is published again.
    n.lab
        .forward(CLIENT_PORT, FastLab::client_data(&mut conn, 10));
    assert!(n.pair().is_some());
    n.expect_exact_idle_reset(&conn);
}

/// An XDP invocation that read `FAST` just before the worker cleared it still commits its
/// segment afterwards: the grace makes the worker wait for it, and the flow lives on with the
/// sequence number it advanced.
#[test]
fn a_segment_xdp_committed_while_fast_was_being_cleared_revives_the_flow() {
    let mut t = FastLab::new(16);
    let mut conn = establish(&mut t.lab, 80, 40_080);
    let deadline = due_at_lead(&mut t, &conn);
    let pair = t.pair().unwrap();
    // The late commit: what the XDP program writes after its checks passed.
    let end = conn.c_seq.wrapping_add(20);
    conn.c_seq = end;
    fast::advance_serial(t.xdp.cell(2 * pair, line::NEXT_SEQ), end);
    fast::advance_serial(
        t.xdp.cell(2 * pair, line::LAST_SEEN),
        fast::to_stamp(t.lab.now),
    );
    let committed_at = t.lab.now;
    t.run_with_grace(deadline + 5 * MS);
    assert_eq!(t.lab.engine.flow_count(), 1);
    assert_ne!(t.xdp.words(2 * pair)[line::STATE] & STATE_FAST, 0);
    t.run_with_grace(committed_at + mins(4) + 10 * MS);
    assert_eq!(t.lab.engine.flow_count(), 0);
    assert_eq!(t.lab.emitted, conn.expected_idle_rsts(80).to_vec());
}

mod sessions {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::sync::atomic::Ordering;
    use xlb_engine::fast::SLOT_EMPTY;

    #[derive(Clone, Debug)]
    enum Op {
        Open(u8),
        ClientData(u8, u16),
        BackendData(u8, u16),
        Fin(u8),
        Rst(u8),
        Wait(u32, bool),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..4).prop_map(Op::Open),
            (0u8..4, 1u16..3000).prop_map(|(c, n)| Op::ClientData(c, n)),
            (0u8..4, 1u16..3000).prop_map(|(c, n)| Op::BackendData(c, n)),
            (0u8..4).prop_map(Op::Fin),
            (0u8..4).prop_map(Op::Rst),
            (0u32..300_000, any::<bool>()).prop_map(|(ms, g)| Op::Wait(ms, g)),
        ]
    }

    /// XDP first; what it punts goes to the worker.
    fn deliver(t: &mut FastLab, port: PortId, frame: Vec<u8>) {
        if t.xdp.forward(t.lab.now, port, &frame).is_none() {
            t.lab.send(port, frame);
        }
    }

    /// Every published flow is found by both its keys, in its own pair, and no two flows
    /// share a pair.
    fn check(t: &FastLab) {
        let mut pairs = std::collections::HashSet::new();
        let mut published = 0;
        for info in t.lab.engine.flows() {
            let Some(pair) = t.lab.engine.fast_pair(info.id) else {
                continue;
            };
            published += 1;
            assert!(pairs.insert(pair), "pair {pair} twice");
            let (o, tr) = (info.orig, info.translated);
            let ip = |a: Addr| v4(a.to_ip());
            assert_eq!(
                t.xdp.find(ip(o.src), ip(o.dst), o.src_port, o.dst_port, 6),
                Some(2 * pair)
            );
            assert_eq!(
                t.xdp
                    .find(ip(tr.dst), ip(tr.src), tr.dst_port, tr.src_port, 6),
                Some(2 * pair + 1)
            );
        }
        assert_eq!(published, t.lab.engine.fast_published());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn any_session_keeps_the_table_consistent_and_ends_empty(ops in proptest::collection::vec(op(), 1..40)) {
            let mut t = FastLab::new(3);
            let mut conns: HashMap<u8, Conn> = HashMap::new();
            for op in ops {
                match op {
                    Op::Open(c) => {
                        let sport = 41_000 + u16::from(c);
                        if !t.lab.engine.flows().any(|f| f.orig.src_port == sport) {
                            conns.insert(c, establish(&mut t.lab, 80, sport));
                        }
                    }
                    Op::ClientData(c, n) => {
                        if let Some(conn) = conns.get_mut(&c) {
                            let f = FastLab::client_data(conn, n as usize);
                            deliver(&mut t, CLIENT_PORT, f);
                        }
                    }
                    Op::BackendData(c, n) => {
                        if let Some(conn) = conns.get_mut(&c) {
                            let f = FastLab::backend_data(conn, n as usize);
                            deliver(&mut t, BACKEND_PORT, f);
                        }
                    }
                    Op::Fin(c) => {
                        if let Some(conn) = conns.get_mut(&c) {
                            let f = conn.client.seg(FIN | ACK, conn.c_seq, conn.s_seq, &[]);
                            conn.c_seq = conn.c_seq.wrapping_add(1);
                            deliver(&mut t, CLIENT_PORT, f);
                        }
                    }
                    Op::Rst(c) => {
                        if let Some(conn) = conns.remove(&c) {
                            let f = conn.client.seg(RST, conn.c_seq, 0, &[]);
                            deliver(&mut t, CLIENT_PORT, f);
                        }
                    }
                    Op::Wait(ms, grace) => {
                        let until = t.lab.now + u64::from(ms) * MS;
                        if grace {
                            t.run_with_grace(until);
                        } else {
                            t.lab.run_until(until);
                        }
                    }
                }
                check(&t);
            }
            t.run_with_grace(t.lab.now + mins(40));
            prop_assert_eq!(t.lab.engine.flow_count(), 0);
            prop_assert_eq!(t.lab.engine.fast_published(), 0);
            let c = t.counters();
            prop_assert_eq!(c.fast_published, c.fast_unpublished);
            let layout = t.xdp.layout;
            for s in 0..layout.index_slots {
                let v = t.xdp.mem[layout.slot_word(s)].load(Ordering::Relaxed);
                prop_assert!(v == SLOT_EMPTY || v == SLOT_TOMBSTONE, "slot {} holds {}", s, v);
            }
            for l in 0..layout.lines {
                prop_assert_eq!(t.xdp.words(l)[line::STATE], 0);
            }
        }
    }
}

/// `DEFAULT_CONFIG` with `member` of pool `web` drained since `started`, reset `timeout_s`
/// later (`None`: not drained), compiled against the lab's rule set.
fn drain_rules(
    lab: &Lab,
    member: IpAddr,
    timeout_s: Option<u32>,
    started: Nanos,
) -> Arc<xlb_engine::RuleSet> {
    let mut config = Config::from_toml_str(DEFAULT_CONFIG).unwrap();
    if let Some(timeout_s) = timeout_s {
        let m = config.backend_pools[0]
            .members
            .iter_mut()
            .find(|m| m.address == member)
            .expect("a member of web");
        m.admin_state = AdminState::Down;
        m.drain_timeout_seconds = Some(timeout_s);
        m.drain_action = DrainAction::Reset;
    }
    let mut health = MemberHealth::all_healthy();
    health.follow_drains(&config, started);
    let prev = lab.engine.rules();
    Arc::new(compile(&config, Some(prev), &health, prev.generation() + 1).unwrap())
}

#[test]
fn a_drain_deadline_resets_a_fast_flow_after_the_grace_with_what_xdp_committed_last() {
    let mut t = FastLab::new(16);
    let mut conn = establish(&mut t.lab, 80, 40_030);
    let id = t.only_flow().id;
    let pair = t.pair().expect("published");
    let start = t.lab.now;
    let rules = drain_rules(&t.lab, conn.backend_ip, Some(60), start);
    t.lab.engine.set_rules(rules);
    assert_eq!(t.pair(), Some(pair), "a drained member's flow stays fast");
    // Traffic XDP alone sees until just before the deadline.
    t.run_with_grace(start + secs(59));
    let f = FastLab::client_data(&mut conn, 100);
    assert!(t.xdp.forward(t.lab.now, CLIENT_PORT, &f).is_some());
    let f = FastLab::backend_data(&mut conn, 200);
    assert!(t.xdp.forward(t.lab.now, BACKEND_PORT, &f).is_some());
    t.run_with_grace(start + secs(60) - MS);
    assert!(t.lab.emitted.is_empty());

    // The deadline's census round (the grace thread does not run yet): FAST cleared on both
    // lines, a grace asked for, no RST yet.
    t.lab.advance_to(start + secs(60));
    assert!(t.lab.emitted.is_empty(), "no RST before the grace");
    assert_eq!(t.lab.engine.flow_count(), 1);
    assert_eq!(t.pair(), Some(pair));
    assert_eq!(t.xdp.words(2 * pair)[line::STATE] & STATE_FAST, 0);
    assert_eq!(t.xdp.words(2 * pair + 1)[line::STATE] & STATE_FAST, 0);
    assert!(t.grace.take_wanted(), "a grace was asked for");
    let p = &t.lab.engine.drain_progress()[0];
    assert_eq!((p.flows_reset, p.deadline_done), (0, false), "{p:?}");

    // An XDP invocation that saw FAST before it was cleared commits a segment now.
    let f = FastLab::client_data(&mut conn, 50);
    assert_eq!(
        t.xdp.forward_in_flight(t.lab.now, CLIENT_PORT, &f),
        Some(2 * pair)
    );
    // A packet meanwhile reaches the worker, which forwards it and does not publish the
    // flow again.
    let f = FastLab::backend_data(&mut conn, 30);
    assert!(t.xdp.forward(t.lab.now, BACKEND_PORT, &f).is_none());
    let (port, _) = t.lab.forward(BACKEND_PORT, f);
    assert_eq!(port, CLIENT_PORT);
    assert_eq!(t.pair(), Some(pair));
    assert_eq!(t.xdp.words(2 * pair)[line::STATE] & STATE_FAST, 0);
    assert_eq!(t.xdp.words(2 * pair + 1)[line::STATE] & STATE_FAST, 0);

    // Without a grace the flow waits, a tick at a time.
    t.lab.advance(5 * MS);
    assert!(t.lab.emitted.is_empty());
    assert_eq!(t.lab.engine.flow_count(), 1);
    let waits = t.counters().fast_grace_waits;
    assert!(waits >= 1, "{waits}");
    // One round is not a grace.
    t.grace.advance();
    t.lab.advance(2 * MS);
    assert!(t.lab.emitted.is_empty());
    assert!(t.counters().fast_grace_waits > waits);
    t.grace.advance();
    t.lab.advance(2 * MS);
    assert_eq!(t.lab.engine.flow_count(), 0);
    assert_eq!(
        t.lab.emitted,
        conn.expected_idle_rsts(80).to_vec(),
        "exact RSTs: the in-flight commit and the worker's segment included"
    );
    let p = &t.lab.engine.drain_progress()[0];
    assert_eq!(
        (p.flows_left, p.flows_reset, p.flows_ended, p.deadline_done),
        (Some(0), 1, 0, true),
        "{p:?}"
    );
    assert!(!t.lab.engine.is_fast_published(id));
    assert_eq!(t.lab.engine.fast_published(), 0);
    assert_eq!(
        t.xdp.find(CLIENT, VIP, 40_030, 80, 6),
        None,
        "keys tombstoned"
    );
    assert_eq!(t.counters().rsts_sent, 2);
}

#[test]
fn undraining_while_a_fast_flow_waits_for_its_grace_calls_its_end_off() {
    let mut t = FastLab::new(16);
    let mut conn = establish(&mut t.lab, 80, 40_031);
    let start = t.lab.now;
    let rules = drain_rules(&t.lab, conn.backend_ip, Some(10), start);
    t.lab.engine.set_rules(rules);
    t.lab.advance_to(start + secs(10));
    let pair = t.pair().expect("still published, FAST cleared");
    assert_eq!(t.xdp.words(2 * pair)[line::STATE] & STATE_FAST, 0);
    // The operator undrains before the grace has passed.
    let rules = drain_rules(&t.lab, conn.backend_ip, None, start);
    t.lab.engine.set_rules(rules);
    t.run_with_grace(start + secs(10) + 10 * MS);
    assert!(t.lab.emitted.is_empty());
    assert_eq!(t.lab.engine.flow_count(), 1, "lives on");
    assert_eq!(t.pair(), None, "withdrawn");
    // Its next packet publishes it again.
    conn.client_sends(&mut t.lab, b"again");
    assert!(t.pair().is_some());
    let f = FastLab::client_data(&mut conn, 10);
    assert!(t.xdp.forward(t.lab.now, CLIENT_PORT, &f).is_some());
}

#[test]
fn a_fast_flow_that_starts_closing_while_its_drain_end_waits_is_ended_without_rsts() {
    let mut t = FastLab::new(16);
    let conn = establish(&mut t.lab, 80, 40_032);
    let start = t.lab.now;
    let rules = drain_rules(&t.lab, conn.backend_ip, Some(10), start);
    t.lab.engine.set_rules(rules);
    t.lab.advance_to(start + secs(10));
    let pair = t.pair().expect("still published, FAST cleared");
    // The client closes before the grace has passed: through the worker, which keeps the
    // pair (no withdrawal, no FAST) until the end is decided.
    let fin = conn.client.seg(ACK | FIN, conn.c_seq, conn.s_seq, &[]);
    assert!(t.xdp.forward(t.lab.now, CLIENT_PORT, &fin).is_none());
    let (port, _) = t.lab.forward(CLIENT_PORT, fin);
    assert_eq!(port, BACKEND_PORT);
    assert_eq!(t.pair(), Some(pair));
    assert_eq!(t.xdp.words(2 * pair)[line::STATE] & STATE_FAST, 0);
    assert_eq!(t.lab.engine.flow_count(), 1);
    // As a census round ends a closing flow: silently.
    t.run_with_grace(start + secs(10) + 10 * MS);
    assert!(t.lab.emitted.is_empty(), "a closing flow gets no RST");
    assert_eq!(t.lab.engine.flow_count(), 0);
    assert_eq!(t.lab.engine.fast_published(), 0);
    let p = &t.lab.engine.drain_progress()[0];
    assert_eq!(
        (p.flows_reset, p.flows_ended, p.deadline_done),
        (0, 1, true),
        "{p:?}"
    );
}

#[test]
fn a_fast_flow_a_peer_takes_over_while_its_drain_end_waits_is_not_reset_here() {
    let mut t = FastLab::new(16);
    let conn = establish(&mut t.lab, 80, 40_033);
    let id = t.only_flow().id;
    let start = t.lab.now;
    let rules = drain_rules(&t.lab, conn.backend_ip, Some(10), start);
    t.lab.engine.set_rules(rules);
    t.lab.advance_to(start + secs(10));
    assert!(t.pair().is_some(), "still published, FAST cleared");
    // A cluster peer's state of the flow, later than this node's: a standby copy from now
    // on, whose owner ends it.
    let mut state = t.lab.engine.export_flow(t.lab.now, id).unwrap();
    state.idle = 0;
    t.lab.advance(MS / 2);
    assert_eq!(
        t.lab.engine.import_standby(t.lab.now, &state).unwrap(),
        xlb_engine::Imported::Refreshed(id)
    );
    assert_eq!(t.pair(), None, "a standby copy is never fast");
    t.run_with_grace(start + secs(10) + 10 * MS);
    assert!(t.lab.emitted.is_empty());
    assert_eq!(t.lab.engine.flow_count(), 1);
    let p = &t.lab.engine.drain_progress()[0];
    assert_eq!((p.flows_reset, p.deadline_done), (0, true), "{p:?}");
}
#[test]
fn a_flow_only_xdp_forwards_is_still_refreshed_at_the_cluster_peers() {
    let mut t = FastLab::new(16);
    t.lab.engine.enable_sync(64);
    let mut conn = establish(&mut t.lab, 80, 40_031);
    let refreshes = |t: &mut FastLab| {
        let mut n = 0;
        // Two whole passes over the slots: the refresh looks at packets since the previous
        // pass began.
        let slots = t.lab.engine.flow_capacity();
        for _ in 0..2 {
            t.lab.engine.sync_export(t.lab.now, 64, slots, |why, _| {
                if why == xlb_engine::SyncReason::Refresh {
                    n += 1;
                }
            });
        }
        n
    };
    t.run_with_grace(T0 + secs(1));
    refreshes(&mut t);
    t.run_with_grace(T0 + secs(30));
    assert_eq!(refreshes(&mut t), 0, "no packet since: nothing to refresh");
    // A minute of traffic the worker never sees.
    t.run_with_grace(T0 + secs(60));
    let f = FastLab::client_data(&mut conn, 100);
    assert!(t.xdp.forward(t.lab.now, CLIENT_PORT, &f).is_some());
    t.run_with_grace(T0 + secs(61));
    assert!(
        refreshes(&mut t) >= 1,
        "the time XDP recorded makes the flow fresh"
    );
}
