//! The cost of one hand-off between workers, as xlbd makes it: the receiving worker finds
//! the owner (`Engine::owner`: parse, steering hash), takes a recycled buffer, copies the
//! frame into it and sends it down the owner's bounded channel (crossbeam, 4 096 frames);
//! the owner takes it out and, once the frame is sent, the buffer goes back the same way.
//! One thread plays both sides, so this is the CPU work of a hand-off without the transfer
//! of cache lines between cores (on real hardware that adds the latency of two or three
//! cache-line moves). Compared with the owner check alone, which every frame pays when
//! there are several workers.
//!
//! Run: `cargo bench -p xlb-bench --bench handoff`.

use std::hint::black_box;
use std::net::Ipv4Addr;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use etherparse::PacketBuilder;
use xlb_bench::rss::{client, sim_rules};
use xlb_engine::engine;

fn frame(i: u32) -> Vec<u8> {
    let (addr, port) = client(i);
    let mut v = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0xc1, 0], [2, 0, 0, 0, 0xa0, 0])
        .ipv4(addr.octets(), Ipv4Addr::new(198, 18, 0, 100).octets(), 64)
        .udp(port, 7000)
        .write(&mut v, &[0u8; 18])
        .unwrap();
    v
}

fn bench_handoff(c: &mut Criterion) {
    let rules = sim_rules();
    let key =
        xlb_engine::hashkey::HashKey::from_seed(xlb_engine::EngineConfig::default().steer_seed);
    let frames: Vec<Vec<u8>> = (0..1024).map(frame).collect();
    let mut g = c.benchmark_group("handoff");
    g.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    g.bench_function("owner_only/4_workers", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            black_box(engine::owner(&rules, &frames[i], 4, &key))
        })
    });
    let (to_owner, inbox) = crossbeam::channel::bounded::<(usize, Vec<u8>)>(4096);
    let (give_back, recycled) = crossbeam::channel::bounded::<Vec<u8>>(4096);
    for _ in 0..64 {
        give_back.send(Vec::with_capacity(2048)).unwrap();
    }
    g.bench_function("full_handoff_60B/4_workers", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            let f = &frames[i];
            // the receiving worker
            let owner = engine::owner(&rules, f, 4, &key).unwrap_or(0);
            let mut buf = recycled
                .try_recv()
                .unwrap_or_else(|_| Vec::with_capacity(2048));
            buf.clear();
            buf.extend_from_slice(f);
            to_owner.try_send((usize::from(owner), buf)).unwrap();
            // the owner: takes it, (processes and sends it,) returns the buffer
            let (w, buf) = inbox.try_recv().unwrap();
            black_box(w);
            give_back.try_send(buf).unwrap();
        })
    });
    let big: Vec<u8> = {
        let mut v = frames[0].clone();
        v.resize(1514, 0);
        v
    };
    g.bench_function("full_handoff_1514B/4_workers", |b| {
        b.iter(|| {
            let owner = engine::owner(&rules, &big, 4, &key).unwrap_or(0);
            let mut buf = recycled
                .try_recv()
                .unwrap_or_else(|_| Vec::with_capacity(2048));
            buf.clear();
            buf.extend_from_slice(&big);
            to_owner.try_send((usize::from(owner), buf)).unwrap();
            let (w, buf) = inbox.try_recv().unwrap();
            black_box(w);
            give_back.try_send(buf).unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, bench_handoff);
criterion_main!(benches);
