//! Connect tokens: JWTs whose `sub` is the user id, with a required `exp` and an optional `topics`
//! claim (topic names, or prefixes ending in `*`, the user may subscribe to).
//!
//! Verified with an HS256 shared secret, or with a public key (EdDSA or RS256, PEM) where configured.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::id::{IdError, IdKind, check_id};

/// The claims Herald reads from a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    #[serde(deserialize_with = "numeric_date")]
    pub exp: u64,
    /// Topics (exact, or prefixes ending in `*`) the user may subscribe to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topics: Vec<String>,
}

/// Why a token was refused; its `Display` is the `reason` of the 401 body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("no token: pass ?token=, an Authorization: Bearer header, or the protocol's own token field")]
    Missing,
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("token expired")]
    Expired,
    #[error("token not valid yet (nbf)")]
    NotYetValid,
    #[error("token audience (aud) is not one this gateway accepts")]
    WrongAudience,
    #[error("bad token signature")]
    BadSignature,
    #[error("token algorithm {0} is not accepted by this gateway")]
    WrongAlgorithm(String),
    #[error("bad sub claim: {0}")]
    BadSubject(IdError),
    #[error("bad topics claim: {0}")]
    BadTopicClaim(String),
}

/// Key material could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("cannot load the token verification key: {0}")]
pub struct KeyError(String);

/// Checks tokens against the configured keys.
#[derive(Clone)]
pub struct Verifier {
    secret: Option<DecodingKey>,
    public: Option<(DecodingKey, Algorithm)>,
    /// The `aud` a token must name one of; empty: any `aud`, or none.
    audience: Vec<String>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("hs256", &self.secret.is_some())
            .field("public_key", &self.public.as_ref().map(|(_, alg)| alg))
            .finish()
    }
}

impl Verifier {
    /// A verifier for HS256 tokens signed with `secret`, and for public-key tokens when `public_pem`
    /// (an Ed25519 or RSA public key in PEM) is given. At least one must be present.
    pub fn new(secret: Option<&[u8]>, public_pem: Option<&[u8]>) -> Result<Verifier, KeyError> {
        let public = match public_pem {
            None => None,
            Some(pem) => Some(
                DecodingKey::from_ed_pem(pem)
                    .map(|key| (key, Algorithm::EdDSA))
                    .or_else(|_| DecodingKey::from_rsa_pem(pem).map(|key| (key, Algorithm::RS256)))
                    .map_err(|e| KeyError(format!("public key is neither Ed25519 nor RSA PEM: {e}")))?,
            ),
        };
        if secret.is_some_and(<[u8]>::is_empty) {
            // An empty HMAC key is still a key: anyone could sign tokens with it.
            return Err(KeyError(
                "jwt_secret is empty: set a secret, or leave it unset to use jwt_public_key alone".into(),
            ));
        }
        if secret.is_none() && public.is_none() {
            return Err(KeyError("configure jwt_secret or jwt_public_key".into()));
        }
        Ok(Verifier { secret: secret.map(DecodingKey::from_secret), public, audience: Vec::new() })
    }

    /// Tokens must name one of `audience` in their `aud` claim (none: `aud` is not checked, as
    /// tokens from an identity provider carry one of their own).
    pub fn with_audience(self, audience: Vec<String>) -> Verifier {
        Verifier { audience, ..self }
    }

