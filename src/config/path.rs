//! Optional file paths in the config: written `""` when unset (SPEC 2 writes them so, and the
//! `CISTERN_<SECTION>__<KEY>` overrides take their type from the defaults' TOML), typed as
//! `Option<PathBuf>` everywhere else, so that no code tests a path for emptiness.

use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serializer};

pub fn serialize<S: Serializer>(p: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
    match p {
        Some(p) => s.serialize_str(&p.to_string_lossy()),
        None => s.serialize_str(""),
    }
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    let s = String::deserialize(d)?;
    Ok((!s.trim().is_empty()).then(|| PathBuf::from(s)))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    #[derive(serde::Serialize, serde::Deserialize)]
    struct T {
        #[serde(with = "super")]
        p: Option<PathBuf>,
    }

    #[test]
    fn empty_is_unset_both_ways() {
        let t: T = toml::from_str("p = \"\"").unwrap();
        assert!(t.p.is_none());
        assert_eq!(toml::to_string(&t).unwrap().trim(), "p = \"\"");
        let t: T = toml::from_str("p = \"/etc/x.pem\"").unwrap();
        assert_eq!(t.p, Some(PathBuf::from("/etc/x.pem")));
    }
}
