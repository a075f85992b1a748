//! Under IoT Edge (SPEC 8): with TLS on and no certificate files, the server certificate comes from the
//! workload API (common name IOTEDGE_GATEWAYHOSTNAME), and a child trusts its parent through the
//! workload API's trust bundle. The workload API here is a mock on a unix socket. This file holds one
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
}
