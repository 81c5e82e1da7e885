//! libFuzzer driver of the `engine_session` target (see xlb_fuzz::targets::engine_session).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| xlb_fuzz::targets::engine_session::run(data));
