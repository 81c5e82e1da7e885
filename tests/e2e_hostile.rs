//! End to end, as an attacker: spoofed segments into a live connection through a reset-on-idle
//! rule, and SYN and UDP floods from spoofed sources that fill the flow table, against real
//! Linux TCP stacks in the namespace lab (`common`).
//!
//! - Out-of-window RST, FIN and far-ahead data (`seq = next + 2^31 − 1`), sent from the client
//!   side and from the backend side with the real ends' addresses and ports, change nothing:
//!   the connection keeps working, and left idle it is still reset on idle with both ends
//!   seeing ECONNRESET (the idle RSTs carry the numbers the ends expect). Each is counted
//!   `out_of_window`. An RST inside the window but not exact is forwarded and changes nothing
//!   either (the receiving end answers with a challenge ACK).
//! - A SYN flood (xlb-gen's BPF generator, spoofed sources) fills the flow table of a worker
//!   while an established connection on the flooded rule and one on another rule keep
//!   exchanging data, every exchange answered, and new connections to the other rule are
//!   admitted. A UDP flood likewise, at a rule whose service ignores what the flood sends.
//!
//! The floods run at a fixed rate for a few seconds against a small flow table
//! (`--flow-capacity`), with the per-rule and per-class shares at 100 % so that the flood alone
//! can fill the table: the admission path under test is then "table full, evict the oldest
//! unconfirmed flow". Each test prints its figures (the source of docs/reliability.md's).
//! Run as root; otherwise each test says it is skipped.

mod common;

use std::{
    io::Write,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc,
    },
    thread,
    time::{Duration, Instant},
};

use common::*;
use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
use xlb_afxdp::netlink::Netlink;
use xlb_bench::gen::{Flows, FrameSpec, GenConfig, Generator, Mode};

/// The lab's idle timeout of the reset-on-idle rule (4 minutes at time scale 60).
const IDLE: Duration = Duration::from_secs(4);
const SLACK: Duration = Duration::from_millis(1500);
/// Far ahead: the largest distance that still reads as "after" in sequence space.
const FAR: u32 = (1 << 31) - 1;

// ---------------------------------------------------------------------------------------------
// Spoofed segments into a live connection.

/// Captures the frames of one interface (from the namespace it was opened in) to learn the
/// sequence numbers a live connection has reached: what an attacker must guess.
struct Sniffer {
    fd: OwnedFd,
}

impl Sniffer {
    fn open(ns: &str, dev: &str) -> Sniffer {
        let dev = dev.to_string();
        in_ns(ns, move || {
            let proto = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: socket(2) with constant arguments; the result is checked before use.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: `fd` is a socket this thread just opened and nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let name = std::ffi::CString::new(dev.clone()).unwrap();
            // SAFETY: `name` is a valid NUL-terminated string for the call's duration.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert!(ifindex > 0, "no interface {dev}");
            // SAFETY: sockaddr_ll is plain old data; all zeroes is a valid value.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = ifindex as i32;
            // SAFETY: `sll` is a properly initialised sockaddr_ll and its size is passed.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
            Sniffer { fd }
        })
    }

    /// Reads what was captured until the interface has been quiet for 200 ms; returns the
    /// next sequence number of each direction of the TCP connection `client` ↔ `server`
    /// (client's, server's), as the last segments seen in each direction end.
    fn next_seqs(&self, client: SocketAddr, server: SocketAddr) -> (u32, u32) {
        let mut buf = vec![0u8; 65_536];
        let (mut c_next, mut s_next) = (None, None);
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, its count passed.
            if unsafe { libc::poll(&mut pfd, 1, 200) } <= 0 {
                break;
            }
            // SAFETY: `buf` is writable for its whole length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                continue;
            }
            let Ok(p) = SlicedPacket::from_ethernet(&buf[..n as usize]) else {
                continue;
            };
            let (Some(ip), Some(TransportSlice::Tcp(t))) = (&p.net, &p.transport) else {
                continue;
            };
            let (src, dst) = match ip {
                etherparse::NetSlice::Ipv4(v4) => (
                    IpAddr::from(v4.header().source_addr()),
                    IpAddr::from(v4.header().destination_addr()),
                ),
                _ => continue,
            };
            let from = SocketAddr::new(src, t.source_port());
            let to = SocketAddr::new(dst, t.destination_port());
            let seg_end = t
                .sequence_number()
                .wrapping_add(t.payload().len() as u32)
                .wrapping_add(u32::from(t.syn()) + u32::from(t.fin()));
            if (from, to) == (client, server) {
                c_next = Some(seg_end);
            } else if (from, to) == (server, client) {
                s_next = Some(seg_end);
            }
        }
        (
            c_next.expect("a segment from the client captured"),
            s_next.expect("a segment from the server captured"),
        )
    }
}

