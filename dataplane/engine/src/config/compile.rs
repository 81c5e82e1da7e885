//! Compilation of a valid [`Config`] into the immutable [`RuleSet`] the workers index.
//!
//! Everything the per-packet path needs is computed here: lab-time-scaled durations, the
//! effective TCP reset, the (protocol, frontend, port) table, the Maglev tables of healthy
//! members, and the SNAT port blocks.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::health::MemberHealth;
use super::validate::allocation_of;
use super::{
    validate, BackendPool, Config, Frontend, FrontendKind, ValidationErrors, SNAT_FIRST_PORT,
    SNAT_PORTS_PER_IP,
};
use crate::addr::Addr;
use crate::ruleset::{
    Backend, CompiledRule, InboundKey, OutboundEntry, OutboundKey, PortBlock, RuleId, RuleKind,
    RuleParams, RuleSet, Selector, Timers,
};
use crate::select::{PoolTable, TableInput};
use crate::time::{mins, secs};

/// Validates `config` and compiles it. Rules keep the id they had in `previous` (same kind
/// and name); new rules take the lowest id that `previous` does not use, so a deleted rule's
/// id is not handed to another rule in the very next generation, while flows of the deleted
/// rule may still be draining.
pub fn compile(
    config: &Config,
    previous: Option<&RuleSet>,
    health: &MemberHealth,
    generation: u64,
) -> Result<RuleSet, ValidationErrors> {
    compile_releasing(config, previous, health, generation, &HashSet::new())
}

