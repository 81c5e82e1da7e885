//! Proto ↔ `xlb_engine::config`, both directions.
//!
//! The proto messages mirror the configuration model field for field, so this is mostly
//! mechanical. What it adds: text and enum values that do not parse become a
//! [`ValidationErrors`] naming the field with the same path syntax as the engine's validator
//! (`frontends[web].address`), so a bad IP and an out-of-range port reach the client the same
//! way; `optional` fields left unset take the model's defaults; answers always carry the
//! effective values (weight 1, idle timeout 4, …) so clients never have to know the defaults.

use std::net::IpAddr;

use xlb_engine::config::{
    self as cfg, AdminState, Distribution, DrainAction, FrontendKind, MinutesRange, PortRange,
    ProbeProtocol, Protocol, Settings, UnknownFlowPolicy, DEFAULT_IDLE_TIMEOUT_MINUTES,
    DEFAULT_PROBE_INTERVAL_SECONDS, DEFAULT_PROBE_THRESHOLD,
};
use xlb_engine::{ValidationError, ValidationErrors};
use xlb_proto::v1 as pb;

/// Collects conversion errors so that one request reports every bad field at once, like the
/// validator does.
#[derive(Debug, Default)]
pub(crate) struct Errors(Vec<ValidationError>);

impl Errors {
    pub(crate) fn push(&mut self, path: String, value: String, allowed: &str, message: &str) {
        self.0.push(ValidationError {
            path,
            value,
            allowed: allowed.to_string(),
            message: message.to_string(),
        });
    }

    pub(crate) fn finish<T>(self, value: T) -> Result<T, ValidationErrors> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(ValidationErrors(self.0))
        }
    }
}

/// How an entry is named in paths: by name, or `#0` when the name is empty (as the validator).
fn ident(name: &str) -> String {
    if name.is_empty() {
        "#0".to_string()
    } else {
        name.to_string()
    }
}

/// Parses an IP address field.
pub(crate) fn parse_ip(errs: &mut Errors, path: String, text: &str) -> IpAddr {
    match text.trim().parse::<IpAddr>() {
        Ok(ip) => ip,
        Err(_) => {
            errs.push(
                path,
                format!("{text:?}"),
                "an IPv4 or IPv6 address, e.g. \"198.18.0.10\" or \"2001:db8::10\"",
                "not an IP address",
            );
            IpAddr::from([0, 0, 0, 0])
        }
    }
}

/// An enum field whose number the server does not know (a newer client, or a raw client).
fn unknown_enum(errs: &mut Errors, path: String, value: i32, allowed: &str) {
    errs.push(
        path,
        value.to_string(),
        allowed,
        "unknown enum value; use one of the names listed",
    );
}

pub(crate) fn protocol_from(errs: &mut Errors, path: String, v: i32) -> Protocol {
    match pb::Protocol::try_from(v) {
        Ok(pb::Protocol::Tcp) => Protocol::Tcp,
        Ok(pb::Protocol::Udp) => Protocol::Udp,
        Ok(pb::Protocol::All) => Protocol::All,
        Ok(pb::Protocol::Unspecified) => {
            errs.push(
                path,
                "PROTOCOL_UNSPECIFIED".into(),
                "PROTOCOL_TCP, PROTOCOL_UDP or PROTOCOL_ALL",
                "the protocol is required",
            );
            Protocol::Tcp
        }
        Err(_) => {
            unknown_enum(errs, path, v, "PROTOCOL_TCP, PROTOCOL_UDP or PROTOCOL_ALL");
            Protocol::Tcp
        }
    }
}

pub(crate) fn protocol_to(p: Protocol) -> pb::Protocol {
    match p {
        Protocol::Tcp => pb::Protocol::Tcp,
        Protocol::Udp => pb::Protocol::Udp,
        Protocol::All => pb::Protocol::All,
    }
}

