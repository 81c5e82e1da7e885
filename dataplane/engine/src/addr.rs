//! One address type for both families, so that a flow table keyed on IPv4 and IPv6 alike
//! compares and hashes 16 bytes without branching on the family.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An IPv4 or IPv6 address, stored as 128 bits. IPv4 addresses use the IPv4-mapped form
/// `::ffff:a.b.c.d`, so `Addr::from(Ipv4Addr)` and `Addr::from(IpAddr::V4)` agree.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Addr(pub u128);

const V4_MAPPED_PREFIX: u128 = 0xffff_0000_0000;

impl Addr {
    pub const UNSPECIFIED: Addr = Addr(0);

    pub const fn from_v4_bytes(b: [u8; 4]) -> Addr {
        Addr(V4_MAPPED_PREFIX | u32::from_be_bytes(b) as u128)
    }
    pub const fn from_v6_bytes(b: [u8; 16]) -> Addr {
        Addr(u128::from_be_bytes(b))
    }
    pub const fn is_v4(self) -> bool {
        (self.0 >> 32) == 0xffff
    }
    /// The four network-order bytes of an IPv4 address (meaningless for IPv6).
    pub const fn v4_bytes(self) -> [u8; 4] {
        (self.0 as u32).to_be_bytes()
    }
    pub const fn v6_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }
    pub fn to_ip(self) -> IpAddr {
        if self.is_v4() {
            IpAddr::V4(Ipv4Addr::from(self.v4_bytes()))
        } else {
            IpAddr::V6(Ipv6Addr::from(self.v6_bytes()))
        }
    }
}

impl From<Ipv4Addr> for Addr {
    fn from(a: Ipv4Addr) -> Addr {
        Addr::from_v4_bytes(a.octets())
    }
}
impl From<Ipv6Addr> for Addr {
    fn from(a: Ipv6Addr) -> Addr {
        match a.to_ipv4_mapped() {
            Some(v4) => Addr::from(v4),
            None => Addr::from_v6_bytes(a.octets()),
        }
    }
}
impl From<IpAddr> for Addr {
    fn from(a: IpAddr) -> Addr {
        match a {
            IpAddr::V4(v4) => v4.into(),
            IpAddr::V6(v6) => v6.into(),
        }
    }
}
impl From<Addr> for IpAddr {
    fn from(a: Addr) -> IpAddr {
        a.to_ip()
    }
}
impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.to_ip().fmt(f)
    }
}
impl fmt::Debug for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.to_ip().fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_round_trip_and_mapped_equivalence() {
        let a = Addr::from(Ipv4Addr::new(198, 18, 0, 1));
        assert!(a.is_v4());
        assert_eq!(a.v4_bytes(), [198, 18, 0, 1]);
        assert_eq!(a.to_ip(), IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)));
        let mapped: Ipv6Addr = Ipv4Addr::new(198, 18, 0, 1).to_ipv6_mapped();
        assert_eq!(Addr::from(mapped), a);
    }

    #[test]
    fn v6_round_trip() {
        let ip: Ipv6Addr = "2001:db8::7".parse().unwrap();
        let a = Addr::from(ip);
        assert!(!a.is_v4());
        assert_eq!(a.to_ip(), IpAddr::V6(ip));
        assert_eq!(a.to_string(), "2001:db8::7");
    }
}
