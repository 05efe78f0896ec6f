//! Pins the compiled compute-driver contract to the upstream v0.0.111 wire
//! layout. Every (message, field, number, label, type) tuple is listed below;
//! a renumbered, retyped, added or removed field fails this test.

use std::collections::{BTreeMap, BTreeSet};

use prost::Message as _;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FileDescriptorProto, FileDescriptorSet};

use Label::{Optional, Repeated};
use Type::{Bool, Int64, Message, String, Uint32};

const PACKAGE: &str = "openshell.compute.v1";

/// (message, field, number, label, type, type name suffix, oneof)
/// Nested map-entry messages are written `Outer.InnerEntry`.
#[rustfmt::skip]
const FIELDS: &[(&str, &str, i32, Label, Type, &str, &str)] = &[
    ("CreateSandboxRequest", "sandbox", 1, Optional, Message, "DriverSandbox", ""),
    ("DeleteSandboxRequest", "sandbox_id", 1, Optional, String, "", ""),
    ("DeleteSandboxRequest", "sandbox_name", 2, Optional, String, "", ""),
    ("DeleteSandboxResponse", "deleted", 1, Optional, Bool, "", ""),
    ("DeleteWorkspaceRequest", "workspace", 1, Optional, String, "", ""),
    ("DriverCondition", "last_transition_time", 5, Optional, String, "", ""),
    ("DriverCondition", "message", 4, Optional, String, "", ""),
    ("DriverCondition", "reason", 3, Optional, String, "", ""),
    ("DriverCondition", "status", 2, Optional, String, "", ""),
    ("DriverCondition", "type", 1, Optional, String, "", ""),
    ("DriverPlatformEvent", "message", 5, Optional, String, "", ""),
    ("DriverPlatformEvent", "metadata", 6, Repeated, Message, "MetadataEntry", ""),
    ("DriverPlatformEvent", "reason", 4, Optional, String, "", ""),
    ("DriverPlatformEvent", "source", 2, Optional, String, "", ""),
    ("DriverPlatformEvent", "timestamp_ms", 1, Optional, Int64, "", ""),
    ("DriverPlatformEvent", "type", 3, Optional, String, "", ""),
    ("DriverPlatformEvent.MetadataEntry", "key", 1, Optional, String, "", ""),
    ("DriverPlatformEvent.MetadataEntry", "value", 2, Optional, String, "", ""),
    ("DriverResourceRequirements", "cpu_limit", 2, Optional, String, "", ""),
    ("DriverResourceRequirements", "cpu_request", 1, Optional, String, "", ""),
    ("DriverResourceRequirements", "memory_limit", 4, Optional, String, "", ""),
    ("DriverResourceRequirements", "memory_request", 3, Optional, String, "", ""),
    ("DriverSandbox", "id", 1, Optional, String, "", ""),
    ("DriverSandbox", "name", 2, Optional, String, "", ""),
    ("DriverSandbox", "namespace", 3, Optional, String, "", ""),
    ("DriverSandbox", "spec", 4, Optional, Message, "DriverSandboxSpec", ""),
    ("DriverSandbox", "status", 5, Optional, Message, "DriverSandboxStatus", ""),
    ("DriverSandbox", "workspace", 6, Optional, String, "", ""),
    ("DriverSandboxSpec", "command", 12, Repeated, String, "", ""),
    ("DriverSandboxSpec", "environment", 5, Repeated, Message, "EnvironmentEntry", ""),
    ("DriverSandboxSpec", "log_level", 1, Optional, String, "", ""),
    ("DriverSandboxSpec", "resource_requirements", 9, Optional, Message, "ResourceRequirements", ""),
    ("DriverSandboxSpec", "sandbox_token", 11, Optional, String, "", ""),
    ("DriverSandboxSpec", "template", 6, Optional, Message, "DriverSandboxTemplate", ""),
    ("DriverSandboxSpec", "tty", 13, Optional, Bool, "", ""),
    ("DriverSandboxSpec.EnvironmentEntry", "key", 1, Optional, String, "", ""),
    ("DriverSandboxSpec.EnvironmentEntry", "value", 2, Optional, String, "", ""),
    ("DriverSandboxStatus", "agent_fd", 3, Optional, String, "", ""),
    ("DriverSandboxStatus", "conditions", 5, Repeated, Message, "DriverCondition", ""),
    ("DriverSandboxStatus", "deleting", 6, Optional, Bool, "", ""),
    ("DriverSandboxStatus", "instance_id", 2, Optional, String, "", ""),
    ("DriverSandboxStatus", "sandbox_fd", 4, Optional, String, "", ""),
    ("DriverSandboxStatus", "sandbox_name", 1, Optional, String, "", ""),
    ("DriverSandboxTemplate", "agent_socket_path", 3, Optional, String, "", ""),
    ("DriverSandboxTemplate", "driver_config", 12, Optional, Message, "Struct", ""),
    ("DriverSandboxTemplate", "environment", 6, Repeated, Message, "EnvironmentEntry", ""),
    ("DriverSandboxTemplate", "image", 1, Optional, String, "", ""),
    ("DriverSandboxTemplate", "labels", 4, Repeated, Message, "LabelsEntry", ""),
    ("DriverSandboxTemplate", "platform_config", 11, Optional, Message, "Struct", ""),
    ("DriverSandboxTemplate", "resources", 10, Optional, Message, "DriverResourceRequirements", ""),
    ("DriverSandboxTemplate.EnvironmentEntry", "key", 1, Optional, String, "", ""),
    ("DriverSandboxTemplate.EnvironmentEntry", "value", 2, Optional, String, "", ""),
    ("DriverSandboxTemplate.LabelsEntry", "key", 1, Optional, String, "", ""),
    ("DriverSandboxTemplate.LabelsEntry", "value", 2, Optional, String, "", ""),
    ("EnsureWorkspaceRequest", "workspace", 1, Optional, String, "", ""),
    ("GatewayListenerRequirement", "default_route_interface", 3, Optional, Message, "GatewayDefaultRouteInterfaceRequirement", "selector"),
    ("GatewayListenerRequirement", "exact_bind_address", 2, Optional, String, "", "selector"),
    ("GatewayListenerRequirement", "loopback_interface", 4, Optional, Message, "GatewayLoopbackInterfaceRequirement", "selector"),
    ("GatewayListenerRequirement", "reason", 1, Optional, String, "", ""),
    ("GetCapabilitiesResponse", "default_image", 3, Optional, String, "", ""),
    ("GetCapabilitiesResponse", "driver_name", 1, Optional, String, "", ""),
    ("GetCapabilitiesResponse", "driver_version", 2, Optional, String, "", ""),
    ("GetCapabilitiesResponse", "gateway_manages_lifecycle", 6, Optional, Bool, "", ""),
    ("GetGatewayListenerRequirementsResponse", "requirements", 1, Repeated, Message, "GatewayListenerRequirement", ""),
    ("GetSandboxRequest", "sandbox_id", 1, Optional, String, "", ""),
    ("GetSandboxRequest", "sandbox_name", 2, Optional, String, "", ""),
    ("GetSandboxResponse", "sandbox", 1, Optional, Message, "DriverSandbox", ""),
    ("GpuResourceRequirements", "count", 1, Optional, Uint32, "", ""),
    ("ListSandboxesResponse", "sandboxes", 1, Repeated, Message, "DriverSandbox", ""),
    ("ResourceRequirements", "gpu", 1, Optional, Message, "GpuResourceRequirements", ""),
    ("StartSandboxRequest", "sandbox_id", 1, Optional, String, "", ""),
    ("StartSandboxRequest", "sandbox_name", 2, Optional, String, "", ""),
    ("StopSandboxRequest", "sandbox_id", 1, Optional, String, "", ""),
    ("StopSandboxRequest", "sandbox_name", 2, Optional, String, "", ""),
    ("ValidateSandboxCreateRequest", "sandbox", 1, Optional, Message, "DriverSandbox", ""),
    ("WatchSandboxesDeletedEvent", "sandbox_id", 1, Optional, String, "", ""),
    ("WatchSandboxesEvent", "deleted", 2, Optional, Message, "WatchSandboxesDeletedEvent", "payload"),
    ("WatchSandboxesEvent", "platform_event", 3, Optional, Message, "WatchSandboxesPlatformEvent", "payload"),
    ("WatchSandboxesEvent", "sandbox", 1, Optional, Message, "WatchSandboxesSandboxEvent", "payload"),
    ("WatchSandboxesPlatformEvent", "event", 2, Optional, Message, "DriverPlatformEvent", ""),
    ("WatchSandboxesPlatformEvent", "sandbox_id", 1, Optional, String, "", ""),
    ("WatchSandboxesSandboxEvent", "sandbox", 1, Optional, Message, "DriverSandbox", ""),
];

