//! The XDP fast path (`src/bpf/xlb_fast.h`) through `BPF_PROG_TEST_RUN`: flows are published
//! by writing the shared table through its mapping with the engine's layout and hash, frames
//! are run as if received on the veths of a throwaway namespace, and the frame the program
//! leaves, its action, the table and the counters are checked. Needs root; skips otherwise.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};

use common::*;
use etherparse::PacketBuilder;
use xlb_afxdp::{
    netlink::Netlink, sys, AddrKind, AttachMode, FastRuleCount, FastStats, ModeRequest, XdpProgram,
};
use xlb_engine::{
    fast::{
        fast_hash, init_header, line as w, ports_word, set_enabled, wire_word, FastLayout,
        SLOT_TOMBSTONE, STATE_FAST, STATE_PICKED_UP, STATE_TCP, STATE_WSCALE_SHIFT,
    },
    wire::checksum,
    Addr,
};

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

const CLIENT: [u8; 4] = [198, 18, 1, 2];
const VIP: [u8; 4] = [198, 18, 100, 1];
const BACKEND: [u8; 4] = [198, 18, 2, 2];
const VPORT: u16 = 80;
const BPORT: u16 = 8080;
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x01];
const F0_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x10];
const F1_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x11];
const SERVER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x22];
/// Dataplane port ids of the two interfaces.
const FRONT: u32 = 0;
const BACK: u32 = 1;
const UDP_RULE: u16 = 7;
const TCP_RULE: u16 = 9;
/// A window scale of 7 for both TCP directions.
const WSCALE: u32 = 7;

/// One direction of a published flow.
#[derive(Clone, Copy)]
struct Dir {
    state: u32,
    ingress: u32,
    tx: u32,
    proto: u8,
    rule: u16,
    from: ([u8; 4], u16),
    to: ([u8; 4], u16),
    new_from: ([u8; 4], u16),
    new_to: ([u8; 4], u16),
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    next_seq: u32,
    max_win: u32,
}

impl Dir {
    fn key(&self) -> (u32, u32, u32, u8) {
        (
            wire_word(self.from.0),
            wire_word(self.to.0),
            ports_word(self.from.1, self.to.1),
            self.proto,
        )
    }
}

/// Both directions of a DNAT flow client:`cport` → VIP:80 → backend:8080.
fn dnat(proto: u8, rule: u16, cport: u16, state: u32) -> [Dir; 2] {
    let orig = Dir {
        state,
        ingress: FRONT,
        tx: BACK,
        proto,
        rule,
        from: (CLIENT, cport),
        to: (VIP, VPORT),
        new_from: (CLIENT, cport),
        new_to: (BACKEND, BPORT),
        dst_mac: SERVER_MAC,
        src_mac: F1_MAC,
        next_seq: 1000,
        max_win: 64_000,
    };
    let reply = Dir {
        ingress: BACK,
        tx: FRONT,
        from: (BACKEND, BPORT),
        to: (CLIENT, cport),
        new_from: (VIP, VPORT),
        new_to: (CLIENT, cport),
        dst_mac: CLIENT_MAC,
        src_mac: F0_MAC,
        next_seq: 5000,
        max_win: 1_000_000,
        ..orig
    };
    [orig, reply]
}

/// The program attached to the lab's two forwarder veths, and its table.
struct Fx {
    xdp: XdpProgram,
    mem: &'static [AtomicU32],
    layout: FastLayout,
    keys: [u64; 4],
    front: u32,
    back: u32,
}

impl Fx {
    /// Loads, attaches natively to `f0` (port 0) and `f1` (port 1) of the calling thread's
    /// namespace, fills the devmap, writes the header and turns the switch on.
    fn new(f0: &str, f1: &str, pairs: u32) -> Fx {
        let mut nl = Netlink::open().unwrap();
        let front = nl.link_by_name(f0).unwrap().ifindex;
        let back = nl.link_by_name(f1).unwrap().ifindex;
        let layout = FastLayout::new(pairs, 1);
        let mut xdp = XdpProgram::load_with(layout.elements()).unwrap();
        // Punted frames for the VIP go the dataplane's way (no socket here: passed, no_xsk).
        xdp.add_addr(VIP.into(), AddrKind::Owned).unwrap();
        assert_eq!(
            xdp.attach(front, ModeRequest::Native, false).unwrap(),
            AttachMode::Native
        );
        assert_eq!(
            xdp.attach(back, ModeRequest::Native, true).unwrap(),
            AttachMode::Native
        );
        assert!(xdp.set_fast_port(front, FRONT, true).unwrap());
        assert!(xdp.set_fast_port(back, BACK, true).unwrap());
        xdp.set_tx_port(FRONT, front).unwrap();
        xdp.set_tx_port(BACK, back).unwrap();
        let mem = xdp.fast_table().unwrap();
        assert_eq!(mem.len(), layout.words());
        assert!(std::ptr::eq(mem, xdp.fast_table().unwrap()), "mapped once");
        let keys = [
            0x0123_4567_89ab_cdef,
            0xfedc_ba98_7654_3211,
            0x0f1e_2d3c_4b5a_6978,
            0x8877_6655_4433_2211 | 1,
        ];
        init_header(mem, &layout, keys, keys);
        set_enabled(mem, true);
        Fx {
            xdp,
            mem,
            layout,
            keys,
            front,
            back,
        }
    }

