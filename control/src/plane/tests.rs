use std::thread;

use xlb_engine::{
    compile,
    flow::Nat,
    ruleset::{FlowTuple, RuleSet, Timers},
    Addr, Config, FlowInfo, MemberHealth,
};

use super::cell::{cell, CellWriter, WorkerSnapshot};
use super::publisher::WorkerPublisher;
use super::telemetry::{DaemonTelemetry, WorkerPlacement};
use super::*;
use crate::messages::{Ack, ToWorker};
use crossbeam::channel::{self, Receiver, Sender};
use std::{collections::HashSet, time::Duration};
use xlb_api::{FlowFilter, PublishError, Publisher, Telemetry};

/// A stand-in for a worker: acks rule sets (unless `mute`), answers flow queries from
/// `flows` (sorted by id), until its channel closes.
fn fake_worker(
    id: usize,
    rx: Receiver<ToWorker>,
    acks: Sender<Ack>,
    flows: Vec<FlowInfo>,
    mute: bool,
    capacity: u32,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        while let Ok(msg) = rx.recv() {
            match msg {
                ToWorker::Rules(r, _) if !mute => {
                    let _ = acks.send(Ack {
                        worker: id,
                        generation: r.generation(),
                    });
                }
                ToWorker::Flows(q) => {
                    let slots = q.slots(capacity);
                    let live = flows.iter().filter(|f| slots.contains(&f.id)).copied();
                    let _ = q.reply.send(q.answer(id, live, capacity, 5));
                }
                _ => {}
            }
        }
    })
}

fn info(id: u32) -> FlowInfo {
    let t = FlowTuple {
        proto: 6,
        src: Addr::from_v4_bytes([198, 18, 0, 10]),
        src_port: 40000u16.wrapping_add(id as u16),
        dst: Addr::from_v4_bytes([198, 18, 0, 100]),
        dst_port: 80,
    };
    FlowInfo {
        id,
        rule: 0,
        proto: 6,
        nat: Nat::Dnat,
        orig: t,
        translated: t,
        tcp_state: None,
        last_seen: 1,
        deadline: 2,
    }
}

fn rules(generation: u64) -> Arc<RuleSet> {
    Arc::new(RuleSet::empty(generation, Timers::default()))
}

/// Workers with the given flows (`mute`: never acks), and the publisher and telemetry
/// over them.
fn daemon(
    flows: Vec<Vec<FlowInfo>>,
    mute: &[usize],
) -> (
    WorkerPublisher,
    DaemonTelemetry,
    Vec<thread::JoinHandle<()>>,
    Vec<CellWriter>,
) {
    daemon_with(flows, mute, crate::messages::QUERY_SLOTS)
}

/// [`daemon`] with workers whose flow tables have `capacity` slots.
fn daemon_with(
    flows: Vec<Vec<FlowInfo>>,
    mute: &[usize],
    capacity: u32,
) -> (
    WorkerPublisher,
    DaemonTelemetry,
    Vec<thread::JoinHandle<()>>,
    Vec<CellWriter>,
) {
    let (writers, readers): (Vec<_>, Vec<_>) = (0..flows.len()).map(cell).unzip();
    let shared = Shared::new(readers, Vec::new(), 1);
    let (ack_tx, ack_rx) = channel::bounded(16);
    let mut to = Vec::new();
    let mut joins = Vec::new();
    for (w, f) in flows.into_iter().enumerate() {
        let (tx, rx) = channel::bounded(4);
        to.push(tx);
        joins.push(fake_worker(
            w,
            rx,
            ack_tx.clone(),
            f,
            mute.contains(&w),
            capacity,
        ));
    }
    let placement = vec![
        WorkerPlacement {
            interfaces: "a,b".into(),
            first_queue: 0,
            core: None,
        };
        to.len()
    ];
    let publisher = WorkerPublisher::new(to.clone(), ack_rx, Arc::clone(&shared));
    let telemetry = DaemonTelemetry::new(to, shared, placement, "wakeup");
    (publisher, telemetry, joins, writers)
}

