//! Target: one worker's engine fed multi-packet TCP and UDP sessions in virtual time.
//!
//! The input is a program: a setup byte (table size, worker share), then operations — honest
//! TCP segments from either end of a session (a small endpoint model that keeps sequence
//! numbers, acknowledgements and the window right), spoofed segments with any flags, sequence,
//! acknowledgement, length, window and ingress port, UDP datagrams both ways, SYN and UDP floods
//! from spoofed sources, replays of recent frames with bytes flipped, raw frames, jumps of
//! virtual time followed by expiry (whole or with a small budget), rule-set swaps and long
//! quiet periods. Sessions cover load balancing (reset on idle, `pickup`, `reset` policy, IPv6,
//! UDP), inbound NAT and outbound SNAT (TCP and UDP), both directions.
//!
//! Invariants checked after every packet and operation (a failed one panics, which the fuzzer
//! reports as a crash):
//! - every frame gets exactly one verdict and exactly one counter moves (`tx_packets` for a
//!   transmit, the drop reason for a drop);
//! - a transmitted frame is no longer than the received one, reads as TCP/UDP, parses, and has
//!   valid checksums whenever the received frame had (or carried a partial checksum); a
//!   forwarded segment keeps its flags, sequence and acknowledgement numbers and payload, and
//!   its hop limit drops by one;
//! - the flow table never holds more than its capacity; SNAT ports in use never exceed the
//!   worker's share; after a quiet period longer than every timeout, no flow and no SNAT port
//!   is left;
//! - every RST that reset on idle emits belongs to an established flow, and its sequence and
//!   acknowledgement numbers are ones its endpoints actually reached (never invented); for a
//!   session that only ever carried honest segments, they are exactly the numbers each end
//!   expects next.
//!
//! The harness drives the engine through its public API only (`process`, `expire`, `flows`,
//! `counters`, `set_rules`, `owner`, `snat_usage`), so it survives changes to the internals.

use std::collections::HashMap;
use std::net::IpAddr;

use xlb_engine::time::{mins, secs, Nanos, NANOS_PER_MILLI};
use xlb_engine::wire::{self, L4Checksum};
use xlb_engine::{DropReason, Engine, EngineConfig, Event, FlowInfo, PortId, Route, Verdict};

use crate::frames::{self, flags::*, Endpoints, *};
use crate::input::Input;
use crate::lab;
use crate::verify::{self, Frame};

/// Virtual time starts here (not zero, to catch code that assumes it).
const T0: Nanos = 1_000 * 1_000_000_000;
/// Operations per input: inputs stay small and fast.
const MAX_OPS: usize = 256;
/// Sessions per kind.
const PER_KIND: usize = 4;
/// Frames kept for replays.
const RECENT: usize = 8;

/// Operation codes (the first byte of each operation, modulo [`OPS`]).
pub mod op {
    pub const HONEST_TCP: u8 = 0;
    pub const SPOOF_TCP: u8 = 1;
    pub const UDP: u8 = 2;
    pub const ADVANCE: u8 = 3;
    pub const SWAP_RULES: u8 = 4;
    pub const RAW: u8 = 5;
    pub const REPLAY: u8 = 6;
    pub const FLOOD: u8 = 7;
    pub const QUIET: u8 = 8;
    pub const OPS: u8 = 9;
}

/// What a session is: which rule its packets hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Load balancing, TCP :80, reset on idle, unknown flows dropped.
    Http,
    /// Load balancing, TCP :81, `pickup`.
    Pickup,
    /// Load balancing, TCP :82, `reset` policy.
    ResetPolicy,
    /// Inbound NAT, TCP :2201 to member 1 port 22.
    Nat,
    /// Load balancing over IPv6, TCP :80.
    Http6,
    /// Outbound SNAT, a member's TCP connection to the internet.
    SnatTcp,
    /// Load balancing, UDP :53.
    Dns,
    /// Outbound SNAT, a member's UDP flow to the internet.
    SnatUdp,
}

pub const TCP_KINDS: [Kind; 6] = [
    Kind::Http,
    Kind::Pickup,
    Kind::ResetPolicy,
    Kind::Nat,
    Kind::Http6,
    Kind::SnatTcp,
];
pub const UDP_KINDS: [Kind; 2] = [Kind::Dns, Kind::SnatUdp];

impl Kind {
    fn index(self) -> usize {
        self as usize
    }

    fn is_snat(self) -> bool {
        matches!(self, Kind::SnatTcp | Kind::SnatUdp)
    }