fn kind_from(errs: &mut Errors, path: String, v: i32) -> FrontendKind {
    const ALLOWED: &str = "FRONTEND_KIND_PUBLIC or FRONTEND_KIND_INTERNAL";
    match pb::FrontendKind::try_from(v) {
        Ok(pb::FrontendKind::Public) => FrontendKind::Public,
        Ok(pb::FrontendKind::Internal) => FrontendKind::Internal,
        Ok(pb::FrontendKind::Unspecified) => {
            errs.push(
                path,
                "FRONTEND_KIND_UNSPECIFIED".into(),
                ALLOWED,
                "the kind is required",
            );
            FrontendKind::Public
        }
        Err(_) => {
            unknown_enum(errs, path, v, ALLOWED);
            FrontendKind::Public
        }
    }
}

pub(crate) fn admin_from(errs: &mut Errors, path: String, v: i32) -> AdminState {
    match pb::AdminState::try_from(v) {
        Ok(pb::AdminState::None) => AdminState::None,
        Ok(pb::AdminState::Up) => AdminState::Up,
        Ok(pb::AdminState::Down) => AdminState::Down,
        Err(_) => {
            unknown_enum(
                errs,
                path,
                v,
                "ADMIN_STATE_NONE, ADMIN_STATE_UP or ADMIN_STATE_DOWN",
            );
            AdminState::None
        }
    }
}

pub(crate) fn drain_action_from(errs: &mut Errors, path: String, v: i32) -> DrainAction {
    match pb::DrainAction::try_from(v) {
        Ok(pb::DrainAction::Reset) => DrainAction::Reset,
        Ok(pb::DrainAction::Idle) => DrainAction::Idle,
        Err(_) => {
            unknown_enum(errs, path, v, "DRAIN_ACTION_RESET or DRAIN_ACTION_IDLE");
            DrainAction::Reset
        }
    }
}

pub(crate) fn drain_action_to(a: DrainAction) -> pb::DrainAction {
    match a {
        DrainAction::Reset => pb::DrainAction::Reset,
        DrainAction::Idle => pb::DrainAction::Idle,
    }
}

pub(crate) fn admin_to(a: AdminState) -> pb::AdminState {
    match a {
        AdminState::None => pb::AdminState::None,
        AdminState::Up => pb::AdminState::Up,
        AdminState::Down => pb::AdminState::Down,
    }
}

fn distribution_from(errs: &mut Errors, path: String, v: i32) -> Distribution {
    match pb::Distribution::try_from(v) {
        Ok(pb::Distribution::FiveTuple) => Distribution::FiveTuple,
        Ok(pb::Distribution::SourceIp) => Distribution::SourceIp,
        Ok(pb::Distribution::SourceIpProtocol) => Distribution::SourceIpProtocol,
        Err(_) => {
            unknown_enum(
                errs,
                path,
                v,
                "DISTRIBUTION_FIVE_TUPLE, DISTRIBUTION_SOURCE_IP or DISTRIBUTION_SOURCE_IP_PROTOCOL",
            );
            Distribution::FiveTuple
        }
    }
}

fn distribution_to(d: Distribution) -> pb::Distribution {
    match d {
        Distribution::FiveTuple => pb::Distribution::FiveTuple,
        Distribution::SourceIp => pb::Distribution::SourceIp,
        Distribution::SourceIpProtocol => pb::Distribution::SourceIpProtocol,
    }
}

fn unknown_flow_from(errs: &mut Errors, path: String, v: i32) -> UnknownFlowPolicy {
    match pb::UnknownFlowPolicy::try_from(v) {
        Ok(pb::UnknownFlowPolicy::Drop) => UnknownFlowPolicy::Drop,
        Ok(pb::UnknownFlowPolicy::Reset) => UnknownFlowPolicy::Reset,
        Ok(pb::UnknownFlowPolicy::Pickup) => UnknownFlowPolicy::Pickup,
        Err(_) => {
            unknown_enum(
                errs,
                path,
                v,
                "UNKNOWN_FLOW_POLICY_DROP, UNKNOWN_FLOW_POLICY_RESET or UNKNOWN_FLOW_POLICY_PICKUP",
            );
            UnknownFlowPolicy::Drop
        }
    }
}

fn unknown_flow_to(u: UnknownFlowPolicy) -> pb::UnknownFlowPolicy {
    match u {
        UnknownFlowPolicy::Drop => pb::UnknownFlowPolicy::Drop,
        UnknownFlowPolicy::Reset => pb::UnknownFlowPolicy::Reset,
        UnknownFlowPolicy::Pickup => pb::UnknownFlowPolicy::Pickup,
    }
}

