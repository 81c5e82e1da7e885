//! `xlb-gen`: a pktgen-class generator on `BPF_PROG_RUN` live frames.
//!
//! Builds one template frame, loads `gen.bpf.c` (which varies flows, writes the sequence
//! number and send time, fixes checksums and redirects out of `--dev`) and runs it in the
//! kernel `--count` times, in runs of at most `--run` frames; paced to `--rate` if given
//! (the program waits for each frame's time, and the kernel flushes about 40 µs of frames
//! at a time, at most `--burst`); stopping at `--count` or `--duration`, whichever comes
//! first. Prints one `done` line
//! with `sent=` and `pps=`. `--sender xsk` sends the same frames by AF_XDP transmit
//! instead (the fallback for kernels without live frames).
//!
//! Addresses are checked to lie in 198.18.0.0/15 (the benchmarking range) or 2001:db8::/32:
//! this tool sends only to test hosts.

use std::{
    net::{IpAddr, Ipv4Addr},
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use xlb_afxdp::{
    netlink::{self, Netlink},
    spawn, sys, ModeRequest, PollMode, Worker, WorkerConfig, XdpProgram,
};
use xlb_bench::gen::{Flows, FrameSpec, GenConfig, Generator, KernelPacing, Mode, XskSender};

const USAGE: &str = "usage: xlb-gen --dev IFACE --src A.B.C.D --dst A.B.C.D [options]
  --netns NAME          enter /run/netns/NAME first
  --dev IFACE           egress interface (a veth needs XDP or GRO on its peer)
  --src IP --dst IP     source (first of the flows) and destination, IPv4 or IPv6;
                        198.18.0.0/15 or 2001:db8::/32 only
  --dst-mac MAC         next hop's MAC (default: from the neighbour table, via the route)
  --src-mac MAC         (default: the interface's)
  --mode udp|syn|ack    UDP, TCP SYNs, TCP segments of established flows: each flow's
                        sequence follows its SYN (send `syn` over the same flows first)
  --flows N             distinct (source address, source port) tuples (default 1000)
  --sport PORT          first source port (default 1024); ports, then addresses, vary
  --dport PORT          destination port (default 7000)
  --size BYTES          frame size with FCS, 64..1518 (default 64)
  --count N             frames to send (default 100000)
  --duration SECS       stop after SECS even if --count is not reached (default 5, max 600)
  --rate PPS            at most PPS frames per second, evenly spaced by the program itself,
                        flushed in bursts of about 40 us worth (at most --burst), no
                        catch-up after a stall (default 0: flat out)
  --burst N             most frames per flush when paced, 1..256 (default 64)
  --batch N             frames per redirect flush in the kernel, 1..256 (default 64)
  --run N               most frames per BPF_PROG_RUN call (default 1048576)
  --core N              pin to CPU N
  --sender live|xsk     BPF_PROG_RUN live frames (default; Linux >= 5.18), or the
                        AF_XDP transmit fallback (one worker, queue 0; ~0.8 Mpps in copy mode)
  --hold-dispatcher auto|yes|no  attach the program to a down veth pair created for the
                        run so that each BPF_PROG_RUN call costs microseconds, not two
                        RCU grace periods (default auto: only inside --netns)";

#[derive(Debug)]
struct Args {
    netns: Option<String>,
    dev: String,
    src: IpAddr,
    dst: IpAddr,
    dst_mac: Option<[u8; 6]>,
    src_mac: Option<[u8; 6]>,
    mode: Mode,
    flows: u32,
    sport: u16,
    dport: u16,
    size: usize,
    count: u64,
    duration: Duration,
    rate: u64,
    batch: u32,
    run: u32,
    burst: u32,
    core: Option<usize>,
    /// None: only inside `--netns` (never add interfaces to the host's namespace unasked).
    hold: Option<bool>,
    sender: Sender,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sender {
    Live,
    Xsk,
}

impl Sender {
    fn as_str(self) -> &'static str {
        match self {
            Sender::Live => "live",
            Sender::Xsk => "xsk",
        }
    }
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let v = s
        .split(':')
        .map(|x| u8::from_str_radix(x, 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| format!("bad MAC {s:?}"))?;
    v.try_into().map_err(|_| format!("bad MAC {s:?}"))
}

fn fmt_mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// 198.18.0.0/15 (RFC 2544's benchmarking range) and 2001:db8::/32: the only addresses
/// allowed.
fn is_bench_addr(a: IpAddr) -> bool {
    xlb_bench::is_bench_ip(a)
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        netns: None,
        dev: String::new(),
        src: Ipv4Addr::UNSPECIFIED.into(),
        dst: Ipv4Addr::UNSPECIFIED.into(),
        dst_mac: None,
        src_mac: None,
        mode: Mode::Udp,
        flows: 1000,
        sport: 1024,
        dport: 7000,
        size: 64,
        count: 100_000,
        duration: Duration::from_secs(5),
        rate: 0,
        batch: 64,
        run: 1 << 20,
        burst: 64,
        core: None,
        hold: None,
        sender: Sender::Live,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Err(String::new());
        }
        let val = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("{flag}: not a number: {v}"))
        };
        let small = |v: &str, max: u64| {
            let n = num(v)?;
            if n > max {
                return Err(format!("{flag}: {n} is more than {max}"));
            }
            Ok(n)
        };
        let ip = |v: &str| {
            v.parse::<IpAddr>()
                .map_err(|_| format!("{flag}: not an IP address: {v}"))
        };
        match flag.as_str() {
            "--netns" => a.netns = Some(val),
            "--dev" => a.dev = val,
            "--src" => a.src = ip(&val)?,
            "--dst" => a.dst = ip(&val)?,
            "--dst-mac" => a.dst_mac = Some(parse_mac(&val)?),
            "--src-mac" => a.src_mac = Some(parse_mac(&val)?),
            "--mode" => a.mode = val.parse()?,
            "--flows" => a.flows = small(&val, u64::from(u32::MAX))? as u32,
            "--sport" => a.sport = small(&val, 65_535)? as u16,
            "--dport" => a.dport = small(&val, 65_535)? as u16,
            "--size" => a.size = small(&val, 65_535)? as usize,
            "--count" => a.count = num(&val)?,
            "--duration" => a.duration = Duration::from_secs_f64(small(&val, 600)? as f64),
            "--rate" => a.rate = num(&val)?,
            "--batch" => a.batch = small(&val, 256)? as u32,
            "--run" => a.run = small(&val, 1 << 24)? as u32,
            "--burst" => a.burst = small(&val, 256)?.max(1) as u32,
            "--core" => a.core = Some(num(&val)? as usize),
            "--sender" => {
                a.sender = match val.as_str() {
                    "live" => Sender::Live,
                    "xsk" => Sender::Xsk,
                    _ => return Err(format!("--sender {val}: live or xsk")),
                }
            }
            "--hold-dispatcher" => {
                a.hold = match val.as_str() {
                    "auto" => None,
                    "yes" => Some(true),
                    "no" => Some(false),
                    _ => return Err(format!("--hold-dispatcher {val}: auto, yes or no")),
                }
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if a.dev.is_empty() {
        return Err("--dev is required".into());
    }
    if !is_bench_addr(a.src) || !is_bench_addr(a.dst) {
        return Err(
            "--src and --dst must be in 198.18.0.0/15 or 2001:db8::/32 (test hosts only)".into(),
        );
    }
    if a.src.is_ipv6() != a.dst.is_ipv6() {
        return Err("--src and --dst must be of one family".into());
    }
    if a.count == 0 || a.duration.is_zero() || a.run == 0 {
        return Err("--count, --duration and --run must be positive".into());
    }
    Ok(a)
}

/// The MAC of the next hop toward `dst`: the route's gateway (or `dst` on a connected
/// route) in the neighbour table.
fn resolve_dst_mac(nl: &mut Netlink, ifindex: u32, dst: IpAddr) -> Result<[u8; 6], String> {
    let routes = nl.routes().map_err(|e| format!("reading routes: {e}"))?;
    let hop = netlink::lookup_route(&routes, dst)
        .and_then(|r| r.nexthops.first())
        .and_then(|h| h.gateway)
        .unwrap_or(dst);
    let neigh = nl
        .neighbours()
        .map_err(|e| format!("reading neighbours: {e}"))?;
    neigh
        .iter()
        .find(|n| n.ip == hop && n.ifindex == ifindex && n.state.is_usable())
        .and_then(|n| n.mac)
        .ok_or_else(|| {
            format!(
                "no usable neighbour entry for next hop {hop} on ifindex {ifindex}: \
                 pass --dst-mac or add a static neighbour"
            )
        })
}

/// An interface that stays down (so it receives nothing) to attach the generator program
/// to, keeping it in the XDP dispatcher (see `Generator::hold_dispatcher`): one end of a
/// veth pair, since veth is always there where this runs (no `dummy` module on some
/// kernels). Deleted on drop; if the process dies first, it goes with its namespace.
#[derive(Debug)]
struct HolderDev {
    name: String,
    ifindex: u32,
}

impl HolderDev {
    fn create(nl: &mut Netlink) -> Result<Self, String> {
        let name = format!("xg{}h", std::process::id());
        let peer = format!("xg{}p", std::process::id());
        let ok = std::process::Command::new("ip")
            .args(["link", "add", &name, "type", "veth", "peer", "name", &peer])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            return Err(format!(
                "ip link add {name} type veth failed (pass --hold-dispatcher no to run without)"
            ));
        }
        let ifindex = nl
            .link_by_name(&name)
            .map_err(|e| format!("holder {name}: {e}"))?
            .ifindex;
        Ok(Self { name, ifindex })
    }
}

impl Drop for HolderDev {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.name])
            .status();
    }
}

