//! XDP's cost per frame, as the kernel times it: `BPF_PROG_TEST_RUN` with `repeat` runs the
//! program on one frame many times and reports the average duration of one run (the program
//! alone: no driver, no transmission; XDP_REDIRECT is decided but nothing is sent).
//!
//! Run as root: `cargo run -p xlb-afxdp --example xdp_cost [rounds]`. It builds a throwaway
//! lab (network namespaces and veths, 198.18.0.0/15 only, deleted at the end), attaches the
//! program to the forwarder's two veths, writes the fast table with the engine's layout and
//! writer, and prints ns per frame for each kind of frame, each round and the spread.
//!
//! The program rewrites the frame in place and a repeated run sees the rewritten frame, so
//! every forwarded frame here is rewritten into itself (flows and rule without address or
//! port translation: only the hop's MACs, the TTL and the checksums change) and starts with
//! a TTL of 255; a batch is at most [`BATCH`] runs, each batch from the original frame.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicU32, Ordering};

use common::*;
use etherparse::PacketBuilder;
use xlb_afxdp::{netlink::Netlink, AddrKind, ModeRequest, XdpProgram};
use xlb_engine::{
    fast::{
        fast_hash, init_header, line as w, ports_word, set_enabled, wire_word, FastLayout,
        STATE_FAST, STATE_TCP, STATE_WSCALE_SHIFT,
    },
    fast_new::{
        ring_pop, set_nf_enabled, write_section, NfMember, NfPool, NfRecord, NfRule, NfSection,
        RingDrain,
    },
    terms::Distribution,
};

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
/// Runs per `BPF_PROG_TEST_RUN` (below the TTL of 255 the frames start with).
const BATCH: u32 = 250;
/// Batches per measurement.
const BATCHES: u32 = 400;

const CLIENT: [u8; 4] = [198, 18, 1, 2];
const VIP: [u8; 4] = [198, 18, 100, 1];
const NO_RULE_VIP: [u8; 4] = [198, 18, 100, 2];
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x01];
const F0_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x10];
const F1_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x11];
const SERVER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x22];
const FRONT: u16 = 0;
const BACK: u16 = 1;
const WORKERS: u16 = 2;
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
/// SYN options as Linux sends them (MSS, SACK permitted, timestamps, window scale).
const OPTS: [u8; 20] = [
    2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0x12, 0x34, 0, 0, 0, 0, 1, 3, 3, 7,
];

struct Fx {
    xdp: XdpProgram,
    mem: &'static [AtomicU32],
    layout: FastLayout,
    front: u32,
}

