//! Whether the feed's server reaches the stream. A server cut off from the rest of its cluster still
//! answers pings, so the connection looks fine, but the republish of what the others store no
//! longer reaches it: its stream requests time out, or it answers for the stream from its own store,
//! without a leader. The feed then moves to another server. And once a server that could not serve
//! the stream for a moment can again, the stream's leader is asked what it stores past what each
//! routed subject accounts for, as after a leader change (see [`super::leader`]): what was
//! republished meanwhile may never have reached the server, and nothing would say so before each
//! subject's next message.

use std::time::Duration;

use bytes::Bytes;
use herald_shared::subject::STREAM;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::feed::{Feed, RequestError};
use super::leader::StreamCluster;
use super::router::Router;

/// How often the stream is asked about; how many failed checks in a row make the feed move to
/// another server at first, and at most (see [`Checks`]).
const CHECK_INTERVAL: Duration = Duration::from_secs(5);
const FAILED_CHECKS_TO_MOVE: u32 = 2;
const MOST_FAILED_CHECKS_TO_MOVE: u32 = 4;

/// Checks the feed's server until `shutdown`.
pub(crate) async fn watch(feed: Feed, router: Router, shutdown: CancellationToken) {
    let mut checks = Checks::default();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(CHECK_INTERVAL) => {}
            _ = shutdown.cancelled() => return,
        }
        let answer = match feed.is_connected() {
            true => feed.request(format!("$JS.API.STREAM.INFO.{STREAM}"), Bytes::new()).await,
            false => Err(RequestError::Disconnected),
        };
        let checked = match answer {
            Ok(answer) => Checked::Answered(unavailable(&answer)),
            // A reconnection has every session catch up by itself.
            Err(RequestError::Disconnected) => Checked::Disconnected,
            Err(error) => Checked::Answered(Some(error.to_string())),
        };
        match checks.next(checked) {
            Verdict::Fine => {}
            Verdict::Failing(problem) => debug!(%problem, "the delivery feed's server cannot serve the stream"),
            Verdict::Back => router.check_stored().await,
            Verdict::Move(problem) => feed.reconnect(format!("its server cannot serve the stream ({problem})")),
        }
    }
}

/// What one check found.
#[derive(Debug)]
enum Checked {
    /// The server answered, or failed to: the problem, if any.
    Answered(Option<String>),
    /// The feed is not connected.
    Disconnected,
}

/// What to do after a check.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Fine,
    /// The server cannot serve the stream; it may be a moment (a leader election).
    Failing(String),
    /// The server serves the stream again after failing: ask the leader what it stores.
    Back,
    /// The server has failed too often in a row: move the feed.
    Move(String),
}

/// The checks failed in a row, and how many in a row move the feed: twice as many after a move,
/// until a check passes. A whole cluster without a stream leader fails every server's checks, and
/// each move has every session catch up, which fails then (1013): moving on at the first pace would
/// close every client every 10 s for the length of the outage. Not more than twice, though: a feed
/// left on the one server still cut off once the others recovered holds up live delivery, and its
/// loss checks give up after 30 s (see `session::actions`).
#[derive(Debug)]
struct Checks {
    failed: u32,
    to_move: u32,
}

impl Default for Checks {
    fn default() -> Checks {
        Checks { failed: 0, to_move: FAILED_CHECKS_TO_MOVE }
    }
}

impl Checks {
    fn next(&mut self, checked: Checked) -> Verdict {
        let failed = std::mem::take(&mut self.failed);
        match checked {
            Checked::Disconnected => Verdict::Fine,
            Checked::Answered(None) => {
                self.to_move = FAILED_CHECKS_TO_MOVE;
                if failed > 0 { Verdict::Back } else { Verdict::Fine }
            }
            Checked::Answered(Some(problem)) if failed + 1 >= self.to_move => {
                self.to_move = (self.to_move * 2).min(MOST_FAILED_CHECKS_TO_MOVE);
                Verdict::Move(problem)
            }
            Checked::Answered(Some(problem)) => {
                self.failed = failed + 1;
                Verdict::Failing(problem)
            }
        }
    }
}

/// Whether a `STREAM.INFO` answer says the server cannot serve the stream right now: no JetStream
/// to offer (no quorum, no leader: `503`), or a stream without a leader, which a replica cut off
/// from the others reports from its own store. Other errors (an unknown stream, say) still come
/// from a working JetStream.
fn unavailable(answer: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Answer {
        error: Option<serde_json::Value>,
        cluster: Option<StreamCluster>,
    }
    let answer: Answer = serde_json::from_slice(answer).ok()?;
    if let Some(error) = answer.error {
        return (error.get("code")?.as_u64()? == 503).then(|| error.to_string());
    }
    let leaderless = answer.cluster.is_some_and(|cluster| !cluster.has_leader());
    leaderless.then(|| "the stream has no leader this server reaches".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failing() -> Checked {
        Checked::Answered(Some("the stream has no leader this server reaches".into()))
    }

    #[test]
    fn a_failed_check_then_a_good_one_asks_the_leader_and_two_failed_in_a_row_move_the_feed() {
        let mut checks = Checks::default();
        assert_eq!(checks.next(Checked::Answered(None)), Verdict::Fine);
        assert!(matches!(checks.next(failing()), Verdict::Failing(_)));
        assert_eq!(checks.next(Checked::Answered(None)), Verdict::Back, "what the server missed meanwhile");
        assert_eq!(checks.next(Checked::Answered(None)), Verdict::Fine);
        assert!(matches!(checks.next(failing()), Verdict::Failing(_)));
        assert!(matches!(checks.next(failing()), Verdict::Move(_)));
        // The move reconnects, which has every session catch up: nothing more to do after it.
        assert_eq!(checks.next(Checked::Answered(None)), Verdict::Fine);
        assert!(matches!(checks.next(failing()), Verdict::Failing(_)));
        assert_eq!(checks.next(Checked::Disconnected), Verdict::Fine, "a reconnection catches up by itself");
        assert_eq!(checks.next(Checked::Answered(None)), Verdict::Fine);
    }

    #[test]
    fn a_move_that_does_not_help_doubles_the_failed_checks_to_the_next_one_once() {
        let mut checks = Checks::default();
        let mut moves = Vec::new();
        for check in 1..=16 {
            if matches!(checks.next(failing()), Verdict::Move(_)) {
                moves.push(check);
            }
        }
        assert_eq!(moves, [2, 6, 10, 14]);
        // A check that passes starts over.
        assert_eq!(checks.next(Checked::Answered(None)), Verdict::Back);
        assert!(matches!(checks.next(failing()), Verdict::Failing(_)));
        assert!(matches!(checks.next(failing()), Verdict::Move(_)));
    }

    #[test]
    fn a_server_without_jetstream_or_whose_stream_has_no_leader_cannot_serve_the_stream() {
        let state = r#""state":{"first_seq":1,"last_seq":9}"#;
        assert_eq!(unavailable(format!(r#"{{{state},"cluster":{{"name":"c","leader":"n1"}}}}"#).as_bytes()), None);
        assert_eq!(unavailable(format!("{{{state}}}").as_bytes()), None, "a server without a cluster");
        assert!(unavailable(format!(r#"{{{state},"cluster":{{"name":"c"}}}}"#).as_bytes()).is_some());
        let refused = br#"{"error":{"code":503,"description":"JetStream system temporarily unavailable"}}"#;
        assert!(unavailable(refused).is_some());
        let unknown = br#"{"error":{"code":404,"err_code":10059,"description":"stream not found"}}"#;
        assert_eq!(unavailable(unknown), None);
    }
}
