//! What a STOMP client sends: each frame becomes a session [`Command`] (or is answered by the
//! codec itself: receipts, subscriptions to the user's queue and `/topic/all`, which the session
//! always receives).

use herald_shared::frame::error_code;
use herald_shared::id::{IdKind, check_id, topic_allowed};
use herald_shared::subject::Audience;

use super::frame::{Frame, Version};
use super::{
    AckMode, Held, PendingRpc, RPC_MESSAGE_ID, StompCodec, Subscription, Tail, Target, Transport, receipt_frame,
};
use crate::codec::{Command, Refusal, sockjs};

/// Most subscriptions one connection may hold (each `/user/queue/<name>` is one, whatever its name).
pub(crate) const MAX_SUBSCRIPTIONS: usize = 256;

impl StompCodec {
    /// Reads one client message: the commands of the frames it completes (none for heart-beats or
    /// the start of a frame), up to the first refused. Over SockJS a message holds any number of
    /// the client's messages.
    pub(crate) fn decode_message(&mut self, text: &[u8]) -> Vec<Result<Command, Refusal>> {
        let mut commands = Vec::new();
        match self.transport {
            Transport::WebSocket => {
                self.decode_stream(text, &mut commands);
            }
            Transport::SockJs => match sockjs::parse(text) {
                Ok(messages) => {
                    for message in messages {
                        if !self.decode_stream(message.as_bytes(), &mut commands) {
                            break;
                        }
                    }
                }
                Err(error) => commands.push(Err(Refusal::Close(self.fail(error_code::BAD_REQUEST, &error, None)))),
            },
        }
        commands
    }

    /// Reads `bytes`, the next part of the client's stream of frames; false once a frame is
    /// refused or asks to disconnect (the frames after it are not read).
    fn decode_stream(&mut self, bytes: &[u8], commands: &mut Vec<Result<Command, Refusal>>) -> bool {
        let (frames, read) = self.stream.read(bytes);
        for frame in frames {
            let command = self.decode_frame(&frame);
            let last = matches!(command, Ok(Command::Close) | Err(_));
            commands.push(command);
            if last {
                return false;
            }
        }
        match read {
            Ok(()) => true,
            Err(error) => {
                commands.push(Err(Refusal::Close(self.fail(error_code::BAD_REQUEST, &error, None))));
                false
            }
        }
    }

    /// Reads one whole frame: the command it asks of the session.
    fn decode_frame(&mut self, frame: &Frame) -> Result<Command, Refusal> {
        let receipt = frame.header("receipt").map(str::to_string);
        let command = match self.command(frame) {
            Ok(command) => command,
            Err((code, detail)) => return Err(Refusal::Close(self.fail(code, &detail, receipt.as_deref()))),
        };
        match &command {
            Command::Subscribe { topic, .. } | Command::Unsubscribe { topic } => {
                self.queue_receipt(Some(topic.clone()), receipt)
            }
            Command::Close => {
                if let Some(receipt) = receipt {
                    self.last = Some(receipt_frame(&receipt, self.connected.version.escapes()));
                }
            }
            _ if receipt.is_some() => self.queue_receipt(None, receipt),
            _ => {}
        }
        Ok(command)
    }

    /// One client message holding at most one frame (tests): its command, `Nothing` for none.
    #[cfg(test)]
    pub(crate) fn decode(&mut self, text: &[u8]) -> Result<Command, Refusal> {
        let mut commands = self.decode_message(text);
        assert!(commands.len() <= 1, "{commands:?}");
        commands.pop().unwrap_or(Ok(Command::Nothing))
    }

    fn command(&mut self, frame: &Frame) -> Result<Command, (&'static str, String)> {
        let required = |name: &str| {
            frame
                .header(name)
                .ok_or_else(|| (error_code::BAD_REQUEST, format!("{} needs the {name} header", frame.command)))
        };
        match frame.command.as_str() {
            "SUBSCRIBE" => {
                let destination = required("destination")?;
                // 1.0 made `id` optional: the destination names the subscription then.
                let id = match frame.header("id") {
                    Some(id) => id,
                    None if self.connected.version == Version::V10 => destination,
                    None => required("id")?,
                };
                let since = frame.header("herald-since").map(|since| since.parse::<u64>());
                let since = since.transpose().map_err(|_| bad("herald-since must be a sequence number"))?;
                self.subscribe(id, destination, frame.header("ack").unwrap_or("auto"), since)
            }
            "UNSUBSCRIBE" => {
                let id =
                    frame.header("id").or(frame.header("destination")).ok_or_else(|| bad("UNSUBSCRIBE needs an id"))?;
                let index = self.subscriptions.iter().position(|s| s.id == id);
                let Some(index) = index else { return Err(bad(format!("no subscription {id:?}"))) };
                let target = self.subscriptions.remove(index).target;
                self.count_copies();
                match target {
                    // The session leaves the topic with its last subscription.
                    Target::Topic(topic) if self.subscription(&Target::Topic(topic.clone())).is_none() => {
                        Ok(Command::Unsubscribe { topic })
                    }
                    _ => Ok(Command::Nothing),
                }
            }
            "ACK" => {
                // 1.2 acknowledges the MESSAGE's `ack` header in `id`; 1.0 and 1.1 its `message-id`.
                let id = frame.header("id").or(frame.header("message-id")).ok_or_else(|| bad("ACK needs an id"))?;
                if id.starts_with(RPC_MESSAGE_ID) {
                    // A function's reply is no stream message: acknowledging it moves no cursor.
                    return Ok(Command::Nothing);
                }
                let seq = id.parse::<u64>().map_err(|_| bad(format!("ACK of unknown message {id:?}")))?;
                self.acks.acked(seq);
                Ok(Command::Ack(seq))
            }
            // Moves no cursor; like an ACK it names a message it could have been sent.
            "NACK" => {
                let id = frame.header("id").or(frame.header("message-id")).ok_or_else(|| bad("NACK needs an id"))?;
                if !id.starts_with(RPC_MESSAGE_ID) && id.parse::<u64>().is_err() {
                    return Err(bad(format!("NACK of unknown message {id:?}")));
                }
                Ok(Command::Nothing)
            }
            "SEND" => self.send(frame),
            "DISCONNECT" => Ok(Command::Close),
            "CONNECT" | "STOMP" => Err(bad("already connected")),
            "BEGIN" | "COMMIT" | "ABORT" => Err(bad("transactions are not supported")),
            other => Err((error_code::UNKNOWN_TYPE, format!("unknown command {other}"))),
        }
    }

