//! Publishing as a careful backend does: JetStream publishes to `push.user.<u>`, `push.all` and
//! `push.topic.chaos` at a steady rate, each with a unique `Nats-Msg-Id`, sent again with the same
//! id after any failure or timeout until the stream acknowledges it. The stream's duplicate window
//! makes every retry land once, so each message has exactly one sequence: the one acknowledged.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, publish::PublishAck};
use herald_shared::subject::header::NATS_MSG_ID;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::gateways::DUPLICATE_WINDOW;

/// The topic some users subscribe to.
pub const TOPIC: &str = "chaos";
/// How long one attempt may wait for its acknowledgement.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest pause between two attempts of one message.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Publishing that fell behind (the cluster was busy electing a leader) catches up at most this much
/// at once, so the rate holds on average over a run with faults.
const MAX_CATCH_UP: Duration = Duration::from_secs(10);

/// Who a message is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Audience {
    /// One user, by index.
    User(u32),
    /// Everyone (`push.all`).
    All,
    /// Subscribers of [`TOPIC`].
    Topic,
}

impl Audience {
    /// The subject it is published to.
    pub fn subject(self) -> String {
        match self {
            Audience::User(user) => format!("push.user.{}", user_id(user)),
            Audience::All => "push.all".to_string(),
            Audience::Topic => format!("push.topic.{TOPIC}"),
        }
    }

    /// Whether a message for this audience is addressed to user `user`, subscribed to the topic
    /// or not.
    pub fn reaches(self, user: u32, subscribed: bool) -> bool {
        match self {
            Audience::User(to) => to == user,
            Audience::All => true,
            Audience::Topic => subscribed,
        }
    }
}

/// The id of user number `index`.
pub fn user_id(index: u32) -> String {
    format!("u{index}")
}

/// A message the stream acknowledged.
#[derive(Debug, Clone, Copy)]
pub struct Acked {
    /// Its stream sequence.
    pub seq: u64,
    /// Who it is for.
    pub audience: Audience,
}

/// What to publish.
#[derive(Debug, Clone)]
pub struct PublishPlan {
    /// Most messages to publish.
    pub messages: u64,
    /// Stop after this long, even with messages left.
    pub duration: Option<Duration>,
    /// Messages per second.
    pub rate: f64,
    /// Messages being published (awaiting their acknowledgement) at once.
    pub in_flight: usize,
    /// Users (`u0`…), each as likely as the others.
    pub users: u32,
    /// Share of messages to `push.all`.
    pub all_share: f64,
    /// Share of messages to the topic.
    pub topic_share: f64,
    /// Seeds the choice of audiences.
    pub seed: u64,
    /// Prefix of every `Nats-Msg-Id`, unique to the run.
    pub run_id: String,
}

impl PublishPlan {
    /// The audience of the next message.
    fn draw(&self, rng: &mut StdRng) -> Audience {
        let x: f64 = rng.random();
        if x < self.all_share {
            Audience::All
        } else if x < self.all_share + self.topic_share {
            Audience::Topic
        } else {
            Audience::User(rng.random_range(0..self.users))
        }
    }
}

/// Counters the progress line reads while publishing runs.
#[derive(Debug, Default)]
pub struct PublishStats {
    /// Messages handed to publishing.
    pub sent: AtomicU64,
    /// Messages acknowledged.
    pub acked: AtomicU64,
    /// Attempts that failed and were repeated.
    pub retries: AtomicU64,
    /// Acknowledgements that said "duplicate": an earlier attempt had been stored.
    pub duplicate_acks: AtomicU64,
    /// Messages acknowledged only after the duplicate window (they may be stored twice).
    pub late: AtomicU64,
    /// Failed attempts by error.
    errors: Mutex<BTreeMap<String, u64>>,
}

impl PublishStats {
    fn count_error(&self, error: String) {
        self.retries.fetch_add(1, Ordering::Relaxed);
        *self.errors.lock().unwrap().entry(error).or_default() += 1;
    }
}

/// One message to publish.
struct Job {
    id: String,
    audience: Audience,
    body: String,
}

