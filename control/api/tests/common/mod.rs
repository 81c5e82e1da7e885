//! Test harness: an in-process server on a Unix socket in a temp dir, with `ControlState`, a
//! recording fake `Publisher` and `FakeTelemetry`.
#![allow(dead_code)]

pub mod pki;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tonic::Code;
use xlb_api::server::{self, BearerToken, Client};
use xlb_api::status::validation_failure;
use xlb_api::{
    ControlState, FakeTelemetry, Listen, PublishError, Publisher, ServeOptions, StateOptions,
};
use xlb_engine::config::Config;
use xlb_engine::{MemberHealth, RuleSet};
use xlb_proto::v1 as pb;

/// Records every generation it is handed; fails the next `fail_next` publishes.
#[derive(Debug, Default)]
pub struct Recorder {
    pub generations: Mutex<Vec<u64>>,
    pub fail_next: AtomicUsize,
    /// Each publish takes this long (a slow worker ack).
    pub delay_ms: AtomicU64,
    /// When set, each publish tells its generation on `started` and then waits for `release`
    /// (or for its sender to be dropped).
    pub hold: Mutex<Option<Hold>>,
}

#[derive(Debug)]
pub struct Hold {
    pub started: std::sync::mpsc::Sender<u64>,
    pub release: std::sync::mpsc::Receiver<()>,
}

impl Recorder {
    pub fn generations(&self) -> Vec<u64> {
        self.generations.lock().unwrap().clone()
    }
}

impl Publisher for Recorder {
    fn publish(&self, rules: Arc<RuleSet>, deadline: Duration) -> Result<(), PublishError> {
        self.generations.lock().unwrap().push(rules.generation());
        if let Some(h) = self.hold.lock().unwrap().as_ref() {
            let _ = h.started.send(rules.generation());
            let _ = h.release.recv();
        }
        std::thread::sleep(Duration::from_millis(self.delay_ms.load(Ordering::SeqCst)));
        let failing = self
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            return Err(PublishError::Timeout {
                generation: rules.generation(),
                missing: vec![1],
                deadline,
            });
        }
        Ok(())
    }
}

pub const BASE: &str = r#"
[[frontends]]
name = "vip"
address = "198.18.0.10"
kind = "public"

[[frontends]]
name = "ilb"
address = "198.18.1.100"
kind = "internal"

[[frontends]]
name = "snat"
address = "198.18.0.11"
kind = "public"

[[backend_pools]]
name = "web"
members = [{ address = "198.18.2.1" }, { address = "198.18.2.2", weight = 2 }]

[[health_probes]]
name = "tcp80"
protocol = "TCP"
port = 80

[[load_balancing_rules]]
name = "web"
frontend = "vip"
protocol = "TCP"
frontend_port = 80
backend_pool = "web"
backend_port = 8080
health_probe = "tcp80"
"#;

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub listen: Listen,
    pub state: Arc<ControlState>,
    pub publisher: Arc<Recorder>,
    pub telemetry: Arc<FakeTelemetry>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), xlb_api::ServeError>>>,
}

impl Harness {
    pub async fn start() -> Harness {
        Harness::start_with(BASE, |_| {}).await
    }

    /// Starts a server over `config_toml`, after `tweak` adjusts the options.
    pub async fn start_with(config_toml: &str, tweak: impl FnOnce(&mut ServeOptions)) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("run").join("xlbd.sock");
        let config = Config::from_toml_str(config_toml).unwrap();
        let publisher = Arc::new(Recorder::default());
        let state = Arc::new(
            ControlState::start(
                config,
                MemberHealth::all_healthy(),
                publisher.clone(),
                StateOptions::default(),
            )
            .unwrap(),
        );
        let telemetry = Arc::new(FakeTelemetry::default());
        let mut options = ServeOptions {
            listen: Listen::Unix(socket.clone()),
            ..ServeOptions::default()
        };
        tweak(&mut options);
        let bound = server::bind(options).await.unwrap();
        let listen = bound.local();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(bound.run(state.clone(), telemetry.clone(), async {
            let _ = rx.await;
        }));
        Harness {
            dir,
            socket,
            listen,
            state,
            publisher,
            telemetry,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub async fn channel(&self) -> tonic::transport::Channel {
        server::channel(&self.listen).await.unwrap()
    }

    pub async fn client(&self) -> Client {
        self.client_with_token(None).await
    }

    pub async fn client_with_token(&self, token: Option<&str>) -> Client {
        server::client(self.channel().await, BearerToken::new(token).unwrap())
    }

    /// Stops the server and waits for it (the socket file is removed).
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

/// Create, get, list, update, delete of one object of kind `K`, checking every answer: `sent`
/// is created and answered as `answered` (defaults made explicit), then replaced by `changed`.
/// Returns the generation of the create.
pub async fn crud_round_trip<K: xlb_api::Remote>(
    c: &mut Client,
    sent: K::Proto,
    answered: K::Proto,
    changed: K::Proto,
) -> u64
where
    K::Proto: PartialEq,
{
    let name = K::from_proto(sent.clone()).unwrap().name().to_string();
    let listed = |r| K::list_answer(r).0.len();
    let before = listed(K::list(c).await.unwrap());
    let (got, generation) = K::answer(K::create(c, K::create_request(sent)).await.unwrap());
    assert_eq!(got.as_ref(), Some(&answered));
    assert_eq!(
        K::answer(K::get(c, name.clone()).await.unwrap()).0,
        Some(answered)
    );
    assert_eq!(listed(K::list(c).await.unwrap()), before + 1);
    let r = K::answer(
        K::update(c, K::update_request(changed.clone()))
            .await
            .unwrap(),
    );
    assert_eq!(r, (Some(changed.clone()), generation + 1));
    assert_eq!(
        K::answer(K::get(c, name.clone()).await.unwrap()).0,
        Some(changed)
    );
    let d = K::delete(c, name.clone()).await.unwrap();
    assert_eq!(d.generation, generation + 2);
    let gone = K::get(c, name).await.err().expect("deleted");
    assert_eq!(gone.code(), Code::NotFound);
    assert_eq!(listed(K::list(c).await.unwrap()), before);
    generation
}

pub fn status_of<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> tonic::Status {
    r.expect_err("the request should have been refused")
}

/// The single violation of an INVALID_ARGUMENT status at `path`: (value, allowed).
pub fn violation(s: &tonic::Status, path: &str) -> (String, String) {
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

pub fn lb(name: &str, port: u32) -> pb::LoadBalancingRule {
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

pub fn outbound(name: &str) -> pb::OutboundRule {
    pb::OutboundRule {
        name: name.into(),
        frontends: vec!["snat".into()],
        backend_pool: "web".into(),
        protocol: pb::Protocol::Tcp as i32,
        ..Default::default()
    }
}
