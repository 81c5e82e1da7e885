//! `xlb-afxdp-fwd`: the bare AF_XDP forwarder between two interfaces.
//!
//! Every non-local IPv4/IPv6 packet arriving on either interface is redirected by the XDP
//! program to the workers, which rewrite the MACs from the kernel's neighbour table,
//! complete the TCP/UDP checksum and send it out of the other interface. ARP, ND and
//! traffic to the host's own addresses stay with the kernel.
//!
//! Prints one `ready` line once the sockets are in place and a `done` line with counters
//! when it stops (SIGINT/SIGTERM or `--duration`).

use std::{
    io::Write,
    process::ExitCode,
    sync::{atomic::AtomicBool, atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use xlb_afxdp::{
    netlink::Netlink, spawn, sys, BindMode, ModeRequest, PollMode, PortStats, UmemSharing, Worker,
    WorkerConfig, XdpProgram,
};
use xlb_bench::bare::{BareForwarder, BarePort, KernelTables};

const USAGE: &str = "usage: xlb-afxdp-fwd --if0 IFACE --if1 IFACE [options]
  --netns NAME          enter /run/netns/NAME first
  --queues 0,1          queues to serve on both interfaces (default 0)
  --workers N           workers; queue q goes to worker q % N (default 1)
  --cores 1,2           pin worker i to cores[i % len]
  --poll busy|wakeup    (default wakeup)
  --wakeup-ms MS        longest sleep in wakeup mode (default 10)
  --bind auto|copy|zc   (default auto)
  --umem shared|per-socket  (default shared)
  --xdp-mode auto|native|generic  (default auto)
  --ring N --frame N --batch N    ring size (1024), frame size (2048), batch (64)
  --refresh-ms MS       re-read neighbours and routes (default 1000, 0 = never)
  --tx-budget N         copy mode: frames per sendto() (XDP_MAX_TX_SKB_BUDGET, Linux >= 6.17;
                        default 0: the TX ring's size; 32: the kernel's default)
  --duration SECS       stop by itself after SECS
  --stats-ms MS         print counters every MS";

#[derive(Debug)]
struct Args {
    if0: String,
    if1: String,
    netns: Option<String>,
    queues: Vec<u32>,
    workers: usize,
    cores: Vec<usize>,
    poll: PollMode,
    bind: BindMode,
    umem: UmemSharing,
    xdp_mode: ModeRequest,
    ring: u32,
    frame: u32,
    batch: u32,
    refresh_ms: u64,
    tx_budget: u32,
    duration: Option<Duration>,
    stats_ms: Option<u64>,
}

fn list<T: std::str::FromStr>(s: &str) -> Result<Vec<T>, String> {
    s.split(',')
        .map(|x| x.trim().parse().map_err(|_| format!("bad list item {x:?}")))
        .collect()
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        if0: String::new(),
        if1: String::new(),
        netns: None,
        queues: vec![0],
        workers: 1,
        cores: Vec::new(),
        poll: PollMode::Wakeup {
            timeout: Duration::from_millis(10),
        },
        bind: BindMode::Auto,
        umem: UmemSharing::PerWorker,
        xdp_mode: ModeRequest::Auto,
        ring: 1024,
        frame: 2048,
        batch: 64,
        refresh_ms: 1000,
        tx_budget: 0,
        duration: None,
        stats_ms: None,
    };
    let mut wakeup_ms = 10u64;
    let mut busy = false;
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
        match flag.as_str() {
            "--if0" => a.if0 = val,
            "--if1" => a.if1 = val,
            "--netns" => a.netns = Some(val),
            "--queues" => a.queues = list(&val)?,
            "--workers" => a.workers = num(&val)? as usize,
            "--cores" => a.cores = list(&val)?,
            "--poll" => {
                busy = match val.as_str() {
                    "busy" => true,
                    "wakeup" => false,
                    _ => return Err(format!("--poll {val}: busy or wakeup")),
                }
            }
            "--wakeup-ms" => wakeup_ms = num(&val)?,
            "--bind" => {
                a.bind = match val.as_str() {
                    "auto" => BindMode::Auto,
                    "copy" => BindMode::Copy,
                    "zc" => BindMode::ZeroCopy,
                    _ => return Err(format!("--bind {val}: auto, copy or zc")),
                }
            }
            "--umem" => {
                a.umem = match val.as_str() {
                    "shared" => UmemSharing::PerWorker,
                    "per-socket" => UmemSharing::PerSocket,
                    _ => return Err(format!("--umem {val}: shared or per-socket")),
                }
            }
            "--xdp-mode" => {
                a.xdp_mode = match val.as_str() {
                    "auto" => ModeRequest::Auto,
                    "native" => ModeRequest::Native,
                    "generic" => ModeRequest::Generic,
                    _ => return Err(format!("--xdp-mode {val}: auto, native or generic")),
                }
            }
            "--ring" => a.ring = num(&val)? as u32,
            "--frame" => a.frame = num(&val)? as u32,
            "--batch" => a.batch = num(&val)? as u32,
            "--refresh-ms" => a.refresh_ms = num(&val)?,
            "--tx-budget" => {
                a.tx_budget = u32::try_from(num(&val)?).map_err(|_| "--tx-budget too large")?
            }
            "--duration" => {
                a.duration = Some(Duration::from_secs_f64(
                    val.parse::<f64>()
                        .map_err(|_| format!("--duration {val}"))?,
                ))
            }
            "--stats-ms" => a.stats_ms = Some(num(&val)?),
            other => return Err(format!("unknown option {other}")),
        }
    }
    if a.if0.is_empty() || a.if1.is_empty() {
        return Err("--if0 and --if1 are required".into());
    }
    if a.workers == 0 || a.workers > a.queues.len() {
        return Err(format!(
            "--workers {} must be in 1..={} (one queue at least each)",
            a.workers,
            a.queues.len()
        ));
    }
    if !busy {
        a.poll = PollMode::Wakeup {
            timeout: Duration::from_millis(wakeup_ms.max(1)),
        };
    } else {
        a.poll = PollMode::Busy;
    }
    Ok(a)
}