#[derive(Debug, Clone, Copy)]
enum Spoof {
    Rst,
    Fin,
    Data,
}

/// An IPv4 TCP segment `from` → `to` with `seq` (ACK of `ack` except on a bare RST), sent from
/// namespace `ns` through a raw socket: the kernel routes it as its own, header and all as
/// written here (full checksums).
fn inject(ns: &str, from: SocketAddr, to: SocketAddr, kind: Spoof, seq: u32, ack: u32) {
    let (IpAddr::V4(src), IpAddr::V4(dst)) = (from.ip(), to.ip()) else {
        panic!("IPv4 only");
    };
    let b = PacketBuilder::ipv4(src.octets(), dst.octets(), 64).tcp(
        from.port(),
        to.port(),
        seq,
        64_000,
    );
    let mut pkt = Vec::new();
    match kind {
        Spoof::Rst => b.rst().write(&mut pkt, &[]),
        Spoof::Fin => b.fin().ack(ack).write(&mut pkt, &[]),
        Spoof::Data => b.ack(ack).psh().write(&mut pkt, b"spoofed data\n"),
    }
    .unwrap();
    in_ns(ns, move || {
        let s = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(libc::IPPROTO_RAW)),
        )
        .expect("raw socket");
        s.send_to(&pkt, &SocketAddr::new(to.ip(), 0).into())
            .expect("send the spoofed segment");
    });
}

/// Spoofed RST, FIN and data outside the window, from the client side and from the backend
/// side, into a connection through the reset-on-idle rule: each is dropped and counted
/// `out_of_window`, the connection keeps working, an inexact RST in the window is passed on
/// and changes nothing, and left idle the connection is still reset on idle, both ends
/// seeing ECONNRESET.
#[test]
fn spoofed_segments_outside_the_window_leave_a_live_connection_as_it_was() {
    if !need_root("spoofed_segments_outside_the_window_leave_a_live_connection_as_it_was") {
        return;
    }
    let lab = Lab::start(CONFIG);
    let sniffer = Sniffer::open(&lab.client, &format!("{}c", lab.prefix));
    let mut s = lab.client_connect(80);
    let backend = match whoami(&mut s).as_str() {
        "backend1" => (lab.backend1.clone(), BACKEND1),
        "backend2" => (lab.backend2.clone(), BACKEND2),
        other => panic!("whoami: {other:?}"),
    };
    assert_eq!(echo(&mut s, b"before\n"), b"before\n");
    let client = s.local_addr().unwrap();
    let vip = s.peer_addr().unwrap();
    // The backend sees the client's own address and port (DNAT), from its port 8080.
    let server = SocketAddr::new(backend.1.parse().unwrap(), 8080);
    let (c_next, s_next) = sniffer.next_seqs(client, vip);

    // Client side: as the client, to VIP:80. Backend side: as the backend, to the client.
    for kind in [Spoof::Rst, Spoof::Fin, Spoof::Data] {
        inject(
            &lab.client,
            client,
            vip,
            kind,
            c_next.wrapping_add(FAR),
            s_next,
        );
        inject(
            &backend.0,
            server,
            client,
            kind,
            s_next.wrapping_add(FAR),
            c_next,
        );
    }
    let dropped = lab.wait_stat("drop.out_of_window", 6, Duration::from_secs(3));
    assert_eq!(dropped, 6, "six spoofed segments; log:\n{}", lab.log_text());
    assert_eq!(lab.stat("rule.lb.web.out_of_window"), 6);
    assert_eq!(
        echo(&mut s, b"after\n"),
        b"after\n",
        "the connection works on"
    );

    // An RST in the window but not exact: passed on to the end, which answers with a
    // challenge ACK and goes on (RFC 5961); xlb keeps the flow as it was.
    let (c_next, s_next) = sniffer.next_seqs(client, vip);
    inject(
        &lab.client,
        client,
        vip,
        Spoof::Rst,
        c_next.wrapping_add(1000),
        0,
    );
    inject(
        &backend.0,
        server,
        client,
        Spoof::Rst,
        s_next.wrapping_add(1000),
        0,
    );
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        echo(&mut s, b"inexact\n"),
        b"inexact\n",
        "after inexact RSTs"
    );
    assert_eq!(lab.stat("drop.out_of_window"), 6);
    assert_eq!(lab.stat("rule.lb.web.flows_reset_on_idle"), 0);

    // Left idle, reset on idle as if nothing had happened.
    let idle_from = Instant::now();
    let waited = client_reset_on_idle(&lab, &mut s, idle_from, IDLE, SLACK);
    let (_, peer) = backend_reset(&lab);
    assert_eq!(peer, client);
    assert_eq!(lab.wait_stat("rsts_sent", 2, Duration::from_secs(2)), 2);
    assert_eq!(lab.stat("rule.lb.web.flows_reset_on_idle"), 1);
    eprintln!(
        "figures: spoofed out-of-window segments dropped={} (rule web {}), inexact RSTs passed \
         on=2, connection kept, reset on idle after {waited:?}",
        lab.stat("drop.out_of_window"),
        lab.stat("rule.lb.web.out_of_window"),
    );
}