    /// The initiating end of session `idx`, and the port it arrives on.
    fn client(self, idx: usize) -> (Endpoints, PortId) {
        let i = idx as u16;
        let inbound = |dport: u16| Endpoints {
            src_mac: CLIENT_MAC,
            dst_mac: XLB_MAC[CLIENT_PORT as usize],
            src: CLIENT.into(),
            sport: 40_000 + i,
            dst: VIP.into(),
            dport,
        };
        let member = if idx.is_multiple_of(2) {
            (B1, B1_MAC)
        } else {
            (B2, B2_MAC)
        };
        let outbound = |dport: u16| Endpoints {
            src_mac: member.1,
            dst_mac: XLB_MAC[BACKEND_PORT as usize],
            src: member.0.into(),
            sport: 50_000 + i,
            dst: REMOTE.into(),
            dport,
        };
        match self {
            Kind::Http => (inbound(80), CLIENT_PORT),
            Kind::Pickup => (inbound(81), CLIENT_PORT),
            Kind::ResetPolicy => (inbound(82), CLIENT_PORT),
            Kind::Nat => (inbound(2201), CLIENT_PORT),
            Kind::Http6 => (
                Endpoints {
                    src: CLIENT6.into(),
                    dst: VIP6.into(),
                    ..inbound(80)
                },
                CLIENT_PORT,
            ),
            Kind::Dns => (inbound(53), CLIENT_PORT),
            Kind::SnatTcp => (outbound(443), BACKEND_PORT),
            Kind::SnatUdp => (outbound(53), BACKEND_PORT),
        }
    }

