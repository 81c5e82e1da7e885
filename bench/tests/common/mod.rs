//! A three-namespace lab: `client` ↔ `fwd` ↔ `server`, veth pairs with 2 TX/RX queues on
//! both ends, addresses from 198.18.0.0/15 and 2001:db8::/32 only. Everything is created
//! under a per-run prefix and deleted by `Drop`, also when a test panics.

#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use xlb_afxdp::sys;

pub const CLIENT4: &str = "198.18.1.2";
pub const FWD4_C: &str = "198.18.1.1";
pub const FWD4_S: &str = "198.18.2.1";
pub const SERVER4: &str = "198.18.2.2";
pub const CLIENT6: &str = "2001:db8:1::2";
pub const FWD6_C: &str = "2001:db8:1::1";
pub const FWD6_S: &str = "2001:db8:2::1";
pub const SERVER6: &str = "2001:db8:2::2";

/// Returns false (and says why) when the test cannot run here.
pub fn need_root(test: &str) -> bool {
    if sys::is_root() {
        return true;
    }
    eprintln!("SKIP {test}: needs root (network namespaces, XDP, AF_XDP); CI runs as root");
    false
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("running ip(8); is iproute2 installed?");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ip_out(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("running ip(8)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

#[derive(Debug)]
pub struct Lab {
    pub prefix: String,
    pub client: String,
    pub fwd: String,
    pub server: String,
    /// client-side veth in `client`, its peer in `fwd`
    pub c0: String,
    pub f0: String,
    /// server-side veth in `fwd`, its peer in `server`
    pub f1: String,
    pub s0: String,
    pub client_mac: String,
    pub server_mac: String,
}

impl Lab {
    pub fn new() -> Lab {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        // "xa" + pid + run counter: unique per process and per test, short enough for
        // 15-character interface names.
        let prefix = format!("xa{}{}", std::process::id() % 100_000, n);
        let mut lab = Lab {
            client: format!("{prefix}-client"),
            fwd: format!("{prefix}-fwd"),
            server: format!("{prefix}-server"),
            c0: format!("{prefix}c0"),
            f0: format!("{prefix}f0"),
            f1: format!("{prefix}f1"),
            s0: format!("{prefix}s0"),
            client_mac: String::new(),
            server_mac: String::new(),
            prefix,
        };
        // Created before anything else so that Drop cleans up a half-built lab too.
        for ns in [&lab.client, &lab.fwd, &lab.server] {
            ip(&["netns", "add", ns]);
        }
        lab.build();
        lab
    }

    fn build(&mut self) {
        let q = ["numtxqueues", "2", "numrxqueues", "2"];
        let pair = |a: &str, a_ns: &str, b: &str, b_ns: &str| {
            let mut args = vec!["link", "add", a];
            args.extend(q);
            args.extend(["netns", a_ns, "type", "veth", "peer", "name", b]);
            args.extend(q);
            args.extend(["netns", b_ns]);
            ip(&args);
        };
        pair(&self.c0, &self.client, &self.f0, &self.fwd);
        pair(&self.f1, &self.fwd, &self.s0, &self.server);
        let (c, f, s) = (self.client.clone(), self.fwd.clone(), self.server.clone());
        for ns in [&c, &f, &s] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        for (ns, dev, v4, v6) in [
            (&c, &self.c0, "198.18.1.2/24", "2001:db8:1::2/64"),
            (&f, &self.f0, "198.18.1.1/24", "2001:db8:1::1/64"),
            (&f, &self.f1, "198.18.2.1/24", "2001:db8:2::1/64"),
            (&s, &self.s0, "198.18.2.2/24", "2001:db8:2::2/64"),
        ] {
            ip(&["-n", ns, "addr", "add", v4, "dev", dev]);
            ip(&["-n", ns, "addr", "add", v6, "dev", dev, "nodad"]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        ip(&["-n", &c, "route", "add", "default", "via", FWD4_C]);
        ip(&["-n", &c, "-6", "route", "add", "default", "via", FWD6_C]);
        ip(&["-n", &s, "route", "add", "default", "via", FWD4_S]);
        ip(&["-n", &s, "-6", "route", "add", "default", "via", FWD6_S]);
        // The kernel of `fwd` never forwards: anything that crosses went through AF_XDP.
        for key in ["net.ipv4.ip_forward=0", "net.ipv6.conf.all.forwarding=0"] {
            let ok = Command::new("ip")
                .args(["netns", "exec", &f, "sysctl", "-qw", key])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "sysctl {key} in {f}");
        }
        self.client_mac = mac_of(&c, &self.c0);
        self.server_mac = mac_of(&s, &self.s0);
        // The forwarder resolves next hops from fwd's neighbour table, and fwd's kernel
        // never sees the forwarded traffic, so it would never ask: static entries.
        for (ip_addr, mac, dev) in [
            (CLIENT4, &self.client_mac, &self.f0),
            (CLIENT6, &self.client_mac, &self.f0),
            (SERVER4, &self.server_mac, &self.f1),
            (SERVER6, &self.server_mac, &self.f1),
        ] {
            ip(&[
                "-n",
                &f,
                "neigh",
                "replace",
                ip_addr,
                "lladdr",
                mac,
                "dev",
                dev,
                "nud",
                "permanent",
            ]);
        }
    }

    /// Whether `dev` in `ns` has an XDP program attached.
    pub fn has_xdp(&self, ns: &str, dev: &str) -> bool {
        ip_out(&["-n", ns, "link", "show", "dev", dev]).contains("prog/xdp")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veths in it (and with them their peers).
        for ns in [&self.client, &self.fwd, &self.server] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Two namespaces joined by one veth pair (2 TX/RX queues each end): `a` (198.18.1.2,
/// 2001:db8:1::2) and `b` (198.18.1.3, 2001:db8:1::3). Deleted in `Drop`.
#[derive(Debug)]
pub struct Pair {
    pub a: String,
    pub b: String,
    pub a0: String,
    pub b0: String,
    pub a_mac: String,
    pub b_mac: String,
}

pub const PAIR_A4: &str = "198.18.1.2";
pub const PAIR_B4: &str = "198.18.1.3";

impl Pair {
    pub fn new() -> Pair {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("xp{}{}", std::process::id() % 100_000, n);
        let mut p = Pair {
            a: format!("{prefix}-a"),
            b: format!("{prefix}-b"),
            a0: format!("{prefix}a0"),
            b0: format!("{prefix}b0"),
            a_mac: String::new(),
            b_mac: String::new(),
        };
        for ns in [&p.a, &p.b] {
            ip(&["netns", "add", ns]);
        }
        let q = ["numtxqueues", "2", "numrxqueues", "2"];
        let mut args = vec!["link", "add", &p.a0];
        args.extend(q);
        args.extend(["netns", &p.a, "type", "veth", "peer", "name", &p.b0]);
        args.extend(q);
        args.extend(["netns", &p.b]);
        ip(&args);
        for (ns, dev, v4, v6) in [
            (&p.a, &p.a0, "198.18.1.2/24", "2001:db8:1::2/64"),
            (&p.b, &p.b0, "198.18.1.3/24", "2001:db8:1::3/64"),
        ] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["-n", ns, "addr", "add", v4, "dev", dev]);
            ip(&["-n", ns, "addr", "add", v6, "dev", dev, "nodad"]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        p.a_mac = mac_of(&p.a, &p.a0);
        p.b_mac = mac_of(&p.b, &p.b0);
        p
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

pub fn mac_of(ns: &str, dev: &str) -> String {
    let out = ip_out(&["-n", ns, "-br", "link", "show", "dev", dev]);
    out.split_whitespace()
        .nth(2)
        .unwrap_or_else(|| panic!("no MAC for {dev} in {ns}: {out}"))
        .to_string()
}

pub fn parse_mac(s: &str) -> [u8; 6] {
    let v: Vec<u8> = s
        .split(':')
        .map(|x| u8::from_str_radix(x, 16).expect("hex MAC"))
        .collect();
    v.try_into().expect("6-byte MAC")
}

/// Runs `f` on a new thread inside namespace `ns` (the namespace is per thread).
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    let path = sys::named_netns(ns);
    thread::spawn(move || {
        sys::enter_netns(&path).expect("setns");
        f()
    })
}

/// A process this test started; SIGTERM then SIGKILL on drop, by its pid only.
pub struct ChildGuard {
    pub child: Option<Child>,
    pub lines: mpsc::Receiver<String>,
    pub output: Vec<String>,
}

impl ChildGuard {
    pub fn spawn(cmd: &mut Command) -> ChildGuard {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning child");
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");
        let tx2 = tx.clone();
        thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx2.send(format!("stderr: {l}"));
            }
        });
        ChildGuard {
            child: Some(child),
            lines: rx,
            output: Vec::new(),
        }
    }

    /// Waits for a line containing `needle`.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.output.push(l.clone());
                    if l.contains(needle) {
                        return Some(l);
                    }
                }
                Err(_) => return None,
            }
        }
        None
    }

    /// SIGTERM, wait for a clean exit (bounded), return its status success.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        let _ = sys::signal_process(child.id(), sys::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                // drain what is left
                while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.output.push(l);
                }
                return st.success();
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = sys::signal_process(child.id(), sys::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// UDP echo server for `count` datagrams or `timeout`, whichever first; returns what it
/// received.
pub fn udp_echo_server(
    ns: &str,
    addr: SocketAddr,
    count: usize,
    timeout: Duration,
) -> (mpsc::Receiver<()>, thread::JoinHandle<Vec<Vec<u8>>>) {
    let (ready_tx, ready_rx) = mpsc::channel();
    let h = in_netns(ns, move || {
        let s = UdpSocket::bind(addr).expect("bind udp echo");
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let _ = ready_tx.send(());
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while got.len() < count && Instant::now() < deadline {
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                got.push(buf[..n].to_vec());
                let _ = s.send_to(&buf[..n], from);
            }
        }
        got
    });
    (ready_rx, h)
}

/// TCP echo server for one connection, bounded by `timeout`; returns bytes echoed.
pub fn tcp_echo_server(
    ns: &str,
    addr: SocketAddr,
    timeout: Duration,
) -> (mpsc::Receiver<()>, thread::JoinHandle<usize>) {
    let (ready_tx, ready_rx) = mpsc::channel();
    let h = in_netns(ns, move || {
        let l = TcpListener::bind(addr).expect("bind tcp echo");
        l.set_nonblocking(true).unwrap();
        let _ = ready_tx.send(());
        let deadline = Instant::now() + timeout;
        let mut conn = loop {
            match l.accept() {
                Ok((c, _)) => break c,
                Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                Err(_) => return 0,
            }
        };
        conn.set_nonblocking(false).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        conn.set_write_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut total = 0;
        let mut buf = vec![0u8; 65536];
        while Instant::now() < deadline {
            match conn.read(&mut buf) {
                // EINTR: the process was stopped and continued (signal(7)); read again.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    total += n;
                }
            }
        }
        total
    });
    (ready_rx, h)
}

