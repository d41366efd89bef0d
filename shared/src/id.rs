//! Ids: users, devices, topics and function names.
//!
//! Every id that ends up in a NATS subject is exactly one subject token: 1 to 128 characters from
//! `A-Z a-z 0-9 _ - = @ : +`. Anything else (a `.`, `*`, `>`, whitespace, an empty or longer id) is
//! refused where it enters, so no input can ever become a wildcard subscription.

use std::fmt;

/// The longest id, and the longest function name.
pub const MAX_ID_LEN: usize = 128;

/// What kind of id was refused; used in error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdKind {
    User,
    Device,
    Topic,
    Function,
}

impl fmt::Display for IdKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IdKind::User => "user id",
            IdKind::Device => "device id",
            IdKind::Topic => "topic",
            IdKind::Function => "function name",
        })
    }
}

/// An id that breaks the token rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{0} is empty")]
    Empty(IdKind),
    #[error("{0} is longer than {MAX_ID_LEN} characters")]
    TooLong(IdKind),
    #[error("{kind} contains {found:?}; allowed are A-Z a-z 0-9 _ - = @ : +")]
    BadChar { kind: IdKind, found: char },
    #[error("{0} has an empty part: it is names joined by single dots (prefs.set)")]
    EmptyPart(IdKind),
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '=' | '@' | ':' | '+')
}

/// Checks that `id` is one subject token (users, devices, topics).
pub fn check_id(kind: IdKind, id: &str) -> Result<(), IdError> {
    if id.is_empty() {
        return Err(IdError::Empty(kind));
    }
    if id.len() > MAX_ID_LEN {
        return Err(IdError::TooLong(kind));
    }
    match id.chars().find(|&c| !is_token_char(c)) {
        Some(found) => Err(IdError::BadChar { kind, found }),
        None => Ok(()),
    }
}

/// The longest message kind (`Herald-Type`), in characters.
pub const MAX_KIND_CHARS: usize = 128;

/// Checks a message kind (`Herald-Type`), as the HTTP API, the push functions, `pub` and muting
/// take it: 1 to 128 characters, none a control character (a kind travels in NATS headers and in
/// the edge protocols' headers and event names; any other text a publisher may give is a kind),
/// without spaces at either end (NATS trims header values).
pub fn check_kind(kind: &str) -> Result<(), String> {
    let start = || kind.chars().take(16).collect::<String>();
    if kind.is_empty() {
        return Err("a kind is not empty".into());
    }
    if kind.chars().count() > MAX_KIND_CHARS {
        return Err(format!("kind {:?}… is longer than {MAX_KIND_CHARS} characters", start()));
    }
    if kind.chars().any(char::is_control) {
        return Err(format!("kind {:?} holds a control character", start()));
    }
    // NATS trims header values as it reads them: " mail" would arrive as "mail".
    if kind.trim() != kind {
        return Err(format!("kind {:?} starts or ends with a space", start()));
    }
    Ok(())
}

/// Checks a push function name: one or more tokens joined by `.`, at most 128 characters.
pub fn check_function_name(name: &str) -> Result<(), IdError> {
    let kind = IdKind::Function;
    if name.len() > MAX_ID_LEN {
        return Err(IdError::TooLong(kind));
    }
    if name.is_empty() {
        return Err(IdError::Empty(kind));
    }
    name.split('.').try_for_each(|part| match check_id(kind, part) {
        Err(IdError::Empty(kind)) => Err(IdError::EmptyPart(kind)),
        checked => checked,
    })
}

/// Escapes an id for use in a KV key: every character outside `A-Za-z0-9_-` becomes `=` and its two
/// upper-case hex digits (`a@b` → `a=40b`, `=` → `=3D`). Ids are ASCII, so one byte per character.
pub fn kv_key(id: &str) -> String {
    let mut key = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            key.push(b as char);
        } else {
            key.push_str(&format!("={b:02X}"));
        }
    }
    key
}

/// Reverses [`kv_key`]; `None` when `key` is not a valid escape.
pub fn kv_key_decode(key: &str) -> Option<String> {
    let bytes = key.as_bytes();
    let mut out = String::with_capacity(key.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'=' {
            let hex = key.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()? as char);
            i += 3;
        } else {
            out.push(bytes[i] as char);
            i += 1;
        }
    }
    Some(out)
}

/// A topic permission from a token's `topics` claim: an exact name, or a prefix ending in `*`.
pub fn topic_allowed(claims: &[String], topic: &str) -> bool {
    claims.iter().any(|pattern| match pattern.strip_suffix('*') {
        Some(prefix) => topic.starts_with(prefix),
        None => pattern == topic,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_every_allowed_character() {
        assert_eq!(check_id(IdKind::User, "Az09_-=@:+"), Ok(()));
        assert_eq!(check_id(IdKind::User, &"x".repeat(128)), Ok(()));
    }

    #[test]
    fn refuses_wildcards_separators_and_bad_lengths() {
        for bad in ["a.b", "*", ">", "a b", "a\tb", "é", "a/b"] {
            assert!(matches!(check_id(IdKind::User, bad), Err(IdError::BadChar { .. })), "{bad}");
        }
        assert_eq!(check_id(IdKind::Topic, ""), Err(IdError::Empty(IdKind::Topic)));
        assert_eq!(check_id(IdKind::Device, &"x".repeat(129)), Err(IdError::TooLong(IdKind::Device)));
    }

    #[test]
    fn function_names_are_dotted_tokens() {
        assert_eq!(check_function_name("prefs.set"), Ok(()));
        assert_eq!(check_function_name("echo"), Ok(()));
        for bad in ["", "a..b", ".a", "a.", "a.*", "a.>", "a b"] {
            assert!(check_function_name(bad).is_err(), "{bad}");
        }
        assert!(check_function_name(&"a".repeat(129)).is_err());
        assert_eq!(check_function_name("a..b"), Err(IdError::EmptyPart(IdKind::Function)));
    }

    #[test]
    fn kinds_are_any_text_without_control_characters() {
        for good in ["mail", "a b", "café", &"é".repeat(128)] {
            assert_eq!(check_kind(good), Ok(()), "{good}");
        }
        for bad in ["", "a\nb", "a\u{0}", &"x".repeat(129), " mail", "mail ", " "] {
            assert!(check_kind(bad).is_err(), "{bad:?}");
        }
        assert_eq!(check_function_name(""), Err(IdError::Empty(IdKind::Function)));
    }

    #[test]
    fn kv_keys_escape_and_round_trip() {
        assert_eq!(kv_key("a@b"), "a=40b");
        assert_eq!(kv_key("="), "=3D");
        assert_eq!(kv_key("u:1+2"), "u=3A1=2B2");
        for id in ["a@b", "=", "plain_id-1", "x=:@+"] {
            assert_eq!(kv_key_decode(&kv_key(id)).as_deref(), Some(id));
        }
        assert_eq!(kv_key_decode("=4"), None);
    }

    #[test]
    fn topic_claims_match_exactly_or_by_prefix() {
        let claims = vec!["news".to_string(), "room-*".to_string()];
        assert!(topic_allowed(&claims, "news"));
        assert!(topic_allowed(&claims, "room-7"));
        assert!(!topic_allowed(&claims, "newsy"));
        assert!(!topic_allowed(&claims, "sports"));
        assert!(!topic_allowed(&[], "news"));
    }
}
