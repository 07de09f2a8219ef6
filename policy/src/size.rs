//! Human sizes and durations as written in models.toml: "440GiB", "85%", "30m", "never".

use std::fmt;

/// A memory amount as configured: absolute bytes, or a share of the governed pool.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SizeSpec {
    /// An absolute number of bytes.
    Bytes(u64),
    /// A percentage (0 < p ≤ 100) of the governed pool.
    Percent(f64),
}

impl SizeSpec {
    /// Parses "440GiB", "512MB", "1073741824" or "85%".
    pub fn parse(text: &str) -> Result<Self, SizeError> {
        let text = text.trim();
        if let Some(number) = text.strip_suffix('%') {
            let p: f64 = number
                .trim()
                .parse()
                .map_err(|_| SizeError::Invalid(text.to_string()))?;
            if !(p > 0.0 && p <= 100.0) {
                return Err(SizeError::PercentOutOfRange(text.to_string()));
            }
            return Ok(Self::Percent(p));
        }
        parse_size(text).map(Self::Bytes)
    }

    /// The number of bytes this spec means for a pool of `pool_bytes`.
    pub fn resolve(&self, pool_bytes: u64) -> u64 {
        match *self {
            Self::Bytes(b) => b,
            Self::Percent(p) => ((pool_bytes as f64) * p / 100.0) as u64,
        }
    }
}

impl fmt::Display for SizeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bytes(b) => f.write_str(&format_bytes(*b)),
            Self::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// Why a size or duration could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SizeError {
    /// Not a number with a known unit.
    Invalid(String),
    /// A percentage outside (0, 100].
    PercentOutOfRange(String),
    /// The value does not fit in 64 bits.
    Overflow(String),
}

impl fmt::Display for SizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Invalid(t) => write!(
                f,
                "cannot parse {t:?}: expected a number with an optional unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB) or a percentage"
            ),
            Self::PercentOutOfRange(t) => write!(f, "{t:?} is not a percentage in (0, 100]"),
            Self::Overflow(t) => write!(f, "{t:?} is too large"),
        }
    }
}

impl std::error::Error for SizeError {}

/// Parses a byte count with an optional unit: "512", "512B", "1.5GiB", "400 MB".
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| SizeError::Invalid(text.to_string()))?;
    let multiplier: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(SizeError::Invalid(text.to_string())),
    };
    let bytes = number * multiplier;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(SizeError::Overflow(text.to_string()));
    }
    Ok(bytes.round() as u64)
}

/// Formats bytes with a binary unit and three significant digits: "1.23 GiB".
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else if value >= 100.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else if value >= 10.0 {
        format!("{value:.1} {}", UNITS[unit])
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

/// How long an idle model stays resident.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAlive {
    /// Never unloaded for being idle (it can still be evicted to make room).
    Forever,
    /// Unloaded after this many idle milliseconds; 0 unloads as soon as the last request ends.
    Millis(u64),
}

impl KeepAlive {
    /// The default: 30 minutes, chosen on purpose. Ollama's default is 5 minutes and LM Studio's 60; ult
    /// evicts idle models by cost as soon as memory is wanted, so a longer keep-alive costs nothing under
    /// pressure and saves reloads when there is room.
    pub const DEFAULT: Self = Self::Millis(30 * 60 * 1000);

    /// Parses "never", "0", "30m", "90s", "2h", "1500ms".
    pub fn parse(text: &str) -> Result<Self, SizeError> {
        let text = text.trim();
        if matches!(text, "never" | "forever" | "-1") {
            return Ok(Self::Forever);
        }
        parse_duration_ms(text).map(Self::Millis)
    }

    /// Milliseconds, with -1 for forever (the wire form).
    pub fn as_wire_ms(&self) -> i64 {
        match self {
            Self::Forever => -1,
            Self::Millis(ms) => i64::try_from(*ms).unwrap_or(i64::MAX),
        }
    }
}

