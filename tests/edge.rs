//! Under IoT Edge (SPEC 8): with TLS on and no certificate files, the server certificate comes from the
//! workload API (common name IOTEDGE_GATEWAYHOSTNAME), and a child trusts its parent through the
//! workload API's trust bundle, and the cache-host form over TLS answers on that certificate (SPEC 3,
//! "HTTPS payloads"). The workload API here is a mock on a unix socket. This file holds one
//! test because it sets the process environment.

mod common;

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

fn issue(ca: &Ca, common_name: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![common_name.to_string()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
    (cert.pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_api_certificates_and_trust_bundle() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("workload.sock");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "edge test CA");
    let ca = Arc::new(Ca {
        cert: ca_params.self_signed(&ca_key).unwrap(),
        key: ca_key,
    });
    let asked: Arc<Mutex<Vec<String>>> = Default::default();

    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let (ca2, asked2) = (ca.clone(), asked.clone());
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                break;
            };
            let (ca, asked) = (ca2.clone(), asked2.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: http::Request<hyper::body::Incoming>| {
                        let (ca, asked) = (ca.clone(), asked.clone());
                        async move {
                            let path = req.uri().to_string();
                            asked.lock().unwrap().push(path.clone());
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let answer = if path.starts_with("/trust-bundle") {
                                serde_json::json!({"certificate": ca.cert.pem()})
                            } else {
                                let ask: serde_json::Value = serde_json::from_slice(&body).unwrap();
                                let (cert, key) = issue(&ca, ask["commonName"].as_str().unwrap());
                                serde_json::json!({"certificate": cert, "privateKey": {"type": "key", "bytes": key},
                                               "expiration": ask["expiration"]})
                            };
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                Bytes::from(answer.to_string()),
                            )))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    std::env::set_var("IOTEDGE_WORKLOADURI", format!("unix://{}", sock.display()));
    std::env::set_var("IOTEDGE_MODULEID", "cistern");
    std::env::set_var("IOTEDGE_MODULEGENERATIONID", "gen1");
    std::env::set_var("IOTEDGE_GATEWAYHOSTNAME", "127.0.0.1");

    let origin = Origin::start().await;
    let body = random_bytes(120_000, 61);
    origin.put("/e.bin", body.clone(), Behaviour::default());
    let top_dir = tempfile::tempdir().unwrap();
    let mut cfg = config(top_dir.path(), &origin, "");
    cfg.server.tls_listen = "127.0.0.1:0".into();
    // An https origin for the cache-host form over TLS (below), trusted through upstream.ca_file.
    let origin_pki = TestCa::new("origin CA");
    let (oc, ok) = origin_pki.issue(&["origin.test"]);
    let tls_origin = Origin::start_tls(tls_acceptor(&oc, &ok)).await;
    let fw = random_bytes(150_000, 62);
    let fresh = Behaviour {
        cache_control: Some("max-age=3600".into()),
        ..Default::default()
    };
    tls_origin.put("/filestreamingservice/files/fw.bin", fw.clone(), fresh);
    let origin_ca = top_dir.path().join("origin-ca.pem");
    std::fs::write(&origin_ca, origin_pki.pem()).unwrap();
    cfg.upstream.allowed_origins = vec!["origin.test".into()];
    cfg.upstream.ca_file = Some(origin_ca);
    cfg.upstream.connect_to = vec![("origin.test".into(), tls_origin.addr)];
    let top = Node::start_with(cfg).await;
    let tls_port = top.gw.as_ref().unwrap().tls_addr.unwrap().port();
    assert!(asked
        .lock()
        .unwrap()
        .iter()
        .any(|p| p.starts_with("/modules/cistern/genid/gen1/certificate/server")));

    let child_dir = tempfile::tempdir().unwrap();
    let mut cfg = config(child_dir.path(), &origin, "");
    cfg.node.id = "edge-child".into();
    cfg.upstream.parents = vec![format!("https://127.0.0.1:{tls_port}")];
    let child = Node::start_with(cfg).await;
    let g = get(&child.url("/o/t/e.bin")).await;
    assert_eq!(g.status, 200, "{}", String::from_utf8_lossy(&g.body));
    assert_eq!(g.body, body);
    eventually(5, "stored at the parent", || top.blobs().len() == 1).await;

    // A Delivery Optimization agent given an https URL keeps its scheme when it swaps in the cache
    // host: curl, trusting the edge CA as a device does, asks the TLS listener (the workload API's
    // certificate) in the cache-host form; the origin is asked over https, once.
    if !have("curl", "CISTERN_REQUIRE_CURL") {
        return;
    }
    let edge_ca = tmp.path().join("edge-ca.pem");
    std::fs::write(&edge_ca, ca.cert.pem()).unwrap();
    let url = format!(
        "https://127.0.0.1:{tls_port}/filestreamingservice/files/fw.bin?cacheHostOrigin=origin.test"
    );
    for (out, status) in [("fw.a", "cistern; fwd=uri-miss"), ("fw.b", "cistern; hit")] {
        let got = tokio::process::Command::new("curl")
            .args(["-sS", "--max-time", "20", "-D", "-", "--cacert"])
            .arg(&edge_ca)
            .arg("-o")
            .arg(tmp.path().join(out))
            .arg(&url)
            .output()
            .await
            .unwrap();
        let heads = String::from_utf8_lossy(&got.stdout).to_ascii_lowercase();
        let err = String::from_utf8_lossy(&got.stderr);
        assert!(heads.starts_with("http/1.1 200"), "{heads}{err}");
        assert!(
            heads.contains(&format!("cache-status: {status}")),
            "{heads}"
        );
        assert!(std::fs::read(tmp.path().join(out)).unwrap() == fw);
    }
    let tls_asks = tls_origin
        .tls_connections
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(tls_asks, 1, "the origin asked over https, once");
}