#[test]
fn publish_returns_once_every_worker_acked_and_records_the_generation() {
    let (p, t, _, _) = daemon(vec![vec![], vec![], vec![]], &[]);
    p.publish(rules(2), Duration::from_secs(2)).unwrap();
    let st = t.status().unwrap();
    assert_eq!(
        st.workers.iter().map(|w| w.generation).collect::<Vec<_>>(),
        vec![2, 2, 2]
    );
    assert_eq!(p.shared.propagation.lock().unwrap().len(), 1);
}

#[test]
fn publish_names_the_workers_that_did_not_ack_in_time() {
    let (p, t, _, _) = daemon(vec![vec![], vec![], vec![]], &[1]);
    let e = p.publish(rules(2), Duration::from_millis(200)).unwrap_err();
    assert_eq!(
        e,
        PublishError::Timeout {
            generation: 2,
            missing: vec![1],
            deadline: Duration::from_millis(200),
        }
    );
    let gens: Vec<u64> = t
        .status()
        .unwrap()
        .workers
        .iter()
        .map(|w| w.generation)
        .collect();
    assert_eq!(gens, vec![2, 1, 2]);
    // A timeout is not a propagation time.
    assert_eq!(p.shared.propagation.lock().unwrap().len(), 0);
}

#[test]
fn publish_to_an_exited_worker_is_unavailable() {
    let (p, _, joins, _) = daemon(vec![vec![]], &[]);
    let (tx, rx) = channel::bounded::<ToWorker>(1);
    drop(rx);
    let p = WorkerPublisher::new(
        vec![p.to[0].clone(), tx],
        p.acks.into_inner().unwrap(),
        p.shared,
    );
    let e = p.publish(rules(2), Duration::from_millis(200)).unwrap_err();
    assert!(
        matches!(e, PublishError::Unavailable(ref m) if m.contains("worker 1")),
        "{e:?}"
    );
    drop(joins);
}

fn snapshot(worker: usize, generation: u64, live: &[(u16, u32)]) -> WorkerSnapshot {
    let mut s = WorkerSnapshot::empty(worker);
    for &(id, n) in live {
        let live_flows = &mut s.counters.counters.live_flows;
        live_flows.resize(usize::from(id) + 1, 0);
        live_flows[usize::from(id)] = n;
    }
    s.counters.flow_capacity = 16;
    s.counters.generation = generation;
    s
}

fn publish(cell: &mut CellWriter, snap: WorkerSnapshot) {
    cell.publish(|s| s.copy_from(&snap));
}

#[test]
fn retired_rules_are_drained_once_every_worker_reports_none_of_their_flows() {
    let (p, _, _, mut cells) = daemon(vec![vec![], vec![]], &[]);
    let cfg = |rules: &str| {
        Config::from_toml_str(&format!(
            "[[frontends]]\nname = \"v\"\naddress = \"198.18.0.100\"\nkind = \"public\"\n\
             [[backend_pools]]\nname = \"p\"\nmembers = [{{ address = \"198.18.1.11\" }}]\n{rules}"
        ))
        .unwrap()
    };
    let rule = |name: &str, port: u16| {
        format!(
            "[[load_balancing_rules]]\nname = \"{name}\"\nfrontend = \"v\"\nprotocol = \"TCP\"\n\
             frontend_port = {port}\nbackend_pool = \"p\"\nbackend_port = 80\n"
        )
    };
    let g1 = compile(
        &cfg(&(rule("a", 1) + &rule("b", 2))),
        None,
        &MemberHealth::default(),
        1,
    )
    .unwrap();
    let g2 = compile(&cfg(&rule("a", 1)), Some(&g1), &MemberHealth::default(), 2).unwrap();
    let b = 1;
    assert!(g2.is_retired(b));
    // No snapshot yet from worker 1: nothing is known to be drained.
    publish(&mut cells[0], snapshot(0, 2, &[]));
    assert!(p.drained(&g2).is_empty());
    // Worker 1 still runs generation 1 (it could create flows of "b"): not drained.
    publish(&mut cells[1], snapshot(1, 1, &[]));
    assert!(p.drained(&g2).is_empty());
    // Both on generation 2, worker 1 still holds a flow of "b".
    publish(&mut cells[1], snapshot(1, 2, &[(b, 1)]));
    assert!(p.drained(&g2).is_empty());
    // None left anywhere: drained.
    publish(&mut cells[1], snapshot(1, 2, &[(b, 0)]));
    assert_eq!(p.drained(&g2), HashSet::from([b]));
}

