//! End-to-end tests of the XDP program, the AF_XDP worker and the bare forwarder across
//! real network namespaces and real Linux TCP/UDP sockets. They need root (CI is root)
//! and skip with a message otherwise.

// The three-namespace lab shared with the AF_XDP crate's own tests.
#[path = "../../dataplane/afxdp/tests/common/mod.rs"]
mod common;

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    time::Duration,
};

use common::*;
use etherparse::PacketBuilder;
use xlb_afxdp::{
    netlink::{self, NeighState, Netlink},
    spawn, FrameHandler, ModeRequest, PollMode, PortId, UmemSharing, Verdict, Worker, WorkerConfig,
    XdpProgram,
};
use xlb_bench::bare::{BareForwarder, BarePort, KernelTables};

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// The `xlb-afxdp-fwd` binary, 1 worker in wakeup mode on both queues of the `fwd`
/// veths, shared UMEM: UDP and TCP over IPv4 and IPv6 from `client` to `server` and back.
#[test]
fn bare_forwarder_binary_carries_udp_and_tcp() {
    if !need_root("bare_forwarder_binary_carries_udp_and_tcp") {
        return;
    }
    let lab = Lab::new();
    let (u4_ready, u4) = udp_echo_server(
        &lab.server,
        sa("198.18.2.2:7000"),
        1,
        Duration::from_secs(20),
    );
    let (u6_ready, u6) = udp_echo_server(
        &lab.server,
        sa("[2001:db8:2::2]:7000"),
        1,
        Duration::from_secs(20),
    );
    let (t4_ready, t4) =
        tcp_echo_server(&lab.server, sa("198.18.2.2:7001"), Duration::from_secs(20));
    let (t6_ready, t6) = tcp_echo_server(
        &lab.server,
        sa("[2001:db8:2::2]:7001"),
        Duration::from_secs(20),
    );
    for r in [&u4_ready, &u6_ready, &t4_ready, &t6_ready] {
        r.recv_timeout(Duration::from_secs(5))
            .expect("server ready");
    }

    let mut fwd = ChildGuard::spawn(Command::new(env!("CARGO_BIN_EXE_xlb-afxdp-fwd")).args([
        "--netns",
        &lab.fwd,
        "--if0",
        &lab.f0,
        "--if1",
        &lab.f1,
        "--queues",
        "0,1",
        "--workers",
        "1",
        "--poll",
        "wakeup",
        "--duration",
        "60",
    ]));
    let ready = fwd
        .wait_for("xlb-afxdp-fwd ready", Duration::from_secs(15))
        .unwrap_or_else(|| panic!("forwarder never got ready: {:#?}", fwd.output));
    assert!(
        ready.contains("zero_copy=false"),
        "veth has no zero-copy: {ready}"
    );
    assert!(lab.has_xdp(&lab.fwd, &lab.f0) && lab.has_xdp(&lab.fwd, &lab.f1));

    let echo = udp_round_trip(&lab.client, sa("198.18.2.2:7000"), b"hello over ipv4");
    assert_eq!(echo.as_deref(), Some(&b"hello over ipv4"[..]));
    let echo = udp_round_trip(&lab.client, sa("[2001:db8:2::2]:7000"), b"hello over ipv6");
    assert_eq!(echo.as_deref(), Some(&b"hello over ipv6"[..]));
    tcp_round_trip(&lab.client, sa("198.18.2.2:7001"), 256 * 1024).expect("tcp over ipv4");
    tcp_round_trip(&lab.client, sa("[2001:db8:2::2]:7001"), 256 * 1024).expect("tcp over ipv6");

    assert!(
        fwd.terminate(Duration::from_secs(10)),
        "clean exit: {:#?}",
        fwd.output
    );
    let out = fwd.output.join("\n");
    let line = |prefix: &str| {
        fwd.output
            .iter()
            .find(|l| l.starts_with(prefix))
            .cloned()
            .unwrap_or_else(|| panic!("no {prefix:?} line in:\n{out}"))
    };
    let p0 = line("port=0 ");
    let p1 = line("port=1 ");
    let w = line("worker=0 forwarded");
    let x = line("xdp ");
    // 256 KiB each way twice plus handshakes: far more than 300 frames per direction.
    for p in [&p0, &p1] {
        assert!(field(p, "rx").unwrap() > 300, "{p}");
        assert!(field(p, "tx").unwrap() > 300, "{p}");
        assert_eq!(field(p, "bad_verdict"), Some(0), "{p}");
    }
    assert!(field(&w, "checksums_filled").unwrap() > 600, "{w}");
    assert_eq!(
        field(&w, "not_ip"),
        Some(0),
        "ARP/ND must stay with the kernel: {w}"
    );
    assert!(field(&x, "redirected").unwrap() > 600, "{x}");
    assert_eq!(
        field(&x, "no_xsk"),
        Some(0),
        "both queues have sockets: {x}"
    );
    // The link goes away with the process: nothing left on the interfaces.
    assert!(!lab.has_xdp(&lab.fwd, &lab.f0) && !lab.has_xdp(&lab.fwd, &lab.f1));

    assert_eq!(u4.join().unwrap().len(), 1);
    assert_eq!(u6.join().unwrap().len(), 1);
    assert_eq!(t4.join().unwrap(), 256 * 1024);
    assert_eq!(t6.join().unwrap(), 256 * 1024);
    println!("{out}");
}