/// [`compile`], releasing the retired rules in `drained`: rules deleted earlier whose flows
/// no worker holds any more (the daemon learns this from the workers' per-rule flow counts).
/// Every other rule of `previous` that `config` no longer has is kept as a retired rule: its
/// flows keep its last settings, and its id is not handed to a new rule, so that a new rule
/// never inherits a deleted rule's flows or counters.
pub fn compile_releasing(
    config: &Config,
    previous: Option<&RuleSet>,
    health: &MemberHealth,
    generation: u64,
    drained: &HashSet<RuleId>,
) -> Result<RuleSet, ValidationErrors> {
    validate(config)?;
    let scale = u64::from(config.settings.lab_time_scale.max(1));
    let timers = Timers {
        udp_idle: secs(u64::from(config.settings.udp_idle_timeout_seconds)),
        ..Timers::default()
    }
    .scaled(scale);
    let mut rs = RuleSet::empty(generation, timers);
    let mut ids = Ids::new(previous, generation);

    let frontends: HashMap<&str, &Frontend> = config
        .frontends
        .iter()
        .map(|f| (f.name.as_str(), f))
        .collect();
    let pools: HashMap<&str, &BackendPool> = config
        .backend_pools
        .iter()
        .map(|p| (p.name.as_str(), p))
        .collect();
    for fe in &config.frontends {
        rs.frontends.insert(Addr::from(fe.address));
    }
    rs.members = config
        .backend_pools
        .iter()
        .flat_map(|p| p.members.iter().map(|m| Addr::from(m.address)))
        .chain(
            config
                .inbound_nat_rules
                .iter()
                .filter_map(|r| r.target.map(Addr::from)),
        )
        .collect();
    rs.members.sort_unstable();
    rs.members.dedup();
    let mut tables = Tables::new(previous, health);
    let idle = |minutes: u32| mins(u64::from(minutes)) / scale;

    for r in &config.load_balancing_rules {
        let (id, since) = ids.take(RuleKind::LoadBalancing, &r.name)?;
        // Validation guarantees every reference resolves.
        let (fe, pool) = (
            frontends[r.frontend.as_str()],
            pools[r.backend_pool.as_str()],
        );
        let ha = r.is_ha_ports();
        let addr = Addr::from(fe.address);
        if ha {
            rs.ha_ports.insert(addr, id);
        } else {
            for &p in r.protocol.ip_protos() {
                rs.inbound
                    .insert(InboundKey::new(p, addr, r.frontend_port as u16), id);
            }
        }
        let params = RuleParams {
            kind: RuleKind::LoadBalancing,
            name: Arc::from(r.name.as_str()),
            idle_timeout: idle(r.idle_timeout_minutes),
            // HA-ports rules on internal frontends never reset on idle.
            tcp_reset: r.tcp_reset && !(ha && fe.kind == FrontendKind::Internal),
            unknown_flow: r.unknown_flow,
            floating_ip: r.floating_ip,
        };
        let selector = Selector::LoadBalancing {
            pool: tables.get(pool),
            distribution: r.distribution,
            backend_port: (!ha).then_some(r.backend_port as u16),
        };
        rs.set_rule(id, params, selector, since);
    }

    for r in &config.inbound_nat_rules {
        let (id, since) = ids.take(RuleKind::InboundNat, &r.name)?;
        let fe = frontends[r.frontend.as_str()];
        let addr = Addr::from(fe.address);
        let pool = r.backend_pool.as_deref().map(|p| pools[p]);
        let backend_port = r.backend_port as u16;
        let (ports, selector) = match (r.frontend_port, r.frontend_port_range, r.target) {
            (Some(port), _, Some(target)) => {
                let eligible = match pool {
                    Some(pool) => {
                        let t = Addr::from(target);
                        pool.members
                            .iter()
                            .find(|m| Addr::from(m.address) == t)
                            .is_some_and(|m| health.eligible(&pool.name, m))
                    }
                    None => true,
                };
                let target = Backend {
                    addr: Addr::from(target),
                    port: backend_port,
                };
                (port..=port, Selector::NatSingle { target, eligible })
            }
            (None, Some(range), None) => {
                let members = pool
                    .map(|pool| {
                        pool.members
                            .iter()
                            .map(|m| health.eligible(&pool.name, m).then(|| m.address.into()))
                            .collect()
                    })
                    .unwrap_or_default();
                let down = pool
                    .map(|pool| {
                        pool.members
                            .iter()
                            .filter(|m| !health.eligible(&pool.name, m))
                            .map(|m| Addr::from(m.address))
                            .collect()
                    })
                    .unwrap_or_default();
                let selector = Selector::NatRange {
                    first_port: range.start as u16,
                    backend_port,
                    members,
                    down,
                };
                (range.start..=range.end, selector)
            }
            _ => unreachable!("validated: a NAT rule has exactly one form"),
        };
        for port in ports {
            for &p in r.protocol.ip_protos() {
                rs.inbound.insert(InboundKey::new(p, addr, port as u16), id);
            }
        }
        let params = RuleParams {
            kind: RuleKind::InboundNat,
            name: Arc::from(r.name.as_str()),
            idle_timeout: idle(r.idle_timeout_minutes),
            tcp_reset: r.tcp_reset,
            unknown_flow: r.unknown_flow,
            floating_ip: r.floating_ip,
        };
        rs.set_rule(id, params, selector, since);
    }

    for r in &config.outbound_rules {
        let (id, since) = ids.take(RuleKind::Outbound, &r.name)?;
        let pool = pools[r.backend_pool.as_str()];
        let ips: Vec<Addr> = r
            .frontends
            .iter()
            .map(|f| Addr::from(frontends[f.as_str()].address))
            .collect();
        let per_member = allocation_of(r.allocated_outbound_ports, pool.members.len());
        let mut cursor = SnatCursor::new(&ips);
        for m in &pool.members {
            let first = rs.port_blocks.len();
            cursor.allocate(per_member, &mut rs.port_blocks);
            let entry = OutboundEntry {
                rule: id,
                first_block: first as u32,
                blocks: (rs.port_blocks.len() - first) as u32,
            };
            for &proto in r.protocol.ip_protos() {
                let src = Addr::from(m.address);
                rs.outbound.insert(OutboundKey { proto, src }, entry);
            }
        }
        let params = RuleParams {
            kind: RuleKind::Outbound,
            name: Arc::from(r.name.as_str()),
            idle_timeout: idle(r.idle_timeout_minutes),
            tcp_reset: r.tcp_reset,
            unknown_flow: r.unknown_flow,
            floating_ip: false,
        };
        rs.set_rule(id, params, Selector::Outbound, since);
    }

    // Deleted rules (now, or earlier and not drained yet) stay as retired rules.
    for (i, rule) in previous
        .into_iter()
        .flat_map(|p| p.rules.iter().enumerate())
        .filter_map(|(i, r)| Some((RuleId::try_from(i).ok()?, r.as_ref()?)))
    {
        if ids.taken.contains(&i) || drained.contains(&i) {
            continue;
        }
        rs.set_rule(i, rule.params.clone(), Selector::Retired, rule.since);
        if let Some(r) = rs.rules[usize::from(i)].as_mut() {
            r.retired = true;
        }
    }

    rs.drains = crate::drain::compile(config, &rs, health, scale);
    rs.pool_tables = tables.into_vec();
    Ok(rs)
}

impl RuleSet {
    fn set_rule(&mut self, id: RuleId, params: RuleParams, selector: Selector, since: u64) {
        let i = usize::from(id);
        if self.rules.len() <= i {
            self.rules.resize_with(i + 1, || None);
        }
        self.rules[i] = Some(CompiledRule {
            params,
            selector,
            since,
            retired: false,
        });
    }
}

