//! The TLS 1.3 record layer for application data (RFC 8446, section 5.2), done here once
//! rustls has finished the handshake, as kernel TLS would do it: rustls negotiates and hands
//! over the traffic secrets (`dangerous_extract_secrets`, its kTLS entry point), and records
//! are sealed and opened in place in the stream's own buffers with `ring`'s AEADs.
//!
//! Why by hand: rustls's buffered connection copies every byte of a bulk transfer two more
//! times each way (its deframer reads 4 KiB at a time into a buffer that grows and shrinks per
//! record; sealed records are queued, then copied out), and this kernel has no kernel TLS
//! (`TCP_ULP "tls"` is ENOENT) to take the work. What the wire carries is unchanged: the
//! records a rustls peer would send and accept (tested against rustls itself).
//!
//! A record: a 5-byte header (type 23, legacy version 0x0303, length), then the AEAD of
//! `content || content type` with the header as additional data, under the nonce `iv XOR seq`
//! (the sequence number, big-endian, in the last 8 bytes). No padding is sent; padding
//! received is removed. Key updates are not supported: a peer that sends one (or any other
//! handshake message) is refused, and a connection stops at [`MAX_RECORDS`] records each way,
//! under AES-GCM's confidentiality limit (2^24.5 records).

use std::ops::Range;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::ConnectionTrafficSecrets;
use thiserror::Error;

/// A record's header.
pub(super) const HEADER: usize = 5;
/// The most plaintext a record carries.
pub(super) const MAX_PLAIN: usize = 1 << 14;
/// The longest record body accepted (RFC 8446: 2^14 + 256).
pub(super) const MAX_BODY: usize = MAX_PLAIN + 256;
/// The AEAD tag.
const TAG: usize = 16;
/// Records sealed or opened with one key at most.
pub const MAX_RECORDS: u64 = 1 << 24;

/// Content types.
pub(super) const APPLICATION_DATA: u8 = 23;
pub(super) const ALERT: u8 = 21;
pub(super) const HANDSHAKE: u8 = 22;
const CHANGE_CIPHER_SPEC: u8 = 20;

/// A record could not be sealed or opened.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RecordError {
    /// The header is not that of a TLS record (type, version or length out of range).
    #[error("not a TLS record header: {0:02x?}")]
    Header([u8; HEADER]),
    /// The record did not authenticate (damaged, forged, or out of order).
    #[error("a TLS record did not authenticate (damaged or forged)")]
    Forged,
    /// The decrypted record carries no content type.
    #[error("a TLS record has no content type")]
    NoType,
    /// The key's record limit was reached (no key update here).
    #[error(
        "the TLS connection reached its limit of {MAX_RECORDS} records; migrate over a new connection"
    )]
    Limit,
    /// The negotiated cipher suite is not one this layer seals.
    #[error("cipher suite not supported by the record layer")]
    Suite,
}

/// One direction's traffic key and sequence number.
pub(super) struct Keys {
    key: LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keys {{ seq: {} }}", self.seq)
    }
}

impl Keys {
    /// The key rustls handed over, at sequence number `seq`.
    pub(super) fn new(seq: u64, s: &ConnectionTrafficSecrets) -> Result<Keys, RecordError> {
        let (alg, key, iv) = match s {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(RecordError::Suite),
        };
        Keys::raw(alg, key.as_ref(), iv.as_ref(), seq)
    }

    fn raw(
        alg: &'static aead::Algorithm,
        key: &[u8],
        iv: &[u8],
        seq: u64,
    ) -> Result<Keys, RecordError> {
        let key = UnboundKey::new(alg, key).map_err(|_| RecordError::Suite)?;
        let iv: [u8; aead::NONCE_LEN] = iv.try_into().map_err(|_| RecordError::Suite)?;
        Ok(Keys {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The next nonce (and the sequence number moved on).
    fn nonce(&mut self) -> Result<Nonce, RecordError> {
        if self.seq >= MAX_RECORDS {
            return Err(RecordError::Limit);
        }
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        self.seq += 1;
        Ok(Nonce::assume_unique_for_key(n))
    }

    /// Append to `out` one record of content type `ty` whose content is what `fill` appends
    /// (at most [`MAX_PLAIN`] bytes; it is given `out` and must only append).
    pub(super) fn seal_with(
        &mut self,
        ty: u8,
        out: &mut Vec<u8>,
        fill: impl FnOnce(&mut Vec<u8>),
    ) -> Result<(), RecordError> {
        let start = out.len();
        out.extend_from_slice(&[APPLICATION_DATA, 3, 3, 0, 0]);
        fill(out);
        debug_assert!(out.len() - start - HEADER <= MAX_PLAIN);
        out.push(ty);
        let body = out.len() - start - HEADER + TAG;
        out[start + 3..start + HEADER].copy_from_slice(&(body as u16).to_be_bytes());
        let nonce = match self.nonce() {
            Ok(n) => n,
            Err(e) => {
                out.truncate(start);
                return Err(e);
            }
        };
        let header: [u8; HEADER] = out[start..start + HEADER].try_into().expect("5 bytes");
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), &mut out[start + HEADER..])
            .map_err(|_| RecordError::Forged)?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Open the record `rec` (header and body, as [`record_len`] measured) in place: its
    /// content type, and where its content lies in `rec`.
    pub(super) fn open(&mut self, rec: &mut [u8]) -> Result<(u8, Range<usize>), RecordError> {
        let header: [u8; HEADER] = rec[..HEADER].try_into().expect("a whole record");
        let nonce = self.nonce()?;
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(header), &mut rec[HEADER..])
            .map_err(|_| RecordError::Forged)?;
        // content || type || zeros
        let end = plain
            .iter()
            .rposition(|&b| b != 0)
            .ok_or(RecordError::NoType)?;
        Ok((plain[end], HEADER..HEADER + end))
    }
}

/// The crypto alone of moving `bytes` over TLS, on this thread: sealing them into full
/// records and opening them again with the suite the migration negotiates (AES-128-GCM),
/// through the same code as the stream, without any socket. A floor for what TLS can add to
/// a transfer whose threads share one core (`faultline bench migrate --security plain,tls`).
pub fn crypto_cost(bytes: u64) -> std::time::Duration {
    let k = [0x5a; 16];
    let iv = [0xa5; aead::NONCE_LEN];
    let (Ok(mut tx), Ok(mut rx)) = (
        Keys::raw(&aead::AES_128_GCM, &k, &iv, 0),
        Keys::raw(&aead::AES_128_GCM, &k, &iv, 0),
    ) else {
        return std::time::Duration::ZERO;
    };
    let page = vec![0x3cu8; MAX_PLAIN];
    let mut out = Vec::with_capacity(HEADER + MAX_BODY);
    let t = std::time::Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = (left as usize).min(MAX_PLAIN);
        out.clear();
        let sealed = tx.seal_with(APPLICATION_DATA, &mut out, |o| {
            o.extend_from_slice(&page[..n])
        });
        if sealed.is_err() || rx.open(&mut out).is_err() {
            break;
        }
        left -= n as u64;
    }
    t.elapsed()
}

