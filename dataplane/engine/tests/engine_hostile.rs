//! Hostile traffic through the whole engine, in virtual time: keyed steering, flow admission
//! under floods, bounded work per packet and per request, anti-spoofing.

mod common;

use std::collections::HashSet;

use common::flags::*;
use common::*;
use xlb_engine::admission::{AdmissionLimits, EvictReason};
use xlb_engine::tcp::TcpState;
use xlb_engine::{DropReason, EngineConfig, Verdict};

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

fn rule_id(lab: &Lab, name: &str) -> u16 {
    let rules = lab.engine.rules();
    (0..rules.rule_id_bound() as u16)
        .find(|&id| rules.rule(id).is_some_and(|r| &*r.name == name))
        .unwrap_or_else(|| panic!("no rule {name}"))
}

/// A client at 198.18.0.`host` (a spoofed source when nobody answers for it).
fn client_at(host: u8, dport: u16, sport: u16) -> Tcp {
    Tcp {
        src: std::net::Ipv4Addr::new(198, 18, 0, host).into(),
        ..Tcp::client(dport, sport)
    }
}

impl Conn {
    /// One exchange each way; panics unless both are forwarded.
    fn exchange(&mut self, lab: &mut Lab) {
        self.client_sends(lab, b"ping");
        self.backend_sends(lab, b"pong");
    }
}

/// Client ports of the flows of `state` on frontend port `dport`.
fn flows_in_state(lab: &Lab, dport: u16, state: TcpState) -> Vec<u16> {
    lab.engine
        .flows()
        .filter(|f| f.orig.dst_port == dport && f.tcp_state == Some(state))
        .map(|f| f.orig.src_port)
        .collect()
}

fn small_table(capacity: u32) -> EngineConfig {
    EngineConfig {
        flow_capacity: capacity,
        ..EngineConfig::default()
    }
}

/// A SYN flood at one rule, from spoofed sources, into a 64-flow table: the rule's share of
/// unconfirmed flows (25 %: 16) is recycled oldest first, established connections (of that
/// rule and of another) are never evicted and keep working, and another rule still gets new
/// connections through.
#[test]
fn a_syn_flood_at_one_rule_recycles_its_own_share_oldest_first() {
    let mut lab = Lab::with(DEFAULT_CONFIG, small_table(64));
    let http = rule_id(&lab, "http");
    let mut on_flooded = Conn::open(&mut lab, client_at(10, 80, 40_000));
    let mut on_other = Conn::open(&mut lab, client_at(10, 84, 40_001));
    for i in 0..1000u16 {
        let spoofed = client_at(100 + (i % 100) as u8, 80, 10_000 + i);
        assert!(matches!(
            lab.send(CLIENT_PORT, spoofed.seg(SYN, 7, 0, &[])).0,
            Verdict::Tx { .. }
        ));
        if i % 100 == 0 {
            on_flooded.exchange(&mut lab);
            on_other.exchange(&mut lab);
        }
    }
    // The 16 newest SYNs hold the share; everything older was evicted in order.
    let mut half_open = flows_in_state(&lab, 80, TcpState::SynSent);
    half_open.sort();
    assert_eq!(half_open, (10_000 + 984..10_000 + 1000).collect::<Vec<_>>());
    let c = lab.engine.counters();
    assert_eq!(c.eviction_count(EvictReason::RuleShare), 1000 - 16);
    assert_eq!(c.rule(http).flows_evicted, 1000 - 16);
    assert_eq!(c.rule(http).flows_created, 1001);
    assert_eq!(lab.engine.flow_count(), 2 + 16);
    // Another rule admits new connections while the flood goes on: they reach the
    // established state and then no flood can evict them.
    let mut late = Conn::open(&mut lab, client_at(11, 84, 40_002));
    for i in 0..200u16 {
        let spoofed = client_at(100, 80, 20_000 + i);
        lab.send(CLIENT_PORT, spoofed.seg(SYN, 7, 0, &[]));
    }
    late.exchange(&mut lab);
    on_flooded.exchange(&mut lab);
    on_other.exchange(&mut lab);
    assert_eq!(
        lab.engine
            .counters()
            .rule(rule_id(&lab, "http-long"))
            .flows_evicted,
        0
    );
}

