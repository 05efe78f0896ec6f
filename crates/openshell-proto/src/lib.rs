//! Generated code for the protocol files under `proto/`.
//!
//! This crate holds no logic: messages come from prost, clients and servers
//! from tonic. The compiled descriptor set is exported so tests and tools can
//! inspect the contract (field numbers, types, reserved ranges) at run time.

/// A module holding the generated code of one protobuf package. Which lints
/// generated code trips depends on the protocol files, so they are allowed
/// rather than expected.
macro_rules! generated {
    ($(#[$doc:meta])* $name:ident => $package:literal) => {
        $(#[$doc])*
        #[allow(
            unused_qualifications,
            clippy::all,
            clippy::pedantic,
            rust_2018_idioms,
            reason = "generated code: which of these fire depends on the protocol files"
        )]
        pub mod $name {
            tonic::include_proto!($package);
        }
    };
}

/// The compute-driver contract (both generations), package
/// `openshell.compute.v1`, and its optional log service.
pub mod compute {
    generated!(v1 => "openshell.compute.v1");

    /// The optional log service, package `openshell.compute.logs.v1`.
    pub mod logs {
        generated!(v1 => "openshell.compute.logs.v1");
    }
}

/// Negotiation metadata of the 1.x compute contract, package
/// `openshell.extension.v1`.
pub mod extension {
    generated!(v1 => "openshell.extension.v1");
}

/// The (opaque here) sandbox policy of the 1.x contract, package
/// `openshell.sandbox.v1`.
pub mod sandbox {
    generated!(v1 => "openshell.sandbox.v1");
}

/// The gateway's public API, package `openshell.gateway.v1`.
pub mod gateway {
    generated!(v1 => "openshell.gateway.v1");
}

/// Descriptor options, package `openshell.options.v1`.
pub mod options {
    generated!(v1 => "openshell.options.v1");
}

/// The encoded `FileDescriptorSet` of every compiled `.proto` file, including
/// the well-known types they import.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/descriptor_set.bin"));
