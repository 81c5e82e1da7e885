//! The gRPC API through the generated client, against an in-process server on a Unix socket.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{Harness, BASE};
use tonic::Code;
use xlb_api::status::validation_failure;
use xlb_api::telemetry::{
    ControlEvent, CountersSnapshot, FlowEntry, RuntimeStatus, WorkerCounters, WorkerStatus,
};
use xlb_api::{Listen, ServeError, ServeOptions};
use xlb_engine::flow::Nat;
use xlb_engine::ruleset::FlowTuple;
use xlb_engine::tcp::TcpState;
use xlb_engine::{Addr, Counters, FlowInfo, RuleCounters};
use xlb_proto::v1 as pb;

fn status_of<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> tonic::Status {
    r.expect_err("the request should have been refused")
}

/// The single violation of an INVALID_ARGUMENT status at `path`: (value, allowed).
fn violation(s: &tonic::Status, path: &str) -> (String, String) {
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    let v = validation_failure(s).expect("structured details");
    let hit = v
        .violations
        .iter()
        .find(|v| v.path == path)
        .unwrap_or_else(|| panic!("no violation at {path}: {v:?}"));
    assert!(
        s.message().contains(path),
        "message names the field: {}",
        s.message()
    );
    (hit.value.clone(), hit.allowed.clone())
}

fn lb(name: &str, port: u32) -> pb::LoadBalancingRule {
    pb::LoadBalancingRule {
        name: name.into(),
        frontend: "vip".into(),
        protocol: pb::Protocol::Tcp as i32,
        frontend_port: port,
        backend_pool: "web".into(),
        backend_port: 8080,
        ..Default::default()
    }
}

fn outbound(name: &str) -> pb::OutboundRule {
    pb::OutboundRule {
        name: name.into(),
        frontends: vec!["snat".into()],
        backend_pool: "web".into(),
        protocol: pb::Protocol::Tcp as i32,
        ..Default::default()
    }
}

