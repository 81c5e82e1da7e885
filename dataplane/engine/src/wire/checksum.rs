//! Internet checksums: full computation (the reference), RFC 1624 incremental updates, and
//! completion of partial (offloaded) checksums.

/// How the L4 checksum field of a received packet stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4Checksum {
    /// A complete checksum (valid or not): update it incrementally, never "fix" it.
    Full,
    /// The field holds only the folded pseudo-header sum: the sender's stack left the rest to
    /// the NIC (CHECKSUM_PARTIAL on veth). The engine must complete it before transmit.
    Partial,
    /// UDP over IPv4 with checksum 0: no checksum; leave it 0.
    Absent,
}
