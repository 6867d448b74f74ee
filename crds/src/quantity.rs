//! Kubernetes resource quantities (`10Gi`, `500m`, `1.5e3`) as numbers.

/// Parses a Kubernetes quantity (`10Gi`, `500m`, `1.5e3`, `2`) into its value (bytes or cores).
pub fn parse_quantity_bytes(q: &str) -> Option<f64> {
    let q = q.trim();
    let split = q
        .find(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E')
        .unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let value: f64 = num.parse().ok()?;
    let mult = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        _ => return None,
    };
    let v = value * mult;
    v.is_finite().then_some(v)
}

#[cfg(test)]
mod tests {
    use super::parse_quantity_bytes;

    #[test]
    fn quantities_parse_with_binary_and_decimal_suffixes() {
        assert_eq!(parse_quantity_bytes("10Gi"), Some(10.0 * 1024f64.powi(3)));
        assert_eq!(parse_quantity_bytes("500m"), Some(0.5));
        assert_eq!(parse_quantity_bytes("1.5e3"), Some(1500.0));
        assert_eq!(parse_quantity_bytes(" 2 "), Some(2.0));
        assert_eq!(parse_quantity_bytes("2X"), None);
        assert_eq!(parse_quantity_bytes("Gi"), None);
    }
}
