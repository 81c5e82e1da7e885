//! The Prometheus endpoint: `GET /metrics` in the text exposition format (0.0.4), served by
//! axum on the daemon's tokio runtime and encoded by the `prometheus` crate.
//!
//! A scrape is answered from what the control side already holds — the workers' counter
//! cells summed by [`xlb_api::sum`], their port counters, the committed rule set — so it
//! never asks a worker anything. Drains and the NAT event export are in `drains`.

use std::{
    net::SocketAddr,
    sync::{atomic::Ordering, Arc, PoisonError},
};

use axum::{
    extract::State,
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use hdrhistogram::Histogram;
use prometheus::{
    proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType, Quantile, Summary},
    TextEncoder,
};
use tokio::sync::watch;
use xlb_api::ControlState;
use xlb_engine::{counters::EvictReason, DropReason, RuleCounters};

use crate::plane::{cell::WorkerSnapshot, sum_snat, Shared};

/// Everything a scrape reads.
#[derive(Debug, Clone)]
pub struct Sources {
    pub state: Arc<ControlState>,
    pub shared: Arc<Shared>,
    pub interfaces: Vec<String>,
    pub lab_time_scale: u32,
}

/// The exposition being built: families in order, each with its samples.
struct Families(Vec<MetricFamily>);

impl Families {
    fn family(&mut self, name: &str, kind: MetricType, help: &str) {
        let mut f = MetricFamily::default();
        f.set_name(name.to_string());
        f.set_help(help.to_string());
        f.set_field_type(kind);
        self.0.push(f);
    }

    /// A sample of the last family (a counter or a gauge).
    fn sample(&mut self, labels: &[(&str, &str)], v: f64) {
        let Some(f) = self.0.last_mut() else { return };
        let mut m = metric(labels);
        if f.get_field_type() == MetricType::COUNTER {
            let mut c = Counter::default();
            c.set_value(v);
            m.set_counter(c);
        } else {
            let mut g = Gauge::default();
            g.set_value(v);
            m.set_gauge(g);
        }
        f.mut_metric().push(m);
    }

    /// A summary sample of the last family from a histogram (quantiles 0.5, 0.99, 0.999),
    /// in units of `unit` seconds.
    fn summary(&mut self, labels: &[(&str, &str)], h: &Histogram<u64>, unit: f64) {
        let Some(f) = self.0.last_mut() else { return };
        let quantiles = [0.5, 0.99, 0.999]
            .into_iter()
            .map(|q| {
                let mut x = Quantile::default();
                x.set_quantile(q);
                x.set_value(h.value_at_quantile(q) as f64 * unit);
                x
            })
            .collect();
        let mut s = Summary::default();
        s.set_quantile(quantiles);
        s.set_sample_sum(h.mean() * h.len() as f64 * unit);
        s.set_sample_count(h.len());
        let mut m = metric(labels);
        m.set_summary(s);
        f.mut_metric().push(m);
    }

    /// A family with one sample per worker.
    fn per_worker(&mut self, name: &str, kind: MetricType, help: &str, values: &[(usize, f64)]) {
        self.family(name, kind, help);
        for (w, v) in values {
            self.sample(&[("worker", &w.to_string())], *v);
        }
    }
}

fn metric(labels: &[(&str, &str)]) -> Metric {
    let mut m = Metric::default();
    m.set_label(
        labels
            .iter()
            .map(|(k, v)| {
                let mut l = LabelPair::default();
                l.set_name(k.to_string());
                l.set_value(v.to_string());
                l
            })
            .collect(),
    );
    m
}

use MetricType::{COUNTER, GAUGE, SUMMARY};

/// The whole exposition, from the current state.
pub fn render(src: &Sources) -> String {
    let mut o = Families(Vec::new());
    daemon(&mut o, src);
    rules(&mut o, src);
    workers(&mut o, src);
    ports(&mut o, src);
    snat(&mut o, src);
    members(&mut o, src);
    drains::drains(&mut o, src);
    drains::nat_log(&mut o, src);
    datapath(&mut o, src);
    cluster(&mut o, src);
    propagation(&mut o, src);
    // Families without a sample (no self-probe, no SNAT rule) are left out.
    o.0.retain(|f| !f.get_metric().is_empty());
    TextEncoder::new()
        .encode_to_string(&o.0)
        .unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
}

