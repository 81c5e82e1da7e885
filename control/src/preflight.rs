//! What is checked before anything is attached: the command's interfaces and workers, the
//! privileges, the queues, which interfaces face the members, and the self-probe's sources.
//! Every refusal says what to do.

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    time::Instant,
};

use xlb_engine::{Config, Route};

use crate::{
    kernel::{self, Port},
    options::{Failure, Options},
    selfprobe::SelfProber,
};

/// The interfaces and workers of the command line.
pub fn command(opts: &Options) -> Result<(), Failure> {
    if opts.interfaces.is_empty() {
        return Err(Failure::usage(
            "no interface: name each interface the dataplane drives with --interface NAME \
             (repeat it; the order gives the port numbers)",
        ));
    }
    let mut seen = HashSet::new();
    if let Some(dup) = opts.interfaces.iter().find(|i| !seen.insert(*i)) {
        return Err(Failure::usage(format!("--interface {dup} given twice")));
    }
    if opts.workers == 0 {
        return Err(Failure::usage("--workers must be at least 1"));
    }
    Ok(())
}

/// CAP_NET_ADMIN, CAP_NET_RAW and CAP_BPF (or CAP_SYS_ADMIN), named with the fix if missing.
pub fn privileges() -> Result<(), Failure> {
    let missing = xlb_afxdp::sys::missing_xdp_capabilities();
    if missing.is_empty() {
        return Ok(());
    }
    Err(Failure::runtime(format!(
        "{} needed to attach XDP programs and open AF_XDP sockets; run it as root \
         (sudo xlbd ...) or grant them: setcap cap_net_admin,cap_net_raw,cap_bpf,\
         cap_ipc_lock+ep $(command -v xlbd)",
        missing.join(", ")
    )))
}

/// Receive queues of `ifname`, from sysfs (right when xlbd was started by `ip netns exec`,
/// which mounts the namespace's sysfs).
fn rx_queues(ifname: &str) -> Option<u32> {
    let dir = std::fs::read_dir(format!("/sys/class/net/{ifname}/queues")).ok()?;
    let n = dir
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
        .count();
    u32::try_from(n).ok().filter(|n| *n > 0)
}

/// Queues served per interface: `--queues`, else the interfaces' receive queues; at least as
/// many as workers.
pub fn queues(opts: &Options, ports: &[Port]) -> Result<u32, Failure> {
    let queues = match opts.queues {
        Some(q) => q.max(1),
        None => ports
            .iter()
            .filter_map(|p| rx_queues(&p.name))
            .max()
            .unwrap_or(1),
    };
    if opts.workers > queues as usize {
        return Err(Failure::usage(format!(
            "--workers {}: more workers than queues ({queues}); a worker serves at least one \
             queue on every interface",
            opts.workers
        )));
    }
    Ok(queues)
}

/// Pool members and NAT targets, sorted, once each.
pub fn members(config: &Config) -> Vec<IpAddr> {
    let mut members: Vec<IpAddr> = config
        .backend_pools
        .iter()
        .flat_map(|p| p.members.iter().map(|m| m.address))
        .chain(config.inbound_nat_rules.iter().filter_map(|r| r.target))
        .collect();
    members.sort_unstable();
    members.dedup();
    members
}

/// Per port, whether it is backend side: `--backend-side`, else whether the kernel routes a
/// member through it. There the XDP program takes every packet not addressed to the host
/// itself (replies to clients, members' outbound connections), not only packets to
/// frontends.
pub fn backend_side(
    opts: &Options,
    ports: &[Port],
    routes: &[Route],
    members: &[IpAddr],
) -> Result<Vec<bool>, Failure> {
    if let Some(names) = &opts.backend_side {
        if let Some(n) = names.iter().find(|n| !opts.interfaces.contains(n)) {
            return Err(Failure::usage(format!(
                "--backend-side {n} is not one of the --interface names"
            )));
        }
        return Ok(ports.iter().map(|p| names.contains(&p.name)).collect());
    }
    Ok(ports
        .iter()
        .map(|p| members.iter().any(|m| kernel::routed_via(routes, *m, p.id)))
        .collect())
}

/// The data-path self-probe of the control loop: the prober, and the port (with its MAC)
/// its SYNs pretend to arrive on.
#[derive(Debug)]
pub struct SelfProbe {
    pub prober: SelfProber,
    pub ingress: xlb_afxdp::PortId,
    pub mac: [u8; 6],
}

/// Checks `--self-probe-source` and builds the prober: at most one address per family, none
/// of them an address of this host (the XDP program would hand the members' answers to the
/// kernel) or a frontend.
pub fn self_probe(
    opts: &Options,
    config: &Config,
    ports: &[Port],
    routes: &[Route],
) -> Result<Option<SelfProbe>, Failure> {
    let sources = &opts.self_probe_sources;
    if sources.is_empty() {
        return Ok(None);
    }
    for family_v4 in [true, false] {
        if sources.iter().filter(|a| a.is_ipv4() == family_v4).count() > 1 {
            return Err(Failure::usage(
                "--self-probe-source: at most one IPv4 and one IPv6 address",
            ));
        }
    }
    for a in sources {
        if config.frontends.iter().any(|f| f.address == *a) {
            return Err(Failure::usage(format!(
                "--self-probe-source {a} is a frontend address; choose an address no host has"
            )));
        }
        if std::net::UdpSocket::bind(SocketAddr::new(*a, 0)).is_ok() {
            return Err(Failure::usage(format!(
                "--self-probe-source {a} is an address of this host: members' answers to it \
                 would go to the kernel, not through the dataplane; choose an address no host \
                 has, that the members route through the appliance"
            )));
        }
    }
    // The port the SYNs pretend to arrive on: the one the source is routed through (where
    // a client with that address would be), else the first.
    let port = ports
        .iter()
        .find(|p| kernel::routed_via(routes, sources[0], p.id))
        .unwrap_or(&ports[0]);
    let scale = config.settings.lab_time_scale.max(1);
    let interval = opts.self_probe_interval / scale;
    Ok(Some(SelfProbe {
        prober: SelfProber::new(sources, interval, Instant::now()),
        ingress: port.id,
        mac: port.mac,
    }))
}