/// The egress veth's (accepted, refused) ndo_xdp_xmit counters through `ethtool -S` (run
/// in this thread's namespace); `None` if ethtool is missing or the device is no veth.
fn egress_xmit(dev: &str) -> Option<(u64, u64)> {
    let out = std::process::Command::new("ethtool")
        .args(["-S", dev])
        .output()
        .ok()?;
    xlb_bench::gen::parse_veth_xdp_xmit(&String::from_utf8_lossy(&out.stdout))
}

fn run(a: &Args) -> Result<(), String> {
    // Checked before anything is touched.
    let flows = Flows::new(a.flows, a.sport).map_err(|e| e.to_string())?;
    let last = flows.last_address(a.src);
    if !is_bench_addr(last) {
        return Err(format!(
            "{} flows from {}:{} need source addresses up to {last}, outside the benchmarking \
             ranges",
            a.flows, a.src, a.sport
        ));
    }
    if let Some(ns) = &a.netns {
        sys::enter_netns(sys::named_netns(ns)).map_err(|e| format!("entering netns {ns}: {e}"))?;
    }
    if let Some(core) = a.core {
        if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
            return Err(format!("cannot pin to CPU {core}"));
        }
    }
    let stop = sys::stop_flag_on_signals().map_err(|e| format!("signal handlers: {e}"))?;
    let mut nl = Netlink::open().map_err(|e| format!("netlink: {e}"))?;
    let link = nl
        .link_by_name(&a.dev)
        .map_err(|e| format!("interface {}: {e}", a.dev))?;
    let src_mac = match a.src_mac.or(link.mac) {
        Some(m) => m,
        None => return Err(format!("{} has no MAC; pass --src-mac", a.dev)),
    };
    let dst_mac = match a.dst_mac {
        Some(m) => m,
        None => resolve_dst_mac(&mut nl, link.ifindex, a.dst)?,
    };
    let spec = FrameSpec {
        mode: a.mode,
        src_mac,
        dst_mac,
        src: a.src,
        dst: a.dst,
        sport: a.sport,
        dport: a.dport,
        size: a.size,
    };
    let frame = spec.build().map_err(|e| e.to_string())?;
    let cfg = GenConfig::for_spec(&spec, flows);
    let burst = match (a.sender, a.rate) {
        (Sender::Live, 0) => a.batch,
        (Sender::Live, r) => KernelPacing::for_rate(r).batch.min(a.burst).max(1),
        (Sender::Xsk, _) => 0,
    };
    println!(
        "xlb-gen ready sender={} dev={} ifindex={} src_mac={} dst_mac={} mode={} size={} flows={} \
         sources={}..{} sport={}..{} marker={} count={} duration_s={} rate={} burst={burst}",
        a.sender.as_str(),
        a.dev,
        link.ifindex,
        fmt_mac(src_mac),
        fmt_mac(dst_mac),
        a.mode,
        a.size,
        flows.count,
        a.src,
        last,
        flows.port_base,
        u32::from(flows.port_base) + flows.port_span - 1,
        if cfg.marker {
            "yes"
        } else {
            "no (frame too short: no latency)"
        },
        a.count,
        a.duration.as_secs_f64(),
        a.rate,
    );

    match a.sender {
        Sender::Live => run_live(a, &mut nl, link.ifindex, &frame, &cfg, stop),
        Sender::Xsk => run_xsk(a, link.ifindex, frame, cfg, stop),
    }
}