/// Wraps the bare forwarder, emits one frame from its first `expire`, asks for two
/// look-ahead passes, counting that every frame went through both before `handle`, and
/// grows IPv4 UDP datagrams to port 7003 by 4 bytes ("GROW") into the frame's free room.
struct EmitOnce {
    inner: BareForwarder,
    frame: Option<(PortId, Vec<u8>)>,
    looked_ahead: [u64; 2],
    handled: u64,
    not_looked_ahead: u64,
}

/// Appends "GROW" to an IPv4 UDP datagram to port 7003 in `buf[..len]` (lengths and IP
/// checksum fixed, UDP checksum left out), if there is room; returns the frame's length.
fn grow_udp_7003(buf: &mut [u8], len: usize) -> usize {
    let be16 = |b: &[u8], at: usize| u16::from_be_bytes([b[at], b[at + 1]]);
    let is_it = len >= 42
        && be16(buf, 12) == 0x0800
        && buf[14] == 0x45
        && buf[23] == 17
        && be16(buf, 36) == 7003
        && 14 + usize::from(be16(buf, 16)) == len
        && buf.len() >= len + 4;
    if !is_it {
        return len;
    }
    buf[len..len + 4].copy_from_slice(b"GROW");
    let total = be16(buf, 16) + 4;
    buf[16..18].copy_from_slice(&total.to_be_bytes());
    let udp_len = be16(buf, 38) + 4;
    buf[38..40].copy_from_slice(&udp_len.to_be_bytes());
    buf[40..42].copy_from_slice(&[0, 0]);
    buf[24..26].copy_from_slice(&[0, 0]);
    let sum: u32 = (14..34).step_by(2).map(|i| u32::from(be16(buf, i))).sum();
    let folded = (sum & 0xffff) + (sum >> 16);
    let csum = !(((folded & 0xffff) + (folded >> 16)) as u16);
    buf[24..26].copy_from_slice(&csum.to_be_bytes());
    len + 4
}

impl FrameHandler for EmitOnce {
    fn handle_in(&mut self, now_ns: u64, ingress: PortId, buf: &mut [u8], len: usize) -> Verdict {
        let len = grow_udp_7003(buf, len);
        self.handle(now_ns, ingress, &mut buf[..len])
    }

