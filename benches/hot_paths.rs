//! Criterion benches of the hot paths: hashing + the write path of a fill, range parsing and the
//! framing of a multi-range answer, index lookups, a new key mapped to a stored object.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sha2::Digest as _;

use cistern::server::{multipart, range};
use cistern::store::{Digest, KeyMeta, Store, StoreConfig};

/// An empty store in a temporary directory, with no budget limits (kept alive by the returned dir).
fn scratch_store() -> (tempfile::TempDir, Store) {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        dir: tmp.path().into(),
        max_size: 0,
        min_free: 0,
        max_object_size: 0,
        max_filling: 0,
        max_keys_per_object: 10_000,
    };
    let store = Store::open(&cfg).unwrap();
    (tmp, store)
}

fn hashing_and_fill(c: &mut Criterion) {
    let data = vec![7u8; 4 << 20];
    let mut g = c.benchmark_group("fill");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("sha256 4MiB", |b| b.iter(|| sha2::Sha256::digest(&data)));
    let (_tmp, store) = scratch_store();
    g.bench_function("hash+write 4MiB in 256KiB chunks (no commit)", |b| {
        b.iter(|| {
            let mut f = store.begin_fill(Some(data.len() as u64)).unwrap();
            let mut h = sha2::Sha256::new();
            for chunk in data.chunks(256 << 10) {
                h.update(chunk);
                f.write(chunk).unwrap();
            }
            h.finalize()
        })
    });
    g.finish();
}

fn ranges(c: &mut Criterion) {
    c.bench_function("range parse+resolve", |b| {
        b.iter(|| {
            range::parse(std::hint::black_box("bytes=1048576-1114111")).map(|r| r.resolve(1 << 28))
        })
    });
    // What a delta downloader's request costs before the first byte: 150 ranges of 4 KiB parsed,
    // merged and framed as multipart/byteranges (the part headers built, the length counted).
    let specs: Vec<String> = (0..150u64)
        .map(|i| {
            let at = (i * 7919 * 4096) % ((1 << 28) - 4096);
            format!("{at}-{}", at + 4095)
        })
        .collect();
    let header = format!("bytes={}", specs.join(","));
    c.bench_function("150 ranges parse+plan+multipart framing", |b| {
        b.iter(|| {
            let set = range::parse_set(std::hint::black_box(&header)).unwrap();
            match multipart::plan(&set, 1 << 28, 200) {
                multipart::Plan::Many(parts) => {
                    let l = multipart::Layout::new(parts, 1 << 28, "application/octet-stream");
                    (l.length(), l.pieces().len())
                }
                _ => (0, 0),
            }
        })
    });
}

fn index(c: &mut Criterion) {
    let (_tmp, store) = scratch_store();
    let mut last = None;
    for i in 0..1000u32 {
        let body = i.to_le_bytes();
        let d = Digest(sha2::Sha256::digest(body).into());
        let mut f = store.begin_fill(Some(4)).unwrap();
        f.write(&body).unwrap();
        f.commit(
            &d,
            Some((&format!("host.example/file/{i}"), KeyMeta::immutable())),
            None,
            false,
        )
        .unwrap();
        last = Some(d);
    }
    c.bench_function("index lookup by key", |b| {
        b.iter(|| store.lookup(std::hint::black_box("host.example/file/500")))
    });
    let d = last.unwrap();
    c.bench_function("open stored object (mapped)", |b| {
        b.iter(|| store.open_object(&d).unwrap().bytes.len())
    });
    // What a miss under a new query string costs once the payload is stored: one appended, fsynced
    // record in the object's `.keys`, however many keys it has (the keys pile up as this runs).
    let mut n = 0u64;
    c.bench_function("map a new key to a stored object", |b| {
        b.iter(|| {
            n += 1;
            let key = format!("host.example/file/500?v={n}");
            store.map_key(&key, &d, KeyMeta::immutable()).unwrap()
        })
    });
}

criterion_group!(benches, hashing_and_fill, ranges, index);
criterion_main!(benches);
