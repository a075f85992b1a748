use super::*;

mod keys;
use sha2::Digest as _;

fn cfg(dir: &Path) -> StoreConfig {
    StoreConfig {
        dir: dir.to_path_buf(),
        max_size: 0,
        min_free: 0,
        max_object_size: 0,
        max_filling: 0,
        max_keys_per_object: 10_000,
    }
}

fn put(store: &Store, body: &[u8], key: Option<&str>) -> Digest {
    let d = Digest(sha2::Sha256::digest(body).into());
    let mut f = store.begin_fill(Some(body.len() as u64)).unwrap();
    f.write(body).unwrap();
    f.commit(&d, key.map(|k| (k, KeyMeta::immutable())), None, false)
        .unwrap();
    d
}

#[test]
fn committed_object_is_found_by_key_and_digest() {
    let t = tempfile::tempdir().unwrap();
    let s = Store::open(&cfg(t.path())).unwrap();
    let d = put(&s, b"hello", Some("example.com/a"));
    assert_eq!(s.lookup("example.com/a").unwrap().digest, d);
    assert_eq!(&s.open_object(&d).unwrap().bytes[..], b"hello");
    assert!(s.blob_path(&d).exists());
    assert!(s.blob_path(&d).with_extension("meta").exists());
}

#[test]
fn dropped_fill_leaves_nothing() {
    let t = tempfile::tempdir().unwrap();
    let s = Store::open(&cfg(t.path())).unwrap();
    {
        let mut f = s.begin_fill(Some(10)).unwrap();
        f.write(b"partial").unwrap();
    }
    assert_eq!(std::fs::read_dir(t.path().join("tmp")).unwrap().count(), 0);
    assert_eq!(s.usage().reserved, 0);
    assert_eq!(s.usage().objects, 0);
}

#[test]
fn bytes_of_a_fill_in_flight_can_go_out_by_sendfile() {
    let t = tempfile::tempdir().unwrap();
    let s = Store::open(&cfg(t.path())).unwrap();
    let mut f = s.begin_fill(Some(8)).unwrap();
    let map = f.map(8).unwrap();
    f.write(b"abcd").unwrap();
    let part = map.slice(1..4);
    let (file, off) = mapped::source_of(part.as_ptr(), part.len()).unwrap();
    assert_eq!(off, 1);
    let mut buf = [0u8; 3];
    std::os::unix::fs::FileExt::read_at(&*file, &mut buf, off).unwrap();
    assert_eq!(&buf, b"bcd");
}

#[test]
fn second_open_is_refused_while_the_first_holds_the_store() {
    let t = tempfile::tempdir().unwrap();
    let _s = Store::open(&cfg(t.path())).unwrap();
    assert!(matches!(
        Store::open(&cfg(t.path())),
        Err(StoreError::Locked(_))
    ));
}

#[test]
fn deleted_index_is_rebuilt_with_keys_and_pins() {
    let t = tempfile::tempdir().unwrap();
    let (a, b);
    {
        let s = Store::open(&cfg(t.path())).unwrap();
        a = put(&s, b"aaa", Some("k/a"));
        b = put(&s, b"bbb", Some("k/b"));
        s.set_pin(&b, true).unwrap();
        s.flush().unwrap();
    }
    std::fs::remove_dir_all(t.path().join("index")).unwrap();
    std::fs::write(t.path().join("tmp").join("fill-orphan"), b"junk").unwrap();
    let s = Store::open(&cfg(t.path())).unwrap();
    assert_eq!(s.lookup("k/a").unwrap().digest, a);
    assert_eq!(s.lookup("k/b").unwrap().digest, b);
    let pinned: Vec<_> = s
        .list()
        .into_iter()
        .filter(|o| o.pinned)
        .map(|o| o.digest)
        .collect();
    assert_eq!(pinned, vec![b]);
    assert_eq!(std::fs::read_dir(t.path().join("tmp")).unwrap().count(), 0);
}

