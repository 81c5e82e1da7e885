//! The generator (`xlb-gen`, gen.bpf.c) and the sink (`xlb-sink`, sink.bpf.c): what the
//! program writes into each frame, and counts across a real veth pair between two
//! namespaces. Needs root (BPF, namespaces); skips with a message otherwise.

// The three-namespace lab shared with the AF_XDP crate's own tests.
#[path = "../../dataplane/afxdp/tests/common/mod.rs"]
mod common;

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, UdpSocket},
    process::Command,
    time::Duration,
};

use common::*;
use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use xlb_afxdp::sys;
use xlb_bench::gen::{parse_marker, stamp, Flows, FrameSpec, GenConfig, Generator, Mode};

const XDP_DROP: u32 = 1;
const SRC: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
const DST: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 3);
const SRC6: &str = "2001:db8:1::2";
const DST6: &str = "2001:db8:1::3";

fn spec(mode: Mode, size: usize) -> FrameSpec {
    FrameSpec {
        mode,
        src_mac: [2, 0, 0, 0, 0, 1],
        dst_mac: [2, 0, 0, 0, 0, 2],
        src: SRC.into(),
        dst: DST.into(),
        sport: 5000,
        dport: 7000,
        size,
    }
}

fn spec6(mode: Mode, size: usize) -> FrameSpec {
    FrameSpec {
        src: SRC6.parse().unwrap(),
        dst: DST6.parse().unwrap(),
        ..spec(mode, size)
    }
}

/// Parses a frame, checks its IPv4 and TCP/UDP checksums (IPv4 or IPv6), and returns
/// (source address, source port, TCP sequence number if TCP, L4 payload).
fn check(frame: &[u8]) -> (IpAddr, u16, Option<u32>, Vec<u8>) {
    let p = SlicedPacket::from_ethernet(frame).expect("frame parses");
    let (src, v4, v6) = match &p.net {
        Some(NetSlice::Ipv4(ip)) => {
            let h = ip.header().to_header();
            assert_eq!(h.calc_header_checksum(), h.header_checksum, "IPv4 checksum");
            (IpAddr::from(h.source), Some(h), None)
        }
        Some(NetSlice::Ipv6(ip)) => {
            let h = ip.header().to_header();
            (IpAddr::from(h.source), None, Some(h))
        }
        _ => panic!("not IP"),
    };
    match p.transport.expect("transport") {
        TransportSlice::Udp(u) => {
            let h = u.to_header();
            let want = match (&v4, &v6) {
                (Some(ip), _) => h.calc_checksum_ipv4(ip, u.payload()),
                (_, Some(ip)) => h.calc_checksum_ipv6(ip, u.payload()),
                _ => unreachable!(),
            }
            .expect("UDP checksum computes");
            assert_eq!(u.checksum(), want, "UDP checksum");
            (src, u.source_port(), None, u.payload().to_vec())
        }
        TransportSlice::Tcp(t) => {
            let h = t.to_header();
            let want = match (&v4, &v6) {
                (Some(ip), _) => h.calc_checksum_ipv4(ip, t.payload()),
                (_, Some(ip)) => h.calc_checksum_ipv6(ip, t.payload()),
                _ => unreachable!(),
            }
            .expect("TCP checksum computes");
            assert_eq!(t.checksum(), want, "TCP checksum");
            (
                src,
                t.source_port(),
                Some(t.sequence_number()),
                t.payload().to_vec(),
            )
        }
        _ => panic!("not UDP or TCP"),
    }
}

/// What a reflector or forwarder does to a frame on its way: addresses and MACs swapped,
/// a TTL changed. The generator must restore its headers whatever the page holds.
fn mangle(frame: &mut [u8], v6: bool) {
    let (a, b) = frame.split_at_mut(6);
    a.swap_with_slice(&mut b[..6]);
    if v6 {
        let (x, y) = frame[22..54].split_at_mut(16);
        x.swap_with_slice(y);
        frame[21] = 7;
    } else {
        let (x, y) = frame[26..34].split_at_mut(4);
        x.swap_with_slice(y);
        frame[22] = 7;
    }
}

