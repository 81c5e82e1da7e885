//! `ApplyConfig` through a real gRPC client: a whole configuration applied as one generation
//! with its difference, a refused one changing nothing, a dry run, and `GetConfig` applying
//! back as no change.

mod common;

use common::{status_of, violation, Harness, BASE};
use tonic::Code;
use xlb_api::convert;
use xlb_api::server::Client;
use xlb_engine::config::Config;
use xlb_proto::v1 as pb;

fn base() -> Config {
    Config::from_toml_str(BASE).unwrap()
}

fn request(c: &Config, dry_run: bool) -> pb::ApplyConfigRequest {
    pb::ApplyConfigRequest {
        config: Some(convert::config_to(c, 0)),
        dry_run,
    }
}

/// Applies `config` (or only shows its difference, with `dry_run`); the call succeeds.
async fn apply_ok(c: &mut Client, config: pb::Config, dry_run: bool) -> pb::ApplyConfigResponse {
    c.apply_config(pb::ApplyConfigRequest {
        config: Some(config),
        dry_run,
    })
    .await
    .unwrap()
    .into_inner()
}

/// `op section name` of every change.
fn brief(r: &pb::ApplyConfigResponse) -> Vec<String> {
    r.changes
        .iter()
        .map(|c| {
            let op = pb::ChangeOp::try_from(c.op).unwrap().as_str_name();
            format!("{op} {} {}", c.section, c.name)
        })
        .collect()
}

#[tokio::test]
async fn get_config_applies_back_as_no_change() {
    let h = Harness::start().await;
    let mut c = h.client().await;
    let got = c
        .get_config(pb::GetConfigRequest {})
        .await
        .unwrap()
        .into_inner();
    let generation = got.generation;
    let r = apply_ok(&mut c, got, false).await;
    assert!(r.changes.is_empty(), "{:?}", r.changes);
    assert!(!r.applied);
    assert_eq!(r.generation, generation);
    // Nothing was published.
    assert_eq!(h.publisher.generations(), [1]);
    h.stop().await;
}

#[tokio::test]
async fn a_whole_file_is_one_generation_with_its_difference() {
    let h = Harness::start().await;
    let mut c = h.client().await;
    let mut new = base();
    new.load_balancing_rules[0].idle_timeout_minutes = 10;
    new.backend_pools[0].members.remove(0);
    let mut api = new.load_balancing_rules[0].clone();
    api.name = "api".into();
    api.frontend_port = 443;
    new.load_balancing_rules.push(api);
    new.frontends.retain(|f| f.name != "ilb");
    new.settings.udp_idle_timeout_seconds = 60;

    let r = apply_ok(&mut c, convert::config_to(&new, 0), false).await;
    assert_eq!(
        brief(&r),
        [
            "CHANGE_OP_CHANGED settings udp_idle_timeout_seconds",
            "CHANGE_OP_REMOVED frontend ilb",
            "CHANGE_OP_REMOVED member web/198.18.2.1",
            "CHANGE_OP_CHANGED load_balancing_rule web",
            "CHANGE_OP_ADDED load_balancing_rule api",
        ]
    );
    let web = &r.changes[3];
    assert_eq!(web.fields.len(), 1);
    assert_eq!(
        (
            web.fields[0].field.as_str(),
            web.fields[0].old.as_deref(),
            web.fields[0].new.as_deref()
        ),
        ("idle_timeout_minutes", Some("4"), Some("10"))
    );
    assert!(r.applied);
    assert_eq!(r.generation, 2);
    // Five changes, one publish.
    assert_eq!(h.publisher.generations(), [1, 2]);
    assert_eq!(h.state.snapshot().config, new);
    // And what GetConfig answers now applies as no change.
    let got = c
        .get_config(pb::GetConfigRequest {})
        .await
        .unwrap()
        .into_inner();
    let r = apply_ok(&mut c, got, false).await;
    assert!(r.changes.is_empty() && !r.applied && r.generation == 2);
    h.stop().await;
}