/// The main sender: BPF_PROG_RUN live frames.
fn run_live(
    a: &Args,
    nl: &mut Netlink,
    ifindex: u32,
    frame: &[u8],
    cfg: &GenConfig,
    stop: &AtomicBool,
) -> Result<(), String> {
    // Paced: the program spaces the frames itself and the kernel flushes every `batch` of
    // them (about 40 µs worth, at most --burst); flat out: runs of --run frames.
    let pacing = (a.rate > 0).then(|| {
        let mut p = KernelPacing::for_rate(a.rate);
        p.batch = p.batch.min(a.burst).max(1);
        p
    });
    let mut gen = Generator::load(cfg, frame, pacing).map_err(|e| e.to_string())?;
    gen.set_egress(ifindex).map_err(|e| e.to_string())?;
    let _holder = if a.hold.unwrap_or(a.netns.is_some()) {
        let h = HolderDev::create(nl)?;
        gen.hold_dispatcher(h.ifindex).map_err(|e| e.to_string())?;
        Some(h)
    } else {
        None
    };
    let egress_before = egress_xmit(&a.dev);
    let base = gen.counters().map_err(|e| e.to_string())?.frames;
    let start = Instant::now();
    let mut sent = 0u64;
    let mut runs = 0u64;
    let (run_max, batch) = match pacing {
        // a quarter of a second per call, so that --duration and signals are seen
        Some(p) => (u64::from(a.run).min((p.rate / 4).max(1)), p.batch),
        None => (u64::from(a.run), a.batch),
    };
    if pacing.is_some() {
        // the first frame due 1 ms from now
        gen.set_pace_start(sys::monotonic_ns() + 1_000_000, base)
            .map_err(|e| e.to_string())?;
    }
    while !stop.load(Ordering::Relaxed) && sent < a.count {
        let elapsed = start.elapsed();
        if elapsed >= a.duration {
            break;
        }
        let mut n = (a.count - sent).min(run_max);
        if let Some(p) = pacing {
            // never past --duration
            let left = (a.duration - elapsed).as_nanos() as u64 / p.ns_per_frame() + 1;
            n = n.min(left);
        }
        match gen.run_live(frame, n as u32, batch.min(n as u32)) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => break,
            Err(e) => {
                return Err(format!(
                    "{e} (try --sender xsk, the AF_XDP transmit fallback)"
                ))
            }
        }
        runs += 1;
        // The program's own counter is the truth (a signal can cut a run short).
        sent = gen.counters().map_err(|e| e.to_string())?.frames - base;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let c = gen.counters().map_err(|e| e.to_string())?;
    let sent = c.frames - base;
    // Give the receiving softirq a moment to drain the ring before reading the counters.
    std::thread::sleep(Duration::from_millis(20));
    let egress = match (egress_before, egress_xmit(&a.dev)) {
        (Some((x0, e0)), Some((x1, e1))) => {
            format!("egress_xmit={} egress_drops={}", x1 - x0, e1 - e0)
        }
        _ => "egress_xmit=unknown egress_drops=unknown".to_string(),
    };
    println!(
        "xlb-gen done sender=live mode={} size={} flows={} sent={} no_egress={} {egress} runs={} \
         burst={} elapsed_s={:.3} pps={:.0} gbps={:.3}",
        a.mode,
        a.size,
        cfg.flows.count,
        sent,
        c.no_egress,
        runs,
        batch,
        elapsed,
        sent as f64 / elapsed,
        sent as f64 * a.size as f64 * 8.0 / elapsed / 1e9,
    );
    Ok(())
}

