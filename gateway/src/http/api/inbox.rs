//! The personal inbox over HTTP, for backends and apps that render one:
//!
//! - `GET /v1/inbox/<user>` → `{"user","read","unread","last"}`;
//! - `GET /v1/inbox/<user>/messages?after=<seq>&limit=<n>` → `{"user","messages":[msg…],"next","complete"}`;
//! - `POST /v1/inbox/<user>/read` `{"seq":n}` → `{"user","read","unread"}`: the read position moves
//!   forward only, and the user's sockets on every gateway are told.
//!
//! A user who never got anything just has an empty inbox.

use herald_shared::frame::{MsgMeta, write_msg};
use herald_shared::id::{IdKind, check_id};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::ApiError;
use crate::Shared;
use crate::delivery::message::Message;

/// Messages per page by default, and at most.
const DEFAULT_LIMIT: u64 = 100;
const MAX_LIMIT: u64 = 1000;

/// `after` and `limit` of `GET /v1/inbox/<user>/messages`.
pub(super) fn page_of(query: &str) -> Result<(u64, u64), ApiError> {
    super::page_query(query, DEFAULT_LIMIT, MAX_LIMIT)
}

/// `GET /v1/inbox/<user>`.
pub(super) async fn summary(shared: &Shared, user: &str) -> Result<Value, ApiError> {
    check_id(IdKind::User, user).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let state = state(shared, user).await?;
    Ok(json!({"user": user, "read": state.read, "unread": state.unread, "last": state.last}))
}

/// A user's inbox as the API shows it.
pub(super) struct InboxState {
    pub(super) read: u64,
    pub(super) unread: u64,
    pub(super) last: u64,
    pub(super) muted: Vec<Box<str>>,
}

/// The read position, the unread count (without muted kinds) and the last personal `seq` of `user`.
pub(super) async fn state(shared: &Shared, user: &str) -> Result<InboxState, ApiError> {
    let inbox = &shared.inbox;
    let (read, last, muted) = tokio::join!(inbox.read_position(user), inbox.last(user), shared.prefs.muted(user));
    let (read, last, muted) = (
        read.map_err(ApiError::unavailable)?,
        last.map_err(ApiError::unavailable)?,
        muted.map_err(ApiError::unavailable)?,
    );
    let unread = inbox.unread(user, read, last, &muted).await.map_err(ApiError::unavailable)?;
    Ok(InboxState { read, unread, last, muted })
}

/// `GET /v1/inbox/<user>/messages?after=&limit=`.
pub(super) async fn messages(shared: &Shared, user: &str, query: &str) -> Result<bytes::Bytes, ApiError> {
    check_id(IdKind::User, user).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let (after, limit) = page_of(query)?;
    let page = shared.inbox.page(user, after, limit as usize).await.map_err(ApiError::unavailable)?;
    let messages: Vec<Box<RawValue>> = page.messages.iter().map(msg_json).collect();
    let body = Page { user, messages, next: page.next, complete: page.complete };
    Ok(serde_json::to_vec(&body).map_err(|e| ApiError::unavailable(e.to_string()))?.into())
}

/// A page of `GET /v1/inbox/<user>/messages`.
#[derive(Serialize)]
struct Page<'a> {
    user: &'a str,
    messages: Vec<Box<RawValue>>,
    next: u64,
    complete: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Read {
    seq: u64,
}

/// `POST /v1/inbox/<user>/read`.
pub(super) async fn read(shared: &Shared, user: &str, Read { seq }: Read) -> Result<Value, ApiError> {
    check_id(IdKind::User, user).map_err(|e| ApiError::bad_request(e.to_string()))?;
    // Nothing past the stream's last message can have been read: a position past it would hide
    // every later one from the count for good (it never moves back). The stream's bounds, not the
    // user's last message: a replica's direct get may not have that one yet.
    let last = shared.bounds.read_at_least(0).await.map_err(ApiError::unavailable)?.last;
    let read = shared.inbox.mark_read(user, seq.min(last)).await.map_err(ApiError::unavailable)?;
    let muted = shared.prefs.muted(user).await.map_err(ApiError::unavailable)?;
    let unread = shared.inbox.unread(user, read, u64::MAX, &muted).await.map_err(ApiError::unavailable)?;
    Ok(json!({"user": user, "read": read, "unread": unread}))
}

/// A message as the `msg` object clients get on their sockets, byte for byte.
fn msg_json(message: &Message) -> Box<RawValue> {
    let to = message.audience.frame_to();
    let meta = MsgMeta { seq: message.seq, to: &to, id: &message.id, kind: &message.kind, ts: &message.ts };
    let mut json = Vec::new();
    write_msg(&mut json, &meta, &message.payload);
    // Written as JSON by construction.
    let text = String::from_utf8(json).unwrap_or_default();
    RawValue::from_string(text).unwrap_or_else(|_| RawValue::from_string("null".into()).expect("null is JSON"))
}
