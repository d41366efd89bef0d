//! Layered configuration: built-in defaults, then a TOML file, then `HERALD_*` environment
//! variables, then command-line flags; each layer overrides the one before.
//!
//! Every binary has one flat `Config` struct; its keys are the TOML keys and, upper-cased with the
//! `HERALD_` prefix, the environment variables (`nats_url` → `HERALD_NATS_URL`).

use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The prefix of every environment variable Herald reads.
pub const ENV_PREFIX: &str = "HERALD_";

/// A configuration that could not be loaded; says which key and why.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(String);

/// Loads `T` from its defaults, the file at `file` (which must exist when given), the environment,
/// and `flags` (a serializable struct whose `None` fields are skipped).
pub fn load<T, F>(file: Option<&Path>, flags: &F) -> Result<T, ConfigError>
where
    T: Serialize + DeserializeOwned + Default,
    F: Serialize,
{
    let known = known_keys(&T::default())?;
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(path) = file {
        if !path.is_file() {
            return Err(ConfigError(format!("no config file at {}", path.display())));
        }
        check_file_keys(path, &known)?;
        figment = figment.merge(Toml::file(path));
    }
    // `vars_os`: a variable that is not Unicode is someone else's, not a reason to stop.
    let names = std::env::vars_os().filter_map(|(name, _)| name.into_string().ok());
    for warning in env_near_misses(names, &known) {
        eprintln!("warning: {warning}");
    }
    let figment = figment.merge(Env::prefixed(ENV_PREFIX).ignore(&["config"])).merge(Serialized::defaults(flags));
    figment.extract().map_err(|error| explain_in(&figment, error))
}

/// A duration setting (`#[serde(with = "herald_shared::config::duration")]`): text with a unit
/// (`25s`, `500ms`, `2m`, `7d`), or a bare `0` (a setting where 0 means "none" or "for ever").
pub mod duration {
    use std::fmt;
    use std::time::Duration;

    use serde::de::{self, Unexpected, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        humantime_serde::serialize(duration, serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        deserializer.deserialize_any(DurationVisitor)
    }

    struct DurationVisitor;

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
            formatter.write_str("a duration")
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Duration, E> {
            humantime_serde::re::humantime::parse_duration(text.trim())
                .map_err(|_| E::invalid_value(Unexpected::Str(text), &self))
        }

        fn visit_u64<E: de::Error>(self, number: u64) -> Result<Duration, E> {
            match number {
                0 => Ok(Duration::ZERO),
                _ => Err(E::invalid_value(Unexpected::Unsigned(number), &self)),
            }
        }

        fn visit_i64<E: de::Error>(self, number: i64) -> Result<Duration, E> {
            match number {
                0 => Ok(Duration::ZERO),
                _ => Err(E::invalid_value(Unexpected::Signed(number), &self)),
            }
        }
    }
}

/// A bad value in words. A value of a setting `T` takes from a shared struct (`#[serde(flatten)]`:
/// the stream's and NATS's settings) comes without its key; that struct read alone names it.
fn explain_in(figment: &Figment, error: figment::Error) -> ConfigError {
    if error.clone().into_iter().any(|error| error.path.is_empty()) {
        let alone = match figment.extract::<crate::stream::StreamSettings>() {
            Ok(_) => figment.extract::<crate::nats::NatsSettings>().err(),
            Err(error) => Some(error),
        };
        if let Some(named) = alone {
            return explain(named);
        }
    }
    explain(error)
}

