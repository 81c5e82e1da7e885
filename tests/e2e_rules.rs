//! End to end, the rule features `e2e_lab.rs` does not cover: the three distribution modes of
//! a load-balancing rule, inbound NAT rules (single target and a port range across a pool),
//! and the `reset` and `pickup` unknown-flow policies. xlbd runs on AF_XDP in the namespace
//! lab of `common/mod.rs`, at lab time scale 60 (a 4-minute idle timeout lasts 4 s), with real
//! Linux TCP/UDP stacks on both sides. Run as root; otherwise each test says it is skipped.

mod common;

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    io::{ErrorKind, Read, Write},
    net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    thread,
    time::{Duration, Instant},
};

use common::*;
use socket2::{Domain, Socket, Type};
use xlb_engine::{
    compile,
    ruleset::{FlowTuple, RuleKind, PROTO_TCP, PROTO_UDP},
    Addr, Config, MemberHealth, RuleSet,
};

/// As in `e2e_lab.rs`: the slack allowed after a deadline on a loaded machine.
const SLACK: Duration = Duration::from_millis(1500);
const IDLE: Duration = Duration::from_secs(4);

/// Three load-balancing rules on one VIP, one per distribution mode. `sticky` and `per-proto`
/// are `ALL` rules: TCP and UDP from a client go through the same rule to backend port 8080
/// (the test adds UDP echo servers on 8080 next to the lab's TCP ones).
const CONFIG_DISTRIBUTION: &str = lab_config!(
    r#"
# No distribution given: the default, five_tuple.
[[load_balancing_rules]]
name = "spread"
frontend = "vip"
protocol = "TCP"
frontend_port = 80
backend_pool = "web"
backend_port = 8080

[[load_balancing_rules]]
name = "sticky"
frontend = "vip"
protocol = "ALL"
frontend_port = 82
backend_pool = "web"
backend_port = 8080
distribution = "source_ip"

[[load_balancing_rules]]
name = "per-proto"
frontend = "vip"
protocol = "ALL"
frontend_port = 83
backend_pool = "web"
backend_port = 8080
distribution = "source_ip_protocol"
"#
);

/// Port forwarding: one port to the pool's *second* member (so that "the first member" is
/// not a lucky default), a UDP one to the first, and a range across the pool with two spare
/// ports (reserved for the pool to grow: they select no member).
const CONFIG_NAT: &str = lab_config!(
    r#"
[[inbound_nat_rules]]
name = "ssh-backend2"
frontend = "vip"
protocol = "TCP"
frontend_port = 2201
target = "198.18.1.12"
backend_pool = "web"
backend_port = 8080

[[inbound_nat_rules]]
name = "dns-backend1"
frontend = "vip"
protocol = "UDP"
frontend_port = 5301
target = "198.18.1.11"
backend_port = 5353

[[inbound_nat_rules]]
name = "per-member"
frontend = "vip"
protocol = "TCP"
frontend_port_range = { start = 50001, end = 50004 }
backend_pool = "web"
backend_port = 8080
"#
);

/// The two unknown-flow policies not covered elsewhere, on silent (no tcp_reset) rules.
const CONFIG_UNKNOWN_FLOW: &str = lab_config!(
    r#"
[[load_balancing_rules]]
name = "reset-unknown"
frontend = "vip"
protocol = "TCP"
frontend_port = 84
backend_pool = "web"
backend_port = 8080
idle_timeout_minutes = 4
unknown_flow = "reset"

[[load_balancing_rules]]
name = "pickup"
frontend = "vip"
protocol = "TCP"
frontend_port = 85
backend_pool = "web"
backend_port = 8080
idle_timeout_minutes = 4
unknown_flow = "pickup"
"#
);

/// Runs `f` in namespace `ns`; if it panics, fails with xlbd's log as well.
fn run_in<T: Send + 'static>(lab: &Lab, ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    match spawn_in_ns(ns, f).join() {
        Ok(v) => v,
        Err(e) => {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("in {ns}: {msg}\nxlbd's log:\n{}", lab.log_text())
        }
    }
}

fn backend_name(addr: IpAddr) -> &'static str {
    match addr.to_string().as_str() {
        BACKEND1 => "backend1",
        BACKEND2 => "backend2",
        other => panic!("not a backend: {other}"),
    }
}