/// A cluster node's fitness, drain, announcements and peers (only as a cluster node).
fn cluster(o: &mut Families, src: &Sources) {
    let Some(c) = src
        .shared
        .cluster
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
    else {
        return;
    };
    let node = [("node", c.node.as_str())];
    o.family(
        "xlb_cluster_fit",
        GAUGE,
        "1: workers run the committed rules, the self-probe passes, the configuration agrees.",
    );
    o.sample(&node, f64::from(u8::from(c.fit)));
    o.family(
        "xlb_cluster_draining",
        GAUGE,
        "1: the node is drained (withdrawn).",
    );
    o.sample(&node, f64::from(u8::from(c.draining)));
    o.family(
        "xlb_cluster_announced",
        GAUGE,
        "1 per prefix the routing daemon was last told to announce.",
    );
    for p in &c.announced {
        o.sample(&[("node", c.node.as_str()), ("prefix", p.as_str())], 1.0);
    }
    o.family(
        "xlb_cluster_announce_error",
        GAUGE,
        "1: the last attempt to tell the routing daemon failed.",
    );
    o.sample(&node, f64::from(u8::from(!c.announce_error.is_empty())));
    o.family(
        "xlb_cluster_membership_changes_total",
        COUNTER,
        "Changes of the set of announcing nodes seen by this node.",
    );
    o.sample(&node, c.membership_changes as f64);
    o.family(
        "xlb_cluster_peer_alive",
        GAUGE,
        "1: the peer's heartbeats arrive.",
    );
    for p in &c.peers {
        o.sample(
            &[("peer", p.address.as_str()), ("peer_node", p.node.as_str())],
            f64::from(u8::from(p.alive)),
        );
    }
    o.family(
        "xlb_cluster_peer_announcing",
        GAUGE,
        "1: the peer says it announces its frontends.",
    );
    for p in &c.peers {
        o.sample(
            &[("peer", p.address.as_str()), ("peer_node", p.node.as_str())],
            f64::from(u8::from(p.alive && p.announcing)),
        );
    }
    o.family(
        "xlb_cluster_peer_same_config",
        GAUGE,
        "1: the peer's configuration fingerprint equals this node's.",
    );
    for p in &c.peers {
        o.sample(
            &[("peer", p.address.as_str()), ("peer_node", p.node.as_str())],
            f64::from(u8::from(p.same_config)),
        );
    }
    if let Some(s) = &c.sync {
        cluster_sync(o, &c.node, s);
    }
}

/// The flow-state sync's counters and lag (only when the sync is on).
fn cluster_sync(o: &mut Families, node: &str, s: &xlb_api::ClusterSync) {
    let node = [("node", node)];
    for (name, help, v) in [
        (
            "xlb_cluster_sync_records_sent_total",
            "Flow records sent to the peers (each peer counted).",
            s.records_sent,
        ),
        (
            "xlb_cluster_sync_records_received_total",
            "Flow records received from the peers.",
            s.records_received,
        ),
        (
            "xlb_cluster_sync_records_imported_total",
            "Flow records imported as new standby flows.",
            s.records_imported,
        ),
        (
            "xlb_cluster_sync_records_refreshed_total",
            "Standby flows refreshed by a newer synced state.",
            s.records_refreshed,
        ),
        (
            "xlb_cluster_sync_records_kept_total",
            "Flow records for flows live here, or older than the copy: nothing changed.",
            s.records_kept,
        ),
        (
            "xlb_cluster_sync_records_refused_total",
            "Flow records the engine refused (no such rule, table full, next hop unknown).",
            s.records_refused,
        ),
        (
            "xlb_cluster_sync_records_dropped_total",
            "Flow records lost on this node: full queues on the way out or in.",
            s.records_dropped,
        ),
        (
            "xlb_cluster_sync_datagrams_malformed_total",
            "Sync datagrams refused: undecodable, unauthenticated or not from a peer.",
            s.datagrams_malformed,
        ),
        (
            "xlb_cluster_sync_datagrams_lost_total",
            "Sync datagrams missing in the peers' sequence numbers.",
            s.datagrams_lost,
        ),
    ] {
        o.family(name, COUNTER, help);
        o.sample(&node, v as f64);
    }
    o.family(
        "xlb_cluster_sync_lag_measured_total",
        COUNTER,
        "Created or changed flows whose sync lag was measured.",
    );
    o.sample(&node, s.lag_count as f64);
    o.family(
        "xlb_cluster_sync_lag_mean_seconds",
        GAUGE,
        "Mean lag of created or changed flows, from the packet on the peer to the import here.",
    );
    o.sample(&node, s.lag_mean.as_secs_f64());
    o.family(
        "xlb_cluster_sync_lag_max_seconds",
        GAUGE,
        "The largest lag measured since start.",
    );
    o.sample(&node, s.lag_max.as_secs_f64());
    o.family(
        "xlb_cluster_snat_taken_over",
        GAUGE,
        "1 per prefix of a lost peer's SNAT address this node announces in its stead.",
    );
    for p in &s.taken_over {
        o.sample(&[node[0], ("prefix", p.as_str())], 1.0);
    }
}

