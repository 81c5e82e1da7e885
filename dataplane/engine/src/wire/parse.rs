//! Parsing of untrusted frames: Ethernet II (+ one 802.1Q tag), IPv4 (no options, no fragments),
//! IPv6 (no extension headers), TCP, UDP, ICMP/ICMPv6.

use crate::addr::Addr;
use crate::wire::checksum::L4Checksum;

/// What the engine needs to know about one frame. All offsets are from the start of the frame.
/// `Copy` and small: it lives on the stack for the duration of one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    /// 802.1Q VLAN id when the frame carries one tag.
    pub vlan: Option<u16>,
    /// Offset of the IP header.
    pub l3_off: u16,
    /// Offset of the L4 (TCP/UDP/ICMP) header.
    pub l4_off: u16,
    /// End of the IP packet (frames may carry Ethernet padding after it).
    pub ip_end: u16,
    pub is_v6: bool,
    /// IP protocol number (see [`crate::wire::proto`]).
    pub proto: u8,
    /// IPv4 TTL or IPv6 hop limit.
    pub hop_limit: u8,
    pub src: Addr,
    pub dst: Addr,
    /// TCP/UDP ports; for ICMP echo both are the identifier, otherwise 0.
    pub src_port: u16,
    pub dst_port: u16,
    /// TCP flags byte (0 for UDP/ICMP).
    pub tcp_flags: u8,
    /// TCP sequence and acknowledgement numbers (0 for UDP/ICMP).
    pub seq: u32,
    pub ack: u32,
    /// TCP/UDP payload length in bytes (bytes after the L4 header up to `ip_end`).
    pub payload_len: u16,
    /// State of the L4 checksum as received (see [`L4Checksum`]).
    pub l4_csum: L4Checksum,
}

/// Why a frame could not be handled. Each variant is a counted drop reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParseError {
    /// Shorter than the headers it announces.
    Truncated,
    /// Not IPv4/IPv6 (ARP, LLDP, ... - these should have been passed to the kernel by XDP).
    NotIp,
    /// IP version / header length / total length / payload length inconsistent with the frame.
    BadIpHeader,
    /// IPv4 fragment (MF set or non-zero offset): the dataplane does not reassemble.
    Fragment,
    /// IPv4 header with options (IHL > 5).
    Ipv4Options,
    /// IPv6 extension headers (the first next-header is not TCP/UDP/ICMPv6).
    Ipv6ExtHeader,
    /// An IP protocol the engine does not handle.
    UnknownProtocol,
    /// TCP data offset < 5 or beyond the packet; UDP length inconsistent with the IP length.
    BadL4Header,
}

impl ParseError {
    pub const ALL: [ParseError; 8] = [
        ParseError::Truncated,
        ParseError::NotIp,
        ParseError::BadIpHeader,
        ParseError::Fragment,
        ParseError::Ipv4Options,
        ParseError::Ipv6ExtHeader,
        ParseError::UnknownProtocol,
        ParseError::BadL4Header,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            ParseError::Truncated => "truncated",
            ParseError::NotIp => "not_ip",
            ParseError::BadIpHeader => "bad_ip_header",
            ParseError::Fragment => "fragment",
            ParseError::Ipv4Options => "ipv4_options",
            ParseError::Ipv6ExtHeader => "ipv6_ext_header",
            ParseError::UnknownProtocol => "unknown_protocol",
            ParseError::BadL4Header => "bad_l4_header",
        }
    }
}

/// Parses an untrusted frame. Never panics.
pub fn parse(frame: &[u8]) -> Result<Packet, ParseError> {
    let _ = frame;
    todo!("wire helper")
}