    fn word(&self, line: u32, i: usize) -> &AtomicU32 {
        &self.mem[self.layout.line_word(line, i)]
    }

    fn get(&self, line: u32, i: usize) -> u32 {
        self.word(line, i).load(Ordering::Acquire)
    }

    /// Writes `line` as the worker does: everything, then the state last.
    fn write_line(&self, line: u32, d: &Dir) {
        let put = |i: usize, v: u32| self.word(line, i).store(v, Ordering::Relaxed);
        put(w::STATE, 0);
        put(w::INGRESS_PORT, d.ingress);
        put(w::TX_PORT, d.tx);
        put(
            w::PROTO_RULE,
            u32::from(d.proto) | (u32::from(d.rule) << 16),
        );
        let (s, dd, p, _) = d.key();
        put(w::MATCH_SADDR, s);
        put(w::MATCH_DADDR, dd);
        put(w::MATCH_PORTS, p);
        put(w::NEW_SADDR, wire_word(d.new_from.0));
        put(w::NEW_DADDR, wire_word(d.new_to.0));
        put(w::NEW_PORTS, ports_word(d.new_from.1, d.new_to.1));
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&d.dst_mac);
        macs[6..].copy_from_slice(&d.src_mac);
        for (i, c) in macs.chunks_exact(4).enumerate() {
            put(w::MACS + i, wire_word([c[0], c[1], c[2], c[3]]));
        }
        put(w::NEXT_SEQ, d.next_seq);
        put(w::MAX_WIN, d.max_win);
        put(w::LAST_SEEN, 0);
        self.word(line, w::STATE).store(d.state, Ordering::Release);
    }

    fn home(&self, d: &Dir) -> u32 {
        let (s, dd, p, proto) = d.key();
        (fast_hash(&self.keys, s, dd, p, proto) as u32) & (self.layout.index_slots - 1)
    }

    fn slot(&self, slot: u32) -> &AtomicU32 {
        &self.mem[self.layout.slot_word(slot & (self.layout.index_slots - 1))]
    }

    /// Inserts `line`'s key along its probe sequence (what the worker does); returns the slot.
    fn insert(&self, line: u32, d: &Dir) -> u32 {
        let home = self.home(d);
        for i in 0..16 {
            let s = self.slot(home + i);
            let v = s.load(Ordering::Acquire);
            if (v == 0 || v == SLOT_TOMBSTONE)
                && s.compare_exchange(v, line + 1, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                return (home + i) & (self.layout.index_slots - 1);
            }
        }
        panic!("no free index slot within 16 probes");
    }

    /// Publishes pair `pair` (lines 2p, 2p+1) for a flow.
    fn publish(&self, pair: u32, dirs: &[Dir; 2]) {
        for (i, d) in dirs.iter().enumerate() {
            let line = 2 * pair + i as u32;
            self.write_line(line, d);
            self.insert(line, d);
        }
    }

    fn stats(&self) -> FastStats {
        self.xdp.fast_stats().unwrap()
    }

    fn run(&self, frame: &[u8], ifindex: u32) -> (u32, Vec<u8>) {
        self.xdp.test_run_frame(frame, ifindex, 0).unwrap()
    }

    /// Runs `frame` and checks it was punted for `reason` (a field of [`FastStats`] moved by
    /// one, nothing else), unmodified, into today's path (a dataplane frame with no socket:
    /// passed and counted no_xsk).
    fn punted(&self, what: &str, frame: &[u8], ifindex: u32, reason: fn(&mut FastStats)) {
        let before = self.stats();
        let counters = self.xdp.counters().unwrap();
        let (action, out) = self.run(frame, ifindex);
        assert_eq!(action, XDP_PASS, "{what}: punted to today's path");
        assert_eq!(out, frame, "{what}: a punted frame is untouched");
        let mut want = before;
        reason(&mut want);
        assert_eq!(self.stats(), want, "{what}: punt reason");
        assert_eq!(
            self.xdp.counters().unwrap().no_xsk,
            counters.no_xsk + 1,
            "{what}: today's path took it"
        );
    }

    /// Runs `frame` and checks it was forwarded (XDP_REDIRECT); returns the frame out.
    fn forwarded(&self, what: &str, frame: &[u8], ifindex: u32) -> Vec<u8> {
        let before = self.stats();
        let (action, out) = self.run(frame, ifindex);
        assert_eq!(action, XDP_REDIRECT, "{what}: forwarded");
        let mut want = before;
        want.forwarded += 1;
        assert_eq!(
            self.stats(),
            want,
            "{what}: counted forwarded, nothing else"
        );
        assert_eq!(out.len(), frame.len(), "{what}");
        out
    }
}

