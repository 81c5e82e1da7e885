//! Counters, flows and events.

use serde_json::{json, Value};
use tokio_stream::StreamExt;
use xlb_api::server::Client;
use xlb_proto::v1 as pb;

use crate::args::{FlowsArgs, ProtoArg};
use crate::output::{print_json, table};
use crate::Res;

pub fn proto_name(p: i32) -> &'static str {
    match pb::Protocol::try_from(p) {
        Ok(pb::Protocol::Tcp) => "TCP",
        Ok(pb::Protocol::Udp) => "UDP",
        Ok(pb::Protocol::All) => "ALL",
        _ => "-",
    }
}

/// The operator's name of a rule kind (as Prometheus and the status line's keys derive it).
pub fn kind_name(k: i32) -> &'static str {
    use xlb_engine::ruleset::RuleKind;
    match pb::RuleKind::try_from(k) {
        Ok(pb::RuleKind::LoadBalancing) => RuleKind::LoadBalancing.as_str(),
        Ok(pb::RuleKind::InboundNat) => RuleKind::InboundNat.as_str(),
        Ok(pb::RuleKind::Outbound) => RuleKind::Outbound.as_str(),
        _ => "-",
    }
}

fn rule_json(r: &pb::RuleCounters) -> Value {
    json!({
        "rule": r.rule, "kind": kind_name(r.kind), "rule_id": r.rule_id,
        "flows_created": r.flows_created, "flows_expired_idle": r.flows_expired_idle,
        "flows_reset_on_idle": r.flows_reset_on_idle, "flows_closed": r.flows_closed,
        "flows_picked_up": r.flows_picked_up, "packets_original": r.packets_original,
        "packets_reply": r.packets_reply, "bytes_original": r.bytes_original,
        "bytes_reply": r.bytes_reply, "syns": r.syns, "late_packets": r.late_packets,
        "unknown_flow_resets": r.unknown_flow_resets, "drops_no_flow": r.drops_no_flow,
        "drops_no_backend": r.drops_no_backend, "drops_snat_exhausted": r.drops_snat_exhausted,
        "drops_flow_table_full": r.drops_flow_table_full, "flows_moved": r.flows_moved,
        "drops_out_of_window": r.drops_out_of_window,
        "flows_evicted": r.flows_evicted, "drops_reset_rate_limited": r.drops_reset_rate_limited,
        "drops_spoofed_source": r.drops_spoofed_source, "drops_wrong_side": r.drops_wrong_side,
        "flows_reset_withheld": r.flows_reset_withheld,
        "fast_packets_original": r.fast_packets_original,
        "fast_packets_reply": r.fast_packets_reply,
    })
}

/// The XDP fast path's counters (`null` when xlbd does not report them).
fn fast_json(f: Option<&pb::FastPathCounters>) -> Value {
    f.map_or(Value::Null, |f| {
        json!({
            "enabled": f.enabled, "forwarded": f.forwarded, "new_forwarded": f.new_forwarded,
            "punts": drops_json(&f.punts),
            "published": f.published, "unpublished": f.unpublished,
            "grace_waits": f.grace_waits, "publish_failed": f.publish_failed,
            "new_installed": f.new_installed, "new_conflict": f.new_conflict,
            "new_refused": f.new_refused, "new_rules": f.new_rules,
            "new_rules_left_out": f.new_rules_left_out,
        })
    })
}

fn drops_json(d: &[pb::DropCount]) -> Value {
    Value::Object(
        d.iter()
            .map(|d| (d.reason.clone(), json!(d.count)))
            .collect(),
    )
}

fn worker_json(w: &pb::WorkerCounters) -> Value {
    json!({
        "worker": w.worker, "rx_packets": w.rx_packets, "tx_packets": w.tx_packets,
        "rsts_sent": w.rsts_sent, "events_dropped": w.events_dropped, "flows": w.flows,
        "flow_capacity": w.flow_capacity, "drops": drops_json(&w.drops),
        "evictions": drops_json(&w.evictions),
        "rules": w.rules.iter().map(rule_json).collect::<Vec<_>>(),
    })
}

