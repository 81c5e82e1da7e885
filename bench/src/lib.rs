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
pub mod redirect;
pub mod rss;
pub mod sink;

use std::net::IpAddr;

/// Whether `addr` lies in the ranges test hosts use: 198.18.0.0/15 (RFC 2544's benchmarking
/// range) or 2001:db8::/32 (documentation). The tools address nothing else.
pub fn is_bench_ip(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => {
            let o = a.octets();
            o[0] == 198 && (o[1] & 0xfe) == 18
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            s[0] == 0x2001 && s[1] == 0x0db8
        }
    }
}

/// A BPF program's run statistics, (run_time_ns, run_cnt), from the fdinfo of its fd in this
/// process; both stay 0 unless `kernel.bpf_stats_enabled` is 1. `None` if unreadable.
pub fn prog_run_stats(fd: std::os::fd::BorrowedFd<'_>) -> Option<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    parse_run_stats(&text)
}

/// (run_time_ns, run_cnt) of a BPF program's fdinfo text.
pub fn parse_run_stats(fdinfo: &str) -> Option<(u64, u64)> {
    let field = |name: &str| -> Option<u64> {
        fdinfo
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
    };
    Some((field("run_time_ns:")?, field("run_cnt:")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_run_stats() {
        let t = "pos:\t0\nflags:\t02000002\nprog_type:\t6\nprog_jited:\t1\nrun_time_ns:\t1234\nrun_cnt:\t5\n";
        assert_eq!(parse_run_stats(t), Some((1234, 5)));
        assert_eq!(parse_run_stats("prog_type:\t6\n"), None);
    }

    #[test]
    fn benchmark_ranges() {
        for ok in [
            "198.18.0.1",
            "198.19.255.255",
            "2001:db8::1",
            "2001:db8:ffff::",
        ] {
            assert!(is_bench_ip(ok.parse().unwrap()), "{ok}");
        }
        for no in [
            "198.17.255.255",
            "198.20.0.0",
            "10.0.0.1",
            "2001:db9::1",
            "::1",
            "::ffff:198.18.0.1",
        ] {
            assert!(!is_bench_ip(no.parse().unwrap()), "{no}");
        }
    }
}