/// A payload of `len` bytes whose content shows any reordering or corruption.
fn payload(len: usize, salt: usize) -> Vec<u8> {
    (0..len).map(|b| (b * 7 + salt * 13) as u8).collect()
}

/// A TCP connection to the VIP from `src` (port 0: an ephemeral port). Call inside the
/// client's namespace.
fn connect_from(src: SocketAddr, port: u16) -> TcpStream {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    s.bind(&src.into())
        .unwrap_or_else(|e| panic!("bind {src}: {e}"));
    let vip = SocketAddr::new(VIP.parse().unwrap(), port);
    s.connect_timeout(&vip.into(), Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect {src} -> {vip}: {e}"));
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Asks the backend behind `s` its name, then echoes a `len`-byte payload: the name, and
/// whether the bytes came back intact.
fn whoami_and_echo(s: &mut TcpStream, len: usize, salt: usize) -> (String, bool) {
    let name = whoami(s);
    let p = payload(len, salt);
    let intact = echo(s, &p) == p;
    (name, intact)
}

/// One UDP exchange with the VIP from a fresh socket bound to `src`: (local address, the
/// backend's name). The echo answers `name:payload`; anything else fails.
fn udp_ask_from(src: IpAddr, port: u16, salt: usize) -> (SocketAddr, String) {
    let s = UdpSocket::bind((src, 0)).expect("bind UDP");
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let vip = SocketAddr::new(VIP.parse().unwrap(), port);
    let q = format!("q{salt}");
    s.send_to(q.as_bytes(), vip).expect("UDP send");
    let mut buf = [0u8; 256];
    let (n, from) = recv_from_retrying(&s, &mut buf)
        .unwrap_or_else(|e| panic!("UDP answer from {vip} to {src}: {e}"));
    assert_eq!(from, vip, "the answer comes from the VIP");
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    let (name, echoed) = text
        .split_once(':')
        .unwrap_or_else(|| panic!("UDP answer {text:?}"));
    assert_eq!(echoed, q, "UDP payload intact");
    (s.local_addr().unwrap(), name.to_string())
}

/// UDP echo servers ("backendN:" + payload) on `port` in both backends, for `ALL` rules whose
/// TCP and UDP share a backend port. They stop when this is dropped, and after 60 s anyway.
struct UdpEchoes(Arc<AtomicBool>);

impl Drop for UdpEchoes {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn start_udp_echoes(lab: &Lab, port: u16) -> UdpEchoes {
    let stop = Arc::new(AtomicBool::new(false));
    for (ns, name) in [(&lab.backend1, "backend1"), (&lab.backend2, "backend2")] {
        let (ready_tx, ready_rx) = mpsc::channel();
        let stop = Arc::clone(&stop);
        spawn_in_ns(ns, move || {
            let s = UdpSocket::bind(("0.0.0.0", port)).expect("bind UDP echo");
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            let _ = ready_tx.send(());
            let end = Instant::now() + Duration::from_secs(60);
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                if let Ok((n, peer)) = s.recv_from(&mut buf) {
                    let mut reply = format!("{name}:").into_bytes();
                    reply.extend_from_slice(&buf[..n]);
                    let _ = s.send_to(&reply, peer);
                }
            }
        });
        ready_rx.recv().expect("UDP echo started");
    }
    UdpEchoes(stop)
}

/// The engine's own choice for a new flow, from the same configuration: what xlbd must do.
struct Model(RuleSet);

impl Model {
    fn new(config: &str) -> Model {
        let config = Config::from_toml_str(config).expect("the test's config is valid");
        Model(compile(&config, None, &MemberHealth::default(), 1).expect("it compiles"))
    }

    fn backend(&self, rule: &str, proto: u8, src: SocketAddr, port: u16) -> &'static str {
        let id = self
            .0
            .rule_id(RuleKind::LoadBalancing, rule)
            .unwrap_or_else(|| panic!("rule {rule}"));
        let tuple = FlowTuple {
            proto,
            src: Addr::from(src.ip()),
            src_port: src.port(),
            dst: Addr::from(VIP.parse::<IpAddr>().unwrap()),
            dst_port: port,
        };
        let b = self.0.select_backend(id, &tuple).expect("a backend");
        backend_name(b.addr.to_ip())
    }
}

/// Fixed source ports of the `five_tuple` connections (below the ephemeral range, so that no
/// other socket of the test takes them): the model then says in advance how they spread.
const FIVE_TUPLE_PORTS: std::ops::Range<u16> = 20001..20007;
/// Connections (TCP) and datagram exchanges (UDP, one fresh socket each) per client address
/// and sticky rule.
const PER_ADDRESS: usize = 6;

/// One answered connection or exchange.
#[derive(Debug)]
struct Seen {
    rule: &'static str,
    proto: u8,
    src: SocketAddr,
    backend: String,
}

/// Client addresses for the distribution test, from the model: each address's fixed-port
/// five-tuple connections spread over both members; under `source_ip` the addresses cover
/// both members; under `source_ip_protocol` at least one address has TCP and UDP on
/// different members. A hash change keeps the test meaningful: it picks other addresses.
fn pick_client_addresses(model: &Model) -> Vec<IpAddr> {
    let mut chosen: Vec<IpAddr> = Vec::new();
    let at = |a: IpAddr| SocketAddr::new(a, 0);
    let covered = |chosen: &[IpAddr]| {
        let sticky: HashSet<_> = chosen
            .iter()
            .map(|&a| model.backend("sticky", PROTO_TCP, at(a), 82))
            .collect();
        let split = chosen.iter().any(|&a| {
            model.backend("per-proto", PROTO_TCP, at(a), 83)
                != model.backend("per-proto", PROTO_UDP, at(a), 83)
        });
        sticky.len() == 2 && split
    };
    for host in 20..100u8 {
        let a = IpAddr::V4(Ipv4Addr::new(198, 18, 0, host));
        let spread: HashSet<_> = FIVE_TUPLE_PORTS
            .map(|p| model.backend("spread", PROTO_TCP, SocketAddr::new(a, p), 80))
            .collect();
        if spread.len() < 2 {
            continue;
        }
        chosen.push(a);
        if chosen.len() >= 4 && covered(&chosen) {
            return chosen;
        }
    }
    panic!("no set of client addresses in 198.18.0.20-99 shows the three modes apart: {chosen:?}");
}

#[test]
fn distribution_modes_five_tuple_spreads_source_ip_sticks_source_ip_protocol_per_protocol() {
    if !need_root(
        "distribution_modes_five_tuple_spreads_source_ip_sticks_source_ip_protocol_per_protocol",
    ) {
        return;
    }
    let model = Model::new(CONFIG_DISTRIBUTION);
    let addrs = pick_client_addresses(&model);
    eprintln!("client addresses: {addrs:?}");
    let lab = Lab::start(CONFIG_DISTRIBUTION);
    let _udp = start_udp_echoes(&lab, 8080);
    // Extra client addresses: the appliance learns a client's MAC from its frames, and the
    // backends answer every address through their default route, the appliance.
    let dev = format!("{}c", lab.prefix);
    for a in &addrs {
        ip(&[
            "-n",
            &lab.client,
            "addr",
            "add",
            &format!("{a}/24"),
            "dev",
            &dev,
        ]);
    }

    let client = lab.client.clone();
    let list = addrs.clone();
    let (seen, broken) = run_in(&lab, &client, move || {
        let mut seen = Vec::new();
        let mut broken = Vec::new();
        for (k, &a) in list.iter().enumerate() {
            for (i, p) in FIVE_TUPLE_PORTS.enumerate() {
                let src = SocketAddr::new(a, p);
                let mut s = connect_from(src, 80);
                let (backend, intact) = whoami_and_echo(&mut s, 1 + i * 3001, k + i);
                if !intact {
                    broken.push(src);
                }
                seen.push(Seen {
                    rule: "spread",
                    proto: PROTO_TCP,
                    src,
                    backend,
                });
            }
            for (rule, port) in [("sticky", 82), ("per-proto", 83)] {
                for i in 0..PER_ADDRESS {
                    let mut s = connect_from(SocketAddr::new(a, 0), port);
                    let src = s.local_addr().unwrap();
                    let (backend, intact) = whoami_and_echo(&mut s, 1 + i * 2003, k * i);
                    if !intact {
                        broken.push(src);
                    }
                    seen.push(Seen {
                        rule,
                        proto: PROTO_TCP,
                        src,
                        backend,
                    });
                    let (src, backend) = udp_ask_from(a, port, k * 100 + i);
                    seen.push(Seen {
                        rule,
                        proto: PROTO_UDP,
                        src,
                        backend,
                    });
                }
            }
        }
        (seen, broken)
    });
    assert!(broken.is_empty(), "echoes not intact from {broken:?}");

    // Exactly the engine's choice for every flow, under each rule's mode.
    for s in &seen {
        let port = match s.rule {
            "spread" => 80,
            "sticky" => 82,
            _ => 83,
        };
        let expected = model.backend(s.rule, s.proto, s.src, port);
        assert_eq!(
            s.backend,
            expected,
            "{s:?}: xlbd's choice differs from the rule's distribution; log:\n{}",
            lab.log_text()
        );
    }

    // The modes' properties, on what the clients saw.
    let backends = |rule: &str, a: IpAddr, proto: Option<u8>| -> BTreeSet<&str> {
        seen.iter()
            .filter(|s| s.rule == rule && s.src.ip() == a && proto.is_none_or(|p| s.proto == p))
            .map(|s| s.backend.as_str())
            .collect()
    };
    for &a in &addrs {
        // five_tuple: one client address, different source ports, both members.
        assert_eq!(backends("spread", a, None).len(), 2, "five_tuple from {a}");
        // source_ip: every connection and datagram of one address on one member.
        assert_eq!(backends("sticky", a, None).len(), 1, "source_ip from {a}");
        // source_ip_protocol: consistent per protocol.
        for proto in [PROTO_TCP, PROTO_UDP] {
            assert_eq!(
                backends("per-proto", a, Some(proto)).len(),
                1,
                "source_ip_protocol from {a}, protocol {proto}"
            );
        }
    }
    let sticky_members: BTreeSet<_> = seen
        .iter()
        .filter(|s| s.rule == "sticky")
        .map(|s| s.backend.as_str())
        .collect();
    assert_eq!(sticky_members.len(), 2, "source_ip still balances clients");
    assert!(
        addrs
            .iter()
            .any(|&a| backends("per-proto", a, Some(PROTO_TCP))
                != backends("per-proto", a, Some(PROTO_UDP))),
        "source_ip_protocol: the protocol is part of the choice"
    );

    // Every connection and exchange was a flow of its rule.
    let n = addrs.len() as u64;
    let ports = FIVE_TUPLE_PORTS.len() as u64;
    let per = 2 * PER_ADDRESS as u64;
    for (key, want) in [
        ("rule.lb.spread.flows_created", n * ports),
        ("rule.lb.sticky.flows_created", n * per),
        ("rule.lb.per-proto.flows_created", n * per),
    ] {
        assert_eq!(
            lab.wait_stat(key, want, Duration::from_secs(2)),
            want,
            "{key}"
        );
    }
    lab.assert_no_invalid_tcp();
}

#[test]
fn inbound_nat_rules_forward_to_their_member_bytes_intact() {
    if !need_root("inbound_nat_rules_forward_to_their_member_bytes_intact") {
        return;
    }
    let lab = Lab::start(CONFIG_NAT);
    let client = lab.client.clone();
    // (frontend port, member it must reach, connections)
    let plan: [(u16, &str, usize); 3] = [
        (2201, "backend2", 6),
        (50001, "backend1", 4),
        (50002, "backend2", 4),
    ];
    let (tcp, udp, spare) = run_in(&lab, &client, move || {
        let mut tcp = Vec::new();
        for (port, _, count) in plan {
            for i in 0..count {
                let src = SocketAddr::new(CLIENT.parse().unwrap(), 0);
                let mut s = connect_from(src, port);
                let local = s.local_addr().unwrap();
                let (name, intact) = whoami_and_echo(&mut s, 1 + i * 4001, port as usize + i);
                tcp.push((port, local, name, intact));
            }
        }
        let udp: Vec<String> = (0..4)
            .map(|i| udp_ask_from(CLIENT.parse().unwrap(), 5301, i).1)
            .collect();
        // A spare port of the range: no member behind it yet, so no answer.
        let vip = SocketAddr::new(VIP.parse().unwrap(), 50003);
        let spare = TcpStream::connect_timeout(&vip, Duration::from_secs(1)).map(|_| ());
        (tcp, udp, spare)
    });

    for (port, want, count) in plan {
        let got: Vec<_> = tcp.iter().filter(|t| t.0 == port).collect();
        assert_eq!(got.len(), count);
        for (_, local, name, intact) in got {
            assert_eq!(name, want, "VIP:{port} from {local}");
            assert!(*intact, "VIP:{port} from {local}: echo not intact");
        }
    }
    assert_eq!(
        udp,
        vec!["backend1"; 4],
        "UDP VIP:5301 goes to backend1:5353"
    );
    match spare {
        Err(e) if e.kind() == ErrorKind::TimedOut => {}
        other => panic!("VIP:50003 (spare port) answered: {other:?}"),
    }

    for (key, want) in [
        ("rule.nat.ssh-backend2.flows_created", 6),
        ("rule.nat.per-member.flows_created", 8),
        ("rule.nat.dns-backend1.flows_created", 4),
    ] {
        assert_eq!(
            lab.wait_stat(key, want, Duration::from_secs(2)),
            want,
            "{key}"
        );
    }
    assert!(lab.stat("rule.nat.per-member.no_backend") >= 1);

    // The members saw the client's own address (port forwarding translates only the
    // destination) and a clean close through the NAT of every connection.
    let mut expected: HashMap<SocketAddr, String> = tcp
        .iter()
        .map(|(_, local, name, _)| (*local, name.clone()))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(3);
    while !expected.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok((name, peer, ending)) = lab.endings.recv_timeout(left) else {
            break;
        };
        let want = expected
            .remove(&peer)
            .unwrap_or_else(|| panic!("{name} served an unknown peer {peer}"));
        assert_eq!(name, want, "{peer}");
        assert_eq!(ending, Ending::Closed, "{name}: the connection from {peer}");
    }
    assert!(
        expected.is_empty(),
        "connections whose end the members did not see: {expected:?}"
    );
    lab.assert_no_invalid_tcp();
}