fn rule_rows(rules: &[pb::RuleCounters], worker: Option<u32>) -> Vec<Vec<String>> {
    rules
        .iter()
        .map(|r| {
            let mut row = vec![
                r.rule.clone(),
                kind_name(r.kind).to_string(),
                r.flows_created.to_string(),
                r.flows_expired_idle.to_string(),
                r.flows_reset_on_idle.to_string(),
                r.flows_closed.to_string(),
                (r.packets_original + r.packets_reply).to_string(),
                (r.bytes_original + r.bytes_reply).to_string(),
                r.syns.to_string(),
                r.late_packets.to_string(),
                (r.drops_no_flow
                    + r.drops_no_backend
                    + r.drops_snat_exhausted
                    + r.drops_flow_table_full
                    + r.drops_out_of_window
                    + r.drops_reset_rate_limited
                    + r.drops_spoofed_source
                    + r.drops_wrong_side)
                    .to_string(),
            ];
            if let Some(w) = worker {
                row.insert(0, w.to_string());
            }
            row
        })
        .collect()
}

const RULE_HEADERS: [&str; 11] = [
    "RULE",
    "KIND",
    "CREATED",
    "EXPIRED_IDLE",
    "RESET_IDLE",
    "CLOSED",
    "PACKETS",
    "BYTES",
    "SYNS",
    "LATE",
    "DROPS",
];

pub async fn counters(c: &mut Client, rule: Option<String>, per_worker: bool, json: bool) -> Res {
    let r = c
        .get_counters(pb::GetCountersRequest {
            rule: rule.unwrap_or_default(),
            per_worker,
        })
        .await?
        .into_inner();
    let total = r.total.clone().unwrap_or_default();
    if json {
        print_json(&json!({
            "generation": r.generation,
            "rules": r.rules.iter().map(rule_json).collect::<Vec<_>>(),
            "drops": drops_json(&r.drops),
            "evictions": drops_json(&r.evictions),
            "fast_path": fast_json(r.fast_path.as_ref()),
            "total": worker_json(&total),
            "workers": r.workers.iter().map(worker_json).collect::<Vec<_>>(),
            "snat": r.snat.iter().map(|s| json!({
                "rule": s.rule, "protocol": proto_name(s.protocol), "member": s.member,
                "ports_allocated": s.ports_allocated, "ports_used": s.ports_used,
            })).collect::<Vec<_>>(),
        }));
        return Ok(());
    }
    println!(
        "generation {}  workers {}  rx {}  tx {}  rsts_sent {}  flows {}/{}",
        r.generation,
        total.worker,
        total.rx_packets,
        total.tx_packets,
        total.rsts_sent,
        total.flows,
        total.flow_capacity
    );
    if let Some(f) = r.fast_path.as_ref().filter(|f| f.enabled) {
        println!(
            "fast path: forwarded {}  new flows {} (installed {}  conflict {}  refused {}; \
             rules {})  published {}  unpublished {}  grace_waits {}  publish_failed {}",
            f.forwarded,
            f.new_forwarded,
            f.new_installed,
            f.new_conflict,
            f.new_refused,
            f.new_rules,
            f.published,
            f.unpublished,
            f.grace_waits,
            f.publish_failed
        );
    }
    println!();
    table(&RULE_HEADERS, &rule_rows(&r.rules, None));
    reason_table("DROP_REASON", &r.drops);
    reason_table("EVICTION_REASON", &r.evictions);
    if !r.snat.is_empty() {
        println!();
        let rows: Vec<Vec<String>> = r
            .snat
            .iter()
            .map(|s| {
                vec![
                    s.rule.clone(),
                    proto_name(s.protocol).to_string(),
                    s.member.clone(),
                    s.ports_allocated.to_string(),
                    s.ports_used.to_string(),
                ]
            })
            .collect();
        table(
            &["RULE", "PROTO", "MEMBER", "PORTS_ALLOCATED", "PORTS_USED"],
            &rows,
        );
    }
    if per_worker {
        println!();
        let mut headers = vec!["WORKER"];
        headers.extend(RULE_HEADERS);
        let rows: Vec<Vec<String>> = r
            .workers
            .iter()
            .flat_map(|w| rule_rows(&w.rules, Some(w.worker)))
            .collect();
        table(&headers, &rows);
    }
    Ok(())
}

/// The non-zero counts of `list` as a table (nothing when all are zero).
fn reason_table(header: &str, list: &[pb::DropCount]) {
    let nonzero: Vec<Vec<String>> = list
        .iter()
        .filter(|d| d.count > 0)
        .map(|d| vec![d.reason.clone(), d.count.to_string()])
        .collect();
    if !nonzero.is_empty() {
        println!();
        table(&[header, "COUNT"], &nonzero);
    }
}

pub fn ep(e: &Option<pb::Endpoint>) -> String {
    match e {
        Some(e) if e.address.contains(':') => format!("[{}]:{}", e.address, e.port),
        Some(e) => format!("{}:{}", e.address, e.port),
        None => "-".into(),
    }
}

