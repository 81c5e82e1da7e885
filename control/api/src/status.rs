//! [`ControlError`] → gRPC status, and back for clients.
//!
//! `INVALID_ARGUMENT` carries the violations twice in `grpc-status-details-bin` (a
//! `google.rpc.Status`): as a standard `google.rpc.BadRequest`, which generic tools know, and
//! as `xlb.v1.ValidationFailure`, which keeps path, value, allowed range and message apart so
//! that `xlbctl` can print `error: <field> = <value>: <message> (allowed: <range>)`.

use prost::Message;
use tonic::codegen::Bytes;
use tonic::{Code, Status};
use xlb_engine::ValidationErrors;
use xlb_proto::v1 as pb;

use crate::state::ControlError;
use crate::telemetry::TelemetryError;

/// `google.rpc.Status`, the payload of `grpc-status-details-bin`.
#[derive(Clone, PartialEq, Message)]
pub struct RpcStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
    #[prost(message, repeated, tag = "3")]
    pub details: Vec<prost_types::Any>,
}

/// `google.rpc.BadRequest`.
#[derive(Clone, PartialEq, Message)]
pub struct BadRequest {
    #[prost(message, repeated, tag = "1")]
    pub field_violations: Vec<BadRequestFieldViolation>,
}

/// `google.rpc.BadRequest.FieldViolation`.
#[derive(Clone, PartialEq, Message)]
pub struct BadRequestFieldViolation {
    #[prost(string, tag = "1")]
    pub field: String,
    #[prost(string, tag = "2")]
    pub description: String,
}

const BAD_REQUEST_URL: &str = "type.googleapis.com/google.rpc.BadRequest";
const VALIDATION_URL: &str = "type.googleapis.com/xlb.v1.ValidationFailure";
/// Status message and details travel in HTTP/2 headers (the details base64-encoded); keep
/// them well under the usual 16 KiB header-list limit however many errors a request has.
const MAX_VIOLATIONS: usize = 40;
const MAX_MESSAGE: usize = 4096;

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// The status of an invalid request.
pub fn invalid_argument(errors: &ValidationErrors) -> Status {
    let shown = &errors.0[..errors.0.len().min(MAX_VIOLATIONS)];
    let failure = pb::ValidationFailure {
        violations: shown
            .iter()
            .map(|e| pb::FieldViolation {
                path: e.path.clone(),
                value: e.value.clone(),
                allowed: e.allowed.clone(),
                message: e.message.clone(),
            })
            .collect(),
    };
    let bad = BadRequest {
        field_violations: shown
            .iter()
            .map(|e| BadRequestFieldViolation {
                field: e.path.clone(),
                description: format!("{}: {} (allowed: {})", e.value, e.message, e.allowed),
            })
            .collect(),
    };
    let message = truncate(errors.to_string(), MAX_MESSAGE);
    let details = RpcStatus {
        code: Code::InvalidArgument as i32,
        message: message.clone(),
        details: vec![
            prost_types::Any {
                type_url: BAD_REQUEST_URL.into(),
                value: bad.encode_to_vec(),
            },
            prost_types::Any {
                type_url: VALIDATION_URL.into(),
                value: failure.encode_to_vec(),
            },
        ],
    };
    Status::with_details(
        Code::InvalidArgument,
        message,
        Bytes::from(details.encode_to_vec()),
    )
}

/// The status of a refused request.
pub fn to_status(e: ControlError) -> Status {
    let code = match &e {
        ControlError::InvalidArgument(errors) => return invalid_argument(errors),
        ControlError::NotFound { .. } => Code::NotFound,
        ControlError::AlreadyExists { .. } => Code::AlreadyExists,
        ControlError::InUse { .. } => Code::FailedPrecondition,
        ControlError::DeadlineExceeded(_) => Code::DeadlineExceeded,
        ControlError::Unavailable(_) => Code::Unavailable,
    };
    Status::new(code, truncate(e.to_string(), MAX_MESSAGE))
}

impl From<ControlError> for Status {
    fn from(e: ControlError) -> Status {
        to_status(e)
    }
}

impl From<TelemetryError> for Status {
    fn from(e: TelemetryError) -> Status {
        Status::unavailable(format!("cannot read from the workers: {}", e.0))
    }
}

/// Client side: the violations of an `INVALID_ARGUMENT` status, if it carries them.
pub fn validation_failure(status: &Status) -> Option<pb::ValidationFailure> {
    let rpc = RpcStatus::decode(status.details()).ok()?;
    rpc.details
        .iter()
        .find(|a| a.type_url == VALIDATION_URL)
        .and_then(|a| pb::ValidationFailure::decode(a.value.as_slice()).ok())
}

/// A request-level problem (bad filter, bad page token) as a single violation.
pub fn bad_field(
    path: &str,
    value: impl std::fmt::Display,
    allowed: &str,
    message: &str,
) -> Status {
    invalid_argument(&ValidationErrors(vec![xlb_engine::ValidationError {
        path: path.to_string(),
        value: value.to_string(),
        allowed: allowed.to_string(),
        message: message.to_string(),
    }]))
}
