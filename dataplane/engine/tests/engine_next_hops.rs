//! Next hops through the whole engine: VLAN tags (dropped unless allowed, kept per flow side,
//! byte for byte), entries reclaimed when no flow uses them, flows following route changes.

mod common;

use std::net::{IpAddr, Ipv4Addr};

use common::flags::*;
use common::*;
use etherparse::{PacketBuilder, VlanId};
use xlb_engine::time::{mins, secs};
use xlb_engine::{wire, DropReason, EngineConfig, Route, Verdict};

const G_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x99, 0x01];
const H_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x99, 0x02];

/// One side of a frame: MACs and tag.
#[derive(Clone, Copy)]
struct L2 {
    src: [u8; 6],
    dst: [u8; 6],
    vlan: Option<u16>,
}

/// A UDP frame built by etherparse, independently of the engine.
fn udp_frame(
    l2: L2,
    (src, sport): (IpAddr, u16),
    (dst, dport): (IpAddr, u16),
    ttl: u8,
    data: &[u8],
) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2(l2.src, l2.dst);
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src, dst) else {
        panic!("IPv4 only")
    };
    let b = match l2.vlan {
        Some(v) => eth
            .single_vlan(VlanId::try_new(v).unwrap())
            .ipv4(s.octets(), d.octets(), ttl)
            .udp(sport, dport),
        None => eth.ipv4(s.octets(), d.octets(), ttl).udp(sport, dport),
    };
    let mut out = Vec::new();
    b.write(&mut out, data).unwrap();
    out
}

/// A TCP segment built by etherparse.
fn tcp_frame(
    l2: L2,
    (src, sport): (IpAddr, u16),
    (dst, dport): (IpAddr, u16),
    ttl: u8,
    (flags, seq, ack): (u8, u32, u32),
) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2(l2.src, l2.dst);
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src, dst) else {
        panic!("IPv4 only")
    };
    let mut b = match l2.vlan {
        Some(v) => eth
            .single_vlan(VlanId::try_new(v).unwrap())
            .ipv4(s.octets(), d.octets(), ttl)
            .tcp(sport, dport, seq, 64240),
        None => eth
            .ipv4(s.octets(), d.octets(), ttl)
            .tcp(sport, dport, seq, 64240),
    };
    if flags & SYN != 0 {
        b = b.syn();
    }
    if flags & ACK != 0 {
        b = b.ack(ack);
    }
    let mut out = Vec::new();
    b.write(&mut out, &[]).unwrap();
    out
}

/// Runs `frame` through the engine with 4 bytes of room behind it (as xlbd's frame buffers
/// have); the verdict and the frame as it would leave.
fn send_with_room(lab: &mut Lab, port: u16, frame: Vec<u8>) -> (Verdict, Vec<u8>) {
    let len = frame.len();
    let mut buf = frame;
    buf.resize(len + wire::VLAN_HLEN, 0xee);
    let v = lab.engine.process_buf(lab.now, port, &mut buf, len);
    if let Verdict::Tx { len, .. } = v {
        buf.truncate(usize::from(len));
    }
    (v, buf)
}

fn forward_with_room(lab: &mut Lab, port: u16, frame: Vec<u8>) -> (u16, Vec<u8>) {
    match send_with_room(lab, port, frame) {
        (Verdict::Tx { port, .. }, f) => (port, f),
        (v, _) => panic!("expected a transmit, got {v:?}"),
    }
}

fn mac_of(backend: IpAddr) -> [u8; 6] {
    if backend == IpAddr::from(B1) {
        B1_MAC
    } else {
        B2_MAC
    }
}

fn client(vlan: Option<u16>) -> L2 {
    L2 {
        src: CLIENT_MAC,
        dst: XLB_MAC[0],
        vlan,
    }
}

const C: (IpAddr, u16) = (IpAddr::V4(CLIENT), 40_000);
const V53: (IpAddr, u16) = (IpAddr::V4(VIP), 53);

#[test]
fn tagged_frames_of_vlans_not_allowed_are_dropped_and_counted() {
    let mut lab = Lab::new();
    lab.engine.next_hops().allow_vlan(CLIENT_PORT, 100);
    for (port, vlan) in [(CLIENT_PORT, 101), (CLIENT_PORT, 4094), (BACKEND_PORT, 100)] {
        let f = udp_frame(client(Some(vlan)), C, V53, 64, b"q");
        let (v, _) = send_with_room(&mut lab, port, f);
        assert_eq!(
            v,
            Verdict::Drop(DropReason::VlanTag),
            "port {port} vlan {vlan}"
        );
    }
    // Priority-tagged frames (VLAN 0) carry a tag too.
    let mut f = udp_frame(client(Some(1)), C, V53, 64, b"q");
    f[14..16].copy_from_slice(&0xa000u16.to_be_bytes());
    assert_eq!(
        send_with_room(&mut lab, CLIENT_PORT, f).0,
        Verdict::Drop(DropReason::VlanTag)
    );
    assert_eq!(lab.engine.counters().drop_count(DropReason::VlanTag), 4);
    assert_eq!(lab.engine.flow_count(), 0, "no flow, no SNAT port, nothing");
    assert_eq!(DropReason::VlanTag.as_str(), "vlan_tag");
}