pub async fn flows(c: &mut Client, a: FlowsArgs, json: bool) -> Res {
    let mut req = pb::ListFlowsRequest {
        rule: a.rule.unwrap_or_default(),
        client_address: a.client.unwrap_or_default(),
        backend_address: a.backend.unwrap_or_default(),
        protocol: a.protocol.map_or(0, ProtoArg::pb),
        state: a.state.unwrap_or_default(),
        page_size: a.page_size,
        page_token: a.page_token.unwrap_or_default(),
    };
    let mut all = Vec::new();
    let next = loop {
        let r = c.list_flows(req.clone()).await?.into_inner();
        all.extend(r.flows);
        if !a.all || r.next_page_token.is_empty() {
            break r.next_page_token;
        }
        req.page_token = r.next_page_token;
    };
    if json {
        let flows: Vec<Value> = all
            .iter()
            .map(|f| {
                json!({
                    "worker": f.worker, "flow_id": f.flow_id, "rule": f.rule, "kind": kind_name(f.kind),
                    "protocol": proto_name(f.protocol), "nat": f.nat, "client": ep(&f.client),
                    "frontend": ep(&f.frontend), "translated_source": ep(&f.translated_source),
                    "translated_destination": ep(&f.translated_destination), "state": f.state,
                    "idle_ms": f.idle_ms, "expires_in_ms": f.expires_in_ms,
                })
            })
            .collect();
        print_json(&json!({"flows": flows, "next_page_token": next}));
        return Ok(());
    }
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|f| {
            vec![
                f.worker.to_string(),
                f.rule.clone(),
                proto_name(f.protocol).to_string(),
                ep(&f.client),
                ep(&f.frontend),
                ep(&f.translated_source),
                ep(&f.translated_destination),
                f.state.clone(),
                format!("{:.1}s", f.idle_ms as f64 / 1000.0),
                format!("{:.1}s", f.expires_in_ms as f64 / 1000.0),
            ]
        })
        .collect();
    table(
        &[
            "WORKER",
            "RULE",
            "PROTO",
            "CLIENT",
            "FRONTEND",
            "XLATED_SRC",
            "XLATED_DST",
            "STATE",
            "IDLE",
            "EXPIRES_IN",
        ],
        &rows,
    );
    if !next.is_empty() {
        println!("more: --page-token {next}");
    }
    Ok(())
}

fn event_json(e: &pb::Event) -> Value {
    use pb::event::Kind as K;
    let (kind, body) = match &e.kind {
        Some(K::ResetOnIdle(r)) => (
            "reset_on_idle",
            json!({"worker": r.worker, "rule": r.rule, "client": ep(&r.client), "backend": ep(&r.backend)}),
        ),
        Some(K::SnatExhausted(s)) => (
            "snat_exhausted",
            json!({"worker": s.worker, "rule": s.rule, "member": s.member}),
        ),
        Some(K::ProbeStateChanged(p)) => (
            "probe_state_changed",
            json!({"probe": p.probe, "backend_pool": p.backend_pool, "member": p.member, "healthy": p.healthy}),
        ),
        Some(K::GenerationApplied(g)) => {
            ("generation_applied", json!({"generation": g.generation}))
        }
        Some(K::EventsLost(l)) => ("events_lost", json!({"count": l.count})),
        Some(K::Drain(d)) => (
            "drain",
            json!({"backend_pool": d.backend_pool, "member": d.member, "phase": d.phase,
                   "flows_left": d.flows_left, "flows_reset": d.flows_reset,
                   "deadline_in_ms": d.deadline_in_ms,
                   "action": crate::status::drain_name(d.action)}),
        ),
        None => ("unknown", json!({})),
    };
    json!({"unix_time_ms": e.unix_time_ms, "kind": kind, "event": body})
}

pub async fn events(c: &mut Client, count: Option<usize>, json: bool) -> Res {
    let mut stream = c
        .watch_events(pb::WatchEventsRequest {})
        .await?
        .into_inner();
    let mut seen = 0;
    while count.is_none_or(|n| seen < n) {
        let Some(e) = stream.next().await else { break };
        let e = e?;
        let v = event_json(&e);
        if json {
            println!("{v}");
        } else {
            let body = v["event"]
                .as_object()
                .map(|o| {
                    o.iter()
                        .map(|(k, v)| {
                            format!(
                                "{k}={}",
                                v.as_str().map_or_else(|| v.to_string(), str::to_string)
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            println!(
                "{} {} {body}",
                e.unix_time_ms,
                v["kind"].as_str().unwrap_or("")
            );
        }
        seen += 1;
    }
    Ok(())
}