    fn subscribe(
        &mut self,
        id: &str,
        destination: &str,
        ack: &str,
        since: Option<u64>,
    ) -> Result<Command, (&'static str, String)> {
        let ack = match ack {
            "auto" => AckMode::Auto,
            "client" => AckMode::Client,
            "client-individual" => AckMode::ClientIndividual,
            other => return Err(bad(format!("unknown ack mode {other:?}"))),
        };
        if self.subscriptions.iter().any(|s| s.id == id) {
            return Err(bad(format!("subscription {id:?} exists already")));
        }
        if self.subscriptions.len() >= MAX_SUBSCRIPTIONS {
            return Err(bad(format!("at most {MAX_SUBSCRIPTIONS} subscriptions per connection")));
        }
        let target = Target::of(destination).ok_or_else(|| {
            bad(format!("unknown destination {destination:?}: /user/queue/<name>, /topic/all or /topic/<topic>"))
        })?;
        if let Target::Topic(topic) = &target {
            check_id(IdKind::Topic, topic).map_err(|error| bad(error.to_string()))?;
            if !topic_allowed(&self.connected.allowed_topics, topic) {
                return Err((error_code::FORBIDDEN, format!("the token does not allow topic {topic}")));
            }
        }
        let first = self.subscription(&target).is_none();
        let escaped = self.connected.version.escapes();
        let subscription = Subscription::new(id, destination, target, ack, self.transport, escaped);
        self.subscriptions.push(subscription);
        self.count_copies();
        let index = self.subscriptions.len() - 1;
        match &self.subscriptions[index].target {
            // A later subscription with `herald-since` replays the topic too (to every subscription of it).
            Target::Topic(topic) if first || since.is_some() => Ok(Command::Subscribe { topic: topic.clone(), since }),
            Target::Topic(_) => Ok(Command::Nothing),
            target => {
                let target = target.clone();
                if first {
                    return Ok(self.release(target, index));
                }
                Ok(Command::Nothing)
            }
        }
    }

    /// Sends what waited for `target`'s first subscription, `index`; when some of it was dropped,
    /// has the session read it all again from the stream instead (a refill), in order.
    fn release(&mut self, target: Target, index: usize) -> Command {
        let (mine, others): (Vec<Held>, Vec<Held>) = self.held.drain(..).partition(|held| held.target == target);
        self.held = others.into();
        if let Some(at) = self.dropped.iter().position(|(dropped, _)| *dropped == target) {
            let (_, first) = self.dropped.swap_remove(at);
            let audience = match target {
                Target::User => Audience::User(self.user.clone()),
                Target::All => Audience::All,
                Target::Topic(ref topic) => Audience::Topic(topic.clone()),
            };
            self.refilling.push(target);
            return Command::Refill { audience, since: first - 1 };
        }
        for held in mine {
            let head = self.head(index, held.seq, Tail { len: held.tail.len(), text: held.text });
            self.note_sent(index, held.seq);
            self.replies.push(head);
            self.replies.push(held.tail);
        }
        Command::Nothing
    }

    fn send(&mut self, frame: &Frame) -> Result<Command, (&'static str, String)> {
        let destination = frame.header("destination").ok_or_else(|| bad("SEND needs a destination"))?;
        let Some(function) = destination.strip_prefix("/app/") else {
            return Err(bad(format!("SEND goes to /app/<function>, not {destination:?}")));
        };
        // Refused with the frame's receipt, not after a RECEIPT that said it was taken.
        herald_shared::id::check_function_name(function).map_err(|error| bad(error.to_string()))?;
        let data = if frame.body.is_empty() {
            serde_json::Value::Null
        } else {
            // A body that is not JSON is passed as a JSON string.
            serde_json::from_slice(&frame.body)
                .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&frame.body).into_owned()))
        };
        self.next_rpc += 1;
        let id = self.next_rpc.to_string();
        let rpc = PendingRpc {
            reply_to: frame.header("reply-to").map(str::to_string),
            correlation: frame.header("correlation-id").map(str::to_string),
        };
        self.rpcs.insert(id.clone(), rpc);
        Ok(Command::Rpc { id, function: function.to_string(), data })
    }
}

fn bad(detail: impl Into<String>) -> (&'static str, String) {
    (error_code::BAD_REQUEST, detail.into())
}
