//! Drains with a deadline and HTTPS probes through the gRPC API in process: the member's
//! drain settings, its progress in the status, drain events, the probe's TLS settings.

mod common;

use tonic::Code;
use xlb_api::server::Client;
use xlb_api::telemetry::RuntimeStatus;
use xlb_proto::v1 as pb;

use common::{status_of, Harness};

/// The status of member 198.18.3.1 of pool `apps`.
async fn apps_member(c: &mut Client) -> pb::MemberHealth {
    let st = c
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    st.members
        .into_iter()
        .find(|m| m.backend_pool == "apps")
        .unwrap()
}

#[tokio::test]
async fn a_drain_deadline_is_set_and_cleared_through_the_api_and_shows_in_the_status() {
    let h = Harness::start().await;
    let mut c = h.client().await;
    c.create_backend_pool(pb::CreateBackendPoolRequest {
        backend_pool: Some(pb::BackendPool {
            name: "apps".into(),
            members: vec![pb::Member {
                address: "198.18.3.1".into(),
                ..Default::default()
            }],
        }),
    })
    .await
    .unwrap();
    let set = |timeout: Option<u32>, action: Option<pb::DrainAction>, clear: bool| {
        pb::SetPoolMemberRequest {
            backend_pool: "apps".into(),
            address: "198.18.3.1".into(),
            admin_state: Some(pb::AdminState::Down as i32),
            drain_timeout_seconds: timeout,
            drain_action: action.map(|a| a as i32),
            clear_drain_timeout: clear,
            ..Default::default()
        }
    };
    let r = c
        .set_pool_member(set(Some(120), Some(pb::DrainAction::Idle), false))
        .await
        .unwrap()
        .into_inner();
    let m = &r.backend_pool.unwrap().members[0];
    assert_eq!(
        (m.drain_timeout_seconds, m.drain_action),
        (Some(120), pb::DrainAction::Idle as i32)
    );
    h.telemetry.set_status(RuntimeStatus {
        drains: vec![xlb_api::DrainStatus {
            pool: "apps".into(),
            member: "198.18.3.1".parse().unwrap(),
            flows_left: Some(4),
            flows_reset: 0,
            flows_ended: 0,
            deadline_done: false,
        }],
        ..RuntimeStatus::default()
    });
    let m = apps_member(&mut c).await;
    assert!(m.draining && !m.eligible);
    assert_eq!(m.drain_flows_left, Some(4));
    let left = m.drain_deadline_in_ms.expect("a deadline");
    assert!((110_000..=120_000).contains(&left), "{left}");
    // A later change keeps the drain's start: the deadline does not move.
    std::thread::sleep(std::time::Duration::from_millis(20));
    c.set_pool_member(set(None, None, false)).await.unwrap();
    let m = apps_member(&mut c).await;
    assert!(
        m.drain_deadline_in_ms.unwrap() < left,
        "counts from the drain's start"
    );
    // Cleared: drained until undrained.
    c.set_pool_member(set(None, None, true)).await.unwrap();
    let m = apps_member(&mut c).await;
    assert_eq!((m.draining, m.drain_deadline_in_ms), (true, None));
    // Refused: both at once, out of range, unknown action.
    for bad in [
        set(Some(5), None, true),
        set(Some(3_601), None, false),
        pb::SetPoolMemberRequest {
            drain_action: Some(9),
            ..set(None, None, false)
        },
    ] {
        let s = status_of(c.set_pool_member(bad).await);
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    }
    // Undrained: no drain any more.
    c.set_pool_member(pb::SetPoolMemberRequest {
        admin_state: Some(pb::AdminState::None as i32),
        ..set(None, None, false)
    })
    .await
    .unwrap();
    let m = apps_member(&mut c).await;
    assert!(!m.draining && m.eligible);
    h.stop().await;
}

#[tokio::test]
async fn https_probes_round_trip_with_their_tls_settings_and_drain_events_reach_watchers() {
    let h = Harness::start().await;
    let mut c = h.client().await;
    let probe = pb::HealthProbe {
        name: "tls".into(),
        protocol: pb::ProbeProtocol::Https as i32,
        port: 8443,
        path: Some("/healthz".into()),
        interval_seconds: Some(10),
        threshold: Some(2),
        timeout_seconds: Some(3),
        tls_verify: true,
        tls_server_name: Some("backend.example".into()),
        tls_ca_file: Some("/etc/xlb/probe-ca.pem".into()),
        http_status: Some("200-399".into()),
    };
    let got = c
        .create_health_probe(pb::CreateHealthProbeRequest {
            probe: Some(probe.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.probe, Some(probe.clone()));
    let s = status_of(
        c.update_health_probe(pb::UpdateHealthProbeRequest {
            probe: Some(pb::HealthProbe {
                timeout_seconds: Some(11),
                ..probe.clone()
            }),
        })
        .await,
    );
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(
        s.message().contains("timeout_seconds = 11"),
        "{}",
        s.message()
    );

    let mut events = c
        .watch_events(pb::WatchEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    h.telemetry
        .emit(xlb_api::ControlEvent::Drain(xlb_api::DrainEvent {
            pool: "web".into(),
            member: "198.18.2.1".parse().unwrap(),
            phase: xlb_api::DrainPhase::Deadline,
            flows_left: Some(0),
            flows_reset: 3,
            deadline_in_ms: Some(-5),
            action: xlb_engine::config::DrainAction::Reset,
        }));
    let ev = events.message().await.unwrap().unwrap();
    let Some(pb::event::Kind::Drain(d)) = ev.kind else {
        panic!("{ev:?}")
    };
    assert_eq!(
        (
            d.member.as_str(),
            d.phase.as_str(),
            d.flows_left,
            d.flows_reset
        ),
        ("198.18.2.1", "deadline", Some(0), 3)
    );
    h.stop().await;
}
