//! The netlink subscription socket against a real kernel: changes made with ip(8) in a
//! network namespace arrive as events, and an overflowing socket says so. Needs root (CI is
//! root); skips with a message otherwise.

mod common;

use std::{
    net::IpAddr,
    process::Command,
    time::{Duration, Instant},
};

use common::*;
use xlb_afxdp::netlink::{
    KernelEvent, Netlink, NetlinkEvents, RTNLGRP_IPV4_ROUTE, RTNLGRP_IPV6_ROUTE, RTNLGRP_LINK,
    RTNLGRP_NEIGH,
};

const GROUPS: [u32; 4] = [
    RTNLGRP_NEIGH,
    RTNLGRP_IPV4_ROUTE,
    RTNLGRP_IPV6_ROUTE,
    RTNLGRP_LINK,
];

/// Reads events until `want` matches one (returned) or 3 s pass (panics with what came).
fn wait_for(
    ev: &mut NetlinkEvents,
    what: &str,
    want: impl Fn(&KernelEvent) -> bool,
) -> KernelEvent {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        let mut hit = None;
        ev.drain(64, |e| {
            if hit.is_none() && want(&e) {
                hit = Some(e.clone());
            }
            seen.push(e);
        })
        .expect("reading events");
        if let Some(e) = hit {
            return e;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("no event for {what} within 3 s; saw {seen:#?}");
}

fn ip_ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn neighbour_route_and_link_changes_arrive_as_events() {
    if !need_root("neighbour_route_and_link_changes_arrive_as_events") {
        return;
    }
    let pair = Pair::new();
    let ns = pair.a.clone();
    let dev = pair.a0.clone();
    in_netns(&ns.clone(), move || {
        let mut ev = NetlinkEvents::subscribe(&GROUPS).expect("subscribing");
        let ifindex = Netlink::open().unwrap().link_by_name(&dev).unwrap().ifindex;
        let n = ip_ip("198.18.1.50");
        let n6 = ip_ip("2001:db8:1::50");

        // A neighbour appears, changes its MAC, and goes.
        ip(&["-n", &ns, "neigh", "add", "198.18.1.50", "lladdr", "02:00:00:00:50:01", "dev", &dev, "nud", "permanent"]);
        let e = wait_for(&mut ev, "new neighbour", |e| {
            matches!(e, KernelEvent::Neighbour(x) if x.ip == n)
        });
        let KernelEvent::Neighbour(x) = e else { unreachable!() };
        assert_eq!((x.ifindex, x.mac), (ifindex, Some([2, 0, 0, 0, 0x50, 1])));
        assert!(x.state.is_usable());
        ip(&["-n", &ns, "neigh", "replace", "198.18.1.50", "lladdr", "02:00:00:00:50:02", "dev", &dev, "nud", "permanent"]);
        wait_for(&mut ev, "changed MAC", |e| {
            matches!(e, KernelEvent::Neighbour(x) if x.ip == n && x.mac == Some([2, 0, 0, 0, 0x50, 2]))
        });
        ip(&["-n", &ns, "neigh", "del", "198.18.1.50", "dev", &dev]);
        wait_for(&mut ev, "deleted neighbour", |e| {
            matches!(e, KernelEvent::NeighbourGone(x) if x.ip == n)
        });
        ip(&["-n", &ns, "-6", "neigh", "add", "2001:db8:1::50", "lladdr", "02:00:00:00:50:06", "dev", &dev]);
        wait_for(&mut ev, "IPv6 neighbour", |e| {
            matches!(e, KernelEvent::Neighbour(x) if x.ip == n6 && x.mac == Some([2, 0, 0, 0, 0x50, 6]))
        });

        // Routes, both families.
        ip(&["-n", &ns, "route", "add", "198.19.5.0/24", "via", PAIR_B4]);
        let e = wait_for(&mut ev, "new route", |e| {
            matches!(e, KernelEvent::Route(r) if r.dst == ip_ip("198.19.5.0") && r.prefix_len == 24)
        });
        let KernelEvent::Route(r) = e else { unreachable!() };
        assert_eq!(r.nexthops[0].gateway, Some(ip_ip(PAIR_B4)));
        assert_eq!(r.nexthops[0].ifindex, Some(ifindex));
        ip(&["-n", &ns, "route", "del", "198.19.5.0/24"]);
        wait_for(&mut ev, "deleted route", |e| {
            matches!(e, KernelEvent::RouteGone(r) if r.dst == ip_ip("198.19.5.0"))
        });
        ip(&["-n", &ns, "-6", "route", "add", "2001:db8:7::/48", "via", "2001:db8:1::3"]);
        wait_for(&mut ev, "IPv6 route", |e| {
            matches!(e, KernelEvent::Route(r) if r.dst == ip_ip("2001:db8:7::") && r.prefix_len == 48)
        });

        // A VLAN interface on the veth: its parent and id. Kernels built without 802.1Q
        // support cannot create one; the parsing is covered byte for byte in the unit tests.
        let vdev = format!("{dev}.100");
        let out = Command::new("ip")
            .args(["-n", &ns, "link", "add", "link", &dev, "name", &vdev, "type", "vlan", "id", "100"])
            .output()
            .unwrap();
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("Unknown device type"), "ip link add ... type vlan: {err}");
            eprintln!("NOTE: this kernel has no 802.1Q VLAN interfaces; VLAN link events not checked");
            return;
        }
        let e = wait_for(&mut ev, "VLAN link", |e| {
            matches!(e, KernelEvent::Link(l) if l.name == vdev)
        });
        let KernelEvent::Link(l) = e else { unreachable!() };
        assert_eq!((l.parent, l.vlan), (Some(ifindex), Some(100)));
        // The dump says the same.
        let dumped = Netlink::open().unwrap().link_by_name(&vdev).unwrap();
        assert_eq!((dumped.parent, dumped.vlan), (Some(ifindex), Some(100)));
        ip(&["-n", &ns, "link", "del", &vdev]);
        wait_for(&mut ev, "VLAN link gone", |e| {
            matches!(e, KernelEvent::LinkGone(l) if l.name == vdev)
        });
    })
    .join()
    .expect("namespace thread");
}