/// gen.bpf.c run frame by frame (no live frames, nothing sent): every output frame has
/// valid checksums, the flow the flow space says, the sequence number in the TCP header
/// (ACK mode: each flow's own stream) and the marker, and a send time taken during the run,
/// over IPv4 and IPv6, even when the page it runs on was changed on its way (as a recycled
/// live-frame page that met a reflector is). With no egress configured the program drops
/// and counts `no_egress`.
#[test]
fn generator_program_writes_flows_sequence_time_and_checksums() {
    if !need_root("generator_program_writes_flows_sequence_time_and_checksums") {
        return;
    }
    for (s, v6) in [
        (spec(Mode::Udp, 64), false),
        (spec(Mode::Udp, 1518), false),
        (spec(Mode::Syn, 64), false),
        (spec(Mode::Syn, 74), false),
        (spec(Mode::Ack, 128), false),
        (spec6(Mode::Udp, 82), true),
        (spec6(Mode::Syn, 94), true),
        (spec6(Mode::Ack, 1518), true),
    ] {
        let (mode, size) = (s.mode, s.size);
        let template = s.build().unwrap();
        // 3 ports per address: the first frames walk ports, then addresses, then wrap.
        let flows = Flows::with_span(7, s.sport, 3).unwrap();
        let cfg = GenConfig::for_spec(&s, flows);
        let gen = Generator::load(&cfg, &template, None)
            .unwrap_or_else(|e| panic!("{mode} {size}: load: {e}"));
        // Feed the output back in as the next input, as recycled live-frame pages are:
        // the checksum fix must hold from whatever the page held before.
        let mut frame = template.clone();
        for i in 0..16u64 {
            let before = sys::monotonic_ns();
            let (action, out) = gen.run_once(&frame).unwrap();
            let after = sys::monotonic_ns();
            assert_eq!(action, XDP_DROP, "{mode} {size}: no egress → drop");
            assert_eq!(out.len(), template.len());
            let (src, sport, seq, payload) = check(&out);
            assert_eq!(
                (src, sport),
                flows.tuple(s.src, i),
                "{mode} {size} frame {i}"
            );
            match mode {
                Mode::Udp => assert_eq!(seq, None),
                Mode::Syn | Mode::Ack => assert_eq!(seq, Some(cfg.tcp_seq(i))),
            }
            if s.has_marker() {
                let (mseq, ts) = parse_marker(&payload).expect("marker");
                assert_eq!(mseq, i as u32);
                assert!(
                    (before..=after).contains(&ts),
                    "{mode} {size}: send time {ts} outside {before}..{after}"
                );
            } else {
                assert!(payload.is_empty());
            }
            // Everything but the varied fields is the template's.
            assert_eq!(out[..12], template[..12], "MACs");
            // The AF_XDP sender's user-space `stamp` writes the same frame (checksums
            // compared by value: an incremental and a full computation may pick
            // different representations of zero).
            let mut mine = template.clone();
            let ts = if s.has_marker() {
                parse_marker(&payload).unwrap().1
            } else {
                0
            };
            assert!(stamp(&mut mine, &cfg, i, ts));
            check(&mine);
            let l4 = if v6 { 54 } else { 34 };
            let l4_check = l4 + if mode == Mode::Udp { 6 } else { 16 };
            let blank = |f: &[u8]| {
                let mut f = f.to_vec();
                if !v6 {
                    f[24..26].fill(0);
                }
                f[l4_check..l4_check + 2].fill(0);
                f
            };
            assert_eq!(
                blank(&mine),
                blank(&out),
                "{mode} {size} frame {i}: stamp vs BPF"
            );
            frame = out;
            if i % 2 == 1 {
                mangle(&mut frame, v6);
            }
        }
        let c = gen.counters().unwrap();
        assert_eq!((c.frames, c.no_egress), (16, 16), "{mode} {size}");
    }
}

fn run_sink(p: &Pair, expect: u64) -> ChildGuard {
    let mut sink = ChildGuard::spawn(Command::new(env!("CARGO_BIN_EXE_xlb-sink")).args([
        "--netns",
        &p.b,
        "--dev",
        &p.b0,
        "--xdp-mode",
        "native",
        "--sample",
        "64",
        "--expect",
        &expect.to_string(),
        "--idle-ms",
        "1500",
        "--duration",
        "20",
    ]));
    sink.wait_for("xlb-sink ready", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("sink never got ready: {:#?}", sink.output));
    sink
}

