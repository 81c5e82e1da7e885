//! The data-path self-probe:
//! xlbd sends a TCP handshake through its own dataplane to every TCP load-balancing rule of
//! every frontend and reports, per rule, the share of probes answered — the "data path
//! availability" figure.
//!
//! One probe, with `--self-probe-source ADDR` (an address of the probe's own, not one of the
//! appliance's, that the members route back through the appliance like a client):
//! 1. the control thread builds a SYN `ADDR:port → VIP:frontend_port` and hands it to the
//!    worker that owns that flow ([`crate::handler::owner`]), as if it had arrived on a port;
//! 2. the worker runs it through its engine like any client SYN: rule, healthy member,
//!    translation, next hop, and transmits it on the wire to the member;
//! 3. the member's answer (SYN-ACK, or RST if nothing listens: the data path worked either
//!    way) comes back through the XDP program and the AF_XDP sockets to the owner worker, whose
//!    engine translates it back; addressed to the probe source, it is taken off the wire
//!    instead of transmitted, the probe is reported answered, and an RST (exact sequence
//!    number) is run through the engine to the member, which closes the half-open connection;
//! 4. a probe not answered within its timeout failed: a stalled or overloaded worker, a member
//!    that cannot be reached, no healthy member (`no_backend`), a lost packet.
//!
//! So a probe covers what a client's connection needs from xlb: the owner worker's loop, its
//! rule set and next hops, both AF_XDP directions and the XDP program. It does not cover the
//! NIC's receive path from a client (the SYN is injected at the worker) nor the client-side
//! transmit (the answer is consumed before it). Probe flows are ordinary flows: they count in
//! the rule's counters (`flows_created`, `syns`, `flows_closed`), one per probe.
//!
//! Every interval (default 5 s, divided by the lab time scale, at least 20 ms), one probe per
//! target, from the next source port of a range that every rule's probes share (49152–65535).
//! Availability is the share of answered probes among the last [`WINDOW`] of the target.
//! UDP rules are not probed (a member need not answer an arbitrary datagram), nor HA-ports
//! rules (no port to probe).

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::IpAddr,
    time::{Duration, Instant},
};

use xlb_afxdp::PortId;
use xlb_engine::{
    config::{Config, Protocol},
    hashkey::HashKey,
    wire::{build_tcp_segment, tcp_flags, RstSpec, MAX_RST_FRAME},
    Addr, RuleSet,
};

/// Results kept per target for the availability figure.
pub const WINDOW: usize = 100;
/// Source ports of probes.
pub const PORTS: std::ops::RangeInclusive<u16> = 49_152..=65_535;
/// Shortest interval, whatever the lab time scale.
pub const MIN_INTERVAL: Duration = Duration::from_millis(20);
/// Shortest time a probe has to be answered.
pub const MIN_TIMEOUT: Duration = Duration::from_millis(250);
/// The MAC the injected frames come from (locally administered): the engine learns it as the
/// probe source's next hop, which is never used since answers are taken off before transmit.
pub const PROBE_MAC: [u8; 6] = [0x02, 0x78, 0x6c, 0x62, 0x00, 0x01];

/// A frame for a worker to run through its engine as if received on `ingress`.
#[derive(Debug, Clone)]
pub struct Injection {
    pub ingress: PortId,
    pub frame: Vec<u8>,
}

/// One probed (frontend, rule).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Target {
    pub frontend: String,
    pub rule: String,
    pub vip: IpAddr,
    pub port: u16,
}

/// The availability of one target (`ratio()` gives the figure).
pub type Availability = xlb_api::DatapathAvailability;

/// Every TCP load-balancing rule (TCP or ALL, not HA ports) of `config`.
pub fn targets(config: &Config) -> Vec<Target> {
    let mut out: Vec<Target> = config
        .load_balancing_rules
        .iter()
        .filter(|r| r.protocol != Protocol::Udp && !r.is_ha_ports())
        .filter_map(|r| {
            let fe = config.frontends.iter().find(|f| f.name == r.frontend)?;
            Some(Target {
                frontend: fe.name.clone(),
                rule: r.name.clone(),
                vip: fe.address,
                port: r.frontend_port as u16,
            })
        })
        .collect();
    out.sort();
    out
}

