//! The XDP program's decisions against a fixture table, through `BPF_PROG_TEST_RUN` on a
//! veth of a throwaway namespace: `{description, frame, interface, expected action and
//! counter}`. Needs root; skips otherwise.

mod common;

use std::net::Ipv6Addr;

use common::*;
use etherparse::PacketBuilder;
use xlb_afxdp::{
    netlink::Netlink, AddrKind, AttachMode, BindMode, ModeRequest, Worker, WorkerConfig,
    XdpCounters, XdpProgram,
};

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];
const OWNED4: [u8; 4] = [198, 18, 100, 1];
const OWNED6: &str = "2001:db8:100::1";

fn udp4(dst: [u8; 4]) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4([198, 18, 1, 2], dst, 64)
        .udp(1000, 2000)
        .write(&mut v, b"x")
        .unwrap();
    v
}

fn udp6(dst: &str) -> Vec<u8> {
    let dst: Ipv6Addr = dst.parse().unwrap();
    let mut v = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv6(
            "2001:db8:1::2".parse::<Ipv6Addr>().unwrap().octets(),
            dst.octets(),
            64,
        )
        .udp(1000, 2000)
        .write(&mut v, b"x")
        .unwrap();
    v
}

/// ICMPv6 of `ty` (135 = neighbour solicitation) to a unicast address.
fn icmp6(dst: &str, ty: u8) -> Vec<u8> {
    let mut v = udp6(dst);
    v[14 + 6] = 58; // next header: ICMPv6
    v[14 + 40] = ty;
    v
}

fn vlan(mut frame: Vec<u8>) -> Vec<u8> {
    let tag = [0x81, 0x00, 0x00, 0x07];
    frame.splice(12..12, tag);
    frame
}

fn arp() -> Vec<u8> {
    let mut v = vec![0u8; 42];
    v[..6].copy_from_slice(&[0xff; 6]);
    v[6..12].copy_from_slice(&MAC_A);
    v[12] = 0x08;
    v[13] = 0x06;
    v
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// XDP_PASS, counted `passed`
    Pass,
    /// the dataplane wants it; no socket in the slot → XDP_PASS counted `no_xsk`
    NoXsk,
    /// XDP_REDIRECT into a registered socket, counted `redirected`
    Redirect,
}

/// Runs `frame` on (`ifindex`, `queue`) and classifies what the program did.
fn redirect(xdp: &XdpProgram, desc: &str, frame: &[u8], ifindex: u32, queue: u32, want: Want) {
    let before = xdp.counters().unwrap();
    let action = xdp.test_run(frame, ifindex, queue).unwrap();
    let after = xdp.counters().unwrap();
    let got = if action == XDP_REDIRECT {
        assert_eq!(after.redirected, before.redirected + 1, "{desc}");
        Want::Redirect
    } else if after.no_xsk > before.no_xsk {
        Want::NoXsk
    } else {
        Want::Pass
    };
    assert_eq!(got, want, "{desc} (queue {queue})");
}

