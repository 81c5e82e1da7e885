use std::collections::HashSet;

use xlb_api::{PublishError, Publisher, StateOptions};
use xlb_engine::{compile, Config, MemberHealth, RuleSet};

use std::time::Duration;

use super::*;
use crate::plane::cell::{cell, loop_histogram};

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
    let (mut writers, readers): (Vec<_>, Vec<_>) = (0..2).map(cell).unzip();
    let shared = Shared::new(readers, Vec::new(), 1);
    let mut h = loop_histogram();
    for ns in [1_000u64, 2_000, 50_000] {
        h.record(ns).unwrap();
    }
    for (w, cell) in writers.iter_mut().enumerate() {
        cell.publish(|s| {
            s.counters.counters.rules = vec![RuleCounters {
                flows_created: 3 + w as u64,
                flows_evicted: 1,
                ..RuleCounters::default()
            }];
            s.counters.counters.evictions[EvictReason::HalfOpenBudget.index()] = 2;
            s.counters.flows = 1;
            s.counters.flow_capacity = 8;
            s.counters.generation = 1;
            s.counters.next_hops = xlb_engine::net::NextHopStats {
                entries: 4,
                reclaimed: 7 + w as u64,
                refused: 1,
            };
            s.loop_latency.add(&h).unwrap();
        });
    }
    Sources {
        state,
        shared,
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
    assert!(text.contains("xlb_rule_flows_evicted_total{kind=\"load_balancing\",rule=\"web\"} 2"));
    assert!(text.contains("xlb_worker_evictions_total{worker=\"1\",reason=\"half_open_budget\"} 2"));
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
    use std::io::{Read, Write};
    use std::net::TcpStream;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = watch::channel(false);
    let server = rt.spawn(serve(listener, sources(), stopped));
    let get = |req: &str| {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    // A client that never ends its headers holds only its own connection.
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.write_all(b"GET /metr").unwrap();
    // No `Connection: close`: the server closes after its answer all the same.
    let ok = get("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
    assert!(ok.contains("text/plain; version=0.0.4"));
    assert!(ok.contains("xlb_generation 1"));
    let nope = get("GET /nope HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert!(nope.starts_with("HTTP/1.1 404"), "{nope}");
    let post = get("POST /metrics HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    drop(slow);
    stop.send(true).unwrap();
    rt.block_on(server).unwrap().unwrap();
}

/// The stats file's lines and the fast-path metric families for the rules of `CONFIG` and
/// these fast-path counters.
fn fast_path_of(fast: xlb_api::FastPathCounters) -> (String, Families) {
    let config = Config::from_toml_str(CONFIG).unwrap();
    let rules = compile(&config, None, &MemberHealth::default(), 1).unwrap();
    let mut sum = xlb_api::sum(&[], &rules);
    sum.add_fast(Some(&fast));
    let mut o = Families(Vec::new());
    fast_path(&mut o, &sum, &rules);
    (crate::stats::to_kv(&sum, &rules, 1), o)
}

/// Every new-flow figure of the stats file, `fast.new_<name>`, is the metric
/// `xlb_fast_path_new_<name>` (`_total` for a counter): one name finds both.
#[test]
fn new_flow_metrics_are_named_as_in_the_stats_file() {
    let (kv, o) = fast_path_of(xlb_api::FastPathCounters {
        enabled: true,
        ..xlb_api::FastPathCounters::default()
    });
    let names: HashSet<&str> = o.0.iter().map(|f| f.name()).collect();
    let keys: Vec<&str> = kv
        .lines()
        .filter_map(|l| l.split('=').next()?.strip_prefix("fast.new_"))
        .collect();
    assert_eq!(keys.len(), 6, "{kv}");
    for k in keys {
        let name = format!("xlb_fast_path_new_{k}");
        assert!(
            names.contains(name.as_str()) || names.contains(format!("{name}_total").as_str()),
            "{name} in {names:?}"
        );
    }
}

/// How long the slowest recent grace took is a gauge in seconds, as the stats file's
/// `fast.grace_slowest_us` is in microseconds.
#[test]
fn the_slowest_grace_is_a_gauge_in_seconds() {
    let (kv, o) = fast_path_of(xlb_api::FastPathCounters {
        enabled: true,
        grace_slowest_ns: 2_250_000_000,
        ..xlb_api::FastPathCounters::default()
    });
    let f =
        o.0.iter()
            .find(|f| f.name() == "xlb_fast_path_grace_slowest_seconds")
            .expect("the gauge");
    assert_eq!(f.get_field_type(), MetricType::GAUGE);
    assert_eq!(f.get_metric()[0].get_gauge().get_value(), 2.25);
    assert!(
        kv.lines().any(|l| l == "fast.grace_slowest_us=2250000"),
        "{kv}"
    );
}
