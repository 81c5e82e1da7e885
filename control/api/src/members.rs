//! Pool members as the operator sees them ([`MemberStatus`]: admin state, probe verdict,
//! drain), what a member change sets ([`MemberChange`]), and the clock drains are stamped
//! with by default.

use std::net::IpAddr;

use xlb_engine::config::BackendPool;

use crate::state::{member_pos, Applied, ControlError, ControlState, Snapshot};

/// What [`crate::ControlState::change_member`] changes; `None`: unchanged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemberChange {
    pub weight: Option<u32>,
    pub admin_state: Option<xlb_engine::config::AdminState>,
    /// `Some(None)` removes the deadline.
    pub drain_timeout_seconds: Option<Option<u32>>,
    pub drain_action: Option<xlb_engine::config::DrainAction>,
}

/// One pool member as the operator sees it: admin state, probe verdict, and whether it gets
/// new flows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberStatus {
    pub pool: String,
    pub address: IpAddr,
    pub weight: u32,
    pub admin_state: xlb_engine::config::AdminState,
    /// Whether a load-balancing rule with a health probe sends to the pool (else probes never
    /// judge the member).
    pub probed: bool,
    /// The probes' verdict (true when not probed).
    pub probe_healthy: bool,
    /// Gets new flows: admin state, else the probes.
    pub eligible: bool,
    /// Its drain, while its admin state is `down`.
    pub drain: Option<MemberDrain>,
    /// The drain deadline it is configured with (applies once it is drained).
    pub drain_timeout_seconds: Option<u32>,
    pub drain_action: xlb_engine::config::DrainAction,
}

/// A drained member's deadline, from the rule set the workers run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemberDrain {
    /// When the drain began and when its deadline falls, on the workers' time line
    /// ([`crate::ControlState::now`]).
    pub started: Option<xlb_engine::time::Nanos>,
    pub deadline: Option<xlb_engine::time::Nanos>,
}

impl Snapshot {
    /// Every member of every pool, in configuration order.
    pub fn members(&self) -> Vec<MemberStatus> {
        let mut out = Vec::new();
        for pool in &self.config.backend_pools {
            let probed = self
                .config
                .load_balancing_rules
                .iter()
                .any(|r| r.backend_pool == pool.name && r.health_probe.is_some());
            for m in &pool.members {
                let addr = xlb_engine::Addr::from(m.address);
                let drain =
                    (m.admin_state == xlb_engine::config::AdminState::Down).then(|| MemberDrain {
                        started: self.health.drain_started(&pool.name, addr),
                        deadline: self
                            .rules
                            .drains()
                            .iter()
                            .find(|d| &*d.pool == pool.name.as_str() && d.member == addr)
                            .and_then(|d| d.deadline),
                    });
                out.push(MemberStatus {
                    pool: pool.name.clone(),
                    address: m.address,
                    weight: m.weight,
                    admin_state: m.admin_state,
                    probed,
                    probe_healthy: self.health.is_healthy(&pool.name, m.address),
                    eligible: self.health.eligible(&pool.name, m),
                    drain,
                    drain_timeout_seconds: m.drain_timeout_seconds,
                    drain_action: m.drain_action,
                });
            }
        }
        out
    }
}

/// Nanoseconds since the first call in this process (never 0, so that it is never "unset").
pub fn process_clock() -> u64 {
    static BASE: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let base = *BASE.get_or_init(std::time::Instant::now);
    u64::try_from(base.elapsed().as_nanos())
        .unwrap_or(u64::MAX)
        .saturating_add(1)
}

impl ControlState {
    /// Changes a member's weight and/or admin state (`None`: unchanged).
    pub fn set_member(
        &self,
        pool: &str,
        address: IpAddr,
        weight: Option<u32>,
        admin_state: Option<xlb_engine::config::AdminState>,
    ) -> Result<Applied<BackendPool>, ControlError> {
        self.change_member(
            pool,
            address,
            MemberChange {
                weight,
                admin_state,
                ..MemberChange::default()
            },
        )
    }

    /// Changes what `change` sets of a member, in one generation. Setting the admin state to
    /// `down` starts the member's drain (its deadline counts from now); any other state ends
    /// it.
    pub fn change_member(
        &self,
        pool: &str,
        address: IpAddr,
        change: MemberChange,
    ) -> Result<Applied<BackendPool>, ControlError> {
        self.change_pool(pool, |p| {
            let pos = member_pos(p, address)?;
            let m = &mut p.members[pos];
            if let Some(w) = change.weight {
                m.weight = w;
            }
            if let Some(a) = change.admin_state {
                m.admin_state = a;
            }
            if let Some(t) = change.drain_timeout_seconds {
                m.drain_timeout_seconds = t;
            }
            if let Some(a) = change.drain_action {
                m.drain_action = a;
            }
            Ok(())
        })
    }
}