    /// The answering end before an output frame showed where the flow went: the first member,
    /// or the first SNAT port.
    fn guessed_server(self, idx: usize) -> (Endpoints, PortId) {
        let (c, _) = self.client(idx);
        if self.is_snat() {
            let e = Endpoints {
                src_mac: NET_MAC,
                dst_mac: XLB_MAC[INTERNET_PORT as usize],
                src: c.dst,
                sport: c.dport,
                dst: SNAT_IP.into(),
                dport: 1024,
            };
            return (e, INTERNET_PORT);
        }
        let (backend, port): (IpAddr, u16) = match self {
            Kind::Http6 => (B6.into(), 8080),
            Kind::Nat => (B1.into(), 22),
            Kind::Dns => (B1.into(), 5353),
            _ => (B1.into(), 8080),
        };
        let e = Endpoints {
            src_mac: B1_MAC,
            dst_mac: XLB_MAC[BACKEND_PORT as usize],
            src: backend,
            sport: port,
            dst: c.src,
            dport: c.sport,
        };
        (e, BACKEND_PORT)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Stage {
    #[default]
    Idle,
    SynSent,
    SynAcked,
    Open,
}

/// The endpoint model of one session. Index 0 is the client (initiator), 1 the server.
#[derive(Clone, Copy, Debug, Default)]
struct Session {
    stage: Stage,
    /// The next sequence number each end sends.
    next: [u32; 2],
    /// The highest acknowledgement each end's data has received (bounds data in flight).
    acked: [u32; 2],
    fin: [bool; 2],
    /// The engine created this session's flow from its SYN and has seen only honest segments
    /// of it since, all forwarded: its tracked sequence numbers must equal `next`.
    clean: bool,
    /// The server end as the engine's output showed it (backend chosen, SNAT port).
    server: Option<(Endpoints, PortId)>,
}

type Tuple = (IpAddr, u16, IpAddr, u16);

fn tuple_of(e: &Endpoints) -> Tuple {
    (e.src, e.sport, e.dst, e.dport)
}

fn frame_tuple(f: &Frame) -> Tuple {
    (f.src, f.sport, f.dst, f.dport)
}

fn flow_tuple(t: &xlb_engine::ruleset::FlowTuple) -> Tuple {
    (t.src.to_ip(), t.src_port, t.dst.to_ip(), t.dst_port)
}

fn reversed((a, ap, b, bp): Tuple) -> Tuple {
    (b, bp, a, ap)
}

/// Sequence-space values each sender reached: segment ends and acknowledgements it sent.
#[derive(Debug, Default)]
struct Reached {
    ends: Vec<u32>,
    acks: Vec<u32>,
}

fn segment_end(f: &Frame) -> u32 {
    f.seq
        .wrapping_add(f.payload_len as u32)
        .wrapping_add(u32::from(f.flags & SYN != 0))
        .wrapping_add(u32::from(f.flags & FIN != 0))
}

/// What one run exercised, so that tests can check that the seeds reach the paths they are
/// meant to (a harness that never gets a connection established checks nothing).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub packets: u64,
    pub transmitted: u64,
    /// Idle RSTs checked, and those checked exactly against a clean session's numbers.
    pub idle_rsts: u64,
    pub exact_rsts: u64,
    /// New flows that met a full table: refused, or admitted by evicting an unconfirmed one.
    pub flow_table_full: u64,
    pub snat_exhausted: u64,
    pub reset_policy_answers: u64,
    pub picked_up: u64,
    pub quiet_periods: u64,
}

struct Harness {
    stats: Stats,
    engine: Engine,
    now: Nanos,
    sessions: [[Session; PER_KIND]; 8],
    reached: HashMap<Tuple, Reached>,
    recent: Vec<(PortId, Vec<u8>)>,
    recent_next: usize,
}

/// Runs one input. Panics when an invariant breaks.
pub fn run(data: &[u8]) {
    run_with_stats(data);
}

/// [`run`], returning what the input exercised.
pub fn run_with_stats(data: &[u8]) -> Stats {
    let mut input = Input::new(data);
    let setup = input.u8();
    let capacity = [8, 32, 256][usize::from(setup % 3)];
    let workers = 1 + u16::from((setup >> 2) & 1);
    let cfg = EngineConfig {
        worker: u16::from((setup >> 3) & 1) % workers,
        workers,
        flow_capacity: capacity,
        next_hop_capacity: 32,
        late_slots: 64,
        event_capacity: 4,
        ..EngineConfig::default()
    };
    let mut h = Harness::new(cfg);
    let mut ops = 0;
    while !input.is_empty() && ops < MAX_OPS {
        ops += 1;
        h.step(&mut input);
        h.check_table();
    }
    let c = h.engine.counters();
    let rules = c.rules.iter();
    // A full table shows as refusals, or as evictions of unconfirmed flows (admission).
    h.stats.flow_table_full =
        c.drop_count(DropReason::FlowTableFull) + c.evictions.iter().sum::<u64>();
    h.stats.snat_exhausted = c.drop_count(DropReason::SnatExhausted);
    h.stats.reset_policy_answers = rules.clone().map(|r| r.unknown_flow_resets).sum();
    h.stats.picked_up = rules.map(|r| r.flows_picked_up).sum();
    h.stats
}

impl Harness {
    fn new(cfg: EngineConfig) -> Harness {
        let mut engine = Engine::new(cfg, lab::base_rules(), T0);
        let net = engine.next_hops();
        for (i, mac) in XLB_MAC.iter().enumerate() {
            net.set_port(i as PortId, *mac);
        }
        // The members sit behind the backend port: only there may they open outbound flows.
        net.set_backend_side(BACKEND_PORT, true);
        net.set_routes(vec![
            Route::v4([198, 18, 0, 0].into(), 24, CLIENT_PORT, None),
            Route::v4([198, 18, 1, 0].into(), 24, BACKEND_PORT, None),
            Route::v4([198, 19, 0, 0].into(), 24, INTERNET_PORT, None),
            Route::v6(CLIENT6, 64, CLIENT_PORT, None),
            Route::v6(B6, 64, BACKEND_PORT, None),
        ]);
        let neighbours = [
            (IpAddr::from(B1), BACKEND_PORT, B1_MAC),
            (B2.into(), BACKEND_PORT, B2_MAC),
            (B6.into(), BACKEND_PORT, B1_MAC),
            (REMOTE.into(), INTERNET_PORT, NET_MAC),
            (CLIENT.into(), CLIENT_PORT, CLIENT_MAC),
        ];
        for (addr, port, mac) in neighbours {
            net.set_neighbor(addr.into(), port, mac)
                .expect("room for the lab's neighbours");
        }
        Harness {
            stats: Stats::default(),
            engine,
            now: T0,
            sessions: [[Session::default(); PER_KIND]; 8],
            reached: HashMap::new(),
            recent: Vec::with_capacity(RECENT),
            recent_next: 0,
        }
    }

