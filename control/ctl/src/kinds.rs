//! The commands of every object kind, written once: `create`, `update` (read, change the
//! given fields, write), `delete`, `get`, `list` over [`CliKind`], which says per kind how its
//! options change the proto object and how it shows as table rows.

use clap::Subcommand;
use serde_json::json;
use xlb_api::server::Client;
use xlb_api::Remote;
use xlb_engine::config::{
    BackendPool, Frontend, HealthProbe, InboundNatRule, LoadBalancingRule, OutboundRule,
};
use xlb_proto::v1 as pb;

use crate::args::{
    AdminArg, DistArg, DrainArg, FlowArgs, FrontendArgs, KindArg, LbRuleArgs, NatRuleArgs,
    OutboundRuleArgs, PoolArgs, ProbeArgs, ProbeProtoArg,
};
use crate::output::{changed, clear_empty, name_of, opt, print_json, table, yes};
use crate::{invalid, Res};

/// create / update / delete / get / list of one object kind.
#[derive(Subcommand, Debug)]
pub enum Crud<A: clap::Args> {
    /// Create; fields marked "required" must be given.
    Create(A),
    /// Change the given fields; the others keep their values.
    Update(A),
    /// Delete (refused while a rule references it).
    Delete { name: String },
    /// Show one.
    Get { name: String },
    /// Show all.
    List,
}

/// What the command line adds to a kind: its options and its table.
pub trait CliKind: Remote {
    type Args: clap::Args;
    const HEADERS: &'static [&'static str];
    fn name_given(a: &Self::Args) -> &str;
    /// `p` with the name and every field the options give.
    fn apply(p: Self::Proto, a: &Self::Args) -> Res<Self::Proto>;
    fn rows(&self) -> Vec<Vec<String>>;
}

/// Runs one create / update / delete / get / list command.
pub async fn crud<K: CliKind>(c: &mut Client, cmd: Crud<K::Args>, json: bool) -> Res {
    match cmd {
        Crud::Create(a) => {
            let p = K::apply(K::Proto::default(), &a)?;
            let (p, generation) = K::answer(K::create(c, K::create_request(p)).await?);
            show::<K>(p.into_iter().collect(), generation, json, Some("created"))
        }
        Crud::Update(a) => {
            let (current, _) = K::answer(K::get(c, K::name_given(&a).to_string()).await?);
            let p = K::apply(current.unwrap_or_default(), &a)?;
            let (p, generation) = K::answer(K::update(c, K::update_request(p)).await?);
            show::<K>(p.into_iter().collect(), generation, json, Some("updated"))
        }
        Crud::Delete { name } => {
            let r = K::delete(c, name.clone()).await?;
            if json {
                print_json(&json!({"generation": r.generation, "deleted": name}));
            } else {
                changed("deleted", K::KIND.as_str(), &name, r.generation);
            }
            Ok(())
        }
        Crud::Get { name } => {
            let (p, generation) = K::answer(K::get(c, name).await?);
            show::<K>(p.into_iter().collect(), generation, json, None)
        }
        Crud::List => {
            let (all, generation) = K::list_answer(K::list(c).await?);
            show::<K>(all, generation, json, None)
        }
    }
}

/// Prints objects as the configuration holds them (`--json`) or as a table, after
/// "`verb` `kind` `name`" for a change.
pub fn show<K: CliKind>(
    items: Vec<K::Proto>,
    generation: u64,
    json: bool,
    verb: Option<&str>,
) -> Res {
    let model = items
        .into_iter()
        .map(K::from_proto)
        .collect::<Result<Vec<K>, _>>()?;
    if json {
        print_json(&json!({"generation": generation, K::TABLE: model}));
        return Ok(());
    }
    if let (Some(verb), Some(o)) = (verb, model.first()) {
        changed(verb, K::KIND.as_str(), o.name(), generation);
    }
    let rows: Vec<Vec<String>> = model.iter().flat_map(K::rows).collect();
    table(K::HEADERS, &rows);
    Ok(())
}

/// Sets `field` to `value` where the option was given.
fn set<T: Clone>(field: &mut T, value: &Option<T>) {
    if let Some(v) = value {
        *field = v.clone();
    }
}

