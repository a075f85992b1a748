//! Answers to a request for several ranges (RFC 9110 §14.6, SPEC 4 "Ranges"): which ranges are served
//! (the bounds against abuse, the merging of overlapping and near ranges), the `multipart/byteranges`
//! framing around them with its exact length known before the first byte, and the body that carries
//! the parts, from a stored object (a zero-copy slice of its mapping per part) or from a fill in flight
//! (each part read as its bytes arrive).

use std::collections::VecDeque;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;

use super::body::{Body, BodyError};
use super::range::{ByteRange, Resolved};
use crate::fetch::FlightReader;

/// Ranges closer than this are sent as one part: a part's own header costs about as much (RFC 9110
/// §14.3 lets a server coalesce ranges separated by a gap smaller than the overhead of a part).
pub const MERGE_GAP: u64 = 80;

/// How a set of ranges is answered against an object of known size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// 200 with the whole body: too many ranges, a set that covers the object more than twice over, or
    /// a suffix range on an empty object.
    Whole,
    /// A plain 206 of bytes [start, end): what is left when the ranges merge into one.
    One { start: u64, end: u64 },
    /// 206 `multipart/byteranges`, one part per [start, end), in the order asked.
    Many(Vec<(u64, u64)>),
    /// 416: no range of the set is satisfiable.
    Unsatisfiable,
}

/// Decides how `set` (two or more ranges, as asked) is answered on an object of `size` bytes.
/// Unsatisfiable members are left out (RFC 9110 §14.2); when none is left, 416.
pub fn plan(set: &[ByteRange], size: u64, max_ranges: usize) -> Plan {
    if set.len() > max_ranges {
        return Plan::Whole;
    }
    let mut spans = Vec::with_capacity(set.len());
    let mut asked: u64 = 0;
    let mut whole = false;
    for r in set {
        match r.resolve(size) {
            Resolved::Partial { start, end } => {
                asked = asked.saturating_add(end - start);
                spans.push((start, end));
            }
            Resolved::Whole => whole = true,
            Resolved::Unsatisfiable => {}
        }
    }
    if spans.is_empty() {
        return if whole {
            Plan::Whole
        } else {
            Plan::Unsatisfiable
        };
    }
    // A set that asks for the object more than twice over is a way to make a small request cost a
    // large answer (RFC 9110 §14.3): the whole body is cheaper for everyone.
    if asked > size.saturating_mul(2) {
        return Plan::Whole;
    }
    let merged = merge(&spans);
    match merged.as_slice() {
        [(start, end)] => Plan::One {
            start: *start,
            end: *end,
        },
        _ => Plan::Many(merged),
    }
}

/// Merges spans that overlap or lie within [`MERGE_GAP`] bytes of each other, whatever their order in
/// the set; each merged part takes the place of the first of its members that was asked, so that an
/// ascending set (what delta downloaders send) stays ascending and any set keeps its order asked.
fn merge(spans: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut order: Vec<usize> = (0..spans.len()).collect();
    order.sort_by_key(|&i| spans[i]);
    // (first index asked, start, end)
    let mut groups: Vec<(usize, u64, u64)> = Vec::new();
    for i in order {
        let (start, end) = spans[i];
        match groups.last_mut() {
            Some(g) if start <= g.2.saturating_add(MERGE_GAP) => {
                g.0 = g.0.min(i);
                g.2 = g.2.max(end);
            }
            _ => groups.push((i, start, end)),
        }
    }
    groups.sort_by_key(|g| g.0);
    groups.into_iter().map(|(_, s, e)| (s, e)).collect()
}

/// A piece of a response body: bytes cistern wrote (a part's header, the closing boundary) or a span of
/// the object's bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece {
    Text(Bytes),
    Span(u64, u64),
}

/// The `multipart/byteranges` framing of a set of parts: every part's header and the closing boundary
/// written once, into one buffer that the pieces are views of.
pub struct Layout {
    boundary: String,
    parts: Vec<(u64, u64)>,
    /// The framing text, part headers in order, then the closing boundary.
    text: Bytes,
    /// Where each part's header ends in `text` (the closing boundary follows the last).
    ends: Vec<usize>,
}

impl Layout {
    /// A layout with a fresh random boundary (128 bits: it cannot be guessed, so no object can hold it
    /// by design, RFC 2046 §5.1.1). `part_type` is the representation's Content-Type.
    pub fn new(parts: Vec<(u64, u64)>, size: u64, part_type: &str) -> Layout {
        let boundary = format!("{:032x}", rand::random::<u128>());
        Layout::with_boundary(boundary, parts, size, part_type)
    }

    pub fn with_boundary(
        boundary: String,
        parts: Vec<(u64, u64)>,
        size: u64,
        part_type: &str,
    ) -> Layout {
        use std::fmt::Write as _;
        let mut text = String::with_capacity(parts.len() * (boundary.len() + part_type.len() + 80));
        let mut ends = Vec::with_capacity(parts.len());
        for &(start, end) in &parts {
            // Writing to a String cannot fail.
            let _ = write!(
                text,
                "\r\n--{boundary}\r\nContent-Type: {part_type}\r\nContent-Range: bytes {start}-{}/{size}\r\n\r\n",
                end - 1
            );
            ends.push(text.len());
        }
        let _ = write!(text, "\r\n--{boundary}--\r\n");
        Layout {
            boundary,
            parts,
            text: Bytes::from(text),
            ends,
        }
    }

    /// The response's Content-Type.
    pub fn content_type(&self) -> String {
        format!("multipart/byteranges; boundary={}", self.boundary)
    }

