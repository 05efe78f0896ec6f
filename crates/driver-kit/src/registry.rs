//! Settings that name image registries, checked the same way by every
//! driver that pulls.

/// Checks one `insecure_registries` entry: a bare `HOST[:PORT]`, as the
/// registry part of an image reference spells it. The error names the
/// entry and says what to write instead.
pub fn check_insecure_registry(entry: &str) -> Result<(), String> {
    let bad = |why: &str| {
        format!(
            "insecure_registries entry {entry:?} is not valid ({why}); give HOST or HOST:PORT as \
             in the image reference, e.g. \"127.0.0.1:5000\""
        )
    };
    if entry.is_empty() {
        return Err(bad("it is empty"));
    }
    if entry.contains("://") {
        return Err(bad("leave out the scheme"));
    }
    if let Some(c) = entry
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '-' | '_' | '[' | ']')))
    {
        return Err(bad(&format!("it contains {c:?}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_bare_hosts_with_optional_ports() {
        for good in [
            "127.0.0.1:5000",
            "registry.example",
            "[::1]:5000",
            "my-reg_1",
        ] {
            assert_eq!(check_insecure_registry(good), Ok(()), "{good}");
        }
        for (bad, why) in [
            ("", "it is empty"),
            ("http://127.0.0.1:5000", "leave out the scheme"),
            ("127.0.0.1:5000/repo", "'/'"),
            (" host", "' '"),
        ] {
            let err = check_insecure_registry(bad).unwrap_err();
            assert!(
                err.contains(why) && err.contains("HOST:PORT"),
                "{bad}: {err}"
            );
        }
    }
}
