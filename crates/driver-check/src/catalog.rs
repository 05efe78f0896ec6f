//! The checks, their stable ids, and which of them a run selects.

use std::collections::BTreeSet;

use crate::CheckError;

/// When a check's failure fails the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requirement {
    /// A contract behaviour every driver must have.
    Always,
    /// Required of 1.x drivers; informational for v0.0.111 drivers.
    OneX,
    /// Never fails the run (optional services and extras).
    Optional,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Check {
    pub id: &'static str,
    pub title: &'static str,
    pub requirement: Requirement,
}

const fn check(id: &'static str, title: &'static str, requirement: Requirement) -> Check {
    Check {
        id,
        title,
        requirement,
    }
}

use Requirement::{Always, OneX, Optional};

/// Every check, in the order a run performs them. Ids never change
/// meaning; new checks get new ids.
pub const CHECKS: &[Check] = &[
    check(
        "capabilities",
        "GetCapabilities answers v0.0.111 and 1.x gateways",
        Always,
    ),
    check(
        "negotiation",
        "1.x: the driver's extension metadata negotiates with a 1.x gateway",
        OneX,
    ),
    check(
        "admission-policy",
        "1.x: resource_admission_policy parses and is byte-stable",
        OneX,
    ),
    check(
        "major-mismatch",
        "1.x: gateway metadata of another major version is refused with FAILED_PRECONDITION",
        OneX,
    ),
    check(
        "validate-good",
        "ValidateSandboxCreate accepts a well-formed sandbox",
        Always,
    ),
    check(
        "reject-missing-sandbox",
        "requests without a sandbox are refused with INVALID_ARGUMENT",
        Always,
    ),
    check(
        "reject-missing-spec",
        "a sandbox without a spec is refused with INVALID_ARGUMENT",
        Always,
    ),
    check(
        "reject-empty-name",
        "a sandbox with an empty name is refused with INVALID_ARGUMENT",
        Always,
    ),
    check(
        "reject-control-name",
        "a name with control characters is refused with INVALID_ARGUMENT",
        Always,
    ),
    check(
        "reject-nan-cpu",
        "a NaN CPU quantity is refused with INVALID_ARGUMENT",
        Always,
    ),
    check(
        "reject-negative-cpu",
        "a negative CPU quantity is refused with INVALID_ARGUMENT",
        Always,
    ),
    check(
        "reject-nan-memory",
        "a NaN memory quantity is refused with INVALID_ARGUMENT",
        Always,
    ),
    check(
        "reject-negative-memory",
        "a negative memory quantity is refused with INVALID_ARGUMENT",
        Always,
    ),
    check(
        "reject-gpu",
        "a GPU request to a driver without GPUs is refused",
        Always,
    ),
    check(
        "create-ready",
        "CreateSandbox, then GetSandbox shows Ready=True",
        Always,
    ),
    check(
        "list-ready",
        "ListSandboxes lists the sandbox as Ready=True",
        Always,
    ),
    check(
        "watch-ready",
        "a watch opened before the create sees the sandbox become Ready=True",
        Always,
    ),
    check(
        "create-duplicate",
        "a second create with the same id is refused with ALREADY_EXISTS",
        Always,
    ),
    check(
        "get-unknown",
        "GetSandbox of an unknown id is NOT_FOUND",
        Always,
    ),
    check(
        "delete-unknown",
        "DeleteSandbox of an unknown id is OK with deleted=false",
        Always,
    ),
    check(
        "condition-time",
        "conditions carry a parseable transition time",
        Always,
    ),
    check(
        "condition-time-both",
        "conditions carry both the RFC 3339 (5) and Timestamp (105) encodings, agreeing",
        OneX,
    ),
    check(
        "watch-snapshot",
        "a watch opened while sandboxes exist starts with a snapshot of them",
        Always,
    ),
    check(
        "logs-service",
        "the optional log service is detected (UNIMPLEMENTED means not offered)",
        Optional,
    ),
    check(
        "stop",
        "StopSandbox makes the sandbox Ready=False (skipped when UNIMPLEMENTED)",
        Always,
    ),
    check(
        "stop-twice",
        "a second StopSandbox is OK (idempotent)",
        Always,
    ),
    check(
        "start",
        "StartSandbox makes a stopped sandbox Ready=True again",
        Always,
    ),
    check(
        "delete",
        "DeleteSandbox answers deleted=true, then GetSandbox is NOT_FOUND",
        Always,
    ),
    check(
        "watch-deleted",
        "the watch opened before the create reports the sandbox deleted",
        Always,
    ),
    check(
        "watch-concurrent",
        "a second, concurrent watcher also reports the deletion",
        Always,
    ),
    check(
        "cleanup",
        "every sandbox this run created is gone at the end",
        Always,
    ),
];

