//! The CONNECT/SNI/leaf path of interception (src/server/intercept.rs, src/server/mint.rs, SPEC 3
//! "HTTPS payloads"): a CONNECT target routes without panicking; its tunnel host, the SNI name of any
//! ClientHello (read by rustls as the tunnel reads it) checked against it, the URL of any request
//! target inside the tunnel (which names the tunnel's host and no other, over https), and the leaf
//! certificate's parameters for any host. The input: the CONNECT target, a newline, the request
//! target inside, a newline, then the bytes of the client's first TLS records.
#![no_main]

use cistern::config::Upstream;
use cistern::server::intercept::{inner_uri, sni_matches, tunnel_host};
use cistern::server::mint::leaf_params;
use cistern::server::route::{Route, Router};
use http::{Method, Uri};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |b| *b == b'\n');
    let (Some(connect), Some(target)) = (parts.next(), parts.next()) else {
        return;
    };
    let hello = parts.next().unwrap_or_default();
    let Ok(uri) = Uri::try_from(connect) else {
        return;
    };
    let strip = Upstream::default().strip_query;
    let router = Router {
        origins: &[],
        origin_scheme: "http",
        strip_query: &strip,
    };
    let authority = match router.route(&Method::CONNECT, &uri) {
        Ok(Route::Connect { authority }) => authority,
        Ok(_) => panic!("{uri}: a CONNECT routed elsewhere"),
        Err(e) => return assert!(e.status.is_client_error()),
    };
    let host = tunnel_host(authority.host());
    if let Ok(t) = Uri::try_from(target) {
        if let Ok(url) = inner_uri(&Method::GET, &t, &host) {
            assert_eq!(url.scheme_str(), Some("https"), "{t} -> {url}");
            assert_eq!(tunnel_host(url.host().unwrap_or("")), host, "{t} -> {url}");
            assert!(url.port_u16().is_none(), "{t} -> {url}");
            let again: Uri = url.to_string().parse().expect("reads back");
            assert_eq!(again, url);
        }
    }
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rd = hello;
    if acceptor.read_tls(&mut rd).is_ok() {
        if let Ok(Some(accepted)) = acceptor.accept() {
            let sni = accepted.client_hello().server_name().map(str::to_string);
            if sni_matches(sni.as_deref(), &host) {
                assert!(sni.is_none_or(|s| tunnel_host(&s) == host));
            }
        }
    }
    let _ = leaf_params(&host);
});
