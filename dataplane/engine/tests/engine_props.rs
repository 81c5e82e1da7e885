//! Property tests through the whole engine: random and mutated frames never panic, always get a
//! verdict, and a transmitted frame never grows; counters add up.

mod common;

use common::flags::*;
use common::*;
use proptest::prelude::*;
use xlb_engine::{EngineConfig, Verdict};

fn small_lab() -> Lab {
    let cfg = EngineConfig {
        flow_capacity: 256,
        late_slots: 256,
        ..EngineConfig::default()
    };
    Lab::with(DEFAULT_CONFIG, cfg)
}

/// Valid frames of every kind the lab produces, to mutate.
fn seeds() -> Vec<Vec<u8>> {
    let c = Tcp::client(80, 40_000);
    let c6 = Tcp {
        src: CLIENT6.into(),
        dst: VIP6.into(),
        ..Tcp::client(80, 40_001)
    };
    vec![
        c.seg(SYN, 1, 0, &[]),
        c.seg(ACK | PSH, 2, 3, b"payload bytes"),
        Tcp::client(82, 1).seg(ACK, 9, 9, b"x"),
        Tcp::client(83, 1).seg(ACK | FIN, 9, 9, b""),
        c6.seg(SYN, 1, 0, &[]),
        udp(
            CLIENT_MAC,
            XLB_MAC[0],
            CLIENT.into(),
            5000,
            VIP.into(),
            53,
            b"q",
        ),
        udp(
            B1_MAC,
            XLB_MAC[1],
            B1.into(),
            5000,
            REMOTE.into(),
            53,
            b"out",
        ),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_always_get_a_verdict(bytes in proptest::collection::vec(any::<u8>(), 0..200), port in 0u16..3) {
        let mut lab = small_lab();
        let len = bytes.len();
        let (v, out) = lab.send(port, bytes);
        if let Verdict::Tx { len: l, .. } = v {
            prop_assert!(l as usize <= len && out.len() == l as usize);
        }
        let c = lab.engine.counters();
        prop_assert_eq!(c.rx_packets, 1);
        prop_assert_eq!(c.total_drops() + c.tx_packets, 1);
    }

    #[test]
    fn mutated_frames_always_get_a_verdict(
        which in 0usize..7,
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        cut in proptest::option::of(any::<usize>()),
        port in 0u16..3,
        later in 0u64..600,
    ) {
        let mut lab = small_lab();
        // Establish some state first so mutations can hit existing flows.
        for f in seeds() {
            lab.send(0, f);
        }
        let mut f = seeds()[which].clone();
        for (pos, x) in flips {
            let i = pos % f.len();
            f[i] ^= x;
        }
        if let Some(c) = cut {
            f.truncate(c % (f.len() + 1));
        }
        let len = f.len();
        let (v, _) = lab.send(port, f);
        if let Verdict::Tx { len: l, .. } = v {
            prop_assert!(l as usize <= len);
        }
        lab.advance(s(later));
        let c = lab.engine.counters();
        prop_assert_eq!(c.rx_packets, 8);
    }
}