/// The flow settings every rule kind has.
fn set_flows(a: &FlowArgs, idle: &mut Option<u32>, tcp_reset: &mut bool, unknown: &mut i32) {
    set(idle, &a.idle_timeout.map(Some));
    set(tcp_reset, &a.tcp_reset);
    set(unknown, &a.unknown_flow.map(|v| v.pb()));
}

impl CliKind for Frontend {
    type Args = FrontendArgs;
    const HEADERS: &'static [&'static str] = &["NAME", "ADDRESS", "KIND"];
    fn name_given(a: &FrontendArgs) -> &str {
        &a.name
    }
    fn apply(mut f: pb::Frontend, a: &FrontendArgs) -> Res<pb::Frontend> {
        f.name = a.name.clone();
        set(&mut f.address, &a.address);
        if let Some(k) = a.kind {
            f.kind = match k {
                KindArg::Public => pb::FrontendKind::Public,
                KindArg::Internal => pb::FrontendKind::Internal,
            } as i32;
        }
        Ok(f)
    }
    fn rows(&self) -> Vec<Vec<String>> {
        vec![vec![
            self.name.clone(),
            self.address.to_string(),
            name_of(&self.kind),
        ]]
    }
}

impl CliKind for BackendPool {
    type Args = PoolArgs;
    const HEADERS: &'static [&'static str] = &[
        "POOL",
        "MEMBER",
        "WEIGHT",
        "ADMIN",
        "DRAIN_TIMEOUT",
        "DRAIN_ACTION",
    ];
    fn name_given(a: &PoolArgs) -> &str {
        &a.name
    }
    /// The given members replace the pool's (on update too).
    fn apply(mut p: pb::BackendPool, a: &PoolArgs) -> Res<pb::BackendPool> {
        p.name = a.name.clone();
        p.members = a
            .members
            .iter()
            .map(|m| parse_member(m))
            .collect::<Res<Vec<_>>>()?;
        Ok(p)
    }
    fn rows(&self) -> Vec<Vec<String>> {
        if self.members.is_empty() {
            return vec![vec![
                self.name.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]];
        }
        self.members
            .iter()
            .map(|m| {
                vec![
                    self.name.clone(),
                    m.address.to_string(),
                    m.weight.to_string(),
                    name_of(&m.admin_state),
                    m.drain_timeout_seconds
                        .map_or("-".into(), |t| format!("{t}s")),
                    name_of(&m.drain_action),
                ]
            })
            .collect()
    }
}

/// `ADDRESS[,weight=N][,admin=none|up|down][,drain_timeout=SECS][,drain_action=reset|idle]`.
fn parse_member(text: &str) -> Res<pb::Member> {
    let mut parts = text.split(',');
    let address = parts.next().unwrap_or_default().trim().to_string();
    let mut m = pb::Member {
        address,
        ..Default::default()
    };
    for p in parts {
        match p.trim().split_once('=') {
            Some(("weight", w)) => {
                m.weight = Some(w.parse().map_err(|_| {
                    invalid(format!(
                        "--member = {text:?}: weight must be a whole number (allowed: 1–1000)"
                    ))
                })?)
            }
            Some(("admin", a)) => {
                m.admin_state = match a {
                    "none" => AdminArg::None,
                    "up" => AdminArg::Up,
                    "down" => AdminArg::Down,
                    _ => {
                        return Err(invalid(format!(
                            "--member = {text:?}: unknown admin state (allowed: none, up, down)"
                        )))
                    }
                }
                .pb()
            }
            Some(("drain_timeout", t)) => {
                m.drain_timeout_seconds = Some(t.parse().map_err(|_| {
                    invalid(format!(
                        "--member = {text:?}: drain_timeout must be whole seconds \
                         (allowed: 0–3600)"
                    ))
                })?)
            }
            Some(("drain_action", a)) => {
                m.drain_action = match a {
                    "reset" => DrainArg::Reset,
                    "idle" => DrainArg::Idle,
                    _ => {
                        return Err(invalid(format!(
                            "--member = {text:?}: unknown drain action (allowed: reset, idle)"
                        )))
                    }
                }
                .pb()
            }
            _ => {
                return Err(invalid(format!(
                    "--member = {text:?}: expected ADDRESS[,weight=N][,admin=none|up|down]\
                     [,drain_timeout=SECS][,drain_action=reset|idle] \
                     (allowed: weight, admin, drain_timeout, drain_action)"
                )))
            }
        }
    }
    Ok(m)
}