#[test]
fn xdp_program_decisions() {
    if !need_root("xdp_program_decisions") {
        return;
    }
    let lab = Lab::new();
    let (f0, f1) = (lab.f0.clone(), lab.f1.clone());
    in_netns(&lab.fwd, move || {
        let mut nl = Netlink::open().unwrap();
        let front = nl.link_by_name(&f0).unwrap().ifindex; // frontend side
        let back = nl.link_by_name(&f1).unwrap().ifindex; // backend side
        let lo = nl.link_by_name("lo").unwrap().ifindex; // no program config
        let mut xdp = XdpProgram::load().unwrap();
        xdp.add_local_addrs_from_kernel().unwrap();
        xdp.add_addr(OWNED4.into(), AddrKind::Owned).unwrap();
        xdp.add_addr(OWNED6.parse().unwrap(), AddrKind::Owned)
            .unwrap();
        xdp.attach(front, ModeRequest::Auto, false).unwrap();
        xdp.attach(back, ModeRequest::Auto, true).unwrap();

        // lo has no native XDP: Auto falls back to generic; Native alone refuses.
        assert!(xdp.attach(lo, ModeRequest::Native, false).is_err());
        assert_eq!(
            xdp.attach(lo, ModeRequest::Auto, false).unwrap(),
            AttachMode::Generic
        );
        assert_eq!(xdp.mode(front), Some(AttachMode::Native));
        assert!(xdp.detach(lo).unwrap());

        let table: Vec<(&str, Vec<u8>, u32, Want)> = vec![
            ("ARP on the frontend", arp(), front, Want::Pass),
            ("ARP on the backend side", arp(), back, Want::Pass),
            ("IPv4 to an owned VIP", udp4(OWNED4), front, Want::NoXsk),
            (
                "IPv4 to an owned VIP, VLAN-tagged",
                vlan(udp4(OWNED4)),
                front,
                Want::NoXsk,
            ),
            (
                "IPv4 to elsewhere on the frontend",
                udp4([198, 18, 9, 9]),
                front,
                Want::Pass,
            ),
            (
                "IPv4 to elsewhere on the backend side",
                udp4([198, 18, 9, 9]),
                back,
                Want::NoXsk,
            ),
            (
                "IPv4 to the host itself on the backend side",
                udp4([198, 18, 2, 1]),
                back,
                Want::Pass,
            ),
            (
                "IPv4 multicast on the backend side",
                udp4([224, 0, 0, 5]),
                back,
                Want::Pass,
            ),
            (
                "IPv4 broadcast on the backend side",
                udp4([255; 4]),
                back,
                Want::Pass,
            ),
            ("IPv6 to an owned VIP", udp6(OWNED6), front, Want::NoXsk),
            (
                "IPv6 to elsewhere on the backend side",
                udp6("2001:db8:9::9"),
                back,
                Want::NoXsk,
            ),
            ("IPv6 to the host itself", udp6(FWD6_S), back, Want::Pass),
            ("IPv6 link-local", udp6("fe80::1"), back, Want::Pass),
            ("IPv6 multicast", udp6("ff02::1:ff00:9"), back, Want::Pass),
            (
                "IPv6 unicast neighbour solicitation",
                icmp6("2001:db8:9::9", 135),
                back,
                Want::Pass,
            ),
            (
                "IPv6 unicast neighbour advertisement",
                icmp6("2001:db8:9::9", 136),
                back,
                Want::Pass,
            ),
            (
                "IPv6 echo request to elsewhere",
                icmp6("2001:db8:9::9", 128),
                back,
                Want::NoXsk,
            ),
            (
                "IPv4 truncated header",
                udp4(OWNED4)[..20].to_vec(),
                front,
                Want::Pass,
            ),
            (
                "an interface the program has no entry for",
                udp4(OWNED4),
                lo,
                Want::Pass,
            ),
        ];
        let check = |xdp: &XdpProgram, desc: &str, frame: &[u8], ifindex: u32, want: Want| {
            let before = xdp.counters().unwrap();
            let action = xdp.test_run(frame, ifindex, 0).unwrap();
            let after = xdp.counters().unwrap();
            let delta = XdpCounters {
                redirected: after.redirected - before.redirected,
                passed: after.passed - before.passed,
                no_xsk: after.no_xsk - before.no_xsk,
            };
            let (want_action, want_delta) = match want {
                Want::Pass => (
                    XDP_PASS,
                    XdpCounters {
                        passed: 1,
                        ..Default::default()
                    },
                ),
                Want::NoXsk => (
                    XDP_PASS,
                    XdpCounters {
                        no_xsk: 1,
                        ..Default::default()
                    },
                ),
                Want::Redirect => (
                    XDP_REDIRECT,
                    XdpCounters {
                        redirected: 1,
                        ..Default::default()
                    },
                ),
            };
            assert_eq!((action, delta), (want_action, want_delta), "{desc}");
        };
        for (desc, frame, ifindex, want) in &table {
            check(&xdp, desc, frame, *ifindex, *want);
        }

        // With sockets in the XSKMAP, what the dataplane wants is redirected — on the
        // queue's own slot only.
        let cfg = WorkerConfig {
            interfaces: vec![f0.clone(), f1.clone()],
            queues: vec![1],
            ring_size: 64,
            batch: 16,
            ..WorkerConfig::default()
        };
        // veth has no zero-copy: forcing it fails with EOPNOTSUPP, Auto falls back to copy.
        let forced = Worker::open(
            &WorkerConfig {
                bind: BindMode::ZeroCopy,
                ..cfg.clone()
            },
            &xdp,
        )
        .unwrap_err();
        assert_eq!(forced.raw_os_error(), Some(95), "EOPNOTSUPP: {forced}");
        let worker = Worker::open(&cfg, &xdp).unwrap();
        assert!(worker.sockets().iter().all(|s| !s.zero_copy && s.umem == 0));
        redirect(
            &xdp,
            "owned VIP, queue 1",
            &udp4(OWNED4),
            front,
            1,
            Want::Redirect,
        );
        redirect(
            &xdp,
            "owned VIP, queue 0 has no socket",
            &udp4(OWNED4),
            front,
            0,
            Want::NoXsk,
        );
        redirect(
            &xdp,
            "backend side, queue 1",
            &udp6("2001:db8:9::9"),
            back,
            1,
            Want::Redirect,
        );
        redirect(&xdp, "ARP still passes", &arp(), back, 1, Want::Pass);

        // Removing an owned address hands its traffic back to the kernel.
        xdp.remove_addr(OWNED4.into()).unwrap();
        xdp.remove_addr(OWNED4.into()).unwrap(); // idempotent
        redirect(&xdp, "VIP removed", &udp4(OWNED4), front, 1, Want::Pass);
        // Flipping the backend flag off.
        xdp.set_backend_side(back, false).unwrap();
        redirect(
            &xdp,
            "backend flag off",
            &udp6("2001:db8:9::9"),
            back,
            1,
            Want::Pass,
        );
        // Detaching clears the interface entry: everything passes.
        drop(worker);
        assert!(xdp.detach(front).unwrap());
        assert!(!xdp.detach(front).unwrap());
        redirect(&xdp, "detached", &udp6(OWNED6), front, 1, Want::Pass);
    })
    .join()
    .expect("xdp decision table");
    assert!(!lab.has_xdp(&lab.fwd, &lab.f0));
    assert!(
        !lab.has_xdp(&lab.fwd, &lab.f1),
        "dropping XdpProgram detaches"
    );
}
