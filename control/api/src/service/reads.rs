//! The reads of the service: counters, flows, events and status, answered from the committed
//! snapshot and the daemon's [`crate::Telemetry`].

use std::pin::Pin;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::{BroadcastStream, WatchStream};
use tokio_stream::{Stream, StreamExt};
use tonic::Status;
use xlb_engine::counters::EvictReason;
use xlb_engine::flow::Nat;
use xlb_engine::ruleset::{RuleKind, PROTO_TCP, PROTO_UDP};
use xlb_engine::tcp::TcpState;
use xlb_engine::{Addr, DropReason, FlowInfo, RuleCounters, RuleId, RuleSet};
use xlb_proto::v1 as pb;

use super::{blocking, parse_addr, XlbService};
use crate::status::bad_field;
use crate::telemetry::{
    counts_for, sum, ControlEvent, EventRecord, FlowCursor, FlowFilter, StateFilter,
    WorkerCounters, FAST_PUNT_REASONS,
};

/// Default and largest `ListFlows` page.
pub const DEFAULT_PAGE_SIZE: usize = 100;
pub const MAX_PAGE_SIZE: usize = 1000;

pub(super) type EventStream =
    Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send + 'static>>;

impl XlbService {
    pub(super) async fn counters(
        &self,
        r: pb::GetCountersRequest,
    ) -> Result<pb::GetCountersResponse, Status> {
        let snap = self.state.snapshot();
        let only: Option<Vec<RuleId>> = if r.rule.is_empty() {
            None
        } else {
            Some(named_rules(&snap.rules, &r.rule)?)
        };
        let telemetry = Arc::clone(&self.telemetry);
        let c = blocking(move || Ok(telemetry.counters()?)).await?;
        let wanted = |id: RuleId| only.as_ref().is_none_or(|o| o.contains(&id));
        let mut total = sum(&c.workers, &snap.rules);
        total.add_fast(c.fast.as_ref());
        let workers = if r.per_worker {
            c.workers
                .iter()
                .map(|w| worker_counters(&snap.rules, w, &wanted))
                .collect()
        } else {
            Vec::new()
        };
        // Every configured rule, zeros included (so a new rule shows up). A deleted rule is
        // not listed: its figures leave with it, and its id never carries them to a new rule.
        let rules = total
            .rules
            .iter()
            .filter(|(id, _)| wanted(*id))
            .map(|(id, rc)| {
                let mut pb = rule_counters(&snap.rules, *id, rc);
                if let Some(f) =
                    (c.fast.as_ref()).and_then(|f| f.rules.iter().find(|f| f.rule == *id))
                {
                    pb.fast_packets_original = f.packets[0];
                    pb.fast_packets_reply = f.packets[1];
                }
                pb
            })
            .collect();
        let snat = c
            .snat
            .iter()
            .filter(|s| wanted(s.rule))
            .map(|s| pb::SnatUsage {
                rule: rule_name(&snap.rules, s.rule).0,
                protocol: proto_of(s.proto) as i32,
                member: s.member.to_string(),
                ports_allocated: s.allocated,
                ports_used: s.used,
            })
            .collect();
        Ok(pb::GetCountersResponse {
            generation: snap.generation,
            rules,
            drops: drops(&total.drops, false),
            total: Some(pb::WorkerCounters {
                worker: total.workers as u32,
                rx_packets: total.rx_packets,
                tx_packets: total.tx_packets,
                rsts_sent: total.rsts_sent,
                events_dropped: total.events_dropped,
                flows: total.flows,
                flow_capacity: total.flow_capacity,
                drops: drops(&total.drops, true),
                evictions: evictions(&total.evictions, true),
                rules: Vec::new(),
            }),
            workers,
            snat,
            evictions: evictions(&total.evictions, false),
            fast_path: total.fast.as_ref().map(|f| pb::FastPathCounters {
                enabled: f.enabled,
                forwarded: f.forwarded,
                new_forwarded: f.new_forwarded,
                punts: (FAST_PUNT_REASONS.iter().zip(f.punts))
                    .map(|(r, count)| pb::DropCount {
                        reason: (*r).to_string(),
                        count,
                    })
                    .collect(),
                published: total.fast_published,
                unpublished: total.fast_unpublished,
                grace_waits: total.fast_grace_waits,
                publish_failed: total.fast_publish_failed,
                new_installed: total.fast_new_installed,
                new_conflict: total.fast_new_conflict,
                new_refused: total.fast_new_refused,
                new_rules: total.fast_new_rules,
                new_rules_left_out: total.fast_new_rules_left_out,
            }),
        })
    }

