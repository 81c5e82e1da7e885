//! The flow store: an engine writes its flows into memory it is handed, and a new engine
//! (a restarted process) that attaches the same memory carries on with them: TCP tracking and
//! exact RSTs on idle, SNAT ports, idle time, late-packet memory. A store that cannot be
//! trusted (torn, another layout, another geometry) is wiped, never half used.

mod common;

use std::net::IpAddr;

use common::flags::*;
use common::*;
use xlb_engine::store::{record_offset, StoreMemory};
use xlb_engine::time::mins;
use xlb_engine::{EngineConfig, StoreOutcome, Verdict};

const HASH: u64 = 0x00C0_FFEE;

fn store_bytes(lab: &Lab) -> Vec<u8> {
    vec![0u8; lab.engine.store_geometry().bytes()]
}

/// A lab whose engine writes into a fresh store.
fn lab_with_store() -> Lab {
    let mut lab = Lab::new();
    let mem = store_bytes(&lab);
    let report = lab
        .engine
        .attach_store(lab.now, Box::new(mem), HASH)
        .unwrap();
    assert_eq!(report.outcome, StoreOutcome::Fresh);
    lab
}

/// A new engine (another process, which reads the seeds from the store as xlbd does) at
/// the old one's time, attaching `mem`.
fn restart(old: &Lab, mem: Box<dyn StoreMemory>, toml: &str) -> (Lab, xlb_engine::StoreReport) {
    let (steer_seed, hash_seed) =
        xlb_engine::store::stored_seeds(mem.bytes(), old.engine.store_geometry())
            .unwrap_or((0, 0xD1FF_E4E7));
    let cfg = EngineConfig {
        hash_seed,
        steer_seed,
        ..EngineConfig::default()
    };
    let mut lab = Lab::with(toml, cfg);
    lab.now = old.now;
    let report = lab.engine.attach_store(lab.now, mem, HASH).unwrap();
    (lab, report)
}

fn tick() -> u64 {
    1 << EngineConfig::default().tick_shift
}

/// A killed process leaves its store open: the next engine restores the flow, forwards both
/// directions with the same translation, and later resets it on idle with the exact
/// sequence numbers of the data sent after the restart.
#[test]
fn a_flow_survives_a_crash_and_is_reset_on_idle_with_exact_rsts() {
    let mut lab = lab_with_store();
    let mut conn = establish(&mut lab, 80, 40_001);
    conn.client_sends(&mut lab, b"before");
    conn.backend_sends(&mut lab, b"the crash");
    lab.advance(mins(1));
    let mem = lab.engine.abandon_store().unwrap();

    let (mut lab2, report) = restart(&lab, mem, DEFAULT_CONFIG);
    assert_eq!(report.outcome, StoreOutcome::Restored);
    assert_eq!((report.flows, report.torn, report.invalid), (1, 0, 0));
    assert!(report.unclean, "a killed owner never closed the store");
    assert!(!report.config_changed);
    assert_eq!(lab2.engine.flow_count(), 1);
    let flows: Vec<_> = lab2.engine.flows().collect();
    assert_eq!(
        flows[0].tcp_state,
        Some(xlb_engine::tcp::TcpState::Established)
    );
    assert_eq!(flows[0].translated.dst, conn.backend_ip.into());

    conn.client_sends(&mut lab2, b"after");
    conn.backend_sends(&mut lab2, b"the restart");
    let last = lab2.now;
    lab2.run_until(last + mins(4) - 1);
    assert!(
        lab2.emitted.is_empty(),
        "the idle time restarts from the last packet"
    );
    lab2.run_until(last + mins(4) + tick());
    assert_eq!(lab2.engine.flow_count(), 0);
    assert_eq!(lab2.emitted.len(), 2);
    assert_eq!(conn.backend_mac, backend_mac(conn.backend_ip));
    let [to_client, to_backend] = conn.expected_rsts((VIP.into(), 80), (conn.backend_ip, 8080));
    assert_eq!(lab2.emitted[0], (CLIENT_PORT, to_client));
    assert_eq!(lab2.emitted[1], (BACKEND_PORT, to_backend));
    let mut events = vec![];
    lab2.engine.drain_events(|e| events.push(e));
    assert!(
        matches!(events[..], [xlb_engine::Event::ResetOnIdle { .. }]),
        "{events:?}"
    );
}

