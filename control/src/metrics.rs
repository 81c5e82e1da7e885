//! The Prometheus endpoint: `GET /metrics` in the text exposition format (0.0.4).
//!
//! A plain HTTP/1.1 server on one thread, one request per connection, answered from what the
//! control loop already holds (worker snapshots, the committed rule set, the workers'
//! published port counters): a scrape never asks a worker anything. Requests are bounded
//! (8 KiB, 2 s to send them), so a slow or hostile client costs at most that.

use std::{
    fmt::Write as _,
    io::{self, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, PoisonError,
    },
    thread::JoinHandle,
    time::Duration,
};

use hdrhistogram::Histogram;
use xlb_afxdp::WorkerStats;
use xlb_api::ControlState;
use xlb_engine::{counters::EvictReason, ruleset::RuleKind, DropReason, RuleCounters};

use crate::{plane::sum_snat, plane::Shared};

/// Everything a scrape reads.
#[derive(Debug, Clone)]
pub struct Sources {
    pub state: Arc<ControlState>,
    pub shared: Arc<Shared>,
    /// Per worker: its port counters (published by the worker with relaxed stores).
    pub port_stats: Vec<Arc<WorkerStats>>,
    pub interfaces: Vec<String>,
    pub lab_time_scale: u32,
}

fn kind_label(k: RuleKind) -> &'static str {
    match k {
        RuleKind::LoadBalancing => "load_balancing",
        RuleKind::InboundNat => "inbound_nat",
        RuleKind::Outbound => "outbound",
    }
}

/// Label values are quoted strings: escape what the format asks (backslash, quote, newline).
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", esc(val));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {v}");
    }
    fn summary(&mut self, name: &str, labels: &[(&str, &str)], h: &Histogram<u64>, unit: f64) {
        for q in ["0.5", "0.99", "0.999"] {
            let mut l = labels.to_vec();
            l.push(("quantile", q));
            let v = h.value_at_quantile(q.parse().unwrap_or(0.5)) as f64 * unit;
            self.sample(name, &l, v);
        }
        let sum = h.mean() * h.len() as f64 * unit;
        self.sample(&format!("{name}_sum"), labels, sum);
        self.sample(&format!("{name}_count"), labels, h.len());
    }
}