    fn handle(&mut self, now_ns: u64, ingress: PortId, frame: &mut [u8]) -> Verdict {
        if self.looked_ahead[0].min(self.looked_ahead[1]) <= self.handled {
            self.not_looked_ahead += 1;
        }
        self.handled += 1;
        self.inner.handle(now_ns, ingress, frame)
    }

    fn prefetch_stages(&self) -> u8 {
        2
    }

    fn prefetch(&mut self, stage: u8, _at: usize, _ingress: PortId, frame: &[u8]) {
        if !frame.is_empty() {
            self.looked_ahead[usize::from(stage)] += 1;
        }
    }

    fn next_deadline(&self) -> Option<u64> {
        self.frame.as_ref().map(|_| 0)
    }

    fn expire(&mut self, _now: u64, budget: usize, emit: &mut dyn FnMut(PortId, &[u8])) -> usize {
        if let Some((port, f)) = self.frame.take() {
            emit(port, &f);
        }
        budget.min(1)
    }
}

/// The library API in-process: one UMEM per socket (frames copied between UMEMs),
/// a frame emitted from `expire`, traffic to the host's own address left to the kernel,
/// and the program detached when `XdpProgram` drops.
#[test]
fn worker_api_copies_between_umems_and_emits_from_timers() {
    if !need_root("worker_api_copies_between_umems_and_emits_from_timers") {
        return;
    }
    let lab = Lab::new();
    let (u_ready, u) = udp_echo_server(
        &lab.server,
        sa("198.18.2.2:7000"),
        1,
        Duration::from_secs(20),
    );
    let (e_ready, emitted) = udp_echo_server(
        &lab.server,
        sa("198.18.2.2:7002"),
        1,
        Duration::from_secs(20),
    );
    let (t_ready, t) = tcp_echo_server(&lab.server, sa("198.18.2.2:7001"), Duration::from_secs(20));
    let (g_ready, grown) = udp_echo_server(
        &lab.server,
        sa("198.18.2.2:7003"),
        1,
        Duration::from_secs(20),
    );
    for r in [&u_ready, &e_ready, &t_ready, &g_ready] {
        r.recv_timeout(Duration::from_secs(5))
            .expect("server ready");
    }
    // A service of the appliance itself, on a backend-side interface: must reach the
    // kernel, not the dataplane.
    let local = in_netns(&lab.fwd, || {
        let l = TcpListener::bind("198.18.1.1:7100").unwrap();
        l.set_nonblocking(true).unwrap();
        l
    })
    .join()
    .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::channel();
    let (f0, f1, server_mac) = (lab.f0.clone(), lab.f1.clone(), parse_mac(&lab.server_mac));
    let stop2 = Arc::clone(&stop);
    let fwd = in_netns(&lab.fwd, move || {
        let mut nl = Netlink::open().unwrap();
        let l0 = nl.link_by_name(&f0).unwrap();
        let l1 = nl.link_by_name(&f1).unwrap();
        let mut xdp = XdpProgram::load().unwrap();
        assert!(xdp.add_local_addrs_from_kernel().unwrap() >= 4);
        for l in [&l0, &l1] {
            let mode = xdp.attach(l.ifindex, ModeRequest::Auto, true).unwrap();
            assert_eq!(
                mode,
                xlb_afxdp::AttachMode::Native,
                "veth supports native XDP"
            );
        }
        let cfg = WorkerConfig {
            interfaces: vec![f0.clone(), f1.clone()],
            queues: vec![0, 1],
            poll: PollMode::Wakeup {
                timeout: Duration::from_millis(5),
            },
            sharing: UmemSharing::PerSocket,
            ring_size: 256,
            ..WorkerConfig::default()
        };
        let worker = Worker::open(&cfg, &xdp).unwrap();
        let socks = worker.sockets();
        assert_eq!(socks.len(), 4);
        let mut umems: Vec<_> = socks.iter().map(|s| s.umem).collect();
        umems.sort_unstable();
        umems.dedup();
        assert_eq!(umems.len(), 4, "one UMEM per socket: {socks:?}");
        assert!(socks.iter().all(|s| !s.zero_copy));

        let mut frame = Vec::new();
        PacketBuilder::ethernet2(l1.mac.unwrap(), server_mac)
            .ipv4([198, 18, 1, 2], [198, 18, 2, 2], 64)
            .udp(40002, 7002)
            .write(&mut frame, b"emitted-by-timer")
            .unwrap();
        let ports = [
            BarePort {
                ifindex: l0.ifindex,
                mac: l0.mac.unwrap(),
            },
            BarePort {
                ifindex: l1.ifindex,
                mac: l1.mac.unwrap(),
            },
        ];
        let tables = KernelTables::read(&mut nl).unwrap();
        let handler = EmitOnce {
            inner: BareForwarder::new(ports, tables, None, 1),
            frame: Some((1, frame)),
            looked_ahead: [0; 2],
            handled: 0,
            not_looked_ahead: 0,
        };
        let stats = worker.stats();
        let h = spawn(0, worker, handler, stop2, None).unwrap();
        ready_tx.send(stats).unwrap();
        let exit = h.join().unwrap();
        exit.result.as_ref().unwrap();
        let counters = xdp.counters().unwrap();
        drop(xdp);
        let h = &exit.handler;
        let look = (h.looked_ahead, h.handled, h.not_looked_ahead);
        (
            exit.worker.stats().ports(),
            exit.handler.inner.stats(),
            counters,
            look,
        )
    });
    let live = ready_rx
        .recv_timeout(Duration::from_secs(15))
        .expect("worker started");

    let echo = udp_round_trip(&lab.client, sa("198.18.2.2:7000"), b"copied between umems");
    assert_eq!(echo.as_deref(), Some(&b"copied between umems"[..]));
    tcp_round_trip(&lab.client, sa("198.18.2.2:7001"), 128 * 1024).expect("tcp");
    // A handler may grow a frame into the UMEM frame's room (copied between UMEMs here).
    let echo = udp_round_trip(&lab.client, sa("198.18.2.2:7003"), b"grown");
    assert_eq!(echo.as_deref(), Some(&b"grownGROW"[..]));
    let to_local = in_netns(&lab.client, || {
        TcpStream::connect_timeout(&sa("198.18.1.1:7100"), Duration::from_secs(3)).is_ok()
    })
    .join()
    .unwrap();
    assert!(
        to_local,
        "traffic to the appliance's own address reaches its kernel"
    );
    drop(local);
    assert!(
        live.ports()[0].rx_packets > 0,
        "stats are live while running"
    );

    stop.store(true, Ordering::Relaxed);
    let (ports, bare, xdp, look) = fwd.join().expect("forwarder thread");
    let (looked_ahead, handled, not_looked_ahead) = look;
    assert!(handled > 100, "{look:?}");
    assert_eq!(
        looked_ahead, [handled; 2],
        "both look-ahead passes saw every frame"
    );
    assert_eq!(not_looked_ahead, 0, "look-ahead runs before handle");
    assert_eq!(ports[1].emitted, 1, "{ports:?}");
    assert_eq!(emitted.join().unwrap(), vec![b"emitted-by-timer".to_vec()]);
    assert!(
        ports[0].rx_packets > 50 && ports[1].rx_packets > 50,
        "{ports:?}"
    );
    assert_eq!(ports[0].no_frame + ports[1].no_frame, 0, "{ports:?}");
    assert!(bare.forwarded > 100, "{bare:?}");
    assert!(xdp.redirected >= bare.forwarded, "{xdp:?} {bare:?}");
    assert!(
        xdp.passed > 0,
        "ARP and the local TCP connection were passed: {xdp:?}"
    );
    assert!(!lab.has_xdp(&lab.fwd, &lab.f0) && !lab.has_xdp(&lab.fwd, &lab.f1));
    assert_eq!(u.join().unwrap().len(), 1);
    assert_eq!(t.join().unwrap(), 128 * 1024);
    assert_eq!(grown.join().unwrap(), vec![b"grownGROW".to_vec()]);
}