fn run_gen(p: &Pair, extra: &[&str]) -> String {
    let mut args = vec![
        "--netns",
        &p.a,
        "--dev",
        &p.a0,
        "--src",
        PAIR_A4,
        "--dst",
        PAIR_B4,
        "--dst-mac",
        &p.b_mac,
    ];
    args.extend_from_slice(extra);
    let out = Command::new(env!("CARGO_BIN_EXE_xlb-gen"))
        .args(&args)
        .output()
        .expect("running xlb-gen");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "xlb-gen {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .find(|l| l.starts_with("xlb-gen done"))
        .unwrap_or_else(|| panic!("no done line: {stdout}"))
        .to_string()
}

/// xlb-gen across a veth pair into xlb-sink's XDP counter, flat out and paced, for UDP
/// (1 000 flows, 64 and 1500 B), SYN floods (100 000 flows, 64 B without marker, 74 B
/// with) and ACKs: every frame sent is either taken by the veth or counted as refused by
/// it; the sink counts exactly the marked frames the veth took; paced runs lose < 1 %;
/// latency samples come back.
#[test]
fn generator_to_sink_counts_udp_syn_and_ack() {
    if !need_root("generator_to_sink_counts_udp_syn_and_ack") {
        return;
    }
    let p = Pair::new();
    let count: u64 = 200_000;
    for (mode, size, flows, rate) in [
        ("udp", "64", "1000", "0"),
        ("udp", "1500", "1000", "0"),
        ("udp", "64", "1000", "400000"),
        ("syn", "64", "100000", "0"),
        ("syn", "74", "100000", "0"),
        ("ack", "64", "1000", "0"),
    ] {
        let mut sink = run_sink(&p, count);
        let done = run_gen(
            &p,
            &[
                "--mode",
                mode,
                "--size",
                size,
                "--flows",
                flows,
                "--rate",
                rate,
                "--count",
                &count.to_string(),
                "--duration",
                "5",
            ],
        );
        println!("{mode} {size} B rate {rate}: {done}");
        let sent = field(&done, "sent").expect("sent=");
        assert_eq!(sent, count, "{mode}: count reached within 5 s: {done}");
        assert_eq!(field(&done, "no_egress"), Some(0), "{done}");
        let line = sink
            .wait_for("xlb-sink done", Duration::from_secs(25))
            .unwrap_or_else(|| panic!("sink never finished: {:#?}", sink.output));
        println!("    {line}");
        let packets = field(&line, "packets").unwrap();
        let marked = field(&line, "marked").unwrap();
        let xmit = field(&done, "egress_xmit").expect("egress_xmit= (ethtool -S on a veth)");
        let drops = field(&done, "egress_drops").expect("egress_drops=");
        // Every frame is accounted for: put in the sink's ring by the veth, or refused.
        assert_eq!(xmit + drops, sent, "{done}");
        // Paced: (nearly) nothing is lost. Flat out on one CPU the veth refuses frames
        // when the receive softirq falls behind (deferred to ksoftirqd on a loaded
        // machine); those are counted, and must stay a small part.
        let floor = if rate == "0" { 90 } else { 99 };
        assert!(
            xmit * 100 >= sent * floor,
            "{mode} {size} rate {rate}: the veth took {xmit} of {sent}: {done}"
        );
        if size == "64" && mode != "udp" {
            assert_eq!(marked, 0, "64-byte TCP frames have no room for the marker");
            // what the veth took, plus the odd ND/RS frame of the namespaces' own
            assert!(
                (xmit..xmit + 50).contains(&packets),
                "{mode} {size}: sink counted {packets}, the veth took {xmit}"
            );
        } else {
            // The sink counts exactly what reached it.
            assert_eq!(
                marked, xmit,
                "{mode} {size}: marked frames at the sink: {line}"
            );
            assert!(packets >= marked, "{line}");
            let samples = field(&line, "lat_samples").unwrap();
            assert!(samples > 0 && samples <= marked / 64, "{line}");
            let p50 = field(&line, "lat_p50_ns").unwrap();
            assert!(p50 > 0 && p50 < 1_000_000_000, "{line}");
        }
        if rate != "0" {
            // 200 000 frames at 400 kpps take at least 0.5 s, not the few ms of flat out.
            let elapsed = float_field(&done, "elapsed_s");
            assert!(elapsed >= 0.49, "paced at {rate} pps: done in {elapsed} s");
        }
        assert!(
            sink.terminate(Duration::from_secs(5)),
            "sink exit: {:#?}",
            sink.output
        );
    }
    // Both ends' XDP is gone with the sink; nothing else was attached.
    let out = Command::new("ip")
        .args(["-n", &p.b, "link", "show", "dev", &p.b0])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains("prog/xdp"));
}

