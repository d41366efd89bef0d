//! Reading client messages from a socket: frames reassembled from fragments, with a size limit on
//! the whole message, and control frames surfaced so the session can answer and track liveness.

use fastwebsockets::{OpCode, WebSocketError, WebSocketRead};
use herald_shared::frame::close_code;
use tokio::io::AsyncRead;

use crate::outbox::Close;

/// What a client sent.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Inbound {
    /// A complete text message.
    Text(Vec<u8>),
    /// A ping with its payload; answer with a pong.
    Ping(Vec<u8>),
    /// A pong: the client is alive.
    Pong,
    /// The client closes with this code (or none).
    Close(Option<u16>),
}

/// Reads whole client messages, refusing any over `limit` bytes.
pub(crate) struct MessageReader<R> {
    socket: WebSocketRead<R>,
    limit: usize,
    /// A fragmented text message being assembled.
    partial: Option<Vec<u8>>,
}

impl<R: AsyncRead + Unpin> MessageReader<R> {
    pub(crate) fn new(mut socket: WebSocketRead<R>, limit: usize) -> MessageReader<R> {
        socket.set_auto_close(false);
        socket.set_auto_pong(false);
        // The library refuses frames of `max` bytes or more; allow exactly `limit`.
        socket.set_max_message_size(limit.saturating_add(1));
        MessageReader { socket, limit, partial: None }
    }

    /// The next client message; an error says how to close the connection. Not cancel-safe: run it
    /// in a task of its own.
    pub(crate) async fn next(&mut self) -> Result<Inbound, Close> {
        loop {
            let mut no_obligations = |_| std::future::ready(Ok::<(), std::convert::Infallible>(()));
            let frame = self.socket.read_frame(&mut no_obligations).await.map_err(read_error)?;
            match frame.opcode {
                OpCode::Text if frame.fin && self.partial.is_none() => return Ok(Inbound::Text(frame.payload.into())),
                OpCode::Text if self.partial.is_none() => self.partial = Some(frame.payload.into()),
                OpCode::Continuation => {
                    let Some(partial) = self.partial.as_mut() else {
                        return Err(Close::new(close_code::POLICY, "continuation without a message"));
                    };
                    if partial.len() + frame.payload.len() > self.limit {
                        return Err(too_big(self.limit));
                    }
                    partial.extend_from_slice(&frame.payload);
                    if frame.fin {
                        let message = self.partial.take().unwrap_or_default();
                        if std::str::from_utf8(&message).is_err() {
                            return Err(Close::new(close_code::POLICY, "text message is not UTF-8"));
                        }
                        return Ok(Inbound::Text(message));
                    }
                }
                OpCode::Text => return Err(Close::new(close_code::POLICY, "new message inside a fragmented one")),
                OpCode::Binary => return Err(Close::new(close_code::POLICY, "binary frames are not accepted")),
                OpCode::Ping => return Ok(Inbound::Ping(frame.payload.into())),
                OpCode::Pong => return Ok(Inbound::Pong),
                OpCode::Close => {
                    let code =
                        (frame.payload.len() >= 2).then(|| u16::from_be_bytes([frame.payload[0], frame.payload[1]]));
                    return Ok(Inbound::Close(code));
                }
            }
        }
    }
}

fn too_big(limit: usize) -> Close {
    Close::new(close_code::TOO_BIG, format!("message over {limit} bytes"))
}

fn read_error(error: WebSocketError) -> Close {
    match error {
        WebSocketError::FrameTooLarge => Close::new(close_code::TOO_BIG, "frame over the size limit"),
        WebSocketError::UnexpectedEOF | WebSocketError::IoError(_) | WebSocketError::ConnectionClosed => {
            // The peer is gone; this close is never seen by it, only logged.
            Close::new(1006, "connection lost")
        }
        other => Close::new(close_code::POLICY, format!("protocol error: {other}")),
    }
}
