//! Compiles xlbd's XDP program, `src/bpf/xlb.bpf.c`, and generates its libbpf-rs skeleton
//! into `OUT_DIR`. (The benchmark tools' programs are built by the `xlb-bench` crate.)

use std::{env, path::PathBuf};

use libbpf_cargo::SkeletonBuilder;

/// (source, skeleton file, extra clang flags)
/// `-mcpu=v3`: the fast path's 32-bit compare-and-swap needs BPF ISA v3 (clang's default,
/// `generic`, only has 64-bit atomics).
const PROGRAMS: [(&str, &str, &[&str]); 1] = [("src/bpf/xlb.bpf.c", "xlb.skel.rs", &["-mcpu=v3"])];

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let arch = env::var("CARGO_CFG_TARGET_ARCH").expect("CARGO_CFG_TARGET_ARCH is set by cargo");
    // Debian keeps <asm/types.h> under the multiarch directory, which clang's BPF target
    // does not search by itself.
    let multiarch = match arch.as_str() {
        "x86_64" => "x86_64-linux-gnu",
        "aarch64" => "aarch64-linux-gnu",
        other => other,
    };
    for (src, skel, extra) in PROGRAMS {
        let mut args = vec![
            format!("-I/usr/include/{multiarch}"),
            "-O2".to_string(),
            "-g".to_string(),
            "-Wall".to_string(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        SkeletonBuilder::new()
            .source(src)
            .clang_args(args)
            .build_and_generate(out.join(skel))
            .unwrap_or_else(|e| panic!("building {src} failed (needs clang and libelf): {e:#}"));
        println!("cargo:rerun-if-changed={src}");
    }
    // The header xlb.bpf.c includes.
    println!("cargo:rerun-if-changed=src/bpf/xlb_fast.h");
}
