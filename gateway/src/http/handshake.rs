//! The checks of a WebSocket opening handshake (RFC 6455 §4.2.1), made before anything else about a
//! `/ws` request. fastwebsockets answers one that passes with the 101 and its
//! `Sec-WebSocket-Accept`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hyper::header::{HOST, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION};
use hyper::{Request, StatusCode, Version};

use crate::http::auth::Rejection;

/// The only protocol version this server speaks (RFC 6455 §4.4).
pub(crate) const VERSION: &str = "13";

/// Refuses a request that is no WebSocket handshake this server can complete: 426 when it asks for
/// no WebSocket or for another version (the response names version 13), 400 when it is malformed.
pub(crate) fn check<B>(request: &Request<B>) -> Result<(), Rejection> {
    if !fastwebsockets::upgrade::is_upgrade_request(request) {
        return Err(upgrade_required(&format!("GET {} needs a WebSocket upgrade", request.uri().path())));
    }
    if request.version() < Version::HTTP_11 {
        return Err(bad_request("a WebSocket upgrade needs HTTP/1.1"));
    }
    if single(request, HOST).is_none() {
        return Err(bad_request("the upgrade request has no Host header"));
    }
    if single(request, SEC_WEBSOCKET_VERSION) != Some(VERSION.as_bytes()) {
        return Err(upgrade_required("Sec-WebSocket-Version must be 13"));
    }
    let key = single(request, SEC_WEBSOCKET_KEY).map(|key| STANDARD.decode(key));
    if !matches!(key, Some(Ok(nonce)) if nonce.len() == 16) {
        return Err(bad_request("Sec-WebSocket-Key must be 16 bytes in base64"));
    }
    Ok(())
}

/// The value of a header the request has exactly once.
fn single<B>(request: &Request<B>, name: hyper::header::HeaderName) -> Option<&[u8]> {
    let mut values = request.headers().get_all(name).iter();
    match (values.next(), values.next()) {
        (Some(value), None) => Some(value.as_bytes()),
        _ => None,
    }
}

fn upgrade_required(reason: &str) -> Rejection {
    Rejection::new(StatusCode::UPGRADE_REQUIRED, "upgrade_required", reason)
}

fn bad_request(reason: &str) -> Rejection {
    Rejection::new(StatusCode::BAD_REQUEST, "bad_request", reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    /// A good handshake (RFC 6455 §1.3), with `change` made to its headers: `(name, None)` removes
    /// one, `(name, Some(value))` sets it (a second `(name, Some(..))` adds another).
    fn request(version: Version, change: &[(&str, Option<&str>)]) -> Request<()> {
        let mut headers = vec![
            ("host", "server.example.com"),
            ("upgrade", "websocket"),
            ("connection", "Upgrade"),
            ("sec-websocket-key", KEY),
            ("sec-websocket-version", "13"),
        ];
        let mut added = Vec::new();
        for (name, value) in change {
            if !added.contains(name) {
                headers.retain(|(existing, _)| existing != name);
                added.push(*name);
            }
            if let Some(value) = value {
                headers.push((name, value));
            }
        }
        let mut builder = Request::builder().uri("/ws").version(version);
        for (name, value) in headers {
            builder = builder.header(name, value);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn the_opening_handshake_is_checked_as_rfc_6455_says() {
        let http11 = Version::HTTP_11;
        let cases: Vec<(&str, &str, Request<()>, Option<u16>)> = vec![
            ("1.3", "the RFC's example handshake", request(http11, &[]), None),
            (
                "4.2.1",
                "upgrade and connection in any case, among other tokens",
                request(http11, &[("upgrade", Some("WebSocket")), ("connection", Some("keep-alive, upgrade"))]),
                None,
            ),
            ("4.2.1 item 1", "HTTP/1.0", request(Version::HTTP_10, &[]), Some(400)),
            ("4.2.1 item 2", "no Host", request(http11, &[("host", None)]), Some(400)),
            ("4.2.1 item 3", "no Upgrade", request(http11, &[("upgrade", None)]), Some(426)),
            ("4.2.1 item 3", "Upgrade to another protocol", request(http11, &[("upgrade", Some("h2c"))]), Some(426)),
            (
                "4.2.1 item 4",
                "no Connection: Upgrade",
                request(http11, &[("connection", Some("keep-alive"))]),
                Some(426),
            ),
            ("4.2.1 item 5", "no Sec-WebSocket-Key", request(http11, &[("sec-websocket-key", None)]), Some(400)),
            (
                "4.2.1 item 5",
                "a key that is not base64",
                request(http11, &[("sec-websocket-key", Some("not base64!"))]),
                Some(400),
            ),
            (
                "4.2.1 item 5",
                "a key of 15 bytes",
                request(http11, &[("sec-websocket-key", Some("AAAAAAAAAAAAAAAAAAAA"))]),
                Some(400),
            ),
            (
                "4.2.1 item 5",
                "a key of 17 bytes",
                request(http11, &[("sec-websocket-key", Some("AAAAAAAAAAAAAAAAAAAAAAA="))]),
                Some(400),
            ),
            (
                "4.2.1 item 5",
                "two keys",
                request(http11, &[("sec-websocket-key", Some(KEY)), ("sec-websocket-key", Some(KEY))]),
                Some(400),
            ),
            (
                "4.2.1 item 6, 4.4",
                "no Sec-WebSocket-Version",
                request(http11, &[("sec-websocket-version", None)]),
                Some(426),
            ),
            (
                "4.2.1 item 6, 4.4",
                "version 8 (an older draft)",
                request(http11, &[("sec-websocket-version", Some("8"))]),
                Some(426),
            ),
            (
                "4.2.1 item 6, 4.4",
                "versions 13 and 8",
                request(http11, &[("sec-websocket-version", Some("13")), ("sec-websocket-version", Some("8"))]),
                Some(426),
            ),
        ];
        for (rfc, what, request, refused) in cases {
            let got = check(&request).err().map(|rejection| rejection.status.as_u16());
            assert_eq!(got, refused, "RFC 6455 §{rfc}: {what}");
        }
    }
}