#[test]
fn flow_pages_walk_workers_in_order_and_end_with_no_cursor() {
    let (_, t, _, _) = daemon(
        vec![
            (0..5).map(info).collect(),
            vec![],
            (0..3).map(info).collect(),
        ],
        &[],
    );
    let all = FlowFilter::default();
    let mut seen = Vec::new();
    let mut after = None;
    let mut pages = 0;
    loop {
        let page = t.flows(&all, after, 2).unwrap();
        pages += 1;
        assert!(page.flows.len() <= 2);
        seen.extend(page.flows.iter().map(|e| (e.worker, e.info.id)));
        match page.next {
            Some(c) => after = Some(c),
            None => break,
        }
        assert!(pages < 20, "paging ends");
    }
    let want: Vec<(u16, u32)> = (0..5)
        .map(|i| (0, i))
        .chain((0..3).map(|i| (2, i)))
        .collect();
    assert_eq!(seen, want, "every flow once, in (worker, id) order");
    // One page holding everything has no next page.
    let page = t.flows(&all, None, 100).unwrap();
    assert_eq!(page.flows.len(), 8);
    assert_eq!(page.next, None);
    assert_eq!(page.now, 5);
}

/// Flows spread over a table larger than one walk: each query walks a bounded number of
/// slots, pages come back short with a cursor, and the listing still sees every flow
/// once, filtered or not.
#[test]
fn flow_listing_resumes_where_a_bounded_walk_stopped() {
    let qs = crate::messages::QUERY_SLOTS;
    let ids = [0, 7, qs - 1, qs, qs + 5, 2 * qs + 9, 6 * qs + 2, 8 * qs - 1];
    // Tables of eight walks: more than one page may ask a worker for.
    let (_, t, _, _) = daemon_with(
        vec![ids.iter().map(|&i| info(i)).collect(), vec![info(qs + 1)]],
        &[],
        8 * qs,
    );
    let odd_ports = FlowFilter {
        client: Some(Addr::from_v4_bytes([198, 18, 0, 10])),
        ..FlowFilter::default()
    };
    for (filter, limit) in [(FlowFilter::default(), 2), (odd_ports, 100)] {
        let mut seen = Vec::new();
        let mut after = None;
        let mut requests = 0;
        loop {
            let page = t.flows(&filter, after, limit).unwrap();
            requests += 1;
            assert!(page.flows.len() <= limit);
            seen.extend(page.flows.iter().map(|e| (e.worker, e.info.id)));
            match page.next {
                Some(c) => after = Some(c),
                None => break,
            }
            assert!(requests < 30, "paging ends");
        }
        let want: Vec<(u16, u32)> = ids.iter().map(|&i| (0, i)).chain([(1, qs + 1)]).collect();
        assert_eq!(seen, want, "limit {limit}");
        assert!(requests >= 2, "bounded walks: {requests} requests");
    }
}

#[test]
fn snat_usage_sums_the_workers_shares() {
    let config = Config::from_toml_str(
        r#"
[[frontends]]
name = "snat"
address = "198.19.0.100"
kind = "public"
[[backend_pools]]
name = "web"
members = [{ address = "198.18.1.11" }]
[[outbound_rules]]
name = "out"
frontends = ["snat"]
backend_pool = "web"
protocol = "TCP"
"#,
    )
    .unwrap();
    let rs = compile(&config, None, &MemberHealth::default(), 1).unwrap();
    let rule = rs.rules().next().unwrap().0;
    let usage = |allocated, used| SnatUsage {
        rule,
        proto: 6,
        member: "198.18.1.11".parse().unwrap(),
        allocated,
        used,
    };
    let snap = |w, u| {
        let mut s = snapshot(w, 1, &[]);
        s.snat = vec![u];
        s
    };
    let sum = sum_snat(&[snap(0, usage(512, 3)), snap(1, usage(512, 4))]);
    assert_eq!(sum, vec![usage(1024, 7)]);
}