fn probe_protocol_from(errs: &mut Errors, path: String, v: i32) -> ProbeProtocol {
    const ALLOWED: &str = "PROBE_PROTOCOL_TCP, PROBE_PROTOCOL_HTTP or PROBE_PROTOCOL_HTTPS";
    match pb::ProbeProtocol::try_from(v) {
        Ok(pb::ProbeProtocol::Tcp) => ProbeProtocol::Tcp,
        Ok(pb::ProbeProtocol::Http) => ProbeProtocol::Http,
        Ok(pb::ProbeProtocol::Https) => ProbeProtocol::Https,
        Ok(pb::ProbeProtocol::Unspecified) => {
            errs.push(
                path,
                "PROBE_PROTOCOL_UNSPECIFIED".into(),
                ALLOWED,
                "the protocol is required",
            );
            ProbeProtocol::Tcp
        }
        Err(_) => {
            unknown_enum(errs, path, v, ALLOWED);
            ProbeProtocol::Tcp
        }
    }
}

/// A required message field that the client left out.
fn required<T: Default>(errs: &mut Errors, path: &str, v: Option<T>) -> T {
    match v {
        Some(v) => v,
        None => {
            errs.push(
                path.to_string(),
                "(none)".into(),
                "a value",
                "this field is required",
            );
            T::default()
        }
    }
}

pub(crate) fn require<T: Default>(v: Option<T>, path: &str) -> Result<T, ValidationErrors> {
    let mut errs = Errors::default();
    let v = required(&mut errs, path, v);
    errs.finish(v)
}

// ---------------------------------------------------------------------------------------
// Proto → model.

pub fn frontend_from(p: pb::Frontend) -> Result<cfg::Frontend, ValidationErrors> {
    let mut errs = Errors::default();
    let base = format!("frontends[{}]", ident(&p.name));
    let fe = cfg::Frontend {
        address: parse_ip(&mut errs, format!("{base}.address"), &p.address),
        kind: kind_from(&mut errs, format!("{base}.kind"), p.kind),
        name: p.name,
    };
    errs.finish(fe)
}

pub(crate) fn member_from(
    errs: &mut Errors,
    pool_path: &str,
    index: usize,
    m: pb::Member,
) -> cfg::Member {
    let base = format!("{pool_path}.members[#{index}]");
    cfg::Member {
        address: parse_ip(errs, format!("{base}.address"), &m.address),
        weight: m.weight.unwrap_or(1),
        admin_state: admin_from(errs, format!("{base}.admin_state"), m.admin_state),
        drain_timeout_seconds: m.drain_timeout_seconds,
        drain_action: drain_action_from(errs, format!("{base}.drain_action"), m.drain_action),
    }
}

/// One member on its own (member add).
pub fn member_only_from(pool: &str, m: pb::Member) -> Result<cfg::Member, ValidationErrors> {
    let mut errs = Errors::default();
    let path = format!("backend_pools[{}]", ident(pool));
    let m = member_from(&mut errs, &path, 0, m);
    errs.finish(m)
}

pub fn pool_from(p: pb::BackendPool) -> Result<cfg::BackendPool, ValidationErrors> {
    let mut errs = Errors::default();
    let base = format!("backend_pools[{}]", ident(&p.name));
    let members = p
        .members
        .into_iter()
        .enumerate()
        .map(|(i, m)| member_from(&mut errs, &base, i, m))
        .collect();
    errs.finish(cfg::BackendPool {
        name: p.name,
        members,
    })
}