/// Stable rule ids (see [`compile`]): a rule keeps its id (and its creation generation) for
/// as long as a rule of the same kind and name exists; a new rule takes an id that neither a
/// live nor a retired rule of `previous` holds.
struct Ids<'p> {
    previous: HashMap<(RuleKind, &'p str), (RuleId, u64)>,
    used_before: HashSet<RuleId>,
    taken: HashSet<RuleId>,
    next_fresh: u32,
    generation: u64,
}

impl<'p> Ids<'p> {
    fn new(previous: Option<&'p RuleSet>, generation: u64) -> Ids<'p> {
        let mut ids = Ids {
            previous: HashMap::new(),
            used_before: HashSet::new(),
            taken: HashSet::new(),
            next_fresh: 0,
            generation,
        };
        for (i, r) in previous
            .into_iter()
            .flat_map(|p| p.rules.iter().enumerate())
        {
            let (Ok(id), Some(r)) = (RuleId::try_from(i), r.as_ref()) else {
                continue;
            };
            ids.used_before.insert(id);
            if !r.retired {
                ids.previous
                    .insert((r.params.kind, &*r.params.name), (id, r.since));
            }
        }
        ids
    }

    fn take(&mut self, kind: RuleKind, name: &str) -> Result<(RuleId, u64), ValidationErrors> {
        let (id, since) = match self.previous.get(&(kind, name)) {
            Some(&kept) => kept,
            None => (
                self.fresh().ok_or_else(|| ids_exhausted(kind, name))?,
                self.generation,
            ),
        };
        self.taken.insert(id);
        Ok((id, since))
    }

    /// Lowest id that no rule of `previous` (live or retired) and no rule of this set uses.
    fn fresh(&mut self) -> Option<RuleId> {
        while self.next_fresh <= u32::from(RuleId::MAX) {
            let id = self.next_fresh as RuleId;
            self.next_fresh += 1;
            if !self.used_before.contains(&id) && !self.taken.contains(&id) {
                return Some(id);
            }
        }
        None
    }
}

/// Every 16-bit rule id is held by a live rule or by a deleted rule whose flows still run.
fn ids_exhausted(kind: RuleKind, name: &str) -> ValidationErrors {
    ValidationErrors(vec![super::ValidationError {
        path: format!("{kind}[{name}]"),
        value: format!("{name:?}"),
        allowed: format!(
            "at most {} rule ids held by rules and by deleted rules whose flows still run",
            u32::from(RuleId::MAX) + 1
        ),
        message: "every rule id is in use; deleted rules keep theirs until their last flow \
                  ends: retry once those flows have ended or idled out"
            .into(),
    }])
}

/// Maglev tables, one per pool, reused from the previous rule set when the same members,
/// weights and eligibility would produce the same table (health changes recompile often).
struct Tables<'a> {
    health: &'a MemberHealth,
    reusable: HashMap<&'a [TableInput], Arc<PoolTable>>,
    by_pool: HashMap<String, Arc<PoolTable>>,
}

impl<'a> Tables<'a> {
    fn new(previous: Option<&'a RuleSet>, health: &'a MemberHealth) -> Tables<'a> {
        let reusable = previous
            .map(|p| {
                p.pool_tables
                    .iter()
                    .map(|t| (&*t.inputs, Arc::clone(t)))
                    .collect()
            })
            .unwrap_or_default();
        Tables {
            health,
            reusable,
            by_pool: HashMap::new(),
        }
    }

    fn get(&mut self, pool: &BackendPool) -> Arc<PoolTable> {
        if let Some(t) = self.by_pool.get(&pool.name) {
            return Arc::clone(t);
        }
        let inputs: Vec<TableInput> = pool
            .members
            .iter()
            .map(|m| TableInput {
                addr: Addr::from(m.address),
                weight: m.weight,
                healthy: self.health.eligible(&pool.name, m),
            })
            .collect();
        let table = match self.reusable.get(inputs.as_slice()) {
            Some(t) => Arc::clone(t),
            None => Arc::new(PoolTable::build(&inputs)),
        };
        self.by_pool.insert(pool.name.clone(), Arc::clone(&table));
        table
    }

    fn into_vec(self) -> Vec<Arc<PoolTable>> {
        let mut out: Vec<Arc<PoolTable>> = Vec::new();
        for t in self.by_pool.into_values() {
            if !out.iter().any(|o| Arc::ptr_eq(o, &t)) {
                out.push(t);
            }
        }
        out
    }
}

/// Lays SNAT blocks out over an outbound rule's frontend IPs in order: members in pool
/// order take consecutive ports from 1024 up to 65023 on the first IP, then the next. A
/// member's allocation that straddles the end of an IP's range is split into two blocks, so
/// that every allocation validation accepts (Σ ≤ 64,000 × IPs) also fits. Block starts stay
/// multiples of 8 because 1024 and every allocation are.
struct SnatCursor<'a> {
    ips: &'a [Addr],
    ip: usize,
    next: u32,
}

