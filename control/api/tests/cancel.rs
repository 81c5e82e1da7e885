//! A change whose client hangs up or times out is carried out to its end all the same, in the
//! order the server received it: committed, or refused and rolled back, as if the client had
//! waited. The client learns which from the object and the generation.
//!
//! The publisher is held (`common::Hold`) while the client goes away, so each step is ordered
//! by the test, not by timing. The server admits one request at a time, so a read that gets
//! through shows the server has dropped the departed client's call.

mod common;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{Harness, Hold, BASE};
use tonic::{Code, Request};
use xlb_proto::v1 as pb;

/// The held publisher's side of the test.
struct Held {
    started: mpsc::Receiver<u64>,
    release: Option<mpsc::Sender<()>>,
}

impl Held {
    fn on(h: &Harness) -> Held {
        let (started_tx, started) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        *h.publisher.hold.lock().unwrap() = Some(Hold {
            started: started_tx,
            release: release_rx,
        });
        Held {
            started,
            release: Some(release),
        }
    }

    /// The generation whose publish has started.
    fn started(&self) -> u64 {
        tokio::task::block_in_place(|| self.started.recv_timeout(Duration::from_secs(10)))
            .expect("no publish started within 10 s")
    }

    /// Lets one publish finish.
    fn release_one(&self) {
        self.release.as_ref().unwrap().send(()).unwrap();
    }

    /// Lets every publish through from now on.
    fn open(&mut self) {
        self.release = None;
    }
}

fn create(name: &str, address: &str) -> pb::CreateFrontendRequest {
    pb::CreateFrontendRequest {
        frontend: Some(pb::Frontend {
            name: name.into(),
            address: address.into(),
            kind: pb::FrontendKind::Public as i32,
        }),
    }
}

/// Waits until a read is admitted: the one request the server admits at a time is no longer
/// the departed client's.
async fn until_the_server_dropped_the_call(h: &Harness) {
    let mut c = h.client().await;
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        match c.list_frontends(pb::ListRequest {}).await {
            Ok(_) => return,
            Err(s) if s.code() == Code::ResourceExhausted && Instant::now() < end => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(s) => panic!("the departed client's call is still admitted: {s:?}"),
        }
    }
}

async fn wait_for_generation(h: &Harness, want: u64) {
    let end = Instant::now() + Duration::from_secs(10);
    while h.state.generation() < want {
        assert!(Instant::now() < end, "generation {want} never committed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn get_frontend(h: &Harness, name: &str) -> Result<(String, u64), Code> {
    h.client()
        .await
        .get_frontend(pb::GetRequest { name: name.into() })
        .await
        .map(|r| {
            let r = r.into_inner();
            (r.frontend.unwrap().address, r.generation)
        })
        .map_err(|s| s.code())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_whose_client_hung_up_is_committed_and_later_changes_follow_it() {
    let h = Harness::start_with(BASE, |o| o.max_concurrent_requests = 1).await;
    let held = Held::on(&h);
    let mut gone = h.client().await;
    let call = tokio::spawn(async move { gone.create_frontend(create("a", "198.18.0.50")).await });
    assert_eq!(held.started(), 2);
    // The client hangs up (its stream is reset) while the workers have not acknowledged.
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    until_the_server_dropped_the_call(&h).await;
    assert_eq!(
        h.state.generation(),
        1,
        "committed before the publish finished"
    );

    // Another change arrives meanwhile: it waits behind the first.
    let mut next = h.client().await;
    let second =
        tokio::spawn(async move { next.create_frontend(create("b", "198.18.0.51")).await });
    held.release_one();
    assert_eq!(held.started(), 3);
    held.release_one();
    let second = second.await.unwrap().unwrap().into_inner();
    assert_eq!(second.generation, 3);

    // The first change was committed, first, though nobody got its answer.
    assert_eq!(get_frontend(&h, "a").await, Ok(("198.18.0.50".into(), 3)));
    assert_eq!(h.publisher.generations(), vec![1, 2, 3]);
    assert_eq!(h.state.degraded(), None);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_whose_client_timed_out_is_committed() {
    let h = Harness::start_with(BASE, |o| o.max_concurrent_requests = 1).await;
    let held = Held::on(&h);
    let mut c = h.client().await;
    let mut req = Request::new(create("late", "198.18.0.52"));
    req.set_timeout(Duration::from_secs(2));
    let call = tokio::spawn(async move { c.create_frontend(req).await });
    assert_eq!(held.started(), 2);
    // The publish stays held until the client has given up.
    let s = call.await.unwrap().unwrap_err();
    assert!(
        matches!(s.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{s:?}"
    );
    until_the_server_dropped_the_call(&h).await;
    assert_eq!(get_frontend(&h, "late").await, Err(Code::NotFound));
    held.release_one();
    wait_for_generation(&h, 2).await;
    assert_eq!(
        get_frontend(&h, "late").await,
        Ok(("198.18.0.52".into(), 2))
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_whose_client_left_and_whose_publish_failed_is_rolled_back() {
    let h = Harness::start_with(BASE, |o| o.max_concurrent_requests = 1).await;
    let mut held = Held::on(&h);
    h.publisher
        .fail_next
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let before = h.state.snapshot();
    let mut gone = h.client().await;
    let call = tokio::spawn(async move { gone.create_frontend(create("x", "198.18.0.53")).await });
    assert_eq!(held.started(), 2);
    call.abort();
    let _ = call.await;
    until_the_server_dropped_the_call(&h).await;
    // Generation 2 fails; the roll-back, generation 3, restores the committed configuration.
    held.open();
    wait_for_generation(&h, 3).await;
    assert_eq!(h.publisher.generations(), vec![1, 2, 3]);
    assert_eq!(get_frontend(&h, "x").await, Err(Code::NotFound));
    let after = h.state.snapshot();
    assert_eq!(after.config, before.config);
    assert_eq!(h.state.degraded(), None);
    h.stop().await;
}
