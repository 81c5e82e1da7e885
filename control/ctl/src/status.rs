//! Status and the keepalive check.

use serde_json::json;
use xlb_api::keepalive;
use xlb_api::server::Client;
use xlb_proto::v1 as pb;

use crate::output::{print_json, table};
use crate::{Failure, Res};

pub async fn status(c: &mut Client, json: bool) -> Res {
    let s = c.get_status(pb::GetStatusRequest {}).await?.into_inner();
    if json {
        status_json(&s);
        return Ok(());
    }
    println!(
        "xlbd {}  generation {}  uptime {}s  poll mode {}",
        s.version, s.generation, s.uptime_seconds, s.poll_mode
    );
    if s.lab_time_scale > 1 {
        println!(
            "LAB TIME: every timer runs {}x faster (4 min idle timeout lasts {} s)",
            s.lab_time_scale,
            240 / s.lab_time_scale.max(1)
        );
    }
    if !s.degraded.is_empty() {
        println!("DEGRADED: {}", s.degraded);
    }
    if let Some(n) = &s.nat_log {
        println!(
            "NAT event log (IPFIX) to {}: {} records sent in {} messages, {} lost",
            n.collector, n.records_sent, n.messages_sent, n.records_lost
        );
    }
    workers_table(&s);
    datapath_table(&s);
    members_table(&s);
    if let Some(c) = &s.cluster {
        cluster_lines(c);
    }
    Ok(())
}

/// `xlbctl drain on|off`.
pub async fn drain(c: &mut Client, drain: bool, deadline: f64, json: bool) -> Res {
    let st = c
        .set_drain(pb::SetDrainRequest {
            drain,
            deadline_seconds: deadline,
        })
        .await?
        .into_inner();
    if json {
        print_json(&cluster_json(&st));
    } else {
        cluster_lines(&st);
    }
    Ok(())
}

fn cluster_json(c: &pb::ClusterStatus) -> serde_json::Value {
    json!({
        "node": c.node, "fit": c.fit, "unfit_reason": c.unfit_reason, "draining": c.draining,
        "drain_remaining_seconds": c.drain_remaining_seconds, "drain_done": c.drain_done,
        "announced": c.announced, "announcer": c.announcer, "announce_error": c.announce_error,
        "config_fingerprint": c.config_fingerprint, "membership_changes": c.membership_changes,
        "peers": c.peers.iter().map(|p| json!({
            "address": p.address, "node": p.node, "alive": p.alive, "announcing": p.announcing,
            "config_fingerprint": p.config_fingerprint, "same_config": p.same_config,
            "last_heard_seconds": (p.last_heard_seconds >= 0.0).then_some(p.last_heard_seconds),
        })).collect::<Vec<_>>(),
    })
}

fn cluster_lines(c: &pb::ClusterStatus) {
    let state = if c.draining {
        if c.drain_done {
            "drained (done)".to_string()
        } else if c.drain_remaining_seconds > 0.0 {
            format!(
                "draining ({:.0} s to the deadline)",
                c.drain_remaining_seconds
            )
        } else {
            "draining".to_string()
        }
    } else if c.fit {
        "fit".to_string()
    } else {
        format!("UNFIT: {}", c.unfit_reason)
    };
    println!(
        "CLUSTER node {}  {}  config {}  membership changes {}",
        c.node, state, c.config_fingerprint, c.membership_changes
    );
    println!(
        "ANNOUNCED via {}: {}",
        c.announcer,
        if c.announced.is_empty() {
            "nothing (withdrawn)".to_string()
        } else {
            c.announced.join(" ")
        }
    );
    if !c.announce_error.is_empty() {
        println!("ANNOUNCE ERROR: {}", c.announce_error);
    }
    let rows: Vec<Vec<String>> = (c.peers.iter())
        .map(|p| {
            vec![
                p.address.clone(),
                if p.node.is_empty() {
                    "-".into()
                } else {
                    p.node.clone()
                },
                if p.alive { "alive" } else { "down" }.into(),
                if p.alive && p.announcing { "yes" } else { "no" }.into(),
                if p.config_fingerprint.is_empty() {
                    "-".into()
                } else if p.same_config {
                    "same".into()
                } else {
                    format!("DIFFERS ({})", p.config_fingerprint)
                },
            ]
        })
        .collect();
    if !rows.is_empty() {
        table(&["PEER", "NODE", "STATE", "ANNOUNCING", "CONFIG"], &rows);
    }
}

