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
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0xc1, 1], [2, 0, 0, 0, 0xa0, 0])
        .ipv4([198, 18, 0, 10], [198, 18, 0, 100], 64)
        .tcp(sport, 80, 1000, 64000);
    let b = if syn { b.syn() } else { b.ack(1) };
    let mut v = Vec::new();
    b.write(&mut v, &[]).unwrap();
    v.resize(64, 0);
    v
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let lookahead = args.first().is_some_and(|a| a == "syn-lookahead");
    let syn_mode = lookahead || args.first().is_some_and(|a| a == "syn");
    let expire_mode = args.first().is_some_and(|a| a == "expire");
    let n: usize = args
        .get(usize::from(syn_mode || expire_mode))
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

/// `n` SYNs from distinct (client address, port) pairs: one new flow each.
fn new_flows(e: &mut Engine, n: usize, lookahead: bool) {
    let frames: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let host = 0x0200 + (i / 60_000) as u32;
            let src = [198, 18, (host >> 8) as u8, host as u8];
            let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0xc1, 1], [2, 0, 0, 0, 0xa0, 0])
                .ipv4(src, [198, 18, 0, 100], 64)
                .tcp(1024 + (i % 60_000) as u16, 80, 1000, 64000)
                .syn();
            let mut v = Vec::new();
            b.write(&mut v, &[]).unwrap();
            v.resize(64, 0);
            v
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
