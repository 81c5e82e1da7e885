//! Per-packet cost of the engine (targets on the 2-vCPU lab machine: ≤ 50 ns per
//! established packet, ≤ 200 ns per new flow, ≤ 100 ns per expired flow).
//!
//! Every iteration copies a 64-byte frame into the work buffer first (the engine rewrites in
//! place, so the same frame cannot be processed twice); that copy (~2 ns) is included.
//! Run: `cargo bench -p xlb-engine --bench engine`.

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use etherparse::PacketBuilder;
use xlb_engine::admission::AdmissionLimits;
use xlb_engine::config::{Config, MemberHealth};
use xlb_engine::ruleset::PortBlock;
use xlb_engine::snat::SnatPorts;
use xlb_engine::time::{mins, secs, Nanos};
use xlb_engine::{compile, Engine, EngineConfig, Lookahead, Route, RuleSet, Verdict};

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
tcp_reset = true

[[load_balancing_rules]]
name = "dns"
frontend = "web"
protocol = "UDP"
frontend_port = 53
backend_pool = "web"
backend_port = 53
"#;

const T0: Nanos = 1_000_000_000_000;
const XLB: [u8; 6] = [2, 0, 0, 0, 0xa0, 0];
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0xc1, 1];

fn rules() -> Arc<RuleSet> {
    let cfg = Config::from_toml_str(CONFIG).unwrap();
    Arc::new(compile(&cfg, None, &MemberHealth::default(), 1).unwrap())
}

/// Admission budgets at 100 %: SYNs fill the table without evictions, so `new_flow` is the
/// cost of a new flow into a table with room (`syn_flood` measures the evicting path).
const NO_BUDGETS: AdmissionLimits = AdmissionLimits {
    half_open_percent: 100,
    unreplied_udp_percent: 100,
    rule_percent: 100,
};

fn engine(capacity: u32) -> Engine {
    engine_with(capacity, NO_BUDGETS)
}

fn engine_with(capacity: u32, admission: AdmissionLimits) -> Engine {
    let cfg = EngineConfig {
        flow_capacity: capacity,
        admission,
        ..EngineConfig::default()
    };
    let mut e = Engine::new(cfg, rules(), T0);
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
    e
}

fn client_ip(i: u32) -> [u8; 4] {
    // 198.18.0.0/16 minus the VIP's /24 neighbourhood: plenty of distinct clients.
    let host = 0x0200 + i / 60_000;
    [198, 18, (host >> 8) as u8, host as u8]
}

fn tcp_frame(
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
    syn: bool,
    src_mac: [u8; 6],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src_mac, XLB)
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1000, 64000);
    // A non-SYN acknowledges the SYN-ACK (sequence 1000) exactly: the handshake of the
    // established benchmark confirms its flows (see `admission`).
    let b = if syn { b.syn() } else { b.ack(1001) };
    let mut v = Vec::new();
    b.write(&mut v, &[]).unwrap();
    v.resize(64, 0); // Ethernet minimum, as on the wire
    v
}

fn udp_frame(src: [u8; 4], sport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, XLB)
        .ipv4(src, [198, 18, 0, 100], 64)
        .udp(sport, 53);
    let mut v = Vec::new();
    b.write(&mut v, &[0u8; 18]).unwrap();
    v
}

