//! The gRPC reads in process: counters, flows, events and status from the telemetry.

mod common;

use tonic::Code;
use xlb_api::telemetry::{
    ControlEvent, CountersSnapshot, FlowEntry, RuntimeStatus, WorkerCounters, WorkerStatus,
};
use xlb_engine::flow::Nat;
use xlb_engine::ruleset::FlowTuple;
use xlb_engine::tcp::TcpState;
use xlb_engine::{Addr, Counters, FlowInfo, RuleCounters};
use xlb_proto::v1 as pb;

use common::{lb, status_of, violation, Harness};

fn flow(
    id: u32,
    rule: u16,
    client: [u8; 4],
    backend: [u8; 4],
    state: Option<TcpState>,
) -> FlowInfo {
    let vip = Addr::from_v4_bytes([198, 18, 0, 10]);
    FlowInfo {
        id,
        rule,
        proto: if state.is_some() { 6 } else { 17 },
        nat: Nat::Dnat,
        orig: FlowTuple {
            proto: 6,
            src: Addr::from_v4_bytes(client),
            src_port: 40000 + id as u16,
            dst: vip,
            dst_port: 80,
        },
        translated: FlowTuple {
            proto: 6,
            src: Addr::from_v4_bytes(client),
            src_port: 40000 + id as u16,
            dst: Addr::from_v4_bytes(backend),
            dst_port: 8080,
        },
        tcp_state: state,
        last_seen: 1_000_000_000,
        deadline: 241_000_000_000,
    }
}

