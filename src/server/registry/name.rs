//! What a `/v2/` path asks for (SPEC 9), checked against the OCI distribution spec's grammar before
//! anything goes upstream: a repository name (`[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*` components joined by
//! `/`), a tag (`[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`) or a digest (`sha256:<64 lower-case hex>`, the only
//! algorithm the store keys by).

use crate::store::Digest;

/// Longest repository name accepted (the distribution spec's registries cap names at 255).
const MAX_NAME: usize = 255;

/// What a manifest is asked by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}

/// The object a `/v2/` path names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Object {
    /// `/v2/`: the API version check.
    Base,
    /// `/v2/token`: the pull token login (SPEC 9, `server.pull_token`).
    Token,
    Blob {
        repo: String,
        digest: Digest,
    },
    Manifest {
        repo: String,
        reference: Reference,
    },
}

/// Why a path is refused, as the distribution spec names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not an endpoint of the pull side (tag lists, catalog, upload sessions...).
    Unsupported,
    NameInvalid(String),
    DigestInvalid(String),
    TagInvalid(String),
}

/// Parses the path after `/v2/`.
pub fn parse(rest: &str) -> Result<Object, Refusal> {
    match rest {
        "" => return Ok(Object::Base),
        "token" => return Ok(Object::Token),
        _ => {}
    }
    let at = |m: &'static str| rest.rfind(m).map(|i| (i, m));
    let Some((i, marker)) = [at("/blobs/"), at("/manifests/")]
        .into_iter()
        .flatten()
        .max()
    else {
        return Err(Refusal::Unsupported);
    };
    let repo = &rest[..i];
    let tail = &rest[i + marker.len()..];
    if !valid_name(repo) {
        return Err(Refusal::NameInvalid(repo.to_string()));
    }
    let repo = repo.to_string();
    if marker == "/blobs/" {
        let digest = parse_digest(tail).ok_or_else(|| Refusal::DigestInvalid(tail.to_string()))?;
        return Ok(Object::Blob { repo, digest });
    }
    let reference = if tail.contains(':') {
        let d = parse_digest(tail).ok_or_else(|| Refusal::DigestInvalid(tail.to_string()))?;
        Reference::Digest(d)
    } else if valid_tag(tail) {
        Reference::Tag(tail.to_string())
    } else {
        return Err(Refusal::TagInvalid(tail.to_string()));
    };
    Ok(Object::Manifest { repo, reference })
}

/// `sha256:<64 lower-case hex>`.
pub fn parse_digest(s: &str) -> Option<Digest> {
    let hex = s.strip_prefix("sha256:")?;
    let ok = hex.len() == 64
        && hex
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c));
    ok.then(|| hex.parse().ok()).flatten()
}

/// `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
pub fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    let word = |c: &u8| c.is_ascii_alphanumeric() || *c == b'_';
    !b.is_empty()
        && b.len() <= 128
        && word(&b[0])
        && b[1..].iter().all(|c| word(c) || *c == b'.' || *c == b'-')
}

/// Path components `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*` joined by `/`.
pub fn valid_name(n: &str) -> bool {
    !n.is_empty() && n.len() <= MAX_NAME && n.split('/').all(valid_component)
}

fn valid_component(c: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_digit() || b.is_ascii_lowercase();
    let b = c.as_bytes();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    // Between alphanumeric runs: one `.`, one or two `_`, or any number of `-`.
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|s| s == b'-');
        if !ok {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_tags_digests() {
        for good in [
            "a",
            "library/ubuntu",
            "a.b/c__d/e---f",
            "azureiotedge-agent",
            "x0/y_1",
        ] {
            assert!(valid_name(good), "{good}");
        }
        for bad in [
            "", "A", "a/", "/a", "a//b", "a..b", "a___b", "-a", "a-", "a/../b", "a b", "a%2fb",
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert!(valid_name(&"a".repeat(255)) && !valid_name(&"a".repeat(256)));
        for good in ["1.5", "latest", "_x", "v1.2.3-rc_1", &"t".repeat(128)] {
            assert!(valid_tag(good), "{good}");
        }
        for bad in ["", ".x", "-x", "a/b", "a:b", &"t".repeat(129), "a%20"] {
            assert!(!valid_tag(bad), "{bad}");
        }
        let hex = "0123456789abcdef".repeat(4);
        assert!(parse_digest(&format!("sha256:{hex}")).is_some());
        assert!(parse_digest(&format!("sha256:{}", hex.to_uppercase())).is_none());
        assert!(parse_digest(&format!("sha512:{hex}")).is_none());
        assert!(parse_digest(&format!("sha256:{}", &hex[1..])).is_none());
    }

    #[test]
    fn paths() {
        let hex = "ab".repeat(32);
        assert_eq!(parse(""), Ok(Object::Base));
        assert!(matches!(
            parse(&format!("line/app/blobs/sha256:{hex}")),
            Ok(Object::Blob { repo, .. }) if repo == "line/app"
        ));
        assert!(matches!(
            parse("mcr/azureiotedge-agent/manifests/1.5"),
            Ok(Object::Manifest { repo, reference: Reference::Tag(t) }) if repo == "mcr/azureiotedge-agent" && t == "1.5"
        ));
        assert!(matches!(
            parse(&format!("a/manifests/sha256:{hex}")),
            Ok(Object::Manifest {
                reference: Reference::Digest(_),
                ..
            })
        ));
        // A repository may itself be called `blobs` or `manifests`.
        assert!(matches!(
            parse("x/manifests/manifests/1"),
            Ok(Object::Manifest { repo, .. }) if repo == "x/manifests"
        ));
        assert_eq!(parse("a/tags/list"), Err(Refusal::Unsupported));
        assert_eq!(parse("_catalog"), Err(Refusal::Unsupported));
        assert!(matches!(
            parse("A/manifests/1"),
            Err(Refusal::NameInvalid(_))
        ));
        assert!(matches!(
            parse("../x/manifests/1"),
            Err(Refusal::NameInvalid(_))
        ));
        assert!(matches!(
            parse("a/blobs/latest"),
            Err(Refusal::DigestInvalid(_))
        ));
        assert!(matches!(
            parse("a/manifests/md5:00"),
            Err(Refusal::DigestInvalid(_))
        ));
        assert!(matches!(
            parse("a/manifests/.x"),
            Err(Refusal::TagInvalid(_))
        ));
        assert!(matches!(
            parse("a/blobs/uploads/"),
            Err(Refusal::DigestInvalid(_))
        ));
    }
}
