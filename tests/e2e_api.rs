//! End to end through the gRPC API of a running xlbd (the generated client over its Unix
//! socket) and its Prometheus endpoint: live changes reach every worker (generation
//! acknowledgements), never drop a flow, and are in force for the flows already running.
//! Run as root; otherwise each test says it is skipped.

mod common;

use std::{
    io::ErrorKind,
    net::TcpStream,
    time::{Duration, Instant},
};

use common::ops::{connect, runtime};
use common::*;
use xlb_api::{
    server::{channel, Client},
    Listen,
};
use xlb_proto::v1 as pb;

const SLACK: Duration = Duration::from_millis(1500);

async fn rule(c: &mut Client, name: &str) -> pb::LoadBalancingRule {
    c.get_load_balancing_rule(pb::GetRequest { name: name.into() })
        .await
        .expect("get rule")
        .into_inner()
        .rule
        .expect("a rule")
}

async fn status(c: &mut Client) -> pb::GetStatusResponse {
    c.get_status(pb::GetStatusRequest {})
        .await
        .expect("status")
        .into_inner()
}

/// Reads until the connection ends; how long that took and how it ended.
fn wait_for_end(s: &mut TcpStream, limit: Duration) -> (Duration, std::io::Result<usize>) {
    let from = Instant::now();
    let mut buf = [0u8; 16];
    let r = read_within(s, &mut buf, limit);
    (from.elapsed(), r)
}

#[test]
fn live_timeout_and_reset_changes_reach_both_workers_and_apply_to_running_flows() {
    if !need_root("live_timeout_and_reset_changes_reach_both_workers_and_apply_to_running_flows") {
        return;
    }
    let lab = Lab::start_with(CONFIG, &["--workers", "2", "--queues", "2"]);
    let rt = runtime();
    let mut c = rt.block_on(connect(&lab));

    let st = rt.block_on(status(&mut c));
    assert_eq!(st.workers.len(), 2, "{st:?}");
    assert_eq!(st.lab_time_scale, 60);
    let g0 = st.generation;
    assert!(st.workers.iter().all(|w| w.generation == g0), "{st:?}");

    // Flows on both rules before the change: `web` (reset on idle, 4 min) and `web-silent`
    // (silent, 4 min). Several connections each, so that both workers hold some.
    let mut web: Vec<TcpStream> = (0..6).map(|_| lab.client_connect(80)).collect();
    let mut silent: Vec<TcpStream> = (0..6).map(|_| lab.client_connect(81)).collect();
    for s in web.iter_mut().chain(silent.iter_mut()) {
        assert_eq!(echo(s, b"before\n"), b"before\n");
    }

    // web: 4 → 8 minutes (8 s of lab time). web-silent: TCP reset on.
    let mut r = rt.block_on(rule(&mut c, "web"));
    r.idle_timeout_minutes = Some(8);
    let g1 = rt
        .block_on(
            c.update_load_balancing_rule(pb::UpdateLoadBalancingRuleRequest { rule: Some(r) }),
        )
        .expect("update web")
        .into_inner()
        .generation;
    let mut r = rt.block_on(rule(&mut c, "web-silent"));
    r.tcp_reset = true;
    let g2 = rt
        .block_on(
            c.update_load_balancing_rule(pb::UpdateLoadBalancingRuleRequest { rule: Some(r) }),
        )
        .expect("update web-silent")
        .into_inner()
        .generation;
    assert!(g0 < g1 && g1 < g2, "generations {g0} {g1} {g2}");
    // The RPC returned once every worker acknowledged: both run g2 now.
    let st = rt.block_on(status(&mut c));
    assert!(
        st.workers.iter().all(|w| w.generation == g2),
        "every worker runs generation {g2}: {st:?}"
    );

    // An invalid change is refused, names the field, and changes nothing.
    let mut bad = rt.block_on(rule(&mut c, "web"));
    bad.idle_timeout_minutes = Some(31);
    let e = rt
        .block_on(
            c.update_load_balancing_rule(pb::UpdateLoadBalancingRuleRequest { rule: Some(bad) }),
        )
        .expect_err("31 minutes is out of range");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("idle_timeout_minutes"), "{e:?}");
    assert_eq!(rt.block_on(status(&mut c)).generation, g2);
    assert_eq!(
        rt.block_on(rule(&mut c, "web")).idle_timeout_minutes,
        Some(8)
    );

    // No flow was dropped by the changes: every connection still echoes.
    for s in web.iter_mut().chain(silent.iter_mut()) {
        assert_eq!(echo(s, b"after\n"), b"after\n", "log:\n{}", lab.log_text());
    }
    let idle_from = Instant::now();

    // web-silent now resets on idle at its unchanged 4 s: every client gets ECONNRESET.
    for s in &mut silent {
        let (waited, r) = wait_for_end(s, Duration::from_secs(4) + SLACK * 3);
        assert!(
            matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
            "web-silent: expected ECONNRESET after the live tcp_reset change, got {r:?}; {}",
            lab.diagnostics()
        );
        let total = idle_from.elapsed();
        assert!(
            total >= Duration::from_secs(4) - Duration::from_millis(50)
                && total <= Duration::from_secs(4) + SLACK,
            "reset {total:?} after the last packet (this read waited {waited:?}); {}",
            lab.diagnostics()
        );
    }

    // web: past its old 4 s the flows are still there (the new 8 s is in force) ...
    let left = Duration::from_secs(6).saturating_sub(idle_from.elapsed());
    std::thread::sleep(left);
    let flows = rt
        .block_on(c.list_flows(pb::ListFlowsRequest {
            rule: "web".into(),
            state: "established".into(),
            page_size: 1000,
            ..Default::default()
        }))
        .expect("list flows")
        .into_inner();
    assert_eq!(
        flows.flows.len(),
        web.len(),
        "web's flows live past the old timeout: {flows:?}"
    );
    let workers: std::collections::BTreeSet<u32> = flows.flows.iter().map(|f| f.worker).collect();
    assert!(flows.flows.iter().all(|f| f.expires_in_ms > 0), "{flows:?}");
    // ... and then reset at 8 s.
    for s in &mut web {
        let (_, r) = wait_for_end(s, Duration::from_secs(8) + SLACK * 3);
        assert!(
            matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
            "web: expected ECONNRESET at the new timeout, got {r:?}; {}",
            lab.diagnostics()
        );
    }
    let total = idle_from.elapsed();
    assert!(
        total >= Duration::from_secs(8) - Duration::from_millis(50)
            && total <= Duration::from_secs(8) + SLACK * 2,
        "web reset {total:?} after the last packet; the new timeout is 8 s; {}",
        lab.diagnostics()
    );

    // Counters through the API, summed over both workers.
    lab.wait_stat("rule.lb.web.flows_reset_on_idle", 6, Duration::from_secs(2));
    let counters = rt
        .block_on(c.get_counters(pb::GetCountersRequest {
            per_worker: true,
            ..Default::default()
        }))
        .expect("counters")
        .into_inner();
    let of = |name: &str| {
        counters
            .rules
            .iter()
            .find(|r| r.rule == name)
            .unwrap_or_else(|| panic!("{name} in {counters:?}"))
            .clone()
    };
    assert_eq!(of("web").flows_reset_on_idle, 6, "{counters:?}");
    assert_eq!(of("web-silent").flows_reset_on_idle, 6, "{counters:?}");
    assert_eq!(counters.workers.len(), 2);

    // Prometheus: the same counters, both workers, loop latency and propagation times.
    let m = lab.metrics();
    for want in [
        "xlb_rule_flows_reset_on_idle_total{kind=\"load_balancing\",rule=\"web\"} 6",
        "xlb_rule_flows_reset_on_idle_total{kind=\"load_balancing\",rule=\"web-silent\"} 6",
        "xlb_rule_update_propagation_seconds_count 2",
        "xlb_lab_time_scale 60",
        &format!("xlb_worker_generation{{worker=\"1\"}} {g2}"),
        "xlb_worker_loop_seconds{worker=\"0\",quantile=\"0.99\"}",
        "xlb_worker_loop_seconds{worker=\"1\",quantile=\"0.99\"}",
    ] {
        assert!(m.contains(want), "{want:?} in the metrics:\n{m}");
    }
    assert!(
        workers.len() == 2 || m.contains("xlb_worker_flows"),
        "flows listed from workers {workers:?}"
    );
}

