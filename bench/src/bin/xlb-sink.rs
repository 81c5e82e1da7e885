//! `xlb-sink`: counts, checks and drops or answers what arrives on an interface, with
//! latency samples.
//!
//! Attaches `sink.bpf.c` to `--dev`, prints a `ready` line, then polls the counters every
//! 20 ms and the latency ring buffer, until `--duration`, SIGINT/SIGTERM, `--expect N`
//! packets, or `--idle-ms` without a new packet after the first one. Prints per-CPU lines
//! and one `done` line: every counter (good frames, each reason a frame was bad, what was
//! answered), the receive rate over the time frames were arriving, and latency
//! p50/p99/p99.9/max in ns when sampling (`--sample N`).
//!
//! `--check-dst IP[:UDP,TCP]` (the backend side) or `--check-src ...` (the client side) name
//! the address and ports each frame must carry there; with a check, the rate counts only
//! good frames. `--reflect` answers them (see sink.bpf.c). Checked addresses must lie in
//! the benchmarking ranges (198.18.0.0/15, 2001:db8::/32).

use std::{
    cell::RefCell,
    process::ExitCode,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use libbpf_rs::RingBufferBuilder;
use std::net::IpAddr;

use xlb_afxdp::{netlink::Netlink, sys, ModeRequest};
use xlb_bench::{
    is_bench_ip,
    sink::{Check, Sample, Sink, SinkConfig},
};

const USAGE: &str = "usage: xlb-sink --dev IFACE [options]
  --netns NAME          enter /run/netns/NAME first
  --dev IFACE           interface to count on (must have no XDP program yet)
  --xdp-mode auto|native|generic  (default auto)
  --sample N            one latency sample per N marked frames (default 0: none)
  --duration SECS       stop after SECS (default 10, max 600)
  --expect N            stop once N packets arrived
  --idle-ms MS          stop MS after the last packet (once one arrived)
  --stats-ms MS         print a stats line every MS
  --check-dst IP[:U,T]  every UDP/TCP frame must go to IP (and UDP port U, TCP port T):
                        the backend side, after the NAT; checksums are verified too
  --check-src IP[:U,T]  every UDP/TCP frame must come from IP (ports U, T): the client side
  --reflect             answer good frames: UDP echoed, SYN -> SYN-ACK, TCP data echoed
                        as an ACK of it, back out of --dev";

const POLL: Duration = Duration::from_millis(20);

#[derive(Debug)]
struct Args {
    netns: Option<String>,
    dev: String,
    mode: ModeRequest,
    sample: u32,
    duration: Duration,
    expect: Option<u64>,
    idle: Option<Duration>,
    stats: Option<Duration>,
    check: Check,
    reflect: bool,
}

/// `IP` or `IP:UDP,TCP`.
fn parse_check(flag: &str, v: &str) -> Result<(IpAddr, u16, u16), String> {
    let (ip, ports) = match v.rsplit_once(':') {
        Some((ip, ports)) if ports.contains(',') => (ip, Some(ports)),
        _ => (v, None),
    };
    let ip = ip.trim_start_matches('[').trim_end_matches(']');
    let addr: IpAddr = ip
        .parse()
        .map_err(|_| format!("{flag}: not an address: {ip}"))?;
    if !is_bench_ip(addr) {
        return Err(format!(
            "{flag}: {addr} is outside 198.18.0.0/15 and 2001:db8::/32 (test hosts only)"
        ));
    }
    let (udp, tcp) = match ports {
        None => (0, 0),
        Some(p) => {
            let (u, t) = p.split_once(',').unwrap_or((p, "0"));
            let port = |x: &str| {
                x.parse::<u16>()
                    .map_err(|_| format!("{flag}: not a port: {x}"))
            };
            (port(u)?, port(t)?)
        }
    };
    Ok((addr, udp, tcp))
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        netns: None,
        dev: String::new(),
        mode: ModeRequest::Auto,
        sample: 0,
        duration: Duration::from_secs(10),
        expect: None,
        idle: None,
        stats: None,
        check: Check::None,
        reflect: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Err(String::new());
        }
        if flag == "--reflect" {
            a.reflect = true;
            continue;
        }
        let val = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("{flag}: not a number: {v}"))
        };
        match flag.as_str() {
            "--netns" => a.netns = Some(val),
            "--dev" => a.dev = val,
            "--xdp-mode" => {
                a.mode = match val.as_str() {
                    "auto" => ModeRequest::Auto,
                    "native" => ModeRequest::Native,
                    "generic" => ModeRequest::Generic,
                    _ => return Err(format!("--xdp-mode {val}: auto, native or generic")),
                }
            }
            "--sample" => a.sample = u32::try_from(num(&val)?).map_err(|_| "--sample too large")?,
            "--duration" => {
                let s = num(&val)?;
                if s == 0 || s > 600 {
                    return Err("--duration: 1..600 seconds".into());
                }
                a.duration = Duration::from_secs(s);
            }
            "--expect" => a.expect = Some(num(&val)?),
            "--idle-ms" => a.idle = Some(Duration::from_millis(num(&val)?)),
            "--stats-ms" => a.stats = Some(Duration::from_millis(num(&val)?.max(1))),
            "--check-dst" => {
                let (addr, udp_port, tcp_port) = parse_check(&flag, &val)?;
                a.check = Check::Dst {
                    addr,
                    udp_port,
                    tcp_port,
                };
            }
            "--check-src" => {
                let (addr, udp_port, tcp_port) = parse_check(&flag, &val)?;
                a.check = Check::Src {
                    addr,
                    udp_port,
                    tcp_port,
                };
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if a.dev.is_empty() {
        return Err("--dev is required".into());
    }
    Ok(a)
}

fn run(a: &Args) -> Result<(), String> {
    if let Some(ns) = &a.netns {
        sys::enter_netns(sys::named_netns(ns)).map_err(|e| format!("entering netns {ns}: {e}"))?;
    }
    let stop = sys::stop_flag_on_signals().map_err(|e| format!("signal handlers: {e}"))?;
    let link = Netlink::open()
        .and_then(|mut nl| nl.link_by_name(&a.dev))
        .map_err(|e| format!("interface {}: {e}", a.dev))?;
    let mut sink = Sink::load(&SinkConfig {
        sample_every: a.sample,
        reflect: a.reflect,
        check: a.check,
    })
    .map_err(|e| e.to_string())?;
    let mode = sink
        .attach(link.ifindex, a.mode)
        .map_err(|e| e.to_string())?;

    // Nanoseconds, 1 ns .. 100 s, 3 significant digits.
    let hist = RefCell::new(
        Histogram::<u64>::new_with_bounds(1, 100_000_000_000, 3)
            .map_err(|e| format!("histogram: {e}"))?,
    );
    let mut rb = RingBufferBuilder::new();
    rb.add(sink.samples_map(), |data: &[u8]| {
        if let Some(s) = Sample::parse(data) {
            hist.borrow_mut().saturating_record(s.latency_ns().max(1));
        }
        0
    })
    .map_err(|e| format!("ring buffer: {e}"))?;
    let rb = rb.build().map_err(|e| format!("ring buffer: {e}"))?;

    let check = match a.check {
        Check::None => "none".to_string(),
        Check::Dst {
            addr,
            udp_port,
            tcp_port,
        } => format!("dst:{addr}:{udp_port},{tcp_port}"),
        Check::Src {
            addr,
            udp_port,
            tcp_port,
        } => format!("src:{addr}:{udp_port},{tcp_port}"),
    };
    println!(
        "xlb-sink ready dev={} ifindex={} mode={mode:?} sample={} check={check} reflect={}",
        a.dev, link.ifindex, a.sample, a.reflect
    );
    let start = Instant::now();
    let mut first: Option<Instant> = None;
    let mut last_change = start;
    let mut last_packets = 0u64;
    // The rate window follows the frames that count (good ones with a check, else marked
    // ones) when there are any: the namespaces' own stray frames (router solicitations)
    // would stretch it.
    let checking = a.check != Check::None;
    let counts = |t: &xlb_bench::sink::SinkStats| if checking { t.good } else { t.marked };
    let mut marked_window: Option<(Instant, Instant)> = None;
    let mut last_marked = 0u64;
    let mut last_stats = start;
    let mut stats_packets = 0u64;
    loop {
        // Waits up to POLL for samples (or returns at once with them).
        rb.poll(POLL)
            .map_err(|e| format!("ring buffer poll: {e}"))?;
        let now = Instant::now();
        let t = sink.total().map_err(|e| e.to_string())?;
        if t.packets != last_packets {
            if first.is_none() {
                first = Some(now);
            }
            last_change = now;
            last_packets = t.packets;
        }
        if counts(&t) != last_marked {
            marked_window = Some((marked_window.map_or(now, |w| w.0), now));
            last_marked = counts(&t);
        }
        if let Some(every) = a.stats {
            if now - last_stats >= every {
                let dt = (now - last_stats).as_secs_f64();
                println!(
                    "xlb-sink stats packets={} marked={} good={} bad={} reflected={} pps={:.0}",
                    t.packets,
                    t.marked,
                    t.good,
                    t.bad(),
                    t.reflected,
                    (t.packets - stats_packets) as f64 / dt
                );
                last_stats = now;
                stats_packets = t.packets;
            }
        }
        if stop.load(Ordering::Relaxed)
            || now - start >= a.duration
            || a.expect.is_some_and(|n| t.packets >= n)
            || a.idle
                .is_some_and(|idle| first.is_some() && now - last_change >= idle)
        {
            break;
        }
    }
    // Whatever is still in the ring buffer.
    rb.consume().map_err(|e| format!("ring buffer: {e}"))?;
    let per_cpu = sink.per_cpu().map_err(|e| e.to_string())?;
    for (cpu, s) in per_cpu.iter().enumerate().filter(|(_, s)| s.packets > 0) {
        println!(
            "xlb-sink cpu={cpu} packets={} bytes={} marked={} good={} bad={} reflected={}",
            s.packets,
            s.bytes,
            s.marked,
            s.good,
            s.bad(),
            s.reflected
        );
    }
    let t = sink.total().map_err(|e| e.to_string())?;
    // The receive rate over the time frames were arriving (20 ms resolution).
    let window = marked_window
        .or(first.map(|f| (f, last_change)))
        .map(|(f, l)| (l - f).as_secs_f64() + POLL.as_secs_f64())
        .unwrap_or(0.0);
    let counted = if marked_window.is_some() {
        counts(&t)
    } else {
        t.packets
    };
    let pps = if window > 0.0 {
        counted as f64 / window
    } else {
        0.0
    };
    let (run_ns, runs) = sink.run_stats().unwrap_or_default();
    let h = hist.borrow();
    let q = |p: f64| {
        if h.is_empty() {
            0
        } else {
            h.value_at_quantile(p)
        }
    };
    println!(
        "xlb-sink done {} active_s={window:.3} pps={pps:.0} xdp_run_ns={run_ns} xdp_runs={runs} \
         lat_samples={} lat_p50_ns={} lat_p99_ns={} lat_p999_ns={} lat_max_ns={}",
        t.fields(),
        h.len(),
        q(0.5),
        q(0.99),
        q(0.999),
        if h.is_empty() { 0 } else { h.max() },
    );
    Ok(())
}

fn main() -> ExitCode {
    xlb_bench::cli::tool_main("xlb-sink", USAGE, parse_args, |a| run(&a))
}
