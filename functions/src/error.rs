//! What a handler returns when it fails, and whether trying again can help.

use std::fmt;

/// A handler's failure. Durable events retry a transient failure with backoff and dead-letter a
/// permanent one at once; an rpc caller gets the message either way (`Herald-Error`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError {
    message: String,
    permanent: bool,
}

impl HandlerError {
    /// A failure that may pass on another attempt (a dependency down, a timeout).
    pub fn transient(message: impl Into<String>) -> HandlerError {
        HandlerError { message: message.into(), permanent: false }
    }

    /// A failure that no retry can fix (unparsable input, a bad id).
    pub fn permanent(message: impl Into<String>) -> HandlerError {
        HandlerError { message: message.into(), permanent: true }
    }

    /// Whether retrying is pointless.
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }

    /// The error text.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for HandlerError {}

/// Bad JSON input never gets better by retrying.
impl From<serde_json::Error> for HandlerError {
    fn from(error: serde_json::Error) -> HandlerError {
        HandlerError::permanent(format!("bad JSON: {error}"))
    }
}

/// A header value safe to send: control characters (a CR or LF would end the header) become
/// spaces, and the text is cut at `max` bytes on a character boundary.
pub(crate) fn header_safe(text: &str, max: usize) -> String {
    let mut out: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if out.len() > max {
        let mut cut = max;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_errors_are_permanent() {
        let error: HandlerError = serde_json::from_str::<u32>("x").unwrap_err().into();
        assert!(error.is_permanent());
        assert!(error.message().starts_with("bad JSON"));
        assert!(!HandlerError::transient("down").is_permanent());
    }

    #[test]
    fn header_values_lose_control_characters_and_length() {
        assert_eq!(header_safe("a\r\nb", 100), "a  b");
        assert_eq!(header_safe("ééé", 3), "é");
        assert_eq!(header_safe("abc", 3), "abc");
    }
}
