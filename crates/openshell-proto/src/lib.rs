//! Generated code for the protocol files under `proto/`.
//!
//! This crate holds no logic: messages come from prost, clients and servers
//! from tonic. The compiled descriptor set is exported so tests and tools can
//! inspect the contract (field numbers, types, reserved ranges) at run time.

/// The compute-driver contract, package `openshell.compute.v1`.
#[allow(
    unused_qualifications,
    clippy::all,
    clippy::pedantic,
    rust_2018_idioms,
    reason = "generated code: which of these fire depends on the protocol files"
)]
pub mod compute {
    pub mod v1 {
        tonic::include_proto!("openshell.compute.v1");
    }

    /// The optional log service, package `openshell.compute.logs.v1`.
    pub mod logs {
        pub mod v1 {
            tonic::include_proto!("openshell.compute.logs.v1");
        }
    }
}

/// Negotiation metadata of the 1.x compute contract, package
/// `openshell.extension.v1`.
#[allow(
    unused_qualifications,
    clippy::all,
    clippy::pedantic,
    rust_2018_idioms,
    reason = "generated code: which of these fire depends on the protocol files"
)]
pub mod extension {
    pub mod v1 {
        tonic::include_proto!("openshell.extension.v1");
    }
}

/// The (opaque here) sandbox policy of the 1.x contract, package
/// `openshell.sandbox.v1`.
#[allow(
    unused_qualifications,
    clippy::all,
    clippy::pedantic,
    rust_2018_idioms,
    reason = "generated code: which of these fire depends on the protocol files"
)]
pub mod sandbox {
    pub mod v1 {
        tonic::include_proto!("openshell.sandbox.v1");
    }
}

/// The gateway's public API, package `openshell.gateway.v1`.
#[allow(
    unused_qualifications,
    clippy::all,
    clippy::pedantic,
    rust_2018_idioms,
    reason = "generated code: which of these fire depends on the protocol files"
)]
pub mod gateway {
    pub mod v1 {
        tonic::include_proto!("openshell.gateway.v1");
    }
}

/// Descriptor options, package `openshell.options.v1`.
#[allow(
    unused_qualifications,
    clippy::all,
    clippy::pedantic,
    rust_2018_idioms,
    reason = "generated code: which of these fire depends on the protocol files"
)]
pub mod options {
    pub mod v1 {
        tonic::include_proto!("openshell.options.v1");
    }
}

/// The encoded `FileDescriptorSet` of every compiled `.proto` file, including
/// the well-known types they import.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/descriptor_set.bin"));