fn daemon(o: &mut Families, src: &Sources) {
    o.family("xlb_generation", GAUGE, "Rule-set generation committed.");
    o.sample(&[], src.state.generation() as f64);
    o.family(
        "xlb_lab_time_scale",
        GAUGE,
        "Every timer is divided by this (1: real time).",
    );
    o.sample(&[], f64::from(src.lab_time_scale));
    o.family("xlb_uptime_seconds", GAUGE, "Seconds since xlbd started.");
    o.sample(&[], src.shared.started.elapsed().as_secs_f64());
}

/// Per live rule, summed over workers (deleted rules leave the exposition).
fn rules(o: &mut Families, src: &Sources) {
    let snap = src.state.snapshot();
    let sum = src.shared.sum(&snap.rules);
    let names = RuleCounters::default().fields().map(|(n, _)| n);
    for (i, field) in names.iter().enumerate() {
        o.family(
            &format!("xlb_rule_{field}_total"),
            COUNTER,
            &format!("Per rule: {field}."),
        );
        for (id, c) in &sum.rules {
            let Some(p) = snap.rules.rule(*id) else {
                continue;
            };
            let labels = [("kind", p.kind.as_str()), ("rule", &*p.name)];
            o.sample(&labels, c.fields()[i].1 as f64);
        }
    }
    fast_path(o, &sum, &snap.rules);
}