/// A flow whose idle time ran out while no engine ran is reset at the first expiry check.
#[test]
fn a_flow_that_idled_out_during_the_gap_is_reset_at_once() {
    let mut lab = lab_with_store();
    let mut conn = establish(&mut lab, 80, 40_002);
    conn.client_sends(&mut lab, b"x");
    conn.backend_sends(&mut lab, b"y");
    let mem = lab.engine.abandon_store().unwrap();
    lab.now += mins(5);
    let (mut lab2, report) = restart(&lab, mem, DEFAULT_CONFIG);
    assert_eq!(report.flows, 1);
    lab2.advance(tick());
    assert_eq!(lab2.engine.flow_count(), 0);
    assert_eq!(lab2.emitted.len(), 2, "one RST to each end");
}

/// Member B1's outbound flow keeps its SNAT port across the restart: the remote host's
/// reply still reaches the member, and the port stays taken.
#[test]
fn snat_flows_keep_their_ports() {
    let mut lab = lab_with_store();
    let member = Tcp::member_to_remote(50_000);
    let (_, out) = lab.forward(BACKEND_PORT, member.seg(SYN, 1, 0, &[]));
    let port = seen(&out).sport;
    let remote = Tcp::remote_to_snat(port);
    lab.forward(INTERNET_PORT, remote.seg(SYN | ACK, 77, 2, &[]));
    lab.forward(BACKEND_PORT, member.seg(ACK, 2, 78, &[]));
    let mem = lab.engine.abandon_store().unwrap();

    let (mut lab2, report) = restart(&lab, mem, DEFAULT_CONFIG);
    assert_eq!((report.flows, report.snat_ports), (1, 1));
    let rules = lab2.engine.rules().clone();
    let (_, blocks) = rules.match_outbound(6, B1.into()).unwrap();
    assert_eq!(lab2.engine.snat_usage(blocks, 6).0, 1, "the port is taken");
    let (p, back) = lab2.forward(INTERNET_PORT, remote.seg(ACK | PSH, 78, 2, b"hi"));
    assert_eq!(p, BACKEND_PORT);
    let b = seen(&back);
    assert_eq!((b.dst, b.dport), (IpAddr::from(B1), 50_000));
    let (_, out) = lab2.forward(BACKEND_PORT, member.seg(ACK | PSH, 2, 80, b"yo"));
    assert_eq!(seen(&out).sport, port, "same SNAT port after the restart");
    // Another connection of the member gets another port.
    let other = Tcp {
        sport: 50_001,
        ..member
    };
    let (_, out) = lab2.forward(BACKEND_PORT, other.seg(SYN, 1, 0, &[]));
    assert_ne!(seen(&out).sport, port);
}

/// A record whose creation was cut short (odd commit marker) is dropped, not trusted; the
/// others are restored.
#[test]
fn a_torn_record_is_dropped() {
    let mut lab = lab_with_store();
    establish(&mut lab, 80, 40_003);
    establish(&mut lab, 80, 40_004);
    let ids: Vec<u32> = lab.engine.flows().map(|f| f.id).collect();
    let mut mem = lab.engine.abandon_store().unwrap();
    let at = record_offset(ids[0]);
    mem.bytes_mut()[at..at + 4].copy_from_slice(&3u32.to_ne_bytes());
    let (lab2, report) = restart(&lab, mem, DEFAULT_CONFIG);
    assert_eq!((report.flows, report.torn), (1, 1));
    assert_eq!(lab2.engine.flow_count(), 1);
}

