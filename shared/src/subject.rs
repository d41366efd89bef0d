//! NATS subjects and headers of the contract (PROTOCOL.md section 1).

/// The stream that stores every push.
pub const STREAM: &str = "HERALD";
/// The subjects the stream captures.
pub const STREAM_SUBJECTS: [&str; 3] = ["push.user.*", "push.all", "push.topic.*"];
/// The stream republishes every stored `push.>` message under this prefix.
pub const DELIVER_PREFIX: &str = "herald.deliver.";

/// Publishers send here to reach every connection.
pub const PUSH_ALL: &str = "push.all";
/// Gateways subscribe here (once each) for everything sent to [`PUSH_ALL`].
pub const DELIVER_ALL: &str = "herald.deliver.all";

/// Lifecycle event a gateway publishes when a socket is accepted.
pub const EVENTS_CONNECT: &str = "herald.events.connect";
/// Lifecycle event a gateway publishes when a socket closes.
pub const EVENTS_DISCONNECT: &str = "herald.events.disconnect";

/// KV bucket: `<k(user)>.<k(device)>` → the last acknowledged `seq`, as decimal text.
pub const KV_CURSORS: &str = "herald-cursors";
/// KV bucket: `<k(user)>` → the user's read position: the highest personal `seq` read on any
/// device, as decimal text.
pub const KV_READS: &str = "herald-reads";
/// KV bucket: `<k(user)>` → `{"muted":[...]}`.
pub const KV_PREFS: &str = "herald-prefs";
/// KV bucket: who holds a session (session policies); see the gateway's docs.
pub const KV_SESSIONS: &str = "herald-sessions";
/// KV bucket: settings every gateway of a cluster shares.
pub const KV_CONFIG: &str = "herald-config";
/// KV bucket: `<k(user)>.<k(device)>` → a Socket.IO connection state's topics, `{"topics":[...]}`,
/// kept for its recovery.
pub const KV_SOCKETIO: &str = "herald-socketio";
/// Every KV bucket Herald uses.
pub const BUCKETS: [&str; 6] = [KV_CURSORS, KV_READS, KV_PREFS, KV_SESSIONS, KV_CONFIG, KV_SOCKETIO];
/// Key of `herald-config`: the cluster's session policy (`multi`, `single` or `reject`).
pub const CONFIG_SESSION_POLICY: &str = "session_policy";

/// Gateways answer presence questions here (scatter-gather: every gateway replies).
pub const PRESENCE_GATHER: &str = "herald.presence.gather";

/// Gateways close the sockets of a user (or one connection) asked for here, and answer how many.
pub const ADMIN_DISCONNECT: &str = "herald.admin.disconnect";
/// A gateway that noted a device's lost messages for its next resume tells every gateway here
/// (`{"user","device","conn","first","revision"}`: the first seq missed, the note's revision); each
/// closes with 4008 that device's other sockets that resumed past `first` without reading the note.
pub const DEVICE_LOST: &str = "herald.lost";

/// Gateways list the sockets of a user asked for here (`{"user":..}` → `{"node":..,"sockets":[..]}`).
pub const ADMIN_SOCKETS: &str = "herald.admin.sockets";

/// Headers the stream and publishers set.
pub mod header {
    pub const NATS_SEQUENCE: &str = "Nats-Sequence";
    pub const NATS_LAST_SEQUENCE: &str = "Nats-Last-Sequence";
    pub const NATS_TIME_STAMP: &str = "Nats-Time-Stamp";
    pub const NATS_SUBJECT: &str = "Nats-Subject";
    pub const NATS_MSG_ID: &str = "Nats-Msg-Id";
    pub const HERALD_TYPE: &str = "Herald-Type";
    pub const HERALD_USER: &str = "Herald-User";
    pub const HERALD_DEVICE: &str = "Herald-Device";
    pub const HERALD_CONN: &str = "Herald-Conn";
    pub const HERALD_ERROR: &str = "Herald-Error";
}

/// Who a message is for: one of the three publisher-facing subject families.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Audience {
    User(String),
    All,
    Topic(String),
}

impl Audience {
    /// The subject a publisher sends to (`push.user.42`); also the stream's subject for it.
    pub fn push_subject(&self) -> String {
        match self {
            Audience::User(user) => format!("push.user.{user}"),
            Audience::All => PUSH_ALL.to_string(),
            Audience::Topic(topic) => format!("push.topic.{topic}"),
        }
    }

    /// The subject the stream republishes to and gateways subscribe to.
    pub fn deliver_subject(&self) -> String {
        format!("{DELIVER_PREFIX}{}", &self.push_subject()["push.".len()..])
    }

    /// Parses a `push.…` subject (as found in `Nats-Subject`).
    pub fn from_push_subject(subject: &str) -> Option<Audience> {
        Self::from_suffix(subject.strip_prefix("push.")?)
    }

    /// Parses a `herald.deliver.…` subject.
    pub fn from_deliver_subject(subject: &str) -> Option<Audience> {
        Self::from_suffix(subject.strip_prefix(DELIVER_PREFIX)?)
    }

    fn from_suffix(rest: &str) -> Option<Audience> {
        if rest == "all" {
            return Some(Audience::All);
        }
        if let Some(user) = rest.strip_prefix("user.") {
            return crate::id::check_id(crate::id::IdKind::User, user).ok().map(|_| Audience::User(user.to_string()));
        }
        let topic = rest.strip_prefix("topic.")?;
        crate::id::check_id(crate::id::IdKind::Topic, topic).ok().map(|_| Audience::Topic(topic.to_string()))
    }

    /// The `to` field of a `msg` frame: `user`, `all` or `topic:<t>`.
    pub fn frame_to(&self) -> String {
        match self {
            Audience::User(_) => "user".to_string(),
            Audience::All => "all".to_string(),
            Audience::Topic(topic) => format!("topic:{topic}"),
        }
    }
}

/// The request subject of push function `name` (`herald.fn.prefs.set`).
pub fn function(name: &str) -> String {
    format!("herald.fn.{name}")
}

/// The dead-letter subject of push function `name`.
pub fn dead_letter(name: &str) -> String {
    format!("herald.dlq.{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_round_trip() {
        let cases = [
            (Audience::User("42".into()), "push.user.42", "herald.deliver.user.42", "user"),
            (Audience::All, "push.all", "herald.deliver.all", "all"),
            (Audience::Topic("news".into()), "push.topic.news", "herald.deliver.topic.news", "topic:news"),
        ];
        for (audience, push, deliver, to) in cases {
            assert_eq!(audience.push_subject(), push);
            assert_eq!(audience.deliver_subject(), deliver);
            assert_eq!(audience.frame_to(), to);
            assert_eq!(Audience::from_push_subject(push), Some(audience.clone()));
            assert_eq!(Audience::from_deliver_subject(deliver), Some(audience));
        }
    }

    #[test]
    fn refuses_foreign_and_wildcard_subjects() {
        for bad in ["push.user.*", "push.user.a.b", "push.topic.>", "push.alll", "other.all", "push.user."] {
            assert_eq!(Audience::from_push_subject(bad), None, "{bad}");
        }
    }
}
