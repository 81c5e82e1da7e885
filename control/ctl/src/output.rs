//! Tables and JSON on stdout.

use serde_json::Value;

pub fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Prints rows as columns aligned on the widest cell.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, cell) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(headers.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

/// "created frontend "web" (generation 3)".
pub fn changed(verb: &str, kind: &str, name: &str, generation: u64) {
    println!("{verb} {kind} {name:?} (generation {generation})");
}

pub fn yes(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

pub fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref()
        .map_or_else(|| "-".to_string(), ToString::to_string)
}

/// A model value as the configuration file spells it (`public`, `five_tuple`, …).
pub fn name_of<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v).unwrap_or(Value::Null) {
        Value::String(s) => s,
        other => other.to_string(),
    }
}

/// `""` given for an optional text field clears it.
pub fn clear_empty(v: String) -> Option<String> {
    (!v.is_empty()).then_some(v)
}
