//! The one-fetch-per-object table (SPEC 4 "One fetch per object"), in the shape of pingora-cache's
//! cache lock: asking it for a target gives either a follower's place on a fill in flight that the
//! target may use, or the leader's [`Permit`] for a new one. Dropping the permit removes the fill from
//! the table (its clients are woken by the flight's own end). Nothing else touches the table.
//!
//! Fills are found by a [`Selector`]: the key, or, for a key whose responses vary (learned from a
//! stored response or from a fill's head), the variant key of the request's values; and whether the
//! fill revalidates a stored copy. A client can only find a fill whose answer it may use: another
//! variant's fill, or a revalidation of a copy it does not hold, is not under its selector.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use http::HeaderMap;

use super::flight::{Flight, Joined};
use super::key::{variant_key, vary_for};
use crate::store::Digest;

/// Where a fill is found.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Selector {
    /// The key, or the variant key for a key whose responses vary.
    pub key: String,
    /// The fill revalidates a stored copy (its answer may be a 304 for that copy only).
    pub revalidation: bool,
}

impl Selector {
    /// Whether this selector finds a fill of `key`: the key itself or one of its variants
    /// (`<key>\u{1f}...`).
    fn of_key(&self, key: &str) -> bool {
        self.key
            .strip_prefix(key)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('\u{1f}'))
    }
}

/// What asking the table gave.
pub enum Ask {
    /// A fill in flight that the request may use.
    Follow(Arc<Flight>, Joined),
    /// No usable fill: the caller starts this one, already in the table under the permit.
    Lead(Arc<Flight>, Permit),
}

#[derive(Default)]
struct Table {
    fills: HashMap<Selector, Arc<Flight>>,
    /// The request fields that the responses of a key vary on, learned from fills' heads, kept while a
    /// fill of the key is in the table.
    vary: HashMap<String, Vec<(String, Option<String>)>>,
}

#[derive(Default, Clone)]
pub struct Collapse {
    table: Arc<Mutex<Table>>,
}

/// The leader's hold on a fill's place in the table: the selectors it is found under.
pub struct Permit {
    table: Arc<Mutex<Table>>,
    key: String,
    flight: Arc<Flight>,
    selectors: Mutex<Vec<Selector>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Collapse {
    /// The selector of a request with fields `req` for `key`: its variant when the key's responses
    /// are known to vary (from `stored_vary`, the stored response's Vary, or a fill's head).
    fn selector(
        t: &Table,
        key: &str,
        req: &HeaderMap,
        stored_vary: &[(String, Option<String>)],
        revalidation: bool,
    ) -> Selector {
        let vary = t.vary.get(key).map(Vec::as_slice).unwrap_or(stored_vary);
        let key = if vary.is_empty() {
            key.to_string()
        } else {
            variant_key(key, &vary_for(vary, req))
        };
        Selector { key, revalidation }
    }

    /// Joins the fill in flight under the request's selector when it may serve the request, else
    /// makes a new flight the caller starts. `shared = false` (a request with credentials) neither
    /// joins nor is joined.
    pub fn ask(
        &self,
        key: &str,
        req: &HeaderMap,
        stored_vary: &[(String, Option<String>)],
        revalidation: bool,
        shared: bool,
    ) -> Ask {
        let mut t = lock(&self.table);
        let sel = Self::selector(&t, key, req, stored_vary, revalidation);
        if let Some(f) = t.fills.get(&sel).filter(|_| shared) {
            if let Some(joined) = f.joinable(req) {
                return Ask::Follow(f.clone(), joined);
            }
        }
        let flight = Flight::new();
        let mut selectors = Vec::new();
        if shared {
            t.fills.insert(sel.clone(), flight.clone());
            selectors.push(sel);
        }
        let permit = Permit {
            table: self.table.clone(),
            key: key.to_string(),
            flight: flight.clone(),
            selectors: Mutex::new(selectors),
        };
        Ask::Lead(flight, permit)
    }

    /// No fill in flight at all (the common case on a hit: nothing to look for).
    pub fn is_idle(&self) -> bool {
        lock(&self.table).fills.is_empty()
    }

    /// A fill under the request's selectors (a fill, or a revalidation that fetched the object again)
    /// that has verified its bytes and is storing them: what is stored for the request is about to
    /// change.
    pub fn committing(
        &self,
        key: &str,
        req: &HeaderMap,
        stored_vary: &[(String, Option<String>)],
    ) -> Option<Arc<Flight>> {
        let t = lock(&self.table);
        [false, true].into_iter().find_map(|revalidation| {
            let sel = Self::selector(&t, key, req, stored_vary, revalidation);
            t.fills.get(&sel).filter(|f| f.is_committing()).cloned()
        })
    }

    /// A fill storing verified bytes with digest `d`, whatever its key.
    pub fn committing_digest(&self, d: Digest) -> Option<Arc<Flight>> {
        lock(&self.table)
            .fills
            .values()
            .find(|f| f.is_committing() && f.digest() == Some(d))
            .cloned()
    }

    /// Every fill of `key` (any variant, revalidations too) leaves the table and is doomed: it
    /// maps no key when it commits (RFC 9111 §4.4, an unsafe method changed what the URL names).
    /// Returned so that the caller can wait for those already committing.
    pub fn invalidate(&self, key: &str) -> Vec<Arc<Flight>> {
        let mut t = lock(&self.table);
        let mut gone: Vec<Arc<Flight>> = Vec::new();
        t.fills.retain(|s, f| {
            if s.of_key(key) {
                gone.push(f.clone());
                return false;
            }
            true
        });
        t.vary.remove(key);
        for f in &gone {
            f.doom();
        }
        gone
    }

    /// The fills in flight, each once: (the selector's key, the flight).
    pub fn in_flight(&self) -> Vec<(String, Arc<Flight>)> {
        let t = lock(&self.table);
        let mut out: Vec<(String, Arc<Flight>)> = Vec::new();
        for (s, f) in &t.fills {
            if !out.iter().any(|(_, g)| Arc::ptr_eq(f, g)) {
                out.push((s.key.clone(), f.clone()));
            }
        }
        out
    }
}

impl Permit {
    /// The fill's head says its response varies on `vary` (with the first client's values): later
    /// requests for the key are sent to their variant's fill, and this one is found under its own
    /// variant too. Called before the head is published, so that a client that wakes to find the
    /// head unsuited finds its own variant's selector when it asks again.
    pub fn varies(&self, vary: &[(String, Option<String>)]) {
        let mut sels = lock(&self.selectors);
        let Some(first) = sels.first().cloned() else {
            return;
        };
        let mut t = lock(&self.table);
        if vary.is_empty()
            || t.fills
                .get(&first)
                .is_none_or(|f| !Arc::ptr_eq(f, &self.flight))
        {
            return;
        }
        t.vary.insert(self.key.clone(), vary.to_vec());
        let sel = Selector {
            key: variant_key(&self.key, vary),
            revalidation: first.revalidation,
        };
        if sel != first && !t.fills.contains_key(&sel) {
            t.fills.insert(sel.clone(), self.flight.clone());
            sels.push(sel);
        }
    }

