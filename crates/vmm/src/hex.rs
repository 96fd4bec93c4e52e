//! Serde adapters that write 64-bit values as `"0x…"` hex strings (JSON numbers lose 64-bit
//! precision in most readers) and read them back. Values are `u64` everywhere else.

use serde::{Deserialize, Deserializer, Serializer, de::Error};

/// Format as `0x` and 16 hex digits.
pub fn fmt(v: u64) -> String {
    format!("{v:#018x}")
}

/// Parse `0x…` (or bare) hex.
pub fn parse(s: &str) -> Option<u64> {
    let h = s.strip_prefix("0x").unwrap_or(s);
    if h.is_empty() || h.len() > 16 {
        return None;
    }
    u64::from_str_radix(h, 16).ok()
}

fn de_one<'de, D: Deserializer<'de>>(s: &str) -> Result<u64, D::Error> {
    parse(s).ok_or_else(|| D::Error::custom(format!("{s:?} is not a 64-bit hex value")))
}

/// `u64` as hex.
pub mod u64_hex {
    use super::*;

    /// Serialize.
    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&fmt(*v))
    }

    /// Deserialize.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        de_one::<D>(&String::deserialize(d)?)
    }
}

/// `Option<u64>` as hex or null.
pub mod opt {
    use super::*;

    /// Serialize.
    pub fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_some(&fmt(*v)),
            None => s.serialize_none(),
        }
    }

    /// Deserialize.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| de_one::<D>(&s))
            .transpose()
    }
}

/// `Vec<u64>` as a list of hex strings.
pub mod vec {
    use super::*;
    use serde::ser::SerializeSeq;

    /// Serialize.
    pub fn serialize<S: Serializer>(v: &[u64], s: S) -> Result<S::Ok, S::Error> {
        let mut q = s.serialize_seq(Some(v.len()))?;
        for x in v {
            q.serialize_element(&fmt(*x))?;
        }
        q.end()
    }

    /// Deserialize.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|s| de_one::<D>(s))
            .collect()
    }
}

/// `Option<Vec<u64>>` as a list of hex strings or null.
pub mod opt_vec {
    use super::*;

    /// Serialize.
    pub fn serialize<S: Serializer>(v: &Option<Vec<u64>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_some(&v.iter().map(|x| fmt(*x)).collect::<Vec<_>>()),
            None => s.serialize_none(),
        }
    }

    /// Deserialize.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u64>>, D::Error> {
        Option::<Vec<String>>::deserialize(d)?
            .map(|v| v.iter().map(|s| de_one::<D>(s)).collect())
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct T {
        #[serde(with = "super::u64_hex")]
        a: u64,
        #[serde(with = "super::opt")]
        b: Option<u64>,
        #[serde(with = "super::vec")]
        c: Vec<u64>,
        #[serde(with = "super::opt_vec", default)]
        d: Option<Vec<u64>>,
    }

    #[test]
    fn round_trip_and_bad_input() {
        let t = T {
            a: u64::MAX,
            b: Some(1),
            c: vec![0, 0xdead_beef],
            d: None,
        };
        let j = serde_json::to_string(&t).unwrap();
        assert_eq!(
            j,
            r#"{"a":"0xffffffffffffffff","b":"0x0000000000000001","c":["0x0000000000000000","0x00000000deadbeef"],"d":null}"#
        );
        assert_eq!(serde_json::from_str::<T>(&j).unwrap(), t);
        assert!(serde_json::from_str::<T>(r#"{"a":"0xzz","b":null,"c":[]}"#).is_err());
        assert!(
            serde_json::from_str::<T>(r#"{"a":"0x11112222333344445","b":null,"c":[]}"#).is_err()
        );
        assert_eq!(super::parse("ff"), Some(255));
        assert_eq!(super::parse(""), None);
    }
}
