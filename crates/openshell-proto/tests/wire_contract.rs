//! Pins the compiled compute-driver schema to both contract generations it
//! carries: every row of the v0.0.111 table exactly (name, number, label,
//! type, oneof), every non-reserved row of the 1.x table by number with the
//! same type, label and oneof (names differ only where 1.x renamed a field),
//! and nothing that is in neither table. The tables are data files under
//! `tests/contract/`, one line per field, reserved range and RPC.

use std::collections::{BTreeMap, BTreeSet};

use prost::Message as _;
use prost_types::{DescriptorProto, FieldDescriptorProto, FileDescriptorProto, FileDescriptorSet};

const PACKAGE: &str = "openshell.compute.v1";
const V0_0_111: &str = include_str!("contract/v0.0.111.tsv");
const V1_X: &str = include_str!("contract/v1.x.tsv");

/// Fields 1.x renamed; this schema keeps the v0.0.111 name.
/// (message, 1.x name, our name)
const RENAMED_IN_1X: &[(&str, &str, &str)] = &[
    ("DriverSandboxStatus", "name", "sandbox_name"),
    ("GetSandboxRequest", "name", "sandbox_name"),
    ("StopSandboxRequest", "name", "sandbox_name"),
    ("StartSandboxRequest", "name", "sandbox_name"),
    ("DeleteSandboxRequest", "name", "sandbox_name"),
];

/// Numbers 1.x reserves that v0.0.111 peers still use: they stay live.
const LIVE_DESPITE_1X_RESERVATION: &[(&str, i32)] =
    &[("DriverCondition", 5), ("DriverPlatformEvent", 1)];

/// Messages without fields in either generation (the tables list fields
/// only, so these are named here).
const EMPTY_MESSAGES: &[&str] = &[
    "GetGatewayListenerRequirementsRequest",
    "GatewayDefaultRouteInterfaceRequirement",
    "GatewayLoopbackInterfaceRequirement",
    "ValidateSandboxCreateResponse",
    "ListSandboxesRequest",
    "StopSandboxResponse",
    "WatchSandboxesRequest",
    "EnsureWorkspaceResponse",
    "DeleteWorkspaceResponse",
];

#[derive(Debug, Clone)]
struct FieldRow {
    message: String,
    field: String,
    number: i32,
    label: i32,
    ty: i32,
    type_name: String,
    oneof: String,
}

#[derive(Debug, Default)]
struct Table {
    fields: Vec<FieldRow>,
    reserved: Vec<(String, i32, i32)>,
    rpcs: Vec<(String, String, String, bool)>,
}

fn short(message: &str) -> String {
    message
        .strip_prefix(&format!("{PACKAGE}."))
        .unwrap_or_else(|| panic!("{message} is outside {PACKAGE}"))
        .to_owned()
}

fn parse(table: &str) -> Table {
    let mut out = Table::default();
    for (n, line) in table.lines().enumerate() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let cols: Vec<&str> = line.split('\t').collect();
        let int = |i: usize| -> i32 {
            cols.get(i)
                .and_then(|c| c.parse().ok())
                .unwrap_or_else(|| panic!("line {}: column {i} is not a number: {line}", n + 1))
        };
        match cols[0] {
            "msg" => out.fields.push(FieldRow {
                message: short(cols[1]),
                field: cols[2].to_owned(),
                number: int(3),
                label: int(4),
                ty: int(5),
                type_name: cols.get(6).copied().unwrap_or("").to_owned(),
                oneof: cols.get(7).copied().unwrap_or("").to_owned(),
            }),
            "reserved" => {
                let (a, b) = cols[2].split_once('-').expect("range a-b");
                out.reserved.push((
                    short(cols[1]),
                    a.parse().expect("start"),
                    b.parse().expect("end"),
                ));
            }
            "rpc" => out.rpcs.push((
                cols[2].to_owned(),
                cols[3].to_owned(),
                cols[4].to_owned(),
                cols[5] == "1",
            )),
            other => panic!("line {}: unknown row kind {other:?}", n + 1),
        }
    }
    assert!(
        !out.fields.is_empty() && !out.rpcs.is_empty(),
        "table parsed"
    );
    out
}

fn descriptor_set() -> FileDescriptorSet {
    FileDescriptorSet::decode(openshell_proto::FILE_DESCRIPTOR_SET).expect("descriptor set decodes")
}

fn file<'a>(set: &'a FileDescriptorSet, package: &str) -> &'a FileDescriptorProto {
    set.file
        .iter()
        .find(|f| f.package() == package)
        .unwrap_or_else(|| panic!("package {package} is in the descriptor set"))
}

/// Top-level and nested messages as `Outer.Inner` names.
fn messages(file: &FileDescriptorProto) -> BTreeMap<String, &DescriptorProto> {
    fn walk<'a>(
        prefix: &str,
        list: &'a [DescriptorProto],
        out: &mut BTreeMap<String, &'a DescriptorProto>,
    ) {
        for m in list {
            let name = if prefix.is_empty() {
                m.name().to_owned()
            } else {
                format!("{prefix}.{}", m.name())
            };
            walk(&name, &m.nested_type, out);
            out.insert(name, m);
        }
    }
    let mut out = BTreeMap::new();
    walk("", &file.message_type, &mut out);
    out
}

