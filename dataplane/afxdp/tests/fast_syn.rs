//! New flows opened by the XDP program (`fast_syn` in `src/bpf/xlb_fast.h`) through
//! `BPF_PROG_TEST_RUN`: the new-flow section is written by the engine's own writer
//! (`xlb_engine::fast_new::write_section`) into the mapped table, SYNs are run as if received
//! on the veths of a throwaway namespace, and the frame out, the action, the counters and the
//! owning worker's ring (read with the engine's consumer, and word by word) are checked
//! against the engine's Maglev choice and steering. Needs root; skips otherwise.

mod common;

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};

use common::*;
use etherparse::PacketBuilder;
use xlb_afxdp::{netlink::Netlink, sys, AddrKind, AttachMode, FastStats, ModeRequest, XdpProgram};
use xlb_engine::{
    engine::steer,
    fast::{init_header, line as w, ports_word, set_enabled, wire_word, FastLayout, ELEMENT_WORDS},
    fast_new::{
        choose, dist_word, nfq, ring_pop, set_nf_enabled, write_section, NfMember, NfPool,
        NfRecord, NfRule, NfSection, FLAG_DNAT_ADDR, FLAG_DNAT_PORT, NO_MEMBER,
    },
    hashkey::HashKey,
    select::{flow_hash, reduce, MAGLEV_LARGE, MAGLEV_SMALL},
    terms::{Distribution, FlowTuple},
    wire::checksum,
    Addr,
};

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

const CLIENT: [u8; 4] = [198, 18, 1, 2];
const VIP: [u8; 4] = [198, 18, 100, 1];
/// A frontend address XDP has no rule for (owned by the dataplane all the same).
const OTHER_VIP: [u8; 4] = [198, 18, 100, 2];
const VPORT: u16 = 80;
const BPORT: u16 = 8080;
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x01];
const F0_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x10];
const F1_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x11];
const SERVER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x22];
/// Dataplane port ids of the two interfaces.
const FRONT: u16 = 0;
const BACK: u16 = 1;
const RULE: u16 = 9;
/// Records per ring in these tests (small, so that they fill and wrap).
const RECORDS: u32 = 8;
/// Index-hash keys of the header, and the steering key of the workers.
const KEYS: [u64; 4] = [
    0x0123_4567_89ab_cdef,
    0xfedc_ba98_7654_3211,
    0x0f1e_2d3c_4b5a_6978,
    0x8877_6655_4433_2211 | 1,
];
const STEER: [u64; 4] = [
    0x1357_9bdf_2468_ace0,
    0x9e37_79b9_7f4a_7c15,
    0x0bad_cafe_dead_beef,
    0x5555_aaaa_3333_cccc,
];

/// SYN options (20 bytes: MSS 1460, SACK permitted, timestamps, NOP, window scale 7).
const OPTS: [u8; 20] = [
    2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0x12, 0x34, 0, 0, 0, 0, 1, 3, 3, 7,
];

fn member(i: u8, valid: bool) -> NfMember {
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&SERVER_MAC);
    macs[5] = 0x22 ^ i;
    macs[6..].copy_from_slice(&F1_MAC);
    NfMember {
        valid,
        addr: [198, 18, 2, 1 + i],
        tx_port: BACK,
        macs,
    }
}

fn rule(vport: u16, flags: u32, dist: Distribution, pool: usize) -> NfRule {
    NfRule {
        vip: VIP,
        vport,
        rule: RULE,
        ingress_port: FRONT,
        flags,
        backend_port: BPORT,
        dist,
        pool,
    }
}

/// A pseudo-random generator for tables and tuples (xorshift32).
struct Rng(u32);

impl Rng {
    fn next(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        self.0
    }
}

/// A Maglev table of `m` slots over `n` members, about one slot in 32 naming no member.
fn table(rng: &mut Rng, m: usize, n: u16) -> Vec<u16> {
    (0..m)
        .map(|_| {
            let r = rng.next();
            if r % 32 == 0 {
                NO_MEMBER
            } else {
                (r >> 8) as u16 % n
            }
        })
        .collect()
}

/// The program attached to the lab's two forwarder veths, and its table for `workers`
/// workers, the section off until [`Fx::section`].
struct Fx {
    xdp: XdpProgram,
    mem: &'static [AtomicU32],
    layout: FastLayout,
    front: u32,
    back: u32,
}

