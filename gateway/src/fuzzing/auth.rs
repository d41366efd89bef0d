//! What a client's token and `/ws` query can do before the upgrade.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use herald_shared::id::{IdKind, check_id, topic_allowed};
use herald_shared::token::{Claims, TokenError, Verifier, issue_hs256, now_secs};
use hyper::StatusCode;

use crate::http::auth;

const SECRET: &[u8] = b"fuzzing-secret";

fn verifier() -> Verifier {
    Verifier::new(Some(SECRET), Some(include_bytes!("../../../shared/testdata/ed25519-public.pem")))
        .expect("the fuzzing keys load")
}

/// Any token: `Verifier::verify` never panics and accepts only claims that obey Herald's rules.
///
/// The input: a first byte whose lowest bit chooses the form, then either a token as it comes (0),
/// or (1) a JWT header and claims, separated by a newline, that are signed with the verifier's
/// secret here, so that whatever they hold reaches the claims checks; a good signature is then never
/// refused as a bad one.
pub fn verify_token(data: &[u8]) {
    let [form, rest @ ..] = data else { return };
    let verifier = verifier();
    let (token, signed_here) = if form & 1 == 0 {
        (String::from_utf8_lossy(rest).into_owned(), false)
    } else {
        let (header, claims) = match rest.iter().position(|b| *b == b'\n') {
            Some(at) => (&rest[..at], &rest[at + 1..]),
            None => (&br#"{"alg":"HS256","typ":"JWT"}"#[..], rest),
        };
        let message = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(claims));
        let key = jsonwebtoken::EncodingKey::from_secret(SECRET);
        let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &key, jsonwebtoken::Algorithm::HS256)
            .expect("HS256 signing cannot fail");
        (format!("{message}.{signature}"), true)
    };
    let verdict = verifier.verify(&token);
    let hs256 = jsonwebtoken::decode_header(&token).is_ok_and(|header| header.alg == jsonwebtoken::Algorithm::HS256);
    if signed_here && hs256 {
        assert_ne!(verdict, Err(TokenError::BadSignature), "a good HS256 signature refused");
    }
    if let Ok(claims) = verdict {
        assert!(check_id(IdKind::User, &claims.sub).is_ok(), "sub {:?} accepted", claims.sub);
        assert!(claims.exp.saturating_add(5) >= now_secs(), "an expired token accepted");
        for pattern in &claims.topics {
            let name = pattern.strip_suffix('*').unwrap_or(pattern);
            assert!(name.is_empty() || check_id(IdKind::Topic, name).is_ok(), "topic claim {pattern:?} accepted");
        }
    }
}

/// Any query string and `Authorization` header on `GET /ws`: `authorize` never panics, refuses with
/// 400, 401 or 403 only, and accepts only a valid device and allowed, valid, sorted topics.
///
/// The input: the query, then optionally a newline and the `Authorization` header's value. `TOKEN`
/// in either stands for a good token of user 42 allowed topics `news` and `room-*`.
pub fn authorize(data: &[u8]) {
    let token = issue_hs256(
        SECRET,
        &Claims { sub: "42".into(), exp: now_secs() + 600, topics: vec!["news".into(), "room-*".into()] },
    );
    let with_token = |bytes: &[u8]| String::from_utf8_lossy(bytes).replace("TOKEN", &token);
    let (query, authorization) = match data.iter().position(|b| *b == b'\n') {
        Some(at) => (&data[..at], Some(&data[at + 1..])),
        None => (data, None),
    };
    let mut request = hyper::Request::builder().uri(format!("/ws?{}", uri_safe(&with_token(query))));
    if let Some(value) = authorization {
        let Ok(value) = hyper::header::HeaderValue::from_str(&with_token(value)) else { return };
        request = request.header(hyper::header::AUTHORIZATION, value);
    }
    let request = request.body(()).expect("a URI made of URI characters");
    match auth::authorize(&request, &verifier(), 64) {
        Ok(connect) => {
            assert_eq!(connect.claims.sub, "42");
            assert!(check_id(IdKind::Device, &connect.device).is_ok(), "device {:?} accepted", connect.device);
            for topic in &connect.topics {
                assert!(check_id(IdKind::Topic, topic).is_ok(), "topic {topic:?} accepted");
                assert!(topic_allowed(&connect.claims.topics, topic), "topic {topic:?} not in the claim");
            }
            assert!(connect.topics.windows(2).all(|pair| pair[0] < pair[1]), "topics not sorted and unique");
        }
        Err(refused) => {
            let expected = match refused.status {
                StatusCode::BAD_REQUEST => "bad_request",
                StatusCode::UNAUTHORIZED => "unauthorized",
                StatusCode::FORBIDDEN => "forbidden",
                other => panic!("refused with {other}"),
            };
            assert_eq!(refused.error, expected);
        }
    }
}

/// `text` with every byte a URI may not hold as it is percent-encoded (`%` itself is kept, so
/// that broken escapes reach the query parser).
fn uri_safe(text: &str) -> String {
    let mut safe = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&byte) {
            safe.push(char::from(byte));
        } else {
            safe.push_str(&format!("%{byte:02X}"));
        }
    }
    safe
}