#[test]
fn api_answers_health_events_and_flow_filters_from_the_daemon() {
    if !need_root("api_answers_health_events_and_flow_filters_from_the_daemon") {
        return;
    }
    let lab = Lab::start(CONFIG);
    let rt = runtime();
    let mut c = rt.block_on(connect(&lab));

    // The standard health service.
    let ch = rt
        .block_on(channel(&Listen::Unix(lab.api_socket())))
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
    let h = rt
        .block_on(health.check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        }))
        .expect("health check")
        .into_inner();
    assert_eq!(
        h.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // Watch events, then let a `web` connection reset on idle.
    let mut events = rt
        .block_on(c.watch_events(pb::WatchEventsRequest {}))
        .expect("watch")
        .into_inner();
    let mut s = lab.client_connect(80);
    assert_eq!(echo(&mut s, b"x\n"), b"x\n");

    let flows = rt
        .block_on(c.list_flows(pb::ListFlowsRequest {
            client_address: CLIENT.into(),
            protocol: pb::Protocol::Tcp as i32,
            ..Default::default()
        }))
        .expect("list")
        .into_inner();
    assert_eq!(flows.flows.len(), 1, "{flows:?}");
    let f = &flows.flows[0];
    assert_eq!(f.rule, "web");
    assert_eq!(f.state, "established");
    let backend = f.translated_destination.clone().unwrap();
    assert!(
        [BACKEND1, BACKEND2].contains(&backend.address.as_str()) && backend.port == 8080,
        "{f:?}"
    );
    // Filters that match nothing, and one that is malformed.
    let none = rt
        .block_on(c.list_flows(pb::ListFlowsRequest {
            rule: "web-silent".into(),
            ..Default::default()
        }))
        .unwrap()
        .into_inner();
    assert!(none.flows.is_empty(), "{none:?}");
    let e = rt
        .block_on(c.list_flows(pb::ListFlowsRequest {
            client_address: "not-an-address".into(),
            ..Default::default()
        }))
        .expect_err("bad address");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    let (_, r) = wait_for_end(&mut s, Duration::from_secs(4) + SLACK * 2);
    assert!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "{r:?}; {}",
        lab.diagnostics()
    );
    let ev = rt
        .block_on(async {
            loop {
                match tokio::time::timeout(Duration::from_secs(3), events.message()).await {
                    Ok(Ok(Some(ev))) => {
                        if let Some(pb::event::Kind::ResetOnIdle(r)) = ev.kind {
                            return Some(r);
                        }
                    }
                    _ => return None,
                }
            }
        })
        .expect("a reset_on_idle event");
    assert_eq!(ev.rule, "web");
    assert_eq!(ev.client.unwrap().address, CLIENT);
    assert_eq!(ev.backend.unwrap().address, backend.address);

    // A clean stop with the API up: the socket is removed.
    drop(c);
    drop(health);
    let mut lab = lab;
    let st = lab.stop_xlbd().expect("running");
    assert!(st.success(), "{st}; log:\n{}", lab.log_text());
    assert!(!lab.api_socket().exists(), "the API socket is removed");
}