#[tokio::test]
async fn counters_are_summed_over_workers_and_named_by_rule() {
    let h = Harness::start().await;
    let mut c = h.client().await;
    let web = h
        .state
        .snapshot()
        .rules
        .rule_id(xlb_engine::ruleset::RuleKind::LoadBalancing, "web")
        .unwrap();

    // Counters: summed over workers, named by rule.
    let mut counters = Counters {
        rules: vec![RuleCounters::default(); usize::from(web) + 1],
        ..Counters::default()
    };
    counters.rules[usize::from(web)].flows_created = 5;
    counters.rules[usize::from(web)].flows_evicted = 4;
    counters.rules[usize::from(web)].wrong_side = 1;
    counters.rules[usize::from(web)].flows_reset_withheld = 3;
    counters.drops[xlb_engine::DropReason::NoRule.index()] = 3;
    counters.evictions[xlb_engine::counters::EvictReason::RuleShare.index()] = 4;
    let generation = h.state.generation();
    let since = h.state.snapshot().rules.since(web).unwrap();
    let workers = |second_generation: u64| CountersSnapshot {
        workers: vec![
            WorkerCounters {
                worker: 0,
                counters: counters.clone(),
                flows: 2,
                flow_capacity: 100,
                generation,
                ..Default::default()
            },
            WorkerCounters {
                worker: 1,
                counters: counters.clone(),
                flows: 1,
                flow_capacity: 100,
                generation: second_generation,
                ..Default::default()
            },
        ],
        snat: vec![],
        fast: None,
    };
    // A worker whose figures were taken before the rule existed (under a generation older
    // than the rule) does not count for it: its id may have belonged to a deleted rule.
    h.telemetry.set_counters(workers(since - 1));
    let r = c
        .get_counters(pb::GetCountersRequest {
            rule: "web".into(),
            per_worker: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.rules[0].flows_created, 5, "{r:?}");
    h.telemetry.set_counters(workers(generation));
    let r = c
        .get_counters(pb::GetCountersRequest {
            rule: String::new(),
            per_worker: true,
        })
        .await
        .unwrap()
        .into_inner();
    let web_c = r.rules.iter().find(|x| x.rule == "web").unwrap();
    assert_eq!(web_c.flows_created, 10);
    assert_eq!((web_c.flows_evicted, web_c.drops_wrong_side), (8, 2));
    assert_eq!(web_c.flows_reset_withheld, 6, "summed over both workers");
    let evicted = |list: &[pb::DropCount], reason: &str| {
        list.iter().find(|d| d.reason == reason).map(|d| d.count)
    };
    assert_eq!(evicted(&r.evictions, "rule_share"), Some(8));
    assert_eq!(evicted(&r.evictions, "table_full"), Some(0), "every reason");
    assert_eq!(evicted(&r.workers[0].evictions, "rule_share"), Some(4));
    assert_eq!(
        evicted(&r.workers[0].evictions, "table_full"),
        None,
        "non-zero only"
    );
    assert_eq!(
        r.drops
            .iter()
            .find(|d| d.reason == "no_rule")
            .unwrap()
            .count,
        6
    );
    assert_eq!(r.workers.len(), 2);
    assert_eq!(r.total.unwrap().flows, 3);
    let s = status_of(
        c.get_counters(pb::GetCountersRequest {
            rule: "nope".into(),
            per_worker: false,
        })
        .await,
    );
    assert_eq!(s.code(), Code::NotFound);
    assert!(r.fast_path.is_none(), "no fast path, none shown");

    // With the XDP fast path: what it forwarded counts in the rule's packets and bytes, and
    // shows on its own.
    counters.rules[usize::from(web)].packets = [2, 3];
    h.telemetry.set_counters(CountersSnapshot {
        workers: vec![WorkerCounters {
            worker: 0,
            counters: Counters {
                fast_published: 4,
                fast_grace_waits: 1,
                fast_new_installed: 10,
                fast_new_conflict: 1,
                fast_new_refused: 1,
                fast_new_rules: 3,
                ..counters.clone()
            },
            generation,
            ..Default::default()
        }],
        snat: vec![],
        fast: Some(xlb_api::FastPathCounters {
            enabled: true,
            forwarded: 77,
            new_forwarded: 12,
            punts: [1, 0, 2, 0, 0, 5, 0, 0, 0, 0, 3, 0],
            rules: vec![xlb_api::FastRuleCounters {
                rule: web,
                packets: [30, 40],
                bytes: [3000, 4000],
            }],
            grace_slowest_ns: 16_000_000,
        }),
    });
    let r = c
        .get_counters(pb::GetCountersRequest {
            rule: "web".into(),
            per_worker: false,
        })
        .await
        .unwrap()
        .into_inner();
    let web_c = &r.rules[0];
    assert_eq!((web_c.packets_original, web_c.packets_reply), (32, 43));
    assert_eq!((web_c.bytes_original, web_c.bytes_reply), (3000, 4000));
    assert_eq!(
        (web_c.fast_packets_original, web_c.fast_packets_reply),
        (30, 40)
    );
    let f = r.fast_path.expect("the fast path's counters");
    assert!(f.enabled);
    assert_eq!((f.forwarded, f.published, f.grace_waits), (77, 4, 1));
    assert_eq!(f.punts.len(), 12, "every reason");
    assert_eq!(f.new_forwarded, 12);
    assert_eq!(
        (f.new_installed, f.new_conflict, f.new_refused, f.new_rules),
        (10, 1, 1, 3)
    );
    assert_eq!(evicted(&f.punts, "new_ring_full"), Some(3));
    assert_eq!(evicted(&f.punts, "miss"), Some(1));
    assert_eq!(evicted(&f.punts, "not_eligible"), Some(5));

    h.stop().await;
}

#[tokio::test]
async fn flows_are_filtered_and_paged() {
    let h = Harness::start().await;
    let mut c = h.client().await;
    let web = h
        .state
        .snapshot()
        .rules
        .rule_id(xlb_engine::ruleset::RuleKind::LoadBalancing, "web")
        .unwrap();

    // Flows: filters and paging.
    let flows: Vec<FlowEntry> = (0..5)
        .map(|i| FlowEntry {
            worker: (i % 2) as u16,
            info: flow(
                i,
                web,
                [198, 18, 5, i as u8 + 1],
                [198, 18, 2, 1 + (i % 2) as u8],
                Some(if i == 4 {
                    TcpState::SynSent
                } else {
                    TcpState::Established
                }),
            ),
        })
        .collect();
    h.telemetry.set_flows(flows, 2_000_000_000);
    let mut token = String::new();
    let mut seen = Vec::new();
    loop {
        let r = c
            .list_flows(pb::ListFlowsRequest {
                page_size: 2,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.flows.len() <= 2);
        seen.extend(r.flows.iter().map(|f| (f.worker, f.flow_id)));
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    assert_eq!(seen.len(), 5);
    let r = c
        .list_flows(pb::ListFlowsRequest {
            backend_address: "198.18.2.2".into(),
            state: "established".into(),
            rule: "web".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.flows.len(),
        2,
        "flows 1 and 3 go to .2 and are established"
    );
    assert_eq!(r.flows[0].idle_ms, 1000);
    assert_eq!(r.flows[0].rule, "web");
    // Each bad filter is refused, naming its field.
    let bad = [
        (
            pb::ListFlowsRequest {
                page_token: "garbage".into(),
                ..Default::default()
            },
            "page_token",
        ),
        (
            pb::ListFlowsRequest {
                state: "sleepy".into(),
                ..Default::default()
            },
            "state",
        ),
        (
            pb::ListFlowsRequest {
                client_address: "nope".into(),
                ..Default::default()
            },
            "client_address",
        ),
    ];
    for (request, field) in bad {
        violation(&status_of(c.list_flows(request).await), field);
    }

    h.stop().await;
}

#[tokio::test]
async fn events_of_changes_and_engines_reach_a_watcher() {
    let h = Harness::start().await;
    let mut c = h.client().await;
    let web = h
        .state
        .snapshot()
        .rules
        .rule_id(xlb_engine::ruleset::RuleKind::LoadBalancing, "web")
        .unwrap();

    // Events: a configuration change and an engine event reach a watcher.
    let mut events = c
        .watch_events(pb::WatchEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    c.create_health_probe(pb::CreateHealthProbeRequest {
        probe: Some(pb::HealthProbe {
            name: "p2".into(),
            protocol: pb::ProbeProtocol::Tcp as i32,
            port: 81,
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    let e = events.message().await.unwrap().unwrap();
    assert!(
        matches!(
            e.kind,
            Some(pb::event::Kind::GenerationApplied(pb::GenerationApplied {
                generation: 2
            }))
        ),
        "{e:?}"
    );
    h.telemetry.emit(ControlEvent::Engine {
        worker: 1,
        event: xlb_engine::Event::SnatExhausted {
            rule: web,
            member: Addr::from_v4_bytes([198, 18, 2, 1]),
        },
    });
    let e = events.message().await.unwrap().unwrap();
    let Some(pb::event::Kind::SnatExhausted(x)) = e.kind else {
        panic!("{e:?}")
    };
    assert_eq!(
        (x.worker, x.rule.as_str(), x.member.as_str()),
        (1, "web", "198.18.2.1")
    );

    h.stop().await;
}

#[tokio::test]
async fn status_comes_from_the_telemetry_and_the_snapshot() {
    let h = Harness::start().await;
    let mut c = h.client().await;
    let generation = h.state.generation();

    // Status.
    h.telemetry.set_status(RuntimeStatus {
        workers: vec![WorkerStatus {
            worker: 0,
            interface: "veth0".into(),
            queue: 0,
            core: Some(1),
            generation,
            flows: 3,
            flow_capacity: 100,
        }],
        poll_mode: "busy".into(),
        uptime: std::time::Duration::from_secs(42),
        datapath: vec![xlb_api::DatapathAvailability {
            frontend: "vip".into(),
            rule: "web".into(),
            window: 40,
            window_answered: 30,
            answered_total: 90,
            failed_total: 10,
        }],
        cluster: Some(xlb_api::ClusterStatus {
            node: "node1".into(),
            fit: true,
            announced: vec!["198.18.100.100/32".into()],
            peers: vec![xlb_api::ClusterPeer {
                address: "198.18.1.2:7946".into(),
                node: "node2".into(),
                alive: true,
                same_config: true,
                last_heard: Some(std::time::Duration::from_millis(50)),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..RuntimeStatus::default()
    });
    let st = c
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            st.generation,
            st.poll_mode.as_str(),
            st.uptime_seconds,
            st.lab_time_scale
        ),
        (generation, "busy", 42, 1)
    );
    assert_eq!(st.workers[0].core, 1);
    assert!(!st.version.is_empty());
    assert!(st.degraded.is_empty(), "{}", st.degraded);
    let d = &st.datapath[0];
    assert_eq!(
        (
            d.frontend.as_str(),
            d.rule.as_str(),
            d.availability,
            d.window
        ),
        ("vip", "web", 0.75, 40)
    );
    assert_eq!((d.answered, d.failed), (90, 10));
    // Every member with its health: no verdict recorded, all eligible.
    assert!(!st.members.is_empty());
    assert!(st.members.iter().all(|m| m.eligible && m.probe_healthy));
    let cl = st.cluster.expect("cluster status");
    assert_eq!((cl.node.as_str(), cl.fit), ("node1", true));
    assert_eq!(cl.announced, ["198.18.100.100/32"]);
    assert_eq!(cl.peers[0].last_heard_seconds, 0.05);
    // Not a cluster node (the fake telemetry has no drain): a clear refusal.
    let err = c
        .set_drain(pb::SetDrainRequest {
            drain: true,
            deadline_seconds: 0.0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    let err = c
        .set_drain(pb::SetDrainRequest {
            drain: true,
            deadline_seconds: -1.0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    h.stop().await;
}

#[tokio::test]
async fn reads_do_not_wait_for_a_slow_publish() {
    let h = Harness::start().await;
    h.publisher
        .delay_ms
        .store(2000, std::sync::atomic::Ordering::SeqCst);
    let mut writer = h.client().await;
    let slow = tokio::spawn(async move {
        writer
            .create_load_balancing_rule(pb::CreateLoadBalancingRuleRequest {
                rule: Some(lb("slow", 81)),
            })
            .await
            .unwrap()
            .into_inner()
            .generation
    });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let mut reader = h.client().await;
    let started = std::time::Instant::now();
    let list = reader
        .list_load_balancing_rules(pb::ListRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        started.elapsed() < std::time::Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    // The read sees the committed state: the change in flight is not there yet.
    assert_eq!((list.rules.len(), list.generation), (1, 1));
    assert_eq!(slow.await.unwrap(), 2);
    h.stop().await;
}
