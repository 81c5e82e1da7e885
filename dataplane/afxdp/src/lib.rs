//! xlb's platform crate: with the benchmark tools' `xlb-bench`, the only one allowed `unsafe`.
//!
//! - [`xdp`]: the XDP program (`src/bpf/xlb.bpf.c`) — load, attach (native, falling back
//!   to generic), owned/local address map, XSKMAP, counters.
//! - [`worker`]: AF_XDP sockets and UMEM through xsk-rs, and the loop that drives a
//!   [`FrameHandler`] (xlbd's engine; the benchmark tools of `xlb-bench` drive it too).
//! - [`netlink`]: links, addresses, neighbours and routes of the current namespace.
//! - [`pinned`]: state that outlives xlbd in bpffs (flow stores, XDP links).
//! - [`sys`]: the few libc calls other crates need, wrapped safe.
//! - [`csum`]: Internet checksums, completing partial TCP/UDP checksums.
//! - [`fast`]: the XDP fast path's table, egress devmap and counters.
//! - [`grace`]: the fast path's grace periods (`membarrier`), for reusing unpublished lines.
//! - [`huge`]: huge pages for the engines' tables (THP advice) and how much the kernel gives.
//!
//! The benchmark tools (generator, sink, bare forwarder) and their XDP programs live in the
//! `xlb-bench` crate; [`xdp::xdp_attach`], [`xdp::owned_prog_fd`] and [`xdp::map_handle`] are
//! public for their loaders.
//!
//! See README.md for the design choices.

/// `mod skel`: the libbpf-cargo skeleton `$file` that build.rs generated from one of
/// `src/bpf/*.bpf.c`. Generated code, the one place exempt from the crate's lints.
macro_rules! bpf_skeleton {
    ($file:literal) => {
        #[allow(
            clippy::all,
            clippy::pedantic,
            clippy::undocumented_unsafe_blocks,
            clippy::multiple_unsafe_ops_per_block,
            missing_docs,
            missing_debug_implementations,
            unsafe_op_in_unsafe_fn,
            unused_imports
        )]
        mod skel {
            include!(concat!(env!("OUT_DIR"), "/", $file));
        }
    };
}

pub mod csum;
mod error;
pub mod fast;
pub mod grace;
pub mod handler;
pub mod huge;
pub mod netlink;
pub mod pinned;
pub mod sys;
pub mod umem;
pub mod worker;
pub mod xdp;

pub use error::{Error, Result};
pub use fast::{FastRuleCount, FastStats, XdpFastControl};
pub use grace::GraceService;
pub use handler::{FrameHandler, PortId, Verdict};
pub use worker::{
    spawn, BindMode, PollMode, PortStats, UmemSharing, Worker, WorkerConfig, WorkerExit,
    WorkerStats,
};
pub use xdp::{AddrKind, AttachMode, ModeRequest, XdpAddrTable, XdpCounters, XdpProgram};
