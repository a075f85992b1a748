//! `.meta` decoding (src/store/meta.rs): the file the index is rebuilt from, so any bytes (a torn or
//! hand-edited file) decode or are refused without panicking; a decoded `.meta` re-encodes, as
//! `ObjectMeta::write` encodes it, to a file that decodes equal; and every key's freshness (age, ttl,
//! reuse, stale-on-error) is computed for it at any time without panicking.
#![no_main]

use cistern::fetch::freshness::{self, RequestCc};
use cistern::fetch::headers;
use cistern::store::ObjectMeta;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = serde_json::from_slice::<ObjectMeta>(data) else {
        return;
    };
    let encoded = serde_json::to_vec_pretty(&m).expect("a decoded .meta that cannot be encoded");
    let back: ObjectMeta =
        serde_json::from_slice(&encoded).expect("a written .meta does not decode");
    assert_eq!(back, m);
    assert_eq!(serde_json::to_vec_pretty(&back).unwrap(), encoded);
    let requests = [
        RequestCc::default(),
        RequestCc {
            max_age: Some(0),
            ..Default::default()
        },
        RequestCc {
            max_stale: Some(None),
            min_fresh: Some(1 << 31),
            ..Default::default()
        },
        RequestCc {
            max_stale: Some(Some(60)),
            max_age: Some(1 << 31),
            ..Default::default()
        },
    ];
    for km in m.keys.values() {
        let times = [
            0,
            km.fetched_at,
            km.fetched_at.saturating_add(1500),
            km.fetched_at.saturating_add(86_400_000),
            u64::MAX,
        ];
        for now in times {
            let _ = km.age(now);
            let _ = km.ttl(now);
            let _ = freshness::stale_on_error(km, now);
            for rc in &requests {
                let _ = freshness::reuse(km, rc, now);
            }
        }
        let _ = km.strong_etag();
        let _ = freshness::shareable_with_credentials(km);
        let _ = headers::to_map(&km.headers);
    }
});
