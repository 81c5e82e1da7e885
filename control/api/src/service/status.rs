//! `GetStatus`: the workers, the members' health and drains, the data-path self-probe and the
//! NAT event export, from the committed snapshot and the daemon's [`crate::Telemetry`].

use std::sync::Arc;

use tonic::Status;
use xlb_proto::v1 as pb;

use super::{blocking, XlbService};
use crate::convert;
use crate::drain::{DrainEvent, DrainStatus, NatLogStatus};
use crate::state::Snapshot;
use crate::telemetry::RuntimeStatus;

impl XlbService {
    pub(super) async fn status(&self) -> Result<pb::GetStatusResponse, Status> {
        let snap = self.state.snapshot();
        let telemetry = Arc::clone(&self.telemetry);
        let rt = blocking(move || Ok(telemetry.status()?)).await?;
        let degraded = self.state.degraded().unwrap_or_else(|| behind(&snap, &rt));
        let now = self.state.now();
        Ok(pb::GetStatusResponse {
            generation: snap.generation,
            workers: rt.workers.iter().map(worker_status).collect(),
            poll_mode: rt.poll_mode.clone(),
            lab_time_scale: snap.config.settings.lab_time_scale,
            uptime_seconds: rt.uptime.as_secs(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            degraded,
            members: (snap.members().into_iter())
                .map(|m| member_health(m, &rt.drains, now))
                .collect(),
            nat_log: rt.nat_log.as_ref().map(nat_log),
            datapath: rt
                .datapath
                .iter()
                .map(|d| pb::DatapathAvailability {
                    frontend: d.frontend.clone(),
                    rule: d.rule.clone(),
                    availability: d.ratio(),
                    window: d.window,
                    answered: d.answered_total,
                    failed: d.failed_total,
                })
                .collect(),
            cluster: rt.cluster.as_ref().map(super::reads::cluster_status),
        })
    }
}

/// Workers that do not run the committed generation, said in one line (empty when none).
fn behind(snap: &Snapshot, rt: &RuntimeStatus) -> String {
    rt.workers
        .iter()
        .filter(|w| w.generation != snap.generation)
        .map(|w| format!("worker {} runs generation {}", w.worker, w.generation))
        .collect::<Vec<_>>()
        .join("; ")
}

fn worker_status(w: &crate::WorkerStatus) -> pb::WorkerStatus {
    pb::WorkerStatus {
        worker: u32::from(w.worker),
        interface: w.interface.clone(),
        queue: w.queue,
        core: w.core.map_or(-1, |c| c as i32),
        generation: w.generation,
        flows: w.flows,
        flow_capacity: w.flow_capacity,
    }
}

/// A member's health, with its drain's progress (`drains`, summed over the workers) and its
/// deadline relative to `now` on the workers' time line.
fn member_health(m: crate::MemberStatus, drains: &[DrainStatus], now: u64) -> pb::MemberHealth {
    let progress = drains
        .iter()
        .find(|d| d.pool == m.pool && d.member == m.address);
    pb::MemberHealth {
        address: m.address.to_string(),
        weight: m.weight,
        admin_state: convert::admin_to(m.admin_state) as i32,
        probed: m.probed,
        probe_healthy: m.probe_healthy,
        eligible: m.eligible,
        draining: m.drain.is_some(),
        drain_flows_left: progress.and_then(|p| p.flows_left),
        drain_flows_reset: progress.map_or(0, |p| p.flows_reset),
        drain_deadline_in_ms: (m.drain.and_then(|d| d.deadline)).map(|d| ms_between(now, d)),
        drain_action: convert::drain_action_to(m.drain_action) as i32,
        drain_timeout_seconds: m.drain_timeout_seconds,
        backend_pool: m.pool,
    }
}

fn nat_log(n: &NatLogStatus) -> pb::NatLogStatus {
    pb::NatLogStatus {
        collector: n.collector.clone(),
        records_sent: n.records_sent,
        messages_sent: n.messages_sent,
        records_lost: n.records_lost,
    }
}

/// A drain event as `WatchEvents` sends it.
pub(super) fn drain_event(d: &DrainEvent) -> pb::DrainProgress {
    pb::DrainProgress {
        backend_pool: d.pool.clone(),
        member: d.member.to_string(),
        phase: d.phase.as_str().to_string(),
        flows_left: d.flows_left,
        flows_reset: d.flows_reset,
        deadline_in_ms: d.deadline_in_ms,
        action: convert::drain_action_to(d.action) as i32,
    }
}

/// Milliseconds from `now` to `at` on the workers' time line (negative when `at` passed).
pub fn ms_between(now: u64, at: u64) -> i64 {
    let ms = |ns: u64| i64::try_from(ns / 1_000_000).unwrap_or(i64::MAX);
    if at >= now {
        ms(at - now)
    } else {
        -ms(now - at)
    }
}
