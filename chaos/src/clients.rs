//! Clients: one WebSocket per user, reading Herald's frames (docs/protocol.md). On any close or
//! error a client reconnects at once to another gateway, picked at random as a load balancer would,
//! with `since=<the highest seq it received>`, as a real client resumes; it records every `seq` it
//! receives.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use herald_shared::frame::ServerFrame;
use herald_shared::token::{Claims, issue_hs256, now_secs};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::clock::Clock;
use crate::gateways::SECRET;
use crate::publisher::{TOPIC, user_id};

/// How long opening a socket (TCP, upgrade) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest pause between connection attempts when every gateway refuses.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Anomalies described in detail per client (the rest are only counted).
const EXAMPLES: usize = 10;
/// The device every client connects as.
const DEVICE: &str = "chaos";

/// A set of stream sequences, one bit each.
#[derive(Debug, Default, Clone)]
pub struct SeqSet {
    words: Vec<u64>,
    len: u64,
}

impl SeqSet {
    /// Adds `seq`; false if it was there already.
    pub fn insert(&mut self, seq: u64) -> bool {
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if word >= self.words.len() {
            self.words.resize((word + 1).next_power_of_two(), 0);
        }
        let fresh = self.words[word] & (1 << bit) == 0;
        self.words[word] |= 1 << bit;
        self.len += u64::from(fresh);
        fresh
    }

    /// Whether `seq` is in the set.
    pub fn contains(&self, seq: u64) -> bool {
        self.words.get((seq / 64) as usize).is_some_and(|word| word & (1 << (seq % 64)) != 0)
    }

    /// How many sequences the set holds.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A `replayed` frame with `complete:false`.
#[derive(Debug, Clone, Serialize)]
pub struct IncompleteReplay {
    /// Seconds into the run.
    pub at: f64,
    /// The gateway that sent it.
    pub gateway: String,
    pub from: u64,
    pub to: u64,
    pub count: u64,
}

/// Everything one client saw.
#[derive(Debug, Default)]
pub struct Received {
    /// Every `seq` received.
    pub seen: SeqSet,
    /// `msg` frames received, duplicates included.
    pub frames: u64,
    /// `msg` frames whose `seq` had been received before.
    pub duplicates: u64,
    /// `msg` frames with a new `seq` lower than one received before.
    pub out_of_order: u64,
    /// The highest `seq` received (the next `since`).
    pub last_seq: u64,
    /// Connections that got their `welcome`.
    pub connects: u64,
    /// Connection attempts that failed (nothing listening, refused, no `welcome`).
    pub failed_connects: u64,
    /// How connections ended: a close code, `abrupt` (no close frame), …
    pub closes: BTreeMap<String, u64>,
    /// `replayed` frames that said `complete:false`.
    pub incomplete_replays: Vec<IncompleteReplay>,
    /// Frames that were not valid JSON of the protocol.
    pub bad_frames: u64,
    /// The gateway of the current connection (its `node`), if connected.
    pub gateway: Option<String>,
    /// When the last frame arrived.
    pub last_frame: Option<Instant>,
    /// The first anomalies (duplicates, reordering, bad frames), described.
    pub examples: Vec<String>,
}

impl Received {
    /// Takes in one frame.
    fn on_frame(&mut self, frame: ServerFrame, clock: &Clock) {
        self.last_frame = Some(Instant::now());
        match frame {
            ServerFrame::Welcome { node, .. } => {
                self.connects += 1;
                self.gateway = Some(node);
            }
            ServerFrame::Msg(msg) => self.on_msg(msg.seq, clock),
            ServerFrame::Replayed { from, to, count, complete: false, .. } => {
                let gateway = self.gateway.clone().unwrap_or_default();
                self.incomplete_replays.push(IncompleteReplay { at: clock.secs(), gateway, from, to, count });
            }
            _ => {}
        }
    }

    /// Takes in one `msg` frame's sequence.
    pub(crate) fn on_msg(&mut self, seq: u64, clock: &Clock) {
        self.frames += 1;
        if !self.seen.insert(seq) {
            self.duplicates += 1;
            self.example(format!("seq {seq} received again (highest {})", self.last_seq), clock);
        } else if seq < self.last_seq {
            self.out_of_order += 1;
            self.example(format!("seq {seq} after seq {}", self.last_seq), clock);
        }
        self.last_seq = self.last_seq.max(seq);
    }

    fn example(&mut self, what: String, clock: &Clock) {
        if self.examples.len() < EXAMPLES {
            let gateway = self.gateway.as_deref().unwrap_or("?");
            self.examples.push(format!("{:.1}s on {gateway} (connection {}): {what}", clock.secs(), self.connects));
        }
    }