fn udp(from: ([u8; 4], u16), to: ([u8; 4], u16), ttl: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, F0_MAC)
        .ipv4(from.0, to.0, ttl)
        .udp(from.1, to.1)
        .write(&mut v, payload)
        .unwrap();
    v
}

#[derive(Clone, Copy, Default)]
struct Tcp {
    seq: u32,
    ack: u32,
    window: u16,
    syn: bool,
    fin: bool,
    rst: bool,
    no_ack: bool,
}

fn tcp(from: ([u8; 4], u16), to: ([u8; 4], u16), t: Tcp, payload: &[u8]) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2(CLIENT_MAC, F0_MAC)
        .ipv4(from.0, to.0, 64)
        .tcp(from.1, to.1, t.seq, t.window);
    if !t.no_ack {
        b = b.ack(t.ack);
    }
    if t.syn {
        b = b.syn();
    }
    if t.fin {
        b = b.fin();
    }
    if t.rst {
        b = b.rst();
    }
    let mut v = Vec::new();
    b.write(&mut v, payload).unwrap();
    v
}

const L4: usize = 14 + 20;

fn addr(b: &[u8]) -> Addr {
    Addr::from(std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]))
}

/// The L4 checksum field's offset in the frame.
fn check_at(proto: u8) -> usize {
    L4 + if proto == 6 { 16 } else { 6 }
}

/// Replaces the L4 checksum with the folded pseudo-header sum, as a sender that leaves the
/// checksum to the NIC does (CHECKSUM_PARTIAL on veth).
fn make_partial(frame: &mut [u8], proto: u8) {
    let len = if proto == 6 {
        u16::from_be_bytes([frame[16], frame[17]]) - 20
    } else {
        u16::from_be_bytes([frame[L4 + 4], frame[L4 + 5]])
    };
    let p = checksum::pseudo_header_sum(
        addr(&frame[26..30]),
        addr(&frame[30..34]),
        false,
        proto,
        u32::from(len),
    );
    let at = check_at(proto);
    frame[at..at + 2].copy_from_slice(&p.to_be_bytes());
}

/// Checks a frame the fast path forwarded for `d`: MACs, TTL - 1, addresses and ports
/// rewritten, IPv4 checksum valid, L4 checksum valid (or still absent).
fn check_out(what: &str, input: &[u8], out: &[u8], d: &Dir) {
    assert_eq!(out[..6], d.dst_mac, "{what}: destination MAC");
    assert_eq!(out[6..12], d.src_mac, "{what}: source MAC");
    assert_eq!(out[12..14], [8, 0]);
    assert_eq!(out[14 + 8], input[14 + 8] - 1, "{what}: TTL - 1");
    assert_eq!(out[26..30], d.new_from.0, "{what}: source address");
    assert_eq!(out[30..34], d.new_to.0, "{what}: destination address");
    assert_eq!(
        out[L4..L4 + 2],
        d.new_from.1.to_be_bytes(),
        "{what}: source port"
    );
    assert_eq!(
        out[L4 + 2..L4 + 4],
        d.new_to.1.to_be_bytes(),
        "{what}: dest port"
    );
    assert_eq!(checksum::checksum(&out[14..34]), 0, "{what}: IPv4 checksum");
    let tot = usize::from(u16::from_be_bytes([out[16], out[17]]));
    let at = check_at(d.proto);
    let field = u16::from_be_bytes([out[at], out[at + 1]]);
    if d.proto == 17 && input[at] == 0 && input[at + 1] == 0 {
        assert_eq!(field, 0, "{what}: no UDP checksum stays none");
    } else {
        let seg = &out[L4..14 + tot];
        assert_eq!(
            checksum::verify_sum(addr(&out[26..30]), addr(&out[30..34]), false, d.proto, seg),
            0xffff,
            "{what}: L4 checksum"
        );
    }
    // Nothing else changed: the payload and, for TCP, the header after the ports.
    assert_eq!(out[L4 + 4..at], input[L4 + 4..at], "{what}: L4 header");
    assert_eq!(out[at + 2..], input[at + 2..], "{what}: rest");
}

