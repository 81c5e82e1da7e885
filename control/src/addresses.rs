//! Which addresses and interfaces the XDP program hands to the dataplane, kept in step with the
//! rule set the workers run.
//!
//! Two things in the XDP program follow the configuration: the **owned addresses** (every
//! frontend IP: VIPs and SNAT addresses, taken on every interface) and the **backend-side
//! interfaces** (those the members sit behind, where every packet not addressed to the host is
//! the dataplane's: the members' answers and outbound connections). Each configuration change
//! is applied to them as part of the same generation, in an order that never leaves a packet
//! with nowhere to go:
//!
//! 1. before the workers switch: addresses that leave the configuration are released, and
//!    interfaces that become backend side are marked (the workers may not know the new
//!    members yet, but no flow to them exists before they do);
//! 2. the workers switch to the new rule set and acknowledge;
//! 3. after: new addresses are taken, and interfaces that no longer face a member are unmarked.
//!
//! The workers' engines hold the same backend-side marks (outbound flows are taken only from
//! those ports: anti-spoofing); they receive them with the rule set of step 2, and after a
//! route change with no rule set, right after the maps (the control loop sends them).
//!
//! A failure at any step undoes what this change did, so that the maps again say what the
//! committed generation says. A released address goes back to the kernel as it was before xlb
//! took it: the host's own addresses become "local" again (the kernel answers them), others
//! are removed from the map (the kernel routes them as any other).
//!
//! The pure part (what to change, and in which step) is [`steps`]; [`AddressPlane`] applies it
//! through an [`AddrMaps`], which the daemon implements over the XDP program's maps.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
};

use xlb_engine::{Addr, RuleSet};

use crate::kernel::{self, Port};
use crate::messages::BackendSide;

/// One change to the XDP program's maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Take `ip`: redirect packets to it to the dataplane on every interface.
    Own(IpAddr),
    /// Give `ip` back to the kernel.
    Release(IpAddr),
    /// Mark (true) or unmark the port at this index of the daemon's ports as backend side.
    BackendSide(usize, bool),
}

/// What the XDP program should say for one rule set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub owned: BTreeSet<IpAddr>,
    /// Per port, in the daemon's port order.
    pub backend_side: Vec<bool>,
}

/// The changes from `applied` to `next`: those to make before the workers switch, and those
/// after (see the module notes for why).
pub fn steps(applied: &Plan, next: &Plan) -> (Vec<Op>, Vec<Op>) {
    let mut before = Vec::new();
    let mut after = Vec::new();
    for ip in applied.owned.difference(&next.owned) {
        before.push(Op::Release(*ip));
    }
    for (i, want) in next.backend_side.iter().enumerate() {
        let had = applied.backend_side.get(i).copied().unwrap_or(false);
        match (had, *want) {
            (false, true) => before.push(Op::BackendSide(i, true)),
            (true, false) => after.push(Op::BackendSide(i, false)),
            _ => {}
        }
    }
    for ip in next.owned.difference(&applied.owned) {
        after.push(Op::Own(*ip));
    }
    (before, after)
}

/// The opposite of `op`, given whether the released address is one of the host's.
fn undo(op: &Op) -> Op {
    match op {
        Op::Own(ip) => Op::Release(*ip),
        Op::Release(ip) => Op::Own(*ip),
        Op::BackendSide(i, on) => Op::BackendSide(*i, !on),
    }
}

/// Where the ops go: the XDP program's maps in the daemon, a recorder in tests.
pub trait AddrMaps: Send {
    /// Applies one op. `Release` must restore what the kernel had (see the module notes).
    fn apply(&mut self, op: &Op) -> Result<(), String>;
}

/// The routes the backend-side marks are computed from, shared with the control loop, which
/// replaces them when the kernel's routes change.
pub type SharedRoutes = Arc<Mutex<Vec<xlb_engine::Route>>>;

/// The owned addresses and backend-side marks, applied in step with rule-set generations.
pub struct AddressPlane {
    maps: Box<dyn AddrMaps>,
    ports: Vec<Port>,
    /// `--backend-side`: fixed marks, not derived from routes.
    fixed_backend_side: Option<Vec<bool>>,
    routes: SharedRoutes,
    applied: Plan,
}

impl std::fmt::Debug for AddressPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AddressPlane")
            .field("applied", &self.applied)
            .finish_non_exhaustive()
    }
}

/// A change applied before the workers switched, to finish or undo.
#[derive(Debug)]
pub struct Pending {
    next: Plan,
    done: Vec<Op>,
    after: Vec<Op>,
}