/// The check with this id.
pub fn find(id: &str) -> Option<&'static Check> {
    CHECKS.iter().find(|c| c.id == id)
}

fn known_ids() -> String {
    CHECKS.iter().map(|c| c.id).collect::<Vec<_>>().join(", ")
}

/// Parses a comma-separated list of check ids given to `flag`. Blanks
/// around ids are ignored; unknown ids are an error naming the known ones.
pub fn parse_ids(flag: &'static str, list: &str) -> Result<BTreeSet<&'static str>, CheckError> {
    let mut ids = BTreeSet::new();
    for raw in list.split(',') {
        let id = raw.trim();
        if id.is_empty() {
            continue;
        }
        let Some(check) = find(id) else {
            return Err(CheckError::UnknownCheck {
                id: id.to_owned(),
                flag,
                known: known_ids(),
            });
        };
        ids.insert(check.id);
    }
    if ids.is_empty() {
        return Err(CheckError::EmptySelection { flag });
    }
    Ok(ids)
}

/// Which checks a run reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    only: Option<BTreeSet<&'static str>>,
    skip: BTreeSet<&'static str>,
}

impl Selection {
    /// From the `--only` and `--skip` values (each repeatable).
    pub fn new(only: &[String], skip: &[String]) -> Result<Self, CheckError> {
        let only = if only.is_empty() {
            None
        } else {
            let mut all = BTreeSet::new();
            for list in only {
                all.extend(parse_ids("--only", list)?);
            }
            Some(all)
        };
        let mut skipped = BTreeSet::new();
        for list in skip {
            skipped.extend(parse_ids("--skip", list)?);
        }
        let selection = Self {
            only,
            skip: skipped,
        };
        if !CHECKS.iter().any(|c| selection.includes(c.id)) {
            return Err(CheckError::NothingSelected);
        }
        Ok(selection)
    }

    /// Whether the check `id` is run and reported.
    pub fn includes(&self, id: &str) -> bool {
        self.only.as_ref().is_none_or(|only| only.contains(id)) && !self.skip.contains(id)
    }

    /// Whether any of `ids` is selected.
    pub fn any(&self, ids: &[&str]) -> bool {
        ids.iter().any(|id| self.includes(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_kebab_case() {
        let mut seen = BTreeSet::new();
        for c in CHECKS {
            assert!(seen.insert(c.id), "{} twice", c.id);
            assert!(
                c.id.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'),
                "{}",
                c.id
            );
        }
    }

    #[test]
    fn lists_are_parsed_with_blanks_and_repeats() {
        let ids = parse_ids("--only", " delete, create-ready,,delete ").expect("valid");
        assert_eq!(
            ids.into_iter().collect::<Vec<_>>(),
            ["create-ready", "delete"]
        );
    }

    #[test]
    fn unknown_ids_name_the_flag_and_the_known_ids() {
        let err = parse_ids("--skip", "delete,nope").expect_err("unknown id");
        let text = err.to_string();
        assert!(text.contains("\"nope\""), "{text}");
        assert!(text.contains("--skip"), "{text}");
        assert!(text.contains("watch-snapshot"), "{text}");
        assert!(err.is_usage());
        assert!(matches!(
            parse_ids("--only", " , "),
            Err(CheckError::EmptySelection { flag: "--only" })
        ));
    }

    #[test]
    fn only_and_skip_combine() {
        let all = Selection::new(&[], &[]).expect("default");
        assert!(CHECKS.iter().all(|c| all.includes(c.id)));

        let some = Selection::new(
            &["capabilities,delete".to_owned(), "stop".to_owned()],
            &["delete".to_owned()],
        )
        .expect("valid");
        assert!(some.includes("capabilities"));
        assert!(some.includes("stop"));
        assert!(!some.includes("delete"));
        assert!(!some.includes("cleanup"));
        assert!(some.any(&["delete", "stop"]));
        assert!(!some.any(&["delete", "cleanup"]));

        let skipped = Selection::new(&[], &["logs-service".to_owned()]).expect("valid");
        assert!(!skipped.includes("logs-service"));
        assert!(skipped.includes("cleanup"));

        assert!(matches!(
            Selection::new(&["stop".to_owned()], &["stop".to_owned()]),
            Err(CheckError::NothingSelected)
        ));
    }
}
