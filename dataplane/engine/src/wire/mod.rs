//! Wire formats: parsing untrusted frames into a [`Packet`] (offsets + the fields the engine
//! needs), in-place NAT rewrites with incremental checksums, and building TCP RSTs.
//!
//! OWNER: wire helper. Contract used by the engine (do not change signatures without updating
//! `engine.rs`):
//! - [`parse`] never panics; every malformed input maps to one [`ParseError`] variant.
//! - [`rewrite`] rewrites addresses / ports in place and keeps every checksum consistent.
//! - `build` builds RST frames into caller buffers without heap allocation.
//!
//! No signature was changed. Behaviour the signatures alone do not say:
//! - IPv6 packets whose source or destination is IPv4-mapped (`::ffff:0:0/96`) are refused as
//!   `BadIpHeader`, so that `Addr` keys of the two families can never collide.
//! - [`reply_rst_in_place`] returns 0 (nothing to send, frame untouched) for non-TCP input, for
//!   an RST (never answered), and for a `pkt` that does not describe the frame.
//! - [`rewrite`] ignores an address of the wrong family and leaves the frame untouched when
//!   `pkt` does not describe it; it reads the old values from the frame, so it may follow
//!   [`decrement_hop_limit`] with the same `pkt`.
//! - For ICMP, `payload_len` counts the bytes after the 8-byte ICMP header.
//!
//! Everything here handles untrusted bytes on the hot path, so outside tests the module
//! denies any indexing or slicing that could panic: fixed offsets are read through
//! `first_chunk` views (one bounds check per header) and the rest through `get`.
#![cfg_attr(
    not(test),
    deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)
)]

pub mod build;
pub mod checksum;
pub mod parse;
pub mod vlan;

pub use build::{build_tcp_rst, build_tcp_segment, reply_rst_in_place, RstSpec, MAX_RST_FRAME};
pub use checksum::L4Checksum;
pub use parse::{parse, Packet, ParseError, MAX_WSCALE, NO_WSCALE};
pub use rewrite::{decrement_hop_limit, rewrite, Rewrite};
pub use vlan::{retag, VLAN_HLEN};

pub mod rewrite;

/// IP protocol numbers the engine understands.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
}

/// TCP flag bits (byte 13 of the TCP header).
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
}

/// Frame fixtures shared by the unit tests of the wire submodules.
#[cfg(test)]
pub(crate) mod fixtures {
    use crate::addr::Addr;
    use etherparse::{PacketBuilder, TcpHeader, TcpOptionElement, VlanId};

    pub const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
    pub const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
    pub const V4_A: [u8; 4] = [198, 18, 2, 1];
    pub const V4_B: [u8; 4] = [198, 18, 2, 2];
    pub const V6_A: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    pub const V6_B: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum L4 {
        /// flags, seq, ack (ack used only when flags has ACK), number of 32-bit option words.
        Tcp {
            flags: u8,
            seq: u32,
            ack: u32,
            opt_words: u8,
        },
        Udp,
        /// ICMP / ICMPv6 echo request.
        Echo {
            id: u16,
        },
        /// ICMP destination unreachable / ICMPv6 destination unreachable.
        Unreach,
    }

    /// Everything a fixture frame is built from; changing the tuple and rebuilding gives the
    /// frame a correct rewrite must produce.
    #[derive(Clone, Debug)]
    pub struct Spec {
        pub v6: bool,
        pub vlan: Option<u16>,
        pub src: Addr,
        pub dst: Addr,
        pub sport: u16,
        pub dport: u16,
        pub l4: L4,
        pub payload: Vec<u8>,
    }

    impl Spec {
        pub fn new(v6: bool, vlan: Option<u16>, l4: L4, payload: &[u8]) -> Spec {
            let (src, dst) = if v6 {
                (Addr::from_v6_bytes(V6_A), Addr::from_v6_bytes(V6_B))
            } else {
                (Addr::from_v4_bytes(V4_A), Addr::from_v4_bytes(V4_B))
            };
            Spec {
                v6,
                vlan,
                src,
                dst,
                sport: 40000,
                dport: 80,
                l4,
                payload: payload.to_vec(),
            }
        }

        pub fn build(&self) -> Vec<u8> {
            use crate::wire::tcp_flags as f;
            let eth = PacketBuilder::ethernet2(MAC_A, MAC_B);
            let ip = match (self.vlan, self.v6) {
                (Some(v), false) => eth.single_vlan(VlanId::try_new(v).unwrap()).ipv4(
                    self.src.v4_bytes(),
                    self.dst.v4_bytes(),
                    64,
                ),
                (Some(v), true) => eth.single_vlan(VlanId::try_new(v).unwrap()).ipv6(
                    self.src.v6_bytes(),
                    self.dst.v6_bytes(),
                    64,
                ),
                (None, false) => eth.ipv4(self.src.v4_bytes(), self.dst.v4_bytes(), 64),
                (None, true) => eth.ipv6(self.src.v6_bytes(), self.dst.v6_bytes(), 64),
            };
            let mut out = Vec::new();
            let p = &self.payload;
            match self.l4 {
                L4::Tcp {
                    flags,
                    seq,
                    ack,
                    opt_words,
                } => {
                    let mut h = TcpHeader::new(self.sport, self.dport, seq, 1000);
                    h.fin = flags & f::FIN != 0;
                    h.syn = flags & f::SYN != 0;
                    h.rst = flags & f::RST != 0;
                    h.psh = flags & f::PSH != 0;
                    h.ack = flags & f::ACK != 0;
                    if h.ack {
                        h.acknowledgment_number = ack;
                    }
                    let opts = vec![TcpOptionElement::Noop; usize::from(opt_words) * 4];
                    h.set_options(&opts).unwrap();
                    ip.tcp_header(h).write(&mut out, p).unwrap();
                }
                L4::Udp => ip.udp(self.sport, self.dport).write(&mut out, p).unwrap(),
                L4::Echo { id } if self.v6 => {
                    ip.icmpv6_echo_request(id, 7).write(&mut out, p).unwrap()
                }
                L4::Echo { id } => ip.icmpv4_echo_request(id, 7).write(&mut out, p).unwrap(),
                L4::Unreach if self.v6 => ip.icmpv6_raw(1, 4, [0; 4]).write(&mut out, p).unwrap(),
                L4::Unreach => ip.icmpv4_raw(3, 3, [0; 4]).write(&mut out, p).unwrap(),
            }
            out
        }
    }

    pub fn tcp(flags: u8) -> L4 {
        L4::Tcp {
            flags,
            seq: 1000,
            ack: 5000,
            opt_words: 0,
        }
    }
}