#[test]
fn unknown_flow_reset_answers_a_late_send_with_an_rst() {
    if !need_root("unknown_flow_reset_answers_a_late_send_with_an_rst") {
        return;
    }
    let lab = Lab::start(CONFIG_UNKNOWN_FLOW);
    let mut s = lab.client_connect(84);
    s.set_read_timeout(Some(SLACK * 2)).unwrap();
    assert_eq!(echo(&mut s, b"hello\n"), b"hello\n");
    thread::sleep(IDLE + Duration::from_secs(1));
    assert_eq!(
        lab.wait_stat(
            "rule.lb.reset-unknown.flows_expired_idle",
            1,
            Duration::from_secs(1)
        ),
        1
    );
    assert_eq!(lab.stat("rsts_sent"), 0, "the expiry itself was silent");
    assert_eq!(lab.stat("rule.lb.reset-unknown.unknown_flow_resets"), 0);

    s.write_all(b"anyone?\n").expect("the send is only queued");
    let sent = Instant::now();
    let mut buf = [0u8; 16];
    let r = read_within(&mut s, &mut buf, SLACK * 2);
    let waited = sent.elapsed();
    match r {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!(
            "expected ECONNRESET, got {other:?} after {waited:?}; log:\n{}",
            lab.log_text()
        ),
    }
    assert!(waited <= SLACK, "the RST took {waited:?}");
    // The socket is dead for good.
    let again = s.write_all(b"x");
    assert!(
        matches!(&again, Err(e) if e.kind() == ErrorKind::BrokenPipe),
        "send after the reset: {again:?}"
    );
    assert!(
        lab.wait_stat(
            "rule.lb.reset-unknown.unknown_flow_resets",
            1,
            Duration::from_secs(2)
        ) >= 1
    );
    assert!(lab.stat("rule.lb.reset-unknown.late_packets") >= 1);
    assert_eq!(lab.stat("rule.lb.reset-unknown.no_flow"), 0, "not dropped");
    assert_eq!(lab.stat("rule.lb.reset-unknown.flows_picked_up"), 0);

    // New connections (SYN) still create flows under `reset`.
    let mut s = lab.client_connect(84);
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    assert_eq!(echo(&mut s, b"fresh\n"), b"fresh\n");
    assert_eq!(
        lab.wait_stat(
            "rule.lb.reset-unknown.flows_created",
            2,
            Duration::from_secs(2)
        ),
        2
    );
    lab.assert_no_invalid_tcp();
}