    fn step(&mut self, input: &mut Input) {
        match input.u8() % op::OPS {
            op::HONEST_TCP => {
                let (s, side, action) = (input.u8(), input.bool(), input.u8());
                let (len, isn) = (input.u16(), input.u32());
                let kind = TCP_KINDS[usize::from(s) % TCP_KINDS.len()];
                let idx = usize::from(s / 8) % PER_KIND;
                self.honest_tcp(kind, idx, usize::from(side), action, len, isn);
            }
            op::SPOOF_TCP => {
                let (s, side, fl, mode) = (input.u8(), input.bool(), input.u8(), input.u8());
                let (seq, ack, len, ingress) = (input.u32(), input.u32(), input.u16(), input.u8());
                let kind = TCP_KINDS[usize::from(s) % TCP_KINDS.len()];
                let idx = usize::from(s / 8) % PER_KIND;
                self.spoof_tcp(
                    kind,
                    idx,
                    usize::from(side),
                    fl,
                    mode,
                    seq,
                    ack,
                    len,
                    ingress,
                );
            }
            op::UDP => {
                let (s, side, len) = (input.u8(), input.bool(), input.u16());
                let kind = UDP_KINDS[usize::from(s) % UDP_KINDS.len()];
                let idx = usize::from(s / 8) % PER_KIND;
                self.udp(kind, idx, usize::from(side), len);
            }
            op::ADVANCE => {
                let (step, budget, raw) = (input.u8(), input.u8(), input.u16());
                let d = match step % 12 {
                    0 => NANOS_PER_MILLI,
                    1 => 100 * NANOS_PER_MILLI,
                    2 => secs(1),
                    3 => secs(2) + NANOS_PER_MILLI,
                    4 => secs(15) + NANOS_PER_MILLI,
                    5 => secs(31),
                    6 => secs(61),
                    7 => mins(4) + secs(1),
                    8 => mins(10),
                    9 => mins(31),
                    10 => u64::from(raw) * NANOS_PER_MILLI,
                    _ => secs(u64::from(raw)),
                };
                let budget = (budget & 0x80 != 0).then_some(usize::from(budget & 0x0f) + 1);
                self.advance(d, budget);
            }
            op::SWAP_RULES => {
                self.engine.set_rules(lab::variant(input.u8()));
            }
            op::RAW => {
                let ingress = PortId::from(input.u8() % 3);
                let len = usize::from(input.u8());
                let frame = input.bytes(len).to_vec();
                self.send(ingress, frame, None);
            }
            op::REPLAY => {
                let (which, ingress, cut) = (input.u8(), input.u8(), input.u8());
                let flips: Vec<(u16, u8)> = (0..input.u8() % 5)
                    .map(|_| (input.u16(), input.u8()))
                    .collect();
                self.replay(which, ingress, cut, &flips);
            }
            op::FLOOD => {
                let (k, count, salt) = (input.u8(), input.u8(), input.u16());
                self.flood(k, count % 65, salt);
            }
            _ => self.quiet(),
        }
    }

    fn session(&mut self, kind: Kind, idx: usize) -> &mut Session {
        &mut self.sessions[kind.index()][idx]
    }

    fn server(&self, kind: Kind, idx: usize) -> (Endpoints, PortId) {
        self.sessions[kind.index()][idx]
            .server
            .unwrap_or_else(|| kind.guessed_server(idx))
    }

    /// The end `side` of a session (0 client, 1 server) and the port its frames arrive on.
    fn end(&self, kind: Kind, idx: usize, side: usize) -> (Endpoints, PortId) {
        if side == 0 {
            kind.client(idx)
        } else {
            self.server(kind, idx)
        }
    }

