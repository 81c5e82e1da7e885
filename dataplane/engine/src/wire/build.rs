//! Building TCP RST frames: the two RSTs of "TCP reset on idle", and the answer of the `reset`
//! unknown-flow policy.

use crate::addr::Addr;
use crate::wire::parse::Packet;

/// Largest frame [`build_tcp_rst`] writes (Ethernet + 802.1Q + IPv6 + TCP).
pub const MAX_RST_FRAME: usize = 14 + 4 + 40 + 20;

/// Everything one RST frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RstSpec {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub vlan: Option<u16>,
    pub src: Addr,
    pub dst: Addr,
    pub src_port: u16,
    pub dst_port: u16,
    /// Must equal the receiver's RCV.NXT exactly (RFC 5961).
    pub seq: u32,
    /// When `Some`, the ACK flag is set with this acknowledgement number.
    pub ack: Option<u32>,
}

/// Writes a complete RST frame (valid IPv4 header checksum and TCP checksum, TTL/hop limit 64,
/// window 0, no options) into `buf` and returns its length. Returns `None` when `buf` is
/// shorter than the frame or when `src` and `dst` are of different families.
pub fn build_tcp_rst(buf: &mut [u8], spec: &RstSpec) -> Option<usize> {
    let _ = (buf, spec);
    todo!("wire helper")
}

/// Turns a received TCP segment (parsed as `pkt`) into the RST that answers it (RFC 9293
/// §3.10.7.1: if the segment has ACK, `seq = SEG.ACK` and flags RST; otherwise `seq = 0`,
/// `ack = SEG.SEQ + SEG.LEN` (SYN and FIN count) and flags RST|ACK), swapping MACs, addresses and
/// ports, dropping the payload. Returns the new frame length (never longer than the input).
pub fn reply_rst_in_place(frame: &mut [u8], pkt: &Packet) -> usize {
    let _ = (frame, pkt);
    todo!("wire helper")
}