/// Only test hosts: sources, destinations and the last flow's source address must lie in
/// 198.18.0.0/15 or 2001:db8::/32; nothing is touched before that is checked (no root
/// needed).
#[test]
fn generator_refuses_addresses_outside_the_benchmark_range() {
    let cases: [(&[&str], &str); 6] = [
        (
            &[
                "--src",
                "203.0.113.1",
                "--dst",
                "198.18.0.1",
                "--flows",
                "1",
            ],
            "198.18.0.0/15",
        ),
        (
            &["--src", "198.18.0.1", "--dst", "192.0.2.1", "--flows", "1"],
            "198.18.0.0/15",
        ),
        (
            // 100 000 flows from port 60 000: 19 source addresses, past 198.19.255.255
            &[
                "--src",
                "198.19.255.250",
                "--dst",
                "198.18.0.1",
                "--flows",
                "100000",
            ],
            "outside the benchmarking ranges",
        ),
        (
            &[
                "--src",
                "2001:db9::1",
                "--dst",
                "2001:db8::1",
                "--flows",
                "1",
            ],
            "2001:db8::/32",
        ),
        (
            &["--src", "2001:db8::1", "--dst", "fd00::1", "--flows", "1"],
            "2001:db8::/32",
        ),
        (
            &[
                "--src",
                "2001:db8::1",
                "--dst",
                "198.18.0.1",
                "--flows",
                "1",
            ],
            "one family",
        ),
    ];
    for (args, want) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_xlb-gen"))
            .args(["--dev", "xlb-no-such-dev", "--sport", "60000"])
            .args(args)
            .output()
            .expect("running xlb-gen");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

fn float_field(line: &str, key: &str) -> f64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
}

/// The AF_XDP transmit fallback (`--sender xsk`): the same frames through a copy-mode
/// socket into the sink, flat out and paced: every frame it put on the TX ring arrives
/// marked (≥ 99 %), paced runs keep to the rate.
#[test]
fn xsk_sender_to_sink() {
    if !need_root("xsk_sender_to_sink") {
        return;
    }
    let p = Pair::new();
    let count: u64 = 50_000;
    for (size, rate) in [("64", "0"), ("1500", "0"), ("64", "100000")] {
        let mut sink = run_sink(&p, count);
        let done = run_gen(
            &p,
            &[
                "--sender",
                "xsk",
                "--size",
                size,
                "--rate",
                rate,
                "--count",
                &count.to_string(),
                "--duration",
                "5",
            ],
        );
        println!("xsk {size} B rate {rate}: {done}");
        assert_eq!(field(&done, "sent"), Some(count), "{done}");
        assert_eq!(field(&done, "emitted"), Some(count), "{done}");
        let line = sink
            .wait_for("xlb-sink done", Duration::from_secs(25))
            .unwrap_or_else(|| panic!("sink never finished: {:#?}", sink.output));
        println!("    {line}");
        let marked = field(&line, "marked").unwrap();
        assert!(
            marked * 100 >= count * 99 && marked <= count,
            "xsk {size}: {marked} marked of {count}"
        );
        assert!(field(&line, "lat_samples").unwrap() > 0, "{line}");
        if rate != "0" {
            // 50 000 frames at 100 kpps: at least 0.5 s
            let elapsed = float_field(&done, "elapsed_s");
            assert!(elapsed >= 0.45, "xsk paced at {rate}: {elapsed} s");
        }
        assert!(sink.terminate(Duration::from_secs(5)));
    }
}

/// `--duration` stops a run whose `--count` would take far longer, and `--rate` holds.
#[test]
fn generator_stops_at_its_duration() {
    if !need_root("generator_stops_at_its_duration") {
        return;
    }
    let p = Pair::new();
    let done = run_gen(
        &p,
        &[
            "--rate",
            "2000",
            "--count",
            "100000000",
            "--duration",
            "1",
            "--mode",
            "syn",
        ],
    );
    let sent = field(&done, "sent").unwrap();
    let elapsed = float_field(&done, "elapsed_s");
    assert!((1.0..2.0).contains(&elapsed), "{done}");
    // at most the rate (plus the frame due at t = 0), at least some
    assert!((100..=2001).contains(&sent), "{done}");
}