// ---------------------------------------------------------------------------------------------
// Floods.

/// The flood lab's configuration: the flooded rules and the others, on separate backend ports
/// so that the backends' own listeners are not what a flood measures.
const FLOOD_CONFIG: &str = lab_config!(
    r#"
[[load_balancing_rules]]
name = "web"
frontend = "vip"
protocol = "TCP"
frontend_port = 80
backend_pool = "web"
backend_port = 8080
idle_timeout_minutes = 30
tcp_reset = true

[[load_balancing_rules]]
name = "other"
frontend = "vip"
protocol = "TCP"
frontend_port = 81
backend_pool = "web"
backend_port = 8081
idle_timeout_minutes = 30

[[load_balancing_rules]]
name = "dns"
frontend = "vip"
protocol = "UDP"
frontend_port = 53
backend_pool = "web"
backend_port = 5353
idle_timeout_minutes = 30

[[load_balancing_rules]]
name = "quiet"
frontend = "vip"
protocol = "UDP"
frontend_port = 54
backend_pool = "web"
backend_port = 5454
idle_timeout_minutes = 30
"#
);

/// Flows per worker in the flood tests: the table fills in well under a second.
const CAPACITY: u64 = 4096;
/// Spoofed packets per second (`XLB_FLOOD_RATE` overrides it, to measure), and for how long.
const FLOOD_RATE: u64 = 10_000;
const FLOOD_FOR: Duration = Duration::from_secs(5);

fn flood_rate() -> u64 {
    std::env::var("XLB_FLOOD_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|r| (1_000..=1_000_000).contains(r))
        .unwrap_or(FLOOD_RATE)
}

/// Stops the flood lab's own servers when dropped (also when a test panics).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A UDP service on `port` of every backend that answers only queries (`q:` first) and
/// ignores anything else, as a DNS server ignores garbage: a flood of junk gets no reply.
fn start_picky_udp(lab: &Lab, port: u16, stop: &Arc<AtomicBool>) {
    for ns in [&lab.backend1, &lab.backend2] {
        let stop = Arc::clone(stop);
        let (ready_tx, ready_rx) = mpsc::channel();
        spawn_in_ns(ns, move || {
            let s = UdpSocket::bind(("0.0.0.0", port)).expect("bind the picky UDP service");
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            let _ = ready_tx.send(());
            let end = Instant::now() + Duration::from_secs(120);
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                if let Ok((n, peer)) = s.recv_from(&mut buf) {
                    if buf[..n].starts_with(b"q:") {
                        let _ = s.send_to(&buf[..n], peer);
                    }
                }
            }
        });
        ready_rx.recv().expect("picky UDP service started");
    }
}

