//! The `xlb.v1.Xlb` gRPC service: a thin translator over [`ControlState`] and [`Telemetry`].
//!
//! Each handler converts the request (bad text and enum values become `INVALID_ARGUMENT`),
//! calls the library, and converts the answer. A publish waits for worker acks and a telemetry
//! read may wait for workers, and neither may stall the async runtime that serves other
//! requests: changes go to the [`ChangeQueue`] (its own thread, in the order received, carried
//! out to the end even when the client hangs up or times out), telemetry reads to the blocking
//! pool.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use tokio::sync::{watch, Semaphore};
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::{BroadcastStream, WatchStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use xlb_engine::config::{
    BackendPool, Frontend, HealthProbe, InboundNatRule, LoadBalancingRule, OutboundRule,
};
use xlb_engine::counters::EvictReason;
use xlb_engine::flow::Nat;
use xlb_engine::ruleset::{RuleKind, PROTO_TCP, PROTO_UDP};
use xlb_engine::tcp::TcpState;
use xlb_engine::{Addr, DropReason, RuleCounters, RuleId, RuleSet, ValidationErrors};
use xlb_proto::v1 as pb;
use xlb_proto::v1::xlb_server::Xlb;

use crate::changes::ChangeQueue;
use crate::convert::{self, Errors};
use crate::state::{ControlState, Object};
use crate::status::bad_field;
use crate::telemetry::{ControlEvent, EventRecord, FlowCursor, FlowFilter, StateFilter, Telemetry};

/// Default and largest `ListFlows` page.
pub const DEFAULT_PAGE_SIZE: usize = 100;
pub const MAX_PAGE_SIZE: usize = 1000;

/// The service. Cheap to clone.
#[derive(Clone)]
pub struct XlbService {
    state: Arc<ControlState>,
    telemetry: Arc<dyn Telemetry>,
    /// Bounds concurrent `WatchEvents` streams: they outlive the request and the server's
    /// concurrency limit only counts requests until their answer starts.
    watchers: Arc<Semaphore>,
    /// Every change of every connection goes through this one queue.
    changes: Arc<ChangeQueue>,
    /// Turns true when the server shuts down: event streams end then, otherwise a graceful
    /// shutdown would wait for every watcher to hang up.
    closing: watch::Receiver<bool>,
}

impl std::fmt::Debug for XlbService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XlbService")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl XlbService {
    pub fn new(
        state: Arc<ControlState>,
        telemetry: Arc<dyn Telemetry>,
        max_watchers: usize,
    ) -> XlbService {
        XlbService {
            state,
            telemetry,
            watchers: Arc::new(Semaphore::new(max_watchers)),
            changes: Arc::new(ChangeQueue::new()),
            closing: watch::channel(false).1,
        }
    }

    /// Ends `WatchEvents` streams when `closing` turns true.
    pub fn with_closing(mut self, closing: watch::Receiver<bool>) -> XlbService {
        self.closing = closing;
        self
    }

    async fn create<T: Object, P: Default + Send + 'static>(
        &self,
        obj: Option<P>,
        field: &'static str,
        from: fn(P) -> Result<T, ValidationErrors>,
    ) -> Result<(T, u64), Status> {
        let obj = from(convert::require(obj, field).or_invalid()?).or_invalid()?;
        let state = Arc::clone(&self.state);
        self.changes
            .run(move || Ok(state.create(obj)?))
            .await
            .map(|a| (a.value, a.generation))
    }

    async fn update<T: Object, P: Default + Send + 'static>(
        &self,
        obj: Option<P>,
        field: &'static str,
        from: fn(P) -> Result<T, ValidationErrors>,
    ) -> Result<(T, u64), Status> {
        let obj = from(convert::require(obj, field).or_invalid()?).or_invalid()?;
        let state = Arc::clone(&self.state);
        self.changes
            .run(move || Ok(state.update(obj)?))
            .await
            .map(|a| (a.value, a.generation))
    }

    async fn delete<T: Object>(
        &self,
        req: pb::DeleteRequest,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let state = Arc::clone(&self.state);
        let a = self
            .changes
            .run(move || Ok(state.delete::<T>(&req.name)?))
            .await?;
        Ok(Response::new(pb::DeleteResponse {
            generation: a.generation,
        }))
    }

    fn get<T: Object>(&self, req: pb::GetRequest) -> Result<(T, u64), Status> {
        Ok(self.state.get::<T>(&req.name)?)
    }

    async fn change_pool(
        &self,
        f: impl FnOnce(
                &ControlState,
            )
                -> Result<crate::state::Applied<BackendPool>, crate::state::ControlError>
            + Send
            + 'static,
    ) -> Result<Response<pb::BackendPoolResponse>, Status> {
        let state = Arc::clone(&self.state);
        let a = self.changes.run(move || Ok(f(&state)?)).await?;
        Ok(Response::new(pb::BackendPoolResponse {
            backend_pool: Some(convert::pool_to(&a.value)),
            generation: a.generation,
        }))
    }
}

