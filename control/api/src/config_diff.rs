//! What a whole new configuration changes against the running one: objects added, removed or
//! changed (field by field), pool members on their own, settings one by one, and which of
//! those changes need a restart of xlbd to take effect.
//!
//! Objects are matched by name (members by address within their pool), so that the order of
//! the file does not count as a change. A reload (`SIGHUP`) and `xlbctl config apply` both
//! show this difference and apply it as one generation; an empty difference applies nothing.

use std::fmt;
use std::net::IpAddr;

use serde::Serialize;
use serde_json::{Map, Value};
use xlb_engine::config::{BackendPool, Config, Member};

/// Settings that the daemon takes once, at start: a new value is reported, not applied, and
/// the running value is kept. The lab time scale also scales timers outside the rule set (the
/// status interval, the health probes' and the self-probe's intervals, the metrics).
pub const RESTART_ONLY_SETTINGS: &[&str] = &["lab_time_scale"];

/// The parts of a configuration a change can be about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Section {
    Settings,
    Frontend,
    BackendPool,
    Member,
    HealthProbe,
    LoadBalancingRule,
    InboundNatRule,
    OutboundRule,
}

impl Section {
    pub fn as_str(self) -> &'static str {
        match self {
            Section::Settings => "settings",
            Section::Frontend => "frontend",
            Section::BackendPool => "backend_pool",
            Section::Member => "member",
            Section::HealthProbe => "health_probe",
            Section::LoadBalancingRule => "load_balancing_rule",
            Section::InboundNatRule => "inbound_nat_rule",
            Section::OutboundRule => "outbound_rule",
        }
    }

    pub fn parse(s: &str) -> Option<Section> {
        [
            Section::Settings,
            Section::Frontend,
            Section::BackendPool,
            Section::Member,
            Section::HealthProbe,
            Section::LoadBalancingRule,
            Section::InboundNatRule,
            Section::OutboundRule,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

impl fmt::Display for Section {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Added,
    Removed,
    Changed,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Added => "added",
            Op::Removed => "removed",
            Op::Changed => "changed",
        }
    }
}

/// One field's old and new value, as text (`None`: not set).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FieldChange {
    pub field: String,
    pub old: Option<String>,
    pub new: Option<String>,
}

/// One object (or setting) added, removed or changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Change {
    pub section: Section,
    /// The object's name; `POOL/ADDRESS` for a member; the setting's name for settings.
    pub name: String,
    pub op: Op,
    /// What changed (for `Changed`; for `Added` the new object's fields, for `Removed` none).
    pub fields: Vec<FieldChange>,
    /// Takes effect only after a restart: not applied, the running value is kept.
    pub needs_restart: bool,
}

