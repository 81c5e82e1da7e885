//! Validation of the configuration (docs/behaviour.md, "Objects"): a pure function of the configuration that reports every violation
//! at once, each with the field path, the value, the allowed range or set, and what to do.
//! The daemon applies a configuration only when this returns `Ok`, so nothing is ever partly
//! applied.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;

use super::{
    BackendPool, Config, Frontend, FrontendKind, MinutesRange, ProbeProtocol, Protocol,
    DEFAULT_IDLE_TIMEOUT_MINUTES, INBOUND_IDLE_BOUNDS, MAX_DRAIN_TIMEOUT_SECONDS,
    MAX_IDLE_TIMEOUT_MINUTES, MAX_LAB_TIME_SCALE, MAX_POOL_MEMBERS, MAX_PROBE_INTERVAL_SECONDS,
    MAX_PROBE_THRESHOLD, MAX_RULES, MAX_UDP_IDLE_TIMEOUT_SECONDS, MAX_WEIGHT, OUTBOUND_IDLE_BOUNDS,
    SNAT_PORTS_PER_IP,
};
use crate::addr::Addr;
use crate::terms::PROTO_TCP;

/// One violation.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path} = {value}: {message} (allowed: {allowed})")]
pub struct ValidationError {
    /// Where, e.g. `load_balancing_rules[web].idle_timeout_minutes`. Entries of a list are
    /// named by their `name` (by `#index` when the name is empty), members by address.
    pub path: String,
    /// The offending value as written (strings quoted).
    pub value: String,
    /// The allowed range or set.
    pub allowed: String,
    /// What is wrong and what to do about it.
    pub message: String,
}

/// Every violation found, in configuration order.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<ValidationError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(
            f,
            "invalid configuration ({n} error{}):",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            write!(f, "\n  - {e}")?;
        }
        Ok(())
    }
}

impl ValidationErrors {
    pub fn iter(&self) -> std::slice::Iter<'_, ValidationError> {
        self.0.iter()
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// The errors at exactly this path.
    pub fn at<'s>(&'s self, path: &'s str) -> impl Iterator<Item = &'s ValidationError> + 's {
        self.0.iter().filter(move |e| e.path == path)
    }
}

impl<'a> IntoIterator for &'a ValidationErrors {
    type Item = &'a ValidationError;
    type IntoIter = std::slice::Iter<'a, ValidationError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// SNAT ports per member when an outbound rule does not set them, by pool size;
/// `None` above 1,000 members, where the operator must choose.
pub fn default_outbound_ports(pool_size: usize) -> Option<u32> {
    match pool_size {
        0..=50 => Some(1024),
        51..=100 => Some(512),
        101..=200 => Some(256),
        201..=400 => Some(128),
        401..=800 => Some(64),
        801..=1000 => Some(32),
        _ => None,
    }
}

/// Checks every validation rule and returns every violation.
pub fn validate(config: &Config) -> Result<(), ValidationErrors> {
    let mut c = Checker::new(config);
    c.settings();
    c.frontends();
    c.pools();
    c.probes();
    c.lb_rules();
    c.nat_rules();
    c.outbound_rules();
    if c.errors.is_empty() {
        Ok(())
    } else {
        Err(ValidationErrors(c.errors))
    }
}

const NAME_MAX: usize = 80;

fn quote(s: &str) -> String {
    format!("{s:?}")
}

/// How an entry is named in paths.
fn ident(name: &str, index: usize) -> String {
    if name.is_empty() {
        format!("#{index}")
    } else {
        name.to_string()
    }
}

fn family(ip: IpAddr) -> &'static str {
    if Addr::from(ip).is_v4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

fn proto_name(p: u8) -> &'static str {
    if p == PROTO_TCP {
        "TCP"
    } else {
        "UDP"
    }
}

/// A list of names for an "allowed" field, shortened when long.
fn name_set<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let names: Vec<String> = names.map(quote).collect();
    if names.is_empty() {
        return "(none defined)".to_string();
    }
    if names.len() > 10 {
        format!(
            "one of {}, … ({} in all)",
            names[..10].join(", "),
            names.len()
        )
    } else {
        format!("one of {}", names.join(", "))
    }
}

