//! xlb's gRPC API (`proto/xlb.proto`, package `xlb.v1`): messages, the `Xlb` service's
//! tonic client and server, and the file descriptor set for gRPC reflection.
//!
//! The messages mirror `xlb_engine::config` field for field; `xlb-api` converts between the
//! two and holds the service implementation.
#![forbid(unsafe_code)]
// Generated code: its items carry the proto comments, not Rust docs of our choosing.
#![allow(missing_debug_implementations, clippy::all)]

pub mod v1 {
    tonic::include_proto!("xlb.v1");

    /// Encoded `FileDescriptorSet` of `xlb.proto`, for `tonic-reflection`.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/xlb_descriptor.bin"));
}