/// The length (header included) of the record at the front of `buf`, once its header is
/// there; the header is checked first (any content type the handshake uses; version 0x0303;
/// a body of at most [`MAX_BODY`] bytes).
pub(super) fn record_len(buf: &[u8]) -> Result<Option<usize>, RecordError> {
    let Some(h) = buf.get(..HEADER) else {
        return Ok(None);
    };
    let h: [u8; HEADER] = h.try_into().expect("5 bytes");
    let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
    let typed = matches!(
        h[0],
        APPLICATION_DATA | ALERT | HANDSHAKE | CHANGE_CIPHER_SPEC
    );
    if !typed || h[1] != 3 || len > MAX_BODY {
        return Err(RecordError::Header(h));
    }
    Ok(Some(HEADER + len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::cipher::{AeadKey, Iv};

    fn keys(seq: u64) -> Keys {
        let s = ConnectionTrafficSecrets::Aes256Gcm {
            key: AeadKey::from([7u8; 32]),
            iv: Iv::from([9u8; 12]),
        };
        Keys::new(seq, &s).unwrap()
    }

    #[test]
    fn sealed_records_open_in_order_and_only_in_order() {
        let (mut tx, mut rx) = (keys(0), keys(0));
        let mut out = Vec::new();
        for msg in [&b"hello"[..], &[0u8; MAX_PLAIN][..], b""] {
            tx.seal_with(APPLICATION_DATA, &mut out, |o| o.extend_from_slice(msg))
                .unwrap();
        }
        let mut at = 0;
        for want in [&b"hello"[..], &[0u8; MAX_PLAIN][..], b""] {
            let n = record_len(&out[at..]).unwrap().unwrap();
            let (ty, r) = rx.open(&mut out[at..at + n]).unwrap();
            assert_eq!(ty, APPLICATION_DATA);
            assert_eq!(&out[at..at + n][r], want);
            at += n;
        }
        // Out of order (a replay, or a record lost): it does not authenticate.
        let mut again = Vec::new();
        let mut tx2 = keys(0);
        tx2.seal_with(APPLICATION_DATA, &mut again, |o| o.extend_from_slice(b"x"))
            .unwrap();
        assert_eq!(rx.open(&mut again), Err(RecordError::Forged));
    }

    #[test]
    fn damage_is_caught_and_headers_are_bounded() {
        let (mut tx, mut rx) = (keys(5), keys(5));
        let mut out = Vec::new();
        tx.seal_with(APPLICATION_DATA, &mut out, |o| o.extend_from_slice(b"page"))
            .unwrap();
        out[7] ^= 1;
        assert_eq!(rx.open(&mut out), Err(RecordError::Forged));
        assert!(record_len(&[23, 3, 3, 0x41, 0x01]).is_err());
        assert!(record_len(&[99, 3, 3, 0, 1]).is_err());
        assert_eq!(record_len(&[23, 3, 3]), Ok(None));
        assert_eq!(
            record_len(&[23, 3, 3, 0x41, 0x00]),
            Ok(Some(HEADER + MAX_BODY))
        );
    }

    #[test]
    fn the_crypto_floor_is_measured() {
        let t = crypto_cost(4 << 20);
        assert!(
            t > std::time::Duration::ZERO && t < std::time::Duration::from_secs(5),
            "{t:?}"
        );
    }

    #[test]
    fn the_record_limit_stops_sealing() {
        let mut tx = keys(MAX_RECORDS);
        let mut out = Vec::new();
        assert_eq!(
            tx.seal_with(APPLICATION_DATA, &mut out, |o| o.push(1)),
            Err(RecordError::Limit)
        );
        assert!(out.is_empty());
    }
}