/// An engine holding `n` established TCP flows, and for each the frame a client sends and the
/// frame its backend answers with. `stored`: the engine writes its flows into a flow store
/// (heap memory here; xlbd's is a mapped BPF array, the same loads and stores).
fn established(n: u32, stored: bool) -> (Engine, Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let mut e = engine(n.next_power_of_two().max(1024));
    if stored {
        let mem = vec![0u8; e.store_geometry().bytes()];
        e.attach_store(T0, Box::new(mem), 0).unwrap();
    }
    let (mut fwd, mut rev) = (Vec::new(), Vec::new());
    for i in 0..n {
        let (src, sport) = (client_ip(i), 1024 + (i % 60_000) as u16);
        let mut syn = tcp_frame(src, sport, [198, 18, 0, 100], 80, true, CLIENT_MAC);
        let Verdict::Tx { .. } = e.process(T0, 0, &mut syn) else {
            panic!("syn dropped")
        };
        let backend = [syn[30], syn[31], syn[32], syn[33]];
        let mut synack = tcp_frame(
            backend,
            8080,
            src,
            sport,
            true,
            [2, 0, 0, 0, 0xb0, backend[3]],
        );
        synack[47] |= 0x10; // SYN+ACK
        e.process(T0, 1, &mut synack);
        let mut ack = tcp_frame(src, sport, [198, 18, 0, 100], 80, false, CLIENT_MAC);
        e.process(T0, 0, &mut ack);
        fwd.push(tcp_frame(
            src,
            sport,
            [198, 18, 0, 100],
            80,
            false,
            CLIENT_MAC,
        ));
        rev.push(tcp_frame(
            backend,
            8080,
            src,
            sport,
            false,
            [2, 0, 0, 0, 0xb0, backend[3]],
        ));
    }
    assert_eq!(e.flow_count(), n as usize);
    (e, fwd, rev)
}

fn bench_established(c: &mut Criterion) {
    let mut g = c.benchmark_group("established");
    g.throughput(Throughput::Elements(1));
    for n in [1_000u32, 100_000] {
        let (mut e, fwd, rev) = established(n, false);
        let mut buf = [0u8; 64];
        let mut i = 0usize;
        // The same with every flow written into a flow store (what --state-dir costs).
        let (mut stored, _, _) = established(n, true);
        g.bench_function(format!("client_to_backend_stored/{n}_flows"), |b| {
            b.iter(|| {
                i = (i + 1) % fwd.len();
                buf.copy_from_slice(&fwd[i]);
                black_box(stored.process(T0, 0, &mut buf))
            })
        });
        g.bench_function(format!("client_to_backend/{n}_flows"), |b| {
            b.iter(|| {
                i = (i + 1) % fwd.len();
                buf.copy_from_slice(&fwd[i]);
                black_box(e.process(T0, 0, &mut buf))
            })
        });
        g.bench_function(format!("backend_to_client/{n}_flows"), |b| {
            b.iter(|| {
                i = (i + 1) % rev.len();
                buf.copy_from_slice(&rev[i]);
                black_box(e.process(T0, 1, &mut buf))
            })
        });
        // As the worker does it: per receive batch of 64 frames, the look-ahead's two passes
        // (index slots, then the flows they name), then the frames, each with what the first
        // pass read of it.
        g.bench_function(format!("client_to_backend_lookahead/{n}_flows"), |b| {
            b.iter_custom(|iters| {
                let mut hints = [None; 64];
                let start = Instant::now();
                let mut left = iters;
                while left > 0 {
                    let k = left.min(64) as usize;
                    i = (i + 64) % (fwd.len() - 64);
                    let batch = &fwd[i..i + k];
                    lookahead(&e, batch, &mut hints);
                    for (f, hint) in batch.iter().zip(&hints) {
                        buf.copy_from_slice(f);
                        black_box(e.process_hinted(T0, 0, &mut buf, 64, hint.as_ref()));
                    }
                    left -= k as u64;
                }
                start.elapsed()
            })
        });
    }
    g.finish();
}

/// Starts loading the cache line at `addr`, as xlbd's worker does with the look-ahead's
/// addresses (`xlb_afxdp::sys::prefetch`; the engine crate cannot depend on that one).
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

/// The worker's two look-ahead passes over a batch: the first reads each frame's key and hash
/// (kept in `hints`) and prefetches its index slot, the second prefetches what that slot names.
fn lookahead(e: &Engine, batch: &[Vec<u8>], hints: &mut [Option<Lookahead>; 64]) {
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
}

