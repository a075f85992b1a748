use super::*;
use crate::store::{Store, StoreConfig};

fn store(dir: &std::path::Path) -> Store {
    Store::open(&StoreConfig {
        dir: dir.to_path_buf(),
        max_size: 0,
        min_free: 0,
        max_object_size: 0,
        max_filling: 0,
        max_keys_per_object: 10_000,
    })
    .unwrap()
}

fn sink(store: &Store, size: u64) -> (Sink, Option<Bytes>) {
    let mut fill = store.begin_fill(Some(size)).unwrap();
    let map = fill.map(size);
    let sink = Sink {
        hasher: Some(Sha256::new()),
        fill: Some(fill),
        written: 0,
    };
    (sink, map)
}

fn batch(parts: &[&'static [u8]]) -> Vec<Bytes> {
    parts.iter().map(|p| Bytes::from_static(p)).collect()
}

fn digest_of(sink: Sink) -> [u8; 32] {
    sink.hasher.unwrap().finalize().into()
}

#[test]
fn a_restart_that_resends_the_same_bytes_writes_only_the_new_ones() {
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let (mut sink, _map) = sink(&s, 8);
    let first = sink.absorb(0, batch(&[b"abc", b"def"]));
    assert_eq!(first.fresh.concat(), b"abcdef");
    sink.written = 0;
    let again = sink.absorb(6, batch(&[b"abcd", b"efgh"]));
    assert!(again.diverged.is_none());
    assert_eq!(again.fresh.concat(), b"gh", "held bytes handed out twice");
    assert_eq!(sink.written, 8);
    assert_eq!(
        digest_of(sink),
        <[u8; 32]>::from(Sha256::digest(b"abcdefgh"))
    );
}

#[test]
fn a_divergence_moves_to_a_new_file_and_leaves_the_bytes_handed_out_alone() {
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let (mut sink, map) = sink(&s, 8);
    sink.absorb(0, batch(&[b"abcdef"]));
    // A reader holds a slice of the mapping: it must keep saying what it said.
    let handed = map.unwrap().slice(0..6);
    sink.written = 0;
    let r = sink.absorb(6, batch(&[b"abXY", b"ZWgh"]));
    let d = r.diverged.expect("the difference at byte 2 was not seen");
    assert_eq!(d.at, 2);
    assert_eq!(r.fresh.concat(), b"XYZWgh");
    assert_eq!(
        &handed[..],
        b"abcdef",
        "bytes handed to a reader were rewritten"
    );
    let (file, new_map) = d.file.expect("the fill stopped storing");
    assert_eq!(&new_map.unwrap()[..8], b"abXYZWgh");
    let mut buf = [0u8; 8];
    std::os::unix::fs::FileExt::read_exact_at(&*file, &mut buf, 0).unwrap();
    assert_eq!(&buf, b"abXYZWgh");
    assert_eq!(sink.fill.as_ref().map(|f| f.len()), Some(8));
    assert_eq!(
        digest_of(sink),
        <[u8; 32]>::from(Sha256::digest(b"abXYZWgh"))
    );
}

#[test]
fn a_divergence_at_the_first_byte_rehashes_nothing() {
    let t = tempfile::tempdir().unwrap();
    let s = store(t.path());
    let (mut sink, _map) = sink(&s, 4);
    sink.absorb(0, batch(&[b"abcd"]));
    sink.written = 0;
    let r = sink.absorb(4, batch(&[b"wxyz"]));
    assert_eq!(r.diverged.map(|d| d.at), Some(0));
    assert_eq!(r.fresh.concat(), b"wxyz");
    assert_eq!(digest_of(sink), <[u8; 32]>::from(Sha256::digest(b"wxyz")));
}
