//! Who is connecting, decided before the upgrade: the token, the device, the resume point and the
//! topics asked for. Anything wrong is an HTTP error with a JSON body, and no socket.

use herald_shared::frame::error_code;
use herald_shared::id::{IdKind, check_id, topic_allowed};
use herald_shared::token::{Claims, TokenError, Verifier};
use hyper::StatusCode;
use hyper::header::AUTHORIZATION;

/// The device id used when a client gives none.
pub(crate) const DEFAULT_DEVICE: &str = "default";

/// A connection the gateway has agreed to open.
#[derive(Debug, Clone)]
pub(crate) struct ConnectRequest {
    pub(crate) claims: Claims,
    pub(crate) device: String,
    /// Resume point from the query, if any.
    pub(crate) since: Option<u64>,
    /// The epoch of the stream `since` is a position of (the `welcome`'s), if the client gave it.
    pub(crate) epoch: Option<u64>,
    /// Topics to subscribe at once (each allowed by the token).
    pub(crate) topics: Vec<String>,
    /// Without `since`, start live instead of from the device's cursor (protocols whose clients
    /// keep their own positions).
    pub(crate) live: bool,
    /// Under the session policy `multi`, shares its device with the user's other connections of
    /// it instead of replacing them: a STOMP or SSE connection that named no device (apps moved
    /// unchanged open one per tab, as Spring let them).
    pub(crate) shares_device: bool,
}

/// The `error` of a refusal for a missing, bad or expired token.
pub(crate) const UNAUTHORIZED: &str = "unauthorized";
/// The `error` of a refusal by the session policy `reject`.
pub(crate) const CONFLICT: &str = "conflict";

/// A refused request: status, `error` code and human `reason` of the JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rejection {
    pub(crate) status: StatusCode,
    pub(crate) error: &'static str,
    pub(crate) reason: String,
}

impl Rejection {
    pub(crate) fn new(status: StatusCode, error: &'static str, reason: impl Into<String>) -> Rejection {
        Rejection { status, error, reason: reason.into() }
    }

    /// A refusal in a protocol's first message (a STOMP CONNECT, a Socket.IO or Centrifugal
    /// connect), after the upgrade: it has the status `/ws` answers for the same `error`, so that
    /// it is counted as one.
    pub(crate) fn in_protocol(error: &'static str, reason: impl Into<String>) -> Rejection {
        let status = match error {
            UNAUTHORIZED => StatusCode::UNAUTHORIZED,
            error_code::FORBIDDEN => StatusCode::FORBIDDEN,
            CONFLICT => StatusCode::CONFLICT,
            error_code::UNAVAILABLE => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_REQUEST,
        };
        Rejection::new(status, error, reason)
    }

    pub(crate) fn unauthorized(error: TokenError) -> Rejection {
        Rejection::new(StatusCode::UNAUTHORIZED, UNAUTHORIZED, error.to_string())
    }

    fn bad_request(reason: impl Into<String>) -> Rejection {
        Rejection::new(StatusCode::BAD_REQUEST, "bad_request", reason)
    }

    /// The JSON body.
    pub(crate) fn body(&self) -> String {
        serde_json::json!({"error": self.error, "reason": self.reason}).to_string()
    }
}