/// Parses a duration: "0", "1500ms", "90s", "30m", "2h", "1d", or several of them run together as Go
/// writes durations ("1h30m", "2m30.5s"); a bare number is seconds.
pub fn parse_duration_ms(text: &str) -> Result<u64, SizeError> {
    let text = text.trim();
    let invalid = || SizeError::Invalid(text.to_string());
    if text.is_empty() {
        return Err(invalid());
    }
    let mut ms = 0.0f64;
    let mut rest = text;
    while !rest.is_empty() {
        let split = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, tail) = rest.split_at(split);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let number: f64 = number.parse().map_err(|_| invalid())?;
        let ms_per_unit = match unit.trim() {
            "" if split == text.len() => 1e3,
            "ns" => 1e-6,
            "us" | "µs" => 1e-3,
            "ms" => 1.0,
            "s" => 1e3,
            "m" | "min" => 60e3,
            "h" => 3600e3,
            "d" => 86_400e3,
            _ => return Err(invalid()),
        };
        ms += number * ms_per_unit;
        rest = next;
    }
    if !ms.is_finite() || ms >= u64::MAX as f64 {
        return Err(SizeError::Overflow(text.to_string()));
    }
    Ok(ms.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_size(text: &str, expected: Result<u64, ()>) {
        assert_eq!(parse_size(text).map_err(|_| ()), expected, "{text}");
    }

    #[test]
    fn sizes() {
        check_size("0", Ok(0));
        check_size("512", Ok(512));
        check_size("512B", Ok(512));
        check_size("1KiB", Ok(1024));
        check_size("1.5GiB", Ok(1_610_612_736));
        check_size("440GiB", Ok(440 * 1024 * 1024 * 1024));
        check_size("400 MB", Ok(400_000_000));
        check_size("2tb", Ok(2_000_000_000_000));
        check_size("", Err(()));
        check_size("GiB", Err(()));
        check_size("12 parsecs", Err(()));
        check_size("-5GiB", Err(()));
        check_size("1e30TiB", Err(()));
        check_size("99999999999999999999999TiB", Err(()));
    }

    #[test]
    fn specs() {
        assert_eq!(SizeSpec::parse("85%"), Ok(SizeSpec::Percent(85.0)));
        assert_eq!(SizeSpec::parse("85%").map(|s| s.resolve(1000)), Ok(850));
        assert_eq!(SizeSpec::parse("4GiB").map(|s| s.resolve(1)), Ok(4 << 30));
        assert!(SizeSpec::parse("0%").is_err());
        assert!(SizeSpec::parse("101%").is_err());
        assert!(SizeSpec::parse("x%").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(KeepAlive::parse("never"), Ok(KeepAlive::Forever));
        assert_eq!(KeepAlive::parse("0"), Ok(KeepAlive::Millis(0)));
        assert_eq!(KeepAlive::parse("30m"), Ok(KeepAlive::Millis(1_800_000)));
        assert_eq!(KeepAlive::parse("90s"), Ok(KeepAlive::Millis(90_000)));
        assert_eq!(KeepAlive::parse("1500ms"), Ok(KeepAlive::Millis(1500)));
        assert_eq!(KeepAlive::parse("2h"), Ok(KeepAlive::Millis(7_200_000)));
        assert!(KeepAlive::parse("soon").is_err());
        assert!(KeepAlive::parse("5 fortnights").is_err());
        // Go's compound durations, as Ollama clients send them.
        assert_eq!(parse_duration_ms("1h30m"), Ok(5_400_000));
        assert_eq!(parse_duration_ms("2m30.5s"), Ok(150_500));
        assert!(parse_duration_ms("1h30").is_err());
        assert!(parse_duration_ms("").is_err());
    }

    #[test]
    fn formatting() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(1024), "1.00 KiB");
        assert_eq!(format_bytes(98_362_432), "93.8 MiB");
        assert_eq!(format_bytes(440 << 30), "440 GiB");
    }
}
