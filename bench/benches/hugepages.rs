//! A new flow into an engine of 1 M flows (150 MB of tables: every insert misses the cache
//! on the index and the record, and with 4 KiB pages the TLB as well), with the tables on
//! normal pages and with them advised for transparent huge pages as xlbd's `--huge-pages
//! auto` does (`xlb_afxdp::huge::advise_all` over `Engine::memory_regions`). The engine's
//! own `new_flow` bench (`tcp_syn/1048576_capacity`) is the first case; it lives here because
//! the engine cannot call the platform crate.
//!
//! Each batch starts from a fresh engine (untimed: allocation, initialisation and advice),
//! then times up to 1 M SYNs of distinct clients, each a new flow. What backs the tables is
//! printed before each case (bytes on huge pages by `/proc/self/smaps`).
//!
//! Run: `cargo bench -p xlb-bench --bench hugepages` (`-- --quick` for a short run). The
//! kernel must have THP in `madvise` or `always` mode for the second case to differ.
//!
//! `-- --paired [ROUNDS]` instead fills whole 1 M tables, normal pages and advised in turn
//! (the order alternating by round), then sends every SYN again in a scattered order (each
//! a lookup that finds its flow, anywhere in the table), and prints every round's ns per new
//! flow and per hit, and the medians: on a shared machine whose load moves between criterion's groups, pairs taken
//! seconds apart compare better than groups taken a minute apart.

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion, Throughput};
use etherparse::PacketBuilder;
use xlb_afxdp::huge::{self, Thp};
use xlb_afxdp::sys::prefetch;
use xlb_engine::admission::AdmissionLimits;
use xlb_engine::config::{Config, MemberHealth};
use xlb_engine::{compile, Engine, EngineConfig, Route, RuleSet};

const CONFIG: &str = r#"
[[frontends]]
name = "web"
address = "198.18.0.100"
kind = "public"

[[backend_pools]]
name = "web"
members = [{ address = "198.18.1.11" }, { address = "198.18.1.12" }, { address = "198.18.1.13" }]

[[load_balancing_rules]]
name = "http"
frontend = "web"
protocol = "TCP"
frontend_port = 80
backend_pool = "web"
backend_port = 8080
"#;

const T0: u64 = 1_000_000_000_000;
const XLB: [u8; 6] = [2, 0, 0, 0, 0xa0, 0];
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0xc1, 1];
const CAPACITY: u32 = 1 << 20;

fn rules() -> Arc<RuleSet> {
    let cfg = Config::from_toml_str(CONFIG).unwrap();
    Arc::new(compile(&cfg, None, &MemberHealth::default(), 1).unwrap())
}

/// An engine of `CAPACITY` flows whose admission budgets let SYNs fill it without evictions.
fn engine(rules: &Arc<RuleSet>, advise: bool) -> Engine {
    let cfg = EngineConfig {
        flow_capacity: CAPACITY,
        admission: AdmissionLimits {
            half_open_percent: 100,
            unreplied_udp_percent: 100,
            rule_percent: 100,
        },
        ..EngineConfig::default()
    };
    let mut e = Engine::new(cfg, Arc::clone(rules), T0);
    let net = e.next_hops();
    net.set_port(0, XLB);
    net.set_port(1, XLB);
    net.set_routes(vec![
        Route::v4(Ipv4Addr::new(198, 18, 0, 0), 16, 0, None),
        Route::v4(Ipv4Addr::new(198, 18, 1, 0), 24, 1, None),
    ]);
    for b in 11..=13 {
        net.set_neighbor(
            Ipv4Addr::new(198, 18, 1, b).into(),
            1,
            [2, 0, 0, 0, 0xb0, b],
        )
        .unwrap();
    }
    if advise {
        let (_, err) = huge::advise_all(&ranges(&e));
        assert!(err.is_none(), "advice refused: {err:?}");
    }
    e
}

fn ranges(e: &Engine) -> Vec<(usize, usize)> {
    e.memory_regions()
        .map(|r| (r.start as usize, r.len))
        .collect()
}

fn syn(i: u32) -> Vec<u8> {
    // 198.18.0.0/16 minus the VIP's /24 neighbourhood: plenty of distinct clients.
    let host = 0x0200 + i / 60_000;
    let src = [198, 18, (host >> 8) as u8, host as u8];
    let mut v = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, XLB)
        .ipv4(src, [198, 18, 0, 100], 64)
        .tcp(1024 + (i % 60_000) as u16, 80, 1000, 64000)
        .syn()
        .write(&mut v, &[])
        .unwrap();
    v.resize(64, 0);
    v
}

/// Tables filled by one batch of SYNs: how much huge pages back, printed once per case.
fn show_backing(rules: &Arc<RuleSet>, frames: &[Vec<u8>], advise: bool) {
    let mut e = engine(rules, advise);
    let mut buf = [0u8; 64];
    for f in frames {
        buf.copy_from_slice(f);
        e.process(T0, 0, &mut buf);
    }
    let r = ranges(&e);
    let bytes: usize = r.iter().map(|r| r.1).sum();
    println!(
        "tables of {CAPACITY} flows, {} (THP {}): {} of {bytes} bytes on huge pages after {} \
         new flows; process AnonHugePages {} bytes",
        if advise { "advised" } else { "not advised" },
        Thp::host(),
        huge::backed(&r).unwrap_or(0),
        e.flow_count(),
        huge::anon_huge_bytes().unwrap_or(0),
    );
}