fn bench_new_flow(c: &mut Criterion) {
    let mut g = c.benchmark_group("new_flow");
    g.throughput(Throughput::Elements(1));
    // xlbd's default table (65 536 flows per worker: the index fits in L2/L3) and a 1 M-flow
    // table (120 MB: every insert misses the cache on the index).
    for capacity in [1u32 << 16, 1 << 20] {
        let frames: Vec<Vec<u8>> = (0..capacity)
            .map(|i| {
                tcp_frame(
                    client_ip(i),
                    1024 + (i % 60_000) as u16,
                    [198, 18, 0, 100],
                    80,
                    true,
                    CLIENT_MAC,
                )
            })
            .collect();
        // The same with the worker's look-ahead: per receive batch of 64 frames, the index
        // slot of every frame's original key, then what stage 1 names (the reply key's slot
        // for a new flow), then the frames themselves, each with what the first pass read.
        g.bench_function(format!("tcp_syn_lookahead/{capacity}_capacity"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut left = iters;
                let mut buf = [0u8; 64];
                let mut hints = [None; 64];
                while left > 0 {
                    let n = left.min(u64::from(capacity)) as usize;
                    let mut e = engine(capacity);
                    let start = Instant::now();
                    for batch in frames[..n].chunks(64) {
                        lookahead(&e, batch, &mut hints);
                        for (f, hint) in batch.iter().zip(&hints) {
                            buf.copy_from_slice(f);
                            black_box(e.process_hinted(T0, 0, &mut buf, 64, hint.as_ref()));
                        }
                    }
                    total += start.elapsed();
                    left -= n as u64;
                }
                total
            })
        });
        g.bench_function(format!("tcp_syn/{capacity}_capacity"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut left = iters;
                let mut buf = [0u8; 64];
                while left > 0 {
                    let n = left.min(u64::from(capacity)) as usize;
                    let mut e = engine(capacity);
                    let start = Instant::now();
                    for f in &frames[..n] {
                        buf.copy_from_slice(f);
                        black_box(e.process(T0, 0, &mut buf));
                    }
                    total += start.elapsed();
                    left -= n as u64;
                }
                total
            })
        });
    }
    // A SYN flood from spoofed sources at one rule, with xlbd's default table and budgets: the
    // rule holds its share (25 %: 16 384 half-open flows) and every further SYN evicts the
    // oldest of them. Steady state: each iteration is one eviction and one new flow.
    let capacity = 1u32 << 16;
    let mut e = engine_with(capacity, AdmissionLimits::default());
    let share = capacity / 4;
    let frames: Vec<Vec<u8>> = (0..4 * share)
        .map(|i| {
            tcp_frame(
                client_ip(i),
                1024 + (i % 60_000) as u16,
                [198, 18, 0, 100],
                80,
                true,
                CLIENT_MAC,
            )
        })
        .collect();
    let mut buf = [0u8; 64];
    for f in &frames[..share as usize] {
        buf.copy_from_slice(f);
        e.process(T0, 0, &mut buf);
    }
    assert_eq!(e.flow_count(), share as usize);
    // Cycle through the frames: a SYN whose flow was evicted long ago is a new flow again.
    let mut i = share as usize;
    g.bench_function(format!("syn_flood_evicting/{capacity}_capacity"), |b| {
        b.iter(|| {
            i = (i + 1) % frames.len();
            buf.copy_from_slice(&frames[i]);
            black_box(e.process(T0, 0, &mut buf))
        })
    });
    assert_eq!(e.flow_count(), share as usize);
    g.finish();
}

/// One member whose outbound connections leave with one frontend address: all 64 000 SNAT
/// ports of the address are the member's.
const SNAT_CONFIG: &str = r#"
[[frontends]]
name = "egress"
address = "198.19.0.1"
kind = "public"

[[backend_pools]]
name = "members"
members = [{ address = "198.18.1.11" }]

[[outbound_rules]]
name = "egress"
frontends = ["egress"]
backend_pool = "members"
protocol = "TCP"
allocated_outbound_ports = 64000
idle_timeout_minutes = 100

# A second member on its own address: its flows fill the table without using the first
# member's ports.
[[frontends]]
name = "egress2"
address = "198.19.0.2"
kind = "public"

[[backend_pools]]
name = "others"
members = [{ address = "198.18.1.12" }]