#[test]
fn an_allowed_client_vlan_stays_on_the_client_side_byte_for_byte() {
    let mut lab = Lab::new();
    lab.engine.next_hops().allow_vlan(CLIENT_PORT, 100);
    let q = udp_frame(client(Some(100)), C, V53, 64, b"query");
    let (port, out) = forward_with_room(&mut lab, CLIENT_PORT, q);
    assert_eq!(port, BACKEND_PORT);
    let backend = seen(&out).dst;
    let b = L2 {
        src: XLB_MAC[1],
        dst: mac_of(backend),
        vlan: None,
    };
    // Toward the backend: untagged (its segment has no VLAN), translated, TTL 63.
    assert_eq!(out, udp_frame(b, C, (backend, 5353), 63, b"query"));

    // The backend's untagged answer goes back to the client with the client's tag.
    let r = L2 {
        src: mac_of(backend),
        dst: XLB_MAC[1],
        vlan: None,
    };
    let answer = udp_frame(r, (backend, 5353), C, 64, b"answer");
    let (port, out) = forward_with_room(&mut lab, BACKEND_PORT, answer.clone());
    assert_eq!(port, CLIENT_PORT);
    let back = L2 {
        src: XLB_MAC[0],
        dst: CLIENT_MAC,
        vlan: Some(100),
    };
    assert_eq!(out, udp_frame(back, V53, C, 63, b"answer"));

    // A caller without room in its buffer cannot add the tag: a counted drop, not a leak
    // of an untagged frame onto the client's VLAN.
    assert_eq!(
        lab.send(BACKEND_PORT, answer).0,
        Verdict::Drop(DropReason::VlanTag)
    );
}

#[test]
fn a_backend_on_its_own_vlan_gets_its_tag_and_the_client_keeps_its_own() {
    let mut lab = Lab::new();
    let net = lab.engine.next_hops();
    net.allow_vlan(CLIENT_PORT, 100);
    net.allow_vlan(BACKEND_PORT, 200);
    net.set_neighbor_vlan(B1.into(), BACKEND_PORT, Some(200), B1_MAC)
        .unwrap();
    net.set_neighbor_vlan(B2.into(), BACKEND_PORT, Some(200), B2_MAC)
        .unwrap();
    for (i, client_vlan) in [Some(100), None].into_iter().enumerate() {
        let c = (IpAddr::V4(CLIENT), 40_000 + i as u16);
        let mut q = udp_frame(client(client_vlan), c, V53, 64, b"query");
        if client_vlan.is_some() {
            q[14] |= 0xe0; // the client's priority bits must not cross over
        }
        let (port, out) = forward_with_room(&mut lab, CLIENT_PORT, q);
        assert_eq!(port, BACKEND_PORT);
        let backend = seen(&out).dst;
        let b = L2 {
            src: XLB_MAC[1],
            dst: mac_of(backend),
            vlan: Some(200),
        };
        assert_eq!(
            out,
            udp_frame(b, c, (backend, 5353), 63, b"query"),
            "client {client_vlan:?}"
        );

        let r = L2 {
            src: mac_of(backend),
            dst: XLB_MAC[1],
            vlan: Some(200),
        };
        let answer = udp_frame(r, (backend, 5353), c, 64, b"answer");
        let (port, out) = forward_with_room(&mut lab, BACKEND_PORT, answer);
        assert_eq!(port, CLIENT_PORT);
        let back = L2 {
            src: XLB_MAC[0],
            dst: CLIENT_MAC,
            vlan: client_vlan,
        };
        assert_eq!(
            out,
            udp_frame(back, V53, c, 63, b"answer"),
            "client {client_vlan:?}"
        );
    }
}