struct Checker<'a> {
    cfg: &'a Config,
    errors: Vec<ValidationError>,
    frontends: HashMap<&'a str, &'a Frontend>,
    pools: HashMap<&'a str, &'a BackendPool>,
    probes: HashSet<&'a str>,
    inbound_bounds: MinutesRange,
    outbound_bounds: MinutesRange,
    /// (frontend, IP protocol, port) → index into `owners`: which rule serves those packets.
    claims: HashMap<(&'a str, u8, u16), usize>,
    /// Frontend → owner of its HA-ports rule.
    ha_claims: HashMap<&'a str, usize>,
    owners: Vec<String>,
    /// Member address → (outbound rule, protocol) already SNATing it.
    snat_members: HashMap<Addr, Vec<(String, Protocol)>>,
    /// Frontend → (outbound rule, protocol) already allocating its ports.
    snat_frontends: HashMap<&'a str, Vec<(String, Protocol)>>,
}

impl<'a> Checker<'a> {
    fn new(cfg: &'a Config) -> Checker<'a> {
        Checker {
            cfg,
            errors: Vec::new(),
            frontends: HashMap::new(),
            pools: HashMap::new(),
            probes: HashSet::new(),
            inbound_bounds: INBOUND_IDLE_BOUNDS,
            outbound_bounds: OUTBOUND_IDLE_BOUNDS,
            claims: HashMap::new(),
            ha_claims: HashMap::new(),
            owners: Vec::new(),
            snat_members: HashMap::new(),
            snat_frontends: HashMap::new(),
        }
    }

    fn push(
        &mut self,
        path: impl Into<String>,
        value: impl fmt::Display,
        allowed: impl Into<String>,
        message: impl Into<String>,
    ) {
        self.errors.push(ValidationError {
            path: path.into(),
            value: value.to_string(),
            allowed: allowed.into(),
            message: message.into(),
        });
    }

    /// Checks `lo <= value <= hi`; returns whether it holds.
    fn range(&mut self, path: String, value: u32, lo: u32, hi: u32, message: &str) -> bool {
        if (lo..=hi).contains(&value) {
            return true;
        }
        self.push(path, value, format!("{lo}–{hi}"), message);
        false
    }

    fn port(&mut self, path: String, value: u32) -> bool {
        self.range(
            path,
            value,
            1,
            65535,
            "a port is a whole number from 1 to 65535",
        )
    }

    fn name(&mut self, kind: &str, index: usize, name: &str) {
        let path = format!("{kind}[{}].name", ident(name, index));
        let allowed = format!(
            "1–{NAME_MAX} characters: letters, digits, '_', '.', '-', starting with a letter or digit"
        );
        let ok_chars = name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        let ok_first = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric());
        if name.is_empty() {
            self.push(path, quote(name), allowed, "every entry needs a name");
        } else if name.len() > NAME_MAX || !ok_chars || !ok_first {
            self.push(
                path,
                quote(name),
                allowed,
                "rename it: names appear in paths, metrics labels and CLI arguments",
            );
        }
    }