/// Sends one datagram and waits for its echo, retrying a few times (the first one may
/// wait on the client's ARP/ND for its gateway). Runs in `ns`.
pub fn udp_round_trip(ns: &str, server: SocketAddr, payload: &'static [u8]) -> Option<Vec<u8>> {
    in_netns(ns, move || {
        let bind: SocketAddr = match server.ip() {
            IpAddr::V4(_) => "0.0.0.0:0".parse().unwrap(),
            IpAddr::V6(_) => "[::]:0".parse().unwrap(),
        };
        let s = UdpSocket::bind(bind).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(700)))
            .unwrap();
        let mut buf = [0u8; 2048];
        for _ in 0..5 {
            s.send_to(payload, server).ok()?;
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                if from == server {
                    return Some(buf[..n].to_vec());
                }
            }
        }
        None
    })
    .join()
    .expect("udp client thread")
}

/// Opens a TCP connection, sends `len` bytes of a pattern while reading the echo on
/// another thread, and returns whether every byte came back intact. Runs in `ns`.
pub fn tcp_round_trip(ns: &str, server: SocketAddr, len: usize) -> Result<(), String> {
    in_netns(ns, move || {
        let mut c = TcpStream::connect_timeout(&server, Duration::from_secs(5))
            .map_err(|e| format!("connect {server}: {e}"))?;
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
        let mut reader = c.try_clone().unwrap();
        let want = data.len();
        let rd = thread::spawn(move || {
            let mut got = Vec::with_capacity(want);
            let mut buf = vec![0u8; 65536];
            while got.len() < want {
                match reader.read(&mut buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            got
        });
        c.write_all(&data).map_err(|e| format!("write: {e}"))?;
        let got = rd.join().map_err(|_| "reader panicked".to_string())?;
        let _ = c.shutdown(std::net::Shutdown::Both);
        if got == data {
            Ok(())
        } else {
            Err(format!(
                "echo mismatch: sent {} got {}",
                data.len(),
                got.len()
            ))
        }
    })
    .join()
    .expect("tcp client thread")
}

/// `key=value` from a line of the forwarder's output.
pub fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

pub fn flush_stdout() {
    let _ = std::io::stdout().flush();
}
