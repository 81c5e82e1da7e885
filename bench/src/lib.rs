//! xlb's benchmark tools, apart from the product: the packet generator (`BPF_PROG_RUN` live
//! frames, [`gen`], `src/bpf/gen.bpf.c`), the receiving side's XDP counter ([`sink`],
//! `src/bpf/sink.bpf.c`) and the bare AF_XDP forwarder ([`bare`]) that `scripts/bench` runs
//! around the appliance; [`cli`] is the `main` their binaries share.
//!
//! A platform tool crate: like `xlb-afxdp` it may hold `unsafe` (BPF syscalls), each block
//! with a `// SAFETY:` line. See README.md.

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

pub mod bare;
pub mod cli;
pub mod gen;
pub mod sink;