/// The whole exposition, from the current state.
pub fn render(src: &Sources) -> String {
    let snap = src.state.snapshot();
    let rules = &snap.rules;
    let workers = src.shared.snapshots();
    let mut o = Out(String::with_capacity(16 << 10));

    o.family("xlb_generation", "gauge", "Rule-set generation committed.");
    o.sample("xlb_generation", &[], snap.generation);
    o.family(
        "xlb_lab_time_scale",
        "gauge",
        "Every timer is divided by this (1: real time).",
    );
    o.sample("xlb_lab_time_scale", &[], src.lab_time_scale);
    o.family("xlb_uptime_seconds", "gauge", "Seconds since xlbd started.");
    o.sample(
        "xlb_uptime_seconds",
        &[],
        src.shared.started.elapsed().as_secs_f64(),
    );

    // Per live rule, summed over workers (deleted rules leave the exposition).
    let sum =
        xlb_api::sum_rule_counters(workers.iter().map(|w| (&w.counters, w.generation)), rules);
    let names = RuleCounters::default().fields().map(|(n, _)| n);
    for (i, field) in names.iter().enumerate() {
        let metric = format!("xlb_rule_{field}_total");
        o.family(&metric, "counter", &format!("Per rule: {field}."));
        for (id, c) in &sum {
            let Some(p) = rules.rule(*id) else { continue };
            o.sample(
                &metric,
                &[("kind", kind_label(p.kind)), ("rule", &p.name)],
                c.fields()[i].1,
            );
        }
    }

    // Per worker.
    o.family(
        "xlb_worker_rx_packets_total",
        "counter",
        "Frames the worker's engine processed.",
    );
    for w in &workers {
        o.sample(
            "xlb_worker_rx_packets_total",
            &[("worker", &w.worker.to_string())],
            w.counters.rx_packets,
        );
    }
    o.family(
        "xlb_worker_tx_packets_total",
        "counter",
        "Frames the worker's engine sent.",
    );
    for w in &workers {
        o.sample(
            "xlb_worker_tx_packets_total",
            &[("worker", &w.worker.to_string())],
            w.counters.tx_packets,
        );
    }
    o.family(
        "xlb_worker_rsts_sent_total",
        "counter",
        "RST frames sent by reset on idle (two per flow; unknown-flow resets are counted per rule).",
    );
    for w in &workers {
        o.sample(
            "xlb_worker_rsts_sent_total",
            &[("worker", &w.worker.to_string())],
            w.counters.rsts_sent,
        );
    }
    o.family(
        "xlb_worker_drops_total",
        "counter",
        "Frames dropped, by reason.",
    );
    for w in &workers {
        let wl = w.worker.to_string();
        for r in DropReason::all() {
            o.sample(
                "xlb_worker_drops_total",
                &[("worker", &wl), ("reason", r.as_str())],
                w.counters.drop_count(r),
            );
        }
    }
    o.family(
        "xlb_worker_evictions_total",
        "counter",
        "Unconfirmed flows evicted to admit new ones, by reason.",
    );
    for w in &workers {
        let wl = w.worker.to_string();
        for r in EvictReason::ALL {
            o.sample(
                "xlb_worker_evictions_total",
                &[("worker", &wl), ("reason", r.as_str())],
                w.counters.eviction_count(r),
            );
        }
    }
    o.family("xlb_worker_flows", "gauge", "Flows in the worker's table.");
    for w in &workers {
        o.sample(
            "xlb_worker_flows",
            &[("worker", &w.worker.to_string())],
            w.flows,
        );
    }
    o.family(
        "xlb_worker_flow_capacity",
        "gauge",
        "Size of the worker's flow table.",
    );
    for w in &workers {
        o.sample(
            "xlb_worker_flow_capacity",
            &[("worker", &w.worker.to_string())],
            w.flow_capacity,
        );
    }
    for (name, kind, help, value) in [
        (
            "xlb_worker_next_hops",
            "gauge",
            "Next-hop entries in use (kernel neighbours and learned senders).",
            (|w| w.next_hops.entries) as fn(&crate::handler::Snapshot) -> u64,
        ),
        (
            "xlb_worker_next_hops_reclaimed_total",
            "counter",
            "Next-hop entries freed because no flow used them any more.",
            |w| w.next_hops.reclaimed,
        ),
        (
            "xlb_worker_next_hops_refused_total",
            "counter",
            "Next-hop entries refused because the table was full.",
            |w| w.next_hops.refused,
        ),
    ] {
        o.family(name, kind, help);
        for w in &workers {
            o.sample(name, &[("worker", &w.worker.to_string())], value(w));
        }
    }
    o.family(
        "xlb_worker_handed_off_total",
        "counter",
        "Frames passed to the worker that owns their flow.",
    );
    for w in &workers {
        o.sample(
            "xlb_worker_handed_off_total",
            &[("worker", &w.worker.to_string())],
            w.handed_off,
        );
    }
    o.family(
        "xlb_worker_handoff_dropped_total",
        "counter",
        "Frames lost because the owning worker's inbox was full.",
    );
    for w in &workers {
        o.sample(
            "xlb_worker_handoff_dropped_total",
            &[("worker", &w.worker.to_string())],
            w.handoff_dropped,
        );
    }
    o.family(
        "xlb_worker_generation",
        "gauge",
        "Rule-set generation the worker acknowledged.",
    );
    for (w, g) in src.shared.applied.iter().enumerate() {
        o.sample(
            "xlb_worker_generation",
            &[("worker", &w.to_string())],
            g.load(Ordering::Relaxed),
        );
    }
    o.family(
        "xlb_worker_loop_seconds",
        "summary",
        "Duration of worker loop iterations that did work (receive, process, transmit, \
         timers): the longest a frame waits inside xlb.",
    );
    for w in &workers {
        o.summary(
            "xlb_worker_loop_seconds",
            &[("worker", &w.worker.to_string())],
            &w.loop_latency,
            1e-9,
        );
    }

    // Ports (AF_XDP sockets), per worker and interface.
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
        o.family(metric, "counter", help);
        for (w, stats) in src.port_stats.iter().enumerate() {
            for (p, s) in stats.ports().iter().enumerate() {
                let v = [s.rx_packets, s.tx_packets, s.tx_ring_full][pick];
                let ifname = src.interfaces.get(p).map_or("?", String::as_str);
                o.sample(
                    metric,
                    &[("worker", &w.to_string()), ("interface", ifname)],
                    v,
                );
            }
        }
    }

    // SNAT ports per member and protocol.
    let snat = sum_snat(&workers);
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
        o.family(metric, "gauge", help);
        for u in &snat {
            let rule = rules.rule(u.rule).map_or("?", |p| p.name.as_ref());
            let proto = if u.proto == 6 { "tcp" } else { "udp" };
            o.sample(
                metric,
                &[
                    ("rule", rule),
                    ("member", &u.member.to_string()),
                    ("protocol", proto),
                ],
                if allocated { u.allocated } else { u.used },
            );
        }
    }

    // Member health (SPEC §5): the probes' verdict and whether the member gets new flows.
    let members = snap.members();
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
        o.family(metric, "gauge", help);
        for m in &members {
            let admin = match m.admin_state {
                xlb_engine::config::AdminState::Up => "up",
                xlb_engine::config::AdminState::Down => "down",
                xlb_engine::config::AdminState::None => "none",
            };
            let v = if probe { m.probe_healthy } else { m.eligible };
            o.sample(
                metric,
                &[
                    ("pool", &m.pool),
                    ("member", &m.address.to_string()),
                    ("admin_state", admin),
                ],
                u8::from(v),
            );
        }
    }

    // Data-path self-probe.
    let datapath = src
        .shared
        .datapath
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    o.family(
        "xlb_datapath_availability_ratio",
        "gauge",
        "Share of the recent self-probes (TCP handshakes through the dataplane) answered.",
    );
    for d in &datapath {
        o.sample(
            "xlb_datapath_availability_ratio",
            &[("frontend", &d.frontend), ("rule", &d.rule)],
            d.ratio(),
        );
    }
    o.family(
        "xlb_datapath_probes_total",
        "counter",
        "Self-probes by result since start.",
    );
    for d in &datapath {
        for (result, v) in [("answered", d.answered_total), ("failed", d.failed_total)] {
            o.sample(
                "xlb_datapath_probes_total",
                &[
                    ("frontend", &d.frontend),
                    ("rule", &d.rule),
                    ("result", result),
                ],
                v,
            );
        }
    }

    let propagation = src
        .shared
        .propagation
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    o.family(
        "xlb_rule_update_propagation_seconds",
        "summary",
        "Time from publishing a rule set to every worker's acknowledgement.",
    );
    o.summary(
        "xlb_rule_update_propagation_seconds",
        &[],
        &propagation,
        1e-6,
    );
    o.0
}

