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
    fn layers_override_in_order() {
        let dir = std::env::temp_dir().join(format!("herald-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("herald.toml");
        std::fs::write(&file, "listen = \"file\"\nlimit = 7\n").unwrap();
        let from_file: Sample = load(Some(&file), &Flags { listen: None }).unwrap();
        assert_eq!(from_file, Sample { listen: "file".into(), limit: 7 });
        let from_flag: Sample = load(Some(&file), &Flags { listen: Some("flag".into()) }).unwrap();
        assert_eq!(from_flag, Sample { listen: "flag".into(), limit: 7 });
        assert!(load::<Sample, _>(Some(&dir.join("missing.toml")), &Flags { listen: None }).is_err());
    }
}