/// (rpc, request, response, server streaming), in no particular order.
#[rustfmt::skip]
const RPCS: &[(&str, &str, &str, bool)] = &[
    ("CreateSandbox", "CreateSandboxRequest", "CreateSandboxResponse", false),
    ("DeleteSandbox", "DeleteSandboxRequest", "DeleteSandboxResponse", false),
    ("DeleteWorkspace", "DeleteWorkspaceRequest", "DeleteWorkspaceResponse", false),
    ("EnsureWorkspace", "EnsureWorkspaceRequest", "EnsureWorkspaceResponse", false),
    ("GetCapabilities", "GetCapabilitiesRequest", "GetCapabilitiesResponse", false),
    ("GetGatewayListenerRequirements", "GetGatewayListenerRequirementsRequest", "GetGatewayListenerRequirementsResponse", false),
    ("GetSandbox", "GetSandboxRequest", "GetSandboxResponse", false),
    ("ListSandboxes", "ListSandboxesRequest", "ListSandboxesResponse", false),
    ("StartSandbox", "StartSandboxRequest", "StartSandboxResponse", false),
    ("StopSandbox", "StopSandboxRequest", "StopSandboxResponse", false),
    ("ValidateSandboxCreate", "ValidateSandboxCreateRequest", "ValidateSandboxCreateResponse", false),
    ("WatchSandboxes", "WatchSandboxesRequest", "WatchSandboxesEvent", true),
];