#[tokio::test]
async fn frontend_crud_round_trip() {
    let h = Harness::start().await;
    let mut c = h.client().await;
    let fe = pb::Frontend {
        name: "v6".into(),
        address: "2001:db8::10".into(),
        kind: pb::FrontendKind::Public as i32,
    };
    let r = c
        .create_frontend(pb::CreateFrontendRequest {
            frontend: Some(fe.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.frontend.as_ref(), Some(&fe));
    assert_eq!(r.generation, 2);
    let got = c
        .get_frontend(pb::GetRequest { name: "v6".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.frontend, Some(fe.clone()));
    let list = c
        .list_frontends(pb::ListRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.frontends.len(), 4);
    let mut changed = fe.clone();
    changed.address = "2001:db8::11".into();
    let r = c
        .update_frontend(pb::UpdateFrontendRequest {
            frontend: Some(changed.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.frontend, Some(changed));
    assert_eq!(r.generation, 3);
    let d = c
        .delete_frontend(pb::DeleteRequest { name: "v6".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.generation, 4);
    let s = status_of(c.get_frontend(pb::GetRequest { name: "v6".into() }).await);
    assert_eq!(s.code(), Code::NotFound);
    h.stop().await;
}

#[tokio::test]
async fn pool_and_member_crud_round_trip() {
    let h = Harness::start().await;
    let mut c = h.client().await;
    let pool = pb::BackendPool {
        name: "apps".into(),
        members: vec![pb::Member {
            address: "198.18.3.1".into(),
            weight: None,
            admin_state: 0,
        }],
    };
    let r = c
        .create_backend_pool(pb::CreateBackendPoolRequest {
            backend_pool: Some(pool),
        })
        .await
        .unwrap()
        .into_inner();
    // Answers carry effective values: the default weight is 1.
    assert_eq!(r.backend_pool.unwrap().members[0].weight, Some(1));
    let r = c
        .add_pool_member(pb::AddPoolMemberRequest {
            backend_pool: "apps".into(),
            member: Some(pb::Member {
                address: "198.18.3.2".into(),
                weight: Some(5),
                admin_state: pb::AdminState::Down as i32,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.backend_pool.as_ref().unwrap().members.len(), 2);
    let r = c
        .set_pool_member(pb::SetPoolMemberRequest {
            backend_pool: "apps".into(),
            address: "198.18.3.2".into(),
            weight: Some(7),
            admin_state: Some(pb::AdminState::Up as i32),
        })
        .await
        .unwrap()
        .into_inner();
    let m = &r.backend_pool.as_ref().unwrap().members[1];
    assert_eq!(
        (m.weight, m.admin_state),
        (Some(7), pb::AdminState::Up as i32)
    );
    let s = status_of(
        c.add_pool_member(pb::AddPoolMemberRequest {
            backend_pool: "apps".into(),
            member: Some(pb::Member {
                address: "198.18.3.2".into(),
                ..Default::default()
            }),
        })
        .await,
    );
    assert_eq!(s.code(), Code::AlreadyExists);
    c.remove_pool_member(pb::RemovePoolMemberRequest {
        backend_pool: "apps".into(),
        address: "198.18.3.1".into(),
    })
    .await
    .unwrap();
    let s = status_of(
        c.remove_pool_member(pb::RemovePoolMemberRequest {
            backend_pool: "apps".into(),
            address: "198.18.3.1".into(),
        })
        .await,
    );
    assert_eq!(s.code(), Code::NotFound);
    let got = c
        .get_backend_pool(pb::GetRequest {
            name: "apps".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let members: Vec<_> = got
        .backend_pool
        .unwrap()
        .members
        .into_iter()
        .map(|m| m.address)
        .collect();
    assert_eq!(members, ["198.18.3.2"]);
    let list = c
        .list_backend_pools(pb::ListRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.backend_pools.len(), 2);
    // Pool replaced wholesale by update.
    c.update_backend_pool(pb::UpdateBackendPoolRequest {
        backend_pool: Some(pb::BackendPool {
            name: "apps".into(),
            members: vec![],
        }),
    })
    .await
    .unwrap();
    c.delete_backend_pool(pb::DeleteRequest {
        name: "apps".into(),
    })
    .await
    .unwrap();
    assert_eq!(
        status_of(
            c.get_backend_pool(pb::GetRequest {
                name: "apps".into()
            })
            .await
        )
        .code(),
        Code::NotFound
    );
    h.stop().await;
}

#[tokio::test]
async fn rule_and_probe_crud_round_trips() {
    let h = Harness::start().await;
    let mut c = h.client().await;

    // Load-balancing rule.
    let mut rule = lb("api", 443);
    rule.idle_timeout_minutes = Some(10);
    rule.tcp_reset = true;
    rule.distribution = pb::Distribution::SourceIp as i32;
    rule.unknown_flow = pb::UnknownFlowPolicy::Reset as i32;
    let r = c
        .create_load_balancing_rule(pb::CreateLoadBalancingRuleRequest {
            rule: Some(rule.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.rule, Some(rule.clone()));
    rule.backend_port = 8443;
    c.update_load_balancing_rule(pb::UpdateLoadBalancingRuleRequest {
        rule: Some(rule.clone()),
    })
    .await
    .unwrap();
    let got = c
        .get_load_balancing_rule(pb::GetRequest { name: "api".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.rule, Some(rule));
    assert_eq!(
        c.list_load_balancing_rules(pb::ListRequest {})
            .await
            .unwrap()
            .into_inner()
            .rules
            .len(),
        2
    );
    c.delete_load_balancing_rule(pb::DeleteRequest { name: "api".into() })
        .await
        .unwrap();
    assert_eq!(
        c.list_load_balancing_rules(pb::ListRequest {})
            .await
            .unwrap()
            .into_inner()
            .rules
            .len(),
        1
    );

    // Inbound NAT rule, both forms.
    let single = pb::InboundNatRule {
        name: "ssh1".into(),
        frontend: "vip".into(),
        protocol: pb::Protocol::Tcp as i32,
        frontend_port: Some(2201),
        target: Some("198.18.2.1".into()),
        backend_pool: Some("web".into()),
        backend_port: 22,
        idle_timeout_minutes: Some(4),
        ..Default::default()
    };
    let range = pb::InboundNatRule {
        name: "ssh-all".into(),
        frontend: "vip".into(),
        protocol: pb::Protocol::Tcp as i32,
        frontend_port_range: Some(pb::PortRange {
            start: 50001,
            end: 50010,
        }),
        backend_pool: Some("web".into()),
        backend_port: 22,
        idle_timeout_minutes: Some(4),
        ..Default::default()
    };
    for r in [&single, &range] {
        let got = c
            .create_inbound_nat_rule(pb::CreateInboundNatRuleRequest {
                rule: Some(r.clone()),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.rule.as_ref(), Some(r));
    }
    let mut single2 = single.clone();
    single2.target = Some("198.18.2.2".into());
    c.update_inbound_nat_rule(pb::UpdateInboundNatRuleRequest {
        rule: Some(single2.clone()),
    })
    .await
    .unwrap();
    let got = c
        .get_inbound_nat_rule(pb::GetRequest {
            name: "ssh1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.rule, Some(single2));
    assert_eq!(
        c.list_inbound_nat_rules(pb::ListRequest {})
            .await
            .unwrap()
            .into_inner()
            .rules
            .len(),
        2
    );
    c.delete_inbound_nat_rule(pb::DeleteRequest {
        name: "ssh1".into(),
    })
    .await
    .unwrap();

    // Outbound rule.
    let mut out = outbound("egress");
    out.allocated_outbound_ports = Some(2048);
    out.idle_timeout_minutes = Some(60);
    let got = c
        .create_outbound_rule(pb::CreateOutboundRuleRequest {
            rule: Some(out.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.rule, Some(out.clone()));
    out.tcp_reset = true;
    c.update_outbound_rule(pb::UpdateOutboundRuleRequest {
        rule: Some(out.clone()),
    })
    .await
    .unwrap();
    let got = c
        .get_outbound_rule(pb::GetRequest {
            name: "egress".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.rule, Some(out));
    assert_eq!(
        c.list_outbound_rules(pb::ListRequest {})
            .await
            .unwrap()
            .into_inner()
            .rules
            .len(),
        1
    );
    c.delete_outbound_rule(pb::DeleteRequest {
        name: "egress".into(),
    })
    .await
    .unwrap();

    // Health probe.
    let probe = pb::HealthProbe {
        name: "http".into(),
        protocol: pb::ProbeProtocol::Http as i32,
        port: 8080,
        path: Some("/healthz".into()),
        interval_seconds: Some(5),
        threshold: Some(2),
    };
    let got = c
        .create_health_probe(pb::CreateHealthProbeRequest {
            probe: Some(pb::HealthProbe {
                interval_seconds: None,
                threshold: None,
                ..probe.clone()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        got.probe,
        Some(probe.clone()),
        "defaults filled in: interval 5, threshold 2"
    );
    let mut p2 = probe.clone();
    p2.threshold = Some(3);
    c.update_health_probe(pb::UpdateHealthProbeRequest {
        probe: Some(p2.clone()),
    })
    .await
    .unwrap();
    assert_eq!(
        c.get_health_probe(pb::GetRequest {
            name: "http".into()
        })
        .await
        .unwrap()
        .into_inner()
        .probe,
        Some(p2)
    );
    assert_eq!(
        c.list_health_probes(pb::ListRequest {})
            .await
            .unwrap()
            .into_inner()
            .probes
            .len(),
        2
    );
    c.delete_health_probe(pb::DeleteRequest {
        name: "http".into(),
    })
    .await
    .unwrap();

    // The whole configuration reads back equal to the library's view.
    let cfg = c
        .get_config(pb::GetConfigRequest {})
        .await
        .unwrap()
        .into_inner();
    let snap = h.state.snapshot();
    assert_eq!(cfg.generation, snap.generation);
    assert_eq!(xlb_api::convert::config_from(cfg).unwrap(), snap.config);
    h.stop().await;
}

#[tokio::test]
async fn idle_timeout_bounds_of_lb_and_outbound_rules() {
    let h = Harness::start().await;
    let mut c = h.client().await;
    for (minutes, ok) in [(3, false), (4, true), (30, true), (31, false)] {
        let mut r = lb("web", 80);
        r.idle_timeout_minutes = Some(minutes);
        let res = c
            .update_load_balancing_rule(pb::UpdateLoadBalancingRuleRequest { rule: Some(r) })
            .await;
        if ok {
            res.unwrap();
        } else {
            let s = status_of(res);
            let (value, allowed) = violation(&s, "load_balancing_rules[web].idle_timeout_minutes");
            assert_eq!(
                (value.as_str(), allowed.as_str()),
                (minutes.to_string().as_str(), "4–30")
            );
        }
    }
    c.create_outbound_rule(pb::CreateOutboundRuleRequest {
        rule: Some(outbound("out")),
    })
    .await
    .unwrap();
    for (minutes, ok) in [(3, false), (4, true), (100, true), (101, false)] {
        let mut r = outbound("out");
        r.idle_timeout_minutes = Some(minutes);
        let res = c
            .update_outbound_rule(pb::UpdateOutboundRuleRequest { rule: Some(r) })
            .await;
        if ok {
            res.unwrap();
        } else {
            let s = status_of(res);
            let (value, allowed) = violation(&s, "outbound_rules[out].idle_timeout_minutes");
            assert_eq!(
                (value.as_str(), allowed.as_str()),
                (minutes.to_string().as_str(), "4–100")
            );
        }
    }
    h.stop().await;
}

#[tokio::test]
async fn port_bounds_and_snat_allocation_and_references() {
    let h = Harness::start().await;
    let mut c = h.client().await;
    for (port, ok) in [(0u32, false), (1, true), (65535, true), (65536, false)] {
        let res = c
            .create_load_balancing_rule(pb::CreateLoadBalancingRuleRequest {
                rule: Some(lb("p", port)),
            })
            .await;
        if ok {
            res.unwrap();
            c.delete_load_balancing_rule(pb::DeleteRequest { name: "p".into() })
                .await
                .unwrap();
        } else {
            let s = status_of(res);
            let (value, allowed) = violation(&s, "load_balancing_rules[p].frontend_port");
            assert_eq!(value, port.to_string());
            assert!(allowed.starts_with("1–65535"), "{allowed}");
        }
    }
    // Probe port too.
    let s = status_of(
        c.create_health_probe(pb::CreateHealthProbeRequest {
            probe: Some(pb::HealthProbe {
                name: "bad".into(),
                protocol: pb::ProbeProtocol::Tcp as i32,
                port: 65536,
                ..Default::default()
            }),
        })
        .await,
    );
    assert_eq!(
        violation(&s, "health_probes[bad].port"),
        ("65536".into(), "1–65535".into())
    );

    let mut r = outbound("out");
    r.allocated_outbound_ports = Some(1020);
    let s = status_of(
        c.create_outbound_rule(pb::CreateOutboundRuleRequest { rule: Some(r) })
            .await,
    );
    let (value, allowed) = violation(&s, "outbound_rules[out].allocated_outbound_ports");
    assert_eq!(value, "1020");
    assert!(allowed.contains("multiple of 8"), "{allowed}");

    let mut r = lb("ghost", 81);
    r.backend_pool = "nope".into();
    r.health_probe = Some("missing".into());
    let s = status_of(
        c.create_load_balancing_rule(pb::CreateLoadBalancingRuleRequest { rule: Some(r) })
            .await,
    );
    let (value, allowed) = violation(&s, "load_balancing_rules[ghost].backend_pool");
    assert_eq!(value, "\"nope\"");
    assert!(allowed.contains("\"web\""), "{allowed}");
    violation(&s, "load_balancing_rules[ghost].health_probe");

    // Conversion errors: bad IP, unknown enum value, missing message.
    let s = status_of(
        c.create_frontend(pb::CreateFrontendRequest {
            frontend: Some(pb::Frontend {
                name: "x".into(),
                address: "198.18.0.300".into(),
                kind: 9,
            }),
        })
        .await,
    );
    assert_eq!(violation(&s, "frontends[x].address").0, "\"198.18.0.300\"");
    assert_eq!(violation(&s, "frontends[x].kind").0, "9");
    let s = status_of(
        c.create_frontend(pb::CreateFrontendRequest { frontend: None })
            .await,
    );
    violation(&s, "frontend");
    // Nothing of the refused requests was applied.
    assert_eq!(
        c.list_frontends(pb::ListRequest {})
            .await
            .unwrap()
            .into_inner()
            .frontends
            .len(),
        3
    );
    h.stop().await;
}

#[tokio::test]
async fn not_found_already_exists_and_failed_precondition() {
    let h = Harness::start().await;
    let mut c = h.client().await;
    let s = status_of(
        c.create_load_balancing_rule(pb::CreateLoadBalancingRuleRequest {
            rule: Some(lb("web", 81)),
        })
        .await,
    );
    assert_eq!(s.code(), Code::AlreadyExists);
    let s = status_of(
        c.update_load_balancing_rule(pb::UpdateLoadBalancingRuleRequest {
            rule: Some(lb("nope", 81)),
        })
        .await,
    );
    assert_eq!(s.code(), Code::NotFound);
    let s = status_of(
        c.delete_outbound_rule(pb::DeleteRequest {
            name: "nope".into(),
        })
        .await,
    );
    assert_eq!(s.code(), Code::NotFound);
    let s = status_of(
        c.delete_backend_pool(pb::DeleteRequest { name: "web".into() })
            .await,
    );
    assert_eq!(s.code(), Code::FailedPrecondition);
    assert!(
        s.message().contains("load_balancing_rules[web]"),
        "{}",
        s.message()
    );
    let s = status_of(
        c.delete_frontend(pb::DeleteRequest { name: "vip".into() })
            .await,
    );
    assert_eq!(s.code(), Code::FailedPrecondition);
    let s = status_of(
        c.delete_health_probe(pb::DeleteRequest {
            name: "tcp80".into(),
        })
        .await,
    );
    assert_eq!(s.code(), Code::FailedPrecondition);
    // Once the rule is gone, the pool can go.
    c.delete_load_balancing_rule(pb::DeleteRequest { name: "web".into() })
        .await
        .unwrap();
    c.delete_backend_pool(pb::DeleteRequest { name: "web".into() })
        .await
        .unwrap();
    h.stop().await;
}

#[tokio::test]
async fn publish_failure_leaves_config_unchanged_and_generations_increase() {
    let h = Harness::start().await;
    let mut c = h.client().await;
    let before = c
        .get_config(pb::GetConfigRequest {})
        .await
        .unwrap()
        .into_inner();
    h.publisher
        .fail_next
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let s = status_of(
        c.create_load_balancing_rule(pb::CreateLoadBalancingRuleRequest {
            rule: Some(lb("new", 81)),
        })
        .await,
    );
    assert_eq!(s.code(), Code::DeadlineExceeded);
    assert!(s.message().contains("worker(s) 1"), "{}", s.message());
    let after = c
        .get_config(pb::GetConfigRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.load_balancing_rules, before.load_balancing_rules);
    assert_eq!(
        xlb_api::convert::config_from(after).unwrap(),
        xlb_api::convert::config_from(before).unwrap()
    );
    // Two failures in a row (change and roll-back): UNAVAILABLE-class answer, status degraded.
    h.publisher
        .fail_next
        .store(2, std::sync::atomic::Ordering::SeqCst);
    let s = status_of(
        c.create_load_balancing_rule(pb::CreateLoadBalancingRuleRequest {
            rule: Some(lb("new", 81)),
        })
        .await,
    );
    assert_eq!(s.code(), Code::DeadlineExceeded);
    let st = c
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!st.degraded.is_empty());
    // A later change succeeds and clears it.
    c.create_load_balancing_rule(pb::CreateLoadBalancingRuleRequest {
        rule: Some(lb("new", 81)),
    })
    .await
    .unwrap();
    assert!(c
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .degraded
        .is_empty());
    let g = h.publisher.generations();
    assert!(
        g.windows(2).all(|w| w[0] < w[1]),
        "strictly increasing: {g:?}"
    );
    assert_eq!(
        g.len(),
        6,
        "start, fail+rollback, fail+failed rollback, success: {g:?}"
    );
    h.stop().await;
}

#[tokio::test]
async fn concurrent_changes_are_serialized() {
    let h = Harness::start().await;
    let mut tasks = Vec::new();
    for i in 0..12u32 {
        let mut c = h.client().await;
        tasks.push(tokio::spawn(async move {
            c.create_frontend(pb::CreateFrontendRequest {
                frontend: Some(pb::Frontend {
                    name: format!("f{i}"),
                    address: format!("198.18.9.{}", i + 1),
                    kind: pb::FrontendKind::Public as i32,
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .generation
        }));
    }
    let mut gens = Vec::new();
    for t in tasks {
        gens.push(t.await.unwrap());
    }
    gens.sort_unstable();
    assert_eq!(gens, (2..14).collect::<Vec<u64>>());
    assert_eq!(h.publisher.generations(), (1..14).collect::<Vec<u64>>());
    assert_eq!(h.state.snapshot().config.frontends.len(), 15);
    h.stop().await;
}

#[tokio::test]
async fn reflection_lists_services_and_health_is_serving() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let h = Harness::start().await;
    let ch = h.channel().await;
    let mut health = HealthClient::new(ch.clone());
    for service in ["", "xlb.v1.Xlb"] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }
    let mut refl = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let msg = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        panic!("unexpected reflection answer {msg:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"xlb.v1.Xlb".to_string()), "{names:?}");
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
    h.stop().await;
}

#[tokio::test]
async fn socket_is_private_and_removed_at_shutdown() {
    let h = Harness::start().await;
    let mode = std::fs::metadata(&h.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // A second server on the same socket is refused while the first one runs.
    let again = xlb_api::bind(ServeOptions {
        listen: Listen::Unix(h.socket.clone()),
        ..ServeOptions::default()
    })
    .await;
    assert!(matches!(again, Err(ServeError::Socket { .. })), "{again:?}");
    let socket = h.socket.clone();
    h.stop().await;
    assert!(!socket.exists());
}

#[tokio::test]
async fn bearer_token_is_required_on_tcp() {
    let refused = xlb_api::bind(ServeOptions {
        listen: Listen::Tcp("127.0.0.1:0".parse().unwrap()),
        ..ServeOptions::default()
    })
    .await;
    assert!(
        matches!(refused, Err(ServeError::Unauthenticated(_))),
        "{refused:?}"
    );

    let h = Harness::start_with(BASE, |o| {
        o.listen = Listen::Tcp("127.0.0.1:0".parse().unwrap());
        o.token = Some("s3cret".into());
    })
    .await;
    let mut none = h.client_with_token(None).await;
    let s = status_of(none.list_frontends(pb::ListRequest {}).await);
    assert_eq!(s.code(), Code::Unauthenticated);
    let mut wrong = h.client_with_token(Some("guess")).await;
    let s = status_of(wrong.list_frontends(pb::ListRequest {}).await);
    assert_eq!(s.code(), Code::Unauthenticated);
    let mut right = h.client_with_token(Some("s3cret")).await;
    assert_eq!(
        right
            .list_frontends(pb::ListRequest {})
            .await
            .unwrap()
            .into_inner()
            .frontends
            .len(),
        3
    );
    // Health answers without a token.
    let mut health = tonic_health::pb::health_client::HealthClient::new(h.channel().await);
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    h.stop().await;
}

#[tokio::test]
async fn oversized_requests_are_refused_and_the_server_keeps_serving() {
    let h = Harness::start_with(BASE, |o| o.max_request_bytes = 4096).await;
    let mut c = h.client().await;
    let big = pb::Frontend {
        name: "x".repeat(10_000),
        address: "198.18.0.99".into(),
        kind: pb::FrontendKind::Public as i32,
    };
    let s = status_of(
        c.create_frontend(pb::CreateFrontendRequest {
            frontend: Some(big),
        })
        .await,
    );
    assert_eq!(s.code(), Code::OutOfRange, "{s:?}");
    assert_eq!(
        c.list_frontends(pb::ListRequest {})
            .await
            .unwrap()
            .into_inner()
            .frontends
            .len(),
        3
    );
    h.stop().await;
}

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
async fn counters_flows_events_and_status_come_from_telemetry() {
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
            },
            WorkerCounters {
                worker: 1,
                counters: counters.clone(),
                flows: 1,
                flow_capacity: 100,
                generation: second_generation,
            },
        ],
        snat: vec![],
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
    let s = status_of(
        c.list_flows(pb::ListFlowsRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await,
    );
    violation(&s, "page_token");
    let s = status_of(
        c.list_flows(pb::ListFlowsRequest {
            state: "sleepy".into(),
            ..Default::default()
        })
        .await,
    );
    violation(&s, "state");
    let s = status_of(
        c.list_flows(pb::ListFlowsRequest {
            client_address: "nope".into(),
            ..Default::default()
        })
        .await,
    );
    violation(&s, "client_address");

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

    // Status.
    h.telemetry.set_status(RuntimeStatus {
        workers: vec![WorkerStatus {
            worker: 0,
            interface: "veth0".into(),
            queue: 0,
            core: Some(1),
            generation: 2,
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
        (2, "busy", 42, 1)
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

#[tokio::test]
async fn requests_over_the_concurrency_limit_are_refused_not_queued() {
    let h = Harness::start_with(BASE, |o| o.max_concurrent_requests = 1).await;
    h.publisher
        .delay_ms
        .store(800, std::sync::atomic::Ordering::SeqCst);
    let mut writer = h.client().await;
    let slow = tokio::spawn(async move {
        writer
            .create_load_balancing_rule(pb::CreateLoadBalancingRuleRequest {
                rule: Some(lb("slow", 81)),
            })
            .await
    });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let mut other = h.client().await;
    let s = status_of(other.list_frontends(pb::ListRequest {}).await);
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    slow.await.unwrap().unwrap();
    // Capacity is back once the slow request is done.
    other.list_frontends(pb::ListRequest {}).await.unwrap();
    h.stop().await;
}

#[tokio::test]
async fn tcp_reset_on_an_ha_ports_rule_is_refused_naming_field_and_reason() {
    let h = Harness::start().await;
    let mut c = h.client().await;
    let generation = h.state.generation();
    let ha = pb::LoadBalancingRule {
        name: "ha".into(),
        frontend: "ilb".into(),
        protocol: pb::Protocol::All as i32,
        frontend_port: 0,
        backend_pool: "web".into(),
        backend_port: 0,
        tcp_reset: true,
        ..Default::default()
    };
    let s = status_of(
        c.create_load_balancing_rule(pb::CreateLoadBalancingRuleRequest {
            rule: Some(ha.clone()),
        })
        .await,
    );
    let (value, allowed) = violation(&s, "load_balancing_rules[ha].tcp_reset");
    assert_eq!(value, "true");
    assert!(allowed.contains("HA-ports"), "{allowed}");
    assert!(
        s.message().contains("never sent"),
        "the reason: {}",
        s.message()
    );
    assert_eq!(h.state.generation(), generation, "nothing applied");
    // Without the reset it is accepted.
    c.create_load_balancing_rule(pb::CreateLoadBalancingRuleRequest {
        rule: Some(pb::LoadBalancingRule {
            tcp_reset: false,
            ..ha
        }),
    })
    .await
    .unwrap();
}