/// A handshake in progress on one rule survives a flood at another: the flooded rule only
/// recycles its own share.
#[test]
fn a_flood_at_one_rule_never_evicts_another_rules_handshake() {
    let mut lab = Lab::with(DEFAULT_CONFIG, small_table(64));
    let client = client_at(12, 84, 41_000);
    let (_, syn) = lab.forward(CLIENT_PORT, client.seg(SYN, 5000, 0, &[]));
    for i in 0..500u16 {
        lab.send(
            CLIENT_PORT,
            client_at(150, 80, 30_000 + i).seg(SYN, 7, 0, &[]),
        );
    }
    let syn = seen(&syn);
    let backend = Tcp::reply_to(&syn, syn.dst_mac, XLB_MAC[1]);
    lab.forward(BACKEND_PORT, backend.seg(SYN | ACK, 9_000, 5001, &[]));
    lab.forward(CLIENT_PORT, client.seg(ACK, 5001, 9_001, &[]));
    assert_eq!(
        flows_in_state(&lab, 84, TcpState::Established),
        vec![41_000]
    );
}

/// Floods over several rules: each stays within its share, so the half-open budget (50 % of
/// 40: 20) is what evicts, oldest first over all rules; a table full of confirmed flows
/// refuses new ones.
#[test]
fn half_open_budget_evicts_the_oldest_over_all_rules() {
    let mut lab = Lab::with(DEFAULT_CONFIG, small_table(40));
    // Rule share 25 % of 40 = 10: eight SYNs each at four rules stay within it.
    let mut sent = vec![];
    for round in 0..8u16 {
        for dport in [80u16, 81, 84, 2201] {
            let sport = 10 * dport + round;
            lab.send(
                CLIENT_PORT,
                client_at(160, dport, sport).seg(SYN, 7, 0, &[]),
            );
            sent.push((dport, sport));
        }
    }
    let c = lab.engine.counters();
    assert_eq!(c.eviction_count(EvictReason::RuleShare), 0);
    assert_eq!(c.eviction_count(EvictReason::HalfOpenBudget), 32 - 20);
    let mut live: Vec<(u16, u16)> = lab
        .engine
        .flows()
        .map(|f| (f.orig.dst_port, f.orig.src_port))
        .collect();
    live.sort();
    let mut newest = sent[12..].to_vec();
    newest.sort();
    assert_eq!(live, newest, "the 20 newest survive");

    // Confirmed flows are never victims: fill the table with established connections.
    let mut lab = Lab::with(DEFAULT_CONFIG, small_table(8));
    let mut conns: Vec<Conn> = (0..8)
        .map(|i| Conn::open(&mut lab, client_at(20 + i, 80 + u16::from(i % 2), 42_000)))
        .collect();
    assert_eq!(
        lab.send(CLIENT_PORT, client_at(99, 80, 1).seg(SYN, 7, 0, &[]))
            .0,
        Verdict::Drop(DropReason::FlowTableFull)
    );
    for c in &mut conns {
        c.exchange(&mut lab);
    }
    assert_eq!(lab.engine.counters().evictions, [0; EvictReason::COUNT]);
}