/// Links, addresses, neighbours and routes read over netlink inside a namespace.
#[test]
fn netlink_reads_the_namespace_tables() {
    if !need_root("netlink_reads_the_namespace_tables") {
        return;
    }
    let lab = Lab::new();
    let status = Command::new("ip")
        .args([
            "-n",
            &lab.fwd,
            "route",
            "add",
            "198.19.0.0/16",
            "via",
            SERVER4,
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let (f0, f1) = (lab.f0.clone(), lab.f1.clone());
    let (cmac, smac) = (parse_mac(&lab.client_mac), parse_mac(&lab.server_mac));
    let f0mac = parse_mac(&mac_of(&lab.fwd, &lab.f0));
    in_netns(&lab.fwd, move || {
        let mut nl = Netlink::open().unwrap();
        let links = nl.links().unwrap();
        let l0 = links
            .iter()
            .find(|l| l.name == f0)
            .expect("f0 listed")
            .clone();
        let l1 = nl.link_by_name(&f1).unwrap();
        assert_eq!(l0.mac, Some(f0mac));
        assert_eq!(l0.mtu, 1500);
        assert_eq!(nl.link_by_index(l1.ifindex).unwrap().name, f1);
        assert!(links.iter().any(|l| l.name == "lo"));
        // only this namespace's interfaces
        assert_eq!(links.len(), 3, "{links:?}");

        let addrs = nl.addresses().unwrap();
        let has = |ip: &str, len: u8, ifindex: u32| {
            addrs.iter().any(|a| {
                a.addr == ip.parse::<std::net::IpAddr>().unwrap()
                    && a.prefix_len == len
                    && a.ifindex == ifindex
            })
        };
        assert!(has(FWD4_C, 24, l0.ifindex), "{addrs:?}");
        assert!(has(FWD6_S, 64, l1.ifindex), "{addrs:?}");

        let neigh = nl.neighbours().unwrap();
        let find = |ip: &str| {
            neigh
                .iter()
                .find(|n| n.ip == ip.parse::<std::net::IpAddr>().unwrap())
                .cloned()
                .unwrap_or_else(|| panic!("{ip} not in {neigh:?}"))
        };
        let c = find(CLIENT4);
        assert_eq!((c.ifindex, c.mac), (l0.ifindex, Some(cmac)));
        assert_eq!(c.state, NeighState(NeighState::PERMANENT));
        let s = find(SERVER6);
        assert_eq!((s.ifindex, s.mac), (l1.ifindex, Some(smac)));

        let routes = nl.routes().unwrap();
        let r = netlink::lookup_route(&routes, "198.18.2.77".parse().unwrap()).unwrap();
        assert_eq!(r.nexthops[0].ifindex, Some(l1.ifindex));
        assert_eq!(r.nexthops[0].gateway, None);
        let r = netlink::lookup_route(&routes, "198.19.4.4".parse().unwrap()).unwrap();
        assert_eq!(r.prefix_len, 16);
        assert_eq!(r.nexthops[0].gateway, Some(SERVER4.parse().unwrap()));
        let r = netlink::lookup_route(&routes, "2001:db8:1::99".parse().unwrap()).unwrap();
        assert_eq!(r.nexthops[0].ifindex, Some(l0.ifindex));
        // local routes live in the local table and are not forwarding routes
        assert!(routes.iter().any(|r| r.kind == netlink::RTN_LOCAL));

        let tables = KernelTables::read(&mut nl).unwrap();
        assert_eq!(
            tables.resolve(l1.ifindex, "198.19.4.4".parse().unwrap()),
            Some(smac)
        );
        assert_eq!(
            tables.resolve(l0.ifindex, CLIENT6.parse().unwrap()),
            Some(cmac)
        );
        assert_eq!(
            tables.resolve(l0.ifindex, "198.18.1.99".parse().unwrap()),
            None
        );
    })
    .join()
    .expect("netlink checks");
}

/// `xlb-xdp-fwd`, the kernel XDP_REDIRECT forwarder, between the `fwd` veths: generated
/// UDP from the client to the reflector on the server and every answer back, MACs rewritten
/// on both sides, frames unchanged otherwise (both sinks check addresses, ports and
/// checksums); detached when it stops.
#[test]
fn kernel_forwarder_carries_both_directions() {
    if !need_root("kernel_forwarder_carries_both_directions") {
        return;
    }
    let lab = Lab::new();
    let f0_mac = mac_of(&lab.fwd, &lab.f0);
    let mut fwd = ChildGuard::spawn(Command::new(env!("CARGO_BIN_EXE_xlb-xdp-fwd")).args([
        "--netns",
        &lab.fwd,
        "--if0",
        &lab.f0,
        "--if1",
        &lab.f1,
        "--mac0",
        &lab.client_mac,
        "--mac1",
        &lab.server_mac,
        "--duration",
        "60",
    ]));
    fwd.wait_for("xlb-xdp-fwd ready", Duration::from_secs(15))
        .unwrap_or_else(|| panic!("forwarder never got ready: {:#?}", fwd.output));
    assert!(lab.has_xdp(&lab.fwd, &lab.f0) && lab.has_xdp(&lab.fwd, &lab.f1));
    let n = 20_000u64;
    let sink = |ns: &str, dev: &str, check: &str, reflect: bool| {
        let mut args: Vec<String> = [
            "--netns",
            ns,
            "--dev",
            dev,
            "--sample",
            "16",
            "--expect",
            &n.to_string(),
            "--idle-ms",
            "1500",
            "--duration",
            "20",
            check,
            &format!("{SERVER4}:8000,8001"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if reflect {
            args.push("--reflect".into());
        }
        let mut c = ChildGuard::spawn(Command::new(env!("CARGO_BIN_EXE_xlb-sink")).args(&args));
        c.wait_for("xlb-sink ready", Duration::from_secs(10))
            .unwrap_or_else(|| panic!("sink never got ready: {:#?}", c.output));
        c
    };
    let mut back = sink(&lab.server, &lab.s0, "--check-dst", true);
    let mut front = sink(&lab.client, &lab.c0, "--check-src", false);
    let out = Command::new(env!("CARGO_BIN_EXE_xlb-gen"))
        .args([
            "--netns",
            &lab.client,
            "--dev",
            &lab.c0,
            "--src",
            CLIENT4,
            "--dst",
            SERVER4,
            "--dst-mac",
            &f0_mac,
            "--dport",
            "8000",
            "--flows",
            "100",
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
    let took = field(&gen, "egress_xmit").unwrap();
    assert!(took >= n * 99 / 100, "{gen}");
    let b = back
        .wait_for("xlb-sink done", Duration::from_secs(25))
        .expect("reflector done");
    let f = front
        .wait_for("xlb-sink done", Duration::from_secs(25))
        .expect("client-side sink done");
    for (line, side) in [(&b, "server side"), (&f, "client side")] {
        assert_eq!(field(line, "bad"), Some(0), "{side}: {line}");
        assert_eq!(field(line, "good"), Some(took), "{side}: {line}");
    }
    assert!(
        fwd.terminate(Duration::from_secs(10)),
        "clean exit: {:#?}",
        fwd.output
    );
    let done = fwd
        .output
        .iter()
        .find(|l| l.starts_with("xlb-xdp-fwd done"))
        .cloned()
        .expect("done line");
    assert!(field(&done, "redirected").unwrap() >= 2 * took, "{done}");
    assert!(!lab.has_xdp(&lab.fwd, &lab.f0) && !lab.has_xdp(&lab.fwd, &lab.f1));
}