    pub(super) async fn flows(
        &self,
        r: pb::ListFlowsRequest,
    ) -> Result<pb::ListFlowsResponse, Status> {
        let snap = self.state.snapshot();
        let filter = flow_filter(&snap.rules, &r)?;
        let limit = page_size(r.page_size)?;
        let after = page_token(&r.page_token)?;
        let telemetry = Arc::clone(&self.telemetry);
        let page = blocking(move || Ok(telemetry.flows(&filter, after, limit)?)).await?;
        Ok(pb::ListFlowsResponse {
            flows: page
                .flows
                .iter()
                .map(|e| flow_to(&snap.rules, e.worker, &e.info, page.now))
                .collect(),
            next_page_token: page
                .next
                .map(|c| format!("{}.{}", c.worker, c.flow))
                .unwrap_or_default(),
        })
    }

    pub(super) fn events(&self) -> Result<EventStream, Status> {
        let permit = Arc::clone(&self.watchers)
            .try_acquire_owned()
            .map_err(|_| Status::resource_exhausted("too many event watchers; try again later"))?;
        let state = Arc::clone(&self.state);
        let config_events = BroadcastStream::new(self.state.subscribe());
        let worker_events = BroadcastStream::new(self.telemetry.subscribe());
        let closing = WatchStream::new(self.closing.clone())
            .filter(|closing| *closing)
            .map(|_| None);
        let stream = config_events
            .merge(worker_events)
            .map(Some)
            .merge(closing)
            .take_while(Option::is_some)
            .filter_map(|item| item)
            .map(move |item| {
                // The permit lives as long as the stream: dropped when the client goes away.
                let _held = &permit;
                Ok(match item {
                    Ok(record) => event_to(&state.snapshot().rules, &record),
                    Err(BroadcastStreamRecvError::Lagged(n)) => pb::Event {
                        unix_time_ms: unix_ms(SystemTime::now()),
                        kind: Some(pb::event::Kind::EventsLost(pb::EventsLost { count: n })),
                    },
                })
            });
        Ok(Box::pin(stream))
    }

    pub(super) async fn set_drain(
        &self,
        r: pb::SetDrainRequest,
    ) -> Result<pb::ClusterStatus, Status> {
        let deadline = if r.deadline_seconds.is_finite() && r.deadline_seconds > 0.0 {
            if r.deadline_seconds > 365.0 * 86_400.0 {
                return Err(Status::invalid_argument(
                    "deadline_seconds: out of range (allowed: 0 to one year)",
                ));
            }
            Some(std::time::Duration::from_secs_f64(r.deadline_seconds))
        } else if r.deadline_seconds.is_nan() || r.deadline_seconds < 0.0 {
            return Err(Status::invalid_argument(
                "deadline_seconds: out of range (allowed: 0 to one year)",
            ));
        } else {
            None
        };
        let telemetry = Arc::clone(&self.telemetry);
        let st = blocking(move || Ok(telemetry.set_drain(r.drain, deadline))).await?;
        st.as_ref().map(cluster_status).ok_or_else(|| {
            Status::failed_precondition(
                "not a cluster node: xlbd runs without --cluster-node (docs/cluster.md)",
            )
        })
    }
}