/// The real oneof of a field; proto3 `optional` fields live in a synthetic
/// one, which the tables do not list.
fn oneof_of<'a>(message: &'a DescriptorProto, field: &FieldDescriptorProto) -> &'a str {
    match field.oneof_index {
        Some(i) if !field.proto3_optional() => {
            message.oneof_decl[usize::try_from(i).expect("index")].name()
        }
        _ => "",
    }
}

fn check_shape(row: &FieldRow, message: &DescriptorProto, actual: &FieldDescriptorProto) {
    let what = format!("{}.{} ({})", row.message, row.field, row.number);
    assert_eq!(actual.label, Some(row.label), "label of {what}");
    assert_eq!(actual.r#type, Some(row.ty), "type of {what}");
    if row.type_name.is_empty() {
        assert!(actual.type_name().is_empty(), "{what} must be a scalar");
    } else {
        assert!(
            actual.type_name().ends_with(&format!(".{}", row.type_name)),
            "type of {what} is {}, expected {}",
            actual.type_name(),
            row.type_name
        );
    }
    assert_eq!(oneof_of(message, actual), row.oneof, "oneof of {what}");
}

#[test]
fn every_v0_0_111_row_is_here_exactly() {
    let set = descriptor_set();
    let messages = messages(file(&set, PACKAGE));
    let table = parse(V0_0_111);
    for row in &table.fields {
        let message = messages
            .get(&row.message)
            .unwrap_or_else(|| panic!("message {} is missing", row.message));
        let actual = message
            .field
            .iter()
            .find(|f| f.name() == row.field)
            .unwrap_or_else(|| panic!("field {}.{} is missing", row.message, row.field));
        assert_eq!(
            actual.number(),
            row.number,
            "number of {}.{}",
            row.message,
            row.field
        );
        check_shape(row, message, actual);
    }
    for (message, start, end) in &table.reserved {
        assert!(
            messages[message]
                .reserved_range
                .iter()
                .any(|r| r.start() == *start && r.end() - 1 == *end),
            "{message} must reserve {start}-{end}"
        );
    }
}

#[test]
fn every_1x_row_is_here_by_number() {
    let set = descriptor_set();
    let messages = messages(file(&set, PACKAGE));
    let table = parse(V1_X);
    for row in &table.fields {
        let message = messages
            .get(&row.message)
            .unwrap_or_else(|| panic!("1.x message {} is missing", row.message));
        let actual = message
            .field
            .iter()
            .find(|f| f.number() == row.number)
            .unwrap_or_else(|| {
                panic!(
                    "1.x field {}.{} ({}) is missing",
                    row.message, row.field, row.number
                )
            });
        let expected_name = RENAMED_IN_1X
            .iter()
            .find(|(m, new, _)| *m == row.message && *new == row.field)
            .map_or(row.field.as_str(), |(_, _, ours)| ours);
        assert_eq!(
            actual.name(),
            expected_name,
            "{}.{} is carried under another name",
            row.message,
            row.number
        );
        check_shape(row, message, actual);
    }
    for (message, start, end) in &table.reserved {
        let live =
            (*start..=*end).all(|n| LIVE_DESPITE_1X_RESERVATION.contains(&(message.as_str(), n)));
        if live {
            for n in *start..=*end {
                assert!(
                    messages[message].field.iter().any(|f| f.number() == n),
                    "{message} {n} must stay live for v0.0.111 peers"
                );
            }
        } else {
            assert!(
                messages[message]
                    .reserved_range
                    .iter()
                    .any(|r| r.start() == *start && r.end() - 1 == *end),
                "{message} must reserve {start}-{end}"
            );
        }
    }
}

#[test]
fn nothing_is_here_that_neither_generation_has() {
    let set = descriptor_set();
    let compute = file(&set, PACKAGE);
    let messages = messages(compute);
    let old = parse(V0_0_111);
    let new = parse(V1_X);
    let known: BTreeSet<(String, i32)> = old
        .fields
        .iter()
        .chain(&new.fields)
        .map(|r| (r.message.clone(), r.number))
        .collect();
    let mut names: BTreeSet<String> = known.iter().map(|(m, _)| m.clone()).collect();
    names.extend(EMPTY_MESSAGES.iter().map(|m| (*m).to_owned()));
    // Messages that gained their first field in 1.x are empty in v0.0.111.
    names.extend(
        [
            "GetCapabilitiesRequest",
            "CreateSandboxResponse",
            "StartSandboxResponse",
        ]
        .map(str::to_owned),
    );
    let actual: BTreeSet<String> = messages.keys().cloned().collect();
    assert_eq!(
        actual, names,
        "message set is the union of both generations"
    );
    for (name, message) in &messages {
        for field in &message.field {
            assert!(
                known.contains(&(name.clone(), field.number())),
                "{name}.{} ({}) is in neither contract table",
                field.name(),
                field.number()
            );
        }
        if EMPTY_MESSAGES.contains(&name.as_str()) {
            assert!(message.field.is_empty(), "{name} must have no fields");
        }
    }
    assert!(
        compute.enum_type.is_empty(),
        "the contract defines no enums"
    );

    let service = &compute.service[0];
    assert_eq!(compute.service.len(), 1);
    assert_eq!(service.name(), "ComputeDriver");
    let rpcs: BTreeMap<&str, (&str, &str, bool)> = old
        .rpcs
        .iter()
        .chain(&new.rpcs)
        .map(|(n, i, o, s)| (n.as_str(), (i.as_str(), o.as_str(), *s)))
        .collect();
    assert_eq!(
        service.method.len(),
        rpcs.len(),
        "both generations' RPCs, no others"
    );
    for (rpc, (input, output, streaming)) in rpcs {
        let method = service
            .method
            .iter()
            .find(|m| m.name() == rpc)
            .unwrap_or_else(|| panic!("rpc {rpc} is missing"));
        assert_eq!(method.input_type(), format!(".{PACKAGE}.{input}"));
        assert_eq!(method.output_type(), format!(".{PACKAGE}.{output}"));
        assert_eq!(method.server_streaming(), streaming, "streaming of {rpc}");
        assert!(!method.client_streaming(), "{rpc} takes a single request");
    }
}

#[test]
fn explicit_presence_where_the_contracts_ask_for_it() {
    let set = descriptor_set();
    let messages = messages(file(&set, PACKAGE));
    for (message, field) in [
        ("GpuResourceRequirements", "count"),
        ("DriverSandboxTemplate", "user_namespaces"),
    ] {
        let f = messages[message]
            .field
            .iter()
            .find(|f| f.name() == field)
            .expect("field");
        assert!(f.proto3_optional(), "{message}.{field} must be `optional`");
    }
}

#[test]
fn negotiation_metadata_matches_the_1x_extension_package() {
    let set = descriptor_set();
    let ext = messages(file(&set, "openshell.extension.v1"));
    let fields = |m: &str| -> Vec<(String, i32, i32, i32)> {
        ext[m]
            .field
            .iter()
            .map(|f| {
                (
                    f.name().to_owned(),
                    f.number(),
                    f.label.unwrap_or(0),
                    f.r#type.unwrap_or(0),
                )
            })
            .collect()
    };
    assert_eq!(
        fields("ProtocolVersion"),
        [
            ("major".to_owned(), 1, 1, 13),
            ("minor".to_owned(), 2, 1, 13)
        ]
    );
    assert_eq!(
        fields("PeerMetadata"),
        [
            ("protocol_version".to_owned(), 1, 1, 11),
            ("implementation_name".to_owned(), 2, 1, 9),
            ("implementation_version".to_owned(), 3, 1, 9),
            ("supported_capabilities".to_owned(), 4, 3, 9),
            ("required_capabilities".to_owned(), 5, 3, 9),
        ]
    );
}

#[test]
fn imports_and_secret_options() {
    let set = descriptor_set();
    let compute = file(&set, PACKAGE);
    assert_eq!(compute.syntax(), "proto3");
    assert_eq!(
        compute.dependency,
        [
            "google/protobuf/struct.proto",
            "google/protobuf/timestamp.proto",
            "extension.proto",
            "options.proto",
            "sandbox.proto",
        ]
    );
    let options = file(&set, "openshell.options.v1");
    let ext = |name: &str| {
        options
            .extension
            .iter()
            .find(|e| e.name() == name)
            .unwrap_or_else(|| panic!("{name} extension"))
    };
    assert_eq!(ext("secret").number(), 50001);
    assert_eq!(ext("secret").extendee(), ".google.protobuf.FieldOptions");
    assert_eq!(ext("authorization").number(), 50000);
    assert_eq!(
        ext("authorization").extendee(),
        ".google.protobuf.MethodOptions"
    );

    // prost_types drops extension values; read them through reflection.
    let pool = prost_reflect::DescriptorPool::decode(openshell_proto::FILE_DESCRIPTOR_SET)
        .expect("descriptor pool");
    let secret = pool
        .get_extension_by_name("openshell.options.v1.secret")
        .expect("secret extension in pool");
    let expected: BTreeSet<(&str, &str)> = [
        ("DriverSandboxSpec", "sandbox_token"),
        ("DriverSandboxSpec", "launch_authentication"),
        ("StartSandboxRequest", "launch_authentication"),
        ("AuthenticateSandboxRequest", "credential"),
    ]
    .into();
    let mut marked = BTreeSet::new();
    for message in pool.all_messages() {
        if message.package_name() != PACKAGE {
            continue;
        }
        for field in message.fields() {
            let options = field.options();
            if options.has_extension(&secret)
                && options.get_extension(&secret).as_bool() == Some(true)
            {
                marked.insert((message.name().to_owned(), field.name().to_owned()));
            }
        }
    }
    let marked: BTreeSet<(&str, &str)> = marked
        .iter()
        .map(|(m, f)| (m.as_str(), f.as_str()))
        .collect();
    assert_eq!(
        marked, expected,
        "fields carrying (openshell.options.v1.secret)"
    );
}
