//! Header names on the wire in their canonical case (SPEC 3). The connection writes names in title case
//! (`title_case_headers`), which is right for most (`Content-Length`, `Content-Range`, `Cache-Status`)
//! but writes `Etag` and `Www-Authenticate`. hyper spells a name as a response's header case map says
//! when the map has it, and title-cases the others; the map's type is private to hyper, so cistern gets
//! one the way hyper makes it: a client connection with `preserve_header_case` reads, from memory, a
//! response head that spells every exception right, and each response that carries an exception gets a
//! copy of that response's extensions (the map alone). The server connection needs no
//! `preserve_header_case`: hyper writes with a response's map whatever that option says, and the option
//! would only make it record each request's own spellings, a map per request for nothing.

use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::sync::LazyLock;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{Extensions, Response};
use hyper::rt::ReadBufCursor;

/// The names cistern may send whose canonical spelling is not their title case.
const EXCEPTIONS: &[&str] = &[
    "ETag",
    "WWW-Authenticate",
    "Content-MD5",
    "CDN-Cache-Control",
    "X-XSS-Protection",
    "X-UA-Compatible",
];

/// A map holds one spelling per occurrence: a name that a response may repeat gets this many, the
/// ones past them are title-cased.
const REPEATS: usize = 4;

/// Whether a response may repeat `name` (a list-valued challenge field).
fn repeatable(name: &str) -> bool {
    name == "WWW-Authenticate"
}

/// The extensions holding a case map of every exception; `None` if hyper would not make one (then
/// names go out in title case, and the tests say so).
static ALL: LazyLock<Option<Extensions>> = LazyLock::new(|| {
    let map = case_map(EXCEPTIONS);
    if map.is_none() {
        tracing::warn!("hyper made no header case map: ETag goes out as Etag");
    }
    map
});
/// The same for `ETag` alone, the one exception of nearly every hit: a smaller map to copy.
static ETAG: LazyLock<Option<Extensions>> = LazyLock::new(|| case_map(&["ETag"]));

/// Gives `res` the canonical spelling of the exceptions it carries. Per response: a look at each
/// name, and for one with an exception, a copy of a small map (a few allocations, no parsing).
pub fn canonical<B>(res: &mut Response<B>) {
    let (mut etag, mut other) = (false, false);
    for name in res.headers().keys() {
        match name.as_str() {
            "etag" => etag = true,
            n => other |= is_other_exception(n),
        }
    }
    let ext = match (etag, other) {
        (_, true) => ALL.as_ref(),
        (true, false) => ETAG.as_ref(),
        (false, false) => return,
    };
    if let Some(ext) = ext {
        res.extensions_mut().extend(ext.clone());
    }
}

/// Whether `name` (lower case) is one of [`EXCEPTIONS`] other than `ETag`.
fn is_other_exception(name: &str) -> bool {
    matches!(
        name,
        "www-authenticate"
            | "content-md5"
            | "cdn-cache-control"
            | "x-xss-protection"
            | "x-ua-compatible"
    )
}