    /// One honest segment: what a correct TCP end would send next.
    fn honest_tcp(&mut self, kind: Kind, idx: usize, side: usize, action: u8, len: u16, isn: u32) {
        let other = 1 - side;
        let mut s = *self.session(kind, idx);
        if s.stage == Stage::Open && s.fin == [true, true] && side == 0 {
            // The connection is over: the client opens a new one on the same tuple.
            s = Session::default();
        }
        let (fl, seq, ack, payload_len) = match (s.stage, side) {
            (Stage::Idle, 0) => {
                s = Session {
                    stage: Stage::SynSent,
                    next: [isn.wrapping_add(1), 0],
                    acked: [isn.wrapping_add(1), 0],
                    ..Session::default()
                };
                (SYN, isn, 0, 0)
            }
            (Stage::Idle, _) => return,
            (Stage::SynSent, 0) => (SYN, s.next[0].wrapping_sub(1), 0, 0),
            (Stage::SynSent, _) => {
                s.stage = Stage::SynAcked;
                s.next[1] = isn.wrapping_add(1);
                s.acked = [s.next[0], s.next[1]];
                (SYN | ACK, isn, s.next[0], 0)
            }
            (Stage::SynAcked, 0) => {
                s.stage = Stage::Open;
                (ACK, s.next[0], s.next[1], 0)
            }
            (Stage::SynAcked, _) => (SYN | ACK, s.next[1].wrapping_sub(1), s.next[0], 0),
            (Stage::Open, _) => {
                let (seq, ack) = (s.next[side], s.next[other]);
                s.acked[other] = s.next[other];
                match action % 6 {
                    0 | 5 if !s.fin[side] => {
                        let in_flight = s.next[side].wrapping_sub(s.acked[side]);
                        let room = u32::from(WINDOW).saturating_sub(in_flight);
                        let n = u32::from(len % 1461).min(room);
                        s.next[side] = seq.wrapping_add(n);
                        let psh = if action % 6 == 5 { PSH } else { 0 };
                        (ACK | psh, seq, ack, n as usize)
                    }
                    2 => (ACK, seq.wrapping_sub(1), ack, usize::from(len & 1)),
                    3 if !s.fin[side] => {
                        s.fin[side] = true;
                        s.next[side] = seq.wrapping_add(1);
                        (FIN | ACK, seq, ack, 0)
                    }
                    4 => (RST | ACK, seq, ack, 0),
                    _ => (ACK, seq, ack, 0),
                }
            }
        };
        let (e, ingress) = self.end(kind, idx, side);
        let payload = vec![action; payload_len];
        let Some(frame) = frames::tcp(&e, fl, seq, ack, WINDOW, &payload) else {
            return;
        };
        let created_before = self.flows_created();
        let (verdict, out) = self.send(ingress, frame, Some((kind, idx)));
        let created = self.flows_created() > created_before;
        match verdict {
            Verdict::Tx { port, .. } if port != ingress => {
                if fl == SYN && side == 0 {
                    // The SYN made a fresh flow (not a segment of one still lingering).
                    s.clean = created;
                }
                if side == 0 {
                    s.server = learned_server(&out, port).or(s.server);
                }
            }
            Verdict::Tx { .. } => {
                // Answered where it came from: the `reset` policy's RST. The connection is over.
                s = Session::default();
            }
            Verdict::Drop(DropReason::NoFlow) => s = Session::default(),
            Verdict::Drop(_) => s.clean = false,
        }
        if fl & RST != 0 {
            s = Session::default();
        }
        *self.session(kind, idx) = s;
    }

    /// A segment an attacker (or a broken stack) sends into a session: any flags, sequence and
    /// acknowledgement relative to the session's or absolute, any length and window, from the
    /// session's ingress port or another.
    #[allow(clippy::too_many_arguments)]
    fn spoof_tcp(
        &mut self,
        kind: Kind,
        idx: usize,
        side: usize,
        fl: u8,
        mode: u8,
        seq_v: u32,
        ack_v: u32,
        len: u16,
        ingress: u8,
    ) {
        let s = self.sessions[kind.index()][idx];
        let (mine, theirs) = (s.next[side], s.next[1 - side]);
        let seq = match mode % 4 {
            0 => mine,
            1 => mine.wrapping_add(seq_v),
            2 => seq_v,
            _ => mine.wrapping_sub(1 + seq_v % 4),
        };
        let ack = match (mode >> 2) % 3 {
            0 => theirs,
            1 => theirs.wrapping_add(ack_v),
            _ => ack_v,
        };
        let window = if mode & 0x40 != 0 { len } else { WINDOW };
        let (e, port) = self.end(kind, idx, side);
        let port = match (mode >> 4) & 3 {
            0 => port,
            _ => PortId::from(ingress % 3),
        };
        let payload = vec![0x5a; usize::from(len % 1500)];
        if let Some(frame) = frames::tcp(&e, fl, seq, ack, window, &payload) {
            self.send(port, frame, None);
        }
    }

    fn udp(&mut self, kind: Kind, idx: usize, side: usize, len: u16) {
        let (e, ingress) = self.end(kind, idx, side);
        let payload = vec![0x17; usize::from(len % 600)];
        let Some(frame) = frames::udp(&e, &payload) else {
            return;
        };
        let (verdict, out) = self.send(ingress, frame, None);
        if let (0, Verdict::Tx { port, .. }) = (side, verdict) {
            let learned = learned_server(&out, port);
            let s = self.session(kind, idx);
            s.server = learned.or(s.server);
        }
    }