[[outbound_rules]]
name = "egress2"
frontends = ["egress2"]
backend_pool = "others"
protocol = "TCP"
allocated_outbound_ports = 64000
idle_timeout_minutes = 100
"#;

const SNAT_PORTS: u32 = 64_000;
/// The measured member (198.18.1.11) and the other one (198.18.1.12).
const MEMBER: u8 = 11;
const OTHER: u8 = 12;

/// A SYN from member `m` to remote host `i` (one port each, so every SYN is a new flow).
fn member_syn(m: u8, i: u32) -> Vec<u8> {
    let remote = [198, 19, 1 + (i / 60_000) as u8, 1];
    tcp_frame(
        [198, 18, 1, m],
        40_000,
        remote,
        1024 + (i % 60_000) as u16,
        true,
        [2, 0, 0, 0, 0xb0, m],
    )
}

/// An engine on `SNAT_CONFIG` whose member holds `used` of its ports with established flows
/// and whose other member holds `others`.
fn snat_engine(used: u32, others: u32) -> Engine {
    let cfg = Config::from_toml_str(SNAT_CONFIG).unwrap();
    let rules = Arc::new(compile(&cfg, None, &MemberHealth::default(), 1).unwrap());
    let mut e = Engine::new(
        EngineConfig {
            flow_capacity: 1 << 16,
            ..EngineConfig::default()
        },
        rules,
        T0,
    );
    let net = e.next_hops();
    net.set_port(0, XLB);
    net.set_port(1, XLB);
    net.set_backend_side(1, true);
    net.set_routes(vec![
        Route::v4(Ipv4Addr::new(198, 18, 1, 0), 24, 1, None),
        Route::v4(
            Ipv4Addr::new(198, 19, 0, 0),
            16,
            0,
            Some(Ipv4Addr::new(198, 18, 0, 1)),
        ),
    ]);
    net.set_neighbor(
        Ipv4Addr::new(198, 18, 0, 1).into(),
        0,
        [2, 0, 0, 0, 0xee, 1],
    )
    .unwrap();
    for m in [MEMBER, OTHER] {
        net.set_neighbor(
            Ipv4Addr::new(198, 18, 1, m).into(),
            1,
            [2, 0, 0, 0, 0xb0, m],
        )
        .unwrap();
    }
    // Complete handshakes: the flows are established (and never evicted for new ones).
    let held = (0..used)
        .map(|i| (MEMBER, i))
        .chain((0..others).map(|i| (OTHER, i)));
    for (m, i) in held {
        let mut syn = member_syn(m, SNAT_PORTS + i);
        assert!(matches!(e.process(T0, 1, &mut syn), Verdict::Tx { .. }));
        let remote = [syn[30], syn[31], syn[32], syn[33]];
        let snat_addr = [syn[26], syn[27], syn[28], syn[29]];
        let (rport, snat_port) = (
            u16::from_be_bytes([syn[36], syn[37]]),
            u16::from_be_bytes([syn[34], syn[35]]),
        );
        let mut synack = Vec::new();
        PacketBuilder::ethernet2([2, 0, 0, 0, 0xee, 1], XLB)
            .ipv4(remote, snat_addr, 64)
            .tcp(rport, snat_port, 5000, 64000)
            .syn()
            .ack(1001)
            .write(&mut synack, &[])
            .unwrap();
        assert!(matches!(e.process(T0, 0, &mut synack), Verdict::Tx { .. }));
        let mut ack = Vec::new();
        PacketBuilder::ethernet2([2, 0, 0, 0, 0xb0, m], XLB)
            .ipv4([198, 18, 1, m], remote, 64)
            .tcp(40_000, rport, 1001, 64000)
            .ack(5001)
            .write(&mut ack, &[])
            .unwrap();
        assert!(matches!(e.process(T0, 1, &mut ack), Verdict::Tx { .. }));
    }
    e
}