impl Pending {
    /// The backend-side marks of the change, per port index: what the workers' engines take
    /// in the same switch as the rules (see [`AddressPlane::ports_of`]).
    pub fn backend_side(&self) -> &[bool] {
        &self.next.backend_side
    }
}

impl AddressPlane {
    /// `applied`: what the maps say now (the start-up plan, applied by the caller or with
    /// [`AddressPlane::apply_now`]).
    pub fn new(
        maps: Box<dyn AddrMaps>,
        ports: Vec<Port>,
        fixed_backend_side: Option<Vec<bool>>,
        routes: SharedRoutes,
    ) -> AddressPlane {
        AddressPlane {
            maps,
            applied: Plan {
                owned: BTreeSet::new(),
                backend_side: vec![false; ports.len()],
            },
            ports,
            fixed_backend_side,
            routes,
        }
    }

    /// What the maps should say for `rules`.
    pub fn plan(&self, rules: &RuleSet) -> Plan {
        let owned = rules.frontend_addrs().map(Addr::to_ip).collect();
        let backend_side = match &self.fixed_backend_side {
            Some(fixed) => fixed.clone(),
            None => {
                let routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
                self.ports
                    .iter()
                    .map(|p| {
                        rules
                            .member_addrs()
                            .iter()
                            .any(|m| kernel::routed_via(&routes, m.to_ip(), p.id))
                    })
                    .collect()
            }
        };
        Plan {
            owned,
            backend_side,
        }
    }

    /// What the maps say now.
    pub fn applied(&self) -> &Plan {
        &self.applied
    }

    /// Backend-side marks (per port index, as in a [`Plan`]) as the engines take them: per
    /// port id. The engines' anti-spoofing follows the same marks as the XDP program, set in
    /// the same generation.
    pub fn ports_of(&self, backend_side: &[bool]) -> BackendSide {
        self.ports
            .iter()
            .zip(backend_side)
            .map(|(p, bs)| (p.id, *bs))
            .collect()
    }

    /// Applies the whole change to `rules` at once (start-up, and route changes, where no
    /// worker switch sits in between).
    pub fn apply_now(&mut self, rules: &RuleSet) -> Result<(), String> {
        let p = self.begin(rules)?;
        self.finish(p)
    }

    /// Step 1: the changes that go before the workers switch. On an error, what was done is
    /// undone.
    pub fn begin(&mut self, rules: &RuleSet) -> Result<Pending, String> {
        let next = self.plan(rules);
        let (before, after) = steps(&self.applied, &next);
        let mut done = Vec::new();
        for op in &before {
            if let Err(e) = self.maps.apply(op) {
                self.undo_all(&done);
                return Err(e);
            }
            done.push(op.clone());
        }
        Ok(Pending { next, done, after })
    }

    /// Step 3: the changes after the workers switched. On an error, everything this change did
    /// is undone and the maps say what they said before [`begin`](Self::begin).
    pub fn finish(&mut self, p: Pending) -> Result<(), String> {
        let mut done = p.done;
        for op in &p.after {
            if let Err(e) = self.maps.apply(op) {
                self.undo_all(&done);
                return Err(e);
            }
            done.push(op.clone());
        }
        self.applied = p.next;
        Ok(())
    }

    /// Undoes step 1 (the workers did not switch).
    pub fn abort(&mut self, p: Pending) {
        self.undo_all(&p.done);
    }

    fn undo_all(&mut self, done: &[Op]) {
        for op in done.iter().rev() {
            // Best effort: an undo that fails leaves the maps as the failed step left them,
            // and the next generation's diff (from `applied`, unchanged) repairs it.
            let _ = self.maps.apply(&undo(op));
        }
    }
}

/// The XDP program's maps as [`AddrMaps`]. A released address that is one of the host's own
/// (read from the kernel at each release: addresses come and go) goes back to "local".
#[derive(Debug)]
pub struct XdpMaps {
    pub table: xlb_afxdp::XdpAddrTable,
    /// ifindex of each port, in port order.
    pub ifindexes: Vec<u32>,
}

impl AddrMaps for XdpMaps {
    fn apply(&mut self, op: &Op) -> Result<(), String> {
        use xlb_afxdp::AddrKind;
        match op {
            Op::Own(ip) => self.table.set(*ip, AddrKind::Owned),
            Op::Release(ip) => {
                if host_has(*ip)? {
                    self.table.set(*ip, AddrKind::Local)
                } else {
                    self.table.remove(*ip)
                }
            }
            Op::BackendSide(i, on) => {
                let ifindex = *self
                    .ifindexes
                    .get(*i)
                    .ok_or_else(|| format!("no port {i}"))?;
                self.table.set_backend_side(ifindex, *on)
            }
        }
        .map_err(|e| e.to_string())
    }
}