impl Fx {
    fn new(f0: &str, f1: &str) -> Fx {
        let mut nl = Netlink::open().unwrap();
        let front = nl.link_by_name(f0).unwrap().ifindex;
        let back = nl.link_by_name(f1).unwrap().ifindex;
        // The daemon's geometry: production ring size.
        let layout = FastLayout::new(1024, WORKERS).with_ring_records(
            std::env::var("RING")
                .ok()
                .map_or(xlb_engine::fast_new::NF_RING_RECORDS, |v| {
                    v.parse().unwrap()
                }),
        );
        let mut xdp = XdpProgram::load_with(layout.elements()).unwrap();
        xdp.add_addr(VIP.into(), AddrKind::Owned).unwrap();
        xdp.add_addr(NO_RULE_VIP.into(), AddrKind::Owned).unwrap();
        xdp.attach(front, ModeRequest::Native, false).unwrap();
        xdp.attach(back, ModeRequest::Native, true).unwrap();
        assert!(xdp.set_fast_port(front, u32::from(FRONT), true).unwrap());
        assert!(xdp.set_fast_port(back, u32::from(BACK), true).unwrap());
        xdp.set_tx_port(u32::from(FRONT), front).unwrap();
        xdp.set_tx_port(u32::from(BACK), back).unwrap();
        let mem = xdp.fast_table().unwrap();
        init_header(mem, &layout, KEYS, STEER);
        set_enabled(mem, true);
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&SERVER_MAC);
        macs[6..].copy_from_slice(&F1_MAC);
        let members = (0..8)
            .map(|i| NfMember {
                valid: true,
                addr: [198, 18, 2, 2 + i],
                tx_port: BACK,
                macs,
            })
            .collect();
        let section = NfSection {
            rules: vec![NfRule {
                vip: VIP,
                vport: 80,
                rule: 9,
                ingress_port: FRONT,
                // Floating IP: the SYN out is the SYN in but for the hop (see the top).
                flags: 0,
                backend_port: 80,
                dist: Distribution::FiveTuple,
                pool: 0,
            }],
            pools: vec![NfPool {
                table: (0..xlb_engine::select::MAGLEV_SMALL)
                    .map(|s| (s % 8) as u16)
                    .collect(),
                members,
            }],
        };
        set_nf_enabled(mem, false);
        assert_eq!(write_section(mem, &layout, &section).left_out, 0);
        set_nf_enabled(mem, true);
        Fx {
            xdp,
            mem,
            layout,
            front,
        }
    }

    /// Publishes line `line` for frames `from` → `to` of `proto`, forwarded unchanged but for
    /// the hop (the worker's order: everything, the index slot, the state last).
    fn publish(&self, line: u32, proto: u8, from: ([u8; 4], u16), to: ([u8; 4], u16), state: u32) {
        let put =
            |i: usize, v: u32| self.mem[self.layout.line_word(line, i)].store(v, Ordering::Relaxed);
        put(w::STATE, 0);
        put(w::INGRESS_PORT, u32::from(FRONT));
        put(w::TX_PORT, u32::from(BACK));
        put(w::PROTO_RULE, u32::from(proto) | (9 << 16));
        let (s, d, p) = (wire_word(from.0), wire_word(to.0), ports_word(from.1, to.1));
        put(w::MATCH_SADDR, s);
        put(w::MATCH_DADDR, d);
        put(w::MATCH_PORTS, p);
        put(w::NEW_SADDR, s);
        put(w::NEW_DADDR, d);
        put(w::NEW_PORTS, p);
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&SERVER_MAC);
        macs[6..].copy_from_slice(&F1_MAC);
        for (i, c) in macs.chunks_exact(4).enumerate() {
            put(w::MACS + i, wire_word([c[0], c[1], c[2], c[3]]));
        }
        put(w::NEXT_SEQ, 1000);
        put(w::MAX_WIN, 1 << 20);
        put(w::LAST_SEEN, 0);
        let home = (fast_hash(&KEYS, s, d, p, proto) as u32) & (self.layout.index_slots - 1);
        self.mem[self.layout.slot_word(home)].store(line + 1, Ordering::Release);
        self.mem[self.layout.line_word(line, w::STATE)].store(state, Ordering::Release);
    }

    /// `PROD` and `CONS` of every ring.
    fn ring_words(&self) -> Vec<(&AtomicU32, &AtomicU32)> {
        (0..WORKERS)
            .map(|r| {
                let e = self.layout.nf_rings_base + u32::from(r) * self.layout.nf_ring_elements;
                (
                    &self.mem[self.layout.element_word(e, 0)],
                    &self.mem[self.layout.element_word(e + 1, 0)],
                )
            })
            .collect()
    }

    /// Every ring empty (`CONS = PROD`): what a worker that keeps up leaves.
    fn rings_empty(&self) {
        for (p, c) in self.ring_words() {
            c.store(p.load(Ordering::Acquire), Ordering::Release);
        }
    }

    /// Waits (bounded) until a consumer elsewhere has emptied every ring.
    fn rings_drained(&self) {
        for _ in 0..10_000_000 {
            if self
                .ring_words()
                .iter()
                .all(|(p, c)| p.load(Ordering::Acquire) == c.load(Ordering::Acquire))
            {
                return;
            }
            std::hint::spin_loop();
        }
        panic!("the consumer did not empty the rings");
    }

    /// Every ring full (`PROD = CONS + records`: as a ring fills, by its producer's counter;
    /// CONS never goes back).
    fn rings_full(&self) {
        for (p, c) in self.ring_words() {
            let cons = c.load(Ordering::Acquire);
            p.store(
                cons.wrapping_add(self.layout.nf_ring_records),
                Ordering::Release,
            );
        }
    }

    /// Average ns per run of `frame` over [`BATCHES`] batches of [`BATCH`] runs, `before`
    /// called before each batch; checks every batch ends with `action`.
    fn cost(&self, frame: &[u8], action: u32, before: impl Fn(&Fx)) -> f64 {
        let mut total = 0u64;
        for _ in 0..BATCHES {
            before(self);
            let (got, ns) = self.xdp.test_run_repeat(frame, self.front, BATCH).unwrap();
            assert_eq!(got, action, "unexpected action");
            total += u64::from(ns);
        }
        total as f64 / f64::from(BATCHES)
    }
}

/// A kind of frame: its name, the frame, the action expected, what to do before each batch.
type Case = (&'static str, Vec<u8>, u32, fn(&Fx));

fn udp(from: ([u8; 4], u16), to: ([u8; 4], u16)) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, F0_MAC)
        .ipv4(from.0, to.0, 255)
        .udp(from.1, to.1)
        .write(&mut v, &[0u8; 18])
        .unwrap();
    v
}