/// Messages with no fields; they must exist and stay empty.
const EMPTY_MESSAGES: &[&str] = &[
    "GetCapabilitiesRequest",
    "GetGatewayListenerRequirementsRequest",
    "GatewayDefaultRouteInterfaceRequirement",
    "GatewayLoopbackInterfaceRequirement",
    "ValidateSandboxCreateResponse",
    "ListSandboxesRequest",
    "CreateSandboxResponse",
    "StopSandboxResponse",
    "StartSandboxResponse",
    "WatchSandboxesRequest",
    "EnsureWorkspaceResponse",
    "DeleteWorkspaceResponse",
];

/// (message, inclusive start, inclusive end) of every reserved number range.
const RESERVED_RANGES: &[(&str, i32, i32)] = &[
    ("GetCapabilitiesResponse", 4, 4),
    ("GetCapabilitiesResponse", 5, 5),
    ("DriverSandboxSpec", 10, 10),
];

const RESERVED_NAMES: &[(&str, &str)] = &[
    ("GetCapabilitiesResponse", "supports_gpu"),
    ("GetCapabilitiesResponse", "gpu_count"),
    ("DriverSandboxSpec", "gpu_device"),
];

fn descriptor_set() -> FileDescriptorSet {
    FileDescriptorSet::decode(openshell_proto::FILE_DESCRIPTOR_SET).expect("descriptor set decodes")
}