    /// Verifies `token` and its claims; the `sub` and every topic claim must obey the id rule.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        let header = jsonwebtoken::decode_header(token).map_err(malformed)?;
        // RFC 7515 §4.1.11: a token naming extensions its reader must understand is refused by a
        // reader that understands none.
        if let Some(crit) = header.crit.as_ref().filter(|crit| !crit.is_empty()) {
            return Err(TokenError::Malformed(format!(
                "its header asks for extensions Herald does not know: {crit:?}"
            )));
        }
        let key = match (header.alg, &self.secret, &self.public) {
            (Algorithm::HS256, Some(secret), _) => secret,
            (alg, _, Some((key, public_alg))) if alg == *public_alg => key,
            (alg, _, _) => return Err(TokenError::WrongAlgorithm(format!("{alg:?}"))),
        };
        let mut validation = Validation::new(header.alg);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 0;
        // Checked below, with leeway for clocks: `leeway` would apply to `exp` as well.
        validation.validate_nbf = false;
        if self.audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&self.audience);
            validation.set_required_spec_claims(&["exp", "sub", "aud"]);
        }
        let Dated { claims, nbf } = jsonwebtoken::decode::<Dated>(token, key, &validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                ErrorKind::InvalidAudience => TokenError::WrongAudience,
                ErrorKind::MissingRequiredClaim(claim) if claim == "aud" => TokenError::WrongAudience,
                ErrorKind::InvalidSignature => TokenError::BadSignature,
                _ => malformed(e),
            })?
            .claims;
        // An identity provider's `nbf` is often the moment it signed: a gateway's clock a little
        // behind must not refuse the token it hands out at once.
        if nbf.is_some_and(|nbf| nbf > now_secs().saturating_add(NBF_LEEWAY_SECS)) {
            return Err(TokenError::NotYetValid);
        }
        // Expired from its `exp` second on: the library takes `exp == now`, for which the
        // connection's expiry timer would close the connection at once.
        if claims.exp <= now_secs() {
            return Err(TokenError::Expired);
        }
        check_claims(&claims)?;
        Ok(claims)
    }
}

/// A token that cannot be read, said in words a newcomer can act on.
fn malformed(error: jsonwebtoken::errors::Error) -> TokenError {
    TokenError::Malformed(match error.kind() {
        ErrorKind::InvalidToken => "not a JWT (three base64url parts joined by dots)".into(),
        ErrorKind::Base64(_) => "a part of the JWT is not base64url".into(),
        ErrorKind::Json(error) => format!("its header or claims are not the JSON expected: {error}"),
        ErrorKind::Utf8(_) => "a part of the JWT is not UTF-8".into(),
        ErrorKind::MissingRequiredClaim(claim) => format!("no {claim} claim"),
        ErrorKind::InvalidClaimFormat(claim) => format!("the {claim} claim is not a number of seconds"),
        _ => error.to_string(),
    })
}

/// How far ahead of the gateway's clock a token's `nbf` may be.
const NBF_LEEWAY_SECS: u64 = 60;

/// Claims with the token's `nbf`, if any.
#[derive(Deserialize)]
struct Dated {
    #[serde(flatten)]
    claims: Claims,
    #[serde(default, deserialize_with = "optional_numeric_date")]
    nbf: Option<u64>,
}

/// A JWT NumericDate (RFC 7519 §2): seconds, which may have a fraction (JavaScript's
/// `Date.now() / 1000` makes one), rounded as the token library rounds it when it checks `exp`.
fn numeric_date<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    let value = serde_json::Value::deserialize(deserializer)?;
    let fraction = || value.as_f64().filter(|seconds| seconds.is_finite() && (0.0..u64::MAX as f64).contains(seconds));
    value.as_u64().or_else(|| fraction().map(|seconds| seconds.round() as u64)).ok_or_else(|| {
        serde::de::Error::custom(format!("exp and nbf are numbers of seconds since the epoch, not {value}"))
    })
}

/// An optional NumericDate: absent, or `null` (as some signers write an unset claim), is none.
fn optional_numeric_date<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    match Option::<serde_json::Value>::deserialize(deserializer)? {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(value) => numeric_date(value).map(Some).map_err(serde::de::Error::custom),
    }
}

/// Whether a gateway takes `claims`: a valid user id, and topics that are names or prefixes of
/// names ending in `*` (what a tool that signs tokens checks before it signs).
pub fn check_claims(claims: &Claims) -> Result<(), TokenError> {
    check_id(IdKind::User, &claims.sub).map_err(TokenError::BadSubject)?;
    for pattern in &claims.topics {
        let name = pattern.strip_suffix('*').unwrap_or(pattern);
        // A bare `*` (every topic) is allowed; otherwise the prefix must be a valid topic start.
        if !name.is_empty() {
            check_id(IdKind::Topic, name).map_err(|e| TokenError::BadTopicClaim(e.to_string()))?;
        }
    }
    Ok(())
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    since_epoch().as_secs()
}