#[test]
fn one_mac_on_two_vlans_is_two_senders() {
    let mut lab = Lab::new();
    let net = lab.engine.next_hops();
    net.allow_vlan(CLIENT_PORT, 100);
    net.allow_vlan(CLIENT_PORT, 101);
    let mut backends = Vec::new();
    for (sport, vlan) in [(40_100, 100), (40_101, 101)] {
        let q = udp_frame(client(Some(vlan)), (CLIENT.into(), sport), V53, 64, b"q");
        let (_, out) = forward_with_room(&mut lab, CLIENT_PORT, q);
        backends.push(seen(&out).dst);
    }
    for ((sport, vlan), backend) in [(40_100u16, 100u16), (40_101, 101)]
        .into_iter()
        .zip(backends)
    {
        let r = L2 {
            src: mac_of(backend),
            dst: XLB_MAC[1],
            vlan: None,
        };
        let answer = udp_frame(r, (backend, 5353), (CLIENT.into(), sport), 64, b"a");
        let (_, out) = forward_with_room(&mut lab, BACKEND_PORT, answer);
        assert_eq!(
            wire::parse(&out).unwrap().vlan,
            Some(vlan),
            "client port {sport}"
        );
    }
}

#[test]
fn reset_on_idle_sends_each_side_its_own_tag() {
    let mut lab = Lab::new();
    lab.engine.next_hops().allow_vlan(CLIENT_PORT, 100);
    let c = (IpAddr::V4(CLIENT), 40_500);
    let vip = (IpAddr::V4(VIP), 80);
    let (_, syn) = forward_with_room(
        &mut lab,
        CLIENT_PORT,
        tcp_frame(client(Some(100)), c, vip, 64, (SYN, 1000, 0)),
    );
    let backend = seen(&syn).dst;
    let r = L2 {
        src: mac_of(backend),
        dst: XLB_MAC[1],
        vlan: None,
    };
    forward_with_room(
        &mut lab,
        BACKEND_PORT,
        tcp_frame(r, (backend, 8080), c, 64, (SYN | ACK, 7000, 1001)),
    );
    forward_with_room(
        &mut lab,
        CLIENT_PORT,
        tcp_frame(client(Some(100)), c, vip, 64, (ACK, 1001, 7001)),
    );
    lab.advance(mins(4) + secs(1));
    assert_eq!(lab.emitted.len(), 2, "{:?}", lab.emitted);
    for (port, f) in &lab.emitted {
        let p = wire::parse(f).unwrap();
        match *port {
            CLIENT_PORT => assert_eq!(p.vlan, Some(100)),
            BACKEND_PORT => assert_eq!(p.vlan, None),
            other => panic!("RST on port {other}"),
        }
    }
}

#[test]
fn learned_senders_are_reclaimed_with_their_flows() {
    // Five neighbours (the lab's) + three learned senders.
    let cfg = EngineConfig {
        next_hop_capacity: 8,
        ..EngineConfig::default()
    };
    let mut lab = Lab::with(DEFAULT_CONFIG, cfg);
    assert_eq!(lab.engine.next_hop_stats().entries, 5);
    let sender = |i: u8| L2 {
        src: [0x02, 0, 0, 0x5b, 0, i],
        dst: XLB_MAC[0],
        vlan: None,
    };
    for i in 0..3u8 {
        let q = udp_frame(
            sender(i),
            (CLIENT.into(), 41_000 + u16::from(i)),
            V53,
            64,
            b"q",
        );
        forward_with_room(&mut lab, CLIENT_PORT, q);
    }
    // A fourth MAC finds the table full: refused, counted, no flow.
    let q = udp_frame(sender(3), (CLIENT.into(), 41_003), V53, 64, b"q");
    let (v, _) = send_with_room(&mut lab, CLIENT_PORT, q.clone());
    assert_eq!(v, Verdict::Drop(DropReason::NextHopTableFull));
    assert_eq!(lab.engine.flow_count(), 3);
    let s = lab.engine.next_hop_stats();
    assert_eq!((s.entries, s.reclaimed, s.refused), (8, 0, 1));
    // A second flow from a known sender needs no new entry.
    let again = udp_frame(sender(0), (CLIENT.into(), 42_000), V53, 64, b"q");
    forward_with_room(&mut lab, CLIENT_PORT, again);
    // The UDP flows idle out: their senders go with them, the kernel's neighbours stay.
    lab.advance(mins(5));
    assert_eq!(lab.engine.flow_count(), 0);
    let s = lab.engine.next_hop_stats();
    assert_eq!((s.entries, s.reclaimed, s.refused), (5, 3, 1));
    // Room again for the fourth.
    forward_with_room(&mut lab, CLIENT_PORT, q);
    assert_eq!(lab.engine.next_hop_stats().entries, 6);
}

