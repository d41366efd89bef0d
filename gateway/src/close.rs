//! Why a connection ends, as values: each reason carries the close code of the contract
//! (docs/protocol.md, "Close codes") and a short text for the client and the logs.

use std::borrow::Cow;

use herald_shared::frame::close_code;

/// The close codes the gateway sends (and 1006, which it never sends: the connection is gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseCode {
    /// 1001: the client went silent (no frame, no pong).
    NoHeartbeat,
    /// 1002: the client broke the WebSocket protocol.
    ProtocolError,
    /// 1006: the connection is gone; no close frame can be sent.
    Abnormal,
    /// 1007: a text message (or close reason) that is not UTF-8.
    InvalidData,
    /// 1008: a frame the gateway cannot parse or does not allow.
    Policy,
    /// 1009: a message over the size limit.
    TooBig,
    /// 1011: an internal error (e.g. NATS refused a subscription).
    Internal,
    /// 1012: the gateway is restarting.
    Restart,
    /// 1013: NATS was unavailable while the connection started.
    Unavailable,
    /// 4001: the token expired while connected.
    TokenExpired,
    /// 4003: an operator disconnected the connection or its user.
    Disconnected,
    /// 4008: the client stopped reading, or a gap could not be repaired in order.
    SlowConsumer,
    /// 4009: replaced by a newer session (session policy).
    Replaced,
    /// A code the client closed with, sent back to it (1000 for a close without one, or one in
    /// the client's protocol: a STOMP DISCONNECT, a Socket.IO disconnect).
    Echo(u16),
}

impl CloseCode {
    /// The number on the wire.
    pub(crate) fn number(self) -> u16 {
        match self {
            CloseCode::NoHeartbeat => 1001,
            CloseCode::ProtocolError => close_code::PROTOCOL_ERROR,
            CloseCode::Abnormal => 1006,
            CloseCode::InvalidData => close_code::INVALID_DATA,
            CloseCode::Policy => close_code::POLICY,
            CloseCode::TooBig => close_code::TOO_BIG,
            CloseCode::Internal => 1011,
            CloseCode::Restart => close_code::RESTART,
            CloseCode::Unavailable => close_code::TRY_AGAIN_LATER,
            CloseCode::TokenExpired => close_code::TOKEN_EXPIRED,
            CloseCode::Disconnected => close_code::DISCONNECTED,
            CloseCode::SlowConsumer => close_code::SLOW_CONSUMER,
            CloseCode::Replaced => close_code::REPLACED,
            CloseCode::Echo(code) => code,
        }
    }

    /// Every code the gateway chooses (all but [`CloseCode::Echo`]: a normal close is always
    /// the client's, answered with its code or 1000).
    pub(crate) const CHOSEN: [CloseCode; 13] = [
        CloseCode::NoHeartbeat,
        CloseCode::ProtocolError,
        CloseCode::Abnormal,
        CloseCode::InvalidData,
        CloseCode::Policy,
        CloseCode::TooBig,
        CloseCode::Internal,
        CloseCode::Restart,
        CloseCode::Unavailable,
        CloseCode::TokenExpired,
        CloseCode::Disconnected,
        CloseCode::SlowConsumer,
        CloseCode::Replaced,
    ];

    /// The label of `herald_gateway_connections_closed_total`: the code the gateway chose, or
    /// `client` for a close the client started (its code is its own: any of thousands).
    pub(crate) fn label(self) -> String {
        match self {
            CloseCode::Echo(_) => "client".into(),
            chosen => chosen.number().to_string(),
        }
    }

    /// Whether a close frame can be sent with this code (1006 means the connection is gone).
    pub(crate) fn is_sent(self) -> bool {
        self != CloseCode::Abnormal
    }
}

/// How a connection ends: the code and a reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Close {
    pub(crate) code: CloseCode,
    pub(crate) reason: Cow<'static, str>,
}

impl Close {
    pub(crate) fn new(code: CloseCode, reason: impl Into<Cow<'static, str>>) -> Close {
        Close { code, reason: reason.into() }
    }

    /// The client closed with `code` (one a peer may send: the reader refuses the others) or
    /// none: answered with the same code (RFC 6455 §5.5.1), or 1000.
    pub(crate) fn by_client(code: Option<u16>) -> Close {
        Close::new(CloseCode::Echo(code.unwrap_or(close_code::NORMAL)), "")
    }

    /// The client ended the connection in its protocol (a STOMP DISCONNECT, a Socket.IO close):
    /// answered with 1000.
    pub(crate) fn client_left(reason: &'static str) -> Close {
        Close::new(CloseCode::Echo(close_code::NORMAL), reason)
    }

    /// The connection is gone (reset, or the gateway was killed): nothing is sent.
    pub(crate) fn gone(reason: impl Into<Cow<'static, str>>) -> Close {
        Close::new(CloseCode::Abnormal, reason)
    }

    pub(crate) fn restart() -> Close {
        Close::new(CloseCode::Restart, "gateway restarting")
    }

    pub(crate) fn slow_consumer(reason: &'static str) -> Close {
        Close::new(CloseCode::SlowConsumer, reason)
    }

    /// The number on the wire.
    pub(crate) fn number(&self) -> u16 {
        self.code.number()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_codes_are_echoed() {
        assert_eq!(Close::by_client(Some(4000)).number(), 4000);
        assert_eq!(Close::by_client(Some(1001)).number(), 1001);
        assert_eq!(Close::by_client(None).number(), 1000);
        assert!(!Close::gone("reset").code.is_sent());
    }

    #[test]
    fn metrics_label_the_gateways_codes_and_the_clients_closes() {
        assert_eq!(CloseCode::SlowConsumer.label(), "4008");
        assert_eq!(Close::by_client(Some(4321)).code.label(), "client");
        assert_eq!(Close::by_client(None).code.label(), "client", "a close frame without a code");
        assert_eq!(
            (Close::client_left("bye").number(), Close::client_left("bye").code.label()),
            (1000, "client".into())
        );
        assert!(CloseCode::CHOSEN.iter().all(|code| code.label().parse::<u16>().is_ok()));
    }
}
