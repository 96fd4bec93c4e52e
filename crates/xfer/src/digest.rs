//! The memory digest both sides compute at switchover: the wrapping sum, over non-zero pages,
//! of a mix of the page number and the page's CRC-32. Pages are hashed from buffers the
//! caller read (through a [`PageReader`](crate::reader::PageReader) for live memory).

/// A page's hash: 0 for a zero page, else its CRC-32 with bit 32 set.
pub fn page_hash(page: &[u8]) -> u64 {
    if is_zero(page) {
        0
    } else {
        u64::from(crc32fast::hash(page)) | 1 << 32
    }
}

/// One page's contribution to the digest (0 for a zero page).
pub fn mix(page: u64, h: u64) -> u64 {
    if h == 0 {
        return 0;
    }
    let mut x = page.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ h;
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^ (x >> 29)
}

/// The digest of pages given as `(page number, hash)`.
pub fn digest(hashes: impl IntoIterator<Item = (u64, u64)>) -> u64 {
    hashes
        .into_iter()
        .fold(0u64, |d, (p, h)| d.wrapping_add(mix(p, h)))
}

/// Whether every byte is zero.
pub fn is_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(8);
    chunks
        .by_ref()
        .all(|c| u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) == 0)
        && chunks.remainder().iter().all(|&x| x == 0)
}

/// Serde adapter: a `u64` digest as a `"0x%016x"` string in JSON (as protocol version 1
/// sends it), parsed back from such a string.
///
/// ```
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct Verdict {
///     #[serde(with = "xfer::digest::hex")]
///     digest: u64,
/// }
/// let v: Verdict = serde_json::from_str(r#"{"digest":"0x00000000000000ff"}"#).unwrap();
/// assert_eq!(v.digest, 255);
/// assert_eq!(serde_json::to_string(&v).unwrap(), r#"{"digest":"0x00000000000000ff"}"#);
/// ```
pub mod hex {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    /// Serialize as `"0x%016x"`.
    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v:#018x}"))
    }

    /// Parse `"0x.."` (hex digits, at most 16).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).ok_or_else(|| D::Error::custom(format!("'{s}' is not a 0x-prefixed hex u64")))
    }

    /// Parse `"0x.."`.
    pub fn parse(s: &str) -> Option<u64> {
        let h = s.strip_prefix("0x")?;
        if h.is_empty() || h.len() > 16 {
            return None;
        }
        u64::from_str_radix(h, 16).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_parts() {
        let z = vec![0u8; 4096];
        let mut d = vec![0u8; 4096];
        assert_eq!(page_hash(&z), 0);
        d[4095] = 1;
        assert!(!is_zero(&d));
        assert!(is_zero(&d[..4095]));
        assert_ne!(page_hash(&d), 0);
        assert_eq!(mix(3, 0), 0);
        assert_ne!(mix(3, page_hash(&d)), mix(4, page_hash(&d)));
        assert_eq!(digest([(3, page_hash(&d)), (4, 0)]), mix(3, page_hash(&d)));
        assert_eq!(hex::parse("0xff"), Some(255));
        assert_eq!(hex::parse("ff"), None);
        assert_eq!(hex::parse("0x"), None);
        assert_eq!(hex::parse("0x1ffffffffffffffff"), None);
    }
}
