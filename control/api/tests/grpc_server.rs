//! The gRPC server in process: publish failures and roll-back, serialized changes, reflection and health, socket mode, token, limits.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{lb, status_of, Harness, BASE};
use tonic::Code;
use xlb_api::{Listen, ServeError, ServeOptions};
use xlb_proto::v1 as pb;

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