/// Checks a `/ws` request's token and parameters; at most `max_topics` topics.
pub(crate) fn authorize<B>(
    request: &hyper::Request<B>,
    verifier: &Verifier,
    max_topics: usize,
) -> Result<ConnectRequest, Rejection> {
    let mut token = None;
    let mut since = None;
    let mut epoch = None;
    let mut device = None;
    let mut topics = Vec::new();
    for (key, value) in form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes()) {
        match key.as_ref() {
            "token" => token = Some(value.into_owned()),
            "since" => {
                since =
                    Some(value.parse::<u64>().map_err(|_| Rejection::bad_request("since must be a sequence number"))?)
            }
            "epoch" => {
                epoch = Some(
                    parse_epoch(&value).ok_or(Rejection::bad_request("epoch must be the welcome's (hex digits)"))?,
                )
            }
            "device" => device = Some(value.into_owned()),
            "topics" => topics.extend(value.split(',').filter(|t| !t.is_empty()).map(str::to_string)),
            _ => {}
        }
    }
    // An empty `token=` is none: the header may carry it.
    let token = token.filter(|token| !token.is_empty()).or_else(|| bearer_token(request));
    let token = token.ok_or(Rejection::unauthorized(TokenError::Missing))?;
    let claims = verifier.verify(&token).map_err(Rejection::unauthorized)?;
    let device = device.unwrap_or_else(|| DEFAULT_DEVICE.to_string());
    check_id(IdKind::Device, &device).map_err(|e| Rejection::bad_request(e.to_string()))?;
    for topic in &topics {
        check_id(IdKind::Topic, topic).map_err(|e| Rejection::bad_request(e.to_string()))?;
        if !topic_allowed(&claims.topics, topic) {
            return Err(Rejection::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("the token does not allow topic {topic}"),
            ));
        }
    }
    topics.sort();
    topics.dedup();
    if topics.len() > max_topics {
        return Err(Rejection::bad_request(format!("at most {max_topics} topics per connection")));
    }
    Ok(ConnectRequest { claims, device, since, epoch, topics, live: false, shares_device: false })
}

/// A stream's epoch as `welcome` gives it ([`crate::session::bounds::epoch_text`]): hex digits.
fn parse_epoch(text: &str) -> Option<u64> {
    let hex = (1..=16).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_hexdigit());
    hex.then(|| u64::from_str_radix(text, 16).ok()).flatten()
}

/// Whether the request's query names a device.
pub(crate) fn names_device<B>(request: &hyper::Request<B>) -> bool {
    form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes()).any(|(key, _)| key == "device")
}

fn bearer_token<B>(request: &hyper::Request<B>) -> Option<String> {
    let value = request.headers().get(AUTHORIZATION)?.to_str().ok()?;
    let token = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer "))?;
    Some(token.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_shared::token::{issue_hs256, now_secs};

    const SECRET: &[u8] = b"s";

    fn request(query: &str) -> hyper::Request<()> {
        hyper::Request::builder().uri(format!("/ws?{query}")).body(()).unwrap()
    }

    fn token(topics: &[&str]) -> String {
        let claims =
            Claims { sub: "42".into(), exp: now_secs() + 60, topics: topics.iter().map(|t| t.to_string()).collect() };
        issue_hs256(SECRET, &claims)
    }

    #[test]
    fn reads_token_device_since_and_topics() {
        let verifier = Verifier::new(Some(SECRET), None).unwrap();
        let query = format!("token={}&device=phone&since=12&topics=news,room-1", token(&["news", "room-*"]));
        let connect = authorize(&request(&query), &verifier, 2).unwrap();
        assert_eq!(connect.claims.sub, "42");
        assert_eq!((connect.device.as_str(), connect.since), ("phone", Some(12)));
        assert_eq!(connect.topics, vec!["news", "room-1"]);
    }

    #[test]
    fn accepts_a_bearer_header() {
        let verifier = Verifier::new(Some(SECRET), None).unwrap();
        let request = hyper::Request::builder()
            .uri("/ws")
            .header(AUTHORIZATION, format!("Bearer {}", token(&[])))
            .body(())
            .unwrap();
        assert_eq!(authorize(&request, &verifier, 2).unwrap().device, DEFAULT_DEVICE);
    }

    #[test]
    fn refuses_with_the_right_status() {
        let verifier = Verifier::new(Some(SECRET), None).unwrap();
        let status = |query: String| authorize(&request(&query), &verifier, 2).unwrap_err().status;
        assert_eq!(status(String::new()), StatusCode::UNAUTHORIZED);
        assert_eq!(status(format!("token={}&topics=secret", token(&["news"]))), StatusCode::FORBIDDEN);
        assert_eq!(status(format!("token={}&device=a.b", token(&[]))), StatusCode::BAD_REQUEST);
        assert_eq!(status(format!("token={}&since=-1", token(&[]))), StatusCode::BAD_REQUEST);
        assert_eq!(status(format!("token={}&topics=*", token(&["*"]))), StatusCode::BAD_REQUEST);
    }
}