impl Change {
    /// `a -> b` per field, `field=a->b,…` (the event lines' form).
    pub fn fields_text(&self) -> String {
        self.fields
            .iter()
            .map(|f| {
                format!(
                    "{}={}->{}",
                    f.field,
                    f.old.as_deref().unwrap_or("-"),
                    f.new.as_deref().unwrap_or("-")
                )
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Every change from one configuration to another: settings first, then each table of the
/// file in turn (what it removes, then what it changes or adds, in the new file's order).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ConfigDiff {
    pub changes: Vec<Change>,
}

impl ConfigDiff {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// Whether applying it changes the running configuration (any change that does not need
    /// a restart).
    pub fn applies_anything(&self) -> bool {
        self.changes.iter().any(|c| !c.needs_restart)
    }

    /// The changes that need a restart.
    pub fn restart_only(&self) -> impl Iterator<Item = &Change> {
        self.changes.iter().filter(|c| c.needs_restart)
    }

    /// `N added, N removed, N changed[, N need a restart]`.
    pub fn summary(&self) -> String {
        let count = |op| self.changes.iter().filter(|c| c.op == op).count();
        let mut s = format!(
            "{} added, {} removed, {} changed",
            count(Op::Added),
            count(Op::Removed),
            count(Op::Changed)
        );
        let restart = self.restart_only().count();
        if restart > 0 {
            s.push_str(&format!(", {restart} need a restart"));
        }
        s
    }
}

/// The changes from `old` to `new`.
pub fn diff(old: &Config, new: &Config) -> ConfigDiff {
    let mut out = Vec::new();
    settings(old, new, &mut out);
    objects(Section::Frontend, &old.frontends, &new.frontends, &mut out);
    pools(&old.backend_pools, &new.backend_pools, &mut out);
    objects(
        Section::HealthProbe,
        &old.health_probes,
        &new.health_probes,
        &mut out,
    );
    objects(
        Section::LoadBalancingRule,
        &old.load_balancing_rules,
        &new.load_balancing_rules,
        &mut out,
    );
    objects(
        Section::InboundNatRule,
        &old.inbound_nat_rules,
        &new.inbound_nat_rules,
        &mut out,
    );
    objects(
        Section::OutboundRule,
        &old.outbound_rules,
        &new.outbound_rules,
        &mut out,
    );
    ConfigDiff { changes: out }
}

/// `new` with the running value of every restart-only setting (what is applied).
pub fn keep_restart_only(running: &Config, mut new: Config) -> Config {
    // One line per setting in RESTART_ONLY_SETTINGS.
    new.settings.lab_time_scale = running.settings.lab_time_scale;
    new
}

fn settings(old: &Config, new: &Config, out: &mut Vec<Change>) {
    let (a, b) = (fields_of(&old.settings), fields_of(&new.settings));
    for f in field_changes(&a, &b, &[]) {
        out.push(Change {
            section: Section::Settings,
            name: f.field.clone(),
            op: Op::Changed,
            needs_restart: RESTART_ONLY_SETTINGS.contains(&f.field.as_str()),
            fields: vec![f],
        });
    }
}

/// An object with a name, serialized as the file holds it.
trait Named: Serialize {
    fn name(&self) -> &str;
}

macro_rules! named {
    ($($t:ty),*) => {$(
        impl Named for $t {
            fn name(&self) -> &str {
                &self.name
            }
        }
    )*};
}
named!(
    xlb_engine::config::Frontend,
    xlb_engine::config::HealthProbe,
    xlb_engine::config::LoadBalancingRule,
    xlb_engine::config::InboundNatRule,
    xlb_engine::config::OutboundRule,
    BackendPool
);

fn objects<T: Named>(section: Section, old: &[T], new: &[T], out: &mut Vec<Change>) {
    object_changes(section, old, new, &[], out);
}

/// Added, removed and changed objects; `skip`: fields compared elsewhere.
fn object_changes<T: Named>(
    section: Section,
    old: &[T],
    new: &[T],
    skip: &[&str],
    out: &mut Vec<Change>,
) {
    for o in old {
        if !new.iter().any(|n| n.name() == o.name()) {
            out.push(Change {
                section,
                name: o.name().to_string(),
                op: Op::Removed,
                fields: Vec::new(),
                needs_restart: false,
            });
        }
    }
    for n in new {
        let b = fields_of(n);
        match old.iter().find(|o| o.name() == n.name()) {
            None => out.push(Change {
                section,
                name: n.name().to_string(),
                op: Op::Added,
                fields: field_changes(&Map::new(), &b, &["name"])
                    .into_iter()
                    .filter(|f| !skip.contains(&f.field.as_str()))
                    .collect(),
                needs_restart: false,
            }),
            Some(o) => {
                let mut skip_all = vec!["name"];
                skip_all.extend_from_slice(skip);
                let fields = field_changes(&fields_of(o), &b, &skip_all);
                if !fields.is_empty() {
                    out.push(Change {
                        section,
                        name: n.name().to_string(),
                        op: Op::Changed,
                        fields,
                        needs_restart: false,
                    });
                }
            }
        }
    }
}

/// Pools as objects (without their members), then each member on its own.
fn pools(old: &[BackendPool], new: &[BackendPool], out: &mut Vec<Change>) {
    object_changes(Section::BackendPool, old, new, &["members"], out);
    let none: Vec<Member> = Vec::new();
    let members = |pools: &[BackendPool], name: &str| -> Vec<Member> {
        pools
            .iter()
            .find(|p| p.name == name)
            .map_or_else(|| none.clone(), |p| p.members.clone())
    };
    let mut names: Vec<&str> = old.iter().map(|p| p.name.as_str()).collect();
    for p in new {
        if !names.contains(&p.name.as_str()) {
            names.push(&p.name);
        }
    }
    for pool in names {
        let (a, b) = (members(old, pool), members(new, pool));
        member_changes(pool, &a, &b, out);
    }
}

fn member_changes(pool: &str, old: &[Member], new: &[Member], out: &mut Vec<Change>) {
    let key = |a: IpAddr| xlb_engine::Addr::from(a);
    let name = |m: &Member| format!("{pool}/{}", m.address);
    for o in old {
        if !new.iter().any(|n| key(n.address) == key(o.address)) {
            out.push(Change {
                section: Section::Member,
                name: name(o),
                op: Op::Removed,
                fields: Vec::new(),
                needs_restart: false,
            });
        }
    }
    for n in new {
        let b = fields_of(n);
        let (op, fields) = match old.iter().find(|o| key(o.address) == key(n.address)) {
            None => (Op::Added, field_changes(&Map::new(), &b, &["address"])),
            Some(o) => (Op::Changed, field_changes(&fields_of(o), &b, &["address"])),
        };
        if op == Op::Added || !fields.is_empty() {
            out.push(Change {
                section: Section::Member,
                name: name(n),
                op,
                fields,
                needs_restart: false,
            });
        }
    }
}

/// An object's fields as the file writes them (unset optional fields are absent).
fn fields_of<T: Serialize>(v: &T) -> Map<String, Value> {
    match serde_json::to_value(v) {
        Ok(Value::Object(m)) => m,
        // Every model type is a struct; anything else has no fields to compare.
        _ => Map::new(),
    }
}

/// The fields whose value differs, by name.
fn field_changes(
    a: &Map<String, Value>,
    b: &Map<String, Value>,
    skip: &[&str],
) -> Vec<FieldChange> {
    let mut keys: Vec<&String> = b.keys().collect();
    keys.extend(a.keys().filter(|k| !b.contains_key(*k)));
    keys.sort();
    keys.into_iter()
        .filter(|k| !skip.contains(&k.as_str()))
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| FieldChange {
            field: k.clone(),
            old: a.get(k).map(text),
            new: b.get(k).map(text),
        })
        .collect()
}

/// A value as an operator reads it: strings bare, the rest as compact JSON.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(items) => {
            format!("[{}]", items.iter().map(text).collect::<Vec<_>>().join(","))
        }
        Value::Object(m) => format!(
            "{{{}}}",
            m.iter()
                .map(|(k, v)| format!("{k}={}", text(v)))
                .collect::<Vec<_>>()
                .join(",")
        ),
        other => other.to_string(),
    }
}

