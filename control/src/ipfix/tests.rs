//! The IPFIX encoder against its own decoder, the record times and the rate bound.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use xlb_engine::natlog::NatEventKind;

use super::record::*;
use super::*;

fn rec(i: u16, v6: bool, event: u8) -> NatRecord {
    let ip = |last: u8| -> IpAddr {
        if v6 {
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, u16::from(last)))
        } else {
            IpAddr::V4(Ipv4Addr::new(198, 18, 1, last))
        }
    };
    NatRecord {
        unix_ms: 1_800_000_000_000 + u64::from(i),
        event,
        proto: 6,
        src: SocketAddr::new(ip(11), 40_000 + i),
        post_src: SocketAddr::new(ip(100), 1024 + i),
        dst: SocketAddr::new(ip(50), 443),
        post_dst: SocketAddr::new(ip(50), 443),
    }
}

#[test]
fn messages_carry_templates_and_records_of_both_families_and_count_sequence() {
    let mut enc = Encoder::new(7);
    enc.add_templates();
    let a = rec(1, false, NAT_SESSION_CREATE);
    let b = rec(2, true, NAT_SESSION_DELETE);
    let c = rec(3, false, NAT_SESSION_DELETE);
    for r in [&a, &b, &c] {
        assert!(enc.fits(r));
        enc.add(r);
    }
    let t = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let (msg, n) = enc.finish(t);
    assert_eq!(n, 3);
    // Header: version, length, export time, sequence 0, domain.
    assert_eq!(&msg[0..2], &[0, 10]);
    assert_eq!(usize::from(u16::from_be_bytes([msg[2], msg[3]])), msg.len());
    let d = decode(&msg).unwrap();
    assert_eq!((d.sequence, d.domain, d.export_secs), (0, 7, 1_800_000_000));
    assert_eq!(d.templates, [TEMPLATE_V4, TEMPLATE_V6]);
    assert_eq!(d.records, [a, b, c]);
    // The template set's bytes: set 2, then template 256 with 11 fields, 323/8 first.
    assert_eq!(&msg[16..18], &[0, 2]);
    assert_eq!(&msg[20..24], &[1, 0, 0, 11]);
    assert_eq!(&msg[24..28], &[0x01, 0x43, 0, 8]);
    // The next message's sequence number counts the 3 records sent.
    enc.add(&a);
    let (msg, _) = enc.finish(t);
    assert_eq!(decode(&msg).unwrap().sequence, 3);
    assert_eq!(
        enc.finish(t),
        (Vec::new(), 0),
        "nothing pending: no message"
    );
}

#[test]
fn messages_stay_under_the_size_limit() {
    let mut enc = Encoder::new(1);
    let mut sizes = Vec::new();
    for i in 0..200 {
        let r = rec(i, i % 3 == 0, NAT_SESSION_CREATE);
        if !enc.fits(&r) {
            sizes.push(enc.finish(SystemTime::now()).0.len());
        }
        enc.add(&r);
    }
    sizes.push(enc.finish(SystemTime::now()).0.len());
    assert!(sizes.len() > 5, "{sizes:?}");
    assert!(sizes.iter().all(|&s| s <= MAX_MESSAGE), "{sizes:?}");
}

#[test]
fn events_get_wall_clock_times_from_their_age() {
    let e = NatEvent {
        at: 5_000_000_000,
        kind: NatEventKind::Delete,
        nat: xlb_engine::flow::Nat::Snat,
        proto: 17,
        rule: 0,
        src: (xlb_engine::Addr::from_v4_bytes([198, 18, 1, 11]), 5353),
        post_src: (xlb_engine::Addr::from_v4_bytes([198, 19, 0, 100]), 2048),
        dst: (xlb_engine::Addr::from_v4_bytes([198, 19, 0, 50]), 53),
        post_dst: (xlb_engine::Addr::from_v4_bytes([198, 19, 0, 50]), 53),
    };
    let wall = UNIX_EPOCH + Duration::from_secs(2_000_000_000);
    let r = NatRecord::from_event(&e, 7_500_000_000, wall);
    assert_eq!(r.unix_ms, 2_000_000_000_000 - 2_500);
    assert_eq!((r.event, r.proto), (NAT_SESSION_DELETE, 17));
    assert_eq!(r.post_src, "198.19.0.100:2048".parse().unwrap());
}

#[test]
fn the_bucket_bounds_the_rate() {
    let t0 = Instant::now();
    let mut b = Bucket::new(100, t0);
    assert_eq!(b.burst, 40.0, "at least one message's worth");
    b.tokens = 0.0;
    assert_eq!(b.wait(), Duration::from_millis(10));
    b.refill(t0 + Duration::from_millis(50));
    assert!((b.tokens - 5.0).abs() < 1e-6);
    b.refill(t0 + Duration::from_secs(10));
    assert_eq!(b.tokens, 40.0, "capped");
}