/// A cluster node's status as the API says it.
pub(crate) fn cluster_status(c: &crate::ClusterStatus) -> pb::ClusterStatus {
    pb::ClusterStatus {
        node: c.node.clone(),
        fit: c.fit,
        unfit_reason: c.unfit_reason.clone(),
        draining: c.draining,
        drain_remaining_seconds: c.drain_remaining.as_secs_f64(),
        drain_done: c.drain_done,
        announced: c.announced.clone(),
        announcer: c.announcer.clone(),
        announce_error: c.announce_error.clone(),
        config_fingerprint: c.config_fingerprint.clone(),
        peers: c
            .peers
            .iter()
            .map(|p| pb::ClusterPeer {
                address: p.address.clone(),
                node: p.node.clone(),
                alive: p.alive,
                announcing: p.announcing,
                config_fingerprint: p.config_fingerprint.clone(),
                same_config: p.same_config,
                last_heard_seconds: p.last_heard.map_or(-1.0, |d| d.as_secs_f64()),
            })
            .collect(),
        membership_changes: c.membership_changes,
        sync: c.sync.as_ref().map(|s| pb::ClusterSync {
            records_sent: s.records_sent,
            records_received: s.records_received,
            records_imported: s.records_imported,
            records_refreshed: s.records_refreshed,
            records_kept: s.records_kept,
            records_refused: s.records_refused,
            records_dropped: s.records_dropped,
            datagrams_malformed: s.datagrams_malformed,
            datagrams_lost: s.datagrams_lost,
            lag_count: s.lag_count,
            lag_mean_seconds: s.lag_mean.as_secs_f64(),
            lag_max_seconds: s.lag_max.as_secs_f64(),
            taken_over: s.taken_over.clone(),
        }),
    }
}

/// One worker's counters as `GetCounters` shows them: its non-zero rules that `wanted`.
fn worker_counters(
    rules: &RuleSet,
    w: &WorkerCounters,
    wanted: &dyn Fn(RuleId) -> bool,
) -> pb::WorkerCounters {
    let c = &w.counters;
    pb::WorkerCounters {
        worker: u32::from(w.worker),
        rx_packets: c.rx_packets,
        tx_packets: c.tx_packets,
        rsts_sent: c.rsts_sent,
        events_dropped: c.events_dropped,
        flows: w.flows,
        flow_capacity: w.flow_capacity,
        drops: drops(&c.drops, true),
        evictions: evictions(&c.evictions, true),
        rules: (0..c.rules.len())
            .filter_map(|i| RuleId::try_from(i).ok())
            .filter(|id| {
                wanted(*id)
                    && counts_for(rules, *id, w.generation)
                    && c.rule(*id) != RuleCounters::default()
            })
            .map(|id| rule_counters(rules, id, &c.rule(id)))
            .collect(),
    }
}

/// The operator's name of a rule kind, in the proto's enum.
fn rule_kind_to(k: RuleKind) -> pb::RuleKind {
    match k {
        RuleKind::LoadBalancing => pb::RuleKind::LoadBalancing,
        RuleKind::InboundNat => pb::RuleKind::InboundNat,
        RuleKind::Outbound => pb::RuleKind::Outbound,
    }
}

/// A rule's name and kind in the committed rule set; `#id` for a deleted rule.
fn rule_name(rules: &RuleSet, id: RuleId) -> (String, pb::RuleKind) {
    match rules.rule(id) {
        Some(p) => (p.name.to_string(), rule_kind_to(p.kind)),
        None => (format!("#{id}"), pb::RuleKind::Unspecified),
    }
}

fn proto_of(ip_proto: u8) -> pb::Protocol {
    match ip_proto {
        PROTO_TCP => pb::Protocol::Tcp,
        PROTO_UDP => pb::Protocol::Udp,
        _ => pb::Protocol::Unspecified,
    }
}

fn endpoint(addr: Addr, port: u16) -> Option<pb::Endpoint> {
    Some(pb::Endpoint {
        address: addr.to_string(),
        port: u32::from(port),
    })
}