/// A UDP flood from spoofed sources: the unreplied UDP budget is recycled oldest first, a
/// UDP flow that got a reply is confirmed and stays, and TCP handshakes are not touched.
#[test]
fn udp_flood_recycles_unreplied_flows_and_keeps_answered_ones() {
    let mut lab = Lab::with(DEFAULT_CONFIG, small_table(64));
    let dns = |host: u8, sport: u16| {
        udp(
            CLIENT_MAC,
            XLB_MAC[0],
            std::net::Ipv4Addr::new(198, 18, 0, host).into(),
            sport,
            VIP.into(),
            53,
            b"q",
        )
    };
    // An answered query.
    let (_, out) = lab.forward(CLIENT_PORT, dns(10, 5353));
    let q = seen(&out);
    let answer = udp(q.dst_mac, XLB_MAC[1], q.dst, q.dport, q.src, q.sport, b"a");
    assert_eq!(lab.forward(BACKEND_PORT, answer.clone()).0, CLIENT_PORT);
    // A TCP handshake in progress.
    let tcp = client_at(11, 80, 43_000);
    lab.forward(CLIENT_PORT, tcp.seg(SYN, 1, 0, &[]));
    // Rule share (16 of 64) is reached first for one rule; the counters say which budget.
    for i in 0..300u16 {
        assert!(matches!(
            lab.send(CLIENT_PORT, dns(100 + (i % 50) as u8, 20_000 + i))
                .0,
            Verdict::Tx { .. }
        ));
    }
    let c = lab.engine.counters();
    assert_eq!(c.eviction_count(EvictReason::RuleShare), 300 - 16);
    assert_eq!(flows_in_state(&lab, 80, TcpState::SynSent), vec![43_000]);
    assert_eq!(
        lab.forward(BACKEND_PORT, answer).0,
        CLIENT_PORT,
        "answered flow kept"
    );

    // With a share of 100 % the class budget (50 %: 32) is what recycles.
    let mut lab = Lab::with(
        DEFAULT_CONFIG,
        EngineConfig {
            admission: AdmissionLimits {
                rule_percent: 100,
                ..AdmissionLimits::default()
            },
            ..small_table(64)
        },
    );
    lab.forward(CLIENT_PORT, tcp.seg(SYN, 1, 0, &[]));
    for i in 0..100u16 {
        lab.send(CLIENT_PORT, dns(100, 20_000 + i));
    }
    let c = lab.engine.counters();
    assert_eq!(c.eviction_count(EvictReason::UnrepliedUdpBudget), 100 - 32);
    assert_eq!(c.eviction_count(EvictReason::HalfOpenBudget), 0);
    assert_eq!(flows_in_state(&lab, 80, TcpState::SynSent), vec![43_000]);
}

/// A blind spoofer that sends the SYN and then an ACK with a guessed acknowledgement number
/// moves the tracked state but never confirms the flow: it stays evictable. The real client
/// acknowledges the SYN-ACK exactly and is confirmed.
#[test]
fn only_an_exact_acknowledgement_of_the_reply_confirms_a_tcp_flow() {
    let mut lab = Lab::with(DEFAULT_CONFIG, small_table(64));
    let spoofer = client_at(170, 80, 44_000);
    let (_, syn) = lab.forward(CLIENT_PORT, spoofer.seg(SYN, 1, 0, &[]));
    let syn = seen(&syn);
    let backend = Tcp::reply_to(&syn, syn.dst_mac, XLB_MAC[1]);
    // The backend answers the spoofed address, which the spoofer never sees.
    lab.forward(BACKEND_PORT, backend.seg(SYN | ACK, 123_456, 2, &[]));
    // A blind ACK (the spoofer guesses the acknowledgement): dropped as out of window, and it
    // confirms nothing.
    lab.send(CLIENT_PORT, spoofer.seg(ACK, 2, 1, &[]));
    for i in 0..16u16 {
        lab.send(
            CLIENT_PORT,
            client_at(171, 80, 45_000 + i).seg(SYN, 7, 0, &[]),
        );
    }
    assert!(
        lab.engine.flows().all(|f| f.orig.src_port != 44_000),
        "the unconfirmed flow was the oldest and went first"
    );
    let mut real = Conn::open(&mut lab, client_at(172, 80, 46_000));
    for i in 0..100u16 {
        lab.send(
            CLIENT_PORT,
            client_at(171, 80, 47_000 + i).seg(SYN, 7, 0, &[]),
        );
    }
    real.exchange(&mut lab);
}

