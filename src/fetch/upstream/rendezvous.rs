//! Weighted rendezvous (highest-random-weight) hashing (SPEC 10): which member of a site's peers owns
//! an object. Each member scores each key; the highest score owns it. A member that leaves moves only
//! the keys it owned (each to the member that scored second), one that joins takes only the keys it now
//! scores highest: about 1/N of them either way.
//!
//! The score is of SHA-256 over the member's URL and the key, so that every node of a site, whatever
//! its build or process, ranks members the same way. Pure: no state, no I/O.

use sha2::{Digest as _, Sha256};

/// The score of `member` (its URL as configured or resolved) for `key`, with `weight` (1.0 for equal
/// members): `-weight / ln(u)`, where `u` in (0, 1) is the stable hash of the pair. Higher wins.
pub fn score(member: &str, key: &str, weight: f64) -> f64 {
    let mut h = Sha256::new();
    h.update(member.as_bytes());
    // A separator no URL contains: ("ab", "c") and ("a", "bc") hash apart.
    h.update([0u8]);
    h.update(key.as_bytes());
    let d = h.finalize();
    let mut top = [0u8; 8];
    top.copy_from_slice(&d[..8]);
    // 53 bits into (0, 1): never 0 (ln 0) nor 1 (ln 1 = 0).
    let bits = u64::from_be_bytes(top) >> 11;
    let u = (bits as f64 + 0.5) / (1u64 << 53) as f64;
    -weight / u.ln()
}

/// The members' indexes in rendezvous order for `key`: the owner first. Ties (which SHA-256 makes
/// practically impossible) go to the smaller URL, so the order never depends on the list's order.
pub fn order<S: AsRef<str>>(members: &[S], key: &str) -> Vec<usize> {
    let mut scored: Vec<(f64, usize)> = members
        .iter()
        .enumerate()
        .map(|(i, m)| (score(m.as_ref(), key, 1.0), i))
        .collect();
    scored.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then_with(|| members[a.1].as_ref().cmp(members[b.1].as_ref()))
    });
    scored.into_iter().map(|(_, i)| i).collect()
}

/// The owner of `key` among `members`; None for no members.
pub fn owner<'a, S: AsRef<str>>(members: &'a [S], key: &str) -> Option<&'a str> {
    members
        .iter()
        .map(|m| (score(m.as_ref(), key, 1.0), m.as_ref()))
        .max_by(|a, b| a.0.total_cmp(&b.0).then_with(|| b.1.cmp(a.1)))
        .map(|(_, m)| m)
}

/// How many of `keys` have another owner under `after` than under `before`.
pub fn moved<S: AsRef<str>>(before: &[S], after: &[S], keys: impl Iterator<Item = String>) -> u64 {
    keys.filter(|k| owner(before, k) != owner(after, k)).count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("http://10.0.0.{i}:8080")).collect()
    }

    fn keys(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("http://origin/fw/{i}.bin"))
            .collect()
    }

    #[test]
    fn keys_spread_evenly_over_the_members() {
        let m = members(5);
        let mut counts = [0usize; 5];
        for k in keys(10_000) {
            let o = owner(&m, &k).unwrap();
            counts[m.iter().position(|x| x == o).unwrap()] += 1;
        }
        // 2000 each expected; a fair hash stays well within ±10 %.
        for c in counts {
            assert!((1800..=2200).contains(&c), "uneven spread: {counts:?}");
        }
    }

    #[test]
    fn a_member_leaving_moves_only_its_own_keys_about_one_in_n() {
        let all = members(5);
        let left: Vec<String> = all
            .iter()
            .filter(|m| !m.ends_with(".3:8080"))
            .cloned()
            .collect();
        let ks = keys(10_000);
        let mut moved = 0;
        for k in &ks {
            let (before, after) = (owner(&all, k).unwrap(), owner(&left, k).unwrap());
            if before != after {
                assert_eq!(before, all[3], "{k} moved but its owner did not leave");
                moved += 1;
            }
        }
        assert!(
            (1800..=2200).contains(&moved),
            "{moved} of 10000 moved, ~2000 expected"
        );
        // Joining again moves them back, and only them.
        let back = ks
            .iter()
            .filter(|k| owner(&left, k) != owner(&all, k))
            .count();
        assert_eq!(back, moved);
    }

    #[test]
    fn the_order_is_the_members_not_their_positions() {
        let m = members(4);
        let mut rev = m.clone();
        rev.reverse();
        for k in keys(200) {
            let a: Vec<&str> = order(&m, &k).into_iter().map(|i| m[i].as_str()).collect();
            let b: Vec<&str> = order(&rev, &k)
                .into_iter()
                .map(|i| rev[i].as_str())
                .collect();
            assert_eq!(a, b);
            assert_eq!(Some(a[0]), owner(&m, &k));
        }
        assert!(owner::<String>(&[], "k").is_none());
    }

    #[test]
    fn scores_are_stable_across_builds() {
        // Fixed (SHA-256, no process-random seed): every node of a site, whatever its version,
        // computes the same owners. These were computed apart, from the definition.
        let m = ["http://gw-a:8080", "http://gw-b:8080"];
        assert_eq!(owner(&m, "k1"), Some(m[1]));
        assert_eq!(owner(&m, "k2"), Some(m[0]));
        assert_eq!(owner(&m, "sha256/00"), Some(m[1]));
        // A heavier member wins more keys.
        let heavy = keys(2000)
            .iter()
            .filter(|k| score("a", k, 2.0) > score("b", k, 1.0))
            .count();
        assert!((1200..=1450).contains(&heavy), "{heavy}: ~1333 expected");
    }
}