impl<'a> SnatCursor<'a> {
    const END: u32 = SNAT_FIRST_PORT + SNAT_PORTS_PER_IP;

    fn new(ips: &'a [Addr]) -> SnatCursor<'a> {
        SnatCursor {
            ips,
            ip: 0,
            next: SNAT_FIRST_PORT,
        }
    }

    fn allocate(&mut self, mut ports: u32, out: &mut Vec<PortBlock>) {
        while ports > 0 {
            if self.next == Self::END {
                self.ip += 1;
                self.next = SNAT_FIRST_PORT;
            }
            let Some(&addr) = self.ips.get(self.ip) else {
                // Validation keeps the total within the IPs' capacity.
                return;
            };
            let take = ports.min(Self::END - self.next);
            out.push(PortBlock {
                addr,
                first_port: self.next as u16,
                count: take as u16,
            });
            self.next += take;
            ports -= take;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AdminState, LoadBalancingRule, Member, Protocol};

    fn config() -> Config {
        let text = r#"
            [[frontends]]
            name = "vip"
            address = "198.18.0.10"
            kind = "public"
            [[backend_pools]]
            name = "a"
            members = [{ address = "198.18.2.1" }, { address = "198.18.2.2" }]
            [[backend_pools]]
            name = "b"
            members = [{ address = "198.18.3.1" }]
            [[load_balancing_rules]]
            name = "a80"
            frontend = "vip"
            protocol = "TCP"
            frontend_port = 80
            backend_pool = "a"
            backend_port = 80
        "#;
        let mut c = Config::from_toml_str(text).unwrap();
        let r = c.load_balancing_rules[0].clone();
        c.load_balancing_rules.push(LoadBalancingRule {
            name: "a81".into(),
            frontend_port: 81,
            ..r.clone()
        });
        c.load_balancing_rules.push(LoadBalancingRule {
            name: "b82".into(),
            frontend_port: 82,
            protocol: Protocol::Udp,
            backend_pool: "b".into(),
            ..r.clone()
        });
        c
    }

    fn table(rs: &RuleSet, name: &str) -> Arc<PoolTable> {
        let id = rs.rule_id(RuleKind::LoadBalancing, name).unwrap();
        match &rs.rules[usize::from(id)].as_ref().unwrap().selector {
            Selector::LoadBalancing { pool, .. } => Arc::clone(pool),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rules_on_one_pool_share_its_table() {
        let rs = compile(&config(), None, &MemberHealth::all_healthy(), 1).unwrap();
        assert!(Arc::ptr_eq(&table(&rs, "a80"), &table(&rs, "a81")));
        assert!(!Arc::ptr_eq(&table(&rs, "a80"), &table(&rs, "b82")));
        assert_eq!(rs.pool_tables.len(), 2);
    }

    #[test]
    fn unchanged_tables_are_reused_and_changed_ones_rebuilt() {
        let c = config();
        let mut health = MemberHealth::all_healthy();
        let g1 = compile(&c, None, &health, 1).unwrap();
        health.set_healthy("a", Addr::from_v4_bytes([198, 18, 2, 2]), false);
        let g2 = compile(&c, Some(&g1), &health, 2).unwrap();
        assert!(!Arc::ptr_eq(&table(&g1, "a80"), &table(&g2, "a80")));
        assert!(Arc::ptr_eq(&table(&g1, "b82"), &table(&g2, "b82")));
        assert_eq!(
            table(&g2, "a80").slot_counts(),
            [table(&g2, "a80").table.len(), 0]
        );
    }

    #[test]
    fn member_health_defaults_to_healthy_and_admin_state_wins() {
        let a = Addr::from_v4_bytes([198, 18, 2, 1]);
        let mut h = MemberHealth::all_healthy();
        assert!(h.is_healthy("p", a));
        h.set_healthy("p", a, false);
        assert!(!h.is_healthy("p", a));
        assert!(h.is_healthy("q", a));
        let mut m = Member::new(a.to_ip());
        assert!(!h.eligible("p", &m));
        m.admin_state = AdminState::Up;
        assert!(h.eligible("p", &m));
        h.set_healthy("p", a, true);
        assert_eq!(h, MemberHealth::all_healthy());
        m.admin_state = AdminState::Down;
        assert!(!h.eligible("p", &m));
    }

    #[test]
    fn fresh_ids_skip_previous_and_taken() {
        let mut ids = Ids::new(None, 7);
        ids.used_before.extend([0, 2]);
        assert_eq!(ids.take(RuleKind::LoadBalancing, "x").unwrap(), (1, 7));
        assert_eq!(ids.take(RuleKind::LoadBalancing, "y").unwrap(), (3, 7));
    }
}
