//! The operator's configuration model (docs/behaviour.md), its validation and its compilation into a
//! [`crate::RuleSet`].
//!
//! One typed model serves the TOML start-up file and the gRPC API: plain serde structs,
//! `snake_case` field names, unknown fields refused. Numbers that the operator types (ports,
//! minutes, weights) are `u32` even where the engine keeps `u16`, so that an out-of-range
//! value reaches [`validate`] and gets an error naming the field, the value and the range,
//! instead of an opaque decoding error (protobuf has no 16-bit integers either).
//!
//! Choices beyond the behaviour xlb promises, all documented in `docs/examples/xlb.toml`:
//! - protocols are written `TCP`/`UDP`/`ALL`/`HTTP` (lower case accepted);
//! - a frontend's `kind` is required (public vs internal decides whether HA ports are legal);
//! - health probes: `interval_seconds` 1–3600 (default 5), `threshold` 1–100 (default 2:
//!   one lost probe is not enough to drain a member);
//! - inbound NAT, single form: `target` is any address; when `backend_pool` is also given,
//!   the target must be a member of that pool and its admin state / health there decide
//!   whether it gets new flows; without a pool it is always eligible (NAT rules have no
//!   probe). Port-range form: the range is inclusive and must have **at least** as many ports
//!   as the pool has members (spare ports reserve room for the pool to grow: they match the
//!   rule but select no backend);
//! - outbound: a member may be SNATed by one outbound rule per protocol; two outbound rules
//!   may share a frontend IP only for different protocols (TCP and UDP ports are separate);
//! - `unknown_flow` exists on every rule kind (it applies to any flow), default drop.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

pub use crate::terms::{Distribution, UnknownFlowPolicy};

mod compile;
mod health;
mod validate;

pub use compile::{compile, compile_releasing};
pub use health::MemberHealth;
pub use validate::{default_outbound_ports, validate, ValidationError, ValidationErrors};

/// Idle timeout of every rule kind unless set.
pub const DEFAULT_IDLE_TIMEOUT_MINUTES: u32 = 4;
/// Idle-timeout bounds of load-balancing and inbound NAT rules.
pub const INBOUND_IDLE_BOUNDS: MinutesRange = MinutesRange {
    min_minutes: 4,
    max_minutes: 30,
};
/// Idle-timeout bounds of outbound rules.
pub const OUTBOUND_IDLE_BOUNDS: MinutesRange = MinutesRange {
    min_minutes: 4,
    max_minutes: 100,
};
/// Largest idle timeout an operator may widen the bounds to (one day).
pub const MAX_IDLE_TIMEOUT_MINUTES: u32 = 1_440;
pub const DEFAULT_UDP_IDLE_TIMEOUT_SECONDS: u32 = 240;
/// UDP idle timeout may be set from 1 s to 100 min (the widest outbound TCP default).
pub const MAX_UDP_IDLE_TIMEOUT_SECONDS: u32 = 6_000;
/// Above this, 1 s timers would drop below 300 µs, under a worker's timer resolution.
pub const MAX_LAB_TIME_SCALE: u32 = 3_600;
pub const MAX_WEIGHT: u32 = 1_000;
pub const DEFAULT_PROBE_INTERVAL_SECONDS: u32 = 5;
pub const MAX_PROBE_INTERVAL_SECONDS: u32 = 3_600;
pub const DEFAULT_PROBE_THRESHOLD: u32 = 2;
pub const MAX_PROBE_THRESHOLD: u32 = 100;
/// Longest probe timeout when none is set (the interval's, when shorter).
pub const DEFAULT_PROBE_TIMEOUT_SECONDS: u32 = 30;
/// Longest drain deadline (an hour, as the cloud balancers allow).
pub const MAX_DRAIN_TIMEOUT_SECONDS: u32 = 3_600;
/// Usable SNAT ports per frontend IP: 1024–65023.
pub const SNAT_PORTS_PER_IP: u32 = 64_000;
pub const SNAT_FIRST_PORT: u32 = 1_024;
/// Member indices are `u16` in the Maglev table, and `u16::MAX` marks an empty slot.
pub const MAX_POOL_MEMBERS: usize = 65_535;
/// Rule ids are `u16`.
pub const MAX_RULES: usize = 65_536;