impl CliKind for LoadBalancingRule {
    type Args = LbRuleArgs;
    const HEADERS: &'static [&'static str] = &[
        "NAME",
        "FRONTEND",
        "PROTO",
        "PORT",
        "POOL",
        "BACKEND_PORT",
        "IDLE",
        "TCP_RESET",
        "FLOATING_IP",
        "DISTRIBUTION",
        "PROBE",
        "UNKNOWN_FLOW",
    ];
    fn name_given(a: &LbRuleArgs) -> &str {
        &a.name
    }
    fn apply(mut r: pb::LoadBalancingRule, a: &LbRuleArgs) -> Res<pb::LoadBalancingRule> {
        r.name = a.name.clone();
        set(&mut r.frontend, &a.frontend);
        set(&mut r.protocol, &a.protocol.map(|v| v.pb()));
        set(&mut r.frontend_port, &a.frontend_port);
        set(&mut r.backend_pool, &a.pool);
        set(&mut r.backend_port, &a.backend_port);
        set_flows(
            &a.flows,
            &mut r.idle_timeout_minutes,
            &mut r.tcp_reset,
            &mut r.unknown_flow,
        );
        set(&mut r.floating_ip, &a.floating_ip);
        set(&mut r.distribution, &a.distribution.map(DistArg::pb));
        set(&mut r.health_probe, &a.probe.clone().map(clear_empty));
        Ok(r)
    }
    fn rows(&self) -> Vec<Vec<String>> {
        vec![vec![
            self.name.clone(),
            self.frontend.clone(),
            name_of(&self.protocol),
            self.frontend_port.to_string(),
            self.backend_pool.clone(),
            self.backend_port.to_string(),
            format!("{}m", self.idle_timeout_minutes),
            yes(self.tcp_reset),
            yes(self.floating_ip),
            name_of(&self.distribution),
            opt(&self.health_probe),
            name_of(&self.unknown_flow),
        ]]
    }
}

impl CliKind for InboundNatRule {
    type Args = NatRuleArgs;
    const HEADERS: &'static [&'static str] = &[
        "NAME",
        "FRONTEND",
        "PROTO",
        "PORTS",
        "TARGET",
        "POOL",
        "BACKEND_PORT",
        "IDLE",
        "TCP_RESET",
        "FLOATING_IP",
        "UNKNOWN_FLOW",
    ];
    fn name_given(a: &NatRuleArgs) -> &str {
        &a.name
    }
    fn apply(mut r: pb::InboundNatRule, a: &NatRuleArgs) -> Res<pb::InboundNatRule> {
        r.name = a.name.clone();
        set(&mut r.frontend, &a.frontend);
        set(&mut r.protocol, &a.protocol.map(|v| v.pb()));
        if let Some(v) = a.frontend_port {
            r.frontend_port = Some(v);
            r.frontend_port_range = None;
        }
        if let Some(v) = &a.frontend_port_range {
            r.frontend_port_range = Some(port_range(v)?);
            r.frontend_port = None;
            r.target = None;
        }
        set(&mut r.target, &a.target.clone().map(clear_empty));
        set(&mut r.backend_pool, &a.pool.clone().map(clear_empty));
        set(&mut r.backend_port, &a.backend_port);
        set_flows(
            &a.flows,
            &mut r.idle_timeout_minutes,
            &mut r.tcp_reset,
            &mut r.unknown_flow,
        );
        set(&mut r.floating_ip, &a.floating_ip);
        Ok(r)
    }
    fn rows(&self) -> Vec<Vec<String>> {
        let ports = match (self.frontend_port, self.frontend_port_range) {
            (Some(p), _) => p.to_string(),
            (None, Some(range)) => format!("{}-{}", range.start, range.end),
            (None, None) => "-".into(),
        };
        vec![vec![
            self.name.clone(),
            self.frontend.clone(),
            name_of(&self.protocol),
            ports,
            opt(&self.target),
            opt(&self.backend_pool),
            self.backend_port.to_string(),
            format!("{}m", self.idle_timeout_minutes),
            yes(self.tcp_reset),
            yes(self.floating_ip),
            name_of(&self.unknown_flow),
        ]]
    }
}