impl Fx {
    fn new(f0: &str, f1: &str, workers: u16) -> Fx {
        let mut nl = Netlink::open().unwrap();
        let front = nl.link_by_name(f0).unwrap().ifindex;
        let back = nl.link_by_name(f1).unwrap().ifindex;
        let layout = FastLayout::new(16, workers).with_ring_records(RECORDS);
        let mut xdp = XdpProgram::load_with(layout.elements()).unwrap();
        // Punted frames for the frontends go the dataplane's way (no socket here: passed,
        // counted no_xsk).
        xdp.add_addr(VIP.into(), AddrKind::Owned).unwrap();
        xdp.add_addr(OTHER_VIP.into(), AddrKind::Owned).unwrap();
        assert_eq!(
            xdp.attach(front, ModeRequest::Native, false).unwrap(),
            AttachMode::Native
        );
        assert_eq!(
            xdp.attach(back, ModeRequest::Native, true).unwrap(),
            AttachMode::Native
        );
        assert!(xdp.set_fast_port(front, u32::from(FRONT), true).unwrap());
        assert!(xdp.set_fast_port(back, u32::from(BACK), true).unwrap());
        xdp.set_tx_port(u32::from(FRONT), front).unwrap();
        xdp.set_tx_port(u32::from(BACK), back).unwrap();
        let mem = xdp.fast_table().unwrap();
        assert_eq!(mem.len(), layout.words());
        init_header(mem, &layout, KEYS, STEER);
        set_enabled(mem, true);
        Fx {
            xdp,
            mem,
            layout,
            front,
            back,
        }
    }

    /// Writes `section` as worker 0 does (switch off, write, switch on).
    fn section(&self, section: &NfSection) {
        set_nf_enabled(self.mem, false);
        let written = write_section(self.mem, &self.layout, section);
        assert_eq!(written.left_out, 0, "every rule fits");
        set_nf_enabled(self.mem, true);
    }

    fn workers(&self) -> u16 {
        self.layout.workers
    }

    fn ring_elem(&self, worker: u16) -> u32 {
        self.layout.nf_rings_base + u32::from(worker) * self.layout.nf_ring_elements
    }

    /// `PROD` and `CONS` of `worker`'s ring.
    fn prod(&self, worker: u16) -> &AtomicU32 {
        &self.mem[self.layout.element_word(self.ring_elem(worker), 0)]
    }

    fn cons(&self, worker: u16) -> &AtomicU32 {
        &self.mem[self.layout.element_word(self.ring_elem(worker) + 1, 0)]
    }

    /// Every ring's `PROD` and `CONS`.
    fn rings(&self) -> Vec<(u32, u32)> {
        (0..self.workers())
            .map(|r| {
                (
                    self.prod(r).load(Ordering::Acquire),
                    self.cons(r).load(Ordering::Acquire),
                )
            })
            .collect()
    }

    /// Sets `worker`'s ring to `PROD = prod`, `CONS = cons`.
    fn set_ring(&self, worker: u16, prod: u32, cons: u32) {
        self.prod(worker).store(prod, Ordering::Release);
        self.cons(worker).store(cons, Ordering::Release);
    }

    /// The 32 words of record `i` of `worker`'s ring.
    fn record_words(&self, worker: u16, i: u32) -> [u32; 32] {
        let e = self.ring_elem(worker) + 2 + 2 * (i & (RECORDS - 1));
        let at = self.layout.element_word(e, 0);
        std::array::from_fn(|w| self.mem[at + w].load(Ordering::Acquire))
    }

    fn stats(&self) -> FastStats {
        self.xdp.fast_stats().unwrap()
    }

    fn run(&self, frame: &[u8], ifindex: u32) -> (u32, Vec<u8>) {
        self.xdp.test_run_frame(frame, ifindex, 0).unwrap()
    }

