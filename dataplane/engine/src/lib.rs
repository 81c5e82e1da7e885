//! xlb's pure packet engine.
//!
//! Everything SPEC.md §1–§4 asks of the data plane, with no I/O: frames in, frames out, and
//! `now` passed in by the caller. See `docs/architecture.md`.
#![forbid(unsafe_code)]

pub mod addr;
pub mod config;
pub mod ruleset;
pub mod time;
pub mod wire;

pub use addr::Addr;
pub use ruleset::{RuleId, RuleSet};
