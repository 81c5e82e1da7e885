//! The namespace lab of the end-to-end tests, the same topology as `scripts/lab-netns`:
//!
//! ```text
//!   client 198.18.0.10 ──┐                      ┌── switch ── backend1 198.18.1.11
//!                        │ xlb (xlbd, AF_XDP)   │          └─ backend2 198.18.1.12
//!   internet 198.19.0.50 ┘ VIP 198.18.0.100     └ 198.18.1.1
//!                          SNAT 198.19.0.100
//! ```
//!
//! Every test builds its own lab under a unique prefix and a [`Lab`] deletes it on drop, also
//! when the test panics: xlbd gets SIGTERM (by its PID), then the namespaces go. Test hosts
//! are Rust threads that entered a namespace (`setns`); their sockets are real Linux sockets.

#![allow(dead_code)]

pub mod ops;
pub mod stall;

/// A lab configuration as one `&'static str`: time scale 60, frontend `vip` (the VIP), with
/// `snat,` first also frontend `snat` (the SNAT address), pool `web` of the two backends, then
/// `$rest`, the rules a test needs.
macro_rules! lab_config {
    (@head) => {
        r#"
[settings]
lab_time_scale = 60

[[frontends]]
name = "vip"
address = "198.18.0.100"
kind = "public"
"#
    };
    (@snat) => {
        r#"
[[frontends]]
name = "snat"
address = "198.19.0.100"
kind = "public"
"#
    };
    (@pool) => {
        r#"
[[backend_pools]]
name = "web"
members = [{ address = "198.18.1.11" }, { address = "198.18.1.12" }]
"#
    };
    (snat, $rest:literal) => {
        concat!(
            $crate::common::lab_config!(@head),
            $crate::common::lab_config!(@snat),
            $crate::common::lab_config!(@pool),
            $rest
        )
    };
    ($rest:literal) => {
        concat!(
            $crate::common::lab_config!(@head),
            $crate::common::lab_config!(@pool),
            $rest
        )
    };
}
#[allow(unused_imports)]
pub(crate) use lab_config;

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc, Arc, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use xlb_afxdp::sys;

/// xlbd's Prometheus endpoint, on the appliance namespace's loopback.
pub const METRICS: &str = "127.0.0.1:9464";
pub const VIP: &str = "198.18.0.100";
pub const SNAT: &str = "198.19.0.100";
pub const CLIENT: &str = "198.18.0.10";
pub const BACKEND1: &str = "198.18.1.11";
pub const BACKEND2: &str = "198.18.1.12";
pub const INTERNET: &str = "198.19.0.50";
pub const VIP6: &str = "2001:db8::100";
pub const CLIENT6: &str = "2001:db8::10";

/// An IPv6 load-balancing rule with TCP reset on idle, at lab time scale 60.
pub const CONFIG6: &str = r#"
[settings]
lab_time_scale = 60

[[frontends]]
name = "vip6"
address = "2001:db8::100"
kind = "public"

[[backend_pools]]
name = "web6"
members = [{ address = "2001:db8:1::11" }, { address = "2001:db8:1::12" }]

[[load_balancing_rules]]
name = "web6"
frontend = "vip6"
protocol = "TCP"
frontend_port = 80
backend_pool = "web6"
backend_port = 8080
idle_timeout_minutes = 4
tcp_reset = true
"#;

/// The lab's default configuration: time scale 60 (4 minutes last 4 s).
pub const CONFIG: &str = lab_config!(
    snat,
    r#"
[[load_balancing_rules]]
name = "web"
frontend = "vip"
protocol = "TCP"
frontend_port = 80
backend_pool = "web"
backend_port = 8080
idle_timeout_minutes = 4
tcp_reset = true

[[load_balancing_rules]]
name = "web-silent"
frontend = "vip"
protocol = "TCP"
frontend_port = 81
backend_pool = "web"
backend_port = 8080
idle_timeout_minutes = 4

[[load_balancing_rules]]
name = "dns"
frontend = "vip"
protocol = "UDP"
frontend_port = 53
backend_pool = "web"
backend_port = 5353
idle_timeout_minutes = 30

[[outbound_rules]]
name = "web-out"
frontends = ["snat"]
backend_pool = "web"
protocol = "ALL"
"#
);

