//! Generated protobuf and gRPC code for `denoised.v1`.
//!
//! The `.proto` source lives in `proto/denoised/v1/denoised.proto`; other languages generate
//! their clients from the same file (or discover it through server reflection).
#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("denoised.v1");
}

/// Encoded `FileDescriptorSet` of the API, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("denoised_descriptor");
