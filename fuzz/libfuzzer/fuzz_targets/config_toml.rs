//! libFuzzer driver of the `config_toml` target (see xlb_fuzz::targets::config_toml).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| xlb_fuzz::targets::config_toml::run(data));
