//! The reflector sink (`sink.bpf.c`): its checks and its answers, frame by frame through
//! `BPF_PROG_TEST_RUN` (frames built with etherparse, answers parsed and their checksums
//! verified with etherparse); then `xlb-sink --reflect` across a veth pair, answering
//! `xlb-gen`'s UDP, SYNs and TCP data to a second sink that checks the answers. Needs root
//! (BPF, namespaces); skips with a message otherwise.

// The three-namespace lab shared with the AF_XDP crate's own tests.
#[path = "../../dataplane/afxdp/tests/common/mod.rs"]
mod common;

use std::{net::IpAddr, process::Command, time::Duration};

use common::*;
use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use xlb_bench::sink::{Check, Sink, SinkConfig, SinkStats, SINK_ISN};

const XDP_DROP: u32 = 1;
/// An answer: redirected back out of the receiving interface.
const ANSWER: u32 = 4;
const CLIENT: [u8; 4] = [198, 18, 0, 10];
const BACKEND: [u8; 4] = [198, 18, 1, 11];
const VIP: [u8; 4] = [198, 18, 0, 100];
const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 0xb];

fn udp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src, dst, 64)
        .udp(sport, dport)
        .write(&mut v, payload)
        .unwrap();
    v
}

fn tcp4(seq: u32, ack: Option<u32>, syn: bool, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(CLIENT, BACKEND, 64)
        .tcp(40_000, 8001, seq, 64_240);
    let b = if syn { b.syn() } else { b };
    let b = match ack {
        Some(a) => b.ack(a),
        None => b,
    };
    b.write(&mut v, payload).unwrap();
    v
}

fn udp6(dst: &str, payload: &[u8]) -> Vec<u8> {
    let src: IpAddr = "2001:db8::a".parse().unwrap();
    let dst: IpAddr = dst.parse().unwrap();
    let (IpAddr::V6(s), IpAddr::V6(d)) = (src, dst) else {
        unreachable!()
    };
    let mut v = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv6(s.octets(), d.octets(), 64)
        .udp(40_000, 8000)
        .write(&mut v, payload)
        .unwrap();
    v
}

/// The answer's addresses, ports, TCP fields and payload, after checking both checksums.
#[derive(Debug, PartialEq)]
struct Answer {
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    /// (seq, ack, syn, ack flag, fin) for TCP
    tcp: Option<(u32, u32, bool, bool, bool)>,
    payload: Vec<u8>,
}

fn answer(frame: &[u8]) -> Answer {
    let p = SlicedPacket::from_ethernet(frame).expect("parses");
    assert_eq!(&frame[0..6], &MAC_A, "destination MAC: the sender's");
    assert_eq!(&frame[6..12], &MAC_B, "source MAC: the receiver's");
    let (src, dst, v4, v6) = match &p.net {
        Some(NetSlice::Ipv4(ip)) => {
            let h = ip.header().to_header();
            assert_eq!(h.calc_header_checksum(), h.header_checksum, "IPv4 checksum");
            (h.source.into(), h.destination.into(), Some(h), None)
        }
        Some(NetSlice::Ipv6(ip)) => {
            let h = ip.header().to_header();
            (h.source.into(), h.destination.into(), None, Some(h))
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
            .unwrap();
            assert_eq!(u.checksum(), want, "UDP checksum");
            Answer {
                src,
                dst,
                sport: u.source_port(),
                dport: u.destination_port(),
                tcp: None,
                payload: u.payload().to_vec(),
            }
        }
        TransportSlice::Tcp(t) => {
            let h = t.to_header();
            let want = h
                .calc_checksum_ipv4(v4.as_ref().unwrap(), t.payload())
                .unwrap();
            assert_eq!(t.checksum(), want, "TCP checksum");
            Answer {
                src,
                dst,
                sport: t.source_port(),
                dport: t.destination_port(),
                tcp: Some((
                    t.sequence_number(),
                    t.acknowledgment_number(),
                    t.syn(),
                    t.ack(),
                    t.fin(),
                )),
                payload: t.payload().to_vec(),
            }
        }
        _ => panic!("not UDP or TCP"),
    }
}

fn ip(a: [u8; 4]) -> IpAddr {
    a.into()
}