/// The whole configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub settings: Settings,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frontends: Vec<Frontend>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_pools: Vec<BackendPool>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub health_probes: Vec<HealthProbe>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub load_balancing_rules: Vec<LoadBalancingRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inbound_nat_rules: Vec<InboundNatRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbound_rules: Vec<OutboundRule>,
}

/// Why a configuration file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not TOML, or not the shape of a [`Config`] (unknown field, wrong type, missing field).
    #[error("cannot read the configuration: {0}")]
    Parse(String),
    /// Well-formed, but breaks a validation rule.
    #[error(transparent)]
    Invalid(#[from] ValidationErrors),
}

impl Config {
    /// Parses and validates a TOML configuration.
    pub fn from_toml_str(s: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(s).map_err(|e| ConfigError::Parse(e.to_string()))?;
        validate(&config)?;
        Ok(config)
    }

    /// The configuration as TOML (what `from_toml_str` reads back to an equal value).
    pub fn to_toml_string(&self) -> Result<String, ConfigError> {
        toml::to_string(self).map_err(|e| ConfigError::Parse(e.to_string()))
    }

    /// Checks every validation rule and reports every violation.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        validate(self)
    }
}

/// Daemon-wide settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Idle timeout of every UDP flow, independent of the rules' TCP idle timeout.
    pub udp_idle_timeout_seconds: u32,
    /// Lab time: every timer is divided by this (60 makes 4 minutes last 4 seconds).
    pub lab_time_scale: u32,
    /// Widens the 4–30 minute bounds of load-balancing and inbound NAT rules.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inbound_idle_timeout_bounds: Option<MinutesRange>,
    /// Widens the 4–100 minute bounds of outbound rules.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outbound_idle_timeout_bounds: Option<MinutesRange>,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            udp_idle_timeout_seconds: DEFAULT_UDP_IDLE_TIMEOUT_SECONDS,
            lab_time_scale: 1,
            inbound_idle_timeout_bounds: None,
            outbound_idle_timeout_bounds: None,
        }
    }
}

impl Settings {
    /// Effective bounds for load-balancing and inbound NAT rules.
    pub fn inbound_idle_bounds(&self) -> MinutesRange {
        self.inbound_idle_timeout_bounds
            .unwrap_or(INBOUND_IDLE_BOUNDS)
    }
    /// Effective bounds for outbound rules.
    pub fn outbound_idle_bounds(&self) -> MinutesRange {
        self.outbound_idle_timeout_bounds
            .unwrap_or(OUTBOUND_IDLE_BOUNDS)
    }
}

/// An inclusive range of whole minutes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MinutesRange {
    pub min_minutes: u32,
    pub max_minutes: u32,
}

impl MinutesRange {
    pub const fn contains(&self, minutes: u32) -> bool {
        self.min_minutes <= minutes && minutes <= self.max_minutes
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FrontendKind {
    Public,
    Internal,
}

/// A VIP that clients address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Frontend {
    pub name: String,
    pub address: IpAddr,
    pub kind: FrontendKind,
}

/// Operator override of probe results.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminState {
    /// Always eligible, whatever the probes say.
    Up,
    /// Never eligible for new flows, as if its probe failed.
    Down,
    /// The probes decide.
    #[default]
    None,
}

/// What happens at a drain's deadline to the flows a drained member still has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrainAction {
    /// Established TCP flows get an RST on both ends (the exact sequence numbers, as on reset
    /// on idle); other TCP flows of the member end silently. UDP flows move at their next
    /// datagram, as they do all along the drain.
    #[default]
    Reset,
    /// Nothing is done: the flows keep running until they close or idle out. The deadline
    /// only ends the drain in the operator's view (events, status).
    Idle,
}

