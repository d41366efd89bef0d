//! The checks every endpoint of another protocol makes before it opens a connection (these
//! protocols authenticate afterwards, in their first message): the origin, the gateway's readiness
//! and the connection limits. WebSocket endpoints check the handshake first.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use futures::FutureExt;
use futures::future::Either;
use hyper::upgrade::Upgraded;
use hyper::{Request, StatusCode};
use tracing::debug;

use crate::Shared;
use crate::http::auth::Rejection;
use crate::http::limits::{self, LimitExceeded, Permit};

/// A place under the connection limits for the client at the returned address, or why not.
pub(crate) fn admit<B>(
    shared: &Arc<Shared>,
    request: &Request<B>,
    peer: SocketAddr,
) -> Result<(Permit, IpAddr), Rejection> {
    if let Some(origin) = super::server::refused_origin(&shared.config.allowed_origins, request) {
        return Err(Rejection::new(
            StatusCode::FORBIDDEN,
            "forbidden_origin",
            format!("origin {origin} is not allowed"),
        ));
    }
    if !shared.health.ready() {
        return Err(Rejection::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            shared.health.problems().join("; "),
        ));
    }
    let address = limits::client_address(peer.ip(), request.headers(), &shared.config.trusted_proxies);
    let permit = shared.limits.admit(address).map_err(|exceeded| match exceeded {
        LimitExceeded::Gateway => {
            Rejection::new(StatusCode::SERVICE_UNAVAILABLE, "too_many_connections", "this gateway is full")
        }
        LimitExceeded::Address => Rejection::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_connections",
            format!("too many connections from {address}"),
        ),
    })?;
    Ok((permit, address))
}

/// The connection's task once its WebSocket upgrade completes: `run` on the upgraded connection,
/// `permit` (its place under the limits) held until that ends.
///
/// Not an `async` block: one keeps what it captures for its whole life, and what `run` captures
/// (the hints a protocol reads at its first message, the client's address) only starts the
/// session. `then` holds `run` until the upgrade, and only the session after it.
pub(crate) fn after_upgrade<S>(
    upgrade: fastwebsockets::upgrade::UpgradeFut,
    permit: Option<Permit>,
    run: impl FnOnce(Upgraded) -> S + Send + 'static,
) -> impl Future<Output = ()> + Send + 'static
where
    S: Future<Output = ()> + Send + 'static,
{
    upgrade
        .then(|upgraded| match upgraded {
            Ok(socket) => Either::Left(run(socket.into_inner().into_inner())),
            Err(error) => {
                debug!(%error, "upgrade failed");
                Either::Right(std::future::ready(()))
            }
        })
        .map(move |()| drop(permit))
}
