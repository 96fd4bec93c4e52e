//! Migration frames: a stream of frames as the destination or the source reads them
//! (`xfer::wire::read_frame`, which decodes and bounds the header before a payload byte is
//! read), each payload then given to the parser its kind has on the receiving side.

use xfer::bitmap::{bytes_to_words, words_to_bytes};
use xfer::precopy::Precopied;
use xfer::proto::{Hello, HelloAck};
use xfer::wire::{Header, Kind, MAX_RUN, read_frame};

use vmm::migration::{DestReport, End, Switch, parse_verdict, peer_text};

use super::{json_round_trip, json_round_trip_with};

/// Guest pages of the pretend destination (Zero and Pages frames are applied to it).
const PAGES: u64 = 1024;
/// Frames read from one input at most.
const MAX_FRAMES: usize = 64;

/// Read up to [`MAX_FRAMES`] frames from `data` and parse each payload; `true` if at least one
/// frame was read.
pub fn frames(data: &[u8]) -> bool {
    let mut r = data;
    let mut buf = Vec::new();
    let mut pre = Precopied::new(PAGES);
    let mut read = 0;
    while read < MAX_FRAMES {
        let Ok(h) = read_frame(&mut r, &mut buf) else {
            break;
        };
        read += 1;
        assert_eq!(Header::decode(&h.encode()), Ok(h), "header round trip");
        assert_eq!(buf.len(), h.len as usize, "payload of the announced length");
        payload(&h, &buf, &mut pre);
    }
    read > 0
}

/// Parse one payload as its kind's receiver does; `true` if it parsed.
pub fn payload(h: &Header, p: &[u8], pre: &mut Precopied) -> bool {
    match h.kind {
        Kind::Hello => json_round_trip_with(p, |mut v: Hello| {
            // Free-form (the embedding program's configuration): its floats need not survive
            // the JSON library bit for bit.
            v.config = None;
            v
        }),
        Kind::HelloAck => json_round_trip::<HelloAck>(p),
        Kind::Switch => json_round_trip::<Switch>(p),
        Kind::End => json_round_trip::<End>(p),
        // Floats (latencies): parsed, re-encoded and parsed again, not compared to the bit.
        Kind::Done => json_round_trip_with(p, |_: DestReport| ()),
        Kind::Verdict => match parse_verdict(p) {
            Ok(v) => {
                let e = serde_json::to_vec(&v).expect("encodes");
                assert_eq!(parse_verdict(&e).ok(), Some(v), "Verdict round trip");
                true
            }
            Err(_) => false,
        },
        Kind::Error | Kind::Cancel => {
            let t = peer_text(p);
            assert!(t.len() <= 4 * 4096, "peer text is bounded");
            true
        }
        Kind::Request | Kind::Resend => xfer::wire::count(h.kind, p, MAX_RUN as u32).is_ok(),
        Kind::Zero | Kind::Pages => {
            let mut sum = 0u64;
            let ok = pre
                .apply(h, p, |page, bytes| {
                    assert!(page < PAGES, "a page outside memory was written");
                    assert_eq!(bytes.len() % 4096, 0, "whole pages");
                    sum += bytes.len() as u64;
                })
                .is_ok();
            assert!(sum <= PAGES * 4096);
            ok
        }
        Kind::Needed | Kind::Recover => {
            // The receiver knows its page count; try the one the payload fits, less the
            // argument's low bits (a partial last word).
            let pages = (p.len() as u64 * 8).saturating_sub(h.arg % 64);
            match bytes_to_words(p, pages) {
                Some(w) => {
                    assert_eq!(words_to_bytes(&w), p, "bitmap round trip");
                    true
                }
                None => false,
            }
        }
        Kind::State => vmm::snapshot::state::decode(p, 1 + (h.arg % 4) as usize).is_ok(),
        // Round's `{round, pages}` and Resumed's `{}` are not parsed by their receivers;
        // Keepalive has no payload.
        Kind::Round | Kind::Resumed | Kind::Keepalive => true,
    }
}