pub fn lb_rule_from(r: pb::LoadBalancingRule) -> Result<cfg::LoadBalancingRule, ValidationErrors> {
    let mut errs = Errors::default();
    let base = format!("load_balancing_rules[{}]", ident(&r.name));
    let rule = cfg::LoadBalancingRule {
        protocol: protocol_from(&mut errs, format!("{base}.protocol"), r.protocol),
        distribution: distribution_from(&mut errs, format!("{base}.distribution"), r.distribution),
        unknown_flow: unknown_flow_from(&mut errs, format!("{base}.unknown_flow"), r.unknown_flow),
        name: r.name,
        frontend: r.frontend,
        frontend_port: r.frontend_port,
        backend_pool: r.backend_pool,
        backend_port: r.backend_port,
        idle_timeout_minutes: r
            .idle_timeout_minutes
            .unwrap_or(DEFAULT_IDLE_TIMEOUT_MINUTES),
        tcp_reset: r.tcp_reset,
        floating_ip: r.floating_ip,
        health_probe: r.health_probe,
    };
    errs.finish(rule)
}

pub fn nat_rule_from(r: pb::InboundNatRule) -> Result<cfg::InboundNatRule, ValidationErrors> {
    let mut errs = Errors::default();
    let base = format!("inbound_nat_rules[{}]", ident(&r.name));
    let target = r
        .target
        .as_deref()
        .map(|t| parse_ip(&mut errs, format!("{base}.target"), t));
    let rule = cfg::InboundNatRule {
        protocol: protocol_from(&mut errs, format!("{base}.protocol"), r.protocol),
        unknown_flow: unknown_flow_from(&mut errs, format!("{base}.unknown_flow"), r.unknown_flow),
        target,
        name: r.name,
        frontend: r.frontend,
        frontend_port: r.frontend_port,
        frontend_port_range: r.frontend_port_range.map(|p| PortRange {
            start: p.start,
            end: p.end,
        }),
        backend_pool: r.backend_pool,
        backend_port: r.backend_port,
        idle_timeout_minutes: r
            .idle_timeout_minutes
            .unwrap_or(DEFAULT_IDLE_TIMEOUT_MINUTES),
        tcp_reset: r.tcp_reset,
        floating_ip: r.floating_ip,
    };
    errs.finish(rule)
}

pub fn outbound_rule_from(r: pb::OutboundRule) -> Result<cfg::OutboundRule, ValidationErrors> {
    let mut errs = Errors::default();
    let base = format!("outbound_rules[{}]", ident(&r.name));
    let rule = cfg::OutboundRule {
        protocol: protocol_from(&mut errs, format!("{base}.protocol"), r.protocol),
        unknown_flow: unknown_flow_from(&mut errs, format!("{base}.unknown_flow"), r.unknown_flow),
        name: r.name,
        frontends: r.frontends,
        backend_pool: r.backend_pool,
        allocated_outbound_ports: r.allocated_outbound_ports,
        idle_timeout_minutes: r
            .idle_timeout_minutes
            .unwrap_or(DEFAULT_IDLE_TIMEOUT_MINUTES),
        tcp_reset: r.tcp_reset,
    };
    errs.finish(rule)
}

pub fn probe_from(p: pb::HealthProbe) -> Result<cfg::HealthProbe, ValidationErrors> {
    let mut errs = Errors::default();
    let base = format!("health_probes[{}]", ident(&p.name));
    let probe = cfg::HealthProbe {
        protocol: probe_protocol_from(&mut errs, format!("{base}.protocol"), p.protocol),
        name: p.name,
        port: p.port,
        path: p.path,
        interval_seconds: p.interval_seconds.unwrap_or(DEFAULT_PROBE_INTERVAL_SECONDS),
        threshold: p.threshold.unwrap_or(DEFAULT_PROBE_THRESHOLD),
        timeout_seconds: p.timeout_seconds,
        tls_verify: p.tls_verify,
        tls_server_name: p.tls_server_name,
        tls_ca_file: p.tls_ca_file,
        http_status: p.http_status,
    };
    errs.finish(probe)
}

fn range_from(r: pb::MinutesRange) -> MinutesRange {
    MinutesRange {
        min_minutes: r.min_minutes,
        max_minutes: r.max_minutes,
    }
}

/// Proto3 has no "unset" for plain numbers: 0 (never valid for these) means the default.
pub fn settings_from(s: pb::Settings) -> Settings {
    let d = Settings::default();
    Settings {
        udp_idle_timeout_seconds: match s.udp_idle_timeout_seconds {
            0 => d.udp_idle_timeout_seconds,
            v => v,
        },
        lab_time_scale: match s.lab_time_scale {
            0 => d.lab_time_scale,
            v => v,
        },
        inbound_idle_timeout_bounds: s.inbound_idle_timeout_bounds.map(range_from),
        outbound_idle_timeout_bounds: s.outbound_idle_timeout_bounds.map(range_from),
    }
}