/// Every check, every answer, and the counter each frame lands in.
#[test]
fn reflector_checks_and_answers_frame_by_frame() {
    if !need_root("reflector_checks_and_answers_frame_by_frame") {
        return;
    }
    let sink = Sink::load(&SinkConfig {
        sample_every: 0,
        reflect: true,
        check: Check::Dst {
            addr: ip(BACKEND),
            udp_port: 8000,
            tcp_port: 8001,
        },
    })
    .expect("loads");
    let run = |f: &[u8]| sink.test_run(f).expect("test run");
    let mut want = SinkStats::default();
    let mut step = |what: &str, f: &[u8], action: u32, count: &dyn Fn(&mut SinkStats)| {
        let (a, out) = run(f);
        assert_eq!(a, action, "{what}: action");
        want.packets += 1;
        want.bytes += f.len() as u64;
        count(&mut want);
        let got = sink.total().unwrap();
        assert_eq!(got, want, "{what}: counters");
        out
    };

    // UDP to the backend: echoed, addresses and ports swapped, checksums still valid.
    let f = udp4(CLIENT, BACKEND, 40_000, 8000, b"hello");
    let out = step("udp", &f, ANSWER, &|s| {
        s.good += 1;
        s.udp += 1;
        s.reflected += 1;
    });
    assert_eq!(
        answer(&out),
        Answer {
            src: ip(BACKEND),
            dst: ip(CLIENT),
            sport: 8000,
            dport: 40_000,
            tcp: None,
            payload: b"hello".to_vec(),
        }
    );

    // Not translated: still addressed to the VIP, or to the wrong port.
    step(
        "udp to the VIP",
        &udp4(CLIENT, VIP, 40_000, 8000, b"x"),
        XDP_DROP,
        &|s| {
            s.udp += 1;
            s.bad_addr += 1;
        },
    );
    // The generator's marker makes a frame test traffic whatever its port.
    let mut marker = b"XLBG".to_vec();
    marker.extend_from_slice(&[0u8; 12]);
    step(
        "udp to the wrong port",
        &udp4(CLIENT, BACKEND, 40_000, 7000, &marker),
        XDP_DROP,
        &|s| {
            s.udp += 1;
            s.bad_port += 1;
        },
    );
    // Neither the marker nor the expected port: not test traffic (the appliance's own
    // neighbour probes to port 9), counted apart.
    step(
        "a probe to port 9",
        &udp4([198, 18, 1, 1], BACKEND, 51_000, 9, b""),
        XDP_DROP,
        &|s| {
            s.udp += 1;
            s.not_checked += 1;
        },
    );

    // Broken checksums.
    let mut f = udp4(CLIENT, BACKEND, 40_000, 8000, b"payload!");
    *f.last_mut().unwrap() ^= 0x40;
    step("udp checksum", &f, XDP_DROP, &|s| {
        s.udp += 1;
        s.bad_l4_csum += 1;
    });
    let mut f = udp4(CLIENT, BACKEND, 40_000, 8000, b"payload!");
    f[22] -= 1; // TTL, without fixing the header checksum
    step("ip checksum", &f, XDP_DROP, &|s| s.bad_ip_csum += 1);
    let mut f = udp4(CLIENT, BACKEND, 40_000, 8000, &[7u8; 1400]);
    f[500] ^= 1; // deep in a long payload: the whole segment is summed
    step("udp checksum, byte 500", &f, XDP_DROP, &|s| {
        s.udp += 1;
        s.bad_l4_csum += 1;
    });
    let f = udp4(CLIENT, BACKEND, 40_000, 8000, &[7u8; 1472]);
    step("udp 1514 B", &f, ANSWER, &|s| {
        s.udp += 1;
        s.good += 1;
        s.reflected += 1;
    });
    // UDP without a checksum (0) is valid over IPv4: good, counted apart.
    let mut f = udp4(CLIENT, BACKEND, 40_000, 8000, b"nocsum");
    f[40..42].fill(0);
    step("udp without checksum", &f, ANSWER, &|s| {
        s.udp += 1;
        s.good += 1;
        s.l4_csum_none += 1;
        s.reflected += 1;
    });
    // Truncated: the IP length says more than the frame holds.
    let f = udp4(CLIENT, BACKEND, 40_000, 8000, b"truncated");
    step("truncated", &f[..f.len() - 4], XDP_DROP, &|s| {
        s.bad_frame += 1
    });
    // ARP: only counted.
    let mut arp = vec![0u8; 42];
    arp[12] = 0x08;
    arp[13] = 0x06;
    step("arp", &arp, XDP_DROP, &|s| s.not_checked += 1);

    // A SYN with a payload (xlb-gen's marker): a SYN-ACK acknowledging it that carries the
    // 16 bytes back and ends at SINK_ISN + 1, the number xlb-gen's ACK mode acknowledges (so
    // that its first data segment acknowledges exactly what the reflector sent).
    let out = step("syn", &tcp4(1000, None, true, &[1u8; 16]), ANSWER, &|s| {
        s.tcp += 1;
        s.good += 1;
        s.syn += 1;
        s.reflected += 1;
    });
    let a = answer(&out);
    assert_eq!(
        (a.src, a.dst, a.sport, a.dport),
        (ip(BACKEND), ip(CLIENT), 8001, 40_000)
    );
    assert_eq!(
        a.tcp,
        Some((SINK_ISN - 16, 1000 + 1 + 16, true, true, false))
    );
    assert_eq!(a.payload.len(), 16);
    // Data: the same bytes back as an ACK of them, from the ACK number it carried.
    let out = step(
        "data",
        &tcp4(1017, Some(SINK_ISN + 1), false, b"0123456789"),
        ANSWER,
        &|s| {
            s.tcp += 1;
            s.good += 1;
            s.reflected += 1;
        },
    );
    let a = answer(&out);
    assert_eq!(a.tcp, Some((SINK_ISN + 1, 1027, false, true, false)));
    assert_eq!(a.payload, b"0123456789");
    // A pure ACK is only counted; a FIN is acknowledged.
    step(
        "pure ack",
        &tcp4(1027, Some(SINK_ISN + 1), false, b""),
        XDP_DROP,
        &|s| {
            s.tcp += 1;
            s.good += 1;
        },
    );
    let mut fin = tcp4(1027, Some(SINK_ISN + 1), false, b"");
    fin[47] |= 0x01; // FIN
    let t = &mut fin[50..52];
    let c = u16::from_be_bytes([t[0], t[1]]);
    // RFC 1624: the flags word grew by 1
    let sum = u32::from(!c) + 1;
    let sum = (sum & 0xffff) + (sum >> 16);
    t.copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let out = step("fin", &fin, ANSWER, &|s| {
        s.tcp += 1;
        s.good += 1;
        s.reflected += 1;
    });
    assert_eq!(
        answer(&out).tcp,
        Some((SINK_ISN + 1, 1028, false, true, true))
    );
    // A TCP checksum error.
    let mut f = tcp4(1, Some(2), false, b"abc");
    f[54] ^= 0xff;
    step("tcp checksum", &f, XDP_DROP, &|s| {
        s.tcp += 1;
        s.bad_l4_csum += 1;
    });

    // IPv6: the address check is against the IPv6 backend (so the IPv4 one fails here).
    step(
        "udp6 elsewhere",
        &udp6("2001:db8::b", b"v6"),
        XDP_DROP,
        &|s| {
            s.udp += 1;
            s.bad_addr += 1;
        },
    );
    let v6 = Sink::load(&SinkConfig {
        sample_every: 0,
        reflect: true,
        check: Check::Dst {
            addr: "2001:db8::b".parse().unwrap(),
            udp_port: 8000,
            tcp_port: 8001,
        },
    })
    .unwrap();
    let (a, out) = v6.test_run(&udp6("2001:db8::b", b"v6")).unwrap();
    assert_eq!(a, ANSWER);
    let ans = answer(&out);
    assert_eq!((ans.dst, ans.sport), ("2001:db8::a".parse().unwrap(), 8000));
    let mut bad = udp6("2001:db8::b", b"v6 broken");
    *bad.last_mut().unwrap() ^= 1;
    assert_eq!(v6.test_run(&bad).unwrap().0, XDP_DROP);
    let t = v6.total().unwrap();
    assert_eq!((t.good, t.bad_l4_csum, t.reflected), (1, 1, 1));

    // The client side checks the source: the reply translated back to the VIP.
    let ret = Sink::load(&SinkConfig {
        sample_every: 0,
        reflect: false,
        check: Check::Src {
            addr: ip(VIP),
            udp_port: 7000,
            tcp_port: 7001,
        },
    })
    .unwrap();
    assert_eq!(
        ret.test_run(&udp4(VIP, CLIENT, 7000, 40_000, &marker))
            .unwrap()
            .0,
        XDP_DROP
    );
    assert_eq!(
        ret.test_run(&udp4(BACKEND, CLIENT, 8000, 40_000, &marker))
            .unwrap()
            .0,
        XDP_DROP
    );
    let t = ret.total().unwrap();
    assert_eq!((t.good, t.bad_addr, t.reflected, t.marked), (1, 1, 0, 1));
}

