//! xlb's fuzz harnesses.
//!
//! Four targets ([`targets::ALL`]), each a function from arbitrary bytes that panics only when
//! an invariant of xlb breaks. The same functions run in two drivers:
//! - coverage-guided, under libFuzzer, from `fuzz/libfuzzer` (`scripts/fuzz`);
//! - bounded and deterministic, in the test suite: the seed corpus in `fuzz/corpus` plus a fixed
//!   number of seeded mutations of it ([`mutate`]), so every `cargo test` run fuzzes a little
//!   and needs no fuzzer.
//!
//! See `docs/reliability.md` for the threat model and the figures.

pub mod frames;
pub mod input;
pub mod lab;
pub mod mutate;
pub mod seeds;
pub mod targets;
pub mod verify;