    /// Reports names used twice within one kind.
    fn unique_names<'n>(&mut self, kind: &str, names: impl Iterator<Item = &'n str>) {
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (i, name) in names.enumerate() {
            if name.is_empty() {
                continue;
            }
            if let Some(first) = seen.insert(name, i) {
                seen.insert(name, first);
                self.push(
                    format!("{kind}[{name}].name"),
                    quote(name),
                    format!("a name not used by another entry of {kind}"),
                    format!("entries #{first} and #{i} are both named {name:?}; rename one"),
                );
            }
        }
    }

    fn address(&mut self, path: String, ip: IpAddr) {
        let bad = ip.is_unspecified()
            || ip.is_multicast()
            || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
        if bad {
            self.push(
                path,
                ip,
                "a unicast IPv4 or IPv6 address",
                "unspecified, multicast and broadcast addresses cannot carry flows; use a unicast address",
            );
        }
    }

    fn idle(&mut self, path: String, value: u32, bounds: MinutesRange, setting: &str) {
        self.range(
            path,
            value,
            bounds.min_minutes,
            bounds.max_minutes,
            &format!(
                "the idle timeout is in whole minutes; choose a value in range (settings.{setting} can widen it)"
            ),
        );
    }

    fn settings(&mut self) {
        let s = &self.cfg.settings;
        self.range(
            "settings.lab_time_scale".into(),
            s.lab_time_scale,
            1,
            MAX_LAB_TIME_SCALE,
            "every timer is divided by this; use 1 for real time",
        );
        self.range(
            "settings.udp_idle_timeout_seconds".into(),
            s.udp_idle_timeout_seconds,
            1,
            MAX_UDP_IDLE_TIMEOUT_SECONDS,
            "the UDP idle timeout is in whole seconds (default 240)",
        );
        if let Some(b) = s.inbound_idle_timeout_bounds {
            if self.bounds("inbound_idle_timeout_bounds", b, INBOUND_IDLE_BOUNDS) {
                self.inbound_bounds = b;
            }
        }
        if let Some(b) = s.outbound_idle_timeout_bounds {
            if self.bounds("outbound_idle_timeout_bounds", b, OUTBOUND_IDLE_BOUNDS) {
                self.outbound_bounds = b;
            }
        }
    }

    /// Bounds may only widen the defaults, so that the default of 4 minutes and every value
    /// valid under the default bounds stay valid.
    fn bounds(&mut self, field: &str, b: MinutesRange, default: MinutesRange) -> bool {
        let min_ok = self.range(
            format!("settings.{field}.min_minutes"),
            b.min_minutes,
            1,
            default.min_minutes.min(DEFAULT_IDLE_TIMEOUT_MINUTES),
            "the bounds can only widen the default range",
        );
        let max_ok = self.range(
            format!("settings.{field}.max_minutes"),
            b.max_minutes,
            default.max_minutes,
            MAX_IDLE_TIMEOUT_MINUTES,
            "the bounds can only widen the default range (at most one day)",
        );
        min_ok && max_ok
    }

    fn frontends(&mut self) {
        let cfg = self.cfg;
        let mut by_addr: HashMap<Addr, &str> = HashMap::new();
        for (i, fe) in cfg.frontends.iter().enumerate() {
            self.name("frontends", i, &fe.name);
            let id = ident(&fe.name, i);
            self.address(format!("frontends[{id}].address"), fe.address);
            if let Some(other) = by_addr.insert(Addr::from(fe.address), &fe.name) {
                self.push(
                    format!("frontends[{id}].address"),
                    fe.address,
                    "an address no other frontend has",
                    format!(
                        "frontend {other:?} already has this address; a packet must map to one frontend"
                    ),
                );
            }
            self.frontends.entry(&fe.name).or_insert(fe);
        }
        self.unique_names("frontends", cfg.frontends.iter().map(|f| f.name.as_str()));
    }

    fn pools(&mut self) {
        let cfg = self.cfg;
        for (i, pool) in cfg.backend_pools.iter().enumerate() {
            self.name("backend_pools", i, &pool.name);
            let id = ident(&pool.name, i);
            if pool.members.len() > MAX_POOL_MEMBERS {
                self.push(
                    format!("backend_pools[{id}].members"),
                    format!("{} members", pool.members.len()),
                    format!("at most {MAX_POOL_MEMBERS} members"),
                    "split the pool",
                );
            }
            let mut seen = HashSet::new();
            for m in &pool.members {
                let path = format!("backend_pools[{id}].members[{}]", m.address);
                self.address(format!("{path}.address"), m.address);
                if !seen.insert(Addr::from(m.address)) {
                    self.push(
                        format!("{path}.address"),
                        m.address,
                        "each address once per pool",
                        "this address is listed twice in the pool; remove one entry",
                    );
                }
                self.range(
                    format!("{path}.weight"),
                    m.weight,
                    1,
                    MAX_WEIGHT,
                    "a member gets new flows in proportion to its weight",
                );
                if let Some(t) = m.drain_timeout_seconds {
                    self.range(
                        format!("{path}.drain_timeout_seconds"),
                        t,
                        0,
                        MAX_DRAIN_TIMEOUT_SECONDS,
                        "seconds a drained member's flows may run before drain_action applies",
                    );
                }
            }
            self.pools.entry(&pool.name).or_insert(pool);
        }
        self.unique_names(
            "backend_pools",
            cfg.backend_pools.iter().map(|p| p.name.as_str()),
        );
    }

    fn probes(&mut self) {
        let cfg = self.cfg;
        for (i, p) in cfg.health_probes.iter().enumerate() {
            self.name("health_probes", i, &p.name);
            let id = ident(&p.name, i);
            let path = format!("health_probes[{id}]");
            self.port(format!("{path}.port"), p.port);
            match (p.protocol, &p.path) {
                (ProbeProtocol::Http | ProbeProtocol::Https, None) => self.push(
                    format!("{path}.path"),
                    "(none)",
                    "a path starting with '/'",
                    "an HTTP probe needs the path to request, e.g. \"/healthz\"",
                ),
                (ProbeProtocol::Http | ProbeProtocol::Https, Some(u)) if !u.starts_with('/') => self.push(
                    format!("{path}.path"),
                    quote(u),
                    "a path starting with '/'",
                    "write the path part of the URL only, starting with '/'",
                ),
                (ProbeProtocol::Tcp, Some(u)) => self.push(
                    format!("{path}.path"),
                    quote(u),
                    "(none) for TCP probes",
                    "a TCP probe only completes a handshake; remove path or use protocol = \"HTTP\"",
                ),
                _ => {}
            }
            self.range(
                format!("{path}.interval_seconds"),
                p.interval_seconds,
                1,
                MAX_PROBE_INTERVAL_SECONDS,
                "seconds between probes of one member (default 5)",
            );
            self.range(
                format!("{path}.threshold"),
                p.threshold,
                1,
                MAX_PROBE_THRESHOLD,
                "consecutive failed probes before a member gets no new flows (default 2)",
            );
            if let Some(t) = p.timeout_seconds {
                let hi = p.interval_seconds.clamp(1, MAX_PROBE_INTERVAL_SECONDS);
                self.range(
                    format!("{path}.timeout_seconds"),
                    t,
                    1,
                    hi,
                    "seconds one attempt may take, at most the interval (default: the \
                     interval, at most 30)",
                );
            }
            if p.http_status.is_some() && p.protocol == ProbeProtocol::Tcp {
                self.push(
                    format!("{path}.http_status"),
                    "(set)",
                    "(none) for TCP probes",
                    "a TCP probe has no HTTP status; remove http_status or use protocol = \"HTTP\"",
                );
            } else if let (Some(text), None) = (&p.http_status, p.accepted_status()) {
                self.push(
                    format!("{path}.http_status"),
                    quote(text),
                    "\"CODE\" or \"LOW-HIGH\", 100–599, LOW ≤ HIGH",
                    "the status codes that count as healthy, e.g. \"200\" or \"200-399\"",
                );
            }
            let tls = p.protocol == ProbeProtocol::Https;
            if !tls && (p.tls_verify || p.tls_server_name.is_some() || p.tls_ca_file.is_some()) {
                let field = if p.tls_verify {
                    "tls_verify"
                } else if p.tls_server_name.is_some() {
                    "tls_server_name"
                } else {
                    "tls_ca_file"
                };
                self.push(
                    format!("{path}.{field}"),
                    "(set)",
                    "(none) unless protocol = \"HTTPS\"",
                    "TLS settings only apply to HTTPS probes; remove it or use protocol = \"HTTPS\"",
                );
            }
            if let Some(name) = &p.tls_server_name {
                let ok = !name.is_empty()
                    && name.len() <= 253
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'));
                if !ok {
                    self.push(
                        format!("{path}.tls_server_name"),
                        quote(name),
                        "a DNS name or an IP address, at most 253 characters",
                        "the name the member's certificate carries, e.g. \"www.example.com\"",
                    );
                }
            }
            if p.tls_ca_file.is_some() && !p.tls_verify {
                self.push(
                    format!("{path}.tls_ca_file"),
                    "(set)",
                    "(none) unless tls_verify = true",
                    "a CA file is only read to verify certificates; set tls_verify = true or remove it",
                );
            }
            if let Some(f) = &p.tls_ca_file {
                if f.is_empty() || !f.starts_with('/') {
                    self.push(
                        format!("{path}.tls_ca_file"),
                        quote(f),
                        "an absolute path",
                        "the path of a PEM file of CA certificates, e.g. \"/etc/xlb/probe-ca.pem\"",
                    );
                }
            }
            self.probes.insert(&p.name);
        }
        self.unique_names(
            "health_probes",
            cfg.health_probes.iter().map(|p| p.name.as_str()),
        );
    }

    fn frontend_ref(&mut self, path: String, name: &str) -> Option<&'a Frontend> {
        if let Some(fe) = self.frontends.get(name) {
            return Some(fe);
        }
        let allowed = name_set(self.cfg.frontends.iter().map(|f| f.name.as_str()));
        self.push(
            path,
            quote(name),
            allowed,
            "no frontend has this name; define it under [[frontends]] or fix the reference",
        );
        None
    }

    fn pool_ref(&mut self, path: String, name: &str) -> Option<&'a BackendPool> {
        if let Some(p) = self.pools.get(name) {
            return Some(p);
        }
        let allowed = name_set(self.cfg.backend_pools.iter().map(|p| p.name.as_str()));
        self.push(
            path,
            quote(name),
            allowed,
            "no backend pool has this name; define it under [[backend_pools]] or fix the reference",
        );
        None
    }

    /// Every member of `pool` must have the frontend's address family: the engine translates
    /// addresses, it does not translate between IPv4 and IPv6.
    fn pool_family(&mut self, path: String, fe: &Frontend, pool: &BackendPool) {
        let want = family(fe.address);
        let wrong: Vec<_> = pool
            .members
            .iter()
            .filter(|m| family(m.address) != want)
            .collect();
        if let Some(first) = wrong.first() {
            self.push(
                path,
                quote(&pool.name),
                format!("a pool whose members are all {want}"),
                format!(
                    "frontend {:?} is {want} but {} member(s) of pool {:?} are not (first: {}); use a pool of one family per frontend",
                    fe.name,
                    wrong.len(),
                    pool.name,
                    first.address
                ),
            );
        }
    }

    fn owner(&mut self, owner: String) -> usize {
        self.owners.push(owner);
        self.owners.len() - 1
    }

    /// Registers the (frontend, protocol, port) triples a rule serves and reports each other
    /// rule it collides with once, at the first colliding port.
    fn claim(
        &mut self,
        owner: usize,
        path: String,
        fe: &'a Frontend,
        protos: &[u8],
        ports: std::ops::RangeInclusive<u16>,
    ) {
        let mut reported = HashSet::new();
        for port in ports {
            for &p in protos {
                let key = (fe.name.as_str(), p, port);
                match self.claims.get(&key) {
                    Some(&other) if other != owner => {
                        if reported.insert(other) {
                            let other_name = self.owners[other].clone();
                            self.push(
                                path.clone(),
                                port,
                                "a (frontend, protocol, port) no other rule serves",
                                format!(
                                    "{} port {port} on frontend {:?} is already served by {other_name}; use another port or frontend",
                                    proto_name(p),
                                    fe.name
                                ),
                            );
                        }
                    }
                    Some(_) => {}
                    None => {
                        self.claims.insert(key, owner);
                    }
                }
            }
        }
    }

    fn lb_rules(&mut self) {
        let cfg = self.cfg;
        for (i, r) in cfg.load_balancing_rules.iter().enumerate() {
            self.name("load_balancing_rules", i, &r.name);
            let base = format!("load_balancing_rules[{}]", ident(&r.name, i));
            let fe = self.frontend_ref(format!("{base}.frontend"), &r.frontend);
            let pool = self.pool_ref(format!("{base}.backend_pool"), &r.backend_pool);
            if let Some(probe) = &r.health_probe {
                if !self.probes.contains(probe.as_str()) {
                    let allowed = name_set(cfg.health_probes.iter().map(|p| p.name.as_str()));
                    self.push(
                        format!("{base}.health_probe"),
                        quote(probe),
                        allowed,
                        "no health probe has this name; define it under [[health_probes]] or remove the reference",
                    );
                }
            }

            let ha = r.is_ha_ports();
            let mut port_ok = true;
            if r.frontend_port == 0 {
                let allowed = "1–65535, or 0 with protocol ALL on an internal frontend (HA ports)";
                if !ha {
                    port_ok = false;
                    self.push(
                        format!("{base}.frontend_port"),
                        0,
                        allowed,
                        "port 0 means HA ports, which needs protocol = \"ALL\"; set a port or change the protocol",
                    );
                } else if let Some(fe) = fe.filter(|fe| fe.kind == FrontendKind::Public) {
                    port_ok = false;
                    self.push(
                        format!("{base}.frontend_port"),
                        0,
                        allowed,
                        format!(
                            "HA ports (ALL + port 0) are for internal frontends only and frontend {:?} is public; set a port or use an internal frontend",
                            fe.name
                        ),
                    );
                }
            } else {
                port_ok = self.port(format!("{base}.frontend_port"), r.frontend_port);
            }

            if ha && r.tcp_reset {
                // HA-ports rules carry every port and protocol of an internal frontend (the
                // appliances behind it keep their own state): no RST is ever sent for them,
                // so a request for one is refused rather than silently ignored.
                self.push(
                    format!("{base}.tcp_reset"),
                    true,
                    "false for HA-ports rules (protocol ALL, port 0)",
                    "TCP reset on idle is never sent for an HA-ports rule on an internal frontend; set tcp_reset = false, or use a rule with a specific port",
                );
            }
            if ha {
                if r.backend_port != 0 {
                    self.push(
                        format!("{base}.backend_port"),
                        r.backend_port,
                        "0 for HA ports",
                        "an HA-ports rule keeps each packet's destination port; set backend_port = 0",
                    );
                }
            } else if self.port(format!("{base}.backend_port"), r.backend_port)
                && r.floating_ip
                && r.backend_port != r.frontend_port
            {
                self.push(
                    format!("{base}.backend_port"),
                    r.backend_port,
                    format!("{} (the frontend port)", r.frontend_port),
                    "with floating_ip the destination is not rewritten, so the backend port must equal the frontend port",
                );
            }

            self.idle(
                format!("{base}.idle_timeout_minutes"),
                r.idle_timeout_minutes,
                self.inbound_bounds,
                "inbound_idle_timeout_bounds",
            );

            if let (Some(fe), Some(pool)) = (fe, pool) {
                self.pool_family(format!("{base}.backend_pool"), fe, pool);
            }
            if let (Some(fe), true) = (fe, port_ok) {
                let owner = self.owner(base.clone());
                if ha {
                    if let Some(&other) = self.ha_claims.get(fe.name.as_str()) {
                        let other_name = self.owners[other].clone();
                        self.push(
                            format!("{base}.frontend_port"),
                            0,
                            "one HA-ports rule per frontend",
                            format!(
                                "frontend {:?} already has an HA-ports rule, {other_name}; remove one",
                                fe.name
                            ),
                        );
                    } else {
                        self.ha_claims.insert(&fe.name, owner);
                    }
                } else {
                    let port = r.frontend_port as u16;
                    self.claim(
                        owner,
                        format!("{base}.frontend_port"),
                        fe,
                        r.protocol.ip_protos(),
                        port..=port,
                    );
                }
            }
        }
        self.unique_names(
            "load_balancing_rules",
            cfg.load_balancing_rules.iter().map(|r| r.name.as_str()),
        );
    }

    fn nat_rules(&mut self) {
        let cfg = self.cfg;
        for (i, r) in cfg.inbound_nat_rules.iter().enumerate() {
            self.name("inbound_nat_rules", i, &r.name);
            let base = format!("inbound_nat_rules[{}]", ident(&r.name, i));
            let fe = self.frontend_ref(format!("{base}.frontend"), &r.frontend);
            let proto_ok = r.protocol != Protocol::All;
            if !proto_ok {
                self.push(
                    format!("{base}.protocol"),
                    quote(r.protocol.as_str()),
                    "\"TCP\" or \"UDP\"",
                    "port forwarding is per protocol; make one rule per protocol",
                );
            }
            let pool = match &r.backend_pool {
                Some(name) => self.pool_ref(format!("{base}.backend_pool"), name),
                None => None,
            };
            self.port(format!("{base}.backend_port"), r.backend_port);
            self.idle(
                format!("{base}.idle_timeout_minutes"),
                r.idle_timeout_minutes,
                self.inbound_bounds,
                "inbound_idle_timeout_bounds",
            );

            // The ports this rule serves, once its shape is valid.
            let mut ports = None;
            match (r.frontend_port, r.frontend_port_range) {
                (Some(_), Some(range)) => self.push(
                    format!("{base}.frontend_port_range"),
                    format!("{}..={}", range.start, range.end),
                    "either frontend_port (with target) or frontend_port_range (with backend_pool)",
                    "set one of the two forms, not both",
                ),
                (None, None) => self.push(
                    format!("{base}.frontend_port"),
                    "(none)",
                    "frontend_port (with target) or frontend_port_range (with backend_pool)",
                    "say which frontend port(s) this rule forwards",
                ),
                (Some(port), None) => {
                    let port_ok = self.port(format!("{base}.frontend_port"), port);
                    match r.target {
                        None => self.push(
                            format!("{base}.target"),
                            "(none)",
                            "an IP address",
                            "a single-port NAT rule needs the address to forward to",
                        ),
                        Some(target) => {
                            self.address(format!("{base}.target"), target);
                            if let Some(pool) = pool {
                                let t = Addr::from(target);
                                if !pool.members.iter().any(|m| Addr::from(m.address) == t) {
                                    self.push(
                                        format!("{base}.target"),
                                        target,
                                        format!("a member of pool {:?}", pool.name),
                                        "the target must be a member of backend_pool (or leave backend_pool out to forward to any address)",
                                    );
                                }
                            }
                            if let Some(fe) = fe {
                                if family(fe.address) != family(target) {
                                    self.push(
                                        format!("{base}.target"),
                                        target,
                                        format!("an {} address", family(fe.address)),
                                        format!(
                                            "frontend {:?} is {}; the target must be of the same family",
                                            fe.name,
                                            family(fe.address)
                                        ),
                                    );
                                }
                            }
                        }
                    }
                    if r.floating_ip && r.backend_port != port {
                        self.push(
                            format!("{base}.backend_port"),
                            r.backend_port,
                            format!("{port} (the frontend port)"),
                            "with floating_ip the destination is not rewritten, so the backend port must equal the frontend port",
                        );
                    }
                    if port_ok {
                        ports = Some(port as u16..=port as u16);
                    }
                }
                (None, Some(range)) => {
                    let start_ok =
                        self.port(format!("{base}.frontend_port_range.start"), range.start);
                    let end_ok = self.port(format!("{base}.frontend_port_range.end"), range.end);
                    let ordered = range.end >= range.start;
                    if start_ok && end_ok && !ordered {
                        self.push(
                            format!("{base}.frontend_port_range.end"),
                            range.end,
                            format!("{}–65535 (at least start)", range.start),
                            "the range is inclusive and end must not be below start",
                        );
                    }
                    if let Some(target) = r.target {
                        self.push(
                            format!("{base}.target"),
                            target,
                            "(none) with frontend_port_range",
                            "a port range maps across backend_pool's members in order; remove target",
                        );
                    }
                    if r.floating_ip {
                        self.push(
                            format!("{base}.floating_ip"),
                            true,
                            "false with frontend_port_range",
                            "floating IP needs backend port = frontend port, impossible for a port range with one backend_port; use single-port rules",
                        );
                    }
                    match (&r.backend_pool, pool) {
                        (None, _) => self.push(
                            format!("{base}.backend_pool"),
                            "(none)",
                            "a backend pool name",
                            "a port range forwards port start+i to member i of a pool; name the pool",
                        ),
                        (Some(_), Some(pool)) => {
                            if start_ok && end_ok && ordered && (range.len() as usize) < pool.members.len() {
                                self.push(
                                    format!("{base}.frontend_port_range"),
                                    format!("{}..={} ({} ports)", range.start, range.end, range.len()),
                                    format!(
                                        "at least {} ports (one per member of pool {:?})",
                                        pool.members.len(),
                                        pool.name
                                    ),
                                    "widen the range so that every member gets a port",
                                );
                            }
                            if let Some(fe) = fe {
                                self.pool_family(format!("{base}.backend_pool"), fe, pool);
                            }
                        }
                        (Some(_), None) => {}
                    }
                    if start_ok && end_ok && ordered {
                        ports = Some(range.start as u16..=range.end as u16);
                    }
                }
            }
            if let (Some(fe), Some(ports), true) = (fe, ports, proto_ok) {
                let owner = self.owner(base.clone());
                let field = if r.frontend_port.is_some() {
                    "frontend_port"
                } else {
                    "frontend_port_range"
                };
                self.claim(
                    owner,
                    format!("{base}.{field}"),
                    fe,
                    r.protocol.ip_protos(),
                    ports,
                );
            }
        }
        self.unique_names(
            "inbound_nat_rules",
            cfg.inbound_nat_rules.iter().map(|r| r.name.as_str()),
        );
    }

    fn outbound_rules(&mut self) {
        let cfg = self.cfg;
        for (i, r) in cfg.outbound_rules.iter().enumerate() {
            self.name("outbound_rules", i, &r.name);
            let base = format!("outbound_rules[{}]", ident(&r.name, i));
            let pool = self.pool_ref(format!("{base}.backend_pool"), &r.backend_pool);
            if r.frontends.is_empty() {
                self.push(
                    format!("{base}.frontends"),
                    "[]",
                    "1 or more frontend names",
                    "members' connections need at least one frontend IP to leave with",
                );
            }
            let mut fes: Vec<&'a Frontend> = Vec::new();
            for name in &r.frontends {
                let Some(fe) = self.frontend_ref(format!("{base}.frontends"), name) else {
                    continue;
                };
                if fes.iter().any(|f| f.name == fe.name) {
                    self.push(
                        format!("{base}.frontends"),
                        quote(name),
                        "each frontend once",
                        "this frontend is listed twice; remove one",
                    );
                    continue;
                }
                if let Some(first) = fes.first() {
                    if family(first.address) != family(fe.address) {
                        self.push(
                            format!("{base}.frontends"),
                            quote(name),
                            format!(
                                "{} frontends (like {:?})",
                                family(first.address),
                                first.name
                            ),
                            "an outbound rule's frontends must share one address family",
                        );
                        continue;
                    }
                }
                fes.push(fe);
            }
            self.idle(
                format!("{base}.idle_timeout_minutes"),
                r.idle_timeout_minutes,
                self.outbound_bounds,
                "outbound_idle_timeout_bounds",
            );

            if let Some(pool) = pool {
                if let Some(fe) = fes.first() {
                    self.pool_family(format!("{base}.backend_pool"), fe, pool);
                }
                self.allocation(&base, r.allocated_outbound_ports, pool, fes.len());
                let mut reported = false;
                let mut seen = HashSet::new();
                for m in &pool.members {
                    let a = Addr::from(m.address);
                    if !seen.insert(a) {
                        // A duplicate member is reported with the pool; not a clash with itself.
                        continue;
                    }
                    let users = self.snat_members.entry(a).or_default();
                    let clash = users
                        .iter()
                        .find(|(_, p)| p.overlaps(r.protocol))
                        .map(|(o, p)| (o.clone(), *p));
                    match clash {
                        Some((other, p)) if !reported => {
                            reported = true;
                            self.push(
                                format!("{base}.backend_pool"),
                                quote(&pool.name),
                                "a pool whose members no other outbound rule SNATs for the same protocol",
                                format!(
                                    "member {} is already SNATed for {} by {other}; a member may be in one outbound rule per protocol",
                                    m.address,
                                    p.as_str()
                                ),
                            );
                        }
                        Some(_) => {}
                        None => users.push((base.clone(), r.protocol)),
                    }
                }
            }
            for fe in &fes {
                let users = self.snat_frontends.entry(&fe.name).or_default();
                let clash = users
                    .iter()
                    .find(|(_, p)| p.overlaps(r.protocol))
                    .map(|(o, p)| (o.clone(), *p));
                match clash {
                    Some((other, p)) => self.push(
                        format!("{base}.frontends"),
                        quote(&fe.name),
                        "frontends no other outbound rule allocates for the same protocol",
                        format!(
                            "{other} already allocates {} ports of frontend {:?}; use another frontend IP or split by protocol",
                            p.as_str(),
                            fe.name
                        ),
                    ),
                    None => users.push((base.clone(), r.protocol)),
                }
            }
        }
        self.unique_names(
            "outbound_rules",
            cfg.outbound_rules.iter().map(|r| r.name.as_str()),
        );
        let total =
            cfg.load_balancing_rules.len() + cfg.inbound_nat_rules.len() + cfg.outbound_rules.len();
        if total > MAX_RULES {
            self.push(
                "load_balancing_rules",
                format!("{total} rules"),
                format!("at most {MAX_RULES} rules of all kinds together"),
                "rule ids are 16-bit; remove rules",
            );
        }
    }

    /// SNAT ports per member: a multiple of 8, and all members together within 64,000 ports
    /// per frontend IP.
    fn allocation(&mut self, base: &str, set: Option<u32>, pool: &BackendPool, ips: usize) {
        let path = format!("{base}.allocated_outbound_ports");
        let members = pool.members.len() as u64;
        let capacity = u64::from(SNAT_PORTS_PER_IP) * ips as u64;
        // Largest multiple of 8 that fits every member.
        let max_each = capacity
            .checked_div(members)
            .map_or(capacity, |m| m / 8 * 8);
        match set {
            Some(n) if n == 0 || n % 8 != 0 => self.push(
                path,
                n,
                format!("a multiple of 8 from 8 to {max_each}"),
                "ports are allocated in blocks of 8; round to a multiple of 8",
            ),
            Some(n) if ips > 0 && u64::from(n) * members > capacity => self.push(
                path,
                n,
                format!("a multiple of 8 from 8 to {max_each}"),
                format!(
                    "{members} members × {n} ports = {} exceeds {capacity} ({SNAT_PORTS_PER_IP} per frontend IP × {ips}); lower it or add frontend IPs",
                    u64::from(n) * members
                ),
            ),
            Some(_) => {}
            None => {
                if default_outbound_ports(pool.members.len()).is_none() {
                    self.push(
                        path,
                        "(default)",
                        "the default allocation covers pools of 1–1000 members",
                        format!(
                            "pool {:?} has {members} members; set allocated_outbound_ports (a multiple of 8, at most {max_each})",
                            pool.name
                        ),
                    );
                }
            }
        }
    }
}

/// Just enough for the compile step: the per-member SNAT allocation of a valid rule.
pub(crate) fn allocation_of(set: Option<u32>, pool_size: usize) -> u32 {
    set.or_else(|| default_outbound_ports(pool_size))
        .unwrap_or(0)
}