fn compute_file(set: &FileDescriptorSet) -> &FileDescriptorProto {
    set.file
        .iter()
        .find(|f| f.package() == PACKAGE)
        .expect("compute_driver.proto is in the descriptor set")
}

/// Flattens top-level and nested messages into `Outer.Inner` names.
fn collect_messages<'a>(
    prefix: &str,
    messages: &'a [DescriptorProto],
    out: &mut BTreeMap<std::string::String, &'a DescriptorProto>,
) {
    for message in messages {
        let name = if prefix.is_empty() {
            message.name().to_owned()
        } else {
            format!("{prefix}.{}", message.name())
        };
        collect_messages(&name, &message.nested_type, out);
        out.insert(name, message);
    }
}

fn messages(file: &FileDescriptorProto) -> BTreeMap<std::string::String, &DescriptorProto> {
    let mut out = BTreeMap::new();
    collect_messages("", &file.message_type, &mut out);
    out
}

#[test]
fn every_field_matches_the_upstream_table() {
    let set = descriptor_set();
    let file = compute_file(&set);
    let messages = messages(file);

    let mut expected = BTreeSet::new();
    for &(message, field, number, label, ty, type_name, oneof) in FIELDS {
        expected.insert((message, field));
        let descriptor = messages
            .get(message)
            .unwrap_or_else(|| panic!("message {message} is missing"));
        let actual = descriptor
            .field
            .iter()
            .find(|f| f.name() == field)
            .unwrap_or_else(|| panic!("field {message}.{field} is missing"));
        assert_eq!(actual.number(), number, "number of {message}.{field}");
        assert_eq!(actual.label(), label, "label of {message}.{field}");
        assert_eq!(actual.r#type(), ty, "type of {message}.{field}");
        if type_name.is_empty() {
            assert!(
                actual.type_name().is_empty(),
                "{message}.{field} must be a scalar"
            );
        } else {
            assert!(
                actual.type_name().ends_with(&format!(".{type_name}")),
                "type of {message}.{field} is {}, expected {type_name}",
                actual.type_name()
            );
        }
        // proto3 `optional` fields live in a synthetic oneof; the table lists
        // them without one, so only real oneofs are compared.
        let actual_oneof = match actual.oneof_index {
            Some(index) if !actual.proto3_optional() => {
                descriptor.oneof_decl[usize::try_from(index).unwrap()].name()
            }
            _ => "",
        };
        assert_eq!(actual_oneof, oneof, "oneof of {message}.{field}");
    }

    for (name, descriptor) in &messages {
        for field in &descriptor.field {
            assert!(
                expected.contains(&(name.as_str(), field.name())),
                "{name}.{} (number {}) is not in the upstream contract",
                field.name(),
                field.number()
            );
        }
    }
}

#[test]
fn gpu_count_keeps_explicit_presence() {
    let set = descriptor_set();
    let messages = messages(compute_file(&set));
    let count = messages["GpuResourceRequirements"]
        .field
        .iter()
        .find(|f| f.name() == "count")
        .unwrap();
    assert!(
        count.proto3_optional(),
        "GpuResourceRequirements.count must be `optional uint32`"
    );
}

#[test]
fn message_set_is_exactly_the_contract() {
    let set = descriptor_set();
    let messages = messages(compute_file(&set));
    let mut expected: BTreeSet<std::string::String> =
        FIELDS.iter().map(|f| f.0.to_owned()).collect();
    expected.extend(EMPTY_MESSAGES.iter().map(|m| (*m).to_owned()));
    let actual: BTreeSet<std::string::String> = messages.keys().cloned().collect();
    assert_eq!(actual, expected);
    for name in EMPTY_MESSAGES {
        assert!(
            messages[*name].field.is_empty(),
            "{name} must have no fields"
        );
    }
    let file = compute_file(&set);
    assert!(file.enum_type.is_empty(), "the contract defines no enums");
}

#[test]
fn reserved_numbers_and_names_are_kept() {
    let set = descriptor_set();
    let messages = messages(compute_file(&set));
    let mut actual_ranges = BTreeSet::new();
    let mut actual_names = BTreeSet::new();
    for (name, descriptor) in &messages {
        for range in &descriptor.reserved_range {
            // Descriptor ranges are end-exclusive.
            actual_ranges.insert((name.clone(), range.start(), range.end() - 1));
        }
        for reserved in &descriptor.reserved_name {
            actual_names.insert((name.clone(), reserved.clone()));
        }
    }
    let expected_ranges: BTreeSet<_> = RESERVED_RANGES
        .iter()
        .map(|(m, s, e)| ((*m).to_owned(), *s, *e))
        .collect();
    let expected_names: BTreeSet<_> = RESERVED_NAMES
        .iter()
        .map(|(m, n)| ((*m).to_owned(), (*n).to_owned()))
        .collect();
    assert_eq!(actual_ranges, expected_ranges);
    assert_eq!(actual_names, expected_names);
}

#[test]
fn service_has_all_twelve_rpcs() {
    let set = descriptor_set();
    let file = compute_file(&set);
    assert_eq!(file.service.len(), 1);
    let service = &file.service[0];
    assert_eq!(service.name(), "ComputeDriver");
    assert_eq!(service.method.len(), RPCS.len());
    for &(rpc, request, response, streaming) in RPCS {
        let method = service
            .method
            .iter()
            .find(|m| m.name() == rpc)
            .unwrap_or_else(|| panic!("rpc {rpc} is missing"));
        assert_eq!(method.input_type(), format!(".{PACKAGE}.{request}"));
        assert_eq!(method.output_type(), format!(".{PACKAGE}.{response}"));
        assert_eq!(method.server_streaming(), streaming, "streaming of {rpc}");
        assert!(!method.client_streaming(), "{rpc} takes a single request");
    }
}

#[test]
fn imports_and_secret_option_match_upstream() {
    let set = descriptor_set();
    let file = compute_file(&set);
    assert_eq!(file.syntax(), "proto3");
    assert_eq!(
        file.dependency,
        ["google/protobuf/struct.proto", "options.proto"]
    );

    let options = set
        .file
        .iter()
        .find(|f| f.package() == "openshell.options.v1")
        .expect("options.proto compiled");
    let secret = options
        .extension
        .iter()
        .find(|e| e.name() == "secret")
        .expect("secret extension");
    assert_eq!(secret.number(), 50001);
    assert_eq!(secret.extendee(), ".google.protobuf.FieldOptions");
    assert_eq!(secret.r#type(), Bool);
    let authorization = options
        .extension
        .iter()
        .find(|e| e.name() == "authorization")
        .expect("authorization extension");
    assert_eq!(authorization.number(), 50000);
    assert_eq!(authorization.extendee(), ".google.protobuf.MethodOptions");

    // prost_types drops extension fields, so read the option through a
    // reflection pool that knows the `secret` extension.
    let pool = prost_reflect::DescriptorPool::decode(openshell_proto::FILE_DESCRIPTOR_SET)
        .expect("descriptor pool");
    let secret = pool
        .get_extension_by_name("openshell.options.v1.secret")
        .expect("secret extension in pool");
    let spec = pool
        .get_message_by_name("openshell.compute.v1.DriverSandboxSpec")
        .expect("DriverSandboxSpec");
    for field in spec.fields() {
        let options = field.options();
        let marked = options.has_extension(&secret)
            && options.get_extension(&secret).as_bool() == Some(true);
        assert_eq!(
            marked,
            field.name() == "sandbox_token",
            "only DriverSandboxSpec.sandbox_token carries (openshell.options.v1.secret) = true; {} disagrees",
            field.name()
        );
    }
}