fn with_fx(test: &str, pairs: u32, f: impl FnOnce(&Fx) + Send + 'static) {
    if !need_root(test) {
        return;
    }
    let lab = Lab::new();
    let (f0, f1) = (lab.f0.clone(), lab.f1.clone());
    in_netns(&lab.fwd, move || {
        let fx = Fx::new(&f0, &f1, pairs);
        f(&fx);
    })
    .join()
    .unwrap();
}

#[test]
fn udp_dnat_both_directions_forwarded_with_checksums_and_counters() {
    with_fx("udp_dnat", 64, |fx| {
        let flow = dnat(17, UDP_RULE, 40000, STATE_FAST);
        fx.publish(0, &flow);
        let [orig, reply] = flow;

        let t0 = sys::monotonic_ns();
        let input = udp(orig.from, orig.to, 64, b"hello, backend");
        let out = fx.forwarded("UDP original", &input, fx.front);
        let t1 = sys::monotonic_ns();
        check_out("UDP original", &input, &out, &orig);
        let seen = fx.get(0, w::LAST_SEEN);
        assert!(
            seen >= ((t0 >> 16) + 1) as u32 && seen <= ((t1 >> 16) + 1) as u32,
            "last_seen {seen} from the packet's time"
        );
        assert_eq!(
            fx.get(1, w::LAST_SEEN),
            0,
            "the other direction's untouched"
        );

        let input = udp(reply.from, reply.to, 9, b"hello, client!!");
        let out = fx.forwarded("UDP reply", &input, fx.back);
        check_out("UDP reply", &input, &out, &reply);

        // A second original frame, without a checksum: it stays without.
        let mut input = udp(orig.from, orig.to, 2, b"no checksum");
        input[check_at(17)..check_at(17) + 2].copy_from_slice(&[0, 0]);
        let out = fx.forwarded("UDP without checksum", &input, fx.front);
        check_out("UDP without checksum", &input, &out, &orig);

        let mut counts = fx.xdp.fast_rule_counts().unwrap();
        counts.sort_by_key(|c| (c.rule, c.dir));
        let (l0, l1) = (14 + 20 + 8 + 14, 14 + 20 + 8 + 15);
        assert_eq!(
            counts,
            vec![
                FastRuleCount {
                    rule: UDP_RULE,
                    dir: 0,
                    packets: 2,
                    bytes: (l0 + 14 + 20 + 8 + 11) as u64,
                },
                FastRuleCount {
                    rule: UDP_RULE,
                    dir: 1,
                    packets: 1,
                    bytes: l1 as u64,
                },
            ]
        );
        // The handle for other threads reads the same.
        let ctl = fx.xdp.fast_control().unwrap();
        assert_eq!(ctl.stats().unwrap(), fx.stats());
        assert_eq!(ctl.rule_counts().unwrap().len(), 2);
    });
}

