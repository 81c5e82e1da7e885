//! libFuzzer driver of the `api_config` target (see xlb_fuzz::targets::api_config).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| xlb_fuzz::targets::api_config::run(data));