/// A new outbound flow (rule match, SNAT port allocation, flow insert, rewrite) when the
/// member's 64 000 ports are 0 % and 99 % in use, and a SYN refused because all are: the
/// allocator's cost must not grow with use. Each batch starts from a copy of the prepared
/// engine (outside the timing) and adds at most 320 flows, so use stays within 0–0.5 % and
/// 99–99.5 %. `0pct_same_table`: 0 % of the member's ports in use but as many flows in the
/// table as at 99 % (the other member's), which separates port use from table fill.
fn bench_snat(c: &mut Criterion) {
    let mut g = c.benchmark_group("snat_new_flow");
    g.throughput(Throughput::Elements(1));
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(3));
    let syns: Vec<Vec<u8>> = (0..320).map(|i| member_syn(MEMBER, i)).collect();
    let nearly_all = SNAT_PORTS * 99 / 100;
    for (name, used, others) in [
        ("0pct", 0, 0),
        ("0pct_same_table", 0, nearly_all),
        ("99pct", nearly_all, 0),
    ] {
        let prepared = snat_engine(used, others);
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut left = iters;
                let mut buf = [0u8; 64];
                while left > 0 {
                    let n = left.min(syns.len() as u64) as usize;
                    let mut e = prepared.clone();
                    let start = Instant::now();
                    for f in &syns[..n] {
                        buf.copy_from_slice(f);
                        black_box(e.process(T0, 1, &mut buf));
                    }
                    total += start.elapsed();
                    left -= n as u64;
                }
                total
            })
        });
    }
    let mut e = snat_engine(SNAT_PORTS, 0);
    let mut buf = [0u8; 64];
    let mut i = 0;
    g.bench_function("exhausted", |b| {
        b.iter(|| {
            i = (i + 1) % syns.len();
            buf.copy_from_slice(&syns[i]);
            black_box(e.process(T0, 1, &mut buf))
        })
    });
    g.finish();
}

/// The port allocator alone (`SnatPorts::allocate`, then `release` of the same port so the
/// level holds) on a member's block of 64 000 ports at 0 %, 99 % and 100 % use, the ports in
/// use taken from hashed starting points as traffic takes them. A few KiB of bitmap: this
/// stays in cache, so it shows the allocator's own dependence on use.
fn bench_snat_allocate(c: &mut Criterion) {
    let mut g = c.benchmark_group("snat_allocate");
    g.throughput(Throughput::Elements(1));
    let block = [PortBlock {
        addr: Ipv4Addr::new(198, 19, 0, 1).into(),
        first_port: 1024,
        count: SNAT_PORTS as u16,
    }];
    let spread = |i: u64| i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for (name, used) in [
        ("0pct", 0),
        ("99pct", SNAT_PORTS * 99 / 100),
        ("exhausted", SNAT_PORTS),
    ] {
        let mut ports = SnatPorts::new(0, 1);
        for i in 0..u64::from(used) {
            ports.allocate(&block, 6, spread(i)).unwrap();
        }
        let mut i = 0u64;
        g.bench_function(name, |b| {
            b.iter(|| {
                i += 1;
                if let Some((addr, port)) = black_box(ports.allocate(&block, 6, spread(i))) {
                    ports.release(addr, 6, port);
                }
            })
        });
    }
    g.finish();
}

fn bench_expire(c: &mut Criterion) {
    let mut g = c.benchmark_group("expire");
    const N: u32 = 1_000_000;
    g.throughput(Throughput::Elements(N as u64));
    g.sample_size(10);
    g.bench_function("1M_udp_flows", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut e = engine(N.next_power_of_two());
                for i in 0..N {
                    let mut f = udp_frame(client_ip(i), 1024 + (i % 60_000) as u16);
                    // Spread creation over 4 s so flows land in many wheel slots.
                    e.process(T0 + (i as u64 * 4_000), 0, &mut f);
                }
                assert_eq!(e.flow_count(), N as usize);
                let at = T0 + secs(5) + mins(4);
                let mut sink = |_: u16, _: &[u8]| {};
                let start = Instant::now();
                while e.expire(at, 4096, &mut sink) > 0 {}
                total += start.elapsed();
                assert_eq!(e.flow_count(), 0);
            }
            total
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_established,
    bench_new_flow,
    bench_snat,
    bench_snat_allocate,
    bench_expire
);
criterion_main!(benches);