#[test]
fn partial_checksums_are_completed() {
    with_fx("partial_checksums", 64, |fx| {
        let udp_flow = dnat(17, UDP_RULE, 40000, STATE_FAST);
        fx.publish(0, &udp_flow);
        let tcp_state = STATE_FAST | STATE_TCP | (WSCALE << STATE_WSCALE_SHIFT);
        let mut tcp_flow = dnat(6, TCP_RULE, 40001, tcp_state);
        // Room for every segment below in both windows.
        tcp_flow[0].max_win = 1 << 24;
        tcp_flow[1].max_win = 1 << 24;
        fx.publish(1, &tcp_flow);

        // Lengths across the program's 64-byte chunks, 4-byte words and odd tails, up to a
        // full 1500-byte IPv4 packet.
        for len in [0usize, 1, 2, 3, 5, 57, 63, 64, 65, 127, 1000, 1471, 1472] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            let mut input = udp(udp_flow[0].from, udp_flow[0].to, 64, &payload);
            make_partial(&mut input, 17);
            let what = format!("UDP partial, {len} bytes");
            let out = fx.forwarded(&what, &input, fx.front);
            check_out(&what, &input, &out, &udp_flow[0]);
        }
        let mut seq = 1000u32;
        for len in [0usize, 1, 3, 64, 99, 1459, 1460] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 13 + len) as u8).collect();
            let t = Tcp {
                seq,
                ack: 5000,
                window: 512,
                ..Tcp::default()
            };
            let mut input = tcp(tcp_flow[0].from, tcp_flow[0].to, t, &payload);
            make_partial(&mut input, 6);
            let what = format!("TCP partial, {len} bytes");
            let out = fx.forwarded(&what, &input, fx.front);
            check_out(&what, &input, &out, &tcp_flow[0]);
            seq = seq.wrapping_add(len as u32);
        }

        // A partial checksum over more than the program completes: punted.
        let mut big = udp(udp_flow[0].from, udp_flow[0].to, 64, &[0x5a; 1600]);
        make_partial(&mut big, 17);
        fx.punted("UDP partial, 1600 bytes", &big, fx.front, |s| {
            s.checksum_too_long += 1
        });
        // The same message with a full checksum is updated incrementally.
        let big = udp(udp_flow[0].from, udp_flow[0].to, 64, &[0x5a; 1600]);
        let out = fx.forwarded("UDP full, 1600 bytes", &big, fx.front);
        check_out("UDP full, 1600 bytes", &big, &out, &udp_flow[0]);
    });
}

#[test]
fn tcp_window_rule_and_state_updates() {
    with_fx("tcp_window", 64, |fx| {
        let state = STATE_FAST | STATE_TCP | (WSCALE << STATE_WSCALE_SHIFT);
        let flow = dnat(6, TCP_RULE, 40001, state);
        fx.publish(3, &flow);
        let (o, r) = (6, 7);
        let [orig, reply] = flow;
        let snapshot =
            |fx: &Fx| [o, r].map(|l| [w::NEXT_SEQ, w::MAX_WIN, w::LAST_SEEN].map(|i| fx.get(l, i)));

        // In window: data with an ACK of what the other side sent.
        let seg = Tcp {
            seq: 1000,
            ack: 5000,
            window: 1000,
            ..Tcp::default()
        };
        let input = tcp(orig.from, orig.to, seg, &[1; 100]);
        let out = fx.forwarded("in-window ACK", &input, fx.front);
        check_out("in-window ACK", &input, &out, &orig);
        assert_eq!(fx.get(o, w::NEXT_SEQ), 1100, "next_seq advanced to the end");
        assert_eq!(
            fx.get(o, w::MAX_WIN),
            1000 << WSCALE,
            "max_win grown, scaled"
        );
        assert_ne!(fx.get(o, w::LAST_SEEN), 0, "last_seen advanced");
        assert_eq!(
            fx.get(r, w::NEXT_SEQ),
            5000,
            "the other direction untouched"
        );

        // A retransmission never moves next_seq back, a smaller window never shrinks max_win.
        let retrans = Tcp { window: 10, ..seg };
        let input = tcp(orig.from, orig.to, retrans, &[1; 50]);
        fx.forwarded("retransmission", &input, fx.front);
        assert_eq!(fx.get(o, w::NEXT_SEQ), 1100);
        assert_eq!(fx.get(o, w::MAX_WIN), 1000 << WSCALE);

        let before = snapshot(fx);
        let far = Tcp {
            seq: 1100u32.wrapping_add(1 << 30),
            ..seg
        };
        fx.punted(
            "sequence far out of the window",
            &tcp(orig.from, orig.to, far, &[2; 10]),
            fx.front,
            |s| s.window += 1,
        );
        let behind = Tcp {
            seq: 1100u32.wrapping_sub(1_000_000 + 200),
            ..seg
        };
        fx.punted(
            "sequence a window behind",
            &tcp(orig.from, orig.to, behind, &[2; 10]),
            fx.front,
            |s| s.window += 1,
        );
        let unsent = Tcp {
            seq: 1100,
            ack: 5001,
            ..seg
        };
        fx.punted(
            "ACK of unsent data",
            &tcp(orig.from, orig.to, unsent, &[]),
            fx.front,
            |s| s.window += 1,
        );
        let stale = Tcp {
            seq: 1100,
            // the slack: the larger of 66000 and this direction's largest window (128000)
            ack: 5000u32.wrapping_sub(128_000 + 1),
            ..seg
        };
        fx.punted(
            "ACK older than the slack",
            &tcp(orig.from, orig.to, stale, &[]),
            fx.front,
            |s| s.window += 1,
        );
        for (what, t) in [
            ("SYN", Tcp { syn: true, ..seg }),
            ("FIN", Tcp { fin: true, ..seg }),
            ("RST", Tcp { rst: true, ..seg }),
            (
                "no ACK",
                Tcp {
                    no_ack: true,
                    ..seg
                },
            ),
        ] {
            fx.punted(what, &tcp(orig.from, orig.to, t, &[]), fx.front, |s| {
                s.not_eligible += 1
            });
        }
        assert_eq!(snapshot(fx), before, "punted segments change no state");

        // The reply direction, acknowledging the data the original sent.
        let back = Tcp {
            seq: 5000,
            ack: 1100,
            window: 2000,
            ..Tcp::default()
        };
        let input = tcp(reply.from, reply.to, back, &[3; 10]);
        let out = fx.forwarded("reply ACK", &input, fx.back);
        check_out("reply ACK", &input, &out, &reply);
        assert_eq!(fx.get(r, w::NEXT_SEQ), 5010);
        assert_eq!(
            fx.get(r, w::MAX_WIN),
            1_000_000,
            "grow-only: 2000 << 7 is smaller"
        );

        // A flow picked up mid-connection accepts an ACK up to a window ahead.
        let ahead = Tcp {
            seq: 1100,
            ack: 5010 + 60_000,
            ..seg
        };
        let input = tcp(orig.from, orig.to, ahead, &[]);
        fx.punted("ACK ahead, not picked up", &input, fx.front, |s| {
            s.window += 1
        });
        fx.word(o, w::STATE)
            .store(state | STATE_PICKED_UP, Ordering::Release);
        fx.forwarded("ACK ahead, picked up", &input, fx.front);
    });
}

