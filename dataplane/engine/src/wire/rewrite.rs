//! In-place NAT rewrite of addresses and ports with incremental checksum updates.

use crate::addr::Addr;
use crate::wire::parse::Packet;

/// The new values for a packet's addresses and ports. A `None` field is left as it is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rewrite {
    pub src: Option<Addr>,
    pub src_port: Option<u16>,
    pub dst: Option<Addr>,
    pub dst_port: Option<u16>,
}

/// Rewrites `frame` (already parsed into `pkt`) in place: addresses, ports, the IPv4 header
/// checksum and the L4 checksum (incremental for `Full`, completed for `Partial`, untouched
/// for `Absent`). New addresses must be of the packet's family.
pub fn rewrite(frame: &mut [u8], pkt: &Packet, rw: &Rewrite) {
    let _ = (frame, pkt, rw);
    todo!("wire helper")
}

/// Decrements the IPv4 TTL (with an incremental header checksum update) or the IPv6 hop
/// limit. Returns false (and leaves the frame unchanged) when the hop limit is <= 1.
pub fn decrement_hop_limit(frame: &mut [u8], pkt: &Packet) -> bool {
    let _ = (frame, pkt);
    todo!("wire helper")
}