/// A whole configuration (e.g. a client that keeps the model in proto form).
pub fn config_from(c: pb::Config) -> Result<cfg::Config, ValidationErrors> {
    let mut all = Vec::new();
    let mut collect = |r: Result<(), ValidationErrors>| {
        if let Err(e) = r {
            all.extend(e.0);
        }
    };
    let mut out = cfg::Config {
        settings: settings_from(c.settings.unwrap_or_default()),
        ..cfg::Config::default()
    };
    for x in c.frontends {
        collect(frontend_from(x).map(|v| out.frontends.push(v)));
    }
    for x in c.backend_pools {
        collect(pool_from(x).map(|v| out.backend_pools.push(v)));
    }
    for x in c.health_probes {
        collect(probe_from(x).map(|v| out.health_probes.push(v)));
    }
    for x in c.load_balancing_rules {
        collect(lb_rule_from(x).map(|v| out.load_balancing_rules.push(v)));
    }
    for x in c.inbound_nat_rules {
        collect(nat_rule_from(x).map(|v| out.inbound_nat_rules.push(v)));
    }
    for x in c.outbound_rules {
        collect(outbound_rule_from(x).map(|v| out.outbound_rules.push(v)));
    }
    if all.is_empty() {
        Ok(out)
    } else {
        Err(ValidationErrors(all))
    }
}

// ---------------------------------------------------------------------------------------
// Model → proto. Always total: every model value has a proto form.

pub fn frontend_to(f: &cfg::Frontend) -> pb::Frontend {
    pb::Frontend {
        name: f.name.clone(),
        address: f.address.to_string(),
        kind: match f.kind {
            FrontendKind::Public => pb::FrontendKind::Public,
            FrontendKind::Internal => pb::FrontendKind::Internal,
        } as i32,
    }
}

pub fn member_to(m: &cfg::Member) -> pb::Member {
    pb::Member {
        address: m.address.to_string(),
        weight: Some(m.weight),
        admin_state: admin_to(m.admin_state) as i32,
        drain_timeout_seconds: m.drain_timeout_seconds,
        drain_action: drain_action_to(m.drain_action) as i32,
    }
}

pub fn pool_to(p: &cfg::BackendPool) -> pb::BackendPool {
    pb::BackendPool {
        name: p.name.clone(),
        members: p.members.iter().map(member_to).collect(),
    }
}

pub fn lb_rule_to(r: &cfg::LoadBalancingRule) -> pb::LoadBalancingRule {
    pb::LoadBalancingRule {
        name: r.name.clone(),
        frontend: r.frontend.clone(),
        protocol: protocol_to(r.protocol) as i32,
        frontend_port: r.frontend_port,
        backend_pool: r.backend_pool.clone(),
        backend_port: r.backend_port,
        idle_timeout_minutes: Some(r.idle_timeout_minutes),
        tcp_reset: r.tcp_reset,
        floating_ip: r.floating_ip,
        distribution: distribution_to(r.distribution) as i32,
        health_probe: r.health_probe.clone(),
        unknown_flow: unknown_flow_to(r.unknown_flow) as i32,
    }
}

pub fn nat_rule_to(r: &cfg::InboundNatRule) -> pb::InboundNatRule {
    pb::InboundNatRule {
        name: r.name.clone(),
        frontend: r.frontend.clone(),
        protocol: protocol_to(r.protocol) as i32,
        frontend_port: r.frontend_port,
        frontend_port_range: r.frontend_port_range.map(|p| pb::PortRange {
            start: p.start,
            end: p.end,
        }),
        target: r.target.map(|t| t.to_string()),
        backend_pool: r.backend_pool.clone(),
        backend_port: r.backend_port,
        idle_timeout_minutes: Some(r.idle_timeout_minutes),
        tcp_reset: r.tcp_reset,
        floating_ip: r.floating_ip,
        unknown_flow: unknown_flow_to(r.unknown_flow) as i32,
    }
}

