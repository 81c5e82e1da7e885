//! Drives the established-flow path, or new-flow creation, for profiling
//! (`valgrind --tool=callgrind`):
//! `cargo build --release -p xlb-engine --example hotpath && valgrind --tool=callgrind target/release/examples/hotpath 200000`
//! (established), `... hotpath syn 200000` (a new TCP flow per packet, distinct clients),
//! `... hotpath expire 200000` (those flows, then expiring them all). A third argument sets the
//! flow capacity (default 65 536) and lifts the admission budgets to 100 % (every SYN a new
//! flow into a table with room, as the `new_flow/tcp_syn` bench), e.g.
//! `hotpath syn 1000000 1048576`; the new flows are created in `create_flows`, which
//! `--toggle-collect=hotpath::create_flows` isolates. `syn-lookahead` instead of `syn` runs
//! xlbd's worker's look-ahead first on each batch of 64 frames (both index keys prefetched).
//! `hotpath spread N CAPACITY` fills the table to 95 % of CAPACITY, then sends N established
//! packets (original direction) to flows picked at random among them: the cost of a packet
//! whose flow is not in the cache; `--toggle-collect=hotpath::forward_one` counts only the
//! engine's part (the driver builds each frame outside it).

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::sync::Arc;

use etherparse::PacketBuilder;
use xlb_engine::admission::AdmissionLimits;
use xlb_engine::config::{Config, MemberHealth};
use xlb_engine::{compile, Engine, EngineConfig, Route, Verdict};

const CONFIG: &str = r#"
[[frontends]]
name = "web"
address = "198.18.0.100"
kind = "public"

[[backend_pools]]
name = "web"
members = [{ address = "198.18.1.11" }, { address = "198.18.1.12" }]

[[load_balancing_rules]]
name = "http"
frontend = "web"
protocol = "TCP"
frontend_port = 80
backend_pool = "web"
backend_port = 8080
tcp_reset = true
"#;

fn frame(sport: u16, syn: bool) -> Vec<u8> {
    let ack = (!syn).then_some(1);
    let ips = ([198, 18, 0, 10], VIP);
    tcp_frame((CLIENT_MAC, PORT0_MAC), ips, (sport, 80), 1000, (syn, ack)).to_vec()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let lookahead = args.first().is_some_and(|a| a == "syn-lookahead");
    let syn_mode = lookahead || args.first().is_some_and(|a| a == "syn");
    let expire_mode = args.first().is_some_and(|a| a == "expire");
    let spread_mode = args.first().is_some_and(|a| a == "spread");
    let n: usize = args
        .get(usize::from(syn_mode || expire_mode || spread_mode))
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000_000);
    let cfg = Config::from_toml_str(CONFIG).unwrap();
    let rules = Arc::new(compile(&cfg, None, &MemberHealth::default(), 1).unwrap());
    let cfg = match args.get(2).and_then(|a| a.parse().ok()) {
        Some(capacity) => EngineConfig {
            flow_capacity: capacity,
            admission: AdmissionLimits {
                half_open_percent: 100,
                unreplied_udp_percent: 100,
                rule_percent: 100,
            },
            ..EngineConfig::default()
        },
        None => EngineConfig::default(),
    };
    let mut e = Engine::new(cfg, rules, 0);
    let net = e.next_hops();
    net.set_port(0, [2, 0, 0, 0, 0xa0, 0]);
    net.set_port(1, [2, 0, 0, 0, 0xa0, 1]);
    net.set_routes(vec![Route::v4(Ipv4Addr::new(198, 18, 0, 0), 16, 1, None)]);
    for b in [11, 12] {
        net.set_neighbor(
            Ipv4Addr::new(198, 18, 1, b).into(),
            1,
            [2, 0, 0, 0, 0xb0, b],
        )
        .unwrap();
    }
    if spread_mode {
        let capacity = e.flow_capacity() as usize;
        let flows = capacity / 100 * 95;
        handshakes(&mut e, flows);
        spread(&mut e, n, flows);
        return;
    }
    if syn_mode || expire_mode {
        new_flows(&mut e, n, lookahead);
        if expire_mode {
            // Every flow is a half-open TCP flow: due at the half-open timeout.
            let at = 2 + 3_600_000_000_000;
            let start = std::time::Instant::now();
            let mut sink = |_: u16, _: &[u8]| {};
            let mut handled = 0;
            loop {
                let done = e.expire(at, 4096, &mut sink);
                handled += done;
                if done == 0 {
                    break;
                }
            }
            let el = start.elapsed();
            eprintln!(
                "{n} flows expired ({handled} timer entries), {:.1} ns/flow, {} left",
                el.as_nanos() as f64 / n as f64,
                e.flow_count()
            );
        }
        return;
    }
    let flows = 1000u16;
    for s in 0..flows {
        let mut f = frame(10_000 + s, true);
        assert!(matches!(e.process(1, 0, &mut f), Verdict::Tx { .. }));
    }
    let frames: Vec<Vec<u8>> = (0..flows).map(|s| frame(10_000 + s, false)).collect();
    let mut buf = [0u8; 64];
    let start = std::time::Instant::now();
    for i in 0..n {
        buf.copy_from_slice(&frames[i % flows as usize]);
        black_box(e.process(2 + i as u64, 0, &mut buf));
    }
    let el = start.elapsed();
    eprintln!(
        "{n} packets, {:.1} ns/packet",
        el.as_nanos() as f64 / n as f64
    );
}

