//! A connection the gateway agreed to open, between its checks and its session.

use std::net::IpAddr;
use std::sync::Arc;

use futures::FutureExt;

use super::auth::ConnectRequest;
use super::limits::Permit;
use crate::Shared;
use crate::session::{self, Connection};

/// A request checked and given its place (admitted under the limits, its session reserved): what
/// its session needs once the transport is there.
///
/// Kept boxed while the transport is made ready (an upgrade, a response head): a task is as large
/// as its largest state for its whole life, so what waits there should be a pointer, not the
/// request.
pub(crate) struct Admitted {
    pub(crate) connect: ConnectRequest,
    pub(crate) conn: String,
    pub(crate) address: IpAddr,
    pub(crate) permit: Permit,
}

impl Admitted {
    /// The session's whole life on `connection`; the place taken under the connection limits is
    /// held until it ends.
    pub(crate) fn session(self, shared: Arc<Shared>, connection: Connection) -> impl Future<Output = ()> + Send {
        let Admitted { connect, conn, address, permit } = self;
        session::run_with(shared, connection, connect, conn, address).map(move |()| drop(permit))
    }

    /// [`Self::session`] of a boxed one: the box is freed here, before the session starts, instead
    /// of with the task that held it.
    pub(crate) fn boxed_session(
        self: Box<Self>,
        shared: Arc<Shared>,
        connection: Connection,
    ) -> impl Future<Output = ()> + Send {
        (*self).session(shared, connection)
    }

    /// Gives the reserved session back: the transport never came.
    pub(crate) async fn cancel(self: Box<Self>, shared: &Shared) {
        shared.policies.cancel_reservation(&self.connect.claims.sub, &self.conn).await;
    }
}