/// The XDP fast path: what the program forwarded and passed on, per rule and in all, and
/// what the engines published.
fn fast_path(o: &mut Families, sum: &xlb_api::CounterSum, rules: &xlb_engine::RuleSet) {
    let Some(f) = &sum.fast else {
        return;
    };
    o.family(
        "xlb_fast_path_enabled",
        GAUGE,
        "1 when the XDP program forwards established flows itself (--fast-path on).",
    );
    o.sample(&[], f64::from(u8::from(f.enabled)));
    o.family(
        "xlb_fast_path_forwarded_total",
        COUNTER,
        "Frames the XDP program forwarded itself.",
    );
    o.sample(&[], f.forwarded as f64);
    o.family(
        "xlb_fast_path_new_forwarded_total",
        COUNTER,
        "SYNs of new flows the XDP program forwarded itself (their workers install the flows).",
    );
    o.sample(&[], f.new_forwarded as f64);
    o.family(
        "xlb_fast_path_grace_slowest_seconds",
        GAUGE,
        "The slowest recent grace period (forgotten by an eighth at each later one); resets on \
         idle of XDP-forwarded flows start twice this ahead of their deadline, at most 2 s.",
    );
    o.sample(&[], f.grace_slowest_ns as f64 / 1e9);
    o.family(
        "xlb_fast_path_punts_total",
        COUNTER,
        "Frames the XDP program passed to the workers instead, by reason.",
    );
    for (reason, n) in xlb_api::FAST_PUNT_REASONS.iter().zip(f.punts) {
        o.sample(&[("reason", reason)], n as f64);
    }
    for (name, help, v) in [
        (
            "xlb_fast_path_flows_published_total",
            "Flows the workers published to the fast path (each time one is).",
            sum.fast_published,
        ),
        (
            "xlb_fast_path_flows_unpublished_total",
            "Published flows withdrawn (no longer eligible, closed, expired).",
            sum.fast_unpublished,
        ),
        (
            "xlb_fast_path_grace_waits_total",
            "Idle expiries put off a tick until XDP could no longer touch the flow.",
            sum.fast_grace_waits,
        ),
        (
            "xlb_fast_path_publish_failed_total",
            "Eligible flows not published: no free line or index slot.",
            sum.fast_publish_failed,
        ),
        (
            "xlb_fast_path_new_installed_total",
            "SYNs the XDP program forwarded whose flow the owning worker installed.",
            sum.fast_new_installed,
        ),
        (
            "xlb_fast_path_new_conflict_total",
            "SYNs the XDP program forwarded to another member than their flow's (it keeps its \
             member).",
            sum.fast_new_conflict,
        ),
        (
            "xlb_fast_path_new_refused_total",
            "SYNs the XDP program forwarded whose flow could not be installed (rule or member \
             gone, flow table full).",
            sum.fast_new_refused,
        ),
    ] {
        o.family(name, COUNTER, help);
        o.sample(&[], v as f64);
    }
    for (name, help, v) in [
        (
            "xlb_fast_path_new_rules",
            "Load-balancing rules the XDP program opens new flows of.",
            sum.fast_new_rules,
        ),
        (
            "xlb_fast_path_new_rules_left_out",
            "Eligible rules left to the workers: no room in the new-flow section.",
            sum.fast_new_rules_left_out,
        ),
    ] {
        o.family(name, GAUGE, help);
        o.sample(&[], v as f64);
    }
    for (d, dir) in ["orig", "reply"].iter().enumerate() {
        o.family(
            &format!("xlb_rule_fast_packets_{dir}_total"),
            COUNTER,
            &format!(
                "Per rule: packets_{dir} the XDP program forwarded itself (counted in \
                 xlb_rule_packets_{dir}_total too)."
            ),
        );
        for r in &f.rules {
            let Some(p) = rules.rule(r.rule).filter(|_| !rules.is_retired(r.rule)) else {
                continue;
            };
            let labels = [("kind", p.kind.as_str()), ("rule", &*p.name)];
            o.sample(&labels, r.packets[d] as f64);
        }
    }
}

fn workers(o: &mut Families, src: &Sources) {
    let snaps = src.shared.snapshots();
    let of = |f: &dyn Fn(&xlb_api::WorkerCounters) -> u64| -> Vec<(usize, f64)> {
        snaps
            .iter()
            .map(|s| (usize::from(s.counters.worker), f(&s.counters) as f64))
            .collect()
    };
    o.per_worker(
        "xlb_worker_rx_packets_total",
        COUNTER,
        "Frames the worker's engine processed.",
        &of(&|c| c.counters.rx_packets),
    );
    o.per_worker(
        "xlb_worker_tx_packets_total",
        COUNTER,
        "Frames the worker's engine sent.",
        &of(&|c| c.counters.tx_packets),
    );
    o.per_worker(
        "xlb_worker_rsts_sent_total",
        COUNTER,
        "RST frames sent by reset on idle (two per flow; unknown-flow resets are counted per rule).",
        &of(&|c| c.counters.rsts_sent),
    );
    o.per_worker(
        "xlb_worker_flows_restored_total",
        COUNTER,
        "Flows restored from the worker's flow store when xlbd started (--state-dir).",
        &of(&|c| c.counters.flows_restored),
    );
    o.per_worker(
        "xlb_worker_flows_restore_dropped_total",
        COUNTER,
        "Flow store records not restored at start: torn by a crash, unreadable, or of a rule that is gone.",
        &of(&|c| c.counters.flows_restore_dropped),
    );
    o.family(
        "xlb_worker_drops_total",
        COUNTER,
        "Frames dropped, by reason.",
    );
    for s in &snaps {
        let w = s.counters.worker.to_string();
        for r in DropReason::all() {
            let v = s.counters.counters.drop_count(r) as f64;
            o.sample(&[("worker", &w), ("reason", r.as_str())], v);
        }
    }
    o.family(
        "xlb_worker_evictions_total",
        COUNTER,
        "Unconfirmed flows evicted to admit new ones, by reason.",
    );
    for s in &snaps {
        let w = s.counters.worker.to_string();
        for r in EvictReason::ALL {
            let v = s.counters.counters.eviction_count(r) as f64;
            o.sample(&[("worker", &w), ("reason", r.as_str())], v);
        }
    }
    worker_tables(o, src, &snaps);
}