fn status_json(s: &pb::GetStatusResponse) {
    print_json(&json!({
        "generation": s.generation, "poll_mode": s.poll_mode, "lab_time_scale": s.lab_time_scale,
        "uptime_seconds": s.uptime_seconds, "version": s.version, "degraded": s.degraded,
        "workers": s.workers.iter().map(|w| json!({
            "worker": w.worker, "interface": w.interface, "queue": w.queue,
            "core": (w.core >= 0).then_some(w.core), "generation": w.generation,
            "flows": w.flows, "flow_capacity": w.flow_capacity,
        })).collect::<Vec<_>>(),
        "nat_log": s.nat_log.as_ref().map(|n| json!({
            "collector": n.collector, "records_sent": n.records_sent,
            "messages_sent": n.messages_sent, "records_lost": n.records_lost,
        })),
        "datapath": s.datapath.iter().map(|d| json!({
            "frontend": d.frontend, "rule": d.rule, "availability": d.availability,
            "window": d.window, "answered": d.answered, "failed": d.failed,
        })).collect::<Vec<_>>(),
        "members": s.members.iter().map(|m| json!({
            "backend_pool": m.backend_pool, "address": m.address, "weight": m.weight,
            "admin_state": admin_name(m.admin_state), "probed": m.probed,
            "probe_healthy": m.probe_healthy, "eligible": m.eligible,
            "draining": m.draining, "drain_flows_left": m.drain_flows_left,
            "drain_flows_reset": m.drain_flows_reset,
            "drain_deadline_in_ms": m.drain_deadline_in_ms,
            "drain_timeout_seconds": m.drain_timeout_seconds,
            "drain_action": drain_name(m.drain_action),
        })).collect::<Vec<_>>(),
        "cluster": s.cluster.as_ref().map(cluster_json),
    }));
}

fn workers_table(s: &pb::GetStatusResponse) {
    let rows: Vec<Vec<String>> = s
        .workers
        .iter()
        .map(|w| {
            vec![
                w.worker.to_string(),
                w.interface.clone(),
                w.queue.to_string(),
                if w.core >= 0 {
                    w.core.to_string()
                } else {
                    "-".into()
                },
                w.generation.to_string(),
                format!("{}/{}", w.flows, w.flow_capacity),
            ]
        })
        .collect();
    table(
        &[
            "WORKER",
            "INTERFACE",
            "QUEUE",
            "CORE",
            "GENERATION",
            "FLOWS",
        ],
        &rows,
    );
}

fn datapath_table(s: &pb::GetStatusResponse) {
    if !s.datapath.is_empty() {
        println!();
        let rows: Vec<Vec<String>> = s
            .datapath
            .iter()
            .map(|d| {
                vec![
                    d.frontend.clone(),
                    d.rule.clone(),
                    format!("{:.1}%", d.availability * 100.0),
                    d.window.to_string(),
                    d.answered.to_string(),
                    d.failed.to_string(),
                ]
            })
            .collect();
        table(
            &[
                "FRONTEND",
                "RULE",
                "DATA PATH",
                "WINDOW",
                "ANSWERED",
                "FAILED",
            ],
            &rows,
        );
    }
}