/// The time since the Unix epoch.
pub fn since_epoch() -> std::time::Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// Signs an HS256 token (dev tokens, tests, tools).
pub fn issue_hs256(secret: &[u8], claims: &Claims) -> String {
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(secret))
        .expect("HS256 signing cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"test-secret";

    fn claims(sub: &str, exp: u64) -> Claims {
        Claims { sub: sub.into(), exp, topics: vec!["news".into(), "room-*".into()] }
    }

    #[test]
    fn accepts_a_good_token() {
        let verifier = Verifier::new(Some(SECRET), None).unwrap();
        let good = claims("42", now_secs() + 60);
        assert_eq!(verifier.verify(&issue_hs256(SECRET, &good)), Ok(good));
    }

    #[test]
    fn refuses_bad_tokens_with_a_reason() {
        let verifier = Verifier::new(Some(SECRET), None).unwrap();
        let expired = issue_hs256(SECRET, &claims("42", now_secs() - 10));
        assert_eq!(verifier.verify(&expired), Err(TokenError::Expired));
        let forged = issue_hs256(b"other", &claims("42", now_secs() + 60));
        assert_eq!(verifier.verify(&forged), Err(TokenError::BadSignature));
        assert!(matches!(verifier.verify("not.a.jwt"), Err(TokenError::Malformed(_))));
        assert!(Verifier::new(Some(b""), None).is_err(), "an empty secret is no key");
        for sub in ["a.b", "*", ">", ""] {
            let token = issue_hs256(SECRET, &claims(sub, now_secs() + 60));
            assert!(matches!(verifier.verify(&token), Err(TokenError::BadSubject(_))), "{sub}");
        }
    }

    fn signed(alg: Algorithm, private_pem: &[u8], claims: &Claims) -> String {
        let key = match alg {
            Algorithm::EdDSA => EncodingKey::from_ed_pem(private_pem).unwrap(),
            _ => EncodingKey::from_rsa_pem(private_pem).unwrap(),
        };
        jsonwebtoken::encode(&Header::new(alg), claims, &key).unwrap()
    }

    #[test]
    fn verifies_eddsa_and_rs256_tokens_with_a_public_key() {
        let good = claims("42", now_secs() + 60);
        let ed = Verifier::new(None, Some(include_bytes!("../testdata/ed25519-public.pem"))).unwrap();
        let token = signed(Algorithm::EdDSA, include_bytes!("../testdata/ed25519-private.pem"), &good);
        assert_eq!(ed.verify(&token), Ok(good.clone()));
        let forged = signed(Algorithm::EdDSA, include_bytes!("../testdata/ed25519-other-private.pem"), &good);
        assert_eq!(ed.verify(&forged), Err(TokenError::BadSignature));
        let expired = claims("42", now_secs() - 10);
        let token = signed(Algorithm::EdDSA, include_bytes!("../testdata/ed25519-private.pem"), &expired);
        assert_eq!(ed.verify(&token), Err(TokenError::Expired));
        // No secret configured: an HS256 token is refused, whatever it is signed with.
        assert!(matches!(ed.verify(&issue_hs256(SECRET, &good)), Err(TokenError::WrongAlgorithm(_))));

        let rsa = Verifier::new(None, Some(include_bytes!("../testdata/rsa-public.pem"))).unwrap();
        let token = signed(Algorithm::RS256, include_bytes!("../testdata/rsa-private.pem"), &good);
        assert_eq!(rsa.verify(&token), Ok(good.clone()));
        let token = signed(Algorithm::EdDSA, include_bytes!("../testdata/ed25519-private.pem"), &good);
        assert!(matches!(rsa.verify(&token), Err(TokenError::WrongAlgorithm(_))));
    }

    #[test]
    fn refuses_a_key_that_is_no_public_key() {
        assert!(Verifier::new(None, Some(b"not a key")).is_err());
        assert!(Verifier::new(None, None).is_err());
    }

    fn signed_json(claims: serde_json::Value) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET)).unwrap()
    }

    #[test]
    fn a_token_is_expired_from_its_exp_second_on() {
        let verifier = Verifier::new(Some(SECRET), None).unwrap();
        let now = now_secs();
        assert_eq!(verifier.verify(&issue_hs256(SECRET, &claims("42", now))), Err(TokenError::Expired));
        let next = claims("42", now + 2);
        assert_eq!(verifier.verify(&issue_hs256(SECRET, &next)), Ok(next));
    }

    #[test]
    fn exp_and_nbf_may_have_a_fraction_of_a_second() {
        let verifier = Verifier::new(Some(SECRET), None).unwrap();
        let now = now_secs();
        let exp = now as f64 + 60.4;
        let token = signed_json(serde_json::json!({"sub": "42", "exp": exp, "nbf": now as f64 - 0.5}));
        assert_eq!(verifier.verify(&token).map(|claims| claims.exp), Ok(now + 60));
        let early = signed_json(serde_json::json!({"sub": "42", "exp": exp, "nbf": now_secs() as f64 + 300.5}));
        assert_eq!(verifier.verify(&early), Err(TokenError::NotYetValid));
        let expired = signed_json(serde_json::json!({"sub": "42", "exp": now_secs() as f64 - 10.5}));
        assert_eq!(verifier.verify(&expired), Err(TokenError::Expired));
        let negative = signed_json(serde_json::json!({"sub": "42", "exp": -1.5}));
        assert!(matches!(verifier.verify(&negative), Err(TokenError::Malformed(_))));
        let unset = signed_json(serde_json::json!({"sub": "42", "exp": now as f64 + 60.0, "nbf": null}));
        assert_eq!(verifier.verify(&unset).map(|claims| claims.exp), Ok(now + 60));
        let zero = signed_json(serde_json::json!({"sub": "42", "exp": 0}));
        assert_eq!(verifier.verify(&zero), Err(TokenError::Expired));
    }

    #[test]
    fn a_token_is_refused_before_its_nbf_and_its_aud_is_checked_only_when_configured() {
        let verifier = Verifier::new(Some(SECRET), None).unwrap();
        let exp = now_secs() + 60;
        let early = signed_json(serde_json::json!({"sub": "42", "exp": exp, "nbf": now_secs() + 300}));
        assert_eq!(verifier.verify(&early), Err(TokenError::NotYetValid));
        // Within a clock's drift: taken.
        let started = signed_json(serde_json::json!({"sub": "42", "exp": exp, "nbf": now_secs() + 5}));
        assert!(verifier.verify(&started).is_ok());
        // An identity provider's token names its own audience: taken when none is configured.
        let theirs = signed_json(serde_json::json!({"sub": "42", "exp": exp, "aud": "their-app"}));
        assert!(verifier.verify(&theirs).is_ok());
        let ours = signed_json(serde_json::json!({"sub": "42", "exp": exp, "aud": ["herald", "other"]}));
        let none = signed_json(serde_json::json!({"sub": "42", "exp": exp}));
        let strict = verifier.with_audience(vec!["herald".into()]);
        assert!(strict.verify(&ours).is_ok());
        assert_eq!(strict.verify(&theirs), Err(TokenError::WrongAudience));
        assert_eq!(strict.verify(&none), Err(TokenError::WrongAudience));
    }

    #[test]
    fn refuses_a_token_without_exp() {
        let verifier = Verifier::new(Some(SECRET), None).unwrap();
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": "42"}),
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        let Err(TokenError::Malformed(reason)) = verifier.verify(&token) else { panic!("taken") };
        assert!(reason.contains("missing field `exp`"), "{reason}");
    }

    #[test]
    fn an_unreadable_token_is_told_in_words() {
        let verifier = Verifier::new(Some(SECRET), None).unwrap();
        assert_eq!(verifier.verify(""), Err(TokenError::Missing));
        let not_a_jwt = TokenError::Malformed("not a JWT (three base64url parts joined by dots)".into());
        assert_eq!(verifier.verify("abc"), Err(not_a_jwt));
        assert_eq!(verifier.verify("a!.b.c"), Err(TokenError::Malformed("a part of the JWT is not base64url".into())));
        let text = signed_json(serde_json::json!({"sub": "42", "exp": "tomorrow"}));
        let Err(TokenError::Malformed(reason)) = verifier.verify(&text) else { panic!("taken") };
        assert!(reason.starts_with("its header or claims are not the JSON expected"), "{reason}");
        assert!(reason.contains(r#"numbers of seconds since the epoch, not "tomorrow""#), "{reason}");
    }
}