/// Publishing in progress.
pub struct Publishing {
    stats: Arc<PublishStats>,
    acked: Arc<Mutex<Vec<Acked>>>,
    started: Instant,
    pacer: JoinHandle<()>,
    workers: Vec<JoinHandle<()>>,
}

/// What publishing achieved.
#[derive(Debug, Clone, Serialize)]
pub struct Published {
    /// Messages handed to publishing.
    pub sent: u64,
    /// Messages acknowledged.
    pub acked: u64,
    /// Messages never acknowledged (publishing gave up on them at the end).
    pub unacked: u64,
    /// Failed attempts, repeated with the same id.
    pub retries: u64,
    /// Acknowledgements that reported a duplicate (a retry of a stored message).
    pub duplicate_acks: u64,
    /// Messages acknowledged after the duplicate window.
    pub late: u64,
    /// Failed attempts by error.
    pub errors: BTreeMap<String, u64>,
    /// From the first publish to the last acknowledgement, in seconds.
    pub seconds: f64,
    /// Every acknowledged message.
    #[serde(skip)]
    pub messages: Vec<Acked>,
}

impl Publishing {
    /// Starts publishing `plan` on `js`.
    pub fn start(js: jetstream::Context, plan: PublishPlan) -> Publishing {
        let stats = Arc::new(PublishStats::default());
        let acked = Arc::new(Mutex::new(Vec::new()));
        let (jobs_tx, jobs_rx) = mpsc::channel(plan.in_flight);
        let jobs_rx = Arc::new(tokio::sync::Mutex::new(jobs_rx));
        let workers = (0..plan.in_flight)
            .map(|_| tokio::spawn(work(js.clone(), jobs_rx.clone(), acked.clone(), stats.clone())))
            .collect();
        let pacer = tokio::spawn(pace(plan, jobs_tx, stats.clone()));
        Publishing { stats, acked, started: Instant::now(), pacer, workers }
    }

    /// The counters, for progress lines.
    pub fn stats(&self) -> Arc<PublishStats> {
        self.stats.clone()
    }

    /// Whether every message of the plan was handed out and acknowledged.
    pub fn is_done(&self) -> bool {
        self.pacer.is_finished() && self.workers.iter().all(JoinHandle::is_finished)
    }

    /// Waits until the plan is published and acknowledged; gives up on messages still
    /// unacknowledged `drain_timeout` after the last one was handed out.
    pub async fn finish(mut self, drain_timeout: Duration) -> Published {
        let _ = self.pacer.await;
        let drained = tokio::time::timeout(drain_timeout, futures::future::join_all(self.workers.iter_mut())).await;
        if drained.is_err() {
            eprintln!("herald-chaos: messages still unacknowledged {drain_timeout:?} after publishing ended");
            self.workers.iter().for_each(JoinHandle::abort);
        }
        let seconds = crate::clock::tenths(self.started.elapsed().as_secs_f64());
        let messages = std::mem::take(&mut *self.acked.lock().unwrap());
        let stats = &self.stats;
        let sent = stats.sent.load(Ordering::Relaxed);
        Published {
            sent,
            acked: messages.len() as u64,
            unacked: sent - messages.len() as u64,
            retries: stats.retries.load(Ordering::Relaxed),
            duplicate_acks: stats.duplicate_acks.load(Ordering::Relaxed),
            late: stats.late.load(Ordering::Relaxed),
            errors: stats.errors.lock().unwrap().clone(),
            seconds,
            messages,
        }
    }
}

