//! Wire formats: parsing untrusted frames into a [`Packet`] (offsets + the fields the engine
//! needs), in-place NAT rewrites with incremental checksums, and building TCP RSTs.
//!
//! OWNER: wire helper. Contract used by the engine (do not change signatures without updating
//! `engine.rs`):
//! - [`parse`] never panics; every malformed input maps to one [`ParseError`] variant.
//! - [`rewrite`] rewrites addresses / ports in place and keeps every checksum consistent.
//! - `build` builds RST frames into caller buffers without heap allocation.

pub mod build;
pub mod checksum;
pub mod parse;

pub use build::{build_tcp_rst, reply_rst_in_place, RstSpec, MAX_RST_FRAME};
pub use checksum::L4Checksum;
pub use parse::{parse, Packet, ParseError};
pub use rewrite::{decrement_hop_limit, rewrite, Rewrite};

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
