//! `ControlState` as the daemon uses it, without gRPC.

mod common;

use std::sync::Arc;

use common::{Recorder, BASE};
use xlb_api::{ControlError, ControlState, StateOptions};
use xlb_engine::config::{Config, Frontend, FrontendKind, LoadBalancingRule};
use xlb_engine::ruleset::{FlowTuple, RuleKind};
use xlb_engine::{Addr, MemberHealth, RuleSet};

fn start() -> (ControlState, Arc<Recorder>) {
    let publisher = Arc::new(Recorder::default());
    let state = ControlState::start(
        Config::from_toml_str(BASE).unwrap(),
        MemberHealth::all_healthy(),
        publisher.clone(),
        StateOptions::default(),
    )
    .unwrap();
    (state, publisher)
}

/// Backends rule "web" gives new flows to, over many client ports.
fn backends(rules: &RuleSet) -> std::collections::BTreeSet<Addr> {
    let id = rules.rule_id(RuleKind::LoadBalancing, "web").unwrap();
    (0..200u16)
        .filter_map(|p| {
            rules.select_backend(
                id,
                &FlowTuple {
                    proto: 6,
                    src: Addr::from_v4_bytes([198, 18, 7, 1]),
                    src_port: 30000 + p,
                    dst: Addr::from_v4_bytes([198, 18, 0, 10]),
                    dst_port: 80,
                },
            )
        })
        .map(|b| b.addr)
        .collect()
}

#[test]
fn health_updates_publish_a_new_generation_with_the_same_config() {
    let (state, publisher) = start();
    let before = state.snapshot();
    assert_eq!(backends(&before.rules).len(), 2);
    let down = Addr::from_v4_bytes([198, 18, 2, 1]);
    let g = state
        .update_health(|h| h.set_healthy("web", down, false))
        .unwrap();
    assert_eq!(g, 2);
    let after = state.snapshot();
    assert_eq!(after.config, before.config);
    assert_eq!(
        backends(&after.rules).into_iter().collect::<Vec<_>>(),
        [Addr::from_v4_bytes([198, 18, 2, 2])]
    );
    // Later configuration changes keep the health verdict.
    state
        .create(Frontend {
            name: "x".into(),
            address: "198.18.0.50".parse().unwrap(),
            kind: FrontendKind::Public,
        })
        .unwrap();
    assert_eq!(backends(&state.snapshot().rules).len(), 1);
    assert_eq!(publisher.generations(), [1, 2, 3]);
}

#[test]
fn replace_config_is_validated_as_a_whole() {
    let (state, publisher) = start();
    let mut bad = state.snapshot().config.clone();
    bad.load_balancing_rules[0].idle_timeout_minutes = 31;
    bad.load_balancing_rules.push(LoadBalancingRule {
        name: "dup".into(),
        ..bad.load_balancing_rules[0].clone()
    });
    let Err(ControlError::InvalidArgument(errors)) = state.replace_config(bad) else {
        panic!("an invalid configuration must be refused");
    };
    // Every violation is reported at once.
    assert!(errors.len() >= 3, "{errors}");
    assert_eq!(state.generation(), 1);
    assert_eq!(
        publisher.generations(),
        [1],
        "nothing was compiled for the workers"
    );
    let mut good = state.snapshot().config.clone();
    good.load_balancing_rules[0].idle_timeout_minutes = 30;
    assert_eq!(state.replace_config(good).unwrap(), 2);
}

#[test]
fn rule_ids_survive_updates_and_a_replaced_rule_gets_a_new_id() {
    let (state, _) = start();
    let id_of =
        |s: &ControlState, name: &str| s.snapshot().rules.rule_id(RuleKind::LoadBalancing, name);
    let web = id_of(&state, "web").unwrap();
    let mut r = state.get::<LoadBalancingRule>("web").unwrap().0;
    r.idle_timeout_minutes = 20;
    state.update(r.clone()).unwrap();
    assert_eq!(id_of(&state, "web"), Some(web));
    // Deleted and replaced in one change: the new rule does not inherit the old id (the
    // engine keeps a deleted rule's id out of the very next generation, while its flows drain).
    let mut config = state.snapshot().config.clone();
    config.load_balancing_rules = vec![LoadBalancingRule {
        name: "other".into(),
        ..r
    }];
    state.replace_config(config).unwrap();
    assert_ne!(id_of(&state, "other"), Some(web));
}

#[test]
fn snapshot_members_show_admin_state_probe_verdict_and_eligibility() {
    use xlb_engine::config::AdminState;
    let (state, _) = start();
    let m1 = Addr::from_v4_bytes([198, 18, 2, 1]);
    let m2: std::net::IpAddr = "198.18.2.2".parse().unwrap();
    let view = |state: &ControlState| {
        state
            .snapshot()
            .members()
            .into_iter()
            .map(|m| (m.address, m.admin_state, m.probe_healthy, m.eligible))
            .collect::<Vec<_>>()
    };
    assert!(view(&state)
        .iter()
        .all(|(_, a, h, e)| *a == AdminState::None && *h && *e));
    state
        .update_health(|h| h.set_healthy("web", m1, false))
        .unwrap();
    state
        .set_member("web", m2, None, Some(AdminState::Down))
        .unwrap();
    assert_eq!(
        view(&state),
        [
            (m1.to_ip(), AdminState::None, false, false),
            (m2, AdminState::Down, true, false),
        ]
    );
    state
        .set_member("web", m1.to_ip(), None, Some(AdminState::Up))
        .unwrap();
    assert_eq!(view(&state)[0], (m1.to_ip(), AdminState::Up, false, true));
}