/// The fallback sender: AF_XDP transmit on queue 0 of the egress interface, one worker
/// (copy mode on veth), with xlb's XDP program attached so the socket can be bound (it
/// passes everything the interface receives to the kernel: no owned addresses, not
/// backend side).
fn run_xsk(
    a: &Args,
    ifindex: u32,
    frame: Vec<u8>,
    cfg: GenConfig,
    stop: &AtomicBool,
) -> Result<(), String> {
    let mut xdp = XdpProgram::load().map_err(|e| e.to_string())?;
    xdp.attach(ifindex, ModeRequest::Auto, false)
        .map_err(|e| e.to_string())?;
    let wc = WorkerConfig {
        interfaces: vec![a.dev.clone()],
        queues: vec![0],
        poll: PollMode::Wakeup {
            timeout: Duration::from_millis(1),
        },
        ..WorkerConfig::default()
    };
    let worker = Worker::open(&wc, &xdp).map_err(|e| e.to_string())?;
    let sender = XskSender::new(frame, cfg, a.count, a.rate);
    let progress = sender.progress();
    let worker_stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let handle = spawn(0, worker, sender, Arc::clone(&worker_stop), a.core)
        .map_err(|e| format!("spawning the sender: {e}"))?;
    while !stop.load(Ordering::Relaxed)
        && !progress.done.load(Ordering::Relaxed)
        && start.elapsed() < a.duration
        && !handle.is_finished()
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    // Let the worker kick out what is still in its TX ring.
    std::thread::sleep(Duration::from_millis(20));
    worker_stop.store(true, Ordering::Relaxed);
    let exit = handle
        .join()
        .map_err(|_| "the sender thread panicked".to_string())?;
    exit.result.map_err(|e| e.to_string())?;
    let elapsed = start.elapsed().as_secs_f64() - 0.020;
    let port = exit
        .worker
        .stats()
        .ports()
        .first()
        .copied()
        .unwrap_or_default();
    let sent = port.tx_packets;
    println!(
        "xlb-gen done sender=xsk mode={} size={} flows={} sent={sent} emitted={} \
         tx_ring_full={} no_frame={} kicks={} elapsed_s={elapsed:.3} pps={:.0} gbps={:.3}",
        a.mode,
        a.size,
        cfg.flows.count,
        progress.emitted.load(Ordering::Relaxed),
        port.tx_ring_full,
        port.no_frame,
        port.kicks,
        sent as f64 / elapsed,
        sent as f64 * a.size as f64 * 8.0 / elapsed / 1e9,
    );
    Ok(())
}

fn main() -> ExitCode {
    xlb_bench::cli::tool_main("xlb-gen", USAGE, parse_args, |a| run(&a))
}