/// A bad value in words: the setting, where its value came from, and what is wrong with it.
fn explain(error: figment::Error) -> ConfigError {
    use figment::error::Kind;
    let said: Vec<String> = error
        .into_iter()
        .map(|error| {
            let key = error.path.join(".").to_lowercase();
            let from = match &error.metadata {
                Some(metadata) if metadata.name.contains("environment") => {
                    format!(" (from {ENV_PREFIX}{})", key.to_uppercase())
                }
                Some(metadata) => match &metadata.source {
                    Some(source) => format!(" (in {source})"),
                    None => format!(" (from {})", metadata.name),
                },
                None => String::new(),
            };
            let what = match &error.kind {
                Kind::UnknownVariant(found, expected) => format!("`{found}` is not one of {}", expected.join(", ")),
                Kind::InvalidType(actual, expected) | Kind::InvalidValue(actual, expected) => {
                    let hint = if expected.contains("duration") { " such as 25s, 500ms or 2m" } else { "" };
                    format!("{actual} is not {expected}{hint}")
                }
                other => other.to_string(),
            };
            if key.is_empty() { what } else { format!("{key}{from}: {what}") }
        })
        .collect();
    ConfigError(said.join("; "))
}

/// The settings of a configuration: the keys its defaults serialize to.
fn known_keys<T: Serialize>(defaults: &T) -> Result<Vec<String>, ConfigError> {
    let value = serde_json::to_value(defaults).map_err(|e| ConfigError(e.to_string()))?;
    Ok(value.as_object().map(|object| object.keys().cloned().collect()).unwrap_or_default())
}

/// The known key closest to `key`, when one is close enough to be what was meant.
fn closest<'a>(key: &str, known: &'a [String]) -> Option<&'a str> {
    known
        .iter()
        .map(|candidate| (strsim::levenshtein(key, candidate), candidate))
        .filter(|(distance, _)| *distance <= 2)
        .min()
        .map(|(_, candidate)| candidate.as_str())
}

/// A file names this binary's settings only: a key it does not know (a typo, say) would be
/// ignored in silence, and its default used.
fn check_file_keys(path: &Path, known: &[String]) -> Result<(), ConfigError> {
    let keys: figment::value::Dict =
        Figment::from(Toml::file(path)).extract().map_err(|e| ConfigError(e.to_string()))?;
    match keys.keys().find(|key| !known.contains(key)) {
        Some(key) => {
            let hint = closest(key, known).map(|near| format!(" (did you mean {near}?)")).unwrap_or_default();
            Err(ConfigError(format!("{}: unknown setting {key}{hint}", path.display())))
        }
        None => Ok(()),
    }
}