/// What a flood sent.
#[derive(Debug, Clone, Copy)]
struct Flood {
    sent: u64,
    secs: f64,
}

/// Sends `rate` spoofed frames per second of `mode` (SYN or UDP) for `dur` from namespace
/// `ns` out of `dev` to `VIP:dport`, each from a new (address, port) from 198.18.4.0 on
/// (1000 ports per address), with xlb-gen's BPF generator: live frames in bursts of at most
/// 64, paced from here every 5 ms. Bounded by `dur` and by `rate × dur` frames.
fn flood(
    ns: &str,
    dev: &str,
    dst_mac: [u8; 6],
    mode: Mode,
    dport: u16,
    rate: u64,
    dur: Duration,
) -> thread::JoinHandle<Flood> {
    let (ns_name, dev) = (ns.to_string(), dev.to_string());
    let count = rate * dur.as_secs();
    spawn_in_ns(ns, move || {
        let mut nl = Netlink::open().expect("netlink");
        let link = nl.link_by_name(&dev).expect("the client's interface");
        let spec = FrameSpec {
            mode,
            src_mac: link.mac.expect("a MAC"),
            dst_mac,
            src: Ipv4Addr::new(198, 18, 4, 0).into(),
            dst: VIP.parse().unwrap(),
            sport: 1024,
            dport,
            size: 64,
        };
        let flows = Flows::with_span(count as u32, 1024, 1000).unwrap();
        let frame = spec.build().expect("template frame");
        let cfg = GenConfig::for_spec(&spec, flows);
        let mut gen = Generator::load(&cfg, &frame, None).expect("load the generator");
        gen.set_egress(link.ifindex).expect("egress");
        // A down veth holding the program in the XDP dispatcher: each run then costs
        // microseconds instead of two RCU grace periods. It goes with the namespace.
        let holder = format!("{dev}h");
        ip(&[
            "-n",
            &ns_name,
            "link",
            "add",
            &holder,
            "type",
            "veth",
            "peer",
            "name",
            &format!("{dev}p"),
        ]);
        let hold = nl.link_by_name(&holder).expect("holder").ifindex;
        gen.hold_dispatcher(hold).expect("hold the dispatcher");
        let base = gen.counters().unwrap().frames;
        let start = Instant::now();
        let mut sent = 0u64;
        while sent < count && start.elapsed() < dur {
            let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
            let n = due.min(count).saturating_sub(sent).min(64) as u32;
            if n > 0 {
                gen.run_live(&frame, n, n)
                    .expect("BPF_PROG_RUN live frames");
                sent = gen.counters().unwrap().frames - base;
            } else {
                thread::sleep(Duration::from_millis(5));
            }
        }
        Flood {
            sent,
            secs: start.elapsed().as_secs_f64(),
        }
    })
}

/// The appliance's MAC on the client side: where the flood's frames go.
fn appliance_mac(lab: &Lab) -> [u8; 6] {
    let dev = format!("{}ac", lab.prefix);
    in_ns(&lab.xlb, move || {
        Netlink::open()
            .unwrap()
            .link_by_name(&dev)
            .unwrap()
            .mac
            .unwrap()
    })
}

/// Keeps exchanging on established "conversations" (each call one exchange, true when
/// answered in full) every 50 ms while `running`: (exchanges, answered).
fn keep_exchanging(
    mut conversations: Vec<Box<dyn FnMut(u64) -> bool + Send>>,
    running: Arc<AtomicBool>,
) -> thread::JoinHandle<Vec<(u64, u64)>> {
    thread::spawn(move || {
        let mut tally = vec![(0u64, 0u64); conversations.len()];
        let mut i = 0u64;
        let end = Instant::now() + Duration::from_secs(60);
        while running.load(Ordering::Relaxed) && Instant::now() < end {
            for (c, t) in conversations.iter_mut().zip(tally.iter_mut()) {
                t.0 += 1;
                t.1 += u64::from(c(i));
            }
            i += 1;
            thread::sleep(Duration::from_millis(50));
        }
        tally
    })
}