/// Binds the endpoint's socket (early, so that a busy address fails the start cleanly).
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let listener = TcpListener::bind(addr)?;
    // Non-blocking accept, so that the thread sees `stop` within one poll interval.
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Serves `GET /metrics` on `listener` until `stop`.
pub fn spawn(
    listener: TcpListener,
    sources: Sources,
    stop: Arc<AtomicBool>,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("xlbd-metrics".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let _ = answer(conn, &sources);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        })
}

fn answer(mut conn: TcpStream, src: &Sources) -> io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut req = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        if req.len() > 8192 {
            return respond(
                &mut conn,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            );
        }
        let n = conn.read(&mut buf)?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&buf[..n]);
    }
    let line = req.split(|b| *b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => respond(
            &mut conn,
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            &render(src),
        ),
        ("GET", "/") => respond(
            &mut conn,
            "200 OK",
            "text/plain; charset=utf-8",
            "xlbd: metrics at /metrics\n",
        ),
        ("GET", _) => respond(&mut conn, "404 Not Found", "text/plain", "see /metrics\n"),
        _ => respond(
            &mut conn,
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics\n",
        ),
    }
}

fn respond(conn: &mut TcpStream, status: &str, ctype: &str, body: &str) -> io::Result<()> {
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    conn.flush()
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use xlb_api::{PublishError, Publisher, StateOptions};
    use xlb_engine::{compile, Config, MemberHealth, RuleSet};

    use super::*;

    struct Accept;
    impl Publisher for Accept {
        fn publish(&self, _: Arc<RuleSet>, _: Duration) -> Result<(), PublishError> {
            Ok(())
        }
    }

    const CONFIG: &str = r#"
[[frontends]]
name = "vip"
address = "198.18.0.100"
kind = "public"
[[backend_pools]]
name = "web"
members = [{ address = "198.18.1.11" }]
[[load_balancing_rules]]
name = "web"
frontend = "vip"
protocol = "TCP"
frontend_port = 80
backend_pool = "web"
backend_port = 8080
"#;

    fn sources() -> Sources {
        let config = Config::from_toml_str(CONFIG).unwrap();
        let rules = Arc::new(compile(&config, None, &MemberHealth::default(), 1).unwrap());
        let state = Arc::new(ControlState::new(
            config,
            rules,
            MemberHealth::default(),
            Arc::new(Accept),
            StateOptions::default(),
        ));
        let shared = Shared::new(2, 1);
        let mut h = crate::handler::loop_histogram();
        for ns in [1_000u64, 2_000, 50_000] {
            h.record(ns).unwrap();
        }
        for w in 0..2 {
            let mut counters = xlb_engine::Counters {
                rules: vec![RuleCounters {
                    flows_created: 3 + w as u64,
                    flows_evicted: 1,
                    ..RuleCounters::default()
                }],
                ..xlb_engine::Counters::default()
            };
            counters.evictions[EvictReason::HalfOpenBudget.index()] = 2;
            shared.store(crate::handler::Snapshot {
                worker: w,
                counters,
                flows: 1,
                flow_capacity: 8,
                handed_off: 0,
                handoff_dropped: 0,
                generation: 1,
                snat: Vec::new(),
                loop_latency: h.clone(),
                next_hops: xlb_engine::net::NextHopStats {
                    entries: 4,
                    reclaimed: 7 + w as u64,
                    refused: 1,
                },
            });
        }
        Sources {
            state,
            shared,
            port_stats: Vec::new(),
            interfaces: vec!["eth0".into()],
            lab_time_scale: 60,
        }
    }

    #[test]
    fn exposition_is_well_formed_and_sums_workers() {
        let text = render(&sources());
        let mut families = HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap();
                assert!(families.insert(name.to_string()), "{name} declared twice");
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            // name{labels} value, the value a number.
            let (series, value) = line.rsplit_once(' ').expect(line);
            assert!(value.parse::<f64>().is_ok(), "value of {line:?}");
            let name = series.split('{').next().unwrap();
            assert!(
                name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{name}"
            );
            let family = ["_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|f| families.contains(*f))
                .unwrap_or(name);
            assert!(families.contains(family), "{name} before its # TYPE");
        }
        // Summed over both workers.
        assert!(
            text.contains("xlb_rule_flows_created_total{kind=\"load_balancing\",rule=\"web\"} 7"),
            "{text}"
        );
        // Names are validated to [A-Za-z0-9_.-], but label values are escaped anyway.
        assert_eq!(esc("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
        assert!(
            text.contains("xlb_rule_flows_evicted_total{kind=\"load_balancing\",rule=\"web\"} 2")
        );
        assert!(
            text.contains("xlb_worker_evictions_total{worker=\"1\",reason=\"half_open_budget\"} 2")
        );
        assert!(text.contains("xlb_worker_drops_total{worker=\"0\",reason=\"spoofed_source\"} 0"));
        assert!(text.contains("xlb_lab_time_scale 60"));
        assert!(text.contains("xlb_worker_next_hops{worker=\"1\"} 4"));
        assert!(text.contains("xlb_worker_next_hops_reclaimed_total{worker=\"1\"} 8"));
        assert!(text.contains("xlb_worker_next_hops_refused_total{worker=\"0\"} 1"));
        assert!(text.contains("xlb_worker_loop_seconds_count{worker=\"1\"} 3"));
        assert!(text.contains("xlb_worker_loop_seconds{worker=\"0\",quantile=\"0.999\"} 0.00005"));
    }

    #[test]
    fn http_answers_metrics_404_and_405() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let join = spawn(listener, sources(), Arc::clone(&stop)).unwrap();
        let get = |req: &str| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(req.as_bytes()).unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        };
        let ok = get("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("text/plain; version=0.0.4"));
        assert!(ok.contains("xlb_generation 1"));
        assert!(get("GET /nope HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(get("POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
        // A request that never ends its headers is cut off, and the server goes on.
        let mut slow = TcpStream::connect(addr).unwrap();
        slow.write_all(&[b'a'; 9000]).unwrap();
        let mut out = String::new();
        let _ = slow.read_to_string(&mut out);
        assert!(out.starts_with("HTTP/1.1 431"), "{out}");
        assert!(get("GET /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200"));
        stop.store(true, Ordering::Relaxed);
        join.join().unwrap();
    }
}