fn snmp(ns: &str, proto: &str, key: &str) -> u64 {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "cat", "/proc/net/snmp"])
        .output()
        .expect("reading /proc/net/snmp");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines().filter(|l| l.starts_with(&format!("{proto}:")));
    let names = lines.next().expect("snmp header");
    let values = lines.next().expect("snmp values");
    let i = names
        .split_whitespace()
        .position(|n| n == key)
        .unwrap_or_else(|| panic!("{proto} {key} not in {names}"));
    values
        .split_whitespace()
        .nth(i)
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// The receiving kernel (no XDP, GRO on so that redirected frames are accepted) verifies
/// every checksum: UDP datagrams to a bound socket arrive with their markers, each
/// sequence number once; UDP to a closed port is counted NoPorts only after its checksum
/// was verified; SYNs and ACKs are taken in by TCP with no checksum errors.
#[test]
fn receiving_kernel_accepts_generated_frames() {
    if !need_root("receiving_kernel_accepts_generated_frames") {
        return;
    }
    let p = Pair::new();
    let ok = Command::new("ip")
        .args(["netns", "exec", &p.b, "ethtool", "-K", &p.b0, "gro", "on"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "ethtool -K {} gro on", p.b0);

    // A datagram from a live-frame page costs a whole page of receive buffer: 40 of them
    // fit in the default socket buffer even if the reader is not scheduled at all.
    let count = 40u64;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = in_netns(&p.b, move || {
        let s = UdpSocket::bind((PAIR_B4, 7000)).expect("bind");
        s.set_read_timeout(Some(Duration::from_millis(2000)))
            .unwrap();
        let _ = ready_tx.send(());
        let mut seqs = HashSet::new();
        let mut buf = [0u8; 2048];
        while (seqs.len() as u64) < count {
            match s.recv(&mut buf) {
                Ok(n) => {
                    let (seq, _) = parse_marker(&buf[..n]).expect("marker in datagram");
                    assert!(seqs.insert(seq), "sequence {seq} twice");
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        seqs.len() as u64
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let udp_errs = snmp(&p.b, "Udp", "InCsumErrors");
    let done = run_gen(
        &p,
        &[
            "--mode",
            "udp",
            "--size",
            "200",
            "--flows",
            "10",
            "--rate",
            "2000",
            "--count",
            "40",
            "--duration",
            "5",
        ],
    );
    assert_eq!(field(&done, "sent"), Some(count), "{done}");
    let got = server.join().expect("udp server");
    assert_eq!(got, count, "datagrams received (each sequence once)");

    // Many more to a closed port: no socket buffer involved.
    let count = 3000u64;
    let noports = snmp(&p.b, "Udp", "NoPorts");
    let done = run_gen(
        &p,
        &[
            "--mode",
            "udp",
            "--size",
            "100",
            "--flows",
            "1000",
            "--dport",
            "7001",
            "--rate",
            "30000",
            "--count",
            "3000",
            "--duration",
            "5",
        ],
    );
    assert_eq!(field(&done, "sent"), Some(count), "{done}");
    let got = wait_snmp(&p.b, "Udp", "NoPorts", noports + count) - noports;
    assert_eq!(got, count, "UDP to a closed port, checksums verified");
    assert_eq!(snmp(&p.b, "Udp", "InCsumErrors"), udp_errs);

    for mode in ["syn", "ack"] {
        let segs = snmp(&p.b, "Tcp", "InSegs");
        let errs = snmp(&p.b, "Tcp", "InCsumErrors") + snmp(&p.b, "Tcp", "InErrs");
        let done = run_gen(
            &p,
            &[
                "--mode",
                mode,
                "--size",
                "90",
                "--flows",
                "1000",
                "--rate",
                "30000",
                "--count",
                "3000",
                "--duration",
                "5",
            ],
        );
        assert_eq!(field(&done, "sent"), Some(count), "{done}");
        let got = wait_snmp(&p.b, "Tcp", "InSegs", segs + count) - segs;
        assert!(got >= count, "{mode}: TCP took in {got} of {count}");
        let now_errs = snmp(&p.b, "Tcp", "InCsumErrors") + snmp(&p.b, "Tcp", "InErrs");
        assert_eq!(now_errs, errs, "{mode}: TCP checksum/input errors");
    }
}

/// Polls a counter until it reaches `want` (or 2.5 s pass); returns its last value.
fn wait_snmp(ns: &str, proto: &str, key: &str, want: u64) -> u64 {
    let mut v = snmp(ns, proto, key);
    for _ in 0..50 {
        if v >= want {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        v = snmp(ns, proto, key);
    }
    v
}