pub fn outbound_rule_to(r: &cfg::OutboundRule) -> pb::OutboundRule {
    pb::OutboundRule {
        name: r.name.clone(),
        frontends: r.frontends.clone(),
        backend_pool: r.backend_pool.clone(),
        protocol: protocol_to(r.protocol) as i32,
        allocated_outbound_ports: r.allocated_outbound_ports,
        idle_timeout_minutes: Some(r.idle_timeout_minutes),
        tcp_reset: r.tcp_reset,
        unknown_flow: unknown_flow_to(r.unknown_flow) as i32,
    }
}

pub fn probe_to(p: &cfg::HealthProbe) -> pb::HealthProbe {
    pb::HealthProbe {
        name: p.name.clone(),
        protocol: match p.protocol {
            ProbeProtocol::Tcp => pb::ProbeProtocol::Tcp,
            ProbeProtocol::Http => pb::ProbeProtocol::Http,
            ProbeProtocol::Https => pb::ProbeProtocol::Https,
        } as i32,
        port: p.port,
        path: p.path.clone(),
        interval_seconds: Some(p.interval_seconds),
        threshold: Some(p.threshold),
        // As configured: the default follows the interval, so an unset timeout stays unset.
        timeout_seconds: p.timeout_seconds,
        tls_verify: p.tls_verify,
        tls_server_name: p.tls_server_name.clone(),
        tls_ca_file: p.tls_ca_file.clone(),
        http_status: p.http_status.clone(),
    }
}

fn range_to(r: MinutesRange) -> pb::MinutesRange {
    pb::MinutesRange {
        min_minutes: r.min_minutes,
        max_minutes: r.max_minutes,
    }
}

pub fn settings_to(s: &Settings) -> pb::Settings {
    pb::Settings {
        udp_idle_timeout_seconds: s.udp_idle_timeout_seconds,
        lab_time_scale: s.lab_time_scale,
        inbound_idle_timeout_bounds: s.inbound_idle_timeout_bounds.map(range_to),
        outbound_idle_timeout_bounds: s.outbound_idle_timeout_bounds.map(range_to),
    }
}

pub fn config_to(c: &cfg::Config, generation: u64) -> pb::Config {
    pb::Config {
        settings: Some(settings_to(&c.settings)),
        frontends: c.frontends.iter().map(frontend_to).collect(),
        backend_pools: c.backend_pools.iter().map(pool_to).collect(),
        health_probes: c.health_probes.iter().map(probe_to).collect(),
        load_balancing_rules: c.load_balancing_rules.iter().map(lb_rule_to).collect(),
        inbound_nat_rules: c.inbound_nat_rules.iter().map(nat_rule_to).collect(),
        outbound_rules: c.outbound_rules.iter().map(outbound_rule_to).collect(),
        generation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_round_trips_through_proto() {
        let text = include_str!("../../../docs/examples/xlb.toml");
        let config = cfg::Config::from_toml_str(text).unwrap();
        let back = config_from(config_to(&config, 7)).unwrap();
        assert_eq!(back, config);
    }

    #[test]
    fn bad_ip_and_unknown_enum_name_the_field() {
        let err = frontend_from(pb::Frontend {
            name: "web".into(),
            address: "300.1.1.1".into(),
            kind: 42,
        })
        .unwrap_err();
        let paths: Vec<_> = err.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["frontends[web].address", "frontends[web].kind"]);
        assert_eq!(err.0[0].value, "\"300.1.1.1\"");
        assert_eq!(err.0[1].value, "42");
    }

    #[test]
    fn unset_optionals_take_model_defaults() {
        let r = lb_rule_from(pb::LoadBalancingRule {
            name: "r".into(),
            protocol: pb::Protocol::Tcp as i32,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(r.idle_timeout_minutes, 4);
        assert_eq!(r.distribution, Distribution::FiveTuple);
        let m = member_only_from(
            "p",
            pb::Member {
                address: "198.18.2.1".into(),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(m, cfg::Member::new("198.18.2.1".parse().unwrap()));
    }
}
