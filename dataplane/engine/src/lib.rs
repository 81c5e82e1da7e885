//! xlb's pure packet engine.
//!
//! Everything xlb promises of the data plane (docs/behaviour.md), with no I/O: frames in, frames out, and
//! `now` passed in by the caller. See `docs/architecture.md`.
#![forbid(unsafe_code)]

pub mod addr;
pub mod addr_ids;
pub mod admission;
pub mod config;
pub mod counters;
pub mod drain;
pub mod engine;
pub mod fast;
pub mod fast_new;
pub mod flow;
pub mod hashkey;
pub mod late;
pub mod memory;
pub mod natlog;
pub mod net;
pub mod ratelimit;
pub mod ruleset;
pub mod select;
pub mod snat;
pub mod store;
pub mod tcp;
pub mod terms;
pub mod time;
pub mod timer;
pub mod wire;

pub use addr::Addr;
pub use config::{
    compile, compile_releasing, Config, MemberHealth, ValidationError, ValidationErrors,
};
pub use counters::{Counters, DropReason, RuleCounters};
pub use engine::{
    Engine, EngineConfig, Event, FlowInfo, FlowState, Imported, Lookahead, SyncReason, Verdict,
};
pub use fast::{FastLayout, FastTable, GraceClock};
pub use memory::MemoryRegion;
pub use net::{Mac, NextHop, PortId, Route};
pub use ruleset::{RuleId, RuleSet};
pub use store::{StoreMemory, StoreOutcome, StoreReport};