#[test]
fn punts_leave_the_frame_to_the_dataplane() {
    with_fx("punts", 64, |fx| {
        let flow = dnat(17, UDP_RULE, 40000, STATE_FAST);
        fx.publish(0, &flow);
        let [orig, _] = flow;
        let frame = udp(orig.from, orig.to, 64, b"x");

        fx.punted(
            "no published flow",
            &udp((CLIENT, 40099), orig.to, 64, b"x"),
            fx.front,
            |s| s.miss += 1,
        );
        fx.punted("wrong ingress port", &frame, fx.back, |s| s.wrong_port += 1);
        fx.punted("TTL 1", &udp(orig.from, orig.to, 1, b"x"), fx.front, |s| {
            s.not_eligible += 1
        });
        let mut vlan = frame.clone();
        vlan.splice(12..12, [0x81, 0x00, 0x00, 0x07]);
        fx.punted("VLAN-tagged", &vlan, fx.front, |s| s.not_eligible += 1);
        let mut frag = frame.clone();
        frag[14 + 6] = 0x20; // more fragments
        fx.punted("fragment", &frag, fx.front, |s| s.not_eligible += 1);
        for (what, tot_len) in [("IPv4 length below its header", 10u16), ("truncated", 200)] {
            let mut bad = frame.clone();
            bad[16..18].copy_from_slice(&tot_len.to_be_bytes());
            fx.punted(what, &bad, fx.front, |s| s.not_eligible += 1);
        }
        let mut short_udp = frame.clone();
        short_udp[L4 + 4..L4 + 6].copy_from_slice(&7u16.to_be_bytes());
        fx.punted("UDP length below its header", &short_udp, fx.front, |s| {
            s.not_eligible += 1
        });

        // An empty devmap slot for the egress.
        fx.xdp.clear_tx_port(BACK).unwrap();
        fx.punted("no egress in xlb_tx", &frame, fx.front, |s| s.no_tx += 1);
        fx.xdp.set_tx_port(BACK, fx.back).unwrap();
        fx.forwarded("egress back", &frame, fx.front);

        // The line unpublished (FAST cleared).
        fx.word(0, w::STATE).store(0, Ordering::Release);
        fx.punted("line not fast", &frame, fx.front, |s| s.not_fast += 1);
        fx.word(0, w::STATE).store(STATE_FAST, Ordering::Release);

        // The runtime switch off: everything punts, uncounted.
        set_enabled(fx.mem, false);
        fx.punted("switch off", &frame, fx.front, |_| {});
        set_enabled(fx.mem, true);

        // The interface's fast path off (or never on, as after a generic attach).
        assert!(!fx.xdp.set_fast_port(fx.front, FRONT, false).unwrap());
        fx.punted("interface not fast", &frame, fx.front, |_| {});
        // Re-marking the backend side keeps the interface's port and fast flag.
        assert!(fx.xdp.set_fast_port(fx.front, FRONT, true).unwrap());
        fx.xdp.set_backend_side(fx.front, false).unwrap();
        fx.forwarded("fast again", &frame, fx.front);
        let table = fx.xdp.addr_table().unwrap();
        table.set_backend_side(fx.front, false).unwrap();
        fx.forwarded("fast after the address table's update", &frame, fx.front);
    });
}

