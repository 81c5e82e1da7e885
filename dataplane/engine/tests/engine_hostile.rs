//! Hostile traffic through the whole engine, in virtual time: keyed steering, flow admission
//! under floods, bounded work per packet and per request, anti-spoofing.

mod common;

use std::collections::HashSet;

use common::flags::*;
use common::*;
use xlb_engine::EngineConfig;

fn member(sport: u16, dport: u16) -> Tcp {
    Tcp {
        src_mac: B1_MAC,
        dst_mac: XLB_MAC[1],
        src: B1.into(),
        dst: REMOTE.into(),
        sport,
        dport,
    }
}

fn remote(sport: u16, snat_port: u16) -> Tcp {
    Tcp {
        src_mac: NET_MAC,
        dst_mac: XLB_MAC[2],
        src: REMOTE.into(),
        dst: SNAT_IP.into(),
        sport,
        dport: snat_port,
    }
}

/// The lab's configuration with 256 SNAT ports per member.
fn wide_snat() -> String {
    let toml = DEFAULT_CONFIG.replace(
        "allocated_outbound_ports = 8",
        "allocated_outbound_ports = 256",
    );
    assert_ne!(toml, DEFAULT_CONFIG);
    toml
}

/// With a random steering key shared by the workers, both directions of a load-balanced flow
/// and of an outbound flow (its reply addressed to the SNAT port the owner allocated from its
/// share) name the same worker; another key names other workers.
#[test]
fn keyed_steering_keeps_both_directions_of_every_flow_on_one_worker() {
    for (seed, workers) in [(0x1234_5678_9abc_def0u64, 2u16), (42, 3), (u64::MAX, 4)] {
        let toml = wide_snat();
        let mk = |w| {
            Lab::with(
                &toml,
                EngineConfig {
                    worker: w,
                    workers,
                    steer_seed: seed,
                    ..EngineConfig::default()
                },
            )
        };
        let mut labs: Vec<Lab> = (0..workers).map(mk).collect();
        let mut owners = HashSet::new();
        for i in 0..64u16 {
            // Load balancing: the client's SYN and the backend's SYN-ACK.
            let client = Tcp::client(80, 30_000 + i);
            let syn = client.seg(SYN, 1, 0, &[]);
            let w = labs[0].engine.owner(&syn).unwrap() as usize;
            owners.insert(w);
            for lab in &labs {
                assert_eq!(lab.engine.owner(&syn), Some(w as u16), "workers agree");
            }
            let (_, out) = labs[w].forward(CLIENT_PORT, syn);
            let o = seen(&out);
            let backend = Tcp::reply_to(&o, o.dst_mac, XLB_MAC[1]);
            let synack = backend.seg(SYN | ACK, 9, 2, &[]);
            assert_eq!(labs[1].engine.owner(&synack), Some(w as u16));
            assert_eq!(labs[w].forward(BACKEND_PORT, synack).0, CLIENT_PORT);

            // Outbound: the owner allocates from its share; the reply to that port comes back
            // to it.
            let syn = member(50_000 + i, 7000 + i).seg(SYN, 1, 0, &[]);
            let w = labs[0].engine.owner(&syn).unwrap() as usize;
            let (_, out) = labs[w].forward(BACKEND_PORT, syn);
            let port = seen(&out).sport;
            assert_eq!(port % workers, w as u16, "port from the owner's share");
            let reply = remote(7000 + i, port).seg(SYN | ACK, 9, 2, &[]);
            assert_eq!(
                labs[workers as usize - 1].engine.owner(&reply),
                Some(w as u16)
            );
            assert_eq!(labs[w].forward(INTERNET_PORT, reply).0, BACKEND_PORT);
        }
        assert_eq!(
            owners.len(),
            workers as usize,
            "flows spread over every worker"
        );
    }
    // Another key, other owners: a sender that does not know the key cannot aim.
    let owners = |seed| {
        let lab = Lab::with(
            DEFAULT_CONFIG,
            EngineConfig {
                workers: 4,
                steer_seed: seed,
                ..EngineConfig::default()
            },
        );
        (0..400u16)
            .map(|i| {
                lab.engine
                    .owner(&Tcp::client(80, 20_000 + i).seg(SYN, 1, 0, &[]))
                    .unwrap()
            })
            .collect::<Vec<_>>()
    };
    let (a, b) = (owners(1), owners(2));
    let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    assert!(same < 200, "{same} of 400 owners unchanged by the key");
}