fn rule_counters(rules: &RuleSet, id: RuleId, c: &RuleCounters) -> pb::RuleCounters {
    let (rule, kind) = rule_name(rules, id);
    pb::RuleCounters {
        rule,
        kind: kind as i32,
        rule_id: u32::from(id),
        flows_created: c.flows_created,
        flows_expired_idle: c.flows_expired_idle,
        flows_reset_on_idle: c.flows_reset_on_idle,
        flows_closed: c.flows_closed,
        flows_picked_up: c.flows_picked_up,
        packets_original: c.packets[0],
        packets_reply: c.packets[1],
        bytes_original: c.bytes[0],
        bytes_reply: c.bytes[1],
        syns: c.syns,
        late_packets: c.late_packets,
        unknown_flow_resets: c.unknown_flow_resets,
        drops_no_flow: c.no_flow,
        drops_no_backend: c.no_backend,
        drops_snat_exhausted: c.snat_exhausted,
        drops_flow_table_full: c.flow_table_full,
        flows_moved: c.flows_moved,
        drops_out_of_window: c.out_of_window,
        flows_evicted: c.flows_evicted,
        drops_reset_rate_limited: c.reset_rate_limited,
        drops_spoofed_source: c.spoofed_source,
        drops_wrong_side: c.wrong_side,
        flows_reset_withheld: c.flows_reset_withheld,
        // Filled in from the XDP program's counters where they are known.
        fast_packets_original: 0,
        fast_packets_reply: 0,
    }
}

fn evictions(e: &[u64], nonzero_only: bool) -> Vec<pb::DropCount> {
    EvictReason::ALL
        .iter()
        .map(|r| pb::DropCount {
            reason: r.as_str().to_string(),
            count: e[r.index()],
        })
        .filter(|c| !nonzero_only || c.count != 0)
        .collect()
}

fn drops(d: &[u64], nonzero_only: bool) -> Vec<pb::DropCount> {
    DropReason::all()
        .map(|r| pb::DropCount {
            reason: r.as_str().to_string(),
            count: d[r.index()],
        })
        .filter(|c| !nonzero_only || c.count != 0)
        .collect()
}

