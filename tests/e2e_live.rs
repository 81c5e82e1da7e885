//! End to end: configuration changes through the gRPC API reach the XDP program as well as the
//! workers. Frontends created live carry TCP, UDP and IPv6; a deleted frontend goes back to the
//! kernel; a frontend moved to another address follows it; a rule created in place of a deleted
//! one starts from zero counters; flows on the other frontends are never disturbed.
//! Run as root; otherwise each test says it is skipped.

mod common;

use std::{
    io::ErrorKind,
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use common::ops::{connect, runtime};
use common::*;
use xlb_api::server::Client;
use xlb_proto::v1 as pb;

const VIP2: &str = "198.18.0.101";
const VIP3: &str = "198.18.0.102";
const VIP6B: &str = "2001:db8::101";

fn tcp_to(lab: &Lab, addr: &str, port: u16) -> std::io::Result<TcpStream> {
    let to = SocketAddr::new(addr.parse().unwrap(), port);
    in_ns(&lab.client, move || {
        TcpStream::connect_timeout(&to, Duration::from_secs(3))
    })
}

/// One UDP question to `addr`:`port` from the client; the answer, or the error.
fn udp_ask(lab: &Lab, addr: &str, port: u16, q: &[u8]) -> std::io::Result<String> {
    let any = if addr.contains(':') {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    };
    let sock = in_ns(&lab.client, move || UdpSocket::bind(any).unwrap());
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    sock.send_to(q, (addr, port))?;
    let mut buf = [0u8; 256];
    let (n, from) = recv_from_retrying(&sock, &mut buf)?;
    assert_eq!(from.ip(), addr.parse::<IpAddr>().unwrap());
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn frontend(name: &str, address: &str) -> pb::Frontend {
    pb::Frontend {
        name: name.into(),
        address: address.into(),
        kind: pb::FrontendKind::Public as i32,
    }
}

fn rule(
    name: &str,
    fe: &str,
    proto: pb::Protocol,
    port: u32,
    pool: &str,
    to: u32,
) -> pb::LoadBalancingRule {
    pb::LoadBalancingRule {
        name: name.into(),
        frontend: fe.into(),
        protocol: proto as i32,
        frontend_port: port,
        backend_pool: pool.into(),
        backend_port: to,
        ..Default::default()
    }
}

/// Creates pool `far`, of the internet host alone, through the API.
async fn create_far_pool(c: &mut Client) {
    c.create_backend_pool(pb::CreateBackendPoolRequest {
        backend_pool: Some(pb::BackendPool {
            name: "far".into(),
            members: vec![pb::Member {
                address: INTERNET.into(),
                ..Default::default()
            }],
        }),
    })
    .await
    .unwrap();
}

/// The connection kept open on the configured VIP throughout: still echoing, never reset.
fn still_alive(s: &mut TcpStream, step: &str) {
    let got = echo(s, step.as_bytes());
    assert_eq!(
        got,
        step.as_bytes(),
        "the untouched frontend's flow after {step}"
    );
}

#[test]
fn frontends_created_deleted_and_moved_live_follow_in_the_data_plane() {
    if !need_root("frontends_created_deleted_and_moved_live_follow_in_the_data_plane") {
        return;
    }
    let lab = Lab::start_with(CONFIG, &["--workers", "2", "--queues", "2"]);
    // The appliance's kernel answers ARP / ND for the new addresses, as an operator would
    // arrange (the lab does the same for the configured VIP).
    let ac = format!("{}ac", lab.prefix);
    for a in [format!("{VIP2}/32"), format!("{VIP3}/32")] {
        ip(&["-n", &lab.xlb, "addr", "add", &a, "dev", &ac]);
    }
    ip(&[
        "-n",
        &lab.xlb,
        "addr",
        "add",
        &format!("{VIP6B}/128"),
        "dev",
        &ac,
        "nodad",
    ]);

    let rt = runtime();
    let mut c = rt.block_on(connect(&lab));
    let mut keep = lab.client_connect(80);
    still_alive(&mut keep, "start");

    // Before: VIP2 is the host's own address; nothing listens there, so its kernel refuses.
    let e = tcp_to(&lab, VIP2, 80).expect_err("nothing there yet");
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");

    // Create a frontend, a pool for IPv6, and TCP, UDP and IPv6 rules, live.
    rt.block_on(async {
        c.create_frontend(pb::CreateFrontendRequest {
            frontend: Some(frontend("vip2", VIP2)),
        })
        .await
        .unwrap();
        c.create_frontend(pb::CreateFrontendRequest {
            frontend: Some(frontend("vip6b", VIP6B)),
        })
        .await
        .unwrap();
        c.create_backend_pool(pb::CreateBackendPoolRequest {
            backend_pool: Some(pb::BackendPool {
                name: "web6".into(),
                members: vec![
                    pb::Member {
                        address: "2001:db8:1::11".into(),
                        ..Default::default()
                    },
                    pb::Member {
                        address: "2001:db8:1::12".into(),
                        ..Default::default()
                    },
                ],
            }),
        })
        .await
        .unwrap();
        for r in [
            rule("live-tcp", "vip2", pb::Protocol::Tcp, 80, "web", 8080),
            rule("live-udp", "vip2", pb::Protocol::Udp, 53, "web", 5353),
            rule("live-v6", "vip6b", pb::Protocol::Tcp, 80, "web6", 8080),
        ] {
            c.create_load_balancing_rule(pb::CreateLoadBalancingRuleRequest { rule: Some(r) })
                .await
                .unwrap();
        }
    });
    still_alive(&mut keep, "create");

    // TCP, UDP and IPv6 through the new frontends, to the backends.
    let mut s = tcp_to(&lab, VIP2, 80).expect("TCP to the frontend created live");
    let who = whoami(&mut s);
    assert!(who.starts_with("backend"), "{who}");
    let answer = udp_ask(&lab, VIP2, 53, b"live").expect("UDP to the frontend created live");
    assert!(answer.ends_with(":live"), "{answer}");
    let mut s6 = tcp_to(&lab, VIP6B, 80).expect("IPv6 TCP to the frontend created live");
    let who6 = whoami(&mut s6);
    assert!(who6.starts_with("backend"), "{who6}");
    drop((s, s6));

    // Move vip2 to VIP3: the new address carries the rules, the old one is the kernel's again.
    rt.block_on(async {
        c.update_frontend(pb::UpdateFrontendRequest {
            frontend: Some(frontend("vip2", VIP3)),
        })
        .await
        .unwrap();
    });
    still_alive(&mut keep, "move");
    let mut s = tcp_to(&lab, VIP3, 80).expect("TCP to the moved frontend");
    assert!(whoami(&mut s).starts_with("backend"));
    let e = tcp_to(&lab, VIP2, 80).expect_err("the old address went back to the kernel");
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
    drop(s);

    // Delete the IPv6 rule and frontend: the address is the kernel's again (it refuses).
    rt.block_on(async {
        c.delete_load_balancing_rule(pb::DeleteRequest {
            name: "live-v6".into(),
        })
        .await
        .unwrap();
        c.delete_frontend(pb::DeleteRequest {
            name: "vip6b".into(),
        })
        .await
        .unwrap();
    });
    let e = tcp_to(&lab, VIP6B, 80).expect_err("a deleted frontend attracts nothing");
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
    still_alive(&mut keep, "delete");

    // The configured frontend's flow went through every change.
    still_alive(&mut keep, "end");
}

#[test]
fn a_rule_created_after_a_deleted_one_starts_from_zero() {
    if !need_root("a_rule_created_after_a_deleted_one_starts_from_zero") {
        return;
    }
    let lab = Lab::start(CONFIG);
    let rt = runtime();
    let mut c = rt.block_on(connect(&lab));

    // Traffic on web-silent (port 81), and one connection left open on it.
    for _ in 0..3 {
        let mut s = lab.client_connect(81);
        assert!(whoami(&mut s).starts_with("backend"));
    }
    let mut draining = lab.client_connect(81);
    assert!(whoami(&mut draining).starts_with("backend"));
    let counters = |c: &mut Client, name: &str| {
        let name = name.to_string();
        rt.block_on(async move {
            c.get_counters(pb::GetCountersRequest {
                rule: name,
                per_worker: false,
            })
            .await
            .map(|r| r.into_inner().rules)
        })
    };
    // Workers report every 250 ms.
    let mut before = counters(&mut c, "web-silent").unwrap();
    for _ in 0..30 {
        if before[0].flows_created >= 4 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        before = counters(&mut c, "web-silent").unwrap();
    }
    assert!(before[0].flows_created >= 4, "{before:?}");

    // Delete it and create a rule on the same port: nothing of the old rule shows in the new.
    rt.block_on(async {
        c.delete_load_balancing_rule(pb::DeleteRequest {
            name: "web-silent".into(),
        })
        .await
        .unwrap();
        c.create_load_balancing_rule(pb::CreateLoadBalancingRuleRequest {
            rule: Some(rule("web-new", "vip", pb::Protocol::Tcp, 81, "web", 8080)),
        })
        .await
        .unwrap();
    });
    let fresh = counters(&mut c, "web-new").unwrap();
    assert_eq!(fresh.len(), 1);
    assert_eq!(fresh[0].flows_created, 0, "{fresh:?}");
    assert_eq!(fresh[0].packets_original, 0, "{fresh:?}");
    assert_ne!(
        fresh[0].rule_id, before[0].rule_id,
        "a new rule never takes a deleted rule's id"
    );
    let e = counters(&mut c, "web-silent").expect_err("the deleted rule is gone from the API");
    assert_eq!(e.code(), tonic::Code::NotFound);
    let metrics = lab.metrics();
    assert!(
        !metrics.contains("rule=\"web-silent\""),
        "a deleted rule leaves the exposition"
    );
    assert!(metrics.contains("rule=\"web-new\""), "{metrics}");

    // The deleted rule's open connection still works (its flow keeps the old rule's settings),
    // and its packets do not count on the new rule.
    assert!(whoami(&mut draining).starts_with("backend"));
    let after = counters(&mut c, "web-new").unwrap();
    assert_eq!(after[0].packets_original, 0, "{after:?}");
    // New connections on port 81 are the new rule's.
    let mut s = lab.client_connect(81);
    assert!(whoami(&mut s).starts_with("backend"));
    std::thread::sleep(Duration::from_millis(600));
    let after = counters(&mut c, "web-new").unwrap();
    assert_eq!(after[0].flows_created, 1, "{after:?}");
}

#[test]
fn a_member_added_live_behind_another_interface_gets_its_answers_taken() {
    if !need_root("a_member_added_live_behind_another_interface_gets_its_answers_taken") {
        return;
    }
    let lab = Lab::start(CONFIG);
    // The internet host will serve as a member: it answers clients through the appliance.
    ip(&[
        "-n",
        &lab.internet,
        "route",
        "add",
        "198.18.0.0/24",
        "via",
        "198.19.0.1",
    ]);
    let rt = runtime();
    let mut c = rt.block_on(connect(&lab));
    let ai = format!("{}ai", lab.prefix);
    assert!(
        !lab.log_text()
            .contains(&format!("{ai}=native+backend_side"))
            && !lab
                .log_text()
                .contains(&format!("{ai}=generic+backend_side")),
        "the internet side does not face a member at start:\n{}",
        lab.log_text()
    );
    rt.block_on(async {
        create_far_pool(&mut c).await;
        c.create_load_balancing_rule(pb::CreateLoadBalancingRuleRequest {
            rule: Some(rule("far", "vip", pb::Protocol::Tcp, 8080, "far", 80)),
        })
        .await
        .unwrap();
    });
    // The member's answer arrives on the internet-side interface, addressed to the client:
    // without the interface marked backend side it would go to the appliance's kernel (which
    // does not forward) and the connection would never complete.
    let mut s = tcp_to(&lab, VIP, 8080).expect("connect through the member added live");
    let mut buf = [0u8; 64];
    let n = read_within(&mut s, &mut buf, Duration::from_secs(3)).expect("the member's answer");
    let peer = String::from_utf8_lossy(&buf[..n]);
    assert!(
        peer.starts_with(CLIENT),
        "the member sees the client: {peer}"
    );
}

/// The internet host routes to the clients' network through the appliance, and the
/// appliance holds the SNAT address VIP2 on its client-side interface (its kernel answers ARP
/// for it, as an operator would arrange). Returns a nonblocking server on the client host's
/// port 9000, for members that connect out.
fn route_members_out_through_snat2(lab: &Lab) -> std::net::TcpListener {
    ip(&[
        "-n",
        &lab.internet,
        "route",
        "add",
        "198.18.0.0/24",
        "via",
        "198.19.0.1",
    ]);
    let ac = format!("{}ac", lab.prefix);
    ip(&[
        "-n",
        &lab.xlb,
        "addr",
        "add",
        &format!("{VIP2}/32"),
        "dev",
        &ac,
    ]);
    let server = in_ns(&lab.client, || {
        std::net::TcpListener::bind((CLIENT, 9000)).expect("bind on the client host")
    });
    server.set_nonblocking(true).unwrap();
    server
}

/// The server accepts the member's outbound connection `out` (within 3 s), sees it come from
/// the SNAT address VIP2, and answers; the answer reaches the member, translated back.
fn answer_through_snat2(server: &std::net::TcpListener, out: &mut TcpStream) {
    use std::io::{Read, Write};
    let (mut accepted, peer) = {
        let end = std::time::Instant::now() + Duration::from_secs(3);
        loop {
            match server.accept() {
                Ok(a) => break a,
                Err(e) if e.kind() == ErrorKind::WouldBlock && std::time::Instant::now() < end => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
    };
    assert_eq!(
        peer.ip().to_string(),
        VIP2,
        "the client host sees the SNAT address"
    );
    accepted.set_nonblocking(false).unwrap();
    accepted.write_all(b"hello member\n").unwrap();
    let mut buf = [0u8; 13];
    out.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    out.read_exact(&mut buf)
        .expect("the answer, translated back");
    assert_eq!(&buf, b"hello member\n");
}

/// A member added live behind another interface may open outbound connections from there:
/// the engine's anti-spoofing (outbound flows only from interfaces facing the members)
/// follows the new member in the same generation as the rules that add it. Before, the
/// member's address on that interface is taken for spoofed, and counted.
#[test]
fn an_outbound_member_added_live_behind_another_interface_is_not_taken_for_spoofed() {
    if !need_root("an_outbound_member_added_live_behind_another_interface_is_not_taken_for_spoofed")
    {
        return;
    }
    let lab = Lab::start(CONFIG);
    // The internet host will be a member that connects out, to a server on the client
    // host, through a SNAT address on the client side (the appliance's kernel answers ARP
    // for it, as an operator would arrange).
    let server = route_members_out_through_snat2(&lab);
    let connect_out = |lab: &Lab| {
        let to = SocketAddr::new(CLIENT.parse().unwrap(), 9000);
        in_ns(&lab.internet, move || {
            TcpStream::connect_timeout(&to, Duration::from_secs(2))
        })
    };

    // Before: the outbound rule does not know the member; the data plane does not take its
    // packets as anyone's (the interface does not face a member: they go to the kernel,
    // which does not forward).
    assert!(connect_out(&lab).is_err(), "nothing carries it yet");

    let rt = runtime();
    let mut c = rt.block_on(connect(&lab));
    rt.block_on(async {
        c.create_frontend(pb::CreateFrontendRequest {
            frontend: Some(frontend("snat2", VIP2)),
        })
        .await
        .unwrap();
        create_far_pool(&mut c).await;
        c.create_outbound_rule(pb::CreateOutboundRuleRequest {
            rule: Some(pb::OutboundRule {
                name: "far-out".into(),
                frontends: vec!["snat2".into()],
                backend_pool: "far".into(),
                protocol: pb::Protocol::Tcp as i32,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    });
    let mut out = connect_out(&lab).expect("the member's outbound connection, translated");
    answer_through_snat2(&server, &mut out);
    assert_eq!(lab.stat("drop.spoofed_source"), 0, "{}", lab.log_text());
}

/// The same when a route change, not a rule change, puts a member behind another interface:
/// the control loop sends the new marks to the workers' engines, right after the XDP
/// program's. The member's address is first routed nowhere; a route through the internet
/// host makes it reachable there, and from then on it connects out through SNAT.
#[test]
fn an_outbound_member_behind_a_new_route_is_not_taken_for_spoofed() {
    if !need_root("an_outbound_member_behind_a_new_route_is_not_taken_for_spoofed") {
        return;
    }
    const MEMBER: &str = "198.18.9.9";
    let config = format!(
        r#"{CONFIG}
[[frontends]]
name = "snat2"
address = "{VIP2}"
kind = "public"

[[backend_pools]]
name = "far"
members = [{{ address = "{MEMBER}" }}]

[[outbound_rules]]
name = "far-out"
frontends = ["snat2"]
backend_pool = "far"
protocol = "TCP"
"#
    );
    let lab = Lab::start(&config);
    // The member is a second address of the internet host, which sends to the client's
    // network through the appliance.
    let i = format!("{}i", lab.prefix);
    ip(&[
        "-n",
        &lab.internet,
        "addr",
        "add",
        &format!("{MEMBER}/32"),
        "dev",
        &i,
    ]);
    let server = route_members_out_through_snat2(&lab);
    let connect_out = |lab: &Lab| {
        let to = SocketAddr::new(CLIENT.parse().unwrap(), 9000);
        in_ns(&lab.internet, move || {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.bind(&SocketAddr::new(MEMBER.parse().unwrap(), 0).into())?;
            s.connect_timeout(&to.into(), Duration::from_secs(2))?;
            Ok::<TcpStream, std::io::Error>(s.into())
        })
    };
    assert!(
        !lab.log_text()
            .contains(&format!("{}ai=native+backend_side", lab.prefix)),
        "no member is routed through the internet side at start:\n{}",
        lab.log_text()
    );
    assert!(connect_out(&lab).is_err(), "nothing carries it yet");

    // The appliance learns a route to the member through the internet host.
    let ai = format!("{}ai", lab.prefix);
    ip(&[
        "-n", &lab.xlb, "route", "add", MEMBER, "via", INTERNET, "dev", &ai,
    ]);
    let routed = std::time::Instant::now();
    let end = routed + Duration::from_secs(5);
    let mut out = loop {
        match connect_out(&lab) {
            Ok(s) => {
                eprintln!(
                    "connected {:?} after the route change; spoofed_source={}",
                    routed.elapsed(),
                    lab.stat("drop.spoofed_source")
                );
                break s;
            }
            Err(e) if std::time::Instant::now() < end => {
                let stats = lab.stats();
                let mut nonzero: Vec<_> = stats
                    .iter()
                    .filter(|(k, v)| **v > 0 && (k.starts_with("drop.") || k.contains("far-out")))
                    .collect();
                nonzero.sort();
                eprintln!("not yet after {:?}: {e}; {nonzero:?}", routed.elapsed());
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!(
                "the member's outbound connection after the route change: {e}; stats: \
                 spoofed_source={}; log:\n{}",
                lab.stat("drop.spoofed_source"),
                lab.log_text()
            ),
        }
    };
    answer_through_snat2(&server, &mut out);
}