/// Another layout version, or a store written for another number of workers, is wiped with
/// the reason, and the new engine starts empty.
#[test]
fn another_layout_or_geometry_is_discarded_with_the_reason() {
    let mut lab = lab_with_store();
    establish(&mut lab, 80, 40_005);
    let mut mem = lab.engine.abandon_store().unwrap();
    mem.bytes_mut()[8..12].copy_from_slice(&99u32.to_ne_bytes());
    let (lab2, report) = restart(&lab, mem, DEFAULT_CONFIG);
    match &report.outcome {
        StoreOutcome::Discarded(why) => assert!(why.contains("layout version 99"), "{why}"),
        o => panic!("{o:?}"),
    }
    assert_eq!(lab2.engine.flow_count(), 0);

    let mut lab = lab_with_store();
    establish(&mut lab, 80, 40_006);
    let mem = lab.engine.abandon_store().unwrap();
    let cfg = EngineConfig {
        workers: 2,
        ..EngineConfig::default()
    };
    let mut lab2 = Lab::with(DEFAULT_CONFIG, cfg);
    let report = lab2.engine.attach_store(lab2.now, mem, HASH).unwrap();
    match &report.outcome {
        StoreOutcome::Discarded(why) => assert!(why.contains("worker 0 of 1"), "{why}"),
        o => panic!("{o:?}"),
    }
    assert_eq!(lab2.engine.flow_count(), 0);
    // Wiped: a third engine finds a fresh store of the second's geometry, with no flow.
    let mem = lab2.engine.abandon_store().unwrap();
    let mut lab3 = Lab::with(DEFAULT_CONFIG, cfg);
    let report = lab3.engine.attach_store(lab3.now, mem, HASH).unwrap();
    assert_eq!((report.outcome, report.flows), (StoreOutcome::Restored, 0));
}

/// Flows name their next hops by port: a store written for other ports (another interface
/// order, another MAC) is wiped.
#[test]
fn other_ports_discard_the_store() {
    let mut lab = lab_with_store();
    establish(&mut lab, 80, 40_011);
    let mem = lab.engine.abandon_store().unwrap();
    let mut lab2 = Lab::new();
    lab2.engine
        .next_hops()
        .set_port(BACKEND_PORT, [2, 0, 0, 0, 0x99, 0x99]);
    let report = lab2.engine.attach_store(lab2.now, mem, HASH).unwrap();
    match &report.outcome {
        StoreOutcome::Discarded(why) => assert!(why.contains("other interfaces"), "{why}"),
        o => panic!("{o:?}"),
    }
}

/// Too little memory is refused before anything is written.
#[test]
fn too_small_a_store_is_refused() {
    let mut lab = Lab::new();
    let small = vec![7u8; 1024];
    assert!(lab
        .engine
        .attach_store(lab.now, Box::new(small), HASH)
        .is_err());
}

/// Another configuration: flows follow their rule by kind and name even when the ids are
/// numbered differently; a flow whose rule is gone is dropped and counted.
#[test]
fn a_changed_configuration_maps_flows_by_rule_name() {
    let mut lab = lab_with_store();
    let mut kept = establish(&mut lab, 80, 40_007);
    establish(&mut lab, 81, 40_008);
    let mem = lab.engine.abandon_store().unwrap();
    // Drop the silent rule (port 81) and put a new rule first, so that "http" gets another id.
    let silent = "[[load_balancing_rules]]\nname = \"http-silent\"\nfrontend = \"web\"\n\
                  protocol = \"TCP\"\nfrontend_port = 81\nbackend_pool = \"web\"\n\
                  backend_port = 8080\nidle_timeout_minutes = 4\n";
    assert!(DEFAULT_CONFIG.contains(silent));
    let first = "[[load_balancing_rules]]\nname = \"new-first\"\nfrontend = \"web\"\n\
                 protocol = \"TCP\"\nfrontend_port = 90\nbackend_pool = \"web\"\n\
                 backend_port = 8080\n\n[[load_balancing_rules]]\nname = \"http\"\n";
    let toml = DEFAULT_CONFIG.replace(silent, "").replacen(
        "[[load_balancing_rules]]\nname = \"http\"\n",
        first,
        1,
    );
    let mut lab2 = Lab::with(&toml, EngineConfig::default());
    lab2.now = lab.now;
    let report = lab2.engine.attach_store(lab2.now, mem, HASH ^ 1).unwrap();
    assert!(report.config_changed);
    assert_eq!((report.flows, report.rule_gone), (1, 1));
    let flow = lab2.engine.flows().next().unwrap();
    let rules = lab2.engine.rules().clone();
    assert_eq!(&*rules.rule(flow.rule).unwrap().name, "http");
    kept.client_sends(&mut lab2, b"still here");
    let c = lab2.engine.counters().rule(flow.rule);
    assert_eq!(c.packets[0], 1);
}