/// The difference as the API answers it.
pub fn to_proto(d: &ConfigDiff) -> Vec<xlb_proto::v1::ConfigChange> {
    use xlb_proto::v1 as pb;
    d.changes
        .iter()
        .map(|c| pb::ConfigChange {
            section: c.section.as_str().to_string(),
            name: c.name.clone(),
            op: match c.op {
                Op::Added => pb::ChangeOp::Added,
                Op::Removed => pb::ChangeOp::Removed,
                Op::Changed => pb::ChangeOp::Changed,
            } as i32,
            fields: c
                .fields
                .iter()
                .map(|f| pb::FieldChange {
                    field: f.field.clone(),
                    old: f.old.clone(),
                    new: f.new.clone(),
                })
                .collect(),
            needs_restart: c.needs_restart,
        })
        .collect()
}

/// The API's answer as a difference (a client's side); unknown sections and operations,
/// from a newer server, are kept as `changed` of the closest kind rather than dropped.
pub fn from_proto(changes: Vec<xlb_proto::v1::ConfigChange>) -> ConfigDiff {
    use xlb_proto::v1 as pb;
    ConfigDiff {
        changes: changes
            .into_iter()
            .map(|c| Change {
                section: Section::parse(&c.section).unwrap_or(Section::Settings),
                name: c.name,
                op: match pb::ChangeOp::try_from(c.op) {
                    Ok(pb::ChangeOp::Added) => Op::Added,
                    Ok(pb::ChangeOp::Removed) => Op::Removed,
                    _ => Op::Changed,
                },
                fields: c
                    .fields
                    .into_iter()
                    .map(|f| FieldChange {
                        field: f.field,
                        old: f.old,
                        new: f.new,
                    })
                    .collect(),
                needs_restart: c.needs_restart,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[settings]
lab_time_scale = 60

[[frontends]]
name = "vip"
address = "198.18.0.100"
kind = "public"

[[backend_pools]]
name = "web"
members = [{ address = "198.18.1.11" }, { address = "198.18.1.12", weight = 2 }]

[[load_balancing_rules]]
name = "web"
frontend = "vip"
protocol = "TCP"
frontend_port = 80
backend_pool = "web"
backend_port = 8080
"#;

    fn parse(s: &str) -> Config {
        Config::from_toml_str(s).unwrap()
    }

    fn edited(f: impl FnOnce(&mut Config)) -> Config {
        let mut c = parse(BASE);
        f(&mut c);
        c
    }

    fn brief(d: &ConfigDiff) -> Vec<String> {
        d.changes
            .iter()
            .map(|c| {
                format!(
                    "{} {} {}{}{}",
                    c.op.as_str(),
                    c.section,
                    c.name,
                    if c.fields.is_empty() { "" } else { " " },
                    c.fields_text()
                )
            })
            .collect()
    }

    #[test]
    fn the_same_configuration_is_no_change() {
        let c = parse(BASE);
        assert!(diff(&c, &c).is_empty());
        // Through TOML and back (what `xlbctl config get` prints): still nothing.
        let again = parse(&c.to_toml_string().unwrap());
        assert!(diff(&c, &again).is_empty());
    }

    #[test]
    fn order_of_objects_is_not_a_change() {
        let c = edited(|c| {
            c.frontends.push(xlb_engine::config::Frontend {
                name: "vip2".into(),
                address: "198.18.0.101".parse().unwrap(),
                kind: xlb_engine::config::FrontendKind::Public,
            });
        });
        let mut reordered = c.clone();
        reordered.frontends.reverse();
        reordered.backend_pools[0].members.reverse();
        assert!(
            diff(&c, &reordered).is_empty(),
            "{:?}",
            diff(&c, &reordered)
        );
    }

    #[test]
    fn rules_added_removed_and_changed_field_by_field() {
        let old = parse(BASE);
        let new = edited(|c| {
            let mut r = c.load_balancing_rules[0].clone();
            c.load_balancing_rules[0].idle_timeout_minutes = 10;
            c.load_balancing_rules[0].tcp_reset = true;
            r.name = "web81".into();
            r.frontend_port = 81;
            c.load_balancing_rules.push(r);
        });
        assert_eq!(
            brief(&diff(&old, &new)),
            [
                "changed load_balancing_rule web idle_timeout_minutes=4->10,tcp_reset=false->true",
                "added load_balancing_rule web81 backend_pool=-->web,backend_port=-->8080,\
                 distribution=-->five_tuple,floating_ip=-->false,frontend=-->vip,\
                 frontend_port=-->81,idle_timeout_minutes=-->4,protocol=-->TCP,\
                 tcp_reset=-->false,unknown_flow=-->drop",
            ]
        );
        assert_eq!(
            brief(&diff(&new, &old)),
            [
                "removed load_balancing_rule web81",
                "changed load_balancing_rule web idle_timeout_minutes=10->4,tcp_reset=true->false",
            ]
        );
    }

    #[test]
    fn members_are_changes_of_their_own() {
        let old = parse(BASE);
        let new = edited(|c| {
            let p = &mut c.backend_pools[0];
            p.members.remove(0);
            p.members[0].weight = 5;
            p.members.push(Member {
                address: "198.18.1.13".parse().unwrap(),
                weight: 1,
                admin_state: xlb_engine::config::AdminState::Down,
                drain_timeout_seconds: None,
                drain_action: Default::default(),
            });
        });
        assert_eq!(
            brief(&diff(&old, &new)),
            [
                "removed member web/198.18.1.11",
                "changed member web/198.18.1.12 weight=2->5",
                "added member web/198.18.1.13 admin_state=-->down,weight=-->1",
            ]
        );
    }

    #[test]
    fn a_new_pool_lists_its_members() {
        let old = parse(BASE);
        let new = edited(|c| {
            c.backend_pools.push(BackendPool {
                name: "api".into(),
                members: vec![Member {
                    address: "2001:db8:1::11".parse().unwrap(),
                    weight: 1,
                    admin_state: Default::default(),
                    drain_timeout_seconds: None,
                    drain_action: Default::default(),
                }],
            })
        });
        assert_eq!(
            brief(&diff(&old, &new)),
            [
                "added backend_pool api",
                "added member api/2001:db8:1::11 admin_state=-->none,weight=-->1",
            ]
        );
        assert_eq!(
            brief(&diff(&new, &old)),
            [
                "removed backend_pool api",
                "removed member api/2001:db8:1::11"
            ]
        );
    }

    #[test]
    fn settings_one_by_one_and_the_lab_time_scale_needs_a_restart() {
        let old = parse(BASE);
        let new = edited(|c| {
            c.settings.udp_idle_timeout_seconds = 30;
            c.settings.lab_time_scale = 1;
            c.settings.outbound_idle_timeout_bounds = Some(xlb_engine::config::MinutesRange {
                min_minutes: 4,
                max_minutes: 200,
            });
        });
        let d = diff(&old, &new);
        assert_eq!(
            brief(&d),
            [
                "changed settings lab_time_scale lab_time_scale=60->1",
                "changed settings outbound_idle_timeout_bounds \
                 outbound_idle_timeout_bounds=-->{max_minutes=200,min_minutes=4}",
                "changed settings udp_idle_timeout_seconds udp_idle_timeout_seconds=240->30",
            ]
        );
        let restart: Vec<&str> = d.restart_only().map(|c| c.name.as_str()).collect();
        assert_eq!(restart, ["lab_time_scale"]);
        assert!(d.applies_anything());
        assert_eq!(
            d.summary(),
            "0 added, 0 removed, 3 changed, 1 need a restart"
        );
        // What is applied keeps the running scale; the rest is the new file.
        let applied = keep_restart_only(&old, new.clone());
        assert_eq!(applied.settings.lab_time_scale, 60);
        assert_eq!(applied.settings.udp_idle_timeout_seconds, 30);
        let only_scale = edited(|c| c.settings.lab_time_scale = 1);
        assert!(!diff(&old, &only_scale).applies_anything());
    }

    #[test]
    fn sections_parse_back() {
        for s in [Section::Settings, Section::Member, Section::OutboundRule] {
            assert_eq!(Section::parse(s.as_str()), Some(s));
        }
        assert_eq!(Section::parse("nope"), None);
    }
}