    /// Runs `frame` and checks it was punted for `reason` (a field of [`FastStats`] moved by
    /// one, nothing else), unmodified, into today's path (passed, no socket), with no ring
    /// touched.
    fn punted(&self, what: &str, frame: &[u8], ifindex: u32, reason: fn(&mut FastStats)) {
        let before = self.stats();
        let rings = self.rings();
        let counters = self.xdp.counters().unwrap();
        let (action, out) = self.run(frame, ifindex);
        assert_eq!(action, XDP_PASS, "{what}: punted to today's path");
        assert_eq!(out, frame, "{what}: a punted frame is untouched");
        let mut want = before;
        reason(&mut want);
        assert_eq!(self.stats(), want, "{what}: punt reason");
        assert_eq!(self.rings(), rings, "{what}: no record reserved");
        assert_eq!(
            self.xdp.counters().unwrap().no_xsk,
            counters.no_xsk + 1,
            "{what}: today's path took it"
        );
    }

    /// Runs `frame` and checks it was forwarded as a new flow (XDP_REDIRECT, counted
    /// `new_forwarded` and nothing else, one record more in one ring); returns the frame out
    /// and the ring that got the record.
    fn forwarded(&self, what: &str, frame: &[u8], ifindex: u32) -> (Vec<u8>, u16) {
        let before = self.stats();
        let rings = self.rings();
        let (action, out) = self.run(frame, ifindex);
        assert_eq!(action, XDP_REDIRECT, "{what}: forwarded");
        let mut want = before;
        want.new_forwarded += 1;
        assert_eq!(self.stats(), want, "{what}: counted new_forwarded alone");
        assert_eq!(out.len(), frame.len(), "{what}");
        let after = self.rings();
        let moved: Vec<u16> = (0..self.workers())
            .filter(|&r| after[usize::from(r)] != rings[usize::from(r)])
            .collect();
        assert_eq!(moved.len(), 1, "{what}: one ring got a record");
        let r = moved[0];
        let (p, c) = rings[usize::from(r)];
        assert_eq!(after[usize::from(r)], (p.wrapping_add(1), c), "{what}");
        (out, r)
    }
}

#[derive(Clone, Copy, Default)]
struct Seg {
    ack: bool,
    fin: bool,
    rst: bool,
    ttl: u8,
}

/// A SYN from `from` to `to` with `options` and `payload`, flags as `s` adds them.
fn syn_with(
    from: ([u8; 4], u16),
    to: ([u8; 4], u16),
    s: Seg,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let ttl = if s.ttl == 0 { 64 } else { s.ttl };
    let mut b = PacketBuilder::ethernet2(CLIENT_MAC, F0_MAC)
        .ipv4(from.0, to.0, ttl)
        .tcp(from.1, to.1, 0x1234_5678, 64240)
        .syn();
    if s.ack {
        b = b.ack(1);
    }
    if s.fin {
        b = b.fin();
    }
    if s.rst {
        b = b.rst();
    }
    let b = b.options_raw(options).unwrap();
    let mut v = Vec::new();
    b.write(&mut v, payload).unwrap();
    v
}

fn syn(from: ([u8; 4], u16), to: ([u8; 4], u16)) -> Vec<u8> {
    syn_with(from, to, Seg::default(), &OPTS, &[])
}

const L4: usize = 14 + 20;

