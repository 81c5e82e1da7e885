//! The fuzz targets: each `run` takes any bytes, never fails on bad input, and panics only
//! when an invariant of xlb breaks.

pub mod api_config;
pub mod config_toml;
pub mod engine_session;
pub mod wire_parse;

/// A target's name and entry point.
pub type Target = (&'static str, fn(&[u8]));

/// Every target, by the name its corpus directory and fuzz binary carry.
pub const ALL: [Target; 4] = [
    ("wire_parse", wire_parse::run),
    ("engine_session", engine_session::run),
    ("config_toml", config_toml::run),
    ("api_config", api_config::run),
];