/// Whether this run's xlbd has the XDP fast path (its default): `XLB_TEST_FAST_PATH=off` runs
/// the suites with `--fast-path off`, every packet through a worker.
pub fn fast_path_on() -> bool {
    std::env::var("XLB_TEST_FAST_PATH").map_or(true, |v| v != "off")
}

/// Turns GRO on for `dev` in namespace `ns`: a veth whose peer the appliance's XDP program
/// redirects frames into drops them unless it has GRO on (or an XDP program of its own).
pub fn gro_on(ns: &str, dev: &str) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "ethtool", "-K", dev, "gro", "on"])
        .output()
        .expect("running ethtool(8); is it installed (scripts/test installs it)?");
    assert!(
        out.status.success(),
        "ethtool -K {dev} gro on in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Returns false (and says why) when the test cannot run here.
pub fn need_root(test: &str) -> bool {
    if sys::is_root() {
        return true;
    }
    eprintln!("SKIP {test}: needs root (network namespaces, XDP, AF_XDP); CI runs as root");
    false
}

pub fn xlbd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_xlbd")
}

/// Runs ip(8) with `args`; panics with its stderr if it fails.
pub fn ip(args: &[&str]) {
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

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Runs `f` on a thread inside namespace `ns` (sockets it creates stay in `ns`).
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    spawn_in_ns(ns, f)
        .join()
        .expect("namespace thread panicked")
}

pub fn spawn_in_ns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let path = sys::named_netns(ns);
    thread::spawn(move || {
        sys::enter_netns(&path).unwrap_or_else(|e| panic!("entering {}: {e}", path.display()));
        f()
    })
}

/// What a backend's connection ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    Closed,
    Reset { after: Duration },
    Other(String),
}

/// A lab with xlbd running in it.
pub struct Lab {
    pub prefix: String,
    pub client: String,
    pub xlb: String,
    pub switch: String,
    pub backend1: String,
    pub backend2: String,
    pub internet: String,
    pub interfaces: Vec<String>,
    dir: PathBuf,
    xlbd: Option<Child>,
    /// Environment variables xlbd starts with (besides the test's own).
    xlbd_env: Vec<(String, String)>,
    log: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    /// (backend name, peer, ending) of every connection the echo servers served.
    pub endings: mpsc::Receiver<(String, SocketAddr, Ending)>,
    endings_tx: mpsc::Sender<(String, SocketAddr, Ending)>,
}

impl Lab {
    /// The topology, echo servers on both backends (TCP 8080, UDP 5353), the internet's
    /// "who are you" server on TCP 80, and xlbd running `config`.
    pub fn start(config: &str) -> Lab {
        Lab::start_with(config, &[])
    }

    /// [`Lab::start`] with extra xlbd arguments.
    pub fn start_with(config: &str, xlbd_args: &[&str]) -> Lab {
        Lab::start_prepared(config, xlbd_args, |_| ()).0
    }

    fn namespaces(&self) -> Vec<String> {
        vec![
            self.client.clone(),
            self.xlb.clone(),
            self.switch.clone(),
            self.backend1.clone(),
            self.backend2.clone(),
            self.internet.clone(),
        ]
    }

