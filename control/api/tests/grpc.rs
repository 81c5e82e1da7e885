//! The gRPC service in process: CRUD of every kind, validation bounds and status codes.

mod common;

use common::{crud_round_trip, lb, outbound, status_of, violation, Harness};
use tonic::Code;
use xlb_api::{Remote, Resource};
use xlb_engine::config::{Frontend, HealthProbe, InboundNatRule, LoadBalancingRule, OutboundRule};
use xlb_proto::v1 as pb;

#[tokio::test]
async fn frontend_crud_round_trip() {
    let h = Harness::start().await;
    let mut c = h.client().await;
    let fe = pb::Frontend {
        name: "v6".into(),
        address: "2001:db8::10".into(),
        kind: pb::FrontendKind::Public as i32,
    };
    let changed = pb::Frontend {
        address: "2001:db8::11".into(),
        ..fe.clone()
    };
    let generation = crud_round_trip::<Frontend>(&mut c, fe.clone(), fe, changed).await;
    assert_eq!(generation, 2);
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
            ..Default::default()
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
                ..Default::default()
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
            ..Default::default()
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
    let changed = pb::LoadBalancingRule {
        backend_port: 8443,
        ..rule.clone()
    };
    crud_round_trip::<LoadBalancingRule>(&mut c, rule.clone(), rule, changed).await;

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
    let request = <InboundNatRule as Resource>::create_request(range.clone());
    let created = InboundNatRule::create(&mut c, request).await.unwrap();
    assert_eq!(created.rule, Some(range));
    let changed = pb::InboundNatRule {
        target: Some("198.18.2.2".into()),
        ..single.clone()
    };
    crud_round_trip::<InboundNatRule>(&mut c, single.clone(), single, changed).await;

    // Outbound rule.
    let mut out = outbound("egress");
    out.allocated_outbound_ports = Some(2048);
    out.idle_timeout_minutes = Some(60);
    let changed = pb::OutboundRule {
        tcp_reset: true,
        ..out.clone()
    };
    crud_round_trip::<OutboundRule>(&mut c, out.clone(), out, changed).await;

    // Health probe: defaults filled in (interval 5, threshold 2).
    let probe = pb::HealthProbe {
        name: "http".into(),
        protocol: pb::ProbeProtocol::Http as i32,
        port: 8080,
        path: Some("/healthz".into()),
        interval_seconds: Some(5),
        threshold: Some(2),
        ..Default::default()
    };
    let sent = pb::HealthProbe {
        interval_seconds: None,
        threshold: None,
        ..probe.clone()
    };
    let changed = pb::HealthProbe {
        threshold: Some(3),
        ..probe.clone()
    };
    crud_round_trip::<HealthProbe>(&mut c, sent, probe, changed).await;

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