/// Whether `ip` is one of the host's addresses now.
fn host_has(ip: IpAddr) -> Result<bool, String> {
    let addrs = xlb_afxdp::netlink::Netlink::open()
        .and_then(|mut nl| nl.addresses())
        .map_err(|e| format!("reading the host's addresses: {e}"))?;
    Ok(addrs.iter().any(|a| a.addr == ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn plan(owned: &[&str], backend_side: &[bool]) -> Plan {
        Plan {
            owned: owned.iter().map(|s| ip(s)).collect(),
            backend_side: backend_side.to_vec(),
        }
    }

    #[test]
    fn releases_and_marks_go_first_takes_and_unmarks_after() {
        let a = plan(&["198.18.0.100", "198.18.0.101"], &[false, true, false]);
        let b = plan(&["198.18.0.101", "2001:db8::100"], &[false, false, true]);
        let (before, after) = steps(&a, &b);
        assert_eq!(
            before,
            [Op::Release(ip("198.18.0.100")), Op::BackendSide(2, true)]
        );
        assert_eq!(
            after,
            [Op::BackendSide(1, false), Op::Own(ip("2001:db8::100"))]
        );
        assert_eq!(steps(&b, &b), (vec![], vec![]));
    }

    /// Records ops; fails the op equal to `fail`.
    #[derive(Default)]
    struct Recorder {
        log: Arc<Mutex<Vec<Op>>>,
        fail: Option<Op>,
    }

    impl AddrMaps for Recorder {
        fn apply(&mut self, op: &Op) -> Result<(), String> {
            if self.fail.as_ref() == Some(op) {
                return Err(format!("{op:?} refused"));
            }
            self.log.lock().unwrap().push(op.clone());
            Ok(())
        }
    }

    fn rules(toml: &str) -> RuleSet {
        let c = xlb_engine::Config::from_toml_str(toml).unwrap();
        xlb_engine::compile(&c, None, &Default::default(), 1).unwrap()
    }

    const ONE: &str = r#"
[[frontends]]
name = "a"
address = "198.18.0.100"
kind = "public"
"#;
    const TWO: &str = r#"
[[frontends]]
name = "b"
address = "198.18.0.101"
kind = "public"

[[frontends]]
name = "c"
address = "2001:db8::100"
kind = "public"
"#;

    fn plane(fail: Option<Op>) -> (AddressPlane, Arc<Mutex<Vec<Op>>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let maps = Recorder {
            log: Arc::clone(&log),
            fail,
        };
        let plane = AddressPlane::new(
            Box::new(maps),
            Vec::new(),
            Some(Vec::new()),
            Arc::new(Mutex::new(Vec::new())),
        );
        (plane, log)
    }

    #[test]
    fn a_change_applies_in_two_steps_and_records_the_new_plan() {
        let (mut p, log) = plane(None);
        p.apply_now(&rules(ONE)).unwrap();
        assert_eq!(*log.lock().unwrap(), [Op::Own(ip("198.18.0.100"))]);
        log.lock().unwrap().clear();
        let pending = p.begin(&rules(TWO)).unwrap();
        assert_eq!(*log.lock().unwrap(), [Op::Release(ip("198.18.0.100"))]);
        p.finish(pending).unwrap();
        assert_eq!(p.applied().owned.len(), 2);
        assert!(p.applied().owned.contains(&ip("2001:db8::100")));
    }

    #[test]
    fn an_abort_or_a_failed_step_undoes_everything() {
        let (mut p, log) = plane(Some(Op::Own(ip("2001:db8::100"))));
        p.apply_now(&rules(ONE)).unwrap();
        log.lock().unwrap().clear();
        // The workers did not switch: step 1 is undone.
        let pending = p.begin(&rules(TWO)).unwrap();
        p.abort(pending);
        assert_eq!(
            *log.lock().unwrap(),
            [Op::Release(ip("198.18.0.100")), Op::Own(ip("198.18.0.100"))]
        );
        log.lock().unwrap().clear();
        // Step 3 fails on the second address: the first is released again, the old one
        // taken back, and the plan is unchanged.
        let pending = p.begin(&rules(TWO)).unwrap();
        let err = p.finish(pending).unwrap_err();
        assert!(err.contains("refused"), "{err}");
        assert_eq!(
            *log.lock().unwrap(),
            [
                Op::Release(ip("198.18.0.100")),
                Op::Own(ip("198.18.0.101")),
                Op::Release(ip("198.18.0.101")),
                Op::Own(ip("198.18.0.100")),
            ]
        );
        assert_eq!(
            p.applied().owned,
            [ip("198.18.0.100")].into_iter().collect()
        );
    }
}