fn addr(b: &[u8]) -> Addr {
    Addr::from(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
}

/// An IPv4 address as the engine's (IPv4-mapped) `Addr`.
fn v4(b: [u8; 4]) -> Addr {
    Addr::from(Ipv4Addr::from(b))
}

/// Replaces the TCP checksum with the folded pseudo-header sum, as a sender that leaves the
/// checksum to the NIC does (CHECKSUM_PARTIAL on veth).
fn make_partial(frame: &mut [u8]) {
    let len = u16::from_be_bytes([frame[16], frame[17]]) - 20;
    let p = checksum::pseudo_header_sum(
        addr(&frame[26..30]),
        addr(&frame[30..34]),
        false,
        6,
        u32::from(len),
    );
    frame[L4 + 16..L4 + 18].copy_from_slice(&p.to_be_bytes());
}

/// Checks the SYN XDP sent: MACs of the member's hop, TTL - 1, destination address and
/// port as the rule says, source untouched, IPv4 and TCP checksums valid, nothing else
/// changed (sequence number, flags, window, options).
fn check_out(what: &str, input: &[u8], out: &[u8], m: &NfMember, daddr: [u8; 4], dport: u16) {
    assert_eq!(out[..12], m.macs, "{what}: MACs");
    assert_eq!(out[12..14], [8, 0]);
    assert_eq!(out[14 + 8], input[14 + 8] - 1, "{what}: TTL - 1");
    assert_eq!(out[26..30], input[26..30], "{what}: source address");
    assert_eq!(out[30..34], daddr, "{what}: destination address");
    assert_eq!(out[L4..L4 + 2], input[L4..L4 + 2], "{what}: source port");
    assert_eq!(
        out[L4 + 2..L4 + 4],
        dport.to_be_bytes(),
        "{what}: destination port"
    );
    assert_eq!(checksum::checksum(&out[14..34]), 0, "{what}: IPv4 checksum");
    assert_eq!(
        checksum::verify_sum(addr(&out[26..30]), addr(&out[30..34]), false, 6, &out[L4..]),
        0xffff,
        "{what}: TCP checksum"
    );
    assert_eq!(
        out[14..22],
        input[14..22],
        "{what}: IPv4 header before the TTL"
    );
    assert_eq!(out[23], input[23], "{what}: protocol");
    assert_eq!(
        out[L4 + 4..L4 + 16],
        input[L4 + 4..L4 + 16],
        "{what}: TCP header"
    );
    assert_eq!(out[L4 + 18..], input[L4 + 18..], "{what}: TCP options");
}

/// Checks record `i` of `worker`'s ring, word by word, for the SYN `input` (no payload) sent
/// to `m` with destination port `port` between `t0` and `t1` (not stamped); then takes it with the
/// engine's consumer, which must find the same.
#[allow(clippy::too_many_arguments)]
fn check_record(
    what: &str,
    fx: &Fx,
    worker: u16,
    i: u32,
    input: &[u8],
    m: &NfMember,
    port: u16,
    (t0, t1): (u64, u64),
) {
    let words = fx.record_words(worker, i);
    let len = input.len() - 14;
    assert!(len <= 80);
    assert_eq!(words[nfq::SEQ], i.wrapping_add(1), "{what}: SEQ");
    let stamp = words[nfq::STAMP];
    // XDP reads no clock for a SYN (the SYN was sent between t0 and t1).
    assert_eq!(stamp, 0, "{what}: STAMP, not stamped ({t0}..{t1})");
    assert_eq!(words[nfq::ADDR], wire_word(m.addr), "{what}: ADDR");
    assert_eq!(words[nfq::PORT], u32::from(port), "{what}: PORT");
    assert_eq!(words[nfq::RULE], u32::from(RULE), "{what}: RULE");
    assert_eq!(
        words[nfq::INGRESS_PORT],
        u32::from(FRONT),
        "{what}: INGRESS_PORT"
    );
    assert_eq!(words[nfq::LEN], len as u32, "{what}: LEN");
    assert_eq!(words[7], 0, "{what}: reserved");
    let mut headers = [0u8; 80];
    headers[..len].copy_from_slice(&input[14..]);
    for j in 0..20 {
        let b = &headers[4 * j..4 * j + 4];
        assert_eq!(
            words[nfq::HEADERS + j],
            wire_word([b[0], b[1], b[2], b[3]]),
            "{what}: header word {j} as received, zero after"
        );
    }
    for j in 0..3 {
        let b = &input[4 * j..4 * j + 4];
        assert_eq!(
            words[nfq::MACS + j],
            wire_word([b[0], b[1], b[2], b[3]]),
            "{what}: received MACs"
        );
    }
    assert_eq!(words[31], 0, "{what}: last word");

    assert_eq!(
        fx.cons(worker).load(Ordering::Acquire),
        i,
        "{what}: next to take"
    );
    let mut rec = NfRecord::EMPTY;
    assert!(
        ring_pop(fx.mem, &fx.layout, worker, &mut rec),
        "{what}: consumed"
    );
    assert_eq!(rec.stamp, stamp);
    assert_eq!((rec.addr, rec.port), (m.addr, port), "{what}");
    assert_eq!(
        (rec.rule, rec.ingress_port),
        (u32::from(RULE), u32::from(FRONT))
    );
    assert_eq!(rec.len as usize, len);
    assert_eq!(rec.headers, headers);
    assert_eq!(rec.macs[..], input[..12]);
}

fn with_lab(test: &str, f: impl FnOnce(&str, &str) + Send + 'static) {
    if !need_root(test) {
        return;
    }
    let lab = Lab::new();
    let (f0, f1) = (lab.f0.clone(), lab.f1.clone());
    in_netns(&lab.fwd, move || f(&f0, &f1)).join().unwrap();
}

#[test]
fn a_syn_of_a_published_rule_is_sent_to_its_member_and_handed_to_its_owner() {
    with_lab("syn_forwarded", |f0, f1| {
        let fx = Fx::new(f0, f1, 3);
        let mut rng = Rng(0x5eed_1234);
        let members: Vec<NfMember> = (0..5).map(|i| member(i, true)).collect();
        let pool = NfPool {
            table: table(&mut rng, MAGLEV_SMALL, 5),
            members: members.clone(),
        };
        let dnat = FLAG_DNAT_ADDR | FLAG_DNAT_PORT;
        fx.section(&NfSection {
            rules: vec![
                rule(VPORT, dnat, Distribution::FiveTuple, 0),
                // Floating IP: the SYN keeps the VIP and its port, only the hop changes.
                rule(81, 0, Distribution::SourceIp, 0),
                // DNAT of the address alone.
                rule(82, FLAG_DNAT_ADDR, Distribution::SourceIpProtocol, 0),
            ],
            pools: vec![pool.clone()],
        });
        let steer_key = HashKey::from_words(STEER);
        let mut sent = 0;
        for (vport, flags, dist) in [
            (VPORT, dnat, Distribution::FiveTuple),
            (81, 0, Distribution::SourceIp),
            (82, FLAG_DNAT_ADDR, Distribution::SourceIpProtocol),
        ] {
            for (k, opts) in [&OPTS[..], &[], &[1; 40]].into_iter().enumerate() {
                let sport = 40000 + 17 * k as u16 + vport;
                let client = [198, 18, 1, 2 + k as u8];
                let tuple = FlowTuple {
                    proto: 6,
                    src: v4(client),
                    src_port: sport,
                    dst: v4(VIP),
                    dst_port: vport,
                };
                let n = pool.table[reduce(flow_hash(dist, &tuple), MAGLEV_SMALL)];
                if n == NO_MEMBER {
                    continue;
                }
                let m = &members[usize::from(n)];
                let owner = steer(&steer_key, tuple.src, sport, fx.workers());
                let input = syn_with((client, sport), (VIP, vport), Seg::default(), opts, &[]);
                let what = format!("SYN to :{vport}, {} option bytes", opts.len());
                let t0 = sys::monotonic_ns();
                let (out, ring) = fx.forwarded(&what, &input, fx.front);
                let t1 = sys::monotonic_ns();
                assert_eq!(ring, owner, "{what}: the owner's ring");
                let daddr = if flags & FLAG_DNAT_ADDR != 0 {
                    m.addr
                } else {
                    VIP
                };
                let dport = if flags & FLAG_DNAT_PORT != 0 {
                    BPORT
                } else {
                    vport
                };
                check_out(&what, &input, &out, m, daddr, dport);
                let i = fx.prod(owner).load(Ordering::Acquire).wrapping_sub(1);
                check_record(&what, &fx, owner, i, &input, m, dport, (t0, t1));
                sent += 1;
            }
        }
        assert!(sent >= 6, "{sent} SYNs forwarded");
        assert_eq!(
            fx.xdp.fast_rule_counts().unwrap(),
            vec![],
            "the worker counts a new flow in its rule, XDP does not"
        );

        // The rings' counters wrap: three records in each, on both sides of 2^32.
        for r in 0..fx.workers() {
            fx.set_ring(r, u32::MAX - 1, u32::MAX - 1);
        }
        let mut taken = vec![0; usize::from(fx.workers())];
        for k in 0..200u16 {
            let from = ([198, 18, 1, 99], 45000 + k);
            let tuple = FlowTuple {
                proto: 6,
                src: v4(from.0),
                src_port: from.1,
                dst: v4(VIP),
                dst_port: 82,
            };
            let n = pool.table[reduce(
                flow_hash(Distribution::SourceIpProtocol, &tuple),
                MAGLEV_SMALL,
            )];
            let owner = steer(&steer_key, tuple.src, from.1, fx.workers());
            if n == NO_MEMBER || taken[usize::from(owner)] == 3 {
                continue;
            }
            let input = syn(from, (VIP, 82));
            let i = fx.prod(owner).load(Ordering::Acquire);
            let t0 = sys::monotonic_ns();
            let (out, ring) = fx.forwarded("around 2^32", &input, fx.front);
            let t1 = sys::monotonic_ns();
            assert_eq!(ring, owner);
            let m = &members[usize::from(n)];
            check_out("around 2^32", &input, &out, m, m.addr, 82);
            check_record("around 2^32", &fx, owner, i, &input, m, 82, (t0, t1));
            taken[usize::from(owner)] += 1;
        }
        for r in 0..fx.workers() {
            assert_eq!(fx.rings()[usize::from(r)], (1, 1), "ring {r} wrapped");
        }
    });
}

/// Many tuples, every distribution mode, both table sizes, 1 to 4 workers: XDP picks the
/// member of slot `reduce(flow_hash(mode, tuple), m)` and the ring of `steer(client)`, as the
/// engine does (and as the engine's model of XDP, `fast_new::choose`, says).
#[test]
fn maglev_choice_and_owner_agree_with_the_engine() {
    const TUPLES: usize = 50;
    with_lab("maglev_agrees", |f0, f1| {
        let mut rng = Rng(0x0bad_f00d);
        let n = 61u16;
        let members: Vec<NfMember> = (0..n as u8).map(|i| member(i, true)).collect();
        let pools = vec![
            NfPool {
                table: table(&mut rng, MAGLEV_SMALL, n),
                members: members.clone(),
            },
            NfPool {
                table: table(&mut rng, MAGLEV_LARGE, n),
                members: members.clone(),
            },
        ];
        let dists = [
            Distribution::FiveTuple,
            Distribution::SourceIp,
            Distribution::SourceIpProtocol,
        ];
        let mut rules = Vec::new();
        for (p, _) in pools.iter().enumerate() {
            for d in dists {
                rules.push(rule(1000 + rules.len() as u16, FLAG_DNAT_ADDR, d, p));
            }
        }
        let section = NfSection {
            rules: rules.clone(),
            pools: pools.clone(),
        };
        let steer_key = HashKey::from_words(STEER);
        let (mut forwarded, mut no_member) = (0, 0);
        for workers in 1..=4u16 {
            let fx = Fx::new(f0, f1, workers);
            fx.section(&section);
            for r in &rules {
                let pool = &pools[r.pool];
                let m = pool.table.len();
                for _ in 0..TUPLES {
                    let x = rng.next();
                    let client = [198, 18, (x >> 24) as u8 | 1, x as u8];
                    let sport = 1024 + (rng.next() % 64000) as u16;
                    let tuple = FlowTuple {
                        proto: 6,
                        src: v4(client),
                        src_port: sport,
                        dst: v4(VIP),
                        dst_port: r.vport,
                    };
                    let slot = reduce(flow_hash(r.dist, &tuple), m);
                    let owner = steer(&steer_key, tuple.src, sport, workers);
                    let model = choose(fx.mem, &fx.layout, FRONT, client, sport, VIP, r.vport);
                    let input = syn((client, sport), (VIP, r.vport));
                    let what = format!(
                        "{workers} workers, mode {}, {m} slots, {client:?}:{sport}",
                        dist_word(r.dist)
                    );
                    let n = pool.table[slot];
                    if n == NO_MEMBER {
                        assert!(model.is_err(), "{what}: the model punts too");
                        fx.punted(&what, &input, fx.front, |s| s.new_no_member += 1);
                        no_member += 1;
                        continue;
                    }
                    let mb = &members[usize::from(n)];
                    let (out, ring) = fx.forwarded(&what, &input, fx.front);
                    assert_eq!(out[30..34], mb.addr, "{what}: the member of the slot");
                    assert_eq!(out[..12], mb.macs, "{what}: its hop");
                    assert_eq!(ring, owner, "{what}: the owner's ring");
                    let model = model.unwrap();
                    assert_eq!((model.addr, model.owner), (mb.addr, owner), "{what}: model");
                    let mut rec = NfRecord::EMPTY;
                    assert!(ring_pop(fx.mem, &fx.layout, ring, &mut rec), "{what}");
                    assert_eq!((rec.addr, rec.port), (mb.addr, r.vport), "{what}");
                    forwarded += 1;
                }
            }
        }
        let total = 4 * rules.len() * TUPLES;
        assert_eq!(forwarded + no_member, total);
        assert!(
            no_member < total / 8,
            "{no_member} of {total} on empty slots"
        );
    });
}

#[test]
fn every_doubt_punts_the_syn_untouched_without_a_record() {
    with_lab("syn_punts", |f0, f1| {
        let fx = Fx::new(f0, f1, 2);
        let members: Vec<NfMember> = (0..3).map(|i| member(i, true)).collect();
        let dnat = FLAG_DNAT_ADDR | FLAG_DNAT_PORT;
        fx.section(&NfSection {
            rules: vec![
                rule(VPORT, dnat, Distribution::SourceIp, 0),
                rule(82, dnat, Distribution::SourceIp, 1),
                rule(83, dnat, Distribution::SourceIp, 2),
                rule(84, dnat, Distribution::SourceIp, 3),
            ],
            pools: vec![
                NfPool {
                    // Every slot on a member: the only punts are the ones made below.
                    table: (0..MAGLEV_SMALL).map(|s| (s % 3) as u16).collect(),
                    members: members.clone(),
                },
                NfPool {
                    table: vec![NO_MEMBER; MAGLEV_SMALL],
                    members: members.clone(),
                },
                // A slot naming a member beyond the pool's.
                NfPool {
                    table: vec![3; MAGLEV_SMALL],
                    members: members.clone(),
                },
                // A member XDP may not send to (its hop unresolved).
                NfPool {
                    table: vec![0; MAGLEV_SMALL],
                    members: vec![member(7, false)],
                },
            ],
        });
        let from = (CLIENT, 40000);
        let to = (VIP, VPORT);
        let good = syn(from, to);
        let steer_key = HashKey::from_words(STEER);
        let owner = steer(&steer_key, v4(CLIENT), 40000, 2);

        fx.punted(
            "no rule: other port",
            &syn(from, (VIP, 81)),
            fx.front,
            |s| s.new_no_rule += 1,
        );
        fx.punted(
            "no rule: other frontend",
            &syn(from, (OTHER_VIP, VPORT)),
            fx.front,
            |s| s.new_no_rule += 1,
        );
        fx.punted("wrong ingress port", &good, fx.back, |s| {
            s.new_wrong_port += 1
        });
        fx.punted(
            "slot without member",
            &syn(from, (VIP, 82)),
            fx.front,
            |s| s.new_no_member += 1,
        );
        fx.punted(
            "slot beyond the pool",
            &syn(from, (VIP, 83)),
            fx.front,
            |s| s.new_no_member += 1,
        );
        fx.punted("member not valid", &syn(from, (VIP, 84)), fx.front, |s| {
            s.new_no_member += 1
        });

        // The owner's ring full (PROD - CONS = records), across the wrap too.
        for cons in [0, 5, u32::MAX - 2] {
            fx.set_ring(owner, cons.wrapping_add(RECORDS), cons);
            fx.punted("ring full", &good, fx.front, |s| s.new_ring_full += 1);
        }
        // One record free: the SYN takes it; then full again.
        fx.set_ring(owner, 7 + RECORDS - 1, 7);
        let (_, ring) = fx.forwarded("the last free record", &good, fx.front);
        assert_eq!(ring, owner);
        fx.punted("full again", &good, fx.front, |s| s.new_ring_full += 1);
        // The other worker's ring is not the owner's: a full one there changes nothing.
        fx.set_ring(owner, 0, 0);
        fx.set_ring(1 - owner, RECORDS, 0);
        fx.forwarded("another worker's ring full", &good, fx.front);
        fx.set_ring(1 - owner, 0, 0);
        fx.set_ring(owner, 0, 0);

        set_nf_enabled(fx.mem, false);
        fx.punted("new flows off", &good, fx.front, |s| s.new_off += 1);
        set_nf_enabled(fx.mem, true);

        fx.punted(
            "SYN with payload",
            &syn_with(from, to, Seg::default(), &OPTS, b"data"),
            fx.front,
            |s| s.not_eligible += 1,
        );
        for (what, seg) in [
            (
                "SYN+ACK",
                Seg {
                    ack: true,
                    ..Seg::default()
                },
            ),
            (
                "SYN+FIN",
                Seg {
                    fin: true,
                    ..Seg::default()
                },
            ),
            (
                "SYN+RST",
                Seg {
                    rst: true,
                    ..Seg::default()
                },
            ),
            (
                "SYN, TTL 1",
                Seg {
                    ttl: 1,
                    ..Seg::default()
                },
            ),
        ] {
            fx.punted(what, &syn_with(from, to, seg, &OPTS, &[]), fx.front, |s| {
                s.not_eligible += 1
            });
        }
        let mut frag = good.clone();
        frag[14 + 6] = 0x20; // more fragments
        fx.punted("fragment", &frag, fx.front, |s| s.not_eligible += 1);
        let mut truncated = good.clone();
        truncated.truncate(good.len() - 4);
        fx.punted("header beyond the frame", &truncated, fx.front, |s| {
            s.not_eligible += 1
        });

        fx.xdp.clear_tx_port(u32::from(BACK)).unwrap();
        fx.punted("no egress in xlb_tx", &good, fx.front, |s| s.no_tx += 1);
        fx.xdp.set_tx_port(u32::from(BACK), fx.back).unwrap();

        // A flow the worker published (here a line with the SYN's key, not even fast): its
        // SYN is the worker's.
        let line = 0;
        let put =
            |i: usize, v: u32| fx.mem[fx.layout.line_word(line, i)].store(v, Ordering::Release);
        put(w::PROTO_RULE, 6 | (u32::from(RULE) << 16));
        put(w::MATCH_SADDR, wire_word(CLIENT));
        put(w::MATCH_DADDR, wire_word(VIP));
        put(w::MATCH_PORTS, ports_word(40000, VPORT));
        let h = xlb_engine::fast::fast_hash(
            &KEYS,
            wire_word(CLIENT),
            wire_word(VIP),
            ports_word(40000, VPORT),
            6,
        ) as u32;
        let slot = fx.layout.slot_word(h & (fx.layout.index_slots - 1));
        fx.mem[slot].store(line + 1, Ordering::Release);
        fx.punted("a published flow's SYN", &good, fx.front, |s| {
            s.not_eligible += 1
        });
        fx.mem[slot].store(0, Ordering::Release);

        // The table's switch off: everything punts, uncounted.
        set_enabled(fx.mem, false);
        fx.punted("switch off", &good, fx.front, |_| {});
        set_enabled(fx.mem, true);

        // And after all that, the same SYN goes.
        let (_, ring) = fx.forwarded("back to normal", &good, fx.front);
        assert_eq!(ring, owner);
        assert_eq!(ELEMENT_WORDS, 16);
    });
}

#[test]
fn a_partial_checksum_syn_is_completed() {
    with_lab("syn_partial", |f0, f1| {
        let fx = Fx::new(f0, f1, 1);
        let members: Vec<NfMember> = (0..2).map(|i| member(i, true)).collect();
        fx.section(&NfSection {
            rules: vec![rule(
                VPORT,
                FLAG_DNAT_ADDR | FLAG_DNAT_PORT,
                Distribution::FiveTuple,
                0,
            )],
            pools: vec![NfPool {
                table: (0..MAGLEV_SMALL).map(|s| (s % 2) as u16).collect(),
                members: members.clone(),
            }],
        });
        for (k, opts) in [&OPTS[..], &[], &[1; 40], &[1, 1, 1, 0]]
            .into_iter()
            .enumerate()
        {
            let from = (CLIENT, 41000 + k as u16);
            let mut input = syn_with(from, (VIP, VPORT), Seg::default(), opts, &[]);
            make_partial(&mut input);
            let tuple = FlowTuple {
                proto: 6,
                src: v4(CLIENT),
                src_port: from.1,
                dst: v4(VIP),
                dst_port: VPORT,
            };
            let m = &members[reduce(flow_hash(Distribution::FiveTuple, &tuple), MAGLEV_SMALL) % 2];
            let what = format!("partial SYN, {} option bytes", opts.len());
            let i = fx.prod(0).load(Ordering::Acquire);
            let t0 = sys::monotonic_ns();
            let (out, _) = fx.forwarded(&what, &input, fx.front);
            let t1 = sys::monotonic_ns();
            check_out(&what, &input, &out, m, m.addr, BPORT);
            // The record holds the headers as received: the partial checksum.
            check_record(&what, &fx, 0, i, &input, m, BPORT, (t0, t1));
        }
    });
}