#[test]
fn a_neighbour_the_kernel_drops_stays_under_its_flows_then_goes() {
    let mut lab = Lab::new();
    let q = udp_frame(client(None), C, V53, 64, b"q");
    let (_, out) = forward_with_room(&mut lab, CLIENT_PORT, q.clone());
    let backend = seen(&out).dst;
    // The kernel's table now lists only the other backend (and the rest).
    let other = if backend == IpAddr::from(B1) { B2 } else { B1 };
    let kernel = [
        (other.into(), BACKEND_PORT, None, mac_of(other.into())),
        (REMOTE.into(), INTERNET_PORT, None, NET_MAC),
        (CLIENT.into(), CLIENT_PORT, None, CLIENT_MAC),
    ];
    lab.engine.next_hops().sync_neighbors(kernel);
    // The flow still reaches its backend at its last known MAC.
    let (_, out) = forward_with_room(&mut lab, CLIENT_PORT, q);
    assert_eq!(seen(&out).dst_mac, mac_of(backend));
    let reclaimed = lab.engine.next_hop_stats().reclaimed;
    assert_eq!(
        reclaimed, 1,
        "the IPv6 backend went at once: no flow used it"
    );
    lab.advance(mins(5));
    assert_eq!(
        lab.engine.next_hop_stats().reclaimed,
        3,
        "then the flow's backend and sender"
    );
}

#[test]
fn flows_follow_a_route_change_and_wait_for_an_unresolved_gateway() {
    let mut lab = Lab::new();
    let routes = |via: Option<Ipv4Addr>| {
        vec![
            Route::v4(Ipv4Addr::new(198, 18, 0, 0), 24, CLIENT_PORT, None),
            Route::v4(Ipv4Addr::new(198, 18, 1, 0), 24, BACKEND_PORT, via),
            Route::v4(Ipv4Addr::new(198, 19, 0, 0), 24, INTERNET_PORT, None),
        ]
    };
    let q = udp_frame(client(None), C, V53, 64, b"q");
    let (_, out) = forward_with_room(&mut lab, CLIENT_PORT, q.clone());
    let backend = seen(&out).dst;
    assert_eq!(seen(&out).dst_mac, mac_of(backend));

    // The backends are now behind gateway G (known).
    let g = Ipv4Addr::new(198, 18, 1, 254);
    lab.engine
        .next_hops()
        .set_neighbor(g.into(), BACKEND_PORT, G_MAC)
        .unwrap();
    lab.engine.next_hops().set_routes(routes(Some(g)));
    assert_eq!(lab.engine.next_deadline(), Some(0), "a sweep is due");
    lab.advance(0);
    let (_, out) = forward_with_room(&mut lab, CLIENT_PORT, q.clone());
    assert_eq!((seen(&out).dst, seen(&out).dst_mac), (backend, G_MAC));

    // Then behind H, whose MAC the kernel does not know yet: the flow stays with G and H is
    // asked for; once H is known the flow moves to it.
    let h = Ipv4Addr::new(198, 18, 1, 253);
    lab.engine.next_hops().set_routes(routes(Some(h)));
    lab.advance(0);
    let (_, out) = forward_with_room(&mut lab, CLIENT_PORT, q.clone());
    assert_eq!(seen(&out).dst_mac, G_MAC);
    let mut missed = Vec::new();
    lab.engine.next_hops().take_misses(|a| missed.push(a));
    assert!(missed.contains(&h.into()), "{missed:?}");
    lab.engine
        .next_hops()
        .set_neighbor(h.into(), BACKEND_PORT, H_MAC)
        .unwrap();
    lab.advance(0);
    let (_, out) = forward_with_room(&mut lab, CLIENT_PORT, q.clone());
    assert_eq!(seen(&out).dst_mac, H_MAC);

    // G is no longer used by any flow; once the kernel drops it, it is reclaimed.
    let before = lab.engine.next_hop_stats().reclaimed;
    lab.engine.next_hops().remove_neighbor(g.into());
    assert_eq!(lab.engine.next_hop_stats().reclaimed, before + 1);
    // The reply direction never depended on routes: still the client's MAC.
    let r = L2 {
        src: H_MAC,
        dst: XLB_MAC[1],
        vlan: None,
    };
    let (port, out) = forward_with_room(
        &mut lab,
        BACKEND_PORT,
        udp_frame(r, (backend, 5353), C, 64, b"a"),
    );
    assert_eq!((port, seen(&out).dst_mac), (CLIENT_PORT, CLIENT_MAC));
}

#[test]
fn a_neighbour_mac_change_reaches_running_flows_in_place() {
    let mut lab = Lab::new();
    let q = udp_frame(client(None), C, V53, 64, b"q");
    let (_, out) = forward_with_room(&mut lab, CLIENT_PORT, q.clone());
    let backend = seen(&out).dst;
    let new_mac = [0x02, 0, 0, 0, 0x77, 0x77];
    lab.engine
        .next_hops()
        .set_neighbor(backend.into(), BACKEND_PORT, new_mac)
        .unwrap();
    let (_, out) = forward_with_room(&mut lab, CLIENT_PORT, q);
    assert_eq!(seen(&out).dst_mac, new_mac);
}
