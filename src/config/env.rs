//! `CISTERN_<SECTION>__<KEY>` overrides (SPEC 2), applied to the parsed TOML tree before it is typed, so
//! that a value from the environment goes through exactly the same parsing and validation as one from the
//! file. The type a string becomes (list, bool, integer, string) is taken from the built-in defaults.

use toml::{Table, Value};

use super::{Config, ConfigError};

const PREFIX: &str = "CISTERN_";

pub fn apply(tree: &mut Table, vars: &[(String, String)]) -> Result<(), ConfigError> {
    let defaults = Value::try_from(Config::default()).map_err(|e| ConfigError::Env {
        var: PREFIX.into(),
        msg: e.to_string(),
    })?;
    let mut sorted: Vec<&(String, String)> =
        vars.iter().filter(|(k, _)| k.starts_with(PREFIX)).collect();
    sorted.sort();
    for (var, raw) in sorted {
        let rest = &var[PREFIX.len()..];
        let parts: Vec<&str> = rest.split("__").collect();
        let err = |msg: String| ConfigError::Env {
            var: var.clone(),
            msg,
        };
        match parts.as_slice() {
            // CISTERN_CONFIG, CISTERN_TOKEN and the like are not config keys.
            [_] => continue,
            ["ORIGINS", name, key] => apply_origin(tree, name, key, raw).map_err(err)?,
            [section, key] => {
                let section = section.to_ascii_lowercase();
                let key = key.to_ascii_lowercase();
                let Some(default) = defaults.get(&section).and_then(|s| s.get(&key)) else {
                    return Err(err(format!("no config key {section}.{key}")));
                };
                let value = typed(default, raw).map_err(err)?;
                let table = tree
                    .entry(section.clone())
                    .or_insert_with(|| Value::Table(Table::new()))
                    .as_table_mut()
                    .ok_or_else(|| err(format!("[{section}] in the file is not a table")))?;
                table.insert(key, value);
            }
            _ => return Err(err("expected CISTERN_<SECTION>__<KEY>".into())),
        }
    }
    Ok(())
}

fn typed(default: &Value, raw: &str) -> Result<Value, String> {
    Ok(match default {
        // Comma-separated (SPEC 2), or written as in the file: `["a", "b"]`.
        Value::Array(_) if raw.trim_start().starts_with('[') => {
            let doc: Table = toml::from_str(&format!("v = {raw}"))
                .map_err(|_| format!("`{raw}` is not a list: write a, b or [\"a\", \"b\"]"))?;
            match doc.get("v") {
                Some(Value::Array(items)) if items.iter().all(Value::is_str) => {
                    Value::Array(items.clone())
                }
                _ => return Err(format!("`{raw}` is not a list of strings")),
            }
        }
        Value::Array(_) => Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.into()))
                .collect(),
        ),
        Value::Boolean(_) => Value::Boolean(parse_bool(raw)?),
        Value::Integer(_) => Value::Integer(
            raw.trim()
                .parse()
                .map_err(|_| format!("`{raw}` is not an integer"))?,
        ),
        _ => Value::String(raw.to_string()),
    })
}

fn parse_bool(raw: &str) -> Result<bool, String> {
    match raw.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" | "" => Ok(false),
        _ => Err(format!("`{raw}` is not true or false")),
    }
}

/// `CISTERN_ORIGINS__<NAME>__URL` / `__IMMUTABLE`: the origin's name is `<NAME>` lower-cased; an origin of
/// that name from the file is updated, else a new one is added.
fn apply_origin(tree: &mut Table, name: &str, key: &str, raw: &str) -> Result<(), String> {
    let name = name.to_ascii_lowercase();
    let origins = tree
        .entry("origins")
        .or_insert_with(|| Value::Array(Vec::new()))
        .as_array_mut()
        .ok_or("origins in the file is not an array of tables")?;
    let norm = |s: &str| s.replace(['.', '-'], "_");
    let idx = match origins.iter().position(|o| {
        o.get("name").and_then(Value::as_str).map(norm).as_deref() == Some(name.as_str())
    }) {
        Some(i) => i,
        None => {
            let mut t = Table::new();
            t.insert("name".into(), Value::String(name.clone()));
            t.insert("url".into(), Value::String(String::new()));
            origins.push(Value::Table(t));
            origins.len() - 1
        }
    };
    let entry = origins[idx]
        .as_table_mut()
        .ok_or("an [[origins]] entry is not a table")?;
    match key {
        "URL" => entry.insert("url".into(), Value::String(raw.to_string())),
        "IMMUTABLE" => entry.insert("immutable".into(), Value::Boolean(parse_bool(raw)?)),
        other => {
            return Err(format!(
                "origins have no key {}",
                other.to_ascii_lowercase()
            ))
        }
    };
    Ok(())
}
