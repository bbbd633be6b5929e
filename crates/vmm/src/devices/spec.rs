//! Parsing of device spec strings (`key=value,key=value`), shared by the device models.

/// Splits `a=1,b=2` into pairs; empty items are skipped, a key given twice is an error.
pub fn split_spec(spec: &str) -> Result<Vec<(&str, &str)>, String> {
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| format!("'{item}' is not key=value"))?;
        let (key, value) = (key.trim(), value.trim());
        if pairs.iter().any(|(k, _)| *k == key) {
            return Err(format!("key '{key}' given twice"));
        }
        pairs.push((key, value));
    }
    Ok(pairs)
}

/// A byte count with an optional binary suffix: `4096`, `64K`, `256M`, `1G`, `2T`, also
/// `256MiB`/`256MB` (both binary).
pub fn parse_size(key: &str, value: &str) -> Result<u64, String> {
    let bad = |why: &str| format!("{key}={value}: {why}");
    let digits_end = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (digits, suffix) = value.split_at(digits_end);
    if digits.is_empty() {
        return Err(bad("expected a number with an optional K/M/G/T suffix"));
    }
    let n: u64 = digits.parse().map_err(|_| bad("number too large"))?;
    let unit = suffix
        .strip_suffix("iB")
        .or_else(|| suffix.strip_suffix('B'))
        .unwrap_or(suffix);
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(bad("unknown suffix (use K, M, G or T)")),
    };
    n.checked_mul(1u64 << shift).ok_or_else(|| bad("too large"))
}

/// A plain number, decimal or `0x` hexadecimal.
pub fn parse_number(key: &str, value: &str) -> Result<u64, String> {
    let parsed = match value.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => value.parse(),
    };
    parsed.map_err(|_| format!("{key}={value}: expected a number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("s", "4096"), Ok(4096));
        assert_eq!(parse_size("s", "64k"), Ok(64 << 10));
        assert_eq!(parse_size("s", "256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("s", "1GB"), Ok(1 << 30));
        assert!(parse_size("s", "1.5G").is_err());
        assert!(parse_size("s", "M").is_err());
        assert!(parse_size("s", "16777216T").is_err());
        assert_eq!(parse_number("n", "0x10"), Ok(16));
        assert!(parse_number("n", "-1").is_err());
    }
}