/// A planned stop closes the store: the next engine knows it is complete and when it was
/// closed.
#[test]
fn a_closed_store_reads_as_clean() {
    let mut lab = lab_with_store();
    establish(&mut lab, 80, 40_009);
    let closed_at = lab.now;
    let mem = lab.engine.close_store(closed_at).unwrap();
    assert!(
        lab.engine.abandon_store().is_none(),
        "closed: nothing more is written"
    );
    lab.now += mins(1);
    let (lab2, report) = restart(&lab, mem, DEFAULT_CONFIG);
    assert_eq!(report.outcome, StoreOutcome::Restored);
    assert!(!report.unclean);
    assert_eq!(report.closed_at, Some(closed_at));
    assert_eq!(lab2.engine.flow_count(), 1);
}

/// Late-packet memory survives too: a packet of a flow that expired silently before the
/// restart is counted `late` by the new engine.
#[test]
fn late_packet_memory_survives() {
    let mut lab = lab_with_store();
    let mut conn = establish(&mut lab, 81, 40_010);
    conn.client_sends(&mut lab, b"x");
    let last = lab.now;
    lab.run_until(last + mins(4) + tick());
    assert_eq!(lab.engine.flow_count(), 0);
    let mem = lab.engine.abandon_store().unwrap();
    let (mut lab2, report) = restart(&lab, mem, DEFAULT_CONFIG);
    assert_eq!((report.flows, report.late), (0, 2));
    let (v, _) = lab2.send(
        CLIENT_PORT,
        conn.client.seg(ACK | PSH, conn.c_seq, conn.s_seq, b"late"),
    );
    assert!(matches!(v, Verdict::Drop(_)));
    let rules = lab2.engine.rules().clone();
    let silent = rules.rule_id(xlb_engine::ruleset::RuleKind::LoadBalancing, "http-silent");
    assert_eq!(lab2.engine.counters().rule(silent.unwrap()).late_packets, 1);
}

