//! Compiles `src/bpf/xlb.bpf.c` and generates its libbpf-rs skeleton into `OUT_DIR`.

use std::{env, path::PathBuf};

use libbpf_cargo::SkeletonBuilder;

const SRC: &str = "src/bpf/xlb.bpf.c";

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
    SkeletonBuilder::new()
        .source(SRC)
        .clang_args([
            format!("-I/usr/include/{multiarch}"),
            "-O2".to_string(),
            "-g".to_string(),
            "-Wall".to_string(),
        ])
        .build_and_generate(out.join("xlb.skel.rs"))
        .unwrap_or_else(|e| panic!("building {SRC} failed (needs clang and libelf): {e:#}"));
    println!("cargo:rerun-if-changed={SRC}");
}