#[test]
fn unknown_flow_pickup_resumes_expired_connections_on_their_backend() {
    if !need_root("unknown_flow_pickup_resumes_expired_connections_on_their_backend") {
        return;
    }
    let lab = Lab::start(CONFIG_UNKNOWN_FLOW);
    const N: usize = 4;
    let mut conns: Vec<(TcpStream, SocketAddr, String)> = (0..N)
        .map(|i| {
            let mut s = lab.client_connect(85);
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let (name, intact) = whoami_and_echo(&mut s, 1 + i * 1001, i);
            assert!(intact, "connection {i} before the expiry");
            let local = s.local_addr().unwrap();
            (s, local, name)
        })
        .collect();
    thread::sleep(IDLE + Duration::from_secs(1));
    assert_eq!(
        lab.wait_stat(
            "rule.lb.pickup.flows_expired_idle",
            N as u64,
            Duration::from_secs(1)
        ),
        N as u64
    );
    assert_eq!(lab.stat("rsts_sent"), 0, "the expiry was silent");
    assert_eq!(lab.stat("rule.lb.pickup.flows_picked_up"), 0);

    // The next send re-creates each flow, on the member that holds the connection: another
    // member's stack would answer with an RST, and the echo would fail.
    for (i, (s, local, name)) in conns.iter_mut().enumerate() {
        let p = payload(1 + i * 7919, i + 50);
        s.write_all(&p).expect("send");
        let mut got = vec![0; p.len()];
        if let Err(e) = s.read_exact(&mut got) {
            panic!(
                "{local}: no echo after the expiry: {e}; log:\n{}",
                lab.log_text()
            );
        }
        assert!(got == p, "{local}: echo after pickup not intact");
        assert_eq!(&whoami(s), name, "{local}: the same member after pickup");
    }
    assert_eq!(
        lab.wait_stat(
            "rule.lb.pickup.flows_picked_up",
            N as u64,
            Duration::from_secs(2)
        ),
        N as u64
    );
    assert_eq!(lab.stat("rule.lb.pickup.flows_created"), 2 * N as u64);
    assert!(lab.stat("rule.lb.pickup.late_packets") >= N as u64);
    assert_eq!(lab.stat("rule.lb.pickup.no_flow"), 0);

    // A picked-up flow is tracked like any other: a normal close (FIN both ways) ends it, and
    // each member saw its one connection, from the client, end cleanly.
    let mut expected: HashMap<SocketAddr, String> = HashMap::new();
    for (mut s, local, name) in conns {
        s.shutdown(Shutdown::Write).expect("shutdown");
        expected.insert(local, name);
        // The member closes back when it reads the end of the stream.
        let mut rest = Vec::new();
        let end = s.read_to_end(&mut rest);
        assert!(
            end.is_ok() && rest.is_empty(),
            "{local}: after our FIN: {end:?}, {rest:?}"
        );
    }
    assert_eq!(
        lab.wait_stat(
            "rule.lb.pickup.flows_closed",
            N as u64,
            Duration::from_secs(2)
        ),
        N as u64,
        "log:\n{}",
        lab.log_text()
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    while !expected.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok((name, peer, ending)) = lab.endings.recv_timeout(left) else {
            break;
        };
        let want = expected
            .remove(&peer)
            .unwrap_or_else(|| panic!("{name} served an unknown peer {peer}"));
        assert_eq!(name, want, "{peer}");
        assert_eq!(ending, Ending::Closed, "{name}: the connection from {peer}");
    }
    assert!(
        expected.is_empty(),
        "connections whose end the members did not see: {expected:?}"
    );
    lab.assert_no_invalid_tcp();
}