#[derive(Debug, Default)]
struct Window {
    recent: VecDeque<bool>,
    answered: u64,
    failed: u64,
}

impl Window {
    fn record(&mut self, ok: bool) {
        if self.recent.len() == WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(ok);
        if ok {
            self.answered += 1;
        } else {
            self.failed += 1;
        }
    }

    #[cfg(test)]
    fn ratio(&self) -> f64 {
        if self.recent.is_empty() {
            return 1.0;
        }
        self.recent.iter().filter(|ok| **ok).count() as f64 / self.recent.len() as f64
    }
}

/// The control thread's side: schedules probes, matches answers, keeps the windows.
#[derive(Debug)]
pub struct SelfProber {
    v4: Option<Addr>,
    v6: Option<Addr>,
    interval: Duration,
    timeout: Duration,
    next_at: Instant,
    next_port: u16,
    isn: u32,
    /// (probe source, source port) → (target, sent at).
    pending: HashMap<(Addr, u16), (Target, Instant)>,
    windows: BTreeMap<Target, Window>,
    /// The workers' steering key: a probe goes to the worker that owns its flow.
    steer_key: HashKey,
}

impl SelfProber {
    /// A prober from `sources` (at most one per family) every `interval` (already scaled).
    pub fn new(sources: &[IpAddr], interval: Duration, now: Instant) -> SelfProber {
        let interval = interval.max(MIN_INTERVAL);
        SelfProber {
            v4: sources.iter().find(|a| a.is_ipv4()).map(|a| Addr::from(*a)),
            v6: sources.iter().find(|a| a.is_ipv6()).map(|a| Addr::from(*a)),
            interval,
            timeout: interval.max(MIN_TIMEOUT),
            next_at: now,
            next_port: *PORTS.start(),
            isn: 0x5e1f_0000,
            pending: HashMap::new(),
            windows: BTreeMap::new(),
            steer_key: HashKey::from_seed(0),
        }
    }

    /// The steering key the workers were given (they pick owners with it).
    pub fn set_steer_key(&mut self, key: HashKey) {
        self.steer_key = key;
    }