/// Per worker: flow-table occupancy, hand-offs, the acknowledged generation, loop latency.
fn worker_tables(o: &mut Families, src: &Sources, snaps: &[WorkerSnapshot]) {
    let of = |f: &dyn Fn(&xlb_api::WorkerCounters) -> u64| -> Vec<(usize, f64)> {
        snaps
            .iter()
            .map(|s| (usize::from(s.counters.worker), f(&s.counters) as f64))
            .collect()
    };
    o.per_worker(
        "xlb_worker_flows",
        GAUGE,
        "Flows in the worker's table.",
        &of(&|c| c.flows),
    );
    o.per_worker(
        "xlb_worker_flow_capacity",
        GAUGE,
        "Size of the worker's flow table.",
        &of(&|c| c.flow_capacity),
    );
    o.per_worker(
        "xlb_worker_next_hops",
        GAUGE,
        "Next-hop entries in use (kernel neighbours and learned senders).",
        &of(&|c| c.next_hops.entries),
    );
    o.per_worker(
        "xlb_worker_next_hops_reclaimed_total",
        COUNTER,
        "Next-hop entries freed because no flow used them any more.",
        &of(&|c| c.next_hops.reclaimed),
    );
    o.per_worker(
        "xlb_worker_next_hops_refused_total",
        COUNTER,
        "Next-hop entries refused because the table was full.",
        &of(&|c| c.next_hops.refused),
    );
    o.per_worker(
        "xlb_worker_handed_off_total",
        COUNTER,
        "Frames passed to the worker that owns their flow.",
        &of(&|c| c.handed_off),
    );
    o.per_worker(
        "xlb_worker_handoff_dropped_total",
        COUNTER,
        "Frames lost because the owning worker's inbox was full.",
        &of(&|c| c.handoff_dropped),
    );
    let applied: Vec<(usize, f64)> = (src.shared.applied.iter().enumerate())
        .map(|(w, g)| (w, g.load(Ordering::Relaxed) as f64))
        .collect();
    o.per_worker(
        "xlb_worker_generation",
        GAUGE,
        "Rule-set generation the worker acknowledged.",
        &applied,
    );
    o.family(
        "xlb_worker_loop_seconds",
        SUMMARY,
        "Duration of worker loop iterations that did work (receive, process, transmit, \
         timers): the longest a frame waits inside xlb.",
    );
    for s in snaps {
        let w = s.counters.worker.to_string();
        o.summary(&[("worker", &w)], &s.loop_latency, 1e-9);
    }
}

/// Ports (AF_XDP sockets), per worker and interface.
fn ports(o: &mut Families, src: &Sources) {
    let ports = src.shared.ports();
    for (metric, help, pick) in [
        (
            "xlb_port_rx_packets_total",
            "Frames received on the interface's AF_XDP sockets.",
            0usize,
        ),
        (
            "xlb_port_tx_packets_total",
            "Frames put on the interface's TX rings.",
            1,
        ),
        (
            "xlb_port_tx_ring_full_total",
            "Frames lost to a full TX ring.",
            2,
        ),
    ] {
        o.family(metric, COUNTER, help);
        for (w, stats) in ports.iter().enumerate() {
            for (p, s) in stats.iter().enumerate() {
                let v = [s.rx_packets, s.tx_packets, s.tx_ring_full][pick];
                let ifname = src.interfaces.get(p).map_or("?", String::as_str);
                o.sample(
                    &[("worker", &w.to_string()), ("interface", ifname)],
                    v as f64,
                );
            }
        }
    }
}

