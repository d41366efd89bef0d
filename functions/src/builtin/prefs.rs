//! `prefs.get` / `prefs.set`: the caller's muted kinds, in KV `herald-prefs` under
//! `kv_key(user)` as `{"muted":[...]}`. The user is always the caller (`Herald-User`), never
//! anything in the body.

use async_nats::jetstream::kv;
use herald_shared::id::kv_key;
use serde::{Deserialize, Serialize};

use crate::error::HandlerError;
use crate::function::Function;
use crate::rpc::{RpcReply, RpcRequest};

/// The most muted kinds one user keeps.
pub const MAX_MUTED: usize = 64;

/// A user's preferences, as stored and as replied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prefs {
    /// Kinds (`Herald-Type`) the user does not want pushed.
    pub muted: Vec<String>,
}

/// The body of `prefs.set`. Other fields (such as a `user`) are ignored.
#[derive(Debug, Deserialize)]
struct SetBody {
    muted: Vec<String>,
}

/// `prefs.get` and `prefs.set` on `bucket`.
pub fn functions(bucket: kv::Store) -> [Function; 2] {
    let for_set = bucket.clone();
    [
        Function::rpc("prefs.get", move |request: RpcRequest| {
            let bucket = bucket.clone();
            async move { RpcReply::json(&get(&bucket, request.user()?).await?) }
        }),
        Function::rpc("prefs.set", move |request: RpcRequest| {
            let bucket = for_set.clone();
            async move {
                let prefs = validate(request.json::<SetBody>()?.muted)?;
                set(&bucket, request.user()?, &prefs).await?;
                RpcReply::json(&prefs)
            }
        }),
    ]
}

async fn get(bucket: &kv::Store, user: &str) -> Result<Prefs, HandlerError> {
    let stored = bucket.get(kv_key(user)).await.map_err(|e| HandlerError::transient(format!("KV get: {e}")))?;
    match stored {
        None => Ok(Prefs::default()),
        Some(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| HandlerError::transient(format!("stored prefs of {user} are not valid: {e}"))),
    }
}

async fn set(bucket: &kv::Store, user: &str, prefs: &Prefs) -> Result<(), HandlerError> {
    let value = serde_json::to_vec(prefs).map_err(|e| HandlerError::transient(e.to_string()))?;
    bucket.put(kv_key(user), value.into()).await.map_err(|e| HandlerError::transient(format!("KV put: {e}")))?;
    Ok(())
}

/// Checks the limits and drops repeated kinds (the first stays, in order).
fn validate(muted: Vec<String>) -> Result<Prefs, HandlerError> {
    if muted.len() > MAX_MUTED {
        return Err(HandlerError::permanent(format!("at most {MAX_MUTED} muted kinds")));
    }
    // Muting "" would mute every message without a kind.
    for kind in &muted {
        herald_shared::id::check_kind(kind).map_err(HandlerError::permanent)?;
    }
    let mut unique: Vec<String> = Vec::with_capacity(muted.len());
    for kind in muted {
        if !unique.contains(&kind) {
            unique.push(kind);
        }
    }
    Ok(Prefs { muted: unique })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_keeps_order_and_drops_repeats() {
        let prefs = validate(vec!["b".into(), "a".into(), "b".into()]).unwrap();
        assert_eq!(prefs.muted, ["b", "a"]);
        assert_eq!(validate(vec![]).unwrap(), Prefs::default());
    }

    #[test]
    fn validation_enforces_the_limits() {
        assert!(validate(vec!["x".repeat(128)]).is_ok());
        assert!(validate(vec!["é".repeat(128)]).is_ok());
        assert!(validate(vec!["x".repeat(129)]).unwrap_err().is_permanent());
        assert!(validate(vec![String::new()]).unwrap_err().is_permanent());
        assert!(validate((0..64).map(|i| i.to_string()).collect()).is_ok());
        assert!(validate((0..65).map(|i| i.to_string()).collect()).unwrap_err().is_permanent());
    }

    #[test]
    fn set_bodies_must_be_lists_of_strings() {
        for bad in [r#"{}"#, r#"{"muted":"x"}"#, r#"{"muted":[1]}"#, r#"[]"#, "null"] {
            assert!(serde_json::from_str::<SetBody>(bad).is_err(), "{bad}");
        }
        let body: SetBody = serde_json::from_str(r#"{"muted":["a"],"user":"someone-else"}"#).unwrap();
        assert_eq!(body.muted, ["a"]);
    }
}