/// xlb-gen → veth → `xlb-sink --reflect --check-dst` → back over the same veth →
/// `xlb-sink --check-src` on the generator's side: UDP, SYNs then the same flows' data,
/// every frame good on both sides and answered once; the answers' round trip sampled.
#[test]
fn reflector_answers_the_generator_across_a_veth_pair() {
    if !need_root("reflector_answers_the_generator_across_a_veth_pair") {
        return;
    }
    let p = Pair::new();
    for (mode, size, port, n) in [
        ("udp", "64", "7000", 20_000u64),
        ("syn", "74", "7001", 2_000),
        ("ack", "128", "7001", 6_000),
    ] {
        let sink = |ns: &str, dev: &str, check: &str, reflect: bool| {
            let mut args = vec![
                "--netns".to_string(),
                ns.to_string(),
                "--dev".into(),
                dev.into(),
                "--xdp-mode".into(),
                "native".into(),
                "--sample".into(),
                "16".into(),
                "--expect".into(),
                n.to_string(),
                "--idle-ms".into(),
                "1500".into(),
                "--duration".into(),
                "20".into(),
            ];
            args.extend(check.split(' ').map(String::from));
            if reflect {
                args.push("--reflect".into());
            }
            let mut c = ChildGuard::spawn(Command::new(env!("CARGO_BIN_EXE_xlb-sink")).args(&args));
            c.wait_for("xlb-sink ready", Duration::from_secs(10))
                .unwrap_or_else(|| panic!("sink never got ready: {:#?}", c.output));
            c
        };
        let mut back = sink(
            &p.b,
            &p.b0,
            &format!("--check-dst {PAIR_B4}:7000,7001"),
            true,
        );
        let mut front = sink(
            &p.a,
            &p.a0,
            &format!("--check-src {PAIR_B4}:7000,7001"),
            false,
        );
        let out = Command::new(env!("CARGO_BIN_EXE_xlb-gen"))
            .args([
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
                "--mode",
                mode,
                "--size",
                size,
                "--dport",
                port,
                "--flows",
                "2000",
                "--count",
                &n.to_string(),
                "--rate",
                "200000",
                "--duration",
                "10",
            ])
            .output()
            .expect("running xlb-gen");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let gen = String::from_utf8_lossy(&out.stdout).into_owned();
        // paced at 200 kpps: flushed in bursts of about 40 µs worth (8 frames), never 64+
        assert!(gen.contains(" burst=8 "), "{gen}");
        let done = |c: &mut ChildGuard| {
            c.wait_for("xlb-sink done", Duration::from_secs(25))
                .unwrap_or_else(|| panic!("sink never finished: {:#?}", c.output))
        };
        let b = done(&mut back);
        let f = done(&mut front);
        // Every frame the veth took arrives good and is answered; every answer arrives good.
        let took = field(&gen, "egress_xmit").unwrap();
        assert!(took >= n * 99 / 100, "{mode}: {gen}");
        for (line, side) in [(&b, "backend side"), (&f, "client side")] {
            assert_eq!(field(line, "bad"), Some(0), "{mode} {side}: {line}");
            assert_eq!(field(line, "good"), Some(took), "{mode} {side}: {line}");
            assert!(
                field(line, "lat_samples").unwrap() > 0,
                "{mode} {side}: {line}"
            );
        }
        assert_eq!(field(&b, "reflected"), Some(took), "{mode}: {b}");
        match mode {
            "syn" => assert_eq!(field(&f, "syn_ack"), Some(took), "{f}"),
            "udp" => assert_eq!(field(&f, "udp"), Some(took), "{f}"),
            _ => assert_eq!(field(&f, "tcp"), Some(took), "{f}"),
        }
    }
}

/// Checked addresses must be test hosts' (no root needed: refused before anything).
#[test]
fn sink_refuses_checks_outside_the_benchmark_ranges() {
    for (flag, addr) in [
        ("--check-dst", "192.0.2.1"),
        ("--check-src", "10.0.0.1:7000,7001"),
        ("--check-dst", "[2001:db9::1]:1,2"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_xlb-sink"))
            .args(["--dev", "xlb-no-such-dev", flag, addr])
            .output()
            .expect("running xlb-sink");
        assert_eq!(out.status.code(), Some(2), "{flag} {addr}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("test hosts only"), "{flag} {addr}: {err}");
    }
}
