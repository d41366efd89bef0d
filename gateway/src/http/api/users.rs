//! `GET /v1/users/<user>`: what Herald knows of one user, across gateways: open sockets (asked of
//! every gateway), devices with their cursors, the read position and unread count, muted kinds.

use herald_shared::id::{IdKind, check_id, kv_key, kv_key_decode};
use herald_shared::subject::{ADMIN_SOCKETS, KV_CURSORS};
use serde_json::{Value, json};

use super::{ApiError, jsapi};
use crate::Shared;
use crate::cluster::gather::gather_gateways;

pub(super) async fn user(shared: &Shared, user: &str) -> Result<Value, ApiError> {
    check_id(IdKind::User, user).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let (sockets, cursors) = tokio::join!(sockets(shared, user), cursors(shared, user));
    let (sockets, cursors) = (sockets?, cursors?);
    let inbox = super::inbox::state(shared, user).await?;
    Ok(json!({
        "user": user,
        "online": !sockets.is_empty(),
        "sockets": sockets,
        "devices": cursors,
        "read": inbox.read,
        "unread": inbox.unread,
        "last": inbox.last,
        "muted": inbox.muted,
    }))
}

/// The user's sockets on every gateway that answers, each with its gateway's `node`.
async fn sockets(shared: &Shared, user: &str) -> Result<Vec<Value>, ApiError> {
    let question = json!({ "user": user }).to_string();
    let answers = gather_gateways(shared, ADMIN_SOCKETS, question.into()).await.map_err(ApiError::unavailable)?;
    let mut sockets = Vec::new();
    for answer in answers {
        let Ok(answer) = serde_json::from_slice::<Value>(&answer.payload) else { continue };
        for socket in answer["sockets"].as_array().into_iter().flatten() {
            let mut socket = socket.clone();
            socket["node"] = answer["node"].clone();
            sockets.push(socket);
        }
    }
    sockets.sort_by(|a, b| a["since"].as_str().cmp(&b["since"].as_str()));
    Ok(sockets)
}

/// The user's devices that acknowledged something, with their cursors (the last acknowledged seq).
async fn cursors(shared: &Shared, user: &str) -> Result<Vec<Value>, ApiError> {
    let prefix = format!("$KV.{KV_CURSORS}.{}.", kv_key(user));
    // One token after the user's: `<user>.<device>` (cursors), not `<user>.<device>.lost`.
    let body = json!({ "subjects_filter": format!("{prefix}*") });
    let info = match jsapi::request(shared, format!("STREAM.INFO.KV_{KV_CURSORS}"), &body).await? {
        Ok(info) => info,
        Err(error) if error.err_code == jsapi::NO_STREAM => return Ok(Vec::new()),
        Err(error) => return Err(error.into()),
    };
    let mut devices: Vec<String> = info["state"]["subjects"]
        .as_object()
        .into_iter()
        .flat_map(|subjects| subjects.keys())
        .filter_map(|subject| kv_key_decode(subject.strip_prefix(&prefix)?))
        .collect();
    devices.sort();
    let mut cursors = Vec::with_capacity(devices.len());
    for device in devices {
        let seq = shared.cursors.load(user, &device).await.map_err(ApiError::unavailable)?;
        if let Some(seq) = seq {
            cursors.push(json!({"device": device, "cursor": seq}));
        }
    }
    Ok(cursors)
}