    /// `count` flow-creating packets from spoofed sources (or, for SNAT kinds, from members'
    /// fresh ports): fills the table, exhausts SNAT ports.
    fn flood(&mut self, k: u8, count: u8, salt: u16) {
        let all = [TCP_KINDS.as_slice(), UDP_KINDS.as_slice()].concat();
        let kind = all[usize::from(k) % all.len()];
        for i in 0..u16::from(count) {
            let (mut e, ingress) = kind.client(usize::from(i % 2));
            e.sport = 1024 + salt.wrapping_add(i.wrapping_mul(7)) % 60_000;
            if !kind.is_snat() {
                e.src = match e.src {
                    IpAddr::V4(_) => IpAddr::from([198, 18, 0, 128 + (i % 100) as u8]),
                    IpAddr::V6(_) => {
                        IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0x66, i.wrapping_add(salt)])
                    }
                };
            }
            let frame = if UDP_KINDS.contains(&kind) {
                frames::udp(&e, b"flood")
            } else {
                frames::tcp(&e, SYN, u32::from(i) * 7919, 0, WINDOW, &[])
            };
            if let Some(f) = frame {
                self.send(ingress, f, None);
            }
        }
    }

    fn replay(&mut self, which: u8, ingress: u8, cut: u8, flips: &[(u16, u8)]) {
        if self.recent.is_empty() {
            return;
        }
        let (port, mut frame) = self.recent[usize::from(which) % self.recent.len()].clone();
        for &(pos, x) in flips {
            if !frame.is_empty() {
                let i = usize::from(pos) % frame.len();
                frame[i] ^= x;
            }
        }
        if cut & 0x80 != 0 {
            frame.truncate(usize::from(cut & 0x7f));
        }
        let port = if ingress & 0x80 != 0 {
            PortId::from(ingress % 3)
        } else {
            port
        };
        self.send(port, frame, None);
    }

    /// Time passes with no packet for longer than every timeout: every flow must be gone and
    /// every SNAT port free.
    fn quiet(&mut self) {
        self.advance(secs(lab::LONGEST_TIMEOUT_SECS) + mins(1), None);
        assert_eq!(self.engine.flow_count(), 0, "flows outlived every timeout");
        assert_eq!(self.engine.flows().count(), 0);
        for (member, proto) in snat_members() {
            if let Some((_, blocks)) = self.engine.rules().match_outbound(proto, member.into()) {
                let (used, _) = self.engine.snat_usage(blocks, proto);
                assert_eq!(used, 0, "SNAT ports of {member} leaked ({proto})");
            }
        }
        self.sessions = [[Session::default(); PER_KIND]; 8];
        self.stats.quiet_periods += 1;
    }

    fn flows_created(&self) -> u64 {
        self.engine
            .counters()
            .rules
            .iter()
            .map(|r| r.flows_created)
            .sum()
    }

    /// Processes one frame and checks what came out. `honest` names the session an honest
    /// segment belongs to; any other frame that hits a session's tuple makes it unclean.
    fn send(
        &mut self,
        ingress: PortId,
        mut frame: Vec<u8>,
        honest: Option<(Kind, usize)>,
    ) -> (Verdict, Vec<u8>) {
        let input = verify::read(&frame);
        let partial = wire::parse(&frame).is_ok_and(|p| p.l4_csum == L4Checksum::Partial);
        if let Some(f) = &input {
            if f.proto == verify::TCP {
                let r = self.reached.entry(frame_tuple(f)).or_default();
                if r.ends.len() < 4096 {
                    r.ends.push(segment_end(f));
                    r.acks.push(f.ack);
                }
            }
            self.mark_unclean(frame_tuple(f), honest);
        }
        if self.recent.len() < RECENT {
            self.recent.push((ingress, frame.clone()));
        } else {
            self.recent[self.recent_next] = (ingress, frame.clone());
        }
        self.recent_next = (self.recent_next + 1) % RECENT;

        // Read-only entry points take any frame.
        let _ = self.engine.owner(&frame);
        let _ = self.engine.prefetch_addr(&frame, 0);
        let hint = self.engine.lookahead(&frame);
        if let Some(h) = &hint {
            let _ = self.engine.lookahead_addr(h, 1);
        }

        let before = self.engine.counters().clone();
        let len = frame.len();
        // As xlbd's worker processes a frame the look-ahead read.
        let verdict = self
            .engine
            .process_hinted(self.now, ingress, &mut frame, len, hint.as_ref());
        self.stats.packets += 1;
        self.stats.transmitted += u64::from(matches!(verdict, Verdict::Tx { .. }));
        let after = self.engine.counters();
        assert_eq!(after.rx_packets, before.rx_packets + 1);
        match verdict {
            Verdict::Tx { port, len: out_len } => {
                assert!(usize::from(out_len) <= len, "a transmitted frame grew");
                assert!(port < 3, "transmit on port {port}, which the lab lacks");
                assert_eq!(after.tx_packets, before.tx_packets + 1);
                assert_eq!(after.total_drops(), before.total_drops());
                frame.truncate(usize::from(out_len));
                check_output(&frame, input.as_ref(), partial);
            }
            Verdict::Drop(reason) => {
                assert_eq!(after.tx_packets, before.tx_packets);
                assert_eq!(after.total_drops(), before.total_drops() + 1);
                assert_eq!(after.drop_count(reason), before.drop_count(reason) + 1);
            }
        }
        assert!(self.engine.flow_count() <= self.engine.flow_capacity() as usize);
        self.drain_events();
        (verdict, frame)
    }

    fn mark_unclean(&mut self, t: Tuple, honest: Option<(Kind, usize)>) {
        for kind in TCP_KINDS {
            for idx in 0..PER_KIND {
                if honest == Some((kind, idx)) {
                    continue;
                }
                let (c, _) = kind.client(idx);
                let s = &mut self.sessions[kind.index()][idx];
                let server = s.server.map(|(e, _)| tuple_of(&e));
                if t == tuple_of(&c) || Some(t) == server {
                    s.clean = false;
                }
            }
        }
    }

    fn drain_events(&mut self) {
        let cap = self.engine.config().event_capacity;
        let mut n = 0;
        self.engine.drain_events(|e| {
            n += 1;
            match e {
                Event::ResetOnIdle { .. } | Event::SnatExhausted { .. } => {}
            }
        });
        assert!(n <= cap, "more events than the queue holds");
    }

    /// Advances virtual time by `d` and runs expiry: until nothing is left to do, or once with
    /// `budget`.
    fn advance(&mut self, d: Nanos, budget: Option<usize>) {
        self.now += d;
        let snapshot: Vec<FlowInfo> = self.engine.flows().collect();
        let before = self.engine.counters().clone();
        let mut emitted: Vec<(PortId, Vec<u8>)> = Vec::new();
        let now = self.now;
        match budget {
            Some(b) => {
                self.engine
                    .expire(now, b, &mut |p, f| emitted.push((p, f.to_vec())));
            }
            None => {
                let mut rounds = 0;
                while self
                    .engine
                    .expire(now, 1024, &mut |p, f| emitted.push((p, f.to_vec())))
                    > 0
                {
                    rounds += 1;
                    assert!(rounds < 10_000, "expiry never finishes");
                }
                if let Some(next) = self.engine.next_deadline() {
                    assert!(next > now, "expiry finished with work due");
                }
            }
        }
        let after = self.engine.counters();
        let n = emitted.len() as u64;
        assert_eq!(after.rsts_sent - before.rsts_sent, n);
        assert_eq!(after.tx_packets - before.tx_packets, n);
        assert_eq!(after.rx_packets, before.rx_packets);
        for (port, frame) in &emitted {
            assert!(*port < 3);
            self.check_idle_rst(frame, &snapshot);
        }
        self.drain_events();
    }

    /// An RST of reset on idle: well formed, for an established flow of the snapshot, with
    /// numbers its endpoints reached — exactly the expected ones for a clean session.
    fn check_idle_rst(&mut self, frame: &[u8], snapshot: &[FlowInfo]) {
        self.stats.idle_rsts += 1;
        let o = verify::read(frame).expect("an idle RST reads as TCP");
        assert!(o.checksums_ok(), "idle RST with a bad checksum");
        assert!(
            wire::parse(frame).is_ok(),
            "idle RST the engine cannot parse"
        );
        assert_eq!(o.flags & RST, RST, "idle frame without RST");
        let t = frame_tuple(&o);
        let (f, toward_client) = snapshot
            .iter()
            .find_map(|f| {
                if t == reversed(flow_tuple(&f.orig)) {
                    Some((f, true))
                } else if t == flow_tuple(&f.translated) {
                    Some((f, false))
                } else {
                    None
                }
            })
            .expect("an idle RST for a flow the table did not hold");
        assert_eq!(
            f.tcp_state,
            Some(xlb_engine::tcp::TcpState::Established),
            "idle RST for a flow that was not established"
        );
        assert!(
            !self
                .engine
                .flows()
                .any(|g| g.id == f.id && g.orig == f.orig),
            "a reset flow is still in the table"
        );
        // The sender of the RST's direction and its peer, as frames arrive at xlb.
        let orig = flow_tuple(&f.orig);
        let reply = reversed(flow_tuple(&f.translated));
        let (sender, peer) = if toward_client {
            (reply, orig)
        } else {
            (orig, reply)
        };
        let empty = Reached::default();
        let s = self.reached.get(&sender).unwrap_or(&empty);
        let p = self.reached.get(&peer).unwrap_or(&empty);
        assert!(
            s.ends.contains(&o.seq) || p.acks.contains(&o.seq),
            "idle RST seq {} was never reached by its sender",
            o.seq
        );
        assert!(
            p.ends.contains(&o.ack) || s.acks.contains(&o.ack),
            "idle RST ack {} was never reached by its peer",
            o.ack
        );
        for kind in TCP_KINDS {
            for idx in 0..PER_KIND {
                let (c, _) = kind.client(idx);
                if tuple_of(&c) != orig {
                    continue;
                }
                let sess = &mut self.sessions[kind.index()][idx];
                if sess.clean && sess.stage == Stage::Open && sess.fin == [false, false] {
                    let (seq, ack) = if toward_client {
                        (sess.next[1], sess.next[0])
                    } else {
                        (sess.next[0], sess.next[1])
                    };
                    assert_eq!(
                        (o.seq, o.ack),
                        (seq, ack),
                        "idle RST numbers differ from what the ends expect"
                    );
                    self.stats.exact_rsts += 1;
                }
                // Both ends got an RST: the connection is over.
                if !toward_client {
                    *sess = Session::default();
                }
            }
        }
    }

    fn check_table(&self) {
        let e = &self.engine;
        let n = e.flows().count();
        assert_eq!(n, e.flow_count());
        assert!(n <= e.flow_capacity() as usize);
        for f in e.flows() {
            assert!(f.last_seen <= self.now, "a flow seen in the future");
        }
        for (member, proto) in snat_members() {
            if let Some((_, blocks)) = e.rules().match_outbound(proto, member.into()) {
                let (used, share) = e.snat_usage(blocks, proto);
                assert!(used <= share, "{used} SNAT ports in use, share {share}");
            }
        }
    }
}