/// A response head that spells `names` right.
fn canned_head(names: &[&str]) -> Vec<u8> {
    let mut head = b"HTTP/1.1 204 No Content\r\n".to_vec();
    for name in names {
        let n = if repeatable(name) { REPEATS } else { 1 };
        for _ in 0..n {
            head.extend_from_slice(name.as_bytes());
            head.extend_from_slice(b": x\r\n");
        }
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// Reads a [`canned_head`] through a hyper client connection that preserves header case, and keeps the
/// response's extensions: the case map, nothing else.
fn case_map(names: &[&str]) -> Option<Extensions> {
    let io = Canned {
        bytes: canned_head(names),
        pos: 0,
        asked: false,
    };
    let mut cx = Context::from_waker(Waker::noop());
    let mut builder = hyper::client::conn::http1::Builder::new();
    builder.preserve_header_case(true);
    let handshake = pin!(builder.handshake::<_, http_body_util::Empty<Bytes>>(io));
    let Poll::Ready(Ok((mut send, conn))) = handshake.poll(&mut cx) else {
        return None;
    };
    let mut conn = pin!(conn);
    let mut res = pin!(send.send_request(http::Request::new(http_body_util::Empty::new())));
    let mut conn_done = false;
    // Everything is in memory: a few polls suffice; the bound only guards against a hyper change.
    for _ in 0..32 {
        if !conn_done {
            conn_done = conn.as_mut().poll(&mut cx).is_ready();
        }
        if let Poll::Ready(r) = res.as_mut().poll(&mut cx) {
            let mut res = r.ok()?;
            let ext = std::mem::take(res.extensions_mut());
            return (ext.len() == 1).then_some(ext);
        }
    }
    None
}

/// A connection that swallows the request and then answers [`canned_head`] (a client connection
/// refuses a response that comes before its request).
struct Canned {
    bytes: Vec<u8>,
    pos: usize,
    asked: bool,
}

impl hyper::rt::Read for Canned {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        mut buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.asked {
            // The caller polls again without a wake-up.
            return Poll::Pending;
        }
        let rest = self.bytes.get(self.pos..).unwrap_or_default();
        let n = rest.len().min(buf.remaining());
        buf.put_slice(&rest[..n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl hyper::rt::Write for Canned {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.asked = true;
        Poll::Ready(Ok(b.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use http_body_util::Full;
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The head of `res` as a title-casing hyper server connection writes it.
    async fn wire(mut res: Response<Full<Bytes>>) -> String {
        canonical(&mut res);
        let (client, server) = tokio::io::duplex(1 << 16);
        let res = std::sync::Mutex::new(Some(res));
        let svc = hyper::service::service_fn(move |_req| {
            let r = res.lock().unwrap().take().unwrap_or_default();
            async move { Ok::<_, std::convert::Infallible>(r) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .title_case_headers(true)
            .serve_connection(TokioIo::new(server), svc);
        let serve = tokio::spawn(conn);
        let mut client = client;
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        let _ = serve.await;
        let out = String::from_utf8(out).unwrap();
        out.split("\r\n\r\n").next().unwrap().to_string()
    }

    fn with(headers: &[(&'static str, &'static str)]) -> Response<Full<Bytes>> {
        let mut r = Response::new(Full::new(Bytes::from_static(b"hello")));
        for (n, v) in headers {
            r.headers_mut().append(*n, HeaderValue::from_static(v));
        }
        r
    }

    #[test]
    fn hyper_makes_the_case_maps() {
        assert!(ALL.is_some(), "hyper no longer hands out a header case map");
        assert!(ETAG.is_some());
    }

    #[test]
    fn the_exceptions_are_the_names_title_case_gets_wrong() {
        for name in EXCEPTIONS {
            let lower = name.to_ascii_lowercase();
            assert!(lower == "etag" || is_other_exception(&lower), "{name}");
            let title: Vec<String> = lower
                .split('-')
                .map(|w| w[..1].to_ascii_uppercase() + &w[1..])
                .collect();
            assert_ne!(&title.join("-"), name);
        }
    }

    #[tokio::test]
    async fn an_etag_alone_or_with_other_exceptions_goes_out_canonical() {
        let head = wire(with(&[("etag", "\"e\""), ("content-length", "5")])).await;
        assert!(head.contains("\r\nETag: \"e\""), "{head:?}");
        assert!(head.contains("\r\nContent-Length: 5"), "{head:?}");
        let head = wire(with(&[("etag", "\"e\""), ("x-ua-compatible", "IE=edge")])).await;
        assert!(head.contains("\r\nETag: \"e\""), "{head:?}");
        assert!(head.contains("\r\nX-UA-Compatible: IE=edge"), "{head:?}");
    }

    #[tokio::test]
    async fn exceptions_go_out_canonical_and_the_rest_in_title_case() {
        let head = wire(with(&[
            ("etag", "\"a\""),
            ("www-authenticate", "Bearer"),
            ("www-authenticate", "Basic"),
            ("content-md5", "x"),
            ("cache-status", "cistern; hit"),
            ("repr-digest", "sha-256=:x:"),
            ("accept-ranges", "bytes"),
            ("x-ms-request-id", "1"),
        ]))
        .await;
        for line in [
            "\r\nETag: \"a\"",
            "\r\nWWW-Authenticate: Bearer",
            "\r\nWWW-Authenticate: Basic",
            "\r\nContent-MD5: x",
            "\r\nCache-Status: cistern; hit",
            "\r\nRepr-Digest: sha-256=:x:",
            "\r\nAccept-Ranges: bytes",
            "\r\nX-Ms-Request-Id: 1",
            "\r\nContent-Length: 5",
        ] {
            assert!(head.contains(line), "{line:?} not in {head:?}");
        }
    }

    #[tokio::test]
    async fn a_response_without_exceptions_is_left_alone() {
        let mut r = with(&[("cache-status", "x")]);
        canonical(&mut r);
        assert!(r.extensions().is_empty());
        let head = wire(r).await;
        assert!(head.contains("\r\nCache-Status: x"), "{head:?}");
    }

    #[tokio::test]
    async fn more_repeats_than_spellings_fall_back_to_title_case() {
        let names = [("www-authenticate", "a"); REPEATS + 1];
        let head = wire(with(&names)).await;
        assert_eq!(head.matches("\r\nWWW-Authenticate: a").count(), REPEATS);
        assert!(head.contains("\r\nWww-Authenticate: a"), "{head:?}");
    }
}