/// SNAT ports per member and protocol.
fn snat(o: &mut Families, src: &Sources) {
    let rules = src.state.snapshot().rules.clone();
    let snat = sum_snat(&src.shared.snapshots());
    for (metric, help, allocated) in [
        (
            "xlb_snat_ports_allocated",
            "SNAT ports allocated to the member.",
            true,
        ),
        (
            "xlb_snat_ports_used",
            "SNAT ports of the member in use (flows and release timers).",
            false,
        ),
    ] {
        o.family(metric, GAUGE, help);
        for u in &snat {
            let rule = rules.rule(u.rule).map_or("?", |p| p.name.as_ref());
            let proto = if u.proto == 6 { "tcp" } else { "udp" };
            let member = u.member.to_string();
            let v = if allocated { u.allocated } else { u.used };
            let labels = [("rule", rule), ("member", &*member), ("protocol", proto)];
            o.sample(&labels, f64::from(v));
        }
    }
}

/// Member health: the probes' verdict and whether the member gets new flows.
fn members(o: &mut Families, src: &Sources) {
    let members = src.state.snapshot().members();
    for (metric, help, probe) in [
        (
            "xlb_member_probe_healthy",
            "1 while the member passes every health probe covering it (1 when not probed).",
            true,
        ),
        (
            "xlb_member_eligible",
            "1 while the member gets new flows (admin state up, or none and healthy).",
            false,
        ),
    ] {
        o.family(metric, GAUGE, help);
        for m in &members {
            let admin = match m.admin_state {
                xlb_engine::config::AdminState::Up => "up",
                xlb_engine::config::AdminState::Down => "down",
                xlb_engine::config::AdminState::None => "none",
            };
            let v = if probe { m.probe_healthy } else { m.eligible };
            let address = m.address.to_string();
            let labels = [
                ("pool", &*m.pool),
                ("member", &*address),
                ("admin_state", admin),
            ];
            o.sample(&labels, f64::from(u8::from(v)));
        }
    }
}

/// The data-path self-probe.
fn datapath(o: &mut Families, src: &Sources) {
    let datapath = src
        .shared
        .datapath
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    o.family(
        "xlb_datapath_availability_ratio",
        GAUGE,
        "Share of the recent self-probes (TCP handshakes through the dataplane) answered.",
    );
    for d in &datapath {
        o.sample(&[("frontend", &d.frontend), ("rule", &d.rule)], d.ratio());
    }
    o.family(
        "xlb_datapath_probes_total",
        COUNTER,
        "Self-probes by result since start.",
    );
    for d in &datapath {
        for (result, v) in [("answered", d.answered_total), ("failed", d.failed_total)] {
            let labels = [
                ("frontend", &*d.frontend),
                ("rule", &d.rule),
                ("result", result),
            ];
            o.sample(&labels, v as f64);
        }
    }
}

fn propagation(o: &mut Families, src: &Sources) {
    let propagation = src
        .shared
        .propagation
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    o.family(
        "xlb_rule_update_propagation_seconds",
        SUMMARY,
        "Time from publishing a rule set to every worker's acknowledgement.",
    );
    o.summary(&[], &propagation, 1e-6);
}

/// Binds the endpoint's socket (early, so that a busy address fails the start cleanly).
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Serves `GET /metrics` on `listener` until `stop` turns true. Runs on a tokio runtime.
pub async fn serve(
    listener: std::net::TcpListener,
    sources: Sources,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/", get(|| async { "xlbd: metrics at /metrics\n" }))
        .fallback(|| async { (StatusCode::NOT_FOUND, "see /metrics\n") })
        .with_state(Arc::new(sources))
        // One request per connection, as scrapers and plain clients that read to the end
        // expect.
        .layer(axum::middleware::map_response(close));
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
}

async fn close(mut r: Response) -> Response {
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

async fn metrics(State(src): State<Arc<Sources>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        render(&src),
    )
}

mod drains;
#[cfg(test)]
mod tests;