/// Client address and port of the `i`th flow `new_flows` creates.
fn client(i: usize) -> ([u8; 4], u16) {
    let host = 0x0200 + (i / 60_000) as u32;
    (
        [198, 18, (host >> 8) as u8, host as u8],
        1024 + (i % 60_000) as u16,
    )
}

fn tcp_frame(
    macs: ([u8; 6], [u8; 6]),
    ips: ([u8; 4], [u8; 4]),
    ports: (u16, u16),
    seq: u32,
    flags: (bool, Option<u32>),
) -> [u8; 64] {
    let b = PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv4(ips.0, ips.1, 64)
        .tcp(ports.0, ports.1, seq, 64000);
    let b = if flags.0 { b.syn() } else { b };
    let b = match flags.1 {
        Some(ack) => b.ack(ack),
        None => b,
    };
    let mut v = Vec::with_capacity(64);
    b.write(&mut v, &[]).unwrap();
    v.resize(64, 0);
    v.try_into().unwrap()
}

const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0xc1, 1];
const PORT0_MAC: [u8; 6] = [2, 0, 0, 0, 0xa0, 0];
const PORT1_MAC: [u8; 6] = [2, 0, 0, 0, 0xa0, 1];
const VIP: [u8; 4] = [198, 18, 0, 100];

/// Opens `flows` TCP flows with the whole handshake (SYN, the backend's SYN-ACK, the client's
/// ACK), so that they are established.
fn handshakes(e: &mut Engine, flows: usize) {
    for i in 0..flows {
        let (src, sport) = client(i);
        let mut syn = tcp_frame(
            (CLIENT_MAC, PORT0_MAC),
            (src, VIP),
            (sport, 80),
            1000,
            (true, None),
        );
        assert!(matches!(
            e.process(2, 0, &mut syn),
            Verdict::Tx { port: 1, .. }
        ));
        // The rewritten SYN names the backend the flow went to.
        let backend: [u8; 4] = syn[30..34].try_into().unwrap();
        let backend_mac = [2, 0, 0, 0, 0xb0, backend[3]];
        let mut syn_ack = tcp_frame(
            (backend_mac, PORT1_MAC),
            (backend, src),
            (8080, sport),
            5000,
            (true, Some(1001)),
        );
        assert!(matches!(
            e.process(2, 1, &mut syn_ack),
            Verdict::Tx { port: 0, .. }
        ));
        let mut ack = tcp_frame(
            (CLIENT_MAC, PORT0_MAC),
            (src, VIP),
            (sport, 80),
            1001,
            (false, Some(5001)),
        );
        assert!(matches!(
            e.process(2, 0, &mut ack),
            Verdict::Tx { port: 1, .. }
        ));
    }
    eprintln!("{flows} flows established, {} in the table", e.flow_count());
}