fn members_table(s: &pb::GetStatusResponse) {
    if !s.members.is_empty() {
        println!();
        let rows: Vec<Vec<String>> = s
            .members
            .iter()
            .map(|m| {
                vec![
                    m.backend_pool.clone(),
                    m.address.clone(),
                    m.weight.to_string(),
                    admin_name(m.admin_state).to_string(),
                    match (m.probed, m.probe_healthy) {
                        (false, _) => "-".into(),
                        (true, true) => "healthy".into(),
                        (true, false) => "failing".into(),
                    },
                    if m.eligible { "yes" } else { "no" }.to_string(),
                    drain_cell(m),
                ]
            })
            .collect();
        table(
            &[
                "POOL",
                "MEMBER",
                "WEIGHT",
                "ADMIN",
                "PROBE",
                "NEW FLOWS",
                "DRAIN",
            ],
            &rows,
        );
    }
}

pub fn drain_name(v: i32) -> &'static str {
    match pb::DrainAction::try_from(v) {
        Ok(pb::DrainAction::Idle) => "idle",
        _ => "reset",
    }
}

/// A member's drain in a few words: `-` when not drained, else its flows left, and its
/// deadline (time left, or what it did).
fn drain_cell(m: &pb::MemberHealth) -> String {
    if !m.draining {
        return "-".into();
    }
    let left = m
        .drain_flows_left
        .map_or("counting".to_string(), |n| format!("{n} flows left"));
    match m.drain_deadline_in_ms {
        None => left,
        Some(ms) if ms > 0 => format!(
            "{left}, {} in {:.1}s",
            drain_name(m.drain_action),
            ms as f64 / 1000.0
        ),
        Some(_) => format!(
            "{left}, deadline passed ({}; {} reset)",
            drain_name(m.drain_action),
            m.drain_flows_reset
        ),
    }
}

fn admin_name(v: i32) -> &'static str {
    match pb::AdminState::try_from(v) {
        Ok(pb::AdminState::Up) => "up",
        Ok(pb::AdminState::Down) => "down",
        _ => "none",
    }
}

pub async fn keepalive_check(c: &mut Client, rule: &str, dir: &std::path::Path, json: bool) -> Res {
    let k = keepalive::read(dir).map_err(Failure::Other)?;
    let cfg = c.get_config(pb::GetConfigRequest {}).await?.into_inner();
    let scale = c
        .get_status(pb::GetStatusRequest {})
        .await?
        .into_inner()
        .lab_time_scale;
    let mut found: Vec<(&str, u32)> = Vec::new();
    for r in cfg.load_balancing_rules.iter().filter(|r| r.name == rule) {
        found.push(("load-balancing rule", r.idle_timeout_minutes.unwrap_or(4)));
    }
    for r in cfg.inbound_nat_rules.iter().filter(|r| r.name == rule) {
        found.push(("inbound NAT rule", r.idle_timeout_minutes.unwrap_or(4)));
    }
    for r in cfg.outbound_rules.iter().filter(|r| r.name == rule) {
        found.push(("outbound rule", r.idle_timeout_minutes.unwrap_or(4)));
    }
    if found.is_empty() {
        return Err(Failure::Other(format!(
            "NotFound: no rule is named {rule:?}"
        )));
    }
    let reports: Vec<(&str, keepalive::Report)> = found
        .iter()
        .map(|(kind, idle)| (*kind, keepalive::check(k, rule, kind, *idle, scale)))
        .collect();
    let ok = reports.iter().all(|(_, r)| r.ok);
    if json {
        print_json(&json!({
            "ok": ok,
            "tcp_keepalive_time": k.time, "tcp_keepalive_intvl": k.intvl, "tcp_keepalive_probes": k.probes,
            "lab_time_scale": scale,
            "rules": reports.iter().map(|(kind, r)| json!({
                "rule": rule, "kind": kind, "idle_timeout_seconds": r.idle_seconds, "ok": r.ok, "report": r.text,
            })).collect::<Vec<_>>(),
        }));
    } else {
        for (_, r) in &reports {
            print!("{}", r.text);
        }
    }
    if ok {
        Ok(())
    } else {
        Err(Failure::CheckFailed)
    }
}
