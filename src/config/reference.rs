//! The configuration reference, `config/reference.toml`: every key with its default and what it means.
//! `cistern check-config --defaults` prints it; the tests below hold it to the configuration tree, so
//! that the reference and the code cannot drift apart.

/// The commented reference configuration, as `cistern check-config --defaults` prints it.
pub const REFERENCE: &str = include_str!("../../config/reference.toml");

#[cfg(test)]
mod tests {
    use super::REFERENCE;
    use crate::config::{Config, Origin, Registry};
    use toml::Value;

    fn serialized<T: serde::Serialize>(v: &T) -> Value {
        Value::try_from(v).expect("the config serializes")
    }

    /// `(section, key)` of every line `key = ...` that is not commented out, by the section it is in.
    fn written_keys(text: &str) -> Vec<(String, String)> {
        let mut section = String::new();
        let mut keys = Vec::new();
        for line in text.lines() {
            if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = s.trim_matches(['[', ']']).to_string();
            } else if let Some((k, _)) = line.split_once('=') {
                let k = k.trim();
                let plain = !line.starts_with([' ', '#', '"']);
                if plain
                    && !k.is_empty()
                    && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                {
                    keys.push((section.clone(), k.to_string()));
                }
            }
        }
        keys
    }

    /// The commented-out `[[<table>]]` example, uncommented (its own comment lines dropped).
    fn example(text: &str, table: &str) -> String {
        let mut out = String::new();
        let mut inside = false;
        for line in text.lines() {
            if line == format!("# [[{table}]]") {
                inside = true;
            } else if inside && !line.starts_with("# ") {
                break;
            }
            if inside && !line.starts_with("# # ") {
                out.push_str(&line["# ".len()..]);
                out.push('\n');
            }
        }
        out
    }

    #[test]
    fn reference_holds_every_key_with_its_default() {
        // (a) It parses as the config does, unknown keys refused, with no value derived from the
        // environment or filled in afterwards.
        let parsed: Config = toml::from_str(REFERENCE)
            .unwrap_or_else(|e| panic!("config/reference.toml does not parse: {}", e.message()));
        // (b) Every key it sets has its real default (a key it left out would come back defaulted
        // and pass here: (c) catches that).
        let defaults = serialized(&Config::default());
        let given = serialized(&parsed);
        let differ: Vec<String> = defaults
            .as_table()
            .unwrap()
            .iter()
            .flat_map(|(section, v)| match v {
                Value::Table(t) => t
                    .iter()
                    .filter(|(k, d)| given.get(section).and_then(|s| s.get(k)) != Some(d))
                    .map(|(k, d)| format!("{section}.{k}: the default is {d}"))
                    .collect(),
                _ => Vec::new(),
            })
            .collect();
        assert!(
            differ.is_empty(),
            "config/reference.toml differs from Config::default(): {differ:?}"
        );
        assert_eq!(
            given, defaults,
            "config/reference.toml differs from Config::default()"
        );
        // (c) Every key of the default tree is written out, in its section.
        let written = written_keys(REFERENCE);
        let mut missing = Vec::new();
        for (section, v) in defaults.as_table().unwrap() {
            match v {
                Value::Table(t) => {
                    for key in t.keys() {
                        if !written.contains(&(section.clone(), key.clone())) {
                            missing.push(format!("{section}.{key}"));
                        }
                    }
                }
                // The arrays of tables ([[origins]], [[registries]]) are empty by default: their
                // examples are checked below.
                Value::Array(_) => assert!(section == "origins" || section == "registries"),
                _ => missing.push(section.clone()),
            }
        }
        assert!(
            missing.is_empty(),
            "not in config/reference.toml: {missing:?}"
        );
        // And nothing is written that the tree does not have (deserializing would refuse it anyway).
        for (section, key) in &written {
            assert!(
                defaults.get(section).and_then(|s| s.get(key)).is_some(),
                "config/reference.toml: {section}.{key} is not a config key"
            );
        }
    }

    #[test]
    fn reference_is_a_valid_config() {
        Config::from_toml_str(REFERENCE, "config/reference.toml", &[]).unwrap();
    }

    /// Every key of `template` is written in the example, which parses to `one`.
    fn assert_complete(table: &str, example: &str, one: Value, template: Value) {
        for key in template.as_table().unwrap().keys() {
            assert!(
                one.get(key).is_some() && example.contains(&format!("\n{key} = ")),
                "the [[{table}]] example lacks `{key}`: {example}"
            );
        }
    }

    #[test]
    fn origins_example_is_complete_and_valid() {
        let example = example(REFERENCE, "origins");
        let c = Config::from_toml_str(&example, "the [[origins]] example", &[]).unwrap();
        assert_eq!(c.origins.len(), 1, "{example}");
        let template = serialized(&Origin {
            name: String::new(),
            url: String::new(),
            immutable: false,
        });
        assert_complete("origins", &example, serialized(&c.origins[0]), template);
    }

    #[test]
    fn registries_example_is_complete_and_valid() {
        let example = example(REFERENCE, "registries");
        let c = Config::from_toml_str(&example, "the [[registries]] example", &[]).unwrap();
        assert_eq!(c.registries.len(), 1, "{example}");
        let r = &c.registries[0];
        assert_eq!(r.tag_ttl.0, std::time::Duration::from_secs(300));
        assert!(r.password_file.is_none() && r.username.is_empty());
        let template = serialized(&Registry {
            name: String::new(),
            url: String::new(),
            username: String::new(),
            password_file: Some("x".into()),
            tag_ttl: crate::config::Span::secs(1),
        });
        assert_complete("registries", &example, serialized(r), template);
    }

    #[test]
    fn example_configs_are_valid() {
        for (name, text) in [
            (
                "standalone.toml",
                include_str!("../../config/standalone.toml"),
            ),
            (
                "top-gateway.toml",
                include_str!("../../config/top-gateway.toml"),
            ),
            (
                "child-gateway.toml",
                include_str!("../../config/child-gateway.toml"),
            ),
        ] {
            Config::from_toml_str(text, name, &[]).unwrap();
        }
    }
}