#[test]
fn an_overflowing_socket_reports_an_overrun() {
    if !need_root("an_overflowing_socket_reports_an_overrun") {
        return;
    }
    let pair = Pair::new();
    let ns = pair.a.clone();
    let dev = pair.a0.clone();
    in_netns(&ns.clone(), move || {
        let mut ev = NetlinkEvents::subscribe(&[RTNLGRP_NEIGH]).expect("subscribing");
        // The smallest buffer the kernel allows: a few notifications.
        ev.set_receive_buffer(0).unwrap();
        let batch: String = (0..400)
            .map(|i| {
                format!(
                    "neigh add 198.18.{}.{} lladdr 02:00:00:00:{:02x}:{:02x} dev {dev} nud permanent\n",
                    1 + i / 250,
                    1 + i % 250,
                    i / 256,
                    i % 256
                )
            })
            .collect();
        let mut child = Command::new("ip")
            .args(["-n", &ns, "-batch", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(batch.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success());
        let mut overrun = false;
        let mut neighbours = 0;
        ev.drain(10_000, |e| match e {
            KernelEvent::Overrun => overrun = true,
            KernelEvent::Neighbour(_) => neighbours += 1,
            _ => {}
        })
        .unwrap();
        assert!(overrun, "400 notifications into a minimal buffer, {neighbours} read");
        assert!(neighbours < 400);
        // The socket keeps working afterwards.
        ip(&["-n", &ns, "neigh", "add", "198.18.1.251", "lladdr", "02:00:00:00:ff:01", "dev", &dev]);
        wait_for(&mut ev, "a neighbour after the overrun", |e| {
            matches!(e, KernelEvent::Neighbour(x) if x.ip == ip_ip("198.18.1.251"))
        });
    })
    .join()
    .expect("namespace thread");
}