/// `pickup` re-creates state only for segments that look like a live connection: ACK set,
/// no SYN, no RST. A picked-up flow is confirmed once the client acknowledges what the
/// backend sent.
#[test]
fn pickup_creates_state_only_for_live_looking_segments() {
    let mut lab = Lab::new();
    let c = client_at(30, 83, 48_000);
    for flags in [SYN | ACK, RST, RST | ACK] {
        assert_eq!(
            lab.send(CLIENT_PORT, c.seg(flags, 5, 6, b"x")).0,
            Verdict::Drop(DropReason::NoFlow),
            "flags {flags:#x}"
        );
    }
    // Flag sets no stack sends are refused before any lookup.
    for flags in [FIN, PSH, 0] {
        assert_eq!(
            lab.send(CLIENT_PORT, c.seg(flags, 5, 6, b"x")).0,
            Verdict::Drop(DropReason::BadTcpFlags),
            "flags {flags:#x}"
        );
    }
    assert_eq!(lab.engine.flow_count(), 0);
    let pickup = rule_id(&lab, "http-pickup");
    assert_eq!(lab.engine.counters().rule(pickup).no_flow, 3);
    let (port, out) = lab.forward(CLIENT_PORT, c.seg(ACK | PSH, 100, 200, b"mid"));
    assert_eq!(port, BACKEND_PORT);
    assert_eq!(lab.engine.counters().rule(pickup).flows_picked_up, 1);
    // FIN with ACK is a live connection closing: picked up too.
    let d = client_at(31, 83, 48_001);
    assert_eq!(
        lab.forward(CLIENT_PORT, d.seg(FIN | ACK, 100, 200, b"")).0,
        BACKEND_PORT
    );
    assert_eq!(seen(&out).payload, b"mid");

    // Confirmation, in a table of 8 (the rule's share: 2): the backend sends, the client
    // acknowledges exactly that; a flood of picked-up segments then evicts the other,
    // unconfirmed, picked-up flow and its own, never the confirmed one.
    let mut lab2 = Lab::with(DEFAULT_CONFIG, small_table(8));
    let (_, out) = lab2.forward(CLIENT_PORT, c.seg(ACK | PSH, 100, 200, b"mid"));
    lab2.forward(CLIENT_PORT, d.seg(ACK, 100, 200, b""));
    let o = seen(&out);
    let backend = Tcp::reply_to(&o, o.dst_mac, XLB_MAC[1]);
    lab2.forward(BACKEND_PORT, backend.seg(ACK | PSH, 200, 103, b"data"));
    lab2.forward(CLIENT_PORT, c.seg(ACK, 103, 204, b""));
    for i in 0..10u16 {
        lab2.send(
            CLIENT_PORT,
            client_at(40, 83, 1_000 + i).seg(ACK, 1, 1, b""),
        );
    }
    let kept: HashSet<u16> = lab2.engine.flows().map(|f| f.orig.src_port).collect();
    assert!(kept.contains(&48_000), "confirmed pickup kept");
    assert!(!kept.contains(&48_001), "unconfirmed pickup evicted");
}

/// The `reset` unknown-flow policy answers at most the worker's RST rate (here 10 per
/// second, 10 at once): the rest are counted drops, and the rate comes back with time.
#[test]
fn reset_policy_rsts_are_rate_limited_in_virtual_time() {
    let mut lab = Lab::with(
        DEFAULT_CONFIG,
        EngineConfig {
            reset_rate: 10,
            ..EngineConfig::default()
        },
    );
    let policy = rule_id(&lab, "http-reset-policy");
    let burst = |lab: &mut Lab, base: u16| {
        (0..50u16)
            .map(|i| {
                lab.send(
                    CLIENT_PORT,
                    client_at(200, 82, base + i).seg(ACK, 5, 6, b"x"),
                )
                .0
            })
            .filter(|v| {
                matches!(
                    v,
                    Verdict::Tx {
                        port: CLIENT_PORT,
                        ..
                    }
                )
            })
            .count()
    };
    assert_eq!(burst(&mut lab, 1_000), 10);
    let c = lab.engine.counters();
    assert_eq!(c.drop_count(DropReason::ResetRateLimited), 40);
    assert_eq!(c.rule(policy).reset_rate_limited, 40);
    assert_eq!(c.rule(policy).unknown_flow_resets, 10);
    lab.advance(secs_f(0.5));
    assert_eq!(burst(&mut lab, 2_000), 5, "half a second: half the rate");
    lab.advance(secs_f(10.0));
    assert_eq!(
        burst(&mut lab, 3_000),
        10,
        "a quiet period refills the burst, no more"
    );
    assert_eq!(lab.engine.flow_count(), 0);
}