/// Runs a read `f` on the blocking pool. A panic there becomes `INTERNAL` for this request only.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("request handler failed: {e}")))?
}

trait IntoStatus<T> {
    fn or_invalid(self) -> Result<T, Status>;
}

impl<T> IntoStatus<T> for Result<T, ValidationErrors> {
    fn or_invalid(self) -> Result<T, Status> {
        self.map_err(|e| crate::status::invalid_argument(&e))
    }
}

fn parse_addr(path: &str, text: &str) -> Result<IpAddr, Status> {
    let mut errs = Errors::default();
    let ip = convert::parse_ip(&mut errs, path.to_string(), text);
    errs.finish(ip).or_invalid()
}

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

/// Rule ids of every rule (any kind) with this name.
fn rule_ids(rules: &RuleSet, name: &str) -> Vec<RuleId> {
    rules
        .rules()
        .filter(|(_, p)| &*p.name == name)
        .map(|(id, _)| id)
        .collect()
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
    };
    pb::Event {
        unix_time_ms: r
            .at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        kind: Some(kind),
    }
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

fn parse_token(t: &str) -> Option<FlowCursor> {
    let (w, f) = t.split_once('.')?;
    Some(FlowCursor {
        worker: w.parse().ok()?,
        flow: f.parse().ok()?,
    })
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Xlb for XlbService {
    async fn create_frontend(
        &self,
        r: Request<pb::CreateFrontendRequest>,
    ) -> Result<Response<pb::FrontendResponse>, Status> {
        let (v, generation) = self
            .create(r.into_inner().frontend, "frontend", convert::frontend_from)
            .await?;
        Ok(Response::new(pb::FrontendResponse {
            frontend: Some(convert::frontend_to(&v)),
            generation,
        }))
    }
    async fn update_frontend(
        &self,
        r: Request<pb::UpdateFrontendRequest>,
    ) -> Result<Response<pb::FrontendResponse>, Status> {
        let (v, generation) = self
            .update(r.into_inner().frontend, "frontend", convert::frontend_from)
            .await?;
        Ok(Response::new(pb::FrontendResponse {
            frontend: Some(convert::frontend_to(&v)),
            generation,
        }))
    }
    async fn delete_frontend(
        &self,
        r: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        self.delete::<Frontend>(r.into_inner()).await
    }
    async fn get_frontend(
        &self,
        r: Request<pb::GetRequest>,
    ) -> Result<Response<pb::FrontendResponse>, Status> {
        let (v, generation) = self.get::<Frontend>(r.into_inner())?;
        Ok(Response::new(pb::FrontendResponse {
            frontend: Some(convert::frontend_to(&v)),
            generation,
        }))
    }
    async fn list_frontends(
        &self,
        _: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListFrontendsResponse>, Status> {
        let (all, generation) = self.state.list::<Frontend>();
        Ok(Response::new(pb::ListFrontendsResponse {
            frontends: all.iter().map(convert::frontend_to).collect(),
            generation,
        }))
    }

    async fn create_backend_pool(
        &self,
        r: Request<pb::CreateBackendPoolRequest>,
    ) -> Result<Response<pb::BackendPoolResponse>, Status> {
        let (v, generation) = self
            .create(
                r.into_inner().backend_pool,
                "backend_pool",
                convert::pool_from,
            )
            .await?;
        Ok(Response::new(pb::BackendPoolResponse {
            backend_pool: Some(convert::pool_to(&v)),
            generation,
        }))
    }
    async fn update_backend_pool(
        &self,
        r: Request<pb::UpdateBackendPoolRequest>,
    ) -> Result<Response<pb::BackendPoolResponse>, Status> {
        let (v, generation) = self
            .update(
                r.into_inner().backend_pool,
                "backend_pool",
                convert::pool_from,
            )
            .await?;
        Ok(Response::new(pb::BackendPoolResponse {
            backend_pool: Some(convert::pool_to(&v)),
            generation,
        }))
    }
    async fn delete_backend_pool(
        &self,
        r: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        self.delete::<BackendPool>(r.into_inner()).await
    }
    async fn get_backend_pool(
        &self,
        r: Request<pb::GetRequest>,
    ) -> Result<Response<pb::BackendPoolResponse>, Status> {
        let (v, generation) = self.get::<BackendPool>(r.into_inner())?;
        Ok(Response::new(pb::BackendPoolResponse {
            backend_pool: Some(convert::pool_to(&v)),
            generation,
        }))
    }
    async fn list_backend_pools(
        &self,
        _: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListBackendPoolsResponse>, Status> {
        let (all, generation) = self.state.list::<BackendPool>();
        Ok(Response::new(pb::ListBackendPoolsResponse {
            backend_pools: all.iter().map(convert::pool_to).collect(),
            generation,
        }))
    }
    async fn add_pool_member(
        &self,
        r: Request<pb::AddPoolMemberRequest>,
    ) -> Result<Response<pb::BackendPoolResponse>, Status> {
        let r = r.into_inner();
        let member = convert::require(r.member, "member").or_invalid()?;
        let member = convert::member_only_from(&r.backend_pool, member).or_invalid()?;
        self.change_pool(move |s| s.add_member(&r.backend_pool, member))
            .await
    }
    async fn remove_pool_member(
        &self,
        r: Request<pb::RemovePoolMemberRequest>,
    ) -> Result<Response<pb::BackendPoolResponse>, Status> {
        let r = r.into_inner();
        let addr = parse_addr("address", &r.address)?;
        self.change_pool(move |s| s.remove_member(&r.backend_pool, addr))
            .await
    }
    async fn set_pool_member(
        &self,
        r: Request<pb::SetPoolMemberRequest>,
    ) -> Result<Response<pb::BackendPoolResponse>, Status> {
        let r = r.into_inner();
        let addr = parse_addr("address", &r.address)?;
        let mut errs = Errors::default();
        let admin = r
            .admin_state
            .map(|a| convert::admin_from(&mut errs, "admin_state".into(), a));
        errs.finish(()).or_invalid()?;
        let weight = r.weight;
        self.change_pool(move |s| s.set_member(&r.backend_pool, addr, weight, admin))
            .await
    }

    async fn create_load_balancing_rule(
        &self,
        r: Request<pb::CreateLoadBalancingRuleRequest>,
    ) -> Result<Response<pb::LoadBalancingRuleResponse>, Status> {
        let (v, generation) = self
            .create(r.into_inner().rule, "rule", convert::lb_rule_from)
            .await?;
        Ok(Response::new(pb::LoadBalancingRuleResponse {
            rule: Some(convert::lb_rule_to(&v)),
            generation,
        }))
    }
    async fn update_load_balancing_rule(
        &self,
        r: Request<pb::UpdateLoadBalancingRuleRequest>,
    ) -> Result<Response<pb::LoadBalancingRuleResponse>, Status> {
        let (v, generation) = self
            .update(r.into_inner().rule, "rule", convert::lb_rule_from)
            .await?;
        Ok(Response::new(pb::LoadBalancingRuleResponse {
            rule: Some(convert::lb_rule_to(&v)),
            generation,
        }))
    }
    async fn delete_load_balancing_rule(
        &self,
        r: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        self.delete::<LoadBalancingRule>(r.into_inner()).await
    }
    async fn get_load_balancing_rule(
        &self,
        r: Request<pb::GetRequest>,
    ) -> Result<Response<pb::LoadBalancingRuleResponse>, Status> {
        let (v, generation) = self.get::<LoadBalancingRule>(r.into_inner())?;
        Ok(Response::new(pb::LoadBalancingRuleResponse {
            rule: Some(convert::lb_rule_to(&v)),
            generation,
        }))
    }
    async fn list_load_balancing_rules(
        &self,
        _: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListLoadBalancingRulesResponse>, Status> {
        let (all, generation) = self.state.list::<LoadBalancingRule>();
        Ok(Response::new(pb::ListLoadBalancingRulesResponse {
            rules: all.iter().map(convert::lb_rule_to).collect(),
            generation,
        }))
    }

    async fn create_inbound_nat_rule(
        &self,
        r: Request<pb::CreateInboundNatRuleRequest>,
    ) -> Result<Response<pb::InboundNatRuleResponse>, Status> {
        let (v, generation) = self
            .create(r.into_inner().rule, "rule", convert::nat_rule_from)
            .await?;
        Ok(Response::new(pb::InboundNatRuleResponse {
            rule: Some(convert::nat_rule_to(&v)),
            generation,
        }))
    }
    async fn update_inbound_nat_rule(
        &self,
        r: Request<pb::UpdateInboundNatRuleRequest>,
    ) -> Result<Response<pb::InboundNatRuleResponse>, Status> {
        let (v, generation) = self
            .update(r.into_inner().rule, "rule", convert::nat_rule_from)
            .await?;
        Ok(Response::new(pb::InboundNatRuleResponse {
            rule: Some(convert::nat_rule_to(&v)),
            generation,
        }))
    }
    async fn delete_inbound_nat_rule(
        &self,
        r: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        self.delete::<InboundNatRule>(r.into_inner()).await
    }
    async fn get_inbound_nat_rule(
        &self,
        r: Request<pb::GetRequest>,
    ) -> Result<Response<pb::InboundNatRuleResponse>, Status> {
        let (v, generation) = self.get::<InboundNatRule>(r.into_inner())?;
        Ok(Response::new(pb::InboundNatRuleResponse {
            rule: Some(convert::nat_rule_to(&v)),
            generation,
        }))
    }
    async fn list_inbound_nat_rules(
        &self,
        _: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListInboundNatRulesResponse>, Status> {
        let (all, generation) = self.state.list::<InboundNatRule>();
        Ok(Response::new(pb::ListInboundNatRulesResponse {
            rules: all.iter().map(convert::nat_rule_to).collect(),
            generation,
        }))
    }

    async fn create_outbound_rule(
        &self,
        r: Request<pb::CreateOutboundRuleRequest>,
    ) -> Result<Response<pb::OutboundRuleResponse>, Status> {
        let (v, generation) = self
            .create(r.into_inner().rule, "rule", convert::outbound_rule_from)
            .await?;
        Ok(Response::new(pb::OutboundRuleResponse {
            rule: Some(convert::outbound_rule_to(&v)),
            generation,
        }))
    }
    async fn update_outbound_rule(
        &self,
        r: Request<pb::UpdateOutboundRuleRequest>,
    ) -> Result<Response<pb::OutboundRuleResponse>, Status> {
        let (v, generation) = self
            .update(r.into_inner().rule, "rule", convert::outbound_rule_from)
            .await?;
        Ok(Response::new(pb::OutboundRuleResponse {
            rule: Some(convert::outbound_rule_to(&v)),
            generation,
        }))
    }
    async fn delete_outbound_rule(
        &self,
        r: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        self.delete::<OutboundRule>(r.into_inner()).await
    }
    async fn get_outbound_rule(
        &self,
        r: Request<pb::GetRequest>,
    ) -> Result<Response<pb::OutboundRuleResponse>, Status> {
        let (v, generation) = self.get::<OutboundRule>(r.into_inner())?;
        Ok(Response::new(pb::OutboundRuleResponse {
            rule: Some(convert::outbound_rule_to(&v)),
            generation,
        }))
    }
    async fn list_outbound_rules(
        &self,
        _: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListOutboundRulesResponse>, Status> {
        let (all, generation) = self.state.list::<OutboundRule>();
        Ok(Response::new(pb::ListOutboundRulesResponse {
            rules: all.iter().map(convert::outbound_rule_to).collect(),
            generation,
        }))
    }

    async fn create_health_probe(
        &self,
        r: Request<pb::CreateHealthProbeRequest>,
    ) -> Result<Response<pb::HealthProbeResponse>, Status> {
        let (v, generation) = self
            .create(r.into_inner().probe, "probe", convert::probe_from)
            .await?;
        Ok(Response::new(pb::HealthProbeResponse {
            probe: Some(convert::probe_to(&v)),
            generation,
        }))
    }
    async fn update_health_probe(
        &self,
        r: Request<pb::UpdateHealthProbeRequest>,
    ) -> Result<Response<pb::HealthProbeResponse>, Status> {
        let (v, generation) = self
            .update(r.into_inner().probe, "probe", convert::probe_from)
            .await?;
        Ok(Response::new(pb::HealthProbeResponse {
            probe: Some(convert::probe_to(&v)),
            generation,
        }))
    }
    async fn delete_health_probe(
        &self,
        r: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        self.delete::<HealthProbe>(r.into_inner()).await
    }
    async fn get_health_probe(
        &self,
        r: Request<pb::GetRequest>,
    ) -> Result<Response<pb::HealthProbeResponse>, Status> {
        let (v, generation) = self.get::<HealthProbe>(r.into_inner())?;
        Ok(Response::new(pb::HealthProbeResponse {
            probe: Some(convert::probe_to(&v)),
            generation,
        }))
    }
    async fn list_health_probes(
        &self,
        _: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListHealthProbesResponse>, Status> {
        let (all, generation) = self.state.list::<HealthProbe>();
        Ok(Response::new(pb::ListHealthProbesResponse {
            probes: all.iter().map(convert::probe_to).collect(),
            generation,
        }))
    }

    async fn get_config(
        &self,
        _: Request<pb::GetConfigRequest>,
    ) -> Result<Response<pb::Config>, Status> {
        let s = self.state.snapshot();
        Ok(Response::new(convert::config_to(&s.config, s.generation)))
    }

    async fn get_counters(
        &self,
        r: Request<pb::GetCountersRequest>,
    ) -> Result<Response<pb::GetCountersResponse>, Status> {
        let r = r.into_inner();
        let snap = self.state.snapshot();
        let only: Option<Vec<RuleId>> = if r.rule.is_empty() {
            None
        } else {
            let ids = rule_ids(&snap.rules, &r.rule);
            if ids.is_empty() {
                return Err(Status::not_found(format!("no rule is named {:?}", r.rule)));
            }
            Some(ids)
        };
        let telemetry = Arc::clone(&self.telemetry);
        let c = blocking(move || Ok(telemetry.counters()?)).await?;
        let wanted = |id: RuleId| only.as_ref().is_none_or(|o| o.contains(&id));
        // A worker's figures for a rule count only when taken under that rule (see
        // `sum_rule_counters`).
        let current = |w: &crate::WorkerCounters, id: RuleId| {
            snap.rules
                .since(id)
                .is_some_and(|since| w.generation >= since)
        };
        let mut sum_drops = vec![0u64; DropReason::COUNT];
        let mut sum_evictions = [0u64; EvictReason::COUNT];
        let mut total = pb::WorkerCounters {
            worker: c.workers.len() as u32,
            ..Default::default()
        };
        let mut workers = Vec::new();
        for w in &c.workers {
            for (i, d) in w.counters.drops.iter().enumerate() {
                sum_drops[i] += d;
            }
            for (s, e) in sum_evictions.iter_mut().zip(&w.counters.evictions) {
                *s += e;
            }
            total.rx_packets += w.counters.rx_packets;
            total.tx_packets += w.counters.tx_packets;
            total.rsts_sent += w.counters.rsts_sent;
            total.events_dropped += w.counters.events_dropped;
            total.flows += w.flows;
            total.flow_capacity += w.flow_capacity;
            if r.per_worker {
                workers.push(pb::WorkerCounters {
                    worker: u32::from(w.worker),
                    rx_packets: w.counters.rx_packets,
                    tx_packets: w.counters.tx_packets,
                    rsts_sent: w.counters.rsts_sent,
                    events_dropped: w.counters.events_dropped,
                    flows: w.flows,
                    flow_capacity: w.flow_capacity,
                    drops: drops(&w.counters.drops, true),
                    evictions: evictions(&w.counters.evictions, true),
                    rules: w
                        .counters
                        .rules
                        .iter()
                        .enumerate()
                        .filter(|(i, rc)| {
                            let id = *i as RuleId;
                            wanted(id)
                                && !snap.rules.is_retired(id)
                                && current(w, id)
                                && **rc != RuleCounters::default()
                        })
                        .map(|(i, rc)| rule_counters(&snap.rules, i as RuleId, rc))
                        .collect(),
                });
            }
        }
        total.drops = drops(&sum_drops, true);
        total.evictions = evictions(&sum_evictions, true);
        // Every configured rule, zeros included (so a new rule shows up). A deleted rule is
        // not listed: its figures leave with it, and its id never carries them to a new rule.
        let rules: Vec<pb::RuleCounters> = crate::sum_rule_counters(
            c.workers.iter().map(|w| (&w.counters, w.generation)),
            &snap.rules,
        )
        .into_iter()
        .filter(|(id, _)| wanted(*id))
        .map(|(id, rc)| rule_counters(&snap.rules, id, &rc))
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
        Ok(Response::new(pb::GetCountersResponse {
            generation: snap.generation,
            rules,
            drops: drops(&sum_drops, false),
            total: Some(total),
            workers,
            snat,
            evictions: evictions(&sum_evictions, false),
        }))
    }

    async fn list_flows(
        &self,
        r: Request<pb::ListFlowsRequest>,
    ) -> Result<Response<pb::ListFlowsResponse>, Status> {
        let r = r.into_inner();
        let snap = self.state.snapshot();
        let mut filter = FlowFilter::default();
        if !r.rule.is_empty() {
            let ids = rule_ids(&snap.rules, &r.rule);
            if ids.is_empty() {
                return Err(Status::not_found(format!("no rule is named {:?}", r.rule)));
            }
            filter.rules = Some(ids);
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
        let limit = match r.page_size as usize {
            0 => DEFAULT_PAGE_SIZE,
            n if n > MAX_PAGE_SIZE => {
                return Err(bad_field(
                    "page_size",
                    n,
                    &format!("0 (default {DEFAULT_PAGE_SIZE}) to {MAX_PAGE_SIZE}"),
                    "page too large; page through with page_token",
                ))
            }
            n => n,
        };
        let after = if r.page_token.is_empty() {
            None
        } else {
            Some(parse_token(&r.page_token).ok_or_else(|| {
                bad_field(
                    "page_token",
                    format!("{:?}", r.page_token),
                    "the next_page_token of a previous answer",
                    "not a page token of this server",
                )
            })?)
        };
        let telemetry = Arc::clone(&self.telemetry);
        let page = blocking(move || Ok(telemetry.flows(&filter, after, limit)?)).await?;
        let ms = |ns: u64| ns / 1_000_000;
        let flows = page
            .flows
            .iter()
            .map(|e| {
                let f = &e.info;
                let (rule, kind) = rule_name(&snap.rules, f.rule);
                pb::Flow {
                    worker: u32::from(e.worker),
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
                    idle_ms: ms(page.now.saturating_sub(f.last_seen)),
                    expires_in_ms: ms(f.deadline.saturating_sub(page.now)),
                }
            })
            .collect();
        Ok(Response::new(pb::ListFlowsResponse {
            flows,
            next_page_token: page
                .next
                .map(|c| format!("{}.{}", c.worker, c.flow))
                .unwrap_or_default(),
        }))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        _: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
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
                        unix_time_ms: std::time::SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .map_or(0, |d| d.as_millis() as u64),
                        kind: Some(pb::event::Kind::EventsLost(pb::EventsLost { count: n })),
                    },
                })
            });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_status(
        &self,
        _: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        let snap = self.state.snapshot();
        let telemetry = Arc::clone(&self.telemetry);
        let rt = blocking(move || Ok(telemetry.status()?)).await?;
        let mut degraded = self.state.degraded().unwrap_or_default();
        let behind: Vec<String> = rt
            .workers
            .iter()
            .filter(|w| w.generation != snap.generation)
            .map(|w| format!("worker {} runs generation {}", w.worker, w.generation))
            .collect();
        if degraded.is_empty() && !behind.is_empty() {
            degraded = behind.join("; ");
        }
        Ok(Response::new(pb::GetStatusResponse {
            generation: snap.generation,
            workers: rt
                .workers
                .iter()
                .map(|w| pb::WorkerStatus {
                    worker: u32::from(w.worker),
                    interface: w.interface.clone(),
                    queue: w.queue,
                    core: w.core.map_or(-1, |c| c as i32),
                    generation: w.generation,
                    flows: w.flows,
                    flow_capacity: w.flow_capacity,
                })
                .collect(),
            poll_mode: rt.poll_mode,
            lab_time_scale: snap.config.settings.lab_time_scale,
            uptime_seconds: rt.uptime.as_secs(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            degraded,
            members: snap
                .members()
                .into_iter()
                .map(|m| pb::MemberHealth {
                    backend_pool: m.pool,
                    address: m.address.to_string(),
                    weight: m.weight,
                    admin_state: convert::admin_to(m.admin_state) as i32,
                    probed: m.probed,
                    probe_healthy: m.probe_healthy,
                    eligible: m.eligible,
                })
                .collect(),
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
        }))
    }
}