#[test]
fn key_moves_to_the_object_fetched_last() {
    let t = tempfile::tempdir().unwrap();
    let s = Store::open(&cfg(t.path())).unwrap();
    put(&s, b"v1", Some("k"));
    let v2 = put(&s, b"v2", Some("k"));
    assert_eq!(s.lookup("k").unwrap().digest, v2);
    drop(s);
    std::fs::remove_dir_all(t.path().join("index")).unwrap();
    let s = Store::open(&cfg(t.path())).unwrap();
    assert_eq!(s.lookup("k").unwrap().digest, v2);
}

#[test]
fn eviction_is_lru_and_spares_pins() {
    let t = tempfile::tempdir().unwrap();
    let mut c = cfg(t.path());
    c.max_size = 300;
    let s = Store::open(&c).unwrap();
    let a = put(&s, &[1u8; 100], None);
    let b = put(&s, &[2u8; 100], None);
    let c3 = put(&s, &[3u8; 100], None);
    s.set_pin(&a, true).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(5));
    drop(s.open_object(&b).unwrap()); // b is now more recent than c
    let d = put(&s, &[4u8; 100], None);
    assert!(s.contains(&a), "pinned object evicted");
    assert!(s.contains(&b));
    assert!(!s.contains(&c3), "least recently used object kept");
    assert!(!s.blob_path(&c3).exists());
    assert!(s.contains(&d));
    assert!(s.usage().bytes <= 300);
    // Nothing evictable is left that would make room for 250 more bytes: NoRoom, nothing evicted.
    s.set_pin(&b, true).unwrap();
    s.set_pin(&d, true).unwrap();
    assert!(matches!(
        s.begin_fill(Some(250)),
        Err(StoreError::NoRoom(_))
    ));
    assert_eq!(s.usage().objects, 3);
}

#[test]
fn object_being_read_is_not_evicted() {
    let t = tempfile::tempdir().unwrap();
    let mut c = cfg(t.path());
    c.max_size = 200;
    let s = Store::open(&c).unwrap();
    let a = put(&s, &[1u8; 100], None);
    let b = put(&s, &[2u8; 100], None);
    let reading = s.open_object(&a).unwrap();
    let _ = put(&s, &[3u8; 100], None);
    assert!(s.contains(&a));
    assert!(!s.contains(&b));
    drop(reading);
}

#[test]
fn verify_finds_and_repairs_corruption() {
    let t = tempfile::tempdir().unwrap();
    let s = Store::open(&cfg(t.path())).unwrap();
    let d = put(&s, b"good bytes", Some("k"));
    std::fs::write(s.blob_path(&d), b"bad bytes!").unwrap();
    assert_eq!(s.verify(false).len(), 1);
    assert!(s.contains(&d));
    assert_eq!(s.verify(true).len(), 1);
    assert!(!s.contains(&d));
    assert!(s.lookup("k").is_none());
}

/// Regression: after a power cut sled's `conf` was left empty and sled panicked at start; the store
/// must come back, rebuilt from the object files, whatever the index holds.
#[test]
fn a_damaged_index_is_rebuilt_not_fatal() {
    for damage in [&b""[..], b"\x00\x01garbage-that-is-not-a-sled-config"] {
        let t = tempfile::tempdir().unwrap();
        let a;
        {
            let s = Store::open(&cfg(t.path())).unwrap();
            a = put(&s, b"aaa", Some("k/a"));
            s.flush().unwrap();
        }
        let index = t.path().join("index");
        std::fs::write(index.join("conf"), damage).unwrap();
        if let Ok(rd) = std::fs::read_dir(&index) {
            for f in rd.flatten().filter(|f| f.path().is_file()) {
                std::fs::write(f.path(), damage).unwrap();
            }
        }
        let s = Store::open(&cfg(t.path())).unwrap();
        assert_eq!(s.lookup("k/a").unwrap().digest, a);
    }
}

