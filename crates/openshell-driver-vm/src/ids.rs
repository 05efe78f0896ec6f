//! Sandbox ids. Every path under the state directory is built from a
//! [`SandboxId`], and one only exists after validation, so no request can
//! name a path outside `<state>/sandboxes/`.

use std::fmt;

use crate::error::Error;

/// Longest id accepted, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// A validated sandbox id: 1 to 128 bytes of `[A-Za-z0-9._-]`, and not `.`
/// or `..`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SandboxId(String);

impl SandboxId {
    /// Checks `raw` and wraps it.
    pub fn parse(raw: &str) -> Result<Self, Error> {
        let why = if raw.is_empty() {
            Some("it is empty")
        } else if raw.len() > MAX_ID_LEN {
            Some("it is longer than 128 bytes")
        } else if raw == "." || raw == ".." {
            Some("`.` and `..` are not ids")
        } else if !raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            Some("only ASCII letters, digits, `.`, `_` and `-` are allowed")
        } else {
            None
        };
        match why {
            None => Ok(Self(raw.to_owned())),
            Some(reason) => Err(Error::InvalidId {
                id: raw.chars().take(160).collect(),
                reason,
            }),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        for ok in [
            "a",
            "0",
            "sandbox-1",
            "A.b_c-D",
            "...",
            "550e8400-e29b-41d4-a716-446655440000",
            &"x".repeat(MAX_ID_LEN),
        ] {
            assert_eq!(SandboxId::parse(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn rejects_everything_that_could_escape_or_confuse_a_path() {
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "../etc",
            "/abs",
            "a b",
            "a\0b",
            "é",
            "a\nb",
            &"x".repeat(MAX_ID_LEN + 1),
        ] {
            let err = SandboxId::parse(bad).unwrap_err().to_string();
            assert!(err.contains("sandbox id"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn error_says_what_is_allowed() {
        let err = SandboxId::parse("a/b").unwrap_err().to_string();
        assert!(err.contains("[A-Za-z0-9._-]{1,128}"), "{err}");
        assert!(err.contains("a/b"), "{err}");
    }
}