/// A TCP conversation: one echo of a numbered line per call.
fn tcp_conversation(mut s: TcpStream) -> Box<dyn FnMut(u64) -> bool + Send> {
    Box::new(move |i| {
        let line = format!("exchange {i}\n");
        if s.write_all(line.as_bytes()).is_err() {
            return false;
        }
        let mut got = vec![0u8; line.len()];
        let mut at = 0;
        while at < got.len() {
            match read_within(&mut s, &mut got[at..], Duration::from_secs(5)) {
                Ok(0) | Err(_) => return false,
                Ok(n) => at += n,
            }
        }
        got == line.as_bytes()
    })
}

/// A UDP conversation with the picky service: one query per call (one retry after 1 s: UDP
/// may lose a datagram in a crowded queue, which is not what is tested).
fn udp_conversation(s: UdpSocket, to: SocketAddr) -> Box<dyn FnMut(u64) -> bool + Send> {
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    Box::new(move |i| {
        let q = format!("q:{i}");
        let mut buf = [0u8; 64];
        for _ in 0..2 {
            let _ = s.send_to(q.as_bytes(), to);
            loop {
                match recv_from_retrying(&s, &mut buf) {
                    Ok((n, _)) if &buf[..n] == q.as_bytes() => return true,
                    Ok(_) => continue, // an older answer
                    Err(_) => break,
                }
            }
        }
        false
    })
}

/// Opens new flows to another rule every 100 ms while `running` (each: connect and one echo,
/// or one UDP question, answered in full): (tried, admitted).
fn keep_opening(lab: &Lab, udp: bool, running: Arc<AtomicBool>) -> thread::JoinHandle<(u64, u64)> {
    spawn_in_ns(&lab.client, move || {
        let (mut tried, mut ok) = (0u64, 0u64);
        let end = Instant::now() + Duration::from_secs(60);
        while running.load(Ordering::Relaxed) && Instant::now() < end {
            tried += 1;
            let admitted = if udp {
                let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let _ = s.send_to(b"new", (VIP, 53));
                let mut buf = [0u8; 64];
                matches!(recv_from_retrying(&s, &mut buf), Ok((n, _)) if buf[..n].ends_with(b":new"))
            } else {
                let to = SocketAddr::new(VIP.parse().unwrap(), 81);
                TcpStream::connect_timeout(&to, Duration::from_secs(3))
                    .is_ok_and(|s| tcp_conversation(s)(0))
            };
            ok += u64::from(admitted);
            thread::sleep(Duration::from_millis(100));
        }
        (tried, ok)
    })
}

/// Samples the table's occupancy (the stats file's `flows`) while `running`: the highest.
fn watch_occupancy(lab: &Lab, running: Arc<AtomicBool>) -> thread::JoinHandle<u64> {
    let path = lab.stats_path();
    thread::spawn(move || {
        let most = AtomicU64::new(0);
        let end = Instant::now() + Duration::from_secs(60);
        while running.load(Ordering::Relaxed) && Instant::now() < end {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if let Some(v) = text
                .lines()
                .find_map(|l| l.strip_prefix("flows="))
                .and_then(|v| v.parse::<u64>().ok())
            {
                most.fetch_max(v, Ordering::Relaxed);
            }
            thread::sleep(Duration::from_millis(100));
        }
        most.into_inner()
    })
}

/// Flows evicted so far, for any reason.
fn evicted(lab: &Lab) -> u64 {
    lab.stats()
        .iter()
        .filter(|(k, _)| k.starts_with("evicted."))
        .map(|(_, v)| v)
        .sum()
}

/// One flood scenario's figures.
#[derive(Debug)]
struct Figures {
    flood: Flood,
    occupancy_max: u64,
    evicted: u64,
    /// (tried, admitted) new flows to the other rule during the flood.
    admitted: (u64, u64),
    /// Per conversation (exchanges, answered).
    kept: Vec<(u64, u64)>,
}

/// A SYN flood at rule `web` (port 80) while an established connection on it and one on rule
/// `other` (port 81) keep exchanging.
fn syn_flood_beside_two_connections(lab: &Lab) -> Figures {
    let mut on_flooded = lab.client_connect(80);
    let mut on_other = lab.client_connect(81);
    assert!(whoami(&mut on_flooded).starts_with("backend"));
    assert!(whoami(&mut on_other).starts_with("backend"));
    under_flood(
        lab,
        Mode::Syn,
        80,
        vec![tcp_conversation(on_flooded), tcp_conversation(on_other)],
        false,
    )
}

