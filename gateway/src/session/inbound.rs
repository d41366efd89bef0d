//! Client messages: WebSocket control frames are answered here, text frames go through the
//! connection's codec and become commands for the session.

use std::sync::Arc;
use std::time::Instant;

use herald_shared::frame::{ServerFrame, error_code};
use herald_shared::id::topic_allowed;

use super::Session;
use super::deadlines::Deadlines;
use super::state::SessionState;
use super::{presence, rpc};
use crate::close::Close;
use crate::codec::{Command, Refusal};
use crate::http::metrics::RpcLabels;
use crate::http::ratelimit::TokenBucket;
use crate::websocket::reader::Inbound;

/// Handles one client message; an error is how the connection closes.
pub(super) fn handle(
    session: &Arc<Session>,
    state: &mut SessionState,
    inbound: Inbound,
    rpc_budget: &mut TokenBucket,
    deadlines: &mut Deadlines,
) -> Result<(), Close> {
    match inbound {
        Inbound::Ping(payload) => {
            let pong = state.codec().pong(&payload);
            state.push_frame(pong);
        }
        Inbound::Pong => {}
        Inbound::Close(code) => return Err(Close::by_client(code)),
        // Binary messages come only on connections whose protocol has a binary encoding.
        Inbound::Text(text) | Inbound::Binary(text) => {
            for decoded in state.codec_mut().decode(&text) {
                match decoded {
                    Ok(Command::Close) => return Err(Close::client_left("the client disconnected")),
                    Ok(Command::Refresh { token }) => refresh(session, state, &token, deadlines),
                    Ok(command) => run(session, state, command, rpc_budget),
                    Err(Refusal::Notice(notice)) => state.notice(&notice),
                    Err(Refusal::Reply(reply)) => state.push_frame(reply),
                    Err(Refusal::Close(close)) => return Err(close),
                }
            }
            for frame in state.codec_mut().take_replies() {
                state.push_frame(frame);
            }
        }
    }
    Ok(())
}

/// A new token for the connection: same user, and the connection now ends at its expiry.
fn refresh(session: &Session, state: &mut SessionState, token: &str, deadlines: &mut Deadlines) {
    use crate::codec::centrifugal::wire::error;
    use herald_shared::token::TokenError;
    let outcome = match session.shared.verifier.verify(token) {
        Ok(claims) if claims.sub != *session.user => {
            Err((error::UNAUTHORIZED, "the token is for another user".to_string()))
        }
        // A new token that takes away a topic the connection has is refused: the connection ends at
        // the expiry it had, and its reconnect checks the claim again.
        Ok(claims)
            if state.codec().refuses_narrower_refresh()
                && let Some(topic) = state.topics_held().find(|topic| !topic_allowed(&claims.topics, topic)) =>
        {
            Err((error::PERMISSION_DENIED, format!("the token does not allow topic {topic}")))
        }
        Ok(claims) => {
            let since_epoch = herald_shared::token::since_epoch();
            deadlines.expire_at(super::deadlines::token_expiry(tokio::time::Instant::now(), since_epoch, claims.exp));
            state.allow_topics(claims.topics);
            Ok(claims.exp)
        }
        Err(TokenError::Expired) => Err((error::TOKEN_EXPIRED, TokenError::Expired.to_string())),
        Err(refused) => Err((error::UNAUTHORIZED, refused.to_string())),
    };
    if let Some(reply) = state.codec_mut().refreshed(outcome) {
        state.push_frame(reply);
    }
}

fn run(session: &Arc<Session>, state: &mut SessionState, command: Command, rpc_budget: &mut TokenBucket) {
    match command {
        Command::Ack(seq) => {
            // A client cannot acknowledge what it was not sent.
            let seq = seq.min(state.ackable());
            session.ack(seq);
        }
        Command::Read(seq) => {
            let seq = seq.min(state.ackable());
            session.ack(seq);
            session.shared.inbox.note_read(&session.user, seq);
        }
        Command::Subscribe { topic, since } => state.subscribe(topic, since),
        Command::Unsubscribe { topic } => state.unsubscribe(topic),
        Command::Refill { audience, since } => state.refill(audience, since),
        Command::Rpc { id, function, data } => {
            if rpc_budget.try_take(Instant::now()) {
                tokio::spawn(rpc::call(session.clone(), id, function, data));
            } else {
                // Counted under one label: a client over its rate may send any names.
                let labels = RpcLabels { function: "(any)".into(), outcome: "rate_limited".into() };
                session.shared.metrics.rpc_calls.get_or_create(&labels).inc();
                state.notice(&rpc::failure(id, error_code::RATE_LIMITED, "too many rpc calls"));
            }
        }
        Command::Ping => state.notice(&ServerFrame::Pong),
        Command::Nothing | Command::Close | Command::Refresh { .. } => {}
        Command::Presence { id, user } => {
            tokio::spawn(presence::count(session.clone(), id, user));
        }
    }
}