/// Hands out the plan's messages at its rate (catching up at most [`MAX_CATCH_UP`] after a stall).
async fn pace(plan: PublishPlan, jobs: mpsc::Sender<Job>, stats: Arc<PublishStats>) {
    let mut rng = StdRng::seed_from_u64(plan.seed);
    let started = Instant::now();
    let (mut origin, mut origin_n) = (started, 0u64);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut n = 0u64;
    while n < plan.messages && plan.duration.is_none_or(|duration| started.elapsed() < duration) {
        tick.tick().await;
        let mut due = origin_n + (origin.elapsed().as_secs_f64() * plan.rate) as u64;
        let allowed = n + (MAX_CATCH_UP.as_secs_f64() * plan.rate) as u64;
        if due > allowed {
            (origin, origin_n, due) = (Instant::now() - MAX_CATCH_UP, n, allowed);
        }
        while n < due.min(plan.messages) {
            let audience = plan.draw(&mut rng);
            let job = Job { id: format!("{}-{n}", plan.run_id), audience, body: format!("{{\"n\":{n}}}") };
            if jobs.send(job).await.is_err() {
                return;
            }
            stats.sent.fetch_add(1, Ordering::Relaxed);
            n += 1;
        }
    }
}

/// Publishes messages from `jobs`, one at a time, each until acknowledged.
async fn work(
    js: jetstream::Context,
    jobs: Arc<tokio::sync::Mutex<mpsc::Receiver<Job>>>,
    acked: Arc<Mutex<Vec<Acked>>>,
    stats: Arc<PublishStats>,
) {
    loop {
        let Some(job) = jobs.lock().await.recv().await else { return };
        let seq = publish_until_acked(&js, &job, &stats).await;
        acked.lock().unwrap().push(Acked { seq, audience: job.audience });
        stats.acked.fetch_add(1, Ordering::Relaxed);
    }
}

/// Publishes `job` until the stream acknowledges it; returns its sequence.
async fn publish_until_acked(js: &jetstream::Context, job: &Job, stats: &PublishStats) -> u64 {
    let first_attempt = Instant::now();
    let mut backoff = Duration::from_millis(50);
    loop {
        match publish_once(js, job).await {
            Ok(ack) => {
                if ack.duplicate {
                    stats.duplicate_acks.fetch_add(1, Ordering::Relaxed);
                }
                if first_attempt.elapsed() > DUPLICATE_WINDOW {
                    stats.late.fetch_add(1, Ordering::Relaxed);
                }
                return ack.sequence;
            }
            Err(error) => {
                stats.count_error(error);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// One attempt: publish with the message's id and wait for the acknowledgement.
async fn publish_once(js: &jetstream::Context, job: &Job) -> Result<PublishAck, String> {
    let mut headers = HeaderMap::new();
    headers.insert(NATS_MSG_ID, job.id.as_str());
    let attempt = async {
        let ack = js.publish_with_headers(job.audience.subject(), headers, job.body.clone().into()).await;
        ack.map_err(|error| error.to_string())?.await.map_err(|error| error.to_string())
    };
    tokio::time::timeout(ACK_TIMEOUT, attempt).await.unwrap_or_else(|_| Err("no acknowledgement in time".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audiences_reach_whom_they_address() {
        assert!(Audience::User(3).reaches(3, false));
        assert!(!Audience::User(3).reaches(4, true));
        assert!(Audience::All.reaches(7, false));
        assert!(Audience::Topic.reaches(7, true));
        assert!(!Audience::Topic.reaches(7, false));
        assert_eq!(Audience::User(3).subject(), "push.user.u3");
        assert_eq!(Audience::Topic.subject(), "push.topic.chaos");
    }

    #[test]
    fn the_draw_follows_the_shares_and_the_seed() {
        let plan = PublishPlan {
            messages: 0,
            duration: None,
            rate: 1.0,
            in_flight: 1,
            users: 10,
            all_share: 0.1,
            topic_share: 0.2,
            seed: 7,
            run_id: "t".into(),
        };
        let draws = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..10_000).map(|_| plan.draw(&mut rng)).collect::<Vec<_>>()
        };
        let audiences = draws(7);
        assert_eq!(audiences, draws(7), "the same seed draws the same audiences");
        let all = audiences.iter().filter(|a| **a == Audience::All).count();
        let topic = audiences.iter().filter(|a| **a == Audience::Topic).count();
        assert!((800..1200).contains(&all), "{all}");
        assert!((1700..2300).contains(&topic), "{topic}");
        assert!(audiences.iter().all(|a| !matches!(a, Audience::User(u) if *u >= 10)));
    }
}