/// With an address plane, each rule set reaches the workers with the backend-side ports of
/// its own members, in the same message: a member added behind another port marks it for
/// the engines' anti-spoofing in the same generation as the rules that name it.
#[test]
fn publish_sends_each_generation_with_its_backend_side_ports() {
    use crate::addresses::{AddrMaps, AddressPlane, Op};
    use crate::kernel::Port;

    struct NoMaps;
    impl AddrMaps for NoMaps {
        fn apply(&mut self, _: &Op) -> Result<(), String> {
            Ok(())
        }
    }
    let ports: Vec<Port> = ["front", "back", "far"]
        .iter()
        .enumerate()
        .map(|(i, name)| Port {
            id: i as u16,
            name: (*name).into(),
            ifindex: 10 + i as u32,
            mac: [2, 0, 0, 0, 0, i as u8],
        })
        .collect();
    let routes = vec![
        xlb_engine::Route::v4("198.18.0.0".parse().unwrap(), 24, 0, None),
        xlb_engine::Route::v4("198.18.1.0".parse().unwrap(), 24, 1, None),
        xlb_engine::Route::v4("198.19.0.0".parse().unwrap(), 24, 2, None),
    ];
    let plane = AddressPlane::new(
        Box::new(NoMaps),
        ports,
        None,
        Arc::new(std::sync::Mutex::new(routes)),
    );
    let shared = Shared::new(vec![cell(0).1], Vec::new(), 1);
    let (ack_tx, ack_rx) = channel::bounded(4);
    let (tx, rx) = channel::bounded(4);
    let (seen_tx, seen_rx) = channel::unbounded();
    let worker = thread::spawn(move || {
        while let Ok(msg) = rx.recv() {
            if let ToWorker::Rules(r, backend_side) = msg {
                let _ = seen_tx.send(backend_side.map(|b| b.to_vec()));
                let _ = ack_tx.send(Ack {
                    worker: 0,
                    generation: r.generation(),
                });
            }
        }
    });
    let p = WorkerPublisher::new(vec![tx], ack_rx, shared)
        .with_addresses(Arc::new(std::sync::Mutex::new(plane)));
    let config = |members: &str| {
        let c = Config::from_toml_str(&format!(
            r#"
[[frontends]]
name = "vip"
address = "198.18.0.100"
kind = "public"

[[backend_pools]]
name = "web"
members = [{members}]

[[load_balancing_rules]]
name = "web"
frontend = "vip"
protocol = "TCP"
frontend_port = 80
backend_pool = "web"
backend_port = 8080
"#
        ))
        .unwrap();
        c
    };
    let one = config(r#"{ address = "198.18.1.11" }"#);
    let r1 = Arc::new(compile(&one, None, &MemberHealth::default(), 2).unwrap());
    p.publish(Arc::clone(&r1), Duration::from_secs(2)).unwrap();
    assert_eq!(
        seen_rx.recv().unwrap(),
        Some(vec![(0, false), (1, true), (2, false)])
    );
    // A member added behind the third port: marked with the rules that add it.
    let two = config(r#"{ address = "198.18.1.11" }, { address = "198.19.0.50" }"#);
    let r2 = Arc::new(compile(&two, Some(&r1), &MemberHealth::default(), 3).unwrap());
    p.publish(Arc::clone(&r2), Duration::from_secs(2)).unwrap();
    assert_eq!(
        seen_rx.recv().unwrap(),
        Some(vec![(0, false), (1, true), (2, true)])
    );
    // And unmarked with the rules that remove it.
    let r3 = compile(&one, Some(&r2), &MemberHealth::default(), 4).unwrap();
    p.publish(Arc::new(r3), Duration::from_secs(2)).unwrap();
    assert_eq!(
        seen_rx.recv().unwrap(),
        Some(vec![(0, false), (1, true), (2, false)])
    );
    drop(p);
    worker.join().unwrap();
}