#[test]
fn probing_agrees_with_the_engine_hash() {
    with_fx("probing", 512, |fx| {
        // Lines of other flows on the flow's home slot and the next, a tombstone after them:
        // XDP must start where the engine's hash says and walk past all three.
        let flow = dnat(17, UDP_RULE, 41000, STATE_FAST);
        let home = fx.home(&flow[0]);
        let other = dnat(17, UDP_RULE, 42000, STATE_FAST);
        fx.write_line(2, &other[0]);
        fx.write_line(3, &other[1]);
        fx.slot(home).store(2 + 1, Ordering::Release);
        fx.slot(home + 1).store(3 + 1, Ordering::Release);
        fx.slot(home + 2).store(SLOT_TOMBSTONE, Ordering::Release);
        fx.write_line(0, &flow[0]);
        fx.slot(home + 3).store(1, Ordering::Release);
        let frame = udp(flow[0].from, flow[0].to, 64, b"probe");
        let out = fx.forwarded("behind two lines and a tombstone", &frame, fx.front);
        check_out("probed", &frame, &out, &flow[0]);
        assert_eq!(
            xlb_engine::fast::lookup(
                fx.mem,
                &fx.layout,
                wire_word(CLIENT),
                wire_word(VIP),
                ports_word(41000, VPORT),
                17
            ),
            Some(0),
            "the engine's lookup agrees"
        );
        // The same line one slot further, behind an empty slot: not found.
        fx.slot(home + 3).store(0, Ordering::Release);
        fx.slot(home + 4).store(1, Ordering::Release);
        fx.punted("behind an empty slot", &frame, fx.front, |s| s.miss += 1);
        fx.slot(home + 4).store(0, Ordering::Release);
        for i in 0..3 {
            fx.slot(home + i).store(0, Ordering::Release);
        }

        // Many flows inserted by the engine's hash, clients and ports spread: XDP finds all.
        let mut x: u32 = 0x1234_5678;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        let flows: Vec<[Dir; 2]> = (0..200)
            .map(|_| {
                let r = next();
                let mut f = dnat(17, UDP_RULE, (r >> 16) as u16 | 1024, STATE_FAST);
                let client = [198, 18, 1 + (r % 200) as u8, (r >> 8) as u8];
                f[0].from.0 = client;
                f[0].new_from.0 = client;
                f[1].to.0 = client;
                f[1].new_to.0 = client;
                f
            })
            .collect();
        let mut seen = std::collections::HashSet::new();
        for (p, f) in flows.iter().enumerate() {
            if seen.insert(f[0].key()) {
                fx.publish(8 + p as u32, f);
            }
        }
        let mut found = 0;
        for (p, f) in flows.iter().enumerate() {
            let frame = udp(f[0].from, f[0].to, 64, b"many");
            let (action, out) = fx.run(&frame, fx.front);
            assert_eq!(action, XDP_REDIRECT, "flow {p}");
            check_out("many", &frame, &out, &f[0]);
            found += 1;
        }
        assert_eq!(found, flows.len());
    });
}

/// Turns GRO on for `dev` in `ns`: a veth accepts frames redirected into it by XDP only when
/// its peer runs NAPI, which GRO (or an XDP program) turns on; otherwise they are dropped.
fn gro_on(ns: &str, dev: &str) {
    let ok = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "ethtool", "-K", dev, "gro", "on"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "ethtool -K {dev} gro on in {ns}");
}