impl DrainAction {
    pub const fn as_str(self) -> &'static str {
        match self {
            DrainAction::Reset => "reset",
            DrainAction::Idle => "idle",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub address: IpAddr,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub admin_state: AdminState,
    /// Drain deadline: seconds after the member's admin state became `down` at which its
    /// remaining flows meet `drain_action` (0–3600, lab-scaled). Unset: drained until the
    /// operator undrains it. May be set ahead of the drain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_timeout_seconds: Option<u32>,
    /// What the deadline does to the remaining flows (default `reset`).
    #[serde(default, skip_serializing_if = "is_default_drain_action")]
    pub drain_action: DrainAction,
}

fn is_default_drain_action(a: &DrainAction) -> bool {
    *a == DrainAction::default()
}

impl Member {
    /// A member with weight 1, no admin override and no drain deadline.
    pub fn new(address: IpAddr) -> Member {
        Member {
            address,
            weight: 1,
            admin_state: AdminState::None,
            drain_timeout_seconds: None,
            drain_action: DrainAction::Reset,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendPool {
    pub name: String,
    #[serde(default)]
    pub members: Vec<Member>,
}

/// Rule protocol. `ALL` means TCP and UDP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Protocol {
    #[serde(rename = "TCP", alias = "tcp")]
    Tcp,
    #[serde(rename = "UDP", alias = "udp")]
    Udp,
    #[serde(rename = "ALL", alias = "all")]
    All,
}

impl Protocol {
    /// The IP protocol numbers this covers.
    pub const fn ip_protos(self) -> &'static [u8] {
        match self {
            Protocol::Tcp => &[crate::ruleset::PROTO_TCP],
            Protocol::Udp => &[crate::ruleset::PROTO_UDP],
            Protocol::All => &[crate::ruleset::PROTO_TCP, crate::ruleset::PROTO_UDP],
        }
    }
    /// Whether two rules with these protocols compete for the same packets.
    pub fn overlaps(self, other: Protocol) -> bool {
        self == other || self == Protocol::All || other == Protocol::All
    }
    pub const fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::All => "ALL",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadBalancingRule {
    pub name: String,
    /// Frontend name.
    pub frontend: String,
    pub protocol: Protocol,
    /// 1–65535; 0 with protocol `ALL` on an internal frontend means HA ports.
    pub frontend_port: u32,
    /// Backend pool name.
    pub backend_pool: String,
    /// 1–65535; 0 for HA ports (each packet keeps its destination port).
    pub backend_port: u32,
    #[serde(default = "default_idle")]
    pub idle_timeout_minutes: u32,
    #[serde(default)]
    pub tcp_reset: bool,
    #[serde(default)]
    pub floating_ip: bool,
    #[serde(default)]
    pub distribution: Distribution,
    /// Health probe name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_probe: Option<String>,
    #[serde(default)]
    pub unknown_flow: UnknownFlowPolicy,
}

impl LoadBalancingRule {
    /// `ALL` + port 0.
    pub fn is_ha_ports(&self) -> bool {
        self.protocol == Protocol::All && self.frontend_port == 0
    }
}

/// An inclusive range of frontend ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortRange {
    pub start: u32,
    pub end: u32,
}

impl PortRange {
    /// Number of ports (0 if `end < start`).
    pub fn len(&self) -> u32 {
        (self.end + 1).saturating_sub(self.start)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Port forwarding. Two forms: `frontend_port` + `target` (+ optional `backend_pool` the
/// target belongs to), or `frontend_port_range` + `backend_pool` (port `start + i` forwards
/// to member `i`, in member order).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundNatRule {
    pub name: String,
    pub frontend: String,
    /// `TCP` or `UDP`.
    pub protocol: Protocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frontend_port: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frontend_port_range: Option<PortRange>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_pool: Option<String>,
    pub backend_port: u32,
    #[serde(default = "default_idle")]
    pub idle_timeout_minutes: u32,
    #[serde(default)]
    pub tcp_reset: bool,
    #[serde(default)]
    pub floating_ip: bool,
    #[serde(default)]
    pub unknown_flow: UnknownFlowPolicy,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundRule {
    pub name: String,
    /// Names of the frontends whose IPs members' connections leave with, in allocation order.
    pub frontends: Vec<String>,
    pub backend_pool: String,
    pub protocol: Protocol,
    /// SNAT ports per member; a multiple of 8. Unset: by pool size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated_outbound_ports: Option<u32>,
    #[serde(default = "default_idle")]
    pub idle_timeout_minutes: u32,
    #[serde(default)]
    pub tcp_reset: bool,
    #[serde(default)]
    pub unknown_flow: UnknownFlowPolicy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ProbeProtocol {
    /// Healthy if the TCP handshake completes.
    #[serde(rename = "TCP", alias = "tcp")]
    Tcp,
    /// Healthy only on status 200.
    #[serde(rename = "HTTP", alias = "http")]
    Http,
    /// HTTP over TLS: healthy only on status 200. The certificate is checked only when
    /// `tls_verify` is set.
    #[serde(rename = "HTTPS", alias = "https")]
    Https,
}

impl ProbeProtocol {
    /// Whether the probe sends an HTTP request (and so needs a path).
    pub const fn is_http(self) -> bool {
        matches!(self, ProbeProtocol::Http | ProbeProtocol::Https)
    }
    pub const fn as_str(self) -> &'static str {
        match self {
            ProbeProtocol::Tcp => "TCP",
            ProbeProtocol::Http => "HTTP",
            ProbeProtocol::Https => "HTTPS",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthProbe {
    pub name: String,
    pub protocol: ProbeProtocol,
    pub port: u32,
    /// HTTP only; starts with '/'.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default = "default_probe_interval")]
    pub interval_seconds: u32,
    /// Consecutive failures that make a member unhealthy.
    #[serde(default = "default_probe_threshold")]
    pub threshold: u32,
    /// How long one attempt may take, 1–3600 s and at most the interval. Unset: the
    /// interval, at most 30 s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u32>,
    /// HTTPS only: check the member's certificate chain and name (default false: any
    /// certificate is accepted, as the cloud balancers' probes do).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tls_verify: bool,
    /// HTTPS only: the name sent in SNI and checked against the certificate. Unset: the
    /// member's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_server_name: Option<String>,
    /// HTTPS with `tls_verify` only: a PEM file of the certificate authorities to trust.
    /// Unset: the system's trust store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<String>,
    /// HTTP(S) only: the status codes that count as healthy, `"CODE"` or `"LOW-HIGH"` within
    /// 100–599 (e.g. `"200-399"`). Unset: 200 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<String>,
}

impl HealthProbe {
    /// The status codes an HTTP(S) answer must have, as an inclusive range: `http_status`,
    /// else 200 only (`None` when `http_status` is malformed: validation refuses it).
    pub fn accepted_status(&self) -> Option<(u16, u16)> {
        let Some(text) = &self.http_status else {
            return Some((200, 200));
        };
        let code = |t: &str| {
            t.trim()
                .parse::<u16>()
                .ok()
                .filter(|c| (100..=599).contains(c))
        };
        let (lo, hi) = match text.split_once('-') {
            Some((lo, hi)) => (code(lo)?, code(hi)?),
            None => (code(text)?, code(text)?),
        };
        (lo <= hi).then_some((lo, hi))
    }

    /// The attempt timeout in whole seconds, before the lab time scale: the configured one,
    /// else the interval capped at 30 s.
    pub fn effective_timeout_seconds(&self) -> u32 {
        self.timeout_seconds
            .unwrap_or_else(|| self.interval_seconds.min(DEFAULT_PROBE_TIMEOUT_SECONDS))
    }
}

fn default_weight() -> u32 {
    1
}
fn default_idle() -> u32 {
    DEFAULT_IDLE_TIMEOUT_MINUTES
}
fn default_probe_interval() -> u32 {
    DEFAULT_PROBE_INTERVAL_SECONDS
}
fn default_probe_threshold() -> u32 {
    DEFAULT_PROBE_THRESHOLD
}