fn fmt_port(p: &PortStats) -> String {
    format!(
        "rx={} rx_bytes={} tx={} tx_bytes={} dropped={} tx_ring_full={} no_frame={} \
         bad_verdict={} kicks={} kick_errors={}",
        p.rx_packets,
        p.rx_bytes,
        p.tx_packets,
        p.tx_bytes,
        p.dropped,
        p.tx_ring_full,
        p.no_frame,
        p.bad_verdict,
        p.kicks,
        p.kick_errors
    )
}

fn run(args: Args) -> Result<(), String> {
    if let Some(ns) = &args.netns {
        sys::enter_netns(sys::named_netns(ns)).map_err(|e| format!("entering netns {ns}: {e}"))?;
    }
    let mut nl = Netlink::open().map_err(|e| format!("netlink: {e}"))?;
    let mut ports = Vec::new();
    for name in [&args.if0, &args.if1] {
        let l = nl.link_by_name(name).map_err(|e| format!("{name}: {e}"))?;
        let mac = l
            .mac
            .ok_or_else(|| format!("{name} has no Ethernet address"))?;
        ports.push(BarePort {
            ifindex: l.ifindex,
            mac,
        });
    }
    let ports = [ports[0], ports[1]];

    let mut xdp = XdpProgram::load().map_err(|e| e.to_string())?;
    let locals = xdp
        .add_local_addrs_from_kernel()
        .map_err(|e| e.to_string())?;
    let mut modes = Vec::new();
    for p in &ports {
        // Both sides are "backend side": a bare forwarder takes every non-local packet.
        let m = xdp
            .attach(p.ifindex, args.xdp_mode, true)
            .map_err(|e| e.to_string())?;
        modes.push(format!("{m:?}").to_lowercase());
    }
    let tables = KernelTables::read(&mut nl).map_err(|e| format!("reading kernel tables: {e}"))?;

    let stop = Arc::new(AtomicBool::new(false));
    let signalled = sys::stop_flag_on_signals().map_err(|e| format!("signals: {e}"))?;
    let mut handles = Vec::new();
    let mut zero_copy = Vec::new();
    let mut tx_budget = Vec::new();
    let mut all_stats = Vec::new();
    for w in 0..args.workers {
        let queues: Vec<u32> = args
            .queues
            .iter()
            .copied()
            .enumerate()
            .filter(|(i, _)| i % args.workers == w)
            .map(|(_, q)| q)
            .collect();
        let cfg = WorkerConfig {
            interfaces: vec![args.if0.clone(), args.if1.clone()],
            queues,
            bind: args.bind,
            poll: args.poll,
            sharing: args.umem,
            ring_size: args.ring,
            frame_size: args.frame,
            batch: args.batch,
            memlock_share: args.workers as u32,
            copy_tx_budget: args.tx_budget,
            ..WorkerConfig::default()
        };
        let worker = Worker::open(&cfg, &xdp).map_err(|e| format!("worker {w}: {e}"))?;
        zero_copy.extend(worker.sockets().iter().map(|s| s.zero_copy));
        tx_budget.extend(worker.sockets().iter().map(|s| s.tx_budget));
        all_stats.push(worker.stats());
        let refresh = (args.refresh_ms > 0)
            .then(Netlink::open)
            .transpose()
            .map_err(|e| format!("netlink: {e}"))?;
        let handler = BareForwarder::new(
            ports,
            tables.clone(),
            refresh,
            args.refresh_ms.max(1) * 1_000_000,
        );
        let core = (!args.cores.is_empty()).then(|| args.cores[w % args.cores.len()]);
        handles.push(
            spawn(w, worker, handler, Arc::clone(&stop), core)
                .map_err(|e| format!("spawning worker {w}: {e}"))?,
        );
    }
    println!(
        "xlb-afxdp-fwd ready if0={} if1={} xdp={} workers={} queues={:?} zero_copy={} \
         tx_budget={} local_addrs={locals}",
        args.if0,
        args.if1,
        modes.join(","),
        args.workers,
        args.queues,
        zero_copy.iter().any(|z| *z),
        tx_budget.iter().min().copied().unwrap_or(0),
    );
    let _ = std::io::stdout().flush();

    let started = Instant::now();
    let mut last_stats = Instant::now();
    while !signalled.load(Ordering::Relaxed) {
        if args.duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
        if handles.iter().any(|h| h.is_finished()) {
            break; // a worker died: stop the rest
        }
        if let Some(ms) = args.stats_ms {
            if last_stats.elapsed() >= Duration::from_millis(ms) {
                last_stats = Instant::now();
                for (i, st) in all_stats.iter().enumerate() {
                    for (p, s) in st.ports().iter().enumerate() {
                        println!("stats worker={i} port={p} {}", fmt_port(s));
                    }
                }
                let _ = std::io::stdout().flush();
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);

    let mut failed = None;
    let mut total = [PortStats::default(); 2];
    for (w, h) in handles.into_iter().enumerate() {
        let exit = h.join().map_err(|_| format!("worker {w} panicked"))?;
        if let Err(e) = &exit.result {
            failed = Some(format!("worker {w}: {e}"));
        }
        for (p, s) in exit.worker.stats().ports().iter().enumerate() {
            total[p] = total[p] + *s;
        }
        let b = exit.handler.stats();
        println!(
            "worker={w} forwarded={} no_neighbour={} not_ip={} checksums_filled={} \
             refreshes={} loops={} sleeps={}",
            b.forwarded,
            b.no_neighbour,
            b.not_ip,
            b.checksums_filled,
            b.refreshes,
            exit.worker.stats().loops(),
            exit.worker.stats().sleeps()
        );
        for (s, k) in exit.worker.sockets().iter().zip(exit.worker.kernel_stats()) {
            if let Ok(k) = k {
                println!(
                    "worker={w} socket port={} queue={} zero_copy={} rx_dropped={} \
                     rx_ring_full={} fill_empty={} tx_invalid={}",
                    s.port,
                    s.queue,
                    s.zero_copy,
                    k.rx_dropped,
                    k.rx_ring_full,
                    k.rx_fill_ring_empty_descs,
                    k.tx_invalid_descs
                );
            }
        }
    }
    for (p, s) in total.iter().enumerate() {
        println!("port={p} {}", fmt_port(s));
    }
    if let Ok(c) = xdp.counters() {
        println!(
            "xdp redirected={} passed={} no_xsk={}",
            c.redirected, c.passed, c.no_xsk
        );
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "xlb-afxdp-fwd done seconds={elapsed:.3} forwarded_pps={:.0}",
        (total[0].tx_packets + total[1].tx_packets) as f64 / elapsed.max(1e-9)
    );
    // Dropping the program closes its links: detached from both interfaces.
    drop(xdp);
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn main() -> ExitCode {
    xlb_bench::cli::tool_main("xlb-afxdp-fwd", USAGE, parse_args, run)
}