/// `HERALD_*` variables that are no setting but one letter or two away from one (other programs
/// read other `HERALD_*` variables, so only what looks like a typo is told).
fn env_near_misses(names: impl Iterator<Item = String>, known: &[String]) -> Vec<String> {
    let mut warnings = Vec::new();
    for name in names {
        let Some(key) = name.strip_prefix(ENV_PREFIX).map(str::to_lowercase) else { continue };
        if key == "config" || known.contains(&key) {
            continue;
        }
        if let Some(near) = closest(&key, known) {
            let near = format!("{ENV_PREFIX}{}", near.to_uppercase());
            warnings.push(format!("{name} is no setting of this program and is ignored; did you mean {near}?"));
        }
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(default)]
    struct Sample {
        listen: String,
        limit: u32,
    }

    #[derive(Serialize)]
    struct Flags {
        #[serde(skip_serializing_if = "Option::is_none")]
        listen: Option<String>,
    }

    #[test]
    // Jail's closure returns figment's own (large) error type.
    #[allow(clippy::result_large_err)]
    fn layers_override_in_order() {
        // In a jail: an environment of its own (the real one cleared) and a temporary directory.
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file("herald.toml", "listen = \"file\"\nlimit = 7\n")?;
            let file = jail.directory().join("herald.toml");
            let no_flag = Flags { listen: None };
            let defaults: Sample = load(None, &no_flag).unwrap();
            assert_eq!(defaults, Sample::default());
            let from_file: Sample = load(Some(&file), &no_flag).unwrap();
            assert_eq!(from_file, Sample { listen: "file".into(), limit: 7 });

            // The environment overrides the file (values parsed to the field's type)...
            jail.set_env("HERALD_LISTEN", "env");
            jail.set_env("HERALD_LIMIT", "9");
            let from_env: Sample = load(Some(&file), &no_flag).unwrap();
            assert_eq!(from_env, Sample { listen: "env".into(), limit: 9 });
            // ...and flags override the environment.
            let from_flag: Sample = load(Some(&file), &Flags { listen: Some("flag".into()) }).unwrap();
            assert_eq!(from_flag, Sample { listen: "flag".into(), limit: 9 });

            // Variables without the prefix are not Herald's; a bad value names its key.
            jail.set_env("LIMIT", "1");
            assert_eq!(load::<Sample, _>(None, &no_flag).unwrap().limit, 9);
            jail.set_env("HERALD_LIMIT", "many");
            let error = load::<Sample, _>(None, &no_flag).unwrap_err().to_string();
            assert_eq!(error, "configuration: limit (from HERALD_LIMIT): string \"many\" is not u32");
            jail.clear_env();
            jail.create_file("bad.toml", "limit = \"7\"\n")?;
            let error = load::<Sample, _>(Some(&jail.directory().join("bad.toml")), &no_flag).unwrap_err().to_string();
            assert!(
                error.starts_with("configuration: limit (in ") && error.ends_with("bad.toml): string \"7\" is not u32")
            );
            assert!(load::<Sample, _>(Some(&jail.directory().join("missing.toml")), &no_flag).is_err());
            Ok(())
        });
    }

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(default)]
    struct WithStream {
        #[serde(with = "duration")]
        timeout: std::time::Duration,
        #[serde(flatten)]
        stream: crate::stream::StreamSettings,
    }

    #[test]
    #[allow(clippy::result_large_err)]
    fn durations_take_a_bare_zero_and_a_bad_one_names_its_key_even_in_shared_settings() {
        use std::time::Duration;
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            let no_flag = Flags { listen: None };
            jail.set_env("HERALD_TIMEOUT", "0");
            jail.set_env("HERALD_CURSORS_MAX_AGE", "0");
            jail.set_env("HERALD_STREAM_MAX_AGE", "90s");
            let loaded: WithStream = load(None, &no_flag).unwrap();
            assert_eq!(
                (loaded.timeout, loaded.stream.cursors_max_age, loaded.stream.stream_max_age),
                (Duration::ZERO, Duration::ZERO, Duration::from_secs(90))
            );

            jail.set_env("HERALD_STREAM_MAX_AGE", "5");
            let error = load::<WithStream, _>(None, &no_flag).unwrap_err().to_string();
            assert_eq!(
                error,
                "configuration: stream_max_age (from HERALD_STREAM_MAX_AGE): unsigned int `5` is not a duration \
                 such as 25s, 500ms or 2m"
            );
            jail.set_env("HERALD_STREAM_MAX_AGE", "7d");
            jail.set_env("HERALD_TIMEOUT", "soon");
            let error = load::<WithStream, _>(None, &no_flag).unwrap_err().to_string();
            assert_eq!(
                error,
                "configuration: timeout (from HERALD_TIMEOUT): string \"soon\" is not a duration such as 25s, 500ms or 2m"
            );
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)]
    fn a_misspelled_setting_is_an_error_in_a_file_and_a_warning_in_the_environment() {
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file("herald.toml", "listen = \"file\"\nlimits = 7\n")?;
            let file = jail.directory().join("herald.toml");
            let error = load::<Sample, _>(Some(&file), &Flags { listen: None }).unwrap_err().to_string();
            assert!(error.ends_with("unknown setting limits (did you mean limit?)"), "{error}");
            Ok(())
        });
        let known = known_keys(&Sample::default()).unwrap();
        let names = ["HERALD_LIMT", "HERALD_LIMIT", "HERALD_NATS_GATEWAY_PASSWORD", "PATH", "HERALD_CONFIG"];
        let warnings = env_near_misses(names.into_iter().map(String::from), &known);
        assert_eq!(warnings, ["HERALD_LIMT is no setting of this program and is ignored; did you mean HERALD_LIMIT?"]);
    }
}
