//! libFuzzer driver of the `wire_parse` target (see xlb_fuzz::targets::wire_parse).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| xlb_fuzz::targets::wire_parse::run(data));