    fn build(&self) {
        let p = &self.prefix;
        let q = ["numtxqueues", "2", "numrxqueues", "2"];
        let pair = |a: &str, a_ns: &str, b: &str, b_ns: &str| {
            let mut args = vec!["link", "add", a];
            args.extend(q);
            args.extend(["netns", a_ns, "type", "veth", "peer", "name", b]);
            args.extend(q);
            args.extend(["netns", b_ns]);
            ip(&args);
        };
        let (c, x, s) = (&self.client, &self.xlb, &self.switch);
        let (b1, b2, i) = (&self.backend1, &self.backend2, &self.internet);
        pair(&format!("{p}c"), c, &format!("{p}ac"), x);
        pair(&format!("{p}ai"), x, &format!("{p}i"), i);
        pair(&format!("{p}ab"), x, &format!("{p}sa"), s);
        pair(&format!("{p}b1"), b1, &format!("{p}s1"), s);
        pair(&format!("{p}b2"), b2, &format!("{p}s2"), s);
        for ns in self.namespaces() {
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        ip(&["-n", s, "link", "add", "br0", "type", "bridge"]);
        for d in ["sa", "s1", "s2"] {
            ip(&[
                "-n",
                s,
                "link",
                "set",
                &format!("{p}{d}"),
                "master",
                "br0",
                "up",
            ]);
        }
        ip(&["-n", s, "link", "set", "br0", "up"]);
        for (ns, dev, addr) in [
            (c, "c", "198.18.0.10/24"),
            (x, "ac", "198.18.0.1/24"),
            // Only so that the appliance's kernel answers ARP for the VIP and the SNAT
            // address; the XDP program takes their IP traffic before the kernel sees it.
            (x, "ac", "198.18.0.100/32"),
            (x, "ab", "198.18.1.1/24"),
            (x, "ai", "198.19.0.1/24"),
            (x, "ai", "198.19.0.100/32"),
            (b1, "b1", "198.18.1.11/24"),
            (b2, "b2", "198.18.1.12/24"),
            (i, "i", "198.19.0.50/24"),
        ] {
            ip(&["-n", ns, "addr", "add", addr, "dev", &format!("{p}{dev}")]);
        }
        // IPv6: the same shape; the VIP6 on the appliance only for neighbour discovery.
        for (ns, dev, addr) in [
            (c, "c", "2001:db8::10/64"),
            (x, "ac", "2001:db8::1/64"),
            (x, "ac", "2001:db8::100/128"),
            (x, "ab", "2001:db8:1::1/64"),
            (b1, "b1", "2001:db8:1::11/64"),
            (b2, "b2", "2001:db8:1::12/64"),
        ] {
            let dev = format!("{p}{dev}");
            ip(&["-n", ns, "addr", "add", addr, "dev", &dev, "nodad"]);
        }
        for (ns, dev) in [
            (c, "c"),
            (x, "ac"),
            (x, "ab"),
            (x, "ai"),
            (b1, "b1"),
            (b2, "b2"),
            (i, "i"),
        ] {
            ip(&["-n", ns, "link", "set", &format!("{p}{dev}"), "up"]);
        }
        for b in [b1, b2] {
            ip(&["-n", b, "route", "add", "default", "via", "198.18.1.1"]);
            ip(&[
                "-n",
                b,
                "-6",
                "route",
                "add",
                "default",
                "via",
                "2001:db8:1::1",
            ]);
        }
        // The test hosts' ends of the appliance's links receive what the XDP fast path
        // redirects out of the appliance's interfaces.
        if fast_path_on() {
            for (ns, dev) in [(c, "c"), (i, "i"), (s, "sa")] {
                gro_on(ns, &format!("{p}{dev}"));
            }
        }
        // The appliance's kernel never forwards: whatever crosses went through xlbd.
        let ok = Command::new("ip")
            .args(["netns", "exec", x, "sysctl", "-qw", "net.ipv4.ip_forward=0"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "sysctl in {x}");
        // Resolve the internet host before XDP is attached: the first outbound SYN then
        // needs no ARP round trip.
        in_ns(x, || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            let _ = s.send_to(&[], (INTERNET, 9));
        });
    }

    fn start_servers(&self) {
        for (ns, name) in [(&self.backend1, "backend1"), (&self.backend2, "backend2")] {
            let stop = Arc::clone(&self.stop);
            let tx = self.endings_tx.clone();
            let name = name.to_string();
            let (ready_tx, ready_rx) = mpsc::channel();
            spawn_in_ns(ns, move || echo_server(&name, 8080, stop, tx, ready_tx));
            ready_rx.recv().expect("echo server started");
            let stop = Arc::clone(&self.stop);
            let (ready_tx, ready_rx) = mpsc::channel();
            let name = name_of(ns);
            spawn_in_ns(ns, move || udp_echo(&name, 5353, stop, ready_tx));
            ready_rx.recv().expect("UDP echo started");
        }
        let stop = Arc::clone(&self.stop);
        let (ready_tx, ready_rx) = mpsc::channel();
        spawn_in_ns(&self.internet, move || {
            who_are_you_server(80, stop, ready_tx)
        });
        ready_rx.recv().expect("internet server started");
    }

    /// Starts xlbd (with `extra` arguments) and waits for its ready line.
    pub fn start_xlbd(&mut self, config: &str, extra: &[&str]) {
        let cfg = self.config_path();
        std::fs::write(&cfg, config).expect("writing the config");
        let stats = self.stats_path();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.xlb, xlbd_bin(), "--config"])
            .arg(&cfg)
            .arg("--stats-file")
            .arg(&stats)
            .args(["--status-interval", "1"])
            // Bounded even if the test harness is killed before Drop runs.
            .args(["--max-runtime", "120"])
            // The API on a socket of this lab; metrics on the appliance's own loopback.
            .arg("--api")
            .arg(format!("unix:{}", self.api_socket().display()))
            .args(["--metrics", METRICS]);
        for i in &self.interfaces {
            cmd.args(["--interface", i]);
        }
        if !fast_path_on() && !extra.contains(&"--fast-path") {
            cmd.args(["--fast-path", "off"]);
        }
        cmd.args(extra);
        cmd.envs(self.xlbd_env.iter().map(|(k, v)| (k, v)));
        // `ip netns exec` execs xlbd: the child's PID is xlbd's.
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting xlbd");
        let (ready_tx, ready_rx) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let log = Arc::clone(&self.log);
            let ready_tx = ready_tx.clone();
            thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let ready = line.starts_with("xlbd ready");
                    // Logged before the ready signal: a test may read the log right after.
                    log.lock().unwrap().push(line);
                    if ready {
                        let _ = ready_tx.send(());
                    }
                }
            });
        }
        self.xlbd = Some(child);
        if ready_rx.recv_timeout(Duration::from_secs(20)).is_err() {
            panic!("xlbd not ready in 20 s; its output:\n{}", self.log_text());
        }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// The configuration file xlbd was started with.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("xlb.toml")
    }

    /// The gRPC API's Unix socket.
    pub fn api_socket(&self) -> PathBuf {
        self.dir.join("xlbd.sock")
    }

    /// `GET /metrics` from the appliance's namespace: the Prometheus text.
    pub fn metrics(&self) -> String {
        in_ns(&self.xlb, || {
            let mut s = TcpStream::connect(METRICS).expect("connect to the metrics endpoint");
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: xlbd\r\n\r\n")
                .unwrap();
            let mut text = String::new();
            s.read_to_string(&mut text).expect("read the metrics");
            text
        })
    }

    pub fn stats_path(&self) -> PathBuf {
        self.dir.join("stats")
    }

    /// xlbd's counters as of its last stats-file write (4 times a second).
    pub fn stats(&self) -> HashMap<String, u64> {
        let text = std::fs::read_to_string(self.stats_path()).unwrap_or_default();
        text.lines()
            .filter_map(|l| l.split_once('='))
            .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
            .collect()
    }

    pub fn stat(&self, key: &str) -> u64 {
        self.stats().get(key).copied().unwrap_or(0)
    }

    /// Polls the stats file until `key` reaches `at_least` (or `timeout`); returns the value.
    pub fn wait_stat(&self, key: &str, at_least: u64, timeout: Duration) -> u64 {
        let end = Instant::now() + timeout;
        loop {
            let v = self.stat(key);
            if v >= at_least || Instant::now() >= end {
                return v;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Real TCP stacks send no segment outside its flow's window and no invalid flag
    /// combination: after a test's traffic, xlbd counted none (read after two stats-file
    /// writes, so that the last packets are in).
    pub fn assert_no_invalid_tcp(&self) {
        thread::sleep(Duration::from_millis(600));
        let stats = self.stats();
        for key in ["drop.out_of_window", "drop.bad_tcp_flags"] {
            let n = stats.get(key).copied();
            assert_eq!(n, Some(0), "{key}; log:\n{}", self.log_text());
        }
    }

    /// SIGTERM to xlbd; its exit status.
    pub fn stop_xlbd(&mut self) -> Option<ExitStatus> {
        let mut child = self.xlbd.take()?;
        let _ = sys::signal_process(child.id(), sys::SIGTERM);
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait().ok()
    }

    /// Whether any of the appliance's interfaces still has an XDP program.
    pub fn xdp_attached(&self) -> Vec<String> {
        self.interfaces
            .iter()
            .filter(|i| {
                let out = Command::new("ip")
                    .args(["-n", &self.xlb, "-d", "link", "show", "dev", i])
                    .output()
                    .expect("ip link show");
                String::from_utf8_lossy(&out.stdout).contains("xdp")
            })
            .cloned()
            .collect()
    }

    pub fn client_connect(&self, port: u16) -> TcpStream {
        let r = in_ns(&self.client, move || {
            TcpStream::connect_timeout(
                &SocketAddr::new(VIP.parse().unwrap(), port),
                Duration::from_secs(5),
            )
        });
        // The daemon's log says why a connection did not open (a worker stalled, a neighbour
        // never resolved, the SYN refused), which the error alone does not.
        r.unwrap_or_else(|e| {
            panic!(
                "connecting to the VIP port {port}: {e}; {}",
                self.diagnostics()
            )
        })
    }

    /// The daemon's stats file and log, for a failure message: they say what the data plane
    /// did (a worker stalled, a neighbour never resolved, a flow waiting for its grace).
    pub fn diagnostics(&self) -> String {
        format!(
            "stats file:\n{}\nlog:\n{}",
            std::fs::read_to_string(self.stats_path()).unwrap_or_default(),
            self.log_text()
        )
    }
}

fn name_of(ns: &str) -> String {
    if ns.ends_with("-b1") {
        "backend1".into()
    } else {
        "backend2".into()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.stop_xlbd();
        for ns in self.namespaces() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sends `payload` and reads back as many bytes.
pub fn echo(s: &mut TcpStream, payload: &[u8]) -> Vec<u8> {
    s.write_all(payload).expect("send");
    let mut got = vec![0; payload.len()];
    s.read_exact(&mut got).expect("echo");
    got
}

/// One `read` of `s` that waits at most `timeout` in all: the call the tests use to see how a
/// connection ends (data, EOF, ECONNRESET, or `TimedOut`/`WouldBlock` for silence). Linux
/// returns EINTR from a socket read with a receive timeout when the process was stopped and
/// continued, even with no signal handler (signal(7)); that is retried with the time left.
pub fn read_within(s: &mut TcpStream, buf: &mut [u8], timeout: Duration) -> std::io::Result<usize> {
    let end = Instant::now() + timeout;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ErrorKind::TimedOut.into());
        }
        s.set_read_timeout(Some(left))?;
        match s.read(buf) {
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// `recv_from` with the socket's own timeout, retried on EINTR (see [`read_within`]).
pub fn recv_from_retrying(s: &UdpSocket, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
    loop {
        match s.recv_from(buf) {
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// Waits for `s`, idle since `idle_from`, to be reset on idle: the client reads ECONNRESET
/// `idle` after its last packet, 50 ms early at most and `slack` late at most. Returns how long
/// it waited.
pub fn client_reset_on_idle(
    lab: &Lab,
    s: &mut TcpStream,
    idle_from: Instant,
    idle: Duration,
    slack: Duration,
) -> Duration {
    let mut buf = [0u8; 16];
    let r = read_within(s, &mut buf, idle + slack + Duration::from_secs(5));
    let waited = idle_from.elapsed();
    assert!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "client: expected ECONNRESET, got {r:?} after {waited:?}; log:\n{}",
        lab.log_text()
    );
    assert!(
        waited >= idle - Duration::from_millis(50) && waited <= idle + slack,
        "reset {waited:?} after the last packet; the idle timeout is {idle:?}"
    );
    waited
}

/// The next backend connection to end (within 3 s) ended with ECONNRESET: its backend's name
/// and the peer it saw.
pub fn backend_reset(lab: &Lab) -> (String, SocketAddr) {
    let (name, peer, ending) = lab
        .endings
        .recv_timeout(Duration::from_secs(3))
        .expect("the backend's connection ended");
    assert!(
        matches!(ending, Ending::Reset { .. }),
        "{name}: expected ECONNRESET, got {ending:?}"
    );
    (name, peer)
}

/// Asks the backend behind `s` its name.
pub fn whoami(s: &mut TcpStream) -> String {
    s.write_all(b"whoami\n").expect("send");
    let mut line = String::new();
    let mut b = [0u8; 1];
    while read_within(s, &mut b, Duration::from_secs(5)).expect("whoami") == 1 && b[0] != b'\n' {
        line.push(b[0] as char);
    }
    line
}

/// Opens connections to VIP:`port` until one lands on each backend (bounded).
pub fn one_connection_per_backend(lab: &Lab, port: u16) -> (TcpStream, TcpStream) {
    let (mut b1, mut b2) = (None, None);
    for _ in 0..40 {
        let mut s = lab.client_connect(port);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        match whoami(&mut s).as_str() {
            "backend1" if b1.is_none() => b1 = Some(s),
            "backend2" if b2.is_none() => b2 = Some(s),
            _ => {}
        }
        if b1.is_some() && b2.is_some() {
            break;
        }
    }
    (
        b1.expect("a connection on backend1 in 40 tries"),
        b2.expect("a connection on backend2 in 40 tries"),
    )
}

/// Accept loop polling `stop` (bounded by the lab's life); one thread per connection.
fn echo_server(
    name: &str,
    port: u16,
    stop: Arc<AtomicBool>,
    endings: mpsc::Sender<(String, SocketAddr, Ending)>,
    ready: mpsc::Sender<()>,
) {
    // Dual stack (Linux default): IPv4 clients appear as ::ffff:a.b.c.d, made canonical below.
    let l = TcpListener::bind(("::", port)).expect("bind echo server");
    l.set_nonblocking(true).unwrap();
    let _ = ready.send(());
    let end = Instant::now() + Duration::from_secs(120);
    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
        match l.accept() {
            Ok((conn, peer)) => {
                let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
                let name = name.to_string();
                let tx = endings.clone();
                thread::spawn(move || {
                    let ending = serve(&name, conn);
                    let _ = tx.send((name, peer, ending));
                });
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("accept: {e}"),
        }
    }
}

fn serve(name: &str, mut conn: TcpStream) -> Ending {
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(40)))
        .unwrap();
    let opened = Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return Ending::Closed,
            Ok(n) => {
                let reply: Vec<u8> = if &buf[..n] == b"whoami\n" {
                    format!("{name}\n").into_bytes()
                } else {
                    buf[..n].to_vec()
                };
                if let Err(e) = conn.write_all(&reply) {
                    return Ending::Other(e.to_string());
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                return Ending::Reset {
                    after: opened.elapsed(),
                }
            }
            Err(e) => return Ending::Other(e.to_string()),
        }
    }
}

fn udp_echo(name: &str, port: u16, stop: Arc<AtomicBool>, ready: mpsc::Sender<()>) {
    let s = UdpSocket::bind(("0.0.0.0", port)).expect("bind UDP echo");
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let _ = ready.send(());
    let end = Instant::now() + Duration::from_secs(120);
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
        if let Ok((n, peer)) = s.recv_from(&mut buf) {
            let mut reply = format!("{name}:").into_bytes();
            reply.extend_from_slice(&buf[..n]);
            let _ = s.send_to(&reply, peer);
        }
    }
}

/// Tells every client the address it connects from, as the internet sees it.
fn who_are_you_server(port: u16, stop: Arc<AtomicBool>, ready: mpsc::Sender<()>) {
    let l = TcpListener::bind(("0.0.0.0", port)).expect("bind internet server");
    l.set_nonblocking(true).unwrap();
    let _ = ready.send(());
    let end = Instant::now() + Duration::from_secs(120);
    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
        match l.accept() {
            Ok((mut conn, peer)) => {
                let _ = conn.set_nonblocking(false);
                let _ = conn.write_all(format!("{peer}\n").as_bytes());
            }
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Servers a test stops on its own (health probes, drain): started before xlbd when needed.

/// A server on one backend with its own stop: [`BackendServer::stop`] closes its listening
/// socket (new connections are refused, as when a service goes down) while the connections it
/// accepted keep being served, as a server that stops gracefully does.
pub struct BackendServer {
    stop: Arc<AtomicBool>,
    join: Option<JoinHandle<()>>,
}

impl BackendServer {
    /// Stops accepting and returns once the listening socket is closed.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

impl Drop for BackendServer {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Lab {
    /// [`Lab::start_with`], with `prepare` run on the built lab (servers running) before xlbd
    /// starts: servers that xlbd's probes must find from their first attempt.
    pub fn start_prepared<T>(
        config: &str,
        xlbd_args: &[&str],
        prepare: impl FnOnce(&Lab) -> T,
    ) -> (Lab, T) {
        Lab::start_prepared_env(config, xlbd_args, &[], prepare)
    }

    /// [`Lab::start_with`], xlbd started (and restarted) with the variables `env`.
    pub fn start_with_env(config: &str, xlbd_args: &[&str], env: &[(&str, &str)]) -> Lab {
        Lab::start_prepared_env(config, xlbd_args, env, |_| ()).0
    }

    fn start_prepared_env<T>(
        config: &str,
        xlbd_args: &[&str],
        env: &[(&str, &str)],
        prepare: impl FnOnce(&Lab) -> T,
    ) -> (Lab, T) {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        // "xe" + pid + counter: unique per process and test; short enough for interface names.
        let prefix = format!("xe{}{}", std::process::id() % 100_000, n);
        let dir = std::env::temp_dir().join(format!("{prefix}-lab"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let (endings_tx, endings) = mpsc::channel();
        let mut lab = Lab {
            client: format!("{prefix}-client"),
            xlb: format!("{prefix}-xlb"),
            switch: format!("{prefix}-sw"),
            backend1: format!("{prefix}-b1"),
            backend2: format!("{prefix}-b2"),
            internet: format!("{prefix}-inet"),
            interfaces: vec![
                format!("{prefix}ac"),
                format!("{prefix}ab"),
                format!("{prefix}ai"),
            ],
            prefix,
            dir,
            xlbd: None,
            xlbd_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            log: Arc::new(Mutex::new(Vec::new())),
            stop: Arc::new(AtomicBool::new(false)),
            endings,
            endings_tx,
        };
        // Created first, so that Drop also cleans up a half-built lab.
        for ns in lab.namespaces() {
            ip(&["netns", "add", &ns]);
        }
        lab.build();
        lab.start_servers();
        let prepared = prepare(&lab);
        lab.start_xlbd(config, xlbd_args);
        (lab, prepared)
    }

    fn backend_ns(&self, which: u8) -> (String, &'static str) {
        match which {
            1 => (self.backend1.clone(), "backend1"),
            2 => (self.backend2.clone(), "backend2"),
            _ => panic!("backend {which}: the lab has backends 1 and 2"),
        }
    }

    /// An echo server like the lab's (`whoami` answers the backend's name) on TCP `port` of
    /// backend `which` (1 or 2).
    pub fn start_echo_server(&self, which: u8, port: u16) -> BackendServer {
        let (ns, name) = self.backend_ns(which);
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let tx = self.endings_tx.clone();
        let s = Arc::clone(&stop);
        let join = spawn_in_ns(&ns, move || echo_server(name, port, s, tx, ready_tx));
        ready_rx.recv().expect("echo server started");
        BackendServer {
            stop,
            join: Some(join),
        }
    }

    /// An HTTP/1.1 server on TCP `port` of backend `which`: every request is answered with
    /// the status `status` holds at that moment, and the connection closed.
    pub fn start_http_server(
        &self,
        which: u8,
        port: u16,
        status: Arc<std::sync::atomic::AtomicU16>,
    ) -> BackendServer {
        let (ns, _) = self.backend_ns(which);
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let s = Arc::clone(&stop);
        let join = spawn_in_ns(&ns, move || {
            let l = TcpListener::bind(("0.0.0.0", port)).expect("bind HTTP server");
            l.set_nonblocking(true).unwrap();
            let _ = ready_tx.send(());
            let end = Instant::now() + Duration::from_secs(120);
            while !s.load(Ordering::Relaxed) && Instant::now() < end {
                match l.accept() {
                    Ok((mut conn, _)) => {
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut req = Vec::new();
                        let mut buf = [0u8; 512];
                        while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
                            match conn.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => req.extend_from_slice(&buf[..n]),
                            }
                        }
                        let code = status.load(Ordering::Relaxed);
                        let _ = conn.write_all(
                            format!(
                                "HTTP/1.1 {code} Status {code}\r\nContent-Length: 0\r\n\
                                 Connection: close\r\n\r\n"
                            )
                            .as_bytes(),
                        );
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        ready_rx.recv().expect("HTTP server started");
        BackendServer {
            stop,
            join: Some(join),
        }
    }
}

impl Lab {
    /// An echo server on TCP `port` of the internet host (`whoami` answers `internet`): a peer
    /// that keeps members' outbound connections open.
    pub fn start_internet_echo(&self, port: u16) -> BackendServer {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let tx = self.endings_tx.clone();
        let s = Arc::clone(&stop);
        let join = spawn_in_ns(&self.internet, move || {
            echo_server("internet", port, s, tx, ready_tx)
        });
        ready_rx.recv().expect("internet echo server started");
        BackendServer {
            stop,
            join: Some(join),
        }
    }
}

impl Lab {
    /// xlbd's PID (`ip netns exec` execs it), while it runs.
    pub fn xlbd_pid(&self) -> Option<u32> {
        self.xlbd.as_ref().map(Child::id)
    }
}