fn snat_members() -> [(std::net::Ipv4Addr, u8); 4] {
    [
        (B1, verify::TCP),
        (B1, verify::UDP),
        (B2, verify::TCP),
        (B2, verify::UDP),
    ]
}

/// The server end of a session, from the frame the engine forwarded for its client.
fn learned_server(out: &[u8], port: PortId) -> Option<(Endpoints, PortId)> {
    let o = verify::read(out)?;
    let mut mac = [0u8; 6];
    mac.copy_from_slice(out.get(0..6)?);
    let e = Endpoints {
        src_mac: mac,
        dst_mac: *XLB_MAC.get(usize::from(port))?,
        src: o.dst,
        sport: o.dport,
        dst: o.src,
        dport: o.sport,
    };
    Some((e, port))
}

/// Checks a transmitted frame against the frame that came in.
fn check_output(out: &[u8], input: Option<&Frame>, partial: bool) {
    let o = verify::read(out).expect("a transmitted frame reads as TCP/UDP");
    assert!(
        wire::parse(out).is_ok(),
        "a transmitted frame the engine cannot parse"
    );
    let built_rst = o.flags & RST != 0 && input.is_some_and(|i| i.flags & RST == 0);
    if built_rst {
        assert!(o.checksums_ok(), "an RST answer with a bad checksum");
        return;
    }
    let Some(i) = input else {
        return;
    };
    // The IPv4 header checksum is updated, never recomputed: valid stays valid. The L4 one is
    // updated when complete and completed when partial.
    if i.ip_checksum_ok {
        assert!(
            o.ip_checksum_ok,
            "IPv4 header checksum broken in transit: {i:?} -> {o:?}"
        );
    }
    if i.l4_checksum_ok || partial {
        assert!(
            o.l4_checksum_ok,
            "L4 checksum broken in transit: {i:?} -> {o:?}"
        );
    }
    assert_eq!(o.proto, i.proto);
    assert_eq!(o.is_v6, i.is_v6);
    assert_eq!(
        (o.flags, o.seq, o.ack, o.window, o.payload_len),
        (i.flags, i.seq, i.ack, i.window, i.payload_len),
        "forwarding changed the segment"
    );
    assert_eq!(
        o.hop_limit,
        i.hop_limit - 1,
        "hop limit not decremented once"
    );
}
