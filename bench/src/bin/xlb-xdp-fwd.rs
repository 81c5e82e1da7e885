//! `xlb-xdp-fwd`: the kernel's native XDP_REDIRECT between two interfaces (`redirect.bpf.c`),
//! MACs rewritten and nothing else: the benchmark's ceiling, the most any forwarder could
//! carry between the two interfaces on this host.
//!
//! Prints one `ready` line once attached to both interfaces and a `done` line with its
//! counters when it stops (SIGINT/SIGTERM or `--duration`, at most 3600 s).

use std::{
    io::Write,
    process::ExitCode,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use xlb_afxdp::{netlink::Netlink, sys, ModeRequest};
use xlb_bench::redirect::{FwdPort, KernelForwarder};

const USAGE: &str = "usage: xlb-xdp-fwd --if0 IFACE --if1 IFACE --mac0 MAC --mac1 MAC [options]
  --netns NAME          enter /run/netns/NAME first
  --if0 IFACE --if1 IFACE   the two interfaces; frames from one leave by the other
  --mac0 MAC --mac1 MAC     next hop on each side: frames leaving by ifN go to macN
  --xdp-mode auto|native|generic  (default native)
  --duration SECS       stop by itself after SECS (default 600, at most 3600)";

#[derive(Debug)]
struct Args {
    netns: Option<String>,
    ifs: [String; 2],
    macs: [Option<[u8; 6]>; 2],
    mode: ModeRequest,
    duration: Duration,
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let v = s
        .split(':')
        .map(|x| u8::from_str_radix(x, 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| format!("bad MAC {s:?}"))?;
    v.try_into().map_err(|_| format!("bad MAC {s:?}"))
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        netns: None,
        ifs: [String::new(), String::new()],
        macs: [None, None],
        mode: ModeRequest::Native,
        duration: Duration::from_secs(600),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Err(String::new());
        }
        let val = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--netns" => a.netns = Some(val),
            "--if0" => a.ifs[0] = val,
            "--if1" => a.ifs[1] = val,
            "--mac0" => a.macs[0] = Some(parse_mac(&val)?),
            "--mac1" => a.macs[1] = Some(parse_mac(&val)?),
            "--xdp-mode" => {
                a.mode = match val.as_str() {
                    "auto" => ModeRequest::Auto,
                    "native" => ModeRequest::Native,
                    "generic" => ModeRequest::Generic,
                    _ => return Err(format!("--xdp-mode {val}: auto, native or generic")),
                }
            }
            "--duration" => {
                let s: u64 = val
                    .parse()
                    .map_err(|_| format!("--duration: not a number: {val}"))?;
                if s == 0 || s > 3600 {
                    return Err("--duration: 1..3600 seconds".into());
                }
                a.duration = Duration::from_secs(s);
            }
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    if a.ifs.iter().any(String::is_empty) || a.macs.iter().any(Option::is_none) {
        return Err("--if0, --if1, --mac0 and --mac1 are required".into());
    }
    Ok(a)
}

fn run(a: Args) -> Result<(), String> {
    if let Some(ns) = &a.netns {
        sys::enter_netns(sys::named_netns(ns)).map_err(|e| format!("entering netns {ns}: {e}"))?;
    }
    let stop = sys::stop_flag_on_signals().map_err(|e| format!("signal handlers: {e}"))?;
    let mut nl = Netlink::open().map_err(|e| format!("netlink: {e}"))?;
    let mut ports = Vec::new();
    for (name, next_hop) in a.ifs.iter().zip(a.macs) {
        let l = nl.link_by_name(name).map_err(|e| format!("{name}: {e}"))?;
        ports.push(FwdPort {
            ifindex: l.ifindex,
            next_hop: next_hop.unwrap_or_default(),
            own: l
                .mac
                .ok_or_else(|| format!("{name} has no Ethernet address"))?,
        });
    }
    let fwd = KernelForwarder::start([ports[0], ports[1]], a.mode).map_err(|e| e.to_string())?;
    println!(
        "xlb-xdp-fwd ready if0={} if1={} xdp={:?}",
        a.ifs[0],
        a.ifs[1],
        fwd.modes()
    );
    let _ = std::io::stdout().flush();
    let start = Instant::now();
    while !stop.load(Ordering::Relaxed) && start.elapsed() < a.duration {
        std::thread::sleep(Duration::from_millis(20));
    }
    let (redirected, passed) = fwd.counters().map_err(|e| e.to_string())?;
    let (run_ns, runs) = fwd.run_stats().unwrap_or_default();
    fwd.stop();
    println!(
        "xlb-xdp-fwd done seconds={:.3} redirected={redirected} passed={passed} \
         xdp_run_ns={run_ns} xdp_runs={runs}",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn main() -> ExitCode {
    xlb_bench::cli::tool_main("xlb-xdp-fwd", USAGE, parse_args, run)
}
