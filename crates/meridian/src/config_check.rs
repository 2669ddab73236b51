//! `meridian config check FILE`: reads a node config file the way `serve --config`
//! does and says, for the first problem, which key it is and what is wrong with it
//! (an unknown key, a wrong type, an impossible value).

use std::path::Path;

use meridian_server::Config;
use meridian_server::ConfigError;

/// What is wrong with a config file, located at one key.
#[derive(Debug, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key (`signaling.messages_per_second`), or the section when the problem
    /// is the section itself; `None` when the file is not TOML at all.
    pub key: Option<String>,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        write!(f, "{}", self.message)
    }
}

/// Checks a config file's text: parses it over the defaults and validates the result.
pub fn check_text(text: &str) -> Result<Config, Problem> {
    let config: Config = toml::from_str(text).map_err(|e| {
        let (key, line) = match e.span() {
            Some(span) => key_at(text, span.start),
            None => (None, None),
        };
        Problem {
            key,
            line,
            message: first_line_of_reason(e.message()),
        }
    })?;
    config.validate().map_err(|e| match e {
        ConfigError::Invalid { field, reason } => Problem {
            line: line_of_key(text, field),
            key: Some(field.to_string()),
            message: format!("impossible value: {reason}"),
        },
        other => Problem {
            key: None,
            line: None,
            message: other.to_string(),
        },
    })?;
    Ok(config)
}

/// Reads and checks a file.
pub fn check_file(path: &Path) -> Result<Config, Problem> {
    let meta = std::fs::metadata(path).map_err(|e| Problem {
        key: None,
        line: None,
        message: format!("cannot read {}: {e}", path.display()),
    })?;
    if meta.len() > 1024 * 1024 {
        return Err(Problem {
            key: None,
            line: None,
            message: format!(
                "{} bytes is more than the 1 MiB a config file may have",
                meta.len()
            ),
        });
    }
    let text = std::fs::read_to_string(path).map_err(|e| Problem {
        key: None,
        line: None,
        message: format!("cannot read {}: {e}", path.display()),
    })?;
    check_text(&text)
}

/// One line of summary for a valid config.
pub fn summary(c: &Config) -> String {
    format!(
        "region {}, node {}, http {}, media {}{}, webtransport {}, internal {} ({}), event log {}",
        c.node.region,
        c.node.id,
        c.http.addr,
        c.media.addr,
        c.media
            .public_ip
            .map(|ip| format!(" (public {ip})"))
            .unwrap_or_default(),
        c.webtransport.addr,
        c.internal.listen,
        match &c.internal.cert {
            Some(cert) => format!("mutual TLS with {}", cert.display()),
            None => "mutual TLS with development certificates under data_dir/internal".into(),
        },
        if c.node.database_url.is_some() {
            "Postgres"
        } else {
            "embedded SQLite"
        }
    )
}

fn first_line_of_reason(message: &str) -> String {
    message.lines().next().unwrap_or(message).trim().to_string()
}

/// The dotted key whose line holds byte `offset`, from the nearest `[section]` above
/// it and the `key =` on that line (or the section header itself).
fn key_at(text: &str, offset: usize) -> (Option<String>, Option<usize>) {
    let offset = offset.min(text.len());
    let line_no = text[..offset].matches('\n').count();
    let mut section: Option<String> = None;
    for line in text.lines().take(line_no) {
        if let Some(s) = header(line) {
            section = Some(s);
        }
    }
    let line = text.lines().nth(line_no).unwrap_or("");
    if let Some(s) = header(line) {
        return (Some(s), Some(line_no + 1));
    }
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"').to_string())
        .filter(|k| !k.is_empty());
    let full = match (section, key) {
        (Some(s), Some(k)) => Some(format!("{s}.{k}")),
        (None, Some(k)) => Some(k),
        (s, None) => s,
    };
    (full, Some(line_no + 1))
}

fn header(line: &str) -> Option<String> {
    let t = line.trim();
    let inner = t.strip_prefix('[')?.split(']').next()?;
    (!inner.starts_with('[')).then(|| inner.trim().to_string())
}