/// Runs `frames` through `e` in the given order, as the worker does with or without its
/// look-ahead; ns per frame.
fn run(e: &mut Engine, frames: &[Vec<u8>], order: &[u32], lookahead: bool) -> f64 {
    let mut buf = [0u8; 64];
    let start = Instant::now();
    for batch in order.chunks(64) {
        if lookahead {
            for stage in 0..2 {
                for &i in batch {
                    if let Some(addr) = e.prefetch_addr(&frames[i as usize], stage) {
                        prefetch(addr);
                    }
                }
            }
        }
        for &i in batch {
            buf.copy_from_slice(&frames[i as usize]);
            black_box(e.process(T0, 0, &mut buf));
        }
    }
    start.elapsed().as_nanos() as f64 / order.len() as f64
}

/// A fresh engine filled with `frames` (one new flow each), then every frame again in a
/// scattered order (a lookup that finds its flow: a retransmitted SYN); ns per frame of each.
fn fill_and_hit(
    rules: &Arc<RuleSet>,
    frames: &[Vec<u8>],
    scattered: &[u32],
    advise: bool,
    lookahead: bool,
) -> (f64, f64) {
    let mut e = engine(rules, advise);
    let in_order: Vec<u32> = (0..frames.len() as u32).collect();
    let new_flow = run(&mut e, frames, &in_order, lookahead);
    assert_eq!(e.flow_count(), frames.len(), "every SYN made a flow");
    let hit = run(&mut e, frames, scattered, lookahead);
    assert_eq!(e.flow_count(), frames.len(), "no SYN made another flow");
    (new_flow, hit)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn paired(rounds: usize) {
    let rules = rules();
    let frames: Vec<Vec<u8>> = (0..CAPACITY).map(syn).collect();
    // An odd multiplier modulo 2^20 visits every flow once, far from the previous one.
    let scattered: Vec<u32> = (0..CAPACITY)
        .map(|i| i.wrapping_mul(0x9E37_79B1) & (CAPACITY - 1))
        .collect();
    show_backing(&rules, &frames, false);
    show_backing(&rules, &frames, true);
    // [lookahead][advised]: (new flow, hit) figures.
    let mut figures: [[Vec<(f64, f64)>; 2]; 2] = Default::default();
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let mut line = format!(
            "round {round} (load {}), ns per new flow / per hit:",
            load.split_whitespace().next().unwrap_or("?")
        );
        for lookahead in [false, true] {
            for advise in order {
                let (new_flow, hit) = fill_and_hit(&rules, &frames, &scattered, advise, lookahead);
                figures[usize::from(lookahead)][usize::from(advise)].push((new_flow, hit));
                line.push_str(&format!(
                    " {}{}={new_flow:.0}/{hit:.0}",
                    if lookahead { "lookahead/" } else { "" },
                    if advise { "thp" } else { "normal" }
                ));
            }
        }
        println!("{line}");
    }
    for (lookahead, pair) in figures.iter().enumerate() {
        let how = if lookahead == 1 {
            "with look-ahead"
        } else {
            "frame by frame"
        };
        for (what, pick) in [
            ("new flow", (|f: &(f64, f64)| f.0) as fn(&(f64, f64)) -> f64),
            ("hit", |f: &(f64, f64)| f.1),
        ] {
            let normal = median(&mut pair[0].iter().map(pick).collect::<Vec<_>>());
            let thp = median(&mut pair[1].iter().map(pick).collect::<Vec<_>>());
            println!(
                "median of {rounds} rounds, {what}, {how}: normal pages {normal:.0} ns, THP \
                 advised {thp:.0} ns ({:+.0} %)",
                (thp / normal - 1.0) * 100.0
            );
        }
    }
}

fn bench_new_flow(c: &mut Criterion) {
    let rules = rules();
    let frames: Vec<Vec<u8>> = (0..CAPACITY).map(syn).collect();
    let mut g = c.benchmark_group("new_flow_huge_pages");
    g.throughput(Throughput::Elements(1));
    g.sample_size(10);
    // Normal pages first: memory glibc reuses after an advised case keeps its advice.
    for (name, advise) in [("normal_pages", false), ("thp_advised", true)] {
        show_backing(&rules, &frames, advise);
        for lookahead in [false, true] {
            let id = format!(
                "tcp_syn{}/{CAPACITY}_capacity/{name}",
                if lookahead { "_lookahead" } else { "" }
            );
            g.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    let mut left = iters;
                    let mut buf = [0u8; 64];
                    while left > 0 {
                        let n = left.min(u64::from(CAPACITY)) as usize;
                        let mut e = engine(&rules, advise);
                        let start = Instant::now();
                        for batch in frames[..n].chunks(64) {
                            if lookahead {
                                for stage in 0..2 {
                                    for f in batch {
                                        if let Some(addr) = e.prefetch_addr(f, stage) {
                                            prefetch(addr);
                                        }
                                    }
                                }
                            }
                            for f in batch {
                                buf.copy_from_slice(f);
                                black_box(e.process(T0, 0, &mut buf));
                            }
                        }
                        total += start.elapsed();
                        left -= n as u64;
                    }
                    total
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench_new_flow);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--paired") {
        let rounds = args.get(i + 1).and_then(|r| r.parse().ok()).unwrap_or(7);
        paired(rounds);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