/// Many flows of every kind and state — TCP load balancing (handshake, established, half
/// closed, closed), IPv6, UDP, outbound TCP and UDP, unconfirmed ones — restore to exactly
/// the same listing (slot, tuple, translation, TCP state, `last_seen`, deadline) and the same
/// SNAT port usage, and from then on expire exactly as they would have (the same RSTs).
#[test]
fn every_kind_of_flow_restores_to_the_same_listing() {
    let mut lab = lab_with_store();
    for i in 0..40u16 {
        let mut conn = establish(&mut lab, 80, 41_000 + i);
        match i % 4 {
            0 => {}
            1 => {
                conn.client_sends(&mut lab, b"some data");
            }
            2 => {
                let fin = conn.client.seg(FIN | ACK, conn.c_seq, conn.s_seq, &[]);
                lab.forward(CLIENT_PORT, fin);
            }
            _ => {
                let fin = conn.client.seg(FIN | ACK, conn.c_seq, conn.s_seq, &[]);
                lab.forward(CLIENT_PORT, fin);
                let fin = conn.backend.seg(FIN | ACK, conn.s_seq, conn.c_seq + 1, &[]);
                lab.forward(BACKEND_PORT, fin);
            }
        }
        lab.advance(mins(0) + 1_000_000);
    }
    // Half-open (SYN only) flows: unconfirmed.
    for i in 0..10u16 {
        lab.forward(CLIENT_PORT, Tcp::client(80, 42_000 + i).seg(SYN, 5, 0, &[]));
    }
    // IPv6.
    let c6 = Tcp {
        src: CLIENT6.into(),
        dst: VIP6.into(),
        ..Tcp::client(80, 43_000)
    };
    let _ = lab.send(CLIENT_PORT, c6.seg(SYN, 9, 0, &[]));
    // UDP through the load-balancing rule and outbound, TCP outbound.
    for i in 0..10u16 {
        lab.forward(
            CLIENT_PORT,
            udp(
                CLIENT_MAC,
                XLB_MAC[0],
                CLIENT.into(),
                44_000 + i,
                VIP.into(),
                53,
                b"q",
            ),
        );
        if i >= 4 {
            // The member's block holds 8 ports per protocol.
            continue;
        }
        lab.forward(
            BACKEND_PORT,
            udp(
                B1_MAC,
                XLB_MAC[1],
                B1.into(),
                45_000 + i,
                REMOTE.into(),
                53,
                b"q",
            ),
        );
        let member = Tcp {
            src_mac: B1_MAC,
            dst_mac: XLB_MAC[1],
            src: B1.into(),
            dst: REMOTE.into(),
            sport: 46_000 + i,
            dport: 443,
        };
        lab.forward(BACKEND_PORT, member.seg(SYN, 1, 0, &[]));
    }
    let before: Vec<_> = lab.engine.flows().collect();
    assert!(before.len() > 60, "{}", before.len());
    let rules = lab.engine.rules().clone();
    let (_, blocks) = rules.match_outbound(6, B1.into()).unwrap();
    let blocks = blocks.to_vec();
    let snat = (
        lab.engine.snat_usage(&blocks, 6),
        lab.engine.snat_usage(&blocks, 17),
    );
    let mem = lab.engine.abandon_store().unwrap();

    let (mut lab2, report) = restart(&lab, mem, DEFAULT_CONFIG);
    assert_eq!(report.flows as usize, before.len());
    let after: Vec<_> = lab2.engine.flows().collect();
    assert_eq!(after, before);
    assert_eq!(
        (
            lab2.engine.snat_usage(&blocks, 6),
            lab2.engine.snat_usage(&blocks, 17)
        ),
        snat
    );
    assert_eq!(
        lab2.engine.counters().live_flows,
        lab.engine.counters().live_flows
    );
    // Both engines expire the same flows at the same times from here on.
    let t = lab.now + mins(10);
    lab.run_until(t);
    lab2.run_until(t);
    assert_eq!(lab2.engine.flow_count(), lab.engine.flow_count());
    assert_eq!(lab2.emitted, lab.emitted, "the same RSTs");
}

/// Bad input never panics: stores whose records hold random bytes (anywhere in the record,
/// or only in the fields a packet changes, with a valid state) are attached, then the old
/// connections' segments and an expiry sweep run through the engine. Whatever is restored
/// must only be forwarded, dropped or expired.
#[test]
fn random_record_bytes_never_panic() {
    let mut lab = lab_with_store();
    let mut conns = Vec::new();
    for i in 0..8u16 {
        let mut conn = establish(&mut lab, 80 + (i % 2), 47_000 + i);
        conn.client_sends(&mut lab, b"data");
        conns.push(conn);
    }
    let ids: Vec<u32> = lab.engine.flows().map(|f| f.id).collect();
    let pristine = lab.engine.abandon_store().unwrap();
    let pristine = pristine.bytes().to_vec();
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for round in 0..100 {
        let mut mem = pristine.clone();
        for &id in &ids {
            let at = record_offset(id);
            if round % 2 == 0 {
                // Anything, commit marker included.
                for b in &mut mem[at..at + 128] {
                    if next() % 4 == 0 {
                        *b = next() as u8;
                    }
                }
            } else {
                // Only the TCP tracking and last_seen, with a valid state.
                for b in &mut mem[at + 64..at + 96] {
                    *b = next() as u8;
                }
                mem[at + 64] = (next() % 6) as u8;
            }
        }
        let (mut lab2, _) = restart(&lab, Box::new(mem), DEFAULT_CONFIG);
        for conn in &conns {
            for seg in [
                conn.client.seg(ACK | PSH, conn.c_seq, conn.s_seq, b"more"),
                conn.backend.seg(ACK | PSH, conn.s_seq, conn.c_seq, b"back"),
                conn.client.seg(FIN | ACK, conn.c_seq, conn.s_seq, &[]),
                conn.client.seg(RST, conn.c_seq, 0, &[]),
            ] {
                let port = if seg[6..12] == CLIENT_MAC {
                    CLIENT_PORT
                } else {
                    BACKEND_PORT
                };
                let _ = lab2.send(port, seg);
            }
        }
        let t = lab2.now + mins(30);
        lab2.run_until(t);
        assert_eq!(lab2.engine.flow_count(), 0, "round {round}");
    }
}

