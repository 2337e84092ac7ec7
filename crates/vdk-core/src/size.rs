//! Sizes given by people: `4096`, `100M`, `1.5G`, `10GiB`, as `qemu-img` reads them (binary
//! units).

use std::fmt;

/// A size that could not be read.
#[derive(Debug, Eq, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SizeError {
    /// Nothing before the unit, or not a number.
    #[error("invalid size {0:?}: expected a number with an optional unit, like 512, 100M or 1.5G")]
    NotANumber(String),
    /// A unit we do not know.
    #[error("invalid size {0:?}: unknown unit {1:?} (use K, M, G, T, P or E, optionally with iB)")]
    Unit(String, String),
    /// More than 2^64 - 1 bytes.
    #[error("invalid size {0:?}: too large")]
    TooLarge(String),
}

/// Parses a size in bytes. Units are powers of 1024; `K`, `KB`, `KiB` mean the same, case
/// does not matter. A fraction must come to a whole number of bytes.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        "e" | "eb" | "eib" => 60,
        _ => return Err(SizeError::Unit(text.into(), unit.trim().into())),
    };
    let bad = || SizeError::NotANumber(text.into());
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && frac.is_empty() {
        return Err(bad());
    }
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| bad())?
    };
    let mut bytes = whole
        .checked_shl(shift)
        .ok_or_else(|| SizeError::TooLarge(text.into()))?;
    if !frac.is_empty() {
        let digits: u32 = frac.len().try_into().map_err(|_| bad())?;
        let f: u128 = frac.parse().map_err(|_| bad())?;
        let scale = 10u128.checked_pow(digits).ok_or_else(bad)?;
        let part = f.checked_shl(shift).ok_or_else(bad)?;
        if part % scale != 0 {
            return Err(SizeError::NotANumber(text.into()));
        }
        bytes += part / scale;
    }
    u64::try_from(bytes).map_err(|_| SizeError::TooLarge(text.into()))
}

/// A size printed for people: `1 GiB`, `1.5 MiB`, `512 B`.
#[derive(Clone, Copy, Debug)]
pub struct Human(pub u64);

impl fmt::Display for Human {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
        let mut unit = 0;
        while unit + 1 < UNITS.len() && self.0 >= 1u64 << (10 * (unit + 1)) {
            unit += 1;
        }
        if unit == 0 {
            return write!(f, "{} B", self.0);
        }
        // Exact enough for display: the f64 rounding is below the one decimal shown.
        #[allow(clippy::cast_precision_loss)]
        let v = self.0 as f64 / (1u64 << (10 * unit)) as f64;
        if v.fract() == 0.0 {
            write!(f, "{v:.0} {}", UNITS[unit])
        } else {
            write!(f, "{v:.1} {}", UNITS[unit])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_number_is_bytes() {
        assert_eq!(parse_size("4096"), Ok(4096));
    }

    #[test]
    fn units_are_binary_and_case_insensitive() {
        assert_eq!(parse_size("100M"), Ok(100 << 20));
        assert_eq!(parse_size("4g"), Ok(4 << 30));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
    }

    #[test]
    fn fraction_of_a_unit_is_accepted() {
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
    }

    #[test]
    fn unknown_unit_is_named_in_the_error() {
        let e = parse_size("10XB").unwrap_err();
        assert_eq!(e, SizeError::Unit("10XB".into(), "XB".into()));
        assert!(e.to_string().contains("unknown unit \"XB\""));
    }

    #[test]
    fn empty_and_negative_sizes_are_refused() {
        assert!(parse_size("").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("G").is_err());
    }

    #[test]
    fn size_beyond_u64_is_too_large() {
        assert_eq!(parse_size("16E"), Err(SizeError::TooLarge("16E".into())));
    }

    #[test]
    fn human_sizes_pick_the_largest_unit() {
        assert_eq!(Human(1 << 30).to_string(), "1 GiB");
        assert_eq!(Human(3 << 19).to_string(), "1.5 MiB");
        assert_eq!(Human(100).to_string(), "100 B");
    }
}