/// Real sockets on both sides, the forwarder's kernel not forwarding and no dataplane
/// socket: whatever crosses went through the fast path. The senders' veths leave the UDP
/// checksum partial, so this also shows the receiving stacks accept the completed ones.
#[test]
fn udp_crosses_the_lab_on_the_fast_path_alone() {
    use std::{
        net::{SocketAddr, UdpSocket},
        sync::mpsc,
        time::Duration,
    };
    const ROUNDS: usize = 20;
    if !need_root("udp_crosses_the_lab") {
        return;
    }
    let lab = Lab::new();
    gro_on(&lab.client, &lab.c0);
    gro_on(&lab.server, &lab.s0);
    let f0_mac = parse_mac(&mac_of(&lab.fwd, &lab.f0));
    let f1_mac = parse_mac(&mac_of(&lab.fwd, &lab.f1));
    let client_mac = parse_mac(&lab.client_mac);
    let server_mac = parse_mac(&lab.server_mac);
    let (f0, f1) = (lab.f0.clone(), lab.f1.clone());
    let (ready_tx, ready_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let fwd = in_netns(&lab.fwd, move || {
        let fx = Fx::new(&f0, &f1, 64);
        let mut flow = dnat(17, UDP_RULE, 40000, STATE_FAST);
        (flow[0].dst_mac, flow[0].src_mac) = (server_mac, f1_mac);
        (flow[1].dst_mac, flow[1].src_mac) = (client_mac, f0_mac);
        fx.publish(0, &flow);
        ready_tx.send(()).unwrap();
        let _ = done_rx.recv_timeout(Duration::from_secs(30));
        (fx.stats(), fx.xdp.fast_rule_counts().unwrap())
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();

    let backend = SocketAddr::from((BACKEND, BPORT));
    let (srv_tx, srv_rx) = mpsc::channel();
    let server = in_netns(&lab.server, move || {
        let s = UdpSocket::bind(backend).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        srv_tx.send(()).unwrap();
        let mut buf = [0u8; 2048];
        let mut echoed = 0;
        while echoed < ROUNDS {
            let Ok((n, from)) = s.recv_from(&mut buf) else {
                break;
            };
            assert_eq!(
                from,
                SocketAddr::from((CLIENT, 40000)),
                "the client, DNAT kept it"
            );
            s.send_to(&buf[..n], from).unwrap();
            echoed += 1;
        }
        echoed
    });
    srv_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let client = in_netns(&lab.client, move || {
        let s = UdpSocket::bind(SocketAddr::from((CLIENT, 40000))).unwrap();
        s.connect(SocketAddr::from((VIP, VPORT))).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut answered = 0;
        let mut buf = [0u8; 2048];
        for i in 0..ROUNDS {
            let msg = format!("datagram {i} {}", "x".repeat(i * 50));
            s.send(msg.as_bytes()).unwrap();
            // From the VIP (a connected socket takes nothing else), intact.
            if let Ok(n) = s.recv(&mut buf) {
                assert_eq!(&buf[..n], msg.as_bytes());
                answered += 1;
            }
        }
        answered
    });
    let answered = client.join().unwrap();
    let echoed = server.join().unwrap();
    done_tx.send(()).unwrap();
    let (stats, counts) = fwd.join().unwrap();
    assert_eq!(
        answered, ROUNDS,
        "every datagram came back (server echoed {echoed})"
    );
    assert_eq!(stats.forwarded, 2 * ROUNDS as u64, "{stats:?}");
    let packets: Vec<(u8, u64)> = counts.iter().map(|c| (c.dir, c.packets)).collect();
    assert_eq!(packets, vec![(0, ROUNDS as u64), (1, ROUNDS as u64)]);
}

/// `XdpProgram::load` (no fast-path table, a bare zeroed header) punts everything, even on an
/// interface marked fast with an egress in the devmap.
#[test]
fn a_program_without_a_table_punts_everything() {
    if !need_root("without_a_table") {
        return;
    }
    let lab = Lab::new();
    let (f0, f1) = (lab.f0.clone(), lab.f1.clone());
    in_netns(&lab.fwd, move || {
        let mut nl = Netlink::open().unwrap();
        let front = nl.link_by_name(&f0).unwrap().ifindex;
        let back = nl.link_by_name(&f1).unwrap().ifindex;
        let mut xdp = XdpProgram::load().unwrap();
        xdp.add_addr(VIP.into(), AddrKind::Owned).unwrap();
        xdp.attach(front, ModeRequest::Native, false).unwrap();
        assert!(xdp.set_fast_port(front, FRONT, true).unwrap());
        xdp.set_tx_port(BACK, back).unwrap();
        assert_eq!(xdp.fast_table().unwrap().len(), 16, "the header alone");
        let frame = udp((CLIENT, 40000), (VIP, VPORT), 64, b"x");
        let (action, out) = xdp.test_run_frame(&frame, front, 0).unwrap();
        assert_eq!((action, out), (XDP_PASS, frame));
        assert_eq!(xdp.fast_stats().unwrap(), FastStats::default());
        assert_eq!(xdp.counters().unwrap().no_xsk, 1);
    })
    .join()
    .unwrap();
}