/// Rule ids of every rule (any kind) with this name; `NOT_FOUND` when there is none.
fn named_rules(rules: &RuleSet, name: &str) -> Result<Vec<RuleId>, Status> {
    let ids: Vec<RuleId> = rules
        .rules()
        .filter(|(_, p)| &*p.name == name)
        .map(|(id, _)| id)
        .collect();
    if ids.is_empty() {
        return Err(Status::not_found(format!("no rule is named {name:?}")));
    }
    Ok(ids)
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn event_to(rules: &RuleSet, r: &EventRecord) -> pb::Event {
    use pb::event::Kind as K;
    let kind = match &r.event {
        ControlEvent::Engine { worker, event } => match *event {
            xlb_engine::Event::ResetOnIdle {
                rule,
                client,
                backend,
            } => K::ResetOnIdle(pb::ResetOnIdle {
                worker: u32::from(*worker),
                rule: rule_name(rules, rule).0,
                client: endpoint(client.0, client.1),
                backend: endpoint(backend.0, backend.1),
            }),
            xlb_engine::Event::SnatExhausted { rule, member } => {
                K::SnatExhausted(pb::SnatExhausted {
                    worker: u32::from(*worker),
                    rule: rule_name(rules, rule).0,
                    member: member.to_string(),
                })
            }
        },
        ControlEvent::ProbeStateChanged {
            probe,
            pool,
            member,
            healthy,
        } => K::ProbeStateChanged(pb::ProbeStateChanged {
            probe: probe.clone(),
            backend_pool: pool.clone(),
            member: member.to_string(),
            healthy: *healthy,
        }),
        ControlEvent::GenerationApplied { generation } => {
            K::GenerationApplied(pb::GenerationApplied {
                generation: *generation,
            })
        }
        ControlEvent::Drain(d) => K::Drain(super::status::drain_event(d)),
    };
    pb::Event {
        unix_time_ms: unix_ms(r.at),
        kind: Some(kind),
    }
}

/// The listing's filter from a request; every bad field is `INVALID_ARGUMENT`, an unknown
/// rule `NOT_FOUND`.
fn flow_filter(rules: &RuleSet, r: &pb::ListFlowsRequest) -> Result<FlowFilter, Status> {
    let mut filter = FlowFilter::default();
    if !r.rule.is_empty() {
        filter.rules = Some(named_rules(rules, &r.rule)?);
    }
    if !r.client_address.is_empty() {
        filter.client = Some(parse_addr("client_address", &r.client_address)?.into());
    }
    if !r.backend_address.is_empty() {
        filter.backend = Some(parse_addr("backend_address", &r.backend_address)?.into());
    }
    filter.proto = match pb::Protocol::try_from(r.protocol) {
        Ok(pb::Protocol::Unspecified | pb::Protocol::All) => None,
        Ok(pb::Protocol::Tcp) => Some(PROTO_TCP),
        Ok(pb::Protocol::Udp) => Some(PROTO_UDP),
        Err(_) => {
            return Err(bad_field(
                "protocol",
                r.protocol,
                "PROTOCOL_TCP, PROTOCOL_UDP or PROTOCOL_ALL",
                "unknown enum value",
            ))
        }
    };
    if !r.state.is_empty() {
        filter.state = Some(tcp_state_from(&r.state).ok_or_else(|| {
            bad_field(
                "state",
                format!("{:?}", r.state),
                "syn_sent, syn_received, established, closing, closed, reset, udp",
                "unknown flow state",
            )
        })?);
    }
    Ok(filter)
}

fn page_size(requested: u32) -> Result<usize, Status> {
    match requested as usize {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n if n > MAX_PAGE_SIZE => Err(bad_field(
            "page_size",
            n,
            &format!("0 (default {DEFAULT_PAGE_SIZE}) to {MAX_PAGE_SIZE}"),
            "page too large; page through with page_token",
        )),
        n => Ok(n),
    }
}

fn page_token(t: &str) -> Result<Option<FlowCursor>, Status> {
    if t.is_empty() {
        return Ok(None);
    }
    let parsed = t.split_once('.').and_then(|(w, f)| {
        Some(FlowCursor {
            worker: w.parse().ok()?,
            flow: f.parse().ok()?,
        })
    });
    parsed.map(Some).ok_or_else(|| {
        bad_field(
            "page_token",
            format!("{t:?}"),
            "the next_page_token of a previous answer",
            "not a page token of this server",
        )
    })
}

fn tcp_state_from(s: &str) -> Option<StateFilter> {
    Some(match s {
        "syn_sent" => StateFilter::Tcp(TcpState::SynSent),
        "syn_received" => StateFilter::Tcp(TcpState::SynReceived),
        "established" => StateFilter::Tcp(TcpState::Established),
        "closing" => StateFilter::Tcp(TcpState::Closing),
        "closed" => StateFilter::Tcp(TcpState::Closed),
        "reset" => StateFilter::Tcp(TcpState::Reset),
        "udp" => StateFilter::Udp,
        _ => return None,
    })
}

fn flow_to(rules: &RuleSet, worker: u16, f: &FlowInfo, now: u64) -> pb::Flow {
    let ms = |ns: u64| ns / 1_000_000;
    let (rule, kind) = rule_name(rules, f.rule);
    pb::Flow {
        worker: u32::from(worker),
        flow_id: f.id,
        rule,
        kind: kind as i32,
        protocol: proto_of(f.proto) as i32,
        nat: match f.nat {
            Nat::Dnat => "dnat",
            Nat::Snat => "snat",
            Nat::None => "none",
        }
        .to_string(),
        client: endpoint(f.orig.src, f.orig.src_port),
        frontend: endpoint(f.orig.dst, f.orig.dst_port),
        translated_source: endpoint(f.translated.src, f.translated.src_port),
        translated_destination: endpoint(f.translated.dst, f.translated.dst_port),
        state: f.tcp_state.map_or("udp", TcpState::as_str).to_string(),
        idle_ms: ms(now.saturating_sub(f.last_seen)),
        expires_in_ms: ms(f.deadline.saturating_sub(now)),
    }
}