/// Runs a flood of `mode` at `dport` while the conversations exchange and new flows to the
/// other rule (TCP 81, or UDP 53 when `udp_new`) are opened; returns the figures.
fn under_flood(
    lab: &Lab,
    mode: Mode,
    dport: u16,
    conversations: Vec<Box<dyn FnMut(u64) -> bool + Send>>,
    udp_new: bool,
) -> Figures {
    let running = Arc::new(AtomicBool::new(true));
    let exchanging = keep_exchanging(conversations, Arc::clone(&running));
    let occupancy = watch_occupancy(lab, Arc::clone(&running));
    let evicted_before = evicted(lab);
    let flooding = flood(
        &lab.client,
        &format!("{}c", lab.prefix),
        appliance_mac(lab),
        mode,
        dport,
        flood_rate(),
        FLOOD_FOR,
    );
    // The table fills within half a second; new flows are tried from then on.
    thread::sleep(Duration::from_millis(500));
    let opening = keep_opening(lab, udp_new, Arc::clone(&running));
    let flood = flooding.join().expect("the flood");
    running.store(false, Ordering::Relaxed);
    let admitted = opening.join().expect("new flows");
    let kept = exchanging.join().expect("conversations");
    let occupancy_max = occupancy.join().unwrap();
    thread::sleep(Duration::from_millis(600));
    let evicted = evicted(lab) - evicted_before;
    Figures {
        flood,
        occupancy_max,
        evicted,
        admitted,
        kept,
    }
}

/// How much of the table a flood may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Occupancy {
    /// All of it (shares at 100 %): every new flow evicts the oldest unconfirmed one.
    Full,
    /// At most this many flows (the flooded rule's share, and the legitimate flows).
    AtMost(u64),
}

/// The checks every flood scenario must pass, and its figures printed.
fn judge(lab: &Lab, what: &str, f: &Figures, occupancy: Occupancy) {
    let stats = std::fs::read_to_string(lab.stats_path()).unwrap_or_default();
    let nonzero: Vec<&str> = stats.lines().filter(|l| !l.ends_with("=0")).collect();
    eprintln!(
        "figures: {what}: flood {} frames in {:.2} s ({:.0}/s), table occupancy max {} of \
         {CAPACITY}, evicted {}, new flows to the other rule admitted {}/{}, exchanges \
         answered {:?}; non-zero counters after: {}",
        f.flood.sent,
        f.flood.secs,
        f.flood.sent as f64 / f.flood.secs,
        f.occupancy_max,
        f.evicted,
        f.admitted.1,
        f.admitted.0,
        f.kept,
        nonzero.join(" ")
    );
    assert!(
        f.flood.sent >= flood_rate() * FLOOD_FOR.as_secs() * 8 / 10,
        "the flood ran: {:?}",
        f.flood
    );
    match occupancy {
        Occupancy::Full => assert!(
            f.occupancy_max >= CAPACITY * 95 / 100,
            "the flood filled the table: {} of {CAPACITY}",
            f.occupancy_max
        ),
        Occupancy::AtMost(most) => assert!(
            f.occupancy_max <= most && f.occupancy_max >= most / 2,
            "the flood held its share: {} of {CAPACITY} (at most {most})",
            f.occupancy_max
        ),
    }
    assert!(
        f.evicted > 0,
        "a full table admits by evicting: {}",
        f.evicted
    );
    for (i, (tried, answered)) in f.kept.iter().enumerate() {
        assert!(*tried >= 20, "conversation {i} ran: {tried}");
        assert_eq!(
            answered,
            tried,
            "conversation {i}: every exchange answered; log:\n{}",
            lab.log_text()
        );
    }
    let (tried, ok) = f.admitted;
    assert!(tried >= 10, "new flows tried: {tried}");
    assert!(
        ok * 100 >= tried * 90,
        "new flows to the other rule admitted: {ok} of {tried}"
    );
    assert_eq!(
        lab.stat("drop.flow_table_full"),
        0,
        "no new flow refused: unconfirmed ones make room"
    );
}

