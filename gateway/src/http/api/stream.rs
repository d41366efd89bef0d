//! `GET /v1/stream`: the `HERALD` stream's state, its limits, and how close retention is to trimming.

use herald_shared::subject::STREAM;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{ApiError, jsapi};
use crate::Shared;

/// Above this many subjects, finding the fullest one costs the server too much for a status page.
const MAX_SUBJECTS_SCANNED: u64 = 10_000;

pub(super) async fn stream(shared: &Shared) -> Result<Value, ApiError> {
    let info = jsapi::request(shared, format!("STREAM.INFO.{STREAM}"), &json!({})).await??;
    let (state, config) = (&info["state"], &info["config"]);
    let subjects = state["num_subjects"].as_u64().unwrap_or_default();
    let per_subject = config["max_msgs_per_subject"].as_i64().unwrap_or(-1);
    let fullest = if subjects <= MAX_SUBJECTS_SCANNED { fullest_subject(shared).await? } else { None };
    let max_age_secs = config["max_age"].as_u64().unwrap_or_default() / 1_000_000_000;
    let max_bytes = config["max_bytes"].as_i64().unwrap_or(-1);
    Ok(json!({
        "stream": STREAM,
        "messages": state["messages"],
        "bytes": state["bytes"],
        "first_seq": state["first_seq"],
        "last_seq": state["last_seq"],
        "first_ts": state["first_ts"],
        "last_ts": state["last_ts"],
        "subjects": subjects,
        "consumers": state["consumer_count"],
        "limits": {
            "max_age_secs": max_age_secs,
            "max_msgs_per_subject": per_subject,
            "max_bytes": max_bytes,
            "replicas": config["num_replicas"],
        },
        "retention": {
            "oldest_age": age_share(state["first_ts"].as_str(), state["messages"].as_u64(), max_age_secs),
            "bytes": (max_bytes > 0).then(|| state["bytes"].as_u64().unwrap_or_default() as f64 / max_bytes as f64),
            "fullest_subject": fullest.map(|(subject, count)| json!({
                "subject": subject,
                "messages": count,
                "share": (per_subject > 0).then(|| count as f64 / per_subject as f64),
            })),
        },
    }))
}

/// How far the oldest message is into its `max_age` (1.0: it is about to leave), when both exist.
fn age_share(first_ts: Option<&str>, messages: Option<u64>, max_age_secs: u64) -> Option<f64> {
    if max_age_secs == 0 || messages.unwrap_or_default() == 0 {
        return None;
    }
    let first = OffsetDateTime::parse(first_ts?, &Rfc3339).ok()?;
    let age = (OffsetDateTime::now_utc() - first).as_seconds_f64().max(0.0);
    Some(age / max_age_secs as f64)
}

/// The subject holding the most messages (the first to be trimmed by the per-subject limit).
async fn fullest_subject(shared: &Shared) -> Result<Option<(String, u64)>, ApiError> {
    let info = jsapi::request(shared, format!("STREAM.INFO.{STREAM}"), &json!({"subjects_filter": "push.>"})).await??;
    let subjects = info["state"]["subjects"].as_object().cloned().unwrap_or_default();
    Ok(subjects
        .into_iter()
        .filter_map(|(subject, count)| Some((subject, count.as_u64()?)))
        .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(&a.0))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_age_share_needs_messages_and_a_max_age() {
        assert_eq!(age_share(Some("2020-01-01T00:00:00Z"), Some(0), 60), None);
        assert_eq!(age_share(Some("2020-01-01T00:00:00Z"), Some(3), 0), None);
        assert!(age_share(Some("2020-01-01T00:00:00Z"), Some(3), 60).unwrap() > 1.0);
        let now = OffsetDateTime::now_utc().format(&Rfc3339).unwrap();
        assert!(age_share(Some(&now), Some(3), 3600).unwrap() < 0.5);
    }
}