/// `n` established packets to flows among the first `flows`, in a pseudo-random order.
fn spread(e: &mut Engine, n: usize, flows: usize) {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut forwarded = 0usize;
    let mut took = std::time::Duration::ZERO;
    for i in 0..n {
        // xorshift: a spread over the whole table that a prefetcher cannot guess.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let (src, sport) = client((x % flows as u64) as usize);
        let mut buf = tcp_frame(
            (CLIENT_MAC, PORT0_MAC),
            (src, VIP),
            (sport, 80),
            1001,
            (false, Some(5001)),
        );
        let start = std::time::Instant::now();
        forwarded += usize::from(forward_one(e, 3 + i as u64, &mut buf));
        took += start.elapsed();
    }
    eprintln!(
        "{n} packets over {flows} flows, {forwarded} forwarded, {:.1} ns/packet",
        took.as_nanos() as f64 / n as f64
    );
}

#[inline(never)]
fn forward_one(e: &mut Engine, now: u64, buf: &mut [u8; 64]) -> bool {
    matches!(e.process(now, 0, buf), Verdict::Tx { .. })
}

/// `n` SYNs from distinct (client address, port) pairs: one new flow each.
fn new_flows(e: &mut Engine, n: usize, lookahead: bool) {
    let frames: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let (src, sport) = client(i);
            let ips = (src, VIP);
            tcp_frame(
                (CLIENT_MAC, PORT0_MAC),
                ips,
                (sport, 80),
                1000,
                (true, None),
            )
            .to_vec()
        })
        .collect();
    let start = std::time::Instant::now();
    if lookahead {
        create_flows_lookahead(e, &frames);
    } else {
        create_flows(e, &frames);
    }
    let el = start.elapsed();
    eprintln!(
        "{n} new flows, {:.1} ns/flow, {} in the table",
        el.as_nanos() as f64 / n as f64,
        e.flow_count()
    );
}

#[inline(never)]
fn create_flows(e: &mut Engine, frames: &[Vec<u8>]) {
    let mut buf = [0u8; 64];
    for f in frames {
        buf.copy_from_slice(f);
        black_box(e.process(2, 0, &mut buf));
    }
}

#[inline(never)]
fn create_flows_lookahead(e: &mut Engine, frames: &[Vec<u8>]) {
    let mut buf = [0u8; 64];
    let mut hints = [None; 64];
    for batch in frames.chunks(64) {
        for (f, hint) in batch.iter().zip(hints.iter_mut()) {
            *hint = e.lookahead(f);
            if let Some(addr) = hint.as_ref().and_then(|h| e.lookahead_addr(h, 0)) {
                prefetch(addr);
            }
        }
        for hint in hints[..batch.len()].iter().flatten() {
            if let Some(addr) = e.lookahead_addr(hint, 1) {
                prefetch(addr);
            }
        }
        for (f, hint) in batch.iter().zip(&hints) {
            buf.copy_from_slice(f);
            let len = buf.len();
            black_box(e.process_hinted(2, 0, &mut buf, len, hint.as_ref()));
        }
    }
}

/// Starts loading the cache line at `addr`, as xlbd's worker does (`xlb_afxdp::sys::prefetch`).
#[inline(always)]
fn prefetch(addr: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is an SSE instruction, part of the x86_64 baseline, and does not
    // dereference `addr` in any way the program can observe (no fault, no value).
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(addr.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}