/// The flood lab: one worker with a table of [`CAPACITY`] flows; with `shares_at_100`, the
/// per-rule and per-class shares at 100 % (the flood alone can fill the table), else the
/// defaults.
fn flood_lab(shares_at_100: bool) -> (Lab, StopOnDrop, Vec<common::BackendServer>) {
    let capacity = CAPACITY.to_string();
    let mut args = vec!["--workers", "1", "--flow-capacity", &capacity];
    if shares_at_100 {
        args.extend([
            "--rule-share",
            "100",
            "--half-open-share",
            "100",
            "--unreplied-udp-share",
            "100",
        ]);
    }
    let lab = Lab::start_with(FLOOD_CONFIG, &args);
    let servers = vec![
        lab.start_echo_server(1, 8081),
        lab.start_echo_server(2, 8081),
    ];
    let stop = Arc::new(AtomicBool::new(false));
    start_picky_udp(&lab, 5454, &stop);
    (lab, StopOnDrop(stop), servers)
}

/// Spoofed SYNs at the reset-on-idle rule fill the table; an established connection on that
/// rule and one on another rule answer every exchange, and new connections to the other rule
/// are admitted (at least 90 %), each taking the place of the oldest half-open flow.
#[test]
fn a_syn_flood_filling_the_table_leaves_established_and_new_connections_working() {
    if !need_root("a_syn_flood_filling_the_table_leaves_established_and_new_connections_working") {
        return;
    }
    let (lab, _stop, _servers) = flood_lab(true);
    let f = syn_flood_beside_two_connections(&lab);
    judge(&lab, "SYN flood at rule web", &f, Occupancy::Full);
    assert!(lab.stat("rule.lb.web.flows_evicted") > 0);
    assert_eq!(lab.stat("rule.lb.other.flows_evicted"), 0);
}

/// Spoofed UDP datagrams at a rule whose service ignores them fill the table; a UDP
/// conversation on that rule and a TCP connection on another answer every exchange, and new
/// UDP flows to another rule are admitted (at least 90 %).
#[test]
fn a_udp_flood_filling_the_table_leaves_established_and_new_flows_working() {
    if !need_root("a_udp_flood_filling_the_table_leaves_established_and_new_flows_working") {
        return;
    }
    let (lab, _stop, _servers) = flood_lab(true);
    let quiet = SocketAddr::new(VIP.parse().unwrap(), 54);
    let udp = in_ns(&lab.client, || UdpSocket::bind("0.0.0.0:0").unwrap());
    let mut conversation = udp_conversation(udp, quiet);
    assert!(conversation(0), "the picky service answers a query");
    let mut tcp = lab.client_connect(80);
    assert!(whoami(&mut tcp).starts_with("backend"));
    let f = under_flood(
        &lab,
        Mode::Udp,
        54,
        vec![conversation, tcp_conversation(tcp)],
        true,
    );
    judge(&lab, "UDP flood at rule quiet", &f, Occupancy::Full);
    assert!(lab.stat("rule.lb.quiet.flows_evicted") > 0);
    assert_eq!(lab.stat("rule.lb.dns.flows_evicted"), 0);
}

/// With the default shares, a SYN flood at one rule recycles that rule's quarter of the table
/// (its oldest half-open flows first) and never takes the rest: the other rule's flows are
/// admitted without evicting anything.
#[test]
fn a_syn_flood_at_one_rule_holds_only_its_share_of_the_table() {
    if !need_root("a_syn_flood_at_one_rule_holds_only_its_share_of_the_table") {
        return;
    }
    let (lab, _stop, _servers) = flood_lab(false);
    let f = syn_flood_beside_two_connections(&lab);
    // The rule's share (25 %), the established connections and the other rule's few.
    let share = CAPACITY / 4;
    judge(
        &lab,
        "SYN flood at rule web, default shares",
        &f,
        Occupancy::AtMost(share + 16),
    );
    assert_eq!(lab.stat("evicted.rule_share"), f.evicted);
    assert_eq!(lab.stat("evicted.table_full"), 0);
    assert_eq!(lab.stat("rule.lb.other.flows_evicted"), 0);
}
