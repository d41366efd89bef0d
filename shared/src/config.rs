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
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(path) = file {
        if !path.is_file() {
            return Err(ConfigError(format!("no config file at {}", path.display())));
        }
        figment = figment.merge(Toml::file(path));
    }
    figment
        .merge(Env::prefixed(ENV_PREFIX).ignore(&["config"]))
        .merge(Serialized::defaults(flags))
        .extract()
        .map_err(|e| ConfigError(e.to_string()))
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
            assert!(error.contains("\"LIMIT\"") && error.contains("HERALD_"), "{error}");
            assert!(load::<Sample, _>(Some(&jail.directory().join("missing.toml")), &no_flag).is_err());
            Ok(())
        });
    }
}
