//! A registry that redirects blob GETs to its storage elsewhere (distribution with an S3-like backend
//! answers 307 to a signed URL, SPEC 9): the blob is fetched there, verified and stored under its
//! digest, never under the storage URL; a storage address the node may not reach gives 502.

mod common;

use common::registry::*;
use common::*;
use http::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blobs_redirected_to_storage_are_stored_by_digest() {
    let Some(s) = site("").await else { return };
    // The storage: another front over the same registry, on an address of its own.
    let storage = Front::start(s.front.upstream_port()).await;
    *s.front.state.redirect_blobs.lock().unwrap() = Some(storage.addr);
    let node = registry_node_allowing(&s.front, &[storage.addr.to_string()], "").await;
    for i in 0..2 {
        let out = s.tmp.path().join(format!("out{i}"));
        pull(&node, &out).await.unwrap();
        same_blobs(&s.image, &out);
    }
    assert_eq!(
        storage.blob_gets(),
        3,
        "each blob fetched from storage once"
    );
    assert_eq!(s.front.blob_gets(), 3, "and asked of the registry once");
    for hex in s.image.layers.iter().chain([&s.image.config]) {
        assert!(node.blobs().contains(hex), "{hex} stored");
    }
    let content = get(&node.url("/v1/admin/content")).await;
    let listed = String::from_utf8_lossy(&content.body).to_string();
    assert!(listed.contains(&s.image.layers[0]), "{listed}");
    assert!(
        !listed.contains(&storage.addr.to_string()) && !listed.contains("sig=1"),
        "the storage URL is no key: {listed}"
    );
    // A storage address this node may not reach.
    let closed = registry_node(&s.front, "").await;
    let layer = &s.image.layers[0];
    let g = get(&closed.url(&format!("/v2/test/app/blobs/sha256:{layer}"))).await;
    assert_eq!(g.status, StatusCode::BAD_GATEWAY);
    let body = String::from_utf8_lossy(&g.body).to_string();
    assert!(body.contains("redirect-not-allowed"), "{body}");
    assert_eq!(storage.blob_gets(), 3, "nothing asked of a refused address");
}