    /// The probe sources.
    pub fn sources(&self) -> Vec<Addr> {
        self.v4.into_iter().chain(self.v6).collect()
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// This round's probes, if one is due: (target, the worker that owns it, the frame).
    /// `port_mac` is the MAC of `ingress`, the port the frames pretend to arrive on.
    pub fn round(
        &mut self,
        now: Instant,
        config: &Config,
        rules: &RuleSet,
        workers: usize,
        ingress: PortId,
        port_mac: [u8; 6],
    ) -> Vec<(usize, Injection)> {
        self.expire(now);
        if now < self.next_at {
            return Vec::new();
        }
        // Keep the average period whatever the caller's tick, without bursts after a delay.
        self.next_at += self.interval;
        if self.next_at <= now {
            self.next_at = now + self.interval;
        }
        let targets = targets(config);
        // Targets that went away take their windows with them.
        self.windows.retain(|t, _| targets.contains(t));
        let mut out = Vec::new();
        for t in targets {
            let vip = Addr::from(t.vip);
            let Some(src) = (if t.vip.is_ipv4() { self.v4 } else { self.v6 }) else {
                continue;
            };
            let sport = self.take_port(src);
            self.isn = self.isn.wrapping_add(0x0001_0007);
            let spec = RstSpec {
                src_mac: PROBE_MAC,
                dst_mac: port_mac,
                vlan: None,
                src,
                dst: vip,
                src_port: sport,
                dst_port: t.port,
                seq: self.isn,
                ack: None,
            };
            let mut frame = vec![0u8; MAX_RST_FRAME];
            let Some(len) = build_tcp_segment(&mut frame, &spec, tcp_flags::SYN, 64_240) else {
                continue;
            };
            frame.truncate(len);
            let Some(w) = xlb_engine::engine::owner(rules, &frame, workers as u16, &self.steer_key)
                .map(usize::from)
            else {
                continue;
            };
            self.windows.entry(t.clone()).or_default();
            self.pending.insert((src, sport), (t, now));
            out.push((w, Injection { ingress, frame }));
        }
        out
    }

    fn take_port(&mut self, src: Addr) -> u16 {
        // Skip ports of probes still pending (a wrap-around within one timeout).
        for _ in 0..PORTS.len() {
            let p = self.next_port;
            self.next_port = if p == *PORTS.end() {
                *PORTS.start()
            } else {
                p + 1
            };
            if !self.pending.contains_key(&(src, p)) {
                return p;
            }
        }
        self.next_port
    }

    /// A worker's answer for the probe from `src`:`port` (`ok`: the member answered; not ok:
    /// the engine dropped the SYN). Late or repeated answers are ignored.
    pub fn answered(&mut self, src: Addr, port: u16, ok: bool) {
        if let Some((t, _)) = self.pending.remove(&(src, port)) {
            self.windows.entry(t).or_default().record(ok);
        }
    }

    /// Probes older than the timeout failed.
    pub fn expire(&mut self, now: Instant) {
        let timeout = self.timeout;
        let mut failed = Vec::new();
        self.pending.retain(|_, (t, sent)| {
            let alive = now.duration_since(*sent) < timeout;
            if !alive {
                failed.push(t.clone());
            }
            alive
        });
        for t in failed {
            self.windows.entry(t).or_default().record(false);
        }
    }

    /// Whether the data path works now, as a cluster node's fitness reads it: every probed
    /// rule has had a result, and its two latest probes did not both fail (one lost frame
    /// does not withdraw a node). `Err` says which rule fails.
    pub fn passing(&self) -> Result<(), String> {
        for (t, w) in &self.windows {
            let mut latest = w.recent.iter().rev();
            match (latest.next(), latest.next()) {
                (None, _) => return Err(format!("no result yet for rule {}", t.rule)),
                (Some(false), None | Some(false)) => {
                    return Err(format!("rule {} is not answered", t.rule))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Availability per target, in target order.
    pub fn report(&self) -> Vec<Availability> {
        self.windows
            .iter()
            .map(|(t, w)| Availability {
                frontend: t.frontend.clone(),
                rule: t.rule.clone(),
                window: w.recent.len() as u32,
                window_answered: w.recent.iter().filter(|ok| **ok).count() as u32,
                answered_total: w.answered,
                failed_total: w.failed,
            })
            .collect()
    }
}

/// The worker's side: whether a frame the engine is about to transmit is the answer to a
/// self-probe (addressed to a probe source), read from the fixed offsets of an untagged frame
/// (answers to probes carry no VLAN tag: the engine learned the probe's next hop without one).
#[inline]
pub fn is_probe_answer(sources: &[Addr], frame: &[u8]) -> bool {
    if sources.is_empty() || frame.len() < 14 {
        return false;
    }
    let dst = match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0800 => frame
            .get(30..34)
            .map(|b| Addr::from_v4_bytes([b[0], b[1], b[2], b[3]])),
        0x86dd => frame.get(38..54).map(|b| {
            let mut a = [0u8; 16];
            a.copy_from_slice(b);
            Addr::from_v6_bytes(a)
        }),
        _ => None,
    };
    dst.is_some_and(|d| sources.contains(&d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use xlb_engine::{compile, wire, MemberHealth};

    const CONFIG: &str = r#"
        [settings]
        lab_time_scale = 1
        [[frontends]]
        name = "vip"
        address = "198.18.0.100"
        kind = "public"
        [[frontends]]
        name = "vip6"
        address = "2001:db8::100"
        kind = "public"
        [[frontends]]
        name = "ilb"
        address = "198.18.1.200"
        kind = "internal"
        [[backend_pools]]
        name = "web"
        members = [{ address = "198.18.1.11" }]
        [[backend_pools]]
        name = "web6"
        members = [{ address = "2001:db8:1::11" }]
        [[load_balancing_rules]]
        name = "web"
        frontend = "vip"
        protocol = "TCP"
        frontend_port = 80
        backend_pool = "web"
        backend_port = 8080
        [[load_balancing_rules]]
        name = "both"
        frontend = "vip"
        protocol = "ALL"
        frontend_port = 443
        backend_pool = "web"
        backend_port = 8443
        [[load_balancing_rules]]
        name = "dns"
        frontend = "vip"
        protocol = "UDP"
        frontend_port = 53
        backend_pool = "web"
        backend_port = 53
        [[load_balancing_rules]]
        name = "ha"
        frontend = "ilb"
        protocol = "ALL"
        frontend_port = 0
        backend_pool = "web"
        backend_port = 0
        [[load_balancing_rules]]
        name = "web6"
        frontend = "vip6"
        protocol = "TCP"
        frontend_port = 80
        backend_pool = "web6"
        backend_port = 8080
    "#;

    fn setup() -> (Config, RuleSet) {
        let c = Config::from_toml_str(CONFIG).unwrap();
        let rs = compile(&c, None, &MemberHealth::all_healthy(), 1).unwrap();
        (c, rs)
    }

    #[test]
    fn targets_are_tcp_rules_with_a_port() {
        let (c, _) = setup();
        let t: Vec<(String, u16)> = targets(&c).into_iter().map(|t| (t.rule, t.port)).collect();
        assert_eq!(
            t,
            [
                ("both".to_string(), 443),
                ("web".to_string(), 80),
                ("web6".to_string(), 80)
            ]
        );
    }

    #[test]
    fn a_round_builds_valid_syns_from_the_source_for_each_family_it_has() {
        let (c, rs) = setup();
        let src: IpAddr = "198.18.0.250".parse().unwrap();
        let t0 = Instant::now();
        let mut p = SelfProber::new(&[src], Duration::from_secs(5), t0);
        let key = HashKey::from_seed(0xfeed);
        p.set_steer_key(key);
        let round = p.round(t0, &c, &rs, 2, 0, [2, 0, 0, 0, 0, 9]);
        assert_eq!(round.len(), 2, "IPv4 rules only: no IPv6 source");
        let mut ports = Vec::new();
        for (w, inj) in &round {
            let pkt = wire::parse(&inj.frame).unwrap();
            assert_eq!(pkt.tcp_flags, tcp_flags::SYN);
            assert_eq!(
                (pkt.src, pkt.dst),
                (Addr::from(src), Addr::from_v4_bytes([198, 18, 0, 100]))
            );
            assert!([80, 443].contains(&pkt.dst_port));
            assert!(PORTS.contains(&pkt.src_port));
            assert_eq!(
                Some(*w),
                xlb_engine::engine::owner(&rs, &inj.frame, 2, &key).map(usize::from)
            );
            assert_eq!(&inj.frame[0..6], &[2, 0, 0, 0, 0, 9]);
            let seg = &inj.frame[usize::from(pkt.l4_off)..usize::from(pkt.ip_end)];
            assert_eq!(
                wire::checksum::verify_sum(pkt.src, pkt.dst, false, pkt.proto, seg),
                0xffff
            );
            ports.push(pkt.src_port);
        }
        assert_ne!(ports[0], ports[1]);
        assert!(
            p.round(t0 + Duration::from_secs(1), &c, &rs, 2, 0, [0; 6])
                .is_empty(),
            "not due yet"
        );
        let both = SelfProber::new(&[src, "2001:db8::250".parse().unwrap()], Duration::ZERO, t0)
            .round(t0, &c, &rs, 1, 0, [0; 6]);
        assert_eq!(both.len(), 3);
    }

    #[test]
    fn availability_is_the_answered_share_of_the_window() {
        let (c, rs) = setup();
        let src: IpAddr = "198.18.0.250".parse().unwrap();
        let t0 = Instant::now();
        let interval = Duration::from_secs(1);
        let mut p = SelfProber::new(&[src], interval, t0);
        let source = Addr::from(src);
        let mut now = t0;
        for i in 0..10 {
            for (_, inj) in p.round(now, &c, &rs, 1, 0, [0; 6]) {
                let pkt = wire::parse(&inj.frame).unwrap();
                // Rule `web` (port 80) answers every probe; `both` (443) every other one.
                if pkt.dst_port == 80 || i % 2 == 0 {
                    p.answered(source, pkt.src_port, true);
                }
            }
            now += interval;
        }
        p.expire(now + Duration::from_secs(2));
        let r = p.report();
        let web = r.iter().find(|a| a.rule == "web").unwrap();
        assert_eq!((web.ratio(), web.window, web.answered_total), (1.0, 10, 10));
        let both = r.iter().find(|a| a.rule == "both").unwrap();
        assert_eq!((both.ratio(), both.failed_total), (0.5, 5));
        // A late answer does not count twice.
        p.answered(source, PORTS.start() + 1, true);
        assert_eq!(p.report(), r);
    }

    #[test]
    fn passing_needs_a_result_and_not_two_failures_in_a_row() {
        let (c, rs) = setup();
        let src: IpAddr = "198.18.0.250".parse().unwrap();
        let t0 = Instant::now();
        let interval = Duration::from_secs(1);
        let mut p = SelfProber::new(&[src], interval, t0);
        let source = Addr::from(src);
        let sent = p.round(t0, &c, &rs, 1, 0, [0; 6]);
        assert!(p.passing().is_err(), "no result yet");
        for (_, inj) in &sent {
            let pkt = wire::parse(&inj.frame).unwrap();
            p.answered(source, pkt.src_port, true);
        }
        assert_eq!(p.passing(), Ok(()));
        // One lost probe is tolerated, two in a row are not.
        p.round(t0 + interval, &c, &rs, 1, 0, [0; 6]);
        p.expire(t0 + interval * 3);
        assert_eq!(p.passing(), Ok(()));
        p.round(t0 + interval * 3, &c, &rs, 1, 0, [0; 6]);
        p.expire(t0 + interval * 5);
        assert!(p.passing().unwrap_err().contains("not answered"));
    }

    #[test]
    fn the_window_keeps_the_last_results() {
        let mut w = Window::default();
        assert_eq!(w.ratio(), 1.0);
        for _ in 0..WINDOW {
            w.record(false);
        }
        for _ in 0..WINDOW / 4 {
            w.record(true);
        }
        assert_eq!(w.ratio(), 0.25);
        assert_eq!((w.answered, w.failed), (WINDOW as u64 / 4, WINDOW as u64));
    }

    #[test]
    fn answers_are_recognised_by_their_destination() {
        let src = Addr::from_v4_bytes([198, 18, 0, 250]);
        let spec = |dst: Addr| RstSpec {
            src_mac: [0; 6],
            dst_mac: [0; 6],
            vlan: None,
            src: Addr::from_v4_bytes([198, 18, 0, 100]),
            dst,
            src_port: 80,
            dst_port: 50_000,
            seq: 1,
            ack: Some(2),
        };
        let mut f = [0u8; MAX_RST_FRAME];
        let n = build_tcp_segment(&mut f, &spec(src), tcp_flags::SYN, 1).unwrap();
        assert!(is_probe_answer(&[src], &f[..n]));
        assert!(!is_probe_answer(&[], &f[..n]));
        let n =
            build_tcp_segment(&mut f, &spec(Addr::from_v4_bytes([198, 18, 0, 10])), 2, 1).unwrap();
        assert!(!is_probe_answer(&[src], &f[..n]));
        let src6 = Addr::from("2001:db8::250".parse::<IpAddr>().unwrap());
        let spec6 = RstSpec {
            src: Addr::from("2001:db8::100".parse::<IpAddr>().unwrap()),
            ..spec(src6)
        };
        let n = build_tcp_segment(&mut f, &spec6, 2, 1).unwrap();
        assert!(is_probe_answer(&[src, src6], &f[..n]));
        assert!(!is_probe_answer(&[src], &f[..n]));
        assert!(!is_probe_answer(&[src], &f[..10]));
    }
}
