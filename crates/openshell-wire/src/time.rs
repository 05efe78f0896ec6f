//! Timestamps as the wire carries them in string fields such as
//! `Condition.last_transition_time`: RFC 3339 in UTC with millisecond
//! precision (`2026-12-04T18:29:19.123Z`). Every process writes this one form.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Formats `at` as RFC 3339 UTC with milliseconds.
pub fn rfc3339(at: SystemTime) -> String {
    let ms = match at.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_millis()).map_or(i64::MIN, |v| -v),
    };
    rfc3339_millis(ms)
}

/// Formats milliseconds since the Unix epoch as RFC 3339 UTC. Values beyond
/// what a calendar date can carry are clamped to the representable range.
pub fn rfc3339_millis(ms: i64) -> String {
    let ts = jiff::Timestamp::from_millisecond(ms).unwrap_or(if ms < 0 {
        jiff::Timestamp::MIN
    } else {
        jiff::Timestamp::MAX
    });
    format!("{ts:.3}")
}

/// The current time, formatted with [`rfc3339`].
pub fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

/// Milliseconds since the Unix epoch now.
pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Parses an RFC 3339 timestamp (any offset) into a [`SystemTime`].
/// Returns `None` for anything else, including bare epoch numbers.
pub fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let ts: jiff::Timestamp = text.parse().ok()?;
    let ms = ts.as_millisecond();
    let magnitude = Duration::from_millis(ms.unsigned_abs());
    if ms >= 0 {
        UNIX_EPOCH.checked_add(magnitude)
    } else {
        UNIX_EPOCH.checked_sub(magnitude)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_with_milliseconds() {
        assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_millis(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(
            rfc3339_millis(1_795_000_000_000),
            "2026-11-18T11:06:40.000Z"
        );
        assert_eq!(rfc3339_millis(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn extreme_values_clamp_instead_of_failing() {
        let max = rfc3339_millis(i64::MAX);
        let min = rfc3339_millis(i64::MIN);
        assert!(max.starts_with("9999-12-"), "{max}");
        assert!(min.starts_with("-009999-01-"), "{min}");
    }

    #[test]
    fn round_trips_through_parse() {
        let at = UNIX_EPOCH + Duration::from_millis(1_795_000_000_456);
        assert_eq!(parse_rfc3339(&rfc3339(at)), Some(at));
        assert_eq!(
            parse_rfc3339("2026-11-18T12:06:40.456+01:00"),
            Some(at),
            "offsets are honoured"
        );
    }

    #[test]
    fn rejects_what_is_not_rfc3339() {
        assert_eq!(parse_rfc3339("1795000000000"), None);
        assert_eq!(parse_rfc3339(""), None);
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    #[test]
    fn now_is_parseable() {
        assert!(parse_rfc3339(&now_rfc3339()).is_some());
        assert!(now_millis() > 1_700_000_000_000);
    }
}
