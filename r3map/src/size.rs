//! Sizes written by people: `1GiB`, `512MiB`, `4096`.

/// Parses a byte count with optional binary or decimal unit (`1GiB`, `1G`, `64k`).
/// Single-letter units are binary (1G = 1 GiB), as in dd and qemu-img.
pub fn parse(s: &str) -> Result<u64, String> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(s.trim())
        .map_err(|e| format!("invalid size {s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn units() {
        assert_eq!(parse("4096").unwrap(), 4096);
        assert_eq!(parse("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse("1G").unwrap(), 1 << 30);
        assert_eq!(parse("64k").unwrap(), 64 << 10);
        assert_eq!(parse("256MiB").unwrap(), 256 << 20);
        assert!(parse("lots").is_err());
        assert!(parse("-1").is_err());
    }
}