    /// The fill leaves the table now (its response will not be stored: later clients make their own
    /// request), though it runs on for the clients it has.
    pub fn release(&self) {
        let sels = std::mem::take(&mut *lock(&self.selectors));
        let mut t = lock(&self.table);
        for s in sels {
            if t.fills
                .get(&s)
                .is_some_and(|f| Arc::ptr_eq(f, &self.flight))
            {
                t.fills.remove(&s);
            }
        }
        let key = &self.key;
        if !t.fills.keys().any(|s| s.of_key(key)) {
            t.vary.remove(key);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(lang: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::ACCEPT_LANGUAGE, lang.parse().unwrap());
        h
    }

    fn lead(a: Ask) -> (Arc<Flight>, Permit) {
        match a {
            Ask::Lead(f, p) => (f, p),
            Ask::Follow(..) => panic!("joined where it should lead"),
        }
    }

    #[test]
    fn a_revalidation_is_joined_only_by_revalidations() {
        let c = Collapse::default();
        let (_f, _p) = lead(c.ask("k", &req("en"), &[], true, true));
        assert!(matches!(
            c.ask("k", &req("en"), &[], true, true),
            Ask::Follow(..)
        ));
        let (_g, _q) = lead(c.ask("k", &req("en"), &[], false, true));
    }

    #[test]
    fn variants_have_fills_of_their_own_once_the_key_is_known_to_vary() {
        let c = Collapse::default();
        let vary = vec![("accept-language".to_string(), Some("en".to_string()))];
        // Known from the store: `de` does not find `en`'s fill.
        let (_f, _p) = lead(c.ask("k", &req("en"), &vary, false, true));
        let (_g, _q) = lead(c.ask("k", &req("de"), &vary, false, true));
        assert!(matches!(
            c.ask("k", &req("de"), &vary, false, true),
            Ask::Follow(..)
        ));
        // Learned from a head: a cold key's first fill varies; `de` then leads its own, and `en`
        // finds the first.
        let (f, p) = lead(c.ask("cold", &req("en"), &[], false, true));
        p.varies(&vary);
        let (_h, _r) = lead(c.ask("cold", &req("de"), &[], false, true));
        match c.ask("cold", &req("en"), &[], false, true) {
            Ask::Follow(g, _) => assert!(Arc::ptr_eq(&f, &g)),
            Ask::Lead(..) => panic!("en did not find its fill"),
        }
        drop(p);
        let t = lock(&c.table);
        let cold: Vec<&str> = t
            .fills
            .keys()
            .map(|s| s.key.as_str())
            .filter(|k| k.starts_with("cold"))
            .collect();
        assert_eq!(cold.len(), 1, "{cold:?}");
        assert!(cold[0].ends_with("=de"), "{cold:?}");
    }

    #[test]
    fn invalidation_dooms_every_fill_of_the_key_and_only_those() {
        let c = Collapse::default();
        let vary = vec![("accept-language".to_string(), Some("en".to_string()))];
        let (f, _p) = lead(c.ask("doc", &req("en"), &vary, false, true));
        let (g, _q) = lead(c.ask("doc", &req("de"), &vary, true, true));
        let (h, _r) = lead(c.ask("doc2", &req("en"), &[], false, true));
        assert_eq!(c.invalidate("doc").len(), 2);
        assert!(f.doomed() && g.doomed() && !h.doomed());
        let (_n, _s) = lead(c.ask("doc", &req("en"), &vary, false, true));
    }

    #[test]
    fn a_request_with_credentials_neither_joins_nor_is_joined() {
        let c = Collapse::default();
        let (_f, _p) = lead(c.ask("k", &req("en"), &[], false, false));
        let (_g, _q) = lead(c.ask("k", &req("en"), &[], false, true));
        let (_h, _r) = lead(c.ask("k", &req("en"), &[], false, false));
        assert_eq!(c.in_flight().len(), 1);
    }
}