    /// The body's exact length, for the Content-Length sent before the first part.
    pub fn length(&self) -> u64 {
        let bytes: u64 = self.parts.iter().map(|&(s, e)| e - s).sum();
        self.text.len() as u64 + bytes
    }

    /// The body as pieces, in order.
    pub fn pieces(&self) -> Vec<Piece> {
        let mut out = Vec::with_capacity(self.parts.len() * 2 + 1);
        let mut at = 0;
        for (&(s, e), &end) in self.parts.iter().zip(&self.ends) {
            out.push(Piece::Text(self.text.slice(at..end)));
            out.push(Piece::Span(s, e));
            at = end;
        }
        out.push(Piece::Text(self.text.slice(at..)));
        out
    }
}

/// A body of pieces from a stored object: `span(start, end)` gives a zero-copy slice of the object.
pub fn stored_body(pieces: Vec<Piece>, span: impl Fn(u64, u64) -> Bytes) -> Body {
    let bufs = pieces
        .into_iter()
        .map(|p| match p {
            Piece::Text(b) => b,
            Piece::Span(s, e) => span(s, e),
        })
        .collect();
    super::body::chain(bufs)
}

/// The state of a body streamed from a fill in flight.
struct Feed {
    reader: FlightReader,
    pieces: VecDeque<Piece>,
    /// The reader is positioned on a span not yet read to its end.
    reading: bool,
}

/// A body of pieces from a fill in flight: each span is read from the flight (memory, its mapping or
/// its file) as its bytes arrive; an error ends the body, which aborts the client's connection.
pub fn flight_body(reader: FlightReader, pieces: Vec<Piece>) -> Body {
    let feed = Feed {
        reader,
        pieces: pieces.into(),
        reading: false,
    };
    let s = futures_util::stream::unfold(Some(feed), |feed| async move {
        let mut f = feed?;
        loop {
            if f.reading {
                match f.reader.next().await {
                    Some(Ok(b)) => return Some((Ok(Frame::data(b)), Some(f))),
                    Some(Err(e)) => return Some((Err(BodyError(e.to_string())), None)),
                    None => f.reading = false,
                }
            }
            match f.pieces.pop_front()? {
                Piece::Text(b) => return Some((Ok(Frame::data(b)), Some(f))),
                Piece::Span(s, e) => {
                    f.reader.seek(s, Some(e));
                    f.reading = true;
                }
            }
        }
    });
    StreamBody::new(s).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::range::parse_set;

    fn p(v: &str, size: u64) -> Plan {
        plan(&parse_set(v).unwrap(), size, 200)
    }

    #[test]
    fn keeps_the_order_asked() {
        assert_eq!(
            p("bytes=500-599,0-99", 1000),
            Plan::Many(vec![(500, 600), (0, 100)])
        );
    }

    #[test]
    fn merges_overlapping_and_near_ranges() {
        assert_eq!(
            p("bytes=0-99,50-149,400-499", 1000),
            Plan::Many(vec![(0, 150), (400, 500)])
        );
        // A gap of 80 bytes merges; 81 does not.
        assert_eq!(
            p("bytes=0-99,180-199", 1000),
            Plan::One { start: 0, end: 200 }
        );
        assert_eq!(
            p("bytes=0-99,181-199", 1000),
            Plan::Many(vec![(0, 100), (181, 200)])
        );
        // Out of order members of one group: the group sits where its first member was asked.
        assert_eq!(
            p("bytes=900-949,300-399,0-99,350-450", 1000),
            Plan::Many(vec![(900, 950), (300, 451), (0, 100)])
        );
    }

    #[test]
    fn bounds_against_abuse() {
        let set = parse_set("bytes=0-0,100-100,200-200").unwrap();
        assert_eq!(plan(&set, 1000, 2), Plan::Whole);
        assert!(matches!(plan(&set, 1000, 3), Plan::Many(_)));
        // Three times the object, asked as overlapping ranges: whole.
        assert_eq!(p("bytes=0-99,0-99,0-99", 100), Plan::Whole);
        assert_eq!(p("bytes=0-99,0-99", 100), Plan::One { start: 0, end: 100 });
    }

    #[test]
    fn leaves_out_what_cannot_be_served() {
        assert_eq!(
            p("bytes=5000-6000,0-9,-5", 1000),
            Plan::Many(vec![(0, 10), (995, 1000)])
        );
        assert_eq!(p("bytes=5000-6000,2000-", 1000), Plan::Unsatisfiable);
        assert_eq!(p("bytes=0-5,-3", 0), Plan::Whole);
    }

    #[test]
    fn the_announced_length_is_the_length_sent() {
        let l = Layout::with_boundary("b0undary".into(), vec![(0, 3), (7, 10)], 10, "text/plain");
        let object = b"0123456789";
        let mut body = Vec::new();
        for piece in l.pieces() {
            match piece {
                Piece::Text(b) => body.extend_from_slice(&b),
                Piece::Span(s, e) => body.extend_from_slice(&object[s as usize..e as usize]),
            }
        }
        let want = "\r\n--b0undary\r\nContent-Type: text/plain\r\nContent-Range: bytes 0-2/10\r\n\r\n012\
                    \r\n--b0undary\r\nContent-Type: text/plain\r\nContent-Range: bytes 7-9/10\r\n\r\n789\
                    \r\n--b0undary--\r\n";
        assert_eq!(String::from_utf8_lossy(&body), want);
        assert_eq!(l.length(), body.len() as u64);
        assert_eq!(l.content_type(), "multipart/byteranges; boundary=b0undary");
    }
}
