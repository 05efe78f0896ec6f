//! Results of a run: the table for people and the JSON for machines.

use serde::Serialize;

/// What a check came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Outcome {
    Pass,
    Fail,
    Skip,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Self::Pass => "PASS",
            Self::Fail => "FAIL",
            Self::Skip => "SKIP",
        }
    }
}

/// A check's outcome and why, before it is timed and placed in the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub outcome: Outcome,
    pub reason: String,
}

impl Verdict {
    pub fn pass(reason: impl Into<String>) -> Self {
        Self {
            outcome: Outcome::Pass,
            reason: reason.into(),
        }
    }

    pub fn fail(reason: impl Into<String>) -> Self {
        Self {
            outcome: Outcome::Fail,
            reason: reason.into(),
        }
    }

    pub fn skip(reason: impl Into<String>) -> Self {
        Self {
            outcome: Outcome::Skip,
            reason: reason.into(),
        }
    }
}

/// One row of the report. The JSON field names are stable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckResult {
    pub id: String,
    pub title: String,
    /// Whether a FAIL here fails the run.
    pub required: bool,
    pub outcome: Outcome,
    pub reason: String,
    pub elapsed_ms: u64,
}

/// The whole run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub results: Vec<CheckResult>,
}

impl Report {
    /// Whether every required check passed or was skipped.
    pub fn required_passed(&self) -> bool {
        !self
            .results
            .iter()
            .any(|r| r.required && r.outcome == Outcome::Fail)
    }

    /// The process exit code for this report: 0 or 1.
    pub fn exit_code(&self) -> u8 {
        if self.required_passed() { 0 } else { 1 }
    }

    /// The JSON array of results.
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string_pretty(&self.results)
    }

    /// A fixed-width table, one row per check, then a summary line.
    pub fn to_table(&self) -> String {
        let id_width = self
            .results
            .iter()
            .map(|r| r.id.len())
            .max()
            .unwrap_or(2)
            .max("CHECK".len());
        let mut out = format!(
            "{:<id_width$}  {:<6}  {:<8}  REASON\n",
            "CHECK", "RESULT", "REQUIRED"
        );
        for r in &self.results {
            let required = if r.required { "yes" } else { "no" };
            // Keep one row per check even when a driver's message has
            // line breaks in it.
            let reason = r.reason.replace(['\n', '\r'], " ");
            out.push_str(&format!(
                "{:<id_width$}  {:<6}  {:<8}  {reason}\n",
                r.id,
                r.outcome.label(),
                required
            ));
        }
        let count = |o: Outcome| self.results.iter().filter(|r| r.outcome == o).count();
        let failed_required = self
            .results
            .iter()
            .filter(|r| r.required && r.outcome == Outcome::Fail)
            .count();
        out.push_str(&format!(
            "\n{} passed, {} failed ({} required), {} skipped: {}\n",
            count(Outcome::Pass),
            count(Outcome::Fail),
            failed_required,
            count(Outcome::Skip),
            if failed_required == 0 {
                "the driver conforms"
            } else {
                "the driver does not conform"
            }
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, required: bool, outcome: Outcome, reason: &str) -> CheckResult {
        CheckResult {
            id: id.to_owned(),
            title: format!("title of {id}"),
            required,
            outcome,
            reason: reason.to_owned(),
            elapsed_ms: 7,
        }
    }

    #[test]
    fn table_has_one_aligned_row_per_check_and_a_verdict() {
        let report = Report {
            results: vec![
                row("capabilities", true, Outcome::Pass, "generation v0.0.111"),
                row("stop", true, Outcome::Fail, "expected OK,\ngot INTERNAL"),
                row("logs-service", false, Outcome::Skip, "not offered"),
            ],
        };
        let table = report.to_table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "CHECK         RESULT  REQUIRED  REASON");
        assert_eq!(
            lines[1],
            "capabilities  PASS    yes       generation v0.0.111"
        );
        assert_eq!(
            lines[2],
            "stop          FAIL    yes       expected OK, got INTERNAL"
        );
        assert_eq!(lines[3], "logs-service  SKIP    no        not offered");
        assert_eq!(
            lines[5],
            "1 passed, 1 failed (1 required), 1 skipped: the driver does not conform"
        );
        assert_eq!(report.exit_code(), 1);
    }

    #[test]
    fn optional_failures_and_skips_do_not_fail_the_run() {
        let report = Report {
            results: vec![
                row("capabilities", true, Outcome::Pass, ""),
                row("logs-service", false, Outcome::Fail, "INTERNAL"),
                row("stop", true, Outcome::Skip, "UNIMPLEMENTED"),
            ],
        };
        assert!(report.required_passed());
        assert_eq!(report.exit_code(), 0);
        assert!(report.to_table().ends_with("the driver conforms\n"));
    }

    #[test]
    fn json_is_an_array_with_stable_field_names() {
        let report = Report {
            results: vec![row("delete", true, Outcome::Skip, "why")],
        };
        let value: serde_json::Value =
            serde_json::from_str(&report.to_json().expect("encodes")).expect("parses");
        assert_eq!(
            value,
            serde_json::json!([{
                "id": "delete",
                "title": "title of delete",
                "required": true,
                "outcome": "SKIP",
                "reason": "why",
                "elapsed_ms": 7
            }])
        );
    }
}