/// The line where a dotted key (`cluster.lease_ttl_ms`) is set, if it is.
fn line_of_key(text: &str, dotted: &str) -> Option<usize> {
    let (section, key) = dotted.rsplit_once('.')?;
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        if let Some(s) = header(line) {
            current = s;
        } else if current == section
            && line
                .split_once('=')
                .is_some_and(|(k, _)| k.trim().trim_matches('"') == key)
        {
            return Some(i + 1);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_is_valid_and_sets_every_section() {
        let text = include_str!("../../../meridian.example.toml");
        let c = check_text(text).unwrap_or_else(|p| panic!("meridian.example.toml: {p}"));
        assert_eq!(c.node.region, "local");
        for section in [
            "[node]",
            "[node.region_urls]",
            "[http]",
            "[media]",
            "[signaling]",
            "[webtransport]",
            "[cluster]",
            "[auth]",
            "[internal]",
        ] {
            assert!(text.contains(section), "example lacks {section}");
        }
    }

    #[test]
    fn an_unknown_key_is_named_with_its_section_and_line() {
        let p =
            check_text("[node]\nregion = \"eu\"\n\n[signaling]\nmax_conections = 5\n").unwrap_err();
        assert_eq!(p.key.as_deref(), Some("signaling.max_conections"));
        assert_eq!(p.line, Some(5));
        assert!(p.message.contains("unknown field"), "{p}");
        assert!(
            p.message.contains("max_connections"),
            "lists the valid keys: {p}"
        );
    }

    #[test]
    fn an_unknown_section_is_named() {
        let p = check_text("[nodes]\nregion = \"eu\"\n").unwrap_err();
        assert_eq!(p.key.as_deref(), Some("nodes"));
        assert!(p.message.contains("unknown field"), "{p}");
    }

    #[test]
    fn a_wrong_type_is_named() {
        let p = check_text("[cluster]\nlease_ttl_ms = \"soon\"\n").unwrap_err();
        assert_eq!(p.key.as_deref(), Some("cluster.lease_ttl_ms"));
        assert_eq!(p.line, Some(2));
        assert!(p.message.contains("invalid type"), "{p}");
        let p = check_text("[http]\naddr = \"not an address\"\n").unwrap_err();
        assert_eq!(p.key.as_deref(), Some("http.addr"));
        let p = check_text("[signaling]\nmax_connections = -3\n").unwrap_err();
        assert_eq!(p.key.as_deref(), Some("signaling.max_connections"));
    }

    #[test]
    fn an_impossible_value_is_named() {
        let p = check_text("[signaling]\nmessages_per_second = 0\n").unwrap_err();
        assert_eq!(p.key.as_deref(), Some("signaling.messages_per_second"));
        assert_eq!(p.line, Some(2));
        assert!(p.message.starts_with("impossible value"), "{p}");
        let p = check_text("[media]\naddr = \"0.0.0.0:7882\"\n").unwrap_err();
        assert_eq!(p.key.as_deref(), Some("media.public_ip"));
        assert!(
            p.to_string().contains("required when media.addr binds all"),
            "{p}"
        );
    }

    #[test]
    fn a_file_that_is_not_toml_is_refused() {
        let p = check_text("this is = = not toml").unwrap_err();
        assert_eq!(p.line, Some(1));
    }

    #[test]
    fn a_bad_region_directory_is_named() {
        let region = |id: &str, log: &str| {
            format!(
                "[[regions]]\nid = \"{id}\"\nsignal_urls = [\"ws://{id}:7880/signal\"]\nprobe_url = \"http://{id}:7880/probe\"\nlog = \"{log}\"\n"
            )
        };
        let ok = format!(
            "[node]\nregion = \"eu\"\ndatabase_url = \"postgres://db/eu\"\n{}{}",
            region("eu", "postgres://db/eu"),
            region("us", "postgres://db/us")
        );
        assert_eq!(check_text(&ok).unwrap().regions.len(), 2);
        let twice = format!(
            "[node]\nregion = \"eu\"\n{}{}",
            region("eu", "postgres://db/eu"),
            region("eu", "postgres://db/x")
        );
        let p = check_text(&twice).unwrap_err();
        assert_eq!(p.key.as_deref(), Some("regions.id"));
        assert!(p.message.contains("listed twice"), "{p}");
        let shared = format!(
            "[node]\nregion = \"eu\"\n{}{}",
            region("eu", "postgres://db/eu"),
            region("us", "postgres://db/eu")
        );
        let p = check_text(&shared).unwrap_err();
        assert_eq!(p.key.as_deref(), Some("regions.log"));
        let elsewhere = format!(
            "[node]\nregion = \"eu\"\ndatabase_url = \"postgres://db/us\"\n{}{}",
            region("eu", "postgres://db/eu"),
            region("us", "postgres://db/us")
        );
        let p = check_text(&elsewhere).unwrap_err();
        assert_eq!(p.key.as_deref(), Some("node.database_url"));
        assert_eq!(p.line, Some(3));
        let p = check_text("[regions]\nid = 1\n").unwrap_err();
        assert_eq!(p.key.as_deref(), Some("regions"));
    }
}