/// Only records that changed since the last flush are written back to the index.
#[test]
fn flush_writes_only_what_was_read() {
    let t = tempfile::tempdir().unwrap();
    let s = Store::open(&cfg(t.path())).unwrap();
    let a = put(&s, b"aaa", Some("k/a"));
    let b = put(&s, b"bbb", Some("k/b"));
    s.flush().unwrap();
    let before = s.shared.index.object(&b).unwrap().last_access;
    drop(s.open_object(&a).unwrap());
    assert_eq!(s.state().touched.len(), 1, "only the object read is due");
    s.flush().unwrap();
    assert!(s.state().touched.is_empty());
    assert_eq!(s.shared.index.object(&a).unwrap().hits, 1);
    assert_eq!(s.shared.index.object(&b).unwrap().last_access, before);
}

/// The index reaches the disk lazily; after a crash it can be older than the `.meta` and `.keys`
/// files, which are the truth: a key whose removal its `.keys` records (invalidated) and a pin changed
/// in its `.meta` must not come back from the index.
#[test]
fn an_index_older_than_the_meta_files_yields_to_them() {
    let t = tempfile::tempdir().unwrap();
    let (a, b);
    {
        let s = Store::open(&cfg(t.path())).unwrap();
        a = put(&s, b"aaa", Some("k/a"));
        b = put(&s, b"bbb", Some("k/b"));
        s.set_pin(&b, true).unwrap();
        s.flush().unwrap();
        // What an invalidation and an unpin write to the files before the index is written.
        keylog::append(&s.keys_path(&a), &[keylog::Change::Remove("k/a")], true).unwrap();
        let mpath = s.blob_path(&a).with_extension("meta");
        let mut m = ObjectMeta::read(&mpath).unwrap();
        m.pinned = true;
        m.write(&mpath).unwrap();
        let mpath = s.blob_path(&b).with_extension("meta");
        let mut m = ObjectMeta::read(&mpath).unwrap();
        m.pinned = false;
        m.write(&mpath).unwrap();
    }
    let s = Store::open(&cfg(t.path())).unwrap();
    assert!(s.lookup("k/a").is_none(), "an invalidated key came back");
    assert_eq!(s.lookup("k/b").unwrap().digest, b);
    let pinned: Vec<_> = s
        .list()
        .into_iter()
        .filter(|o| o.pinned)
        .map(|o| o.digest)
        .collect();
    assert_eq!(pinned, vec![a]);
}

/// Room is reserved in memory: no file is made and nothing evicted on disk until the fill's file
/// is made; room dropped unused is given back, and what made way for it still goes.
#[test]
fn room_is_reserved_before_any_disk_work() {
    let t = tempfile::tempdir().unwrap();
    let mut c = cfg(t.path());
    c.max_size = 8 << 20;
    let s = Store::open(&c).unwrap();
    let old = put(&s, &vec![1u8; 3 << 20], Some("k/old"));
    let next = put(&s, &vec![3u8; 3 << 20], Some("k/next"));
    let tmp_files = || std::fs::read_dir(t.path().join("tmp")).unwrap().count();

    let room = s.reserve_room(Some(3 << 20)).unwrap();
    assert_eq!(s.usage().reserved, 3 << 20);
    assert_eq!(tmp_files(), 0, "a file made while reserving");
    assert!(
        s.blob_path(&old).exists(),
        "evicted on disk while reserving"
    );
    let f = room.fill().unwrap();
    assert_eq!(tmp_files(), 1);
    assert!(!s.blob_path(&old).exists(), "the victim's file is left");
    assert!(s.lookup("k/old").is_none());
    drop(f);
    assert_eq!(s.usage().reserved, 0);

    // Now `next` is the least recently used.
    put(&s, &vec![2u8; 3 << 20], Some("k/old"));
    drop(s.reserve_room(Some(3 << 20)).unwrap());
    assert_eq!(s.usage().reserved, 0, "unused room not given back");
    assert!(!s.blob_path(&next).exists(), "an evicted file stayed");
    assert!(
        s.reserve_room(Some(9 << 20)).is_err(),
        "more than the store"
    );
}
