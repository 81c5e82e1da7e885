//! Target: the gRPC API's conversion of protobuf messages into the configuration model.
//!
//! Input: one selector byte (which message), then the message's protobuf bytes, decoded with
//! prost as the server does.
//!
//! Invariants:
//! - decoding and converting any bytes never panics; a refused message names its fields;
//! - a converted value converts back to proto and again to an equal value (the server answers
//!   with what it stored);
//! - a whole configuration that converts and validates compiles and round-trips (the checks of
//!   the TOML target).

use prost::Message;
use xlb_api::convert;
use xlb_engine::ValidationErrors;
use xlb_proto::v1 as pb;

use crate::targets::config_toml;

/// Runs one input. Panics when an invariant breaks.
pub fn run(data: &[u8]) {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    match selector % 8 {
        0 => {
            let Ok(m) = pb::Config::decode(bytes) else {
                return;
            };
            if let Some(config) = refused_or(convert::config_from(m)) {
                let again = convert::config_from(convert::config_to(&config, 1))
                    .expect("a converted configuration converts back");
                assert_eq!(again, config);
                if config.validate().is_ok() {
                    config_toml::check_valid(&config, bytes);
                }
            }
        }
        1 => round_trip::<pb::Frontend, _>(bytes, convert::frontend_from, convert::frontend_to),
        2 => round_trip::<pb::BackendPool, _>(bytes, convert::pool_from, convert::pool_to),
        3 => round_trip::<pb::LoadBalancingRule, _>(
            bytes,
            convert::lb_rule_from,
            convert::lb_rule_to,
        ),
        4 => {
            round_trip::<pb::InboundNatRule, _>(bytes, convert::nat_rule_from, convert::nat_rule_to)
        }
        5 => round_trip::<pb::OutboundRule, _>(
            bytes,
            convert::outbound_rule_from,
            convert::outbound_rule_to,
        ),
        6 => round_trip::<pb::HealthProbe, _>(bytes, convert::probe_from, convert::probe_to),
        _ => {
            let Ok(m) = pb::Settings::decode(bytes) else {
                return;
            };
            let s = convert::settings_from(m);
            assert_eq!(convert::settings_from(convert::settings_to(&s)), s);
        }
    }
}

fn refused_or<T>(r: Result<T, ValidationErrors>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            assert!(!e.is_empty(), "refused without a reason");
            for err in e.iter() {
                assert!(
                    !err.path.is_empty(),
                    "an error that names no field: {err:?}"
                );
            }
            let _ = e.to_string();
            None
        }
    }
}

fn round_trip<M, T>(bytes: &[u8], from: fn(M) -> Result<T, ValidationErrors>, to: fn(&T) -> M)
where
    M: Message + Default,
    T: PartialEq + std::fmt::Debug,
{
    let Ok(m) = M::decode(bytes) else {
        return;
    };
    if let Some(v) = refused_or(from(m)) {
        let again = from(to(&v)).expect("a converted value converts back");
        assert_eq!(again, v, "proto round trip changed the value");
    }
}