/// A flow imported from another node (cluster flow sync) is written to the store like any
/// other, and survives a restart of the importing node.
#[test]
fn an_imported_flow_is_stored_too() {
    let mut a = Lab::new();
    let conn = establish(&mut a, 80, 40_400);
    let id = a.engine.flows().next().unwrap().id;
    let state = a.engine.export_flow(a.now, id).expect("a live flow");
    let mut b = lab_with_store();
    b.now = a.now;
    assert!(matches!(
        b.engine.import_flow(b.now, &state),
        Ok(xlb_engine::Imported::Created(_))
    ));
    let mem = b.engine.abandon_store().unwrap();
    let (mut c, report) = restart(&b, mem, DEFAULT_CONFIG);
    assert_eq!(report.flows, 1);
    let (port, _) = c.forward(
        CLIENT_PORT,
        conn.client.seg(ACK | PSH, conn.c_seq, conn.s_seq, b"x"),
    );
    assert_eq!(port, BACKEND_PORT);
}

/// A cluster peer's flow held here as a standby copy stays one across a restart: it expires
/// without reset-on-idle RSTs (the peer's connection may live on), while a copy that took a
/// packet here before the restart is this node's own and is reset on idle as usual.
#[test]
fn a_standby_copy_stays_standby_across_a_restart() {
    let mut a = Lab::new();
    let quiet = establish(&mut a, 80, 40_410);
    let moved = establish(&mut a, 80, 40_411);
    let states: Vec<_> = a
        .engine
        .flows()
        .map(|f| a.engine.export_flow(a.now, f.id).expect("a live flow"))
        .collect();
    let mut b = lab_with_store();
    b.now = a.now;
    for state in &states {
        assert!(matches!(
            b.engine.import_standby(b.now, state),
            Ok(xlb_engine::Imported::Created(_))
        ));
    }
    // ECMP moves one connection here: its next packet makes the copy live on this node.
    b.now += 1_000_000;
    let (port, _) = b.forward(
        CLIENT_PORT,
        moved.client.seg(ACK | PSH, moved.c_seq, moved.s_seq, b"m"),
    );
    assert_eq!(port, BACKEND_PORT);

    let mem = b.engine.abandon_store().unwrap();
    let (mut c, report) = restart(&b, mem, DEFAULT_CONFIG);
    assert_eq!(report.flows, 2);
    let standby: Vec<bool> = c
        .engine
        .flows()
        .map(|f| c.engine.is_standby_flow(f.id))
        .collect();
    assert_eq!(standby.iter().filter(|s| **s).count(), 1, "{standby:?}");
    let quiet_port = quiet.client.sport;
    assert!(c
        .engine
        .flows()
        .any(|f| f.orig.src_port == quiet_port && c.engine.is_standby_flow(f.id)));

    c.run_until(c.now + mins(4) + 2 * tick());
    assert_eq!(c.engine.flow_count(), 0);
    assert_eq!(
        c.emitted.len(),
        2,
        "only the flow that moved here is reset on idle, to both ends"
    );
}