    fn on_end(&mut self, how: String) {
        *self.closes.entry(how).or_default() += 1;
        self.gateway = None;
    }
}

/// One user's client, running.
pub struct Client {
    /// The user's index (`u<index>`).
    pub user: u32,
    /// Whether it subscribes to the topic.
    pub subscribed: bool,
    received: Arc<Mutex<Received>>,
    task: JoinHandle<()>,
}

impl Client {
    /// Starts user `user`'s client on the gateways at `urls`, first connecting to `urls[user % n]`;
    /// `seed` seeds its later choices.
    pub fn spawn(user: u32, subscribed: bool, urls: Arc<Vec<String>>, seed: u64, clock: Clock) -> Client {
        let received = Arc::new(Mutex::new(Received::default()));
        let rng = StdRng::seed_from_u64(seed ^ u64::from(user).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let task = tokio::spawn(run(user, subscribed, urls, rng, received.clone(), clock));
        Client { user, subscribed, received, task }
    }

    /// A look at what it received so far.
    pub fn received(&self) -> std::sync::MutexGuard<'_, Received> {
        self.received.lock().unwrap()
    }

    /// Stops the client and returns what it received.
    pub fn stop(self) -> Received {
        self.task.abort();
        std::mem::take(&mut *self.received.lock().unwrap())
    }
}

/// Connects, reads until the connection ends, and reconnects, forever.
async fn run(
    user: u32,
    subscribed: bool,
    urls: Arc<Vec<String>>,
    mut rng: StdRng,
    received: Arc<Mutex<Received>>,
    clock: Clock,
) {
    let token = token(user, subscribed);
    let topics = if subscribed { format!("&topics={TOPIC}") } else { String::new() };
    let mut gateway = user as usize % urls.len();
    let mut failures = 0u32;
    loop {
        let since = received.lock().unwrap().last_seq;
        let url = format!("{}?token={token}&device={DEVICE}&since={since}{topics}", urls[gateway]);
        gateway = another(gateway, urls.len(), &mut rng);
        match tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(&url)).await {
            Ok(Ok((socket, _))) => {
                failures = 0;
                let how = read(socket, &received, &clock).await;
                received.lock().unwrap().on_end(how);
            }
            _ => {
                received.lock().unwrap().failed_connects += 1;
                failures += 1;
                // Every gateway was tried once: back off a little before the next round.
                if failures as usize >= urls.len() {
                    let pause = Duration::from_millis(50) * failures.min(20);
                    tokio::time::sleep(pause.min(MAX_BACKOFF)).await;
                }
            }
        }
    }
}

/// A gateway other than `current`, at random (`current` itself when it is the only one).
fn another(current: usize, gateways: usize, rng: &mut StdRng) -> usize {
    if gateways < 2 {
        return current;
    }
    (current + rng.random_range(1..gateways)) % gateways
}

/// Reads frames until the connection ends; returns how it ended (a close code, or `abrupt`).
async fn read(
    mut socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    received: &Mutex<Received>,
    clock: &Clock,
) -> String {
    while let Some(message) = socket.next().await {
        match message {
            Ok(Message::Text(text)) => {
                let frame = serde_json::from_str::<ServerFrame>(&text);
                let mut received = received.lock().unwrap();
                match frame {
                    Ok(frame) => received.on_frame(frame, clock),
                    Err(error) => {
                        received.bad_frames += 1;
                        received.example(format!("bad frame ({error}): {text}"), clock);
                    }
                }
            }
            Ok(Message::Close(frame)) => {
                return frame.map_or_else(|| "close without code".into(), |frame| u16::from(frame.code).to_string());
            }
            Ok(_) => {}
            Err(_) => return "abrupt".into(),
        }
    }
    "abrupt".into()
}

/// A connect token for user `user`, valid for a week, allowing the topic when it subscribes.
fn token(user: u32, subscribed: bool) -> String {
    let topics = if subscribed { vec![TOPIC.to_string()] } else { Vec::new() };
    let claims = Claims { sub: user_id(user), exp: now_secs() + 7 * 24 * 3600, topics };
    issue_hs256(SECRET.as_bytes(), &claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seq_set_holds_what_was_inserted() {
        let mut set = SeqSet::default();
        assert!(set.insert(1) && set.insert(64) && set.insert(1_000_000));
        assert!(!set.insert(64), "64 was there");
        assert!(set.contains(1) && set.contains(64) && set.contains(1_000_000));
        assert!(!set.contains(2) && !set.contains(63) && !set.contains(5_000_000));
        assert_eq!(set.len(), 3);
    }

    #[test]
    fn a_reconnect_goes_to_another_gateway() {
        let mut rng = StdRng::seed_from_u64(1);
        let picks: Vec<usize> = (0..300).map(|_| another(1, 3, &mut rng)).collect();
        assert!(picks.iter().all(|&pick| pick != 1));
        assert!(picks.contains(&0) && picks.contains(&2));
        assert_eq!(another(0, 1, &mut rng), 0);
    }

    #[test]
    fn duplicates_and_reordering_are_counted_apart() {
        let clock = Clock::start();
        let mut received = Received::default();
        for seq in [1, 2, 5, 5, 3, 6, 2] {
            received.on_msg(seq, &clock);
        }
        assert_eq!((received.frames, received.duplicates, received.out_of_order), (7, 2, 1));
        assert_eq!(received.last_seq, 6);
        assert_eq!(received.seen.len(), 5);
        assert_eq!(received.examples.len(), 3);
    }
}
