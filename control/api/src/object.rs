//! [`Object`]: how [`crate::ControlState`] finds, creates, updates and deletes each kind of
//! configuration object, and which objects reference it; [`Kind`] names the kinds.

use std::fmt;

use xlb_engine::config::{
    BackendPool, Config, Frontend, HealthProbe, InboundNatRule, LoadBalancingRule, OutboundRule,
};

/// The kinds of configuration objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Frontend,
    BackendPool,
    HealthProbe,
    LoadBalancingRule,
    InboundNatRule,
    OutboundRule,
    Member,
}

impl Kind {
    /// As in configuration paths and TOML tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Frontend => "frontend",
            Kind::BackendPool => "backend pool",
            Kind::HealthProbe => "health probe",
            Kind::LoadBalancingRule => "load-balancing rule",
            Kind::InboundNatRule => "inbound NAT rule",
            Kind::OutboundRule => "outbound rule",
            Kind::Member => "pool member",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A configuration object kind that [`ControlState`] manages generically.
pub trait Object: Clone + Send + 'static {
    const KIND: Kind;
    fn name(&self) -> &str;
    fn all(c: &Config) -> &Vec<Self>;
    fn all_mut(c: &mut Config) -> &mut Vec<Self>;
    /// Configuration paths of the objects that reference the one named `name`.
    fn used_by(_c: &Config, _name: &str) -> Vec<String> {
        Vec::new()
    }
}

macro_rules! objects {
    ($($t:ty => $kind:ident, $table:ident $(, $used_by:ident)?;)*) => {$(
        impl Object for $t {
            const KIND: Kind = Kind::$kind;
            fn name(&self) -> &str {
                &self.name
            }
            fn all(c: &Config) -> &Vec<Self> {
                &c.$table
            }
            fn all_mut(c: &mut Config) -> &mut Vec<Self> {
                &mut c.$table
            }
            $(fn used_by(c: &Config, name: &str) -> Vec<String> {
                $used_by(c, name)
            })?
        }
    )*};
}

// type => its kind, its table in the configuration, what finds the objects that reference one.
objects! {
    Frontend => Frontend, frontends, frontend_used_by;
    BackendPool => BackendPool, backend_pools, pool_used_by;
    HealthProbe => HealthProbe, health_probes, probe_used_by;
    LoadBalancingRule => LoadBalancingRule, load_balancing_rules;
    InboundNatRule => InboundNatRule, inbound_nat_rules;
    OutboundRule => OutboundRule, outbound_rules;
}

/// Configuration paths of the rules for which the predicates hold.
fn rules_where(
    c: &Config,
    lb: impl Fn(&LoadBalancingRule) -> bool,
    nat: impl Fn(&InboundNatRule) -> bool,
    out: impl Fn(&OutboundRule) -> bool,
) -> Vec<String> {
    let path = |table: &str, name: &str| format!("{table}[{name}]");
    let lb = (c.load_balancing_rules.iter().filter(|r| lb(r)))
        .map(|r| path("load_balancing_rules", &r.name));
    let nat =
        (c.inbound_nat_rules.iter().filter(|r| nat(r))).map(|r| path("inbound_nat_rules", &r.name));
    let out = (c.outbound_rules.iter().filter(|r| out(r))).map(|r| path("outbound_rules", &r.name));
    lb.chain(nat).chain(out).collect()
}

fn frontend_used_by(c: &Config, name: &str) -> Vec<String> {
    rules_where(
        c,
        |r| r.frontend == name,
        |r| r.frontend == name,
        |r| r.frontends.iter().any(|f| f == name),
    )
}

fn pool_used_by(c: &Config, name: &str) -> Vec<String> {
    rules_where(
        c,
        |r| r.backend_pool == name,
        |r| r.backend_pool.as_deref() == Some(name),
        |r| r.backend_pool == name,
    )
}

fn probe_used_by(c: &Config, name: &str) -> Vec<String> {
    rules_where(
        c,
        |r| r.health_probe.as_deref() == Some(name),
        |_| false,
        |_| false,
    )
}
