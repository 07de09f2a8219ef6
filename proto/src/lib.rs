//! ult's gRPC API (`ult.v1`): the generated tonic client and server, and the file descriptor set that
//! server reflection serves.
#![allow(missing_docs, clippy::all)]

pub mod codec;

/// The `ult.v1` package: messages, the `Ult` client and the `Ult` server trait.
pub mod v1 {
    tonic::include_proto!("ult.v1");
}

/// The encoded `FileDescriptorSet` of every ult proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ult_descriptor");