/// An outbound rule takes new flows only from the port facing the members: a member's
/// address arriving from the internet or the clients' side takes no SNAT port.
#[test]
fn outbound_flows_only_from_the_members_side() {
    let mut lab = Lab::new();
    let egress = rule_id(&lab, "egress");
    for port in [INTERNET_PORT, CLIENT_PORT] {
        for (i, flags) in [SYN, ACK].into_iter().enumerate() {
            assert_eq!(
                lab.send(port, member(50_000 + i as u16, 443).seg(flags, 1, 0, &[]))
                    .0,
                Verdict::Drop(DropReason::SpoofedSource)
            );
        }
        let udp = udp(
            NET_MAC,
            XLB_MAC[2],
            B1.into(),
            5000,
            REMOTE.into(),
            53,
            b"q",
        );
        assert_eq!(
            lab.send(port, udp).0,
            Verdict::Drop(DropReason::SpoofedSource)
        );
    }
    let c = lab.engine.counters();
    assert_eq!(c.rule(egress).spoofed_source, 6);
    assert_eq!(c.drop_count(DropReason::SpoofedSource), 6);
    assert_eq!(lab.engine.flow_count(), 0);
    let rules = lab.engine.rules().clone();
    let (_, blocks) = rules.match_outbound(6, B1.into()).unwrap();
    assert_eq!(lab.engine.snat_usage(blocks, 6), (0, 8), "no port taken");
    // From the members' side it works.
    assert_eq!(
        lab.forward(BACKEND_PORT, member(50_000, 443).seg(SYN, 1, 0, &[]))
            .0,
        INTERNET_PORT
    );
}

/// Packets of an existing flow must come from the side the flow learned: replies from the
/// port its original direction leaves by, an outbound flow's original direction from the
/// members' side. A spoofed RST from the wrong side changes nothing.
#[test]
fn flows_take_each_direction_only_from_its_side() {
    let mut lab = Lab::new();
    let http = rule_id(&lab, "http");
    let mut conn = Conn::open(&mut lab, client_at(10, 80, 40_000));
    // The backend's address, arriving from the clients' side (an outside spoofer).
    for flags in [RST, ACK | PSH, FIN | ACK] {
        let forged = conn.backend.seg(flags, conn.s_seq, conn.c_seq, b"");
        assert_eq!(
            lab.send(CLIENT_PORT, forged).0,
            Verdict::Drop(DropReason::WrongSide)
        );
    }
    assert_eq!(lab.engine.counters().rule(http).wrong_side, 3);
    assert_eq!(
        flows_in_state(&lab, 80, TcpState::Established),
        vec![40_000],
        "the forged RST and FIN changed nothing"
    );
    conn.exchange(&mut lab);

    // Outbound: the member's segment of an existing flow from outside, and the remote's
    // reply from inside or the clients' side.
    let (_, out) = lab.forward(BACKEND_PORT, member(50_000, 443).seg(SYN, 1, 0, &[]));
    let port = seen(&out).sport;
    let egress = rule_id(&lab, "egress");
    assert_eq!(
        lab.send(INTERNET_PORT, member(50_000, 443).seg(RST, 2, 0, &[]))
            .0,
        Verdict::Drop(DropReason::SpoofedSource)
    );
    for side in [CLIENT_PORT, BACKEND_PORT] {
        assert_eq!(
            lab.send(side, remote(443, port).seg(SYN | ACK, 9, 2, &[]))
                .0,
            Verdict::Drop(DropReason::WrongSide)
        );
    }
    let c = lab.engine.counters().rule(egress);
    assert_eq!((c.spoofed_source, c.wrong_side), (1, 2));
    assert_eq!(
        lab.forward(INTERNET_PORT, remote(443, port).seg(SYN | ACK, 9, 2, &[]))
            .0,
        BACKEND_PORT
    );

    // A backend that moves to another port (its neighbour entry follows it): its replies
    // are expected there.
    lab.engine
        .next_hops()
        .set_neighbor(B1.into(), INTERNET_PORT, B1_MAC)
        .unwrap();
    lab.engine
        .next_hops()
        .set_neighbor(B2.into(), INTERNET_PORT, B2_MAC)
        .unwrap();
    let reply = conn.backend.seg(ACK, conn.s_seq, conn.c_seq, b"");
    assert_eq!(
        lab.send(BACKEND_PORT, reply.clone()).0,
        Verdict::Drop(DropReason::WrongSide)
    );
    assert_eq!(lab.forward(INTERNET_PORT, reply).0, CLIENT_PORT);
}