#[tokio::test]
async fn a_refused_file_changes_nothing_and_says_why() {
    let h = Harness::start().await;
    let mut c = h.client().await;
    let mut bad = base();
    // One good change and two bad ones: nothing of it may apply.
    bad.settings.udp_idle_timeout_seconds = 60;
    bad.load_balancing_rules[0].idle_timeout_minutes = 31;
    bad.load_balancing_rules[0].backend_pool = "nope".into();
    let s = status_of(c.apply_config(request(&bad, false)).await);
    assert_eq!(s.code(), Code::InvalidArgument);
    let (value, _) = violation(&s, "load_balancing_rules[web].idle_timeout_minutes");
    assert_eq!(value, "31");
    violation(&s, "load_balancing_rules[web].backend_pool");
    assert_eq!(h.publisher.generations(), [1]);
    assert_eq!(h.state.snapshot().config, base());
    assert_eq!(h.state.generation(), 1);
    // A config that is not even a model (an address that is no address) is refused too.
    let mut raw = convert::config_to(&base(), 0);
    raw.frontends[0].address = "not-an-ip".into();
    let s = status_of(
        c.apply_config(pb::ApplyConfigRequest {
            config: Some(raw),
            dry_run: false,
        })
        .await,
    );
    violation(&s, "frontends[vip].address");
    let s = status_of(
        c.apply_config(pb::ApplyConfigRequest {
            config: None,
            dry_run: false,
        })
        .await,
    );
    assert_eq!(s.code(), Code::InvalidArgument);
    assert_eq!(h.publisher.generations(), [1]);
    h.stop().await;
}

#[tokio::test]
async fn a_dry_run_shows_the_difference_and_applies_nothing() {
    let h = Harness::start().await;
    let mut c = h.client().await;
    let mut new = base();
    new.health_probes[0].interval_seconds = 2;
    let r = apply_ok(&mut c, convert::config_to(&new, 0), true).await;
    assert_eq!(brief(&r), ["CHANGE_OP_CHANGED health_probe tcp80"]);
    assert!(!r.applied);
    assert_eq!(r.generation, 1);
    assert_eq!(h.publisher.generations(), [1]);
    // A dry run of a bad file is refused like the real thing.
    new.health_probes[0].interval_seconds = 0;
    let s = status_of(c.apply_config(request(&new, true)).await);
    violation(&s, "health_probes[tcp80].interval_seconds");
    h.stop().await;
}

#[tokio::test]
async fn restart_only_settings_are_reported_and_keep_their_running_value() {
    let h = Harness::start().await;
    let mut c = h.client().await;
    let mut new = base();
    new.settings.lab_time_scale = 60;
    let r = apply_ok(&mut c, convert::config_to(&new, 0), false).await;
    assert_eq!(r.changes.len(), 1);
    assert!(r.changes[0].needs_restart);
    assert_eq!(r.changes[0].name, "lab_time_scale");
    // Nothing else changed: nothing applied.
    assert!(!r.applied);
    assert_eq!(h.publisher.generations(), [1]);
    // With another change, that one applies and the scale stays.
    new.backend_pools[0].members[0].weight = 3;
    let r = apply_ok(&mut c, convert::config_to(&new, 0), false).await;
    assert!(r.applied);
    assert_eq!(r.changes.len(), 2);
    let snap = h.state.snapshot();
    assert_eq!(snap.config.settings.lab_time_scale, 1);
    assert_eq!(snap.config.backend_pools[0].members[0].weight, 3);
    h.stop().await;
}

#[tokio::test]
async fn a_file_the_workers_do_not_take_is_rolled_back_whole() {
    let h = Harness::start().await;
    let mut c = h.client().await;
    let mut new = base();
    new.load_balancing_rules[0].tcp_reset = true;
    new.backend_pools[0].members[1].weight = 9;
    h.publisher
        .fail_next
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let s = status_of(c.apply_config(request(&new, false)).await);
    assert_eq!(s.code(), Code::DeadlineExceeded, "{s:?}");
    // The committed configuration is the old one (republished under a newer generation).
    assert_eq!(h.state.snapshot().config, base());
    h.stop().await;
}
