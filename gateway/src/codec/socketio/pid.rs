//! The private id (`pid`) of a Socket.IO connection's state, which clients send back with their
//! last offset to recover it, and take as "recovered" when the CONNECT answer carries it unchanged.
//!
//! A pid is `<root>` or `<root>.<generation>`: the root is a random id given to the lineage's first
//! connection (private, unlike its conn id and its Engine.IO `sid`), whose digest names the device
//! its loss notes are kept under, so that a recovery finds a loss
//! the connection before it noted; the generation grows each time a recovery could not replay
//! everything, so that the answer differs from what the client sent and it reloads its state.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

use herald_shared::id::{IdKind, check_id};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pid {
    root: String,
    generation: u64,
}

impl Pid {
    /// The pid of a connection that starts a new lineage.
    pub(crate) fn new(conn: &str) -> Pid {
        Pid { root: conn.to_string(), generation: 0 }
    }

    /// Reads a pid a client sent back; `None` when it is not one this server could have given.
    pub(crate) fn parse(text: &str) -> Option<Pid> {
        let (root, generation) = match text.split_once('.') {
            // Digits only, as written: no sign, no leading zero.
            Some((root, generation))
                if generation.bytes().all(|b| b.is_ascii_digit()) && !generation.starts_with('0') =>
            {
                // The last generation is never given: the next would have to be the same.
                (root, generation.parse().ok().filter(|g| *g < u64::MAX)?)
            }
            Some(_) => return None,
            None => (text, 0),
        };
        check_id(IdKind::Device, root).and(check_id(IdKind::Device, &device(root))).ok()?;
        Some(Pid { root: root.to_string(), generation })
    }

    /// The device the lineage's sessions are (one per Socket.IO state, not per connection).
    pub(crate) fn device(&self) -> String {
        device(&self.root)
    }

    /// The public id of the socket (`socket.id`): a digest of the pid, from which the pid cannot be
    /// told.
    pub(crate) fn socket_id(&self) -> String {
        digest("socket", &self.to_string())
    }

    /// The pid that tells a recovering client its state was not recovered.
    pub(crate) fn next(&self) -> Pid {
        Pid { root: self.root.clone(), generation: self.generation.saturating_add(1) }
    }
}

/// The device a root's states are kept under: shown in events, the HTTP API and logs, so a digest
/// of the root, not the root.
fn device(root: &str) -> String {
    format!("socketio-{}", digest("device", root))
}

/// 20 characters of base64url from a SHA-256 of `text`, apart for each `purpose`.
fn digest(purpose: &str, text: &str) -> String {
    let digest = Sha256::new().chain_update(purpose).chain_update([0]).chain_update(text).finalize();
    URL_SAFE_NO_PAD.encode(&digest[..15])
}

impl fmt::Display for Pid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.generation {
            0 => f.write_str(&self.root),
            generation => write!(f, "{}.{generation}", self.root),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pid_reads_back_as_written_and_keeps_its_device_across_generations() {
        let first = Pid::new("c1");
        let device = first.device();
        assert!(device.starts_with("socketio-") && !device.contains("c1"), "{device}");
        let next = first.next();
        assert_eq!((next.to_string(), next.device()), ("c1.1".to_string(), device.clone()));
        assert_ne!(device.strip_prefix("socketio-").unwrap(), first.socket_id());
        // The socket's id is the same for the same pid, another for another, and not the pid.
        assert_eq!(first.socket_id(), Pid::parse("c1").unwrap().socket_id());
        assert_ne!(first.socket_id(), next.socket_id());
        assert!(!first.socket_id().contains("c1") && first.socket_id().len() == 20);
        for pid in [first, next.next()] {
            assert_eq!(Pid::parse(&pid.to_string()), Some(pid));
        }
    }

    #[test]
    fn a_pid_this_server_could_not_have_given_is_refused() {
        for text in [
            "",
            "c1.",
            "c1.0",
            "c1.01",
            "c1.+1",
            "c1.x",
            "c1.1.2",
            "c1.99999999999999999999",
            "c1.18446744073709551615",
            "a b",
            &"x".repeat(200),
        ] {
            assert_eq!(Pid::parse(text), None, "{text:?}");
        }
    }
}