fn tcp(from: ([u8; 4], u16), to: ([u8; 4], u16), syn: bool) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, F0_MAC)
        .ipv4(from.0, to.0, 255)
        .tcp(from.1, to.1, 1000, 1000);
    let mut v = Vec::new();
    if syn {
        b.syn()
            .options_raw(&OPTS)
            .unwrap()
            .write(&mut v, &[])
            .unwrap();
    } else {
        b.ack(1000).write(&mut v, &[]).unwrap();
    }
    v
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("rounds: a number"))
        .unwrap_or(5);
    if !need_root("xdp_cost") {
        std::process::exit(1);
    }
    let lab = Lab::new();
    let (f0, f1) = (lab.f0.clone(), lab.f1.clone());
    let rows = in_netns(&lab.fwd, move || {
        let fx = Fx::new(&f0, &f1);
        let udp_flow = ((CLIENT, 5000), (VIP, 53));
        let tcp_flow = ((CLIENT, 40000), (VIP, 443));
        fx.publish(0, 17, udp_flow.0, udp_flow.1, STATE_FAST);
        let tcp_state = STATE_FAST | STATE_TCP | (7 << STATE_WSCALE_SHIFT);
        fx.publish(2, 6, tcp_flow.0, tcp_flow.1, tcp_state);
        // The reply line, for the TCP window check.
        fx.publish(3, 6, tcp_flow.1, tcp_flow.0, tcp_state);
        let frames: [Case; 5] = [
            (
                "punted: UDP, no flow",
                udp((CLIENT, 5001), (NO_RULE_VIP, 53)),
                XDP_PASS,
                |_| (),
            ),
            (
                "established UDP (published)",
                udp(udp_flow.0, udp_flow.1),
                XDP_REDIRECT,
                |_| (),
            ),
            (
                "established TCP ACK (published)",
                tcp(tcp_flow.0, tcp_flow.1, false),
                XDP_REDIRECT,
                |_| (),
            ),
            (
                "SYN opening a new flow",
                tcp((CLIENT, 40001), (VIP, 80), true),
                XDP_REDIRECT,
                Fx::rings_empty,
            ),
            (
                "SYN, ring full (punted)",
                tcp((CLIENT, 40001), (VIP, 80), true),
                XDP_PASS,
                Fx::rings_full,
            ),
        ];
        let mut rows: Vec<(String, Vec<f64>)> = frames
            .iter()
            .map(|(name, frame, action, before)| {
                let runs: Vec<f64> = (0..rounds)
                    .map(|_| fx.cost(frame, *action, before))
                    .collect();
                (name.to_string(), runs)
            })
            .collect();
        // The same SYNs with a worker consuming the rings on another core meanwhile, as the
        // engine does: the ring's counters and records move between the two cores' caches.
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        if cores.len() >= 2 {
            core_affinity::set_for_current(cores[0]);
            for (name, passes) in [
                (
                    "SYN, consumer on another core taking records one by one",
                    false,
                ),
                (
                    "SYN, consumer on another core in passes (the engine's)",
                    true,
                ),
            ] {
                fx.rings_empty();
                let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let (mem, layout, other, halt) = (fx.mem, fx.layout, cores[1], stop.clone());
                let consumer = std::thread::spawn(move || {
                    core_affinity::set_for_current(other);
                    let mut rec = NfRecord::EMPTY;
                    while !halt.load(Ordering::Relaxed) {
                        for worker in 0..WORKERS {
                            if passes {
                                // A pass: PROD read once, CONS stored once.
                                let mut ring = RingDrain::begin(mem, &layout, worker);
                                while ring.next(mem, &mut rec) {}
                                ring.end(mem);
                            } else {
                                // PROD read and CONS stored for every record.
                                while ring_pop(mem, &layout, worker, &mut rec) {}
                            }
                        }
                    }
                });
                let syn = &frames[3].1;
                let runs = (0..rounds)
                    .map(|_| fx.cost(syn, XDP_REDIRECT, Fx::rings_drained))
                    .collect();
                stop.store(true, Ordering::Relaxed);
                consumer.join().unwrap();
                rows.push((name.into(), runs));
            }
        }
        rows
    })
    .join()
    .unwrap();
    drop(lab);
    println!("| frame | ns per frame: median | min | max | rounds |");
    println!("|---|---|---|---|---|");
    for (name, mut runs) in rows {
        runs.sort_by(f64::total_cmp);
        let each: Vec<String> = runs.iter().map(|r| format!("{r:.1}")).collect();
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} | {} |",
            runs[runs.len() / 2],
            runs[0],
            runs[runs.len() - 1],
            each.join(" ")
        );
    }
}
