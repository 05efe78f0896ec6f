//! Kubernetes-style resource quantities ("500m", "2", "1.5", "512Mi",
//! "4Gi", "1e3"), computed exactly with integers.

/// A quantity as `digits * 10^-scale`, before its unit is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Decimal {
    digits: u128,
    scale: u32,
}

fn parse_decimal(text: &str) -> Option<(Decimal, &str)> {
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(end);
    if number.is_empty() || number == "." || number.matches('.').count() > 1 {
        return None;
    }
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if frac.len() > 18 {
        return None;
    }
    let mut digits: u128 = 0;
    for c in int.chars().chain(frac.chars()) {
        digits = digits
            .checked_mul(10)?
            .checked_add(u128::from(c.to_digit(10)?))?;
    }
    let scale = u32::try_from(frac.len()).ok()?;
    Some((Decimal { digits, scale }, suffix))
}

/// Multiplier of a suffix as `(numerator, denominator)`.
fn suffix_factor(suffix: &str) -> Option<(u128, u128)> {
    let binary = |power: u32| Some((1_u128 << (10 * power), 1));
    let decimal = |power: u32| Some((10_u128.pow(power), 1));
    match suffix {
        "" => decimal(0),
        "m" => Some((1, 1000)),
        "k" => decimal(3),
        "M" => decimal(6),
        "G" => decimal(9),
        "T" => decimal(12),
        "P" => decimal(15),
        "E" => decimal(18),
        "Ki" => binary(1),
        "Mi" => binary(2),
        "Gi" => binary(3),
        "Ti" => binary(4),
        "Pi" => binary(5),
        "Ei" => binary(6),
        _ => {
            // Exponent form: e3, E6.
            let exponent = suffix.strip_prefix(['e', 'E'])?;
            let power: u32 = exponent.parse().ok()?;
            if power > 18 {
                return None;
            }
            decimal(power)
        }
    }
}

/// `value * unit` rounded up to an integer.
fn scaled(text: &str, unit: u128) -> Option<(u128, bool)> {
    let (decimal, suffix) = parse_decimal(text.trim())?;
    let (num, den) = suffix_factor(suffix)?;
    let numerator = decimal.digits.checked_mul(num)?.checked_mul(unit)?;
    let denominator = den.checked_mul(10_u128.checked_pow(decimal.scale)?)?;
    Some((numerator.div_ceil(denominator), suffix == "m"))
}

/// CPU in millicores: "500m" → 500, "2" → 2000, "0.25" → 250.
pub fn cpu_millis(text: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "{text:?} is not a CPU quantity; use cores (\"2\", \"0.5\") or millicores (\"500m\")"
        )
    };
    let (millis, _) = scaled(text, 1000).ok_or_else(bad)?;
    let millis = u64::try_from(millis).map_err(|_| bad())?;
    if millis == 0 {
        return Err(format!("{text:?} is zero; give a positive CPU amount"));
    }
    Ok(millis)
}

/// Memory in bytes: "512Mi", "4Gi", "1G", "1000".
pub fn memory_bytes(text: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "{text:?} is not a memory quantity; use bytes with a suffix such as \"512Mi\" or \"4Gi\""
        )
    };
    let (bytes, milli) = scaled(text, 1).ok_or_else(bad)?;
    if milli {
        return Err(format!(
            "{text:?} is in millibytes (suffix m); did you mean Mi (mebibytes)?"
        ));
    }
    let bytes = u64::try_from(bytes).map_err(|_| bad())?;
    if bytes == 0 {
        return Err(format!("{text:?} is zero; give a positive memory amount"));
    }
    Ok(bytes)
}

/// Renders bytes for messages: "64 MiB", "1.5 GiB", "1000 B".
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = None;
    let mut whole = bytes;
    let mut rest = 0;
    for name in UNITS {
        if whole < 1024 {
            break;
        }
        rest = whole % 1024;
        whole /= 1024;
        unit = Some(name);
    }
    match unit {
        None => format!("{bytes} B"),
        Some(name) if rest == 0 => format!("{whole} {name}"),
        Some(name) => format!("{whole}.{} {name}", rest * 10 / 1024),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_quantities() {
        assert_eq!(cpu_millis("500m"), Ok(500));
        assert_eq!(cpu_millis("2"), Ok(2000));
        assert_eq!(cpu_millis("0.25"), Ok(250));
        assert_eq!(cpu_millis("1.5"), Ok(1500));
        assert_eq!(cpu_millis(" 1 "), Ok(1000));
        assert_eq!(cpu_millis("0.0001"), Ok(1), "rounds up like Kubernetes");
        assert!(
            cpu_millis("abc")
                .unwrap_err()
                .contains("not a CPU quantity")
        );
        assert!(cpu_millis("-1").is_err());
        assert!(cpu_millis("").is_err());
        assert!(cpu_millis("1..2").is_err());
        assert!(cpu_millis("0").unwrap_err().contains("zero"));
        assert!(cpu_millis("1x").is_err());
    }

    #[test]
    fn memory_quantities() {
        assert_eq!(memory_bytes("512Mi"), Ok(512 * 1024 * 1024));
        assert_eq!(memory_bytes("4Gi"), Ok(4 << 30));
        assert_eq!(memory_bytes("1G"), Ok(1_000_000_000));
        assert_eq!(memory_bytes("1.5Gi"), Ok(3 << 29));
        assert_eq!(memory_bytes("1e3"), Ok(1000));
        assert_eq!(memory_bytes("128974848"), Ok(128_974_848));
        assert_eq!(memory_bytes("129e6"), Ok(129_000_000));
        assert!(memory_bytes("500m").unwrap_err().contains("Mi"));
        assert!(memory_bytes("4GB").is_err());
        assert!(
            memory_bytes("99999999999Ei").is_err(),
            "overflow is an error"
        );
    }

    #[test]
    fn human_bytes_for_messages() {
        assert_eq!(human_bytes(1000), "1000 B");
        assert_eq!(human_bytes(64 << 20), "64 MiB");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
    }
}