/// `START-END`.
fn port_range(v: &str) -> Res<pb::PortRange> {
    let (start, end) = v
        .split_once('-')
        .and_then(|(s, e)| Some((s.trim().parse().ok()?, e.trim().parse().ok()?)))
        .ok_or_else(|| {
            invalid(format!(
                "--frontend-port-range = {v:?}: expected START-END (allowed: 1–65535 each)"
            ))
        })?;
    Ok(pb::PortRange { start, end })
}

impl CliKind for OutboundRule {
    type Args = OutboundRuleArgs;
    const HEADERS: &'static [&'static str] = &[
        "NAME",
        "FRONTENDS",
        "POOL",
        "PROTO",
        "PORTS/MEMBER",
        "IDLE",
        "TCP_RESET",
        "UNKNOWN_FLOW",
    ];
    fn name_given(a: &OutboundRuleArgs) -> &str {
        &a.name
    }
    fn apply(mut r: pb::OutboundRule, a: &OutboundRuleArgs) -> Res<pb::OutboundRule> {
        r.name = a.name.clone();
        if !a.frontends.is_empty() {
            r.frontends = a.frontends.clone();
        }
        set(&mut r.backend_pool, &a.pool);
        set(&mut r.protocol, &a.protocol.map(|v| v.pb()));
        set(
            &mut r.allocated_outbound_ports,
            &a.ports.map(|v| (v != 0).then_some(v)),
        );
        set_flows(
            &a.flows,
            &mut r.idle_timeout_minutes,
            &mut r.tcp_reset,
            &mut r.unknown_flow,
        );
        Ok(r)
    }
    fn rows(&self) -> Vec<Vec<String>> {
        vec![vec![
            self.name.clone(),
            self.frontends.join(","),
            self.backend_pool.clone(),
            name_of(&self.protocol),
            self.allocated_outbound_ports
                .map_or_else(|| "default".to_string(), |p| p.to_string()),
            format!("{}m", self.idle_timeout_minutes),
            yes(self.tcp_reset),
            name_of(&self.unknown_flow),
        ]]
    }
}

impl CliKind for HealthProbe {
    type Args = ProbeArgs;
    const HEADERS: &'static [&'static str] = &[
        "NAME",
        "PROTO",
        "PORT",
        "PATH",
        "INTERVAL",
        "THRESHOLD",
        "TIMEOUT",
        "HTTP_STATUS",
        "TLS_VERIFY",
        "SERVER_NAME",
    ];
    fn name_given(a: &ProbeArgs) -> &str {
        &a.name
    }
    fn apply(mut p: pb::HealthProbe, a: &ProbeArgs) -> Res<pb::HealthProbe> {
        p.name = a.name.clone();
        if let Some(v) = a.protocol {
            p.protocol = (match v {
                ProbeProtoArg::Tcp => pb::ProbeProtocol::Tcp,
                ProbeProtoArg::Http => pb::ProbeProtocol::Http,
                ProbeProtoArg::Https => pb::ProbeProtocol::Https,
            }) as i32;
        }
        set(&mut p.port, &a.port);
        set(&mut p.path, &a.path.clone().map(clear_empty));
        set(&mut p.interval_seconds, &a.interval.map(Some));
        set(&mut p.threshold, &a.threshold.map(Some));
        set(
            &mut p.timeout_seconds,
            &a.timeout.map(|v| (v != 0).then_some(v)),
        );
        set(&mut p.tls_verify, &a.tls_verify);
        set(
            &mut p.tls_server_name,
            &a.server_name.clone().map(clear_empty),
        );
        set(&mut p.tls_ca_file, &a.ca_file.clone().map(clear_empty));
        set(&mut p.http_status, &a.http_status.clone().map(clear_empty));
        Ok(p)
    }
    fn rows(&self) -> Vec<Vec<String>> {
        vec![vec![
            self.name.clone(),
            name_of(&self.protocol),
            self.port.to_string(),
            opt(&self.path),
            format!("{}s", self.interval_seconds),
            self.threshold.to_string(),
            self.timeout_seconds.map_or("-".into(), |t| format!("{t}s")),
            opt(&self.http_status),
            yes(self.tls_verify),
            opt(&self.tls_server_name),
        ]]
    }
}
