//! A session's live sources: its mailbox (the user's own messages) and the broadcast logs it reads
//! (`push.all`, its topics), each log at the session's own position. [`LiveSources::pull`] merges
//! them in stream order up to the router's watermark, so a message is never sent before an older
//! one that is still on its way through the router.

use std::sync::Arc;

use herald_shared::subject::Audience;
use smallvec::SmallVec;

use crate::delivery::log::{Log, LogView};
use crate::delivery::mailbox::Mailbox;
use crate::delivery::message::{Live, Message};
use crate::delivery::router::LogStart;

/// What pulling finds, in stream order.
#[derive(Debug)]
pub(crate) enum Found<'a> {
    /// The next message (or gap) in stream order.
    Entry(&'a Live),
    /// The next `count` entries (two at least) of one log: the messages `first` to `last` of one
    /// burst, nothing else in between, and nothing from another source due before `last`.
    Burst { first: &'a Message, last: &'a Message, count: usize },
    /// A log evicted entries before this session read them; `last_evicted` is the newest, `gap`
    /// spans the gaps among them.
    Evicted { last_evicted: u64, gap: Option<Live> },
    /// The mailbox dropped personal messages for lack of room.
    Overflowed,
}

/// Whether to go on pulling after an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flow {
    Continue,
    Stop,
    /// Not the [`Found::Burst`] whole: offer its entries one by one (as `Continue` otherwise).
    OneByOne,
}

/// A log this session reads.
struct LogSource {
    audience: Audience,
    log: Arc<Log>,
    /// The log's wake-up round this session last parked in.
    parked_round: u64,
}

pub(crate) struct LiveSources {
    mailbox: Arc<Mailbox>,
    logs: Vec<LogSource>,
    /// `positions[i]`: the next position to read in `logs[i]` (kept apart so that the logs can stay
    /// borrowed while positions move).
    positions: Vec<u64>,
}

impl LiveSources {
    pub(crate) fn new(mailbox: Arc<Mailbox>, starts: Vec<LogStart>) -> LiveSources {
        // Sized exactly: most sessions read one log for their whole life.
        let (logs, positions) = (Vec::with_capacity(starts.len()), Vec::with_capacity(starts.len()));
        let mut sources = LiveSources { mailbox, logs, positions };
        for start in starts {
            sources.add(start);
        }
        sources
    }

    pub(crate) fn mailbox(&self) -> &Arc<Mailbox> {
        &self.mailbox
    }

    /// Reads one more log from its `position` on (a topic joined).
    pub(crate) fn add(&mut self, start: LogStart) {
        self.remove(&start.audience);
        self.logs.push(LogSource { audience: start.audience, log: start.log, parked_round: 0 });
        self.positions.push(start.position);
    }

    /// Stops reading the log of `audience` (a topic left).
    pub(crate) fn remove(&mut self, audience: &Audience) {
        if let Some(index) = self.logs.iter().position(|source| source.audience == *audience) {
            self.logs.swap_remove(index);
            self.positions.swap_remove(index);
        }
    }

    /// Visits, in stream order, every entry with a key up to `watermark`, each once, until `visit`
    /// says stop (the entry it stops at is consumed). Evictions and overflows come first. The rest
    /// of a broadcast burst that comes wholly before every other source's next entry is offered
    /// whole ([`Found::Burst`]); `visit` may take it, or ask for its entries one by one.
    pub(crate) fn pull(&mut self, watermark: u64, mut visit: impl FnMut(Found<'_>) -> Flow) {
        let mut inbox = self.mailbox.inbox();
        if inbox.take_overflow() && visit(Found::Overflowed) == Flow::Stop {
            return;
        }
        // Most sessions read one or two logs: no allocation per pull for them.
        let views: SmallVec<[LogView<'_>; 4]> = self.logs.iter().map(|source| source.log.view()).collect();
        for (view, position) in views.iter().zip(self.positions.iter_mut()) {
            if *position < view.first() {
                let gap = view.evicted_gap_from(*position);
                *position = view.first();
                if visit(Found::Evicted { last_evicted: view.last_evicted(), gap }) == Flow::Stop {
                    return;
                }
            }
        }
        loop {
            // The source whose next entry comes first, among those up to the watermark, and the
            // key before which it may be taken without passing another source's entry.
            let mut next: Option<(Option<usize>, u64)> = None;
            let mut bound = watermark.saturating_add(1);
            let mailbox_head = inbox.front().map(|entry| (None, entry.key()));
            let log_heads = views
                .iter()
                .enumerate()
                .filter_map(|(index, view)| view.get(self.positions[index]).map(|entry| (Some(index), entry.key())));
            for (source, key) in mailbox_head.into_iter().chain(log_heads) {
                match next {
                    _ if key > watermark => {}
                    Some((_, first)) if key >= first => bound = bound.min(key),
                    Some((_, first)) => {
                        bound = bound.min(first);
                        next = Some((source, key));
                    }
                    None => next = Some((source, key)),
                }
            }
            let flow = match next {
                None => return,
                Some((None, _)) => match inbox.pop() {
                    Some(entry) => visit(Found::Entry(&entry)),
                    None => return,
                },
                Some((Some(index), _)) => {
                    let position = &mut self.positions[index];
                    let Some(entry) = views[index].get(*position) else { return };
                    let whole = burst_rest(&views[index], *position, entry, bound)
                        .map(|(first, last, count)| (visit(Found::Burst { first, last, count }), count))
                        .filter(|(flow, _)| *flow != Flow::OneByOne);
                    match whole {
                        Some((flow, count)) => {
                            *position += count as u64;
                            flow
                        }
                        None => {
                            *position += 1;
                            visit(Found::Entry(entry))
                        }
                    }
                }
            };
            if flow == Flow::Stop {
                return;
            }
        }
    }

    /// Asks every log to wake the session at its next append (the mailbox wakes it anyway).
    pub(crate) fn park(&mut self) {
        for source in &mut self.logs {
            source.log.park(&self.mailbox, &mut source.parked_round);
        }
    }
}

/// The messages from `entry` (at `position`) to the end of its burst, when they are the log's next
/// entries and the last one's key is below `bound`: `(first, last, count)`.
fn burst_rest<'a>(
    view: &'a LogView<'_>,
    position: u64,
    entry: &'a Live,
    bound: u64,
) -> Option<(&'a Message, &'a Message, usize)> {
    let Live::Message(first) = entry else { return None };
    let (burst, index) = first.burst()?;
    let count = burst.len() - index;
    if count < 2 {
        return None;
    }
    // The burst's last message right where it would be if nothing else lies in between.
    let Some(Live::Message(last)) = view.get(position + count as u64 - 1) else { return None };
    let (last_burst, last_index) = last.burst()?;
    (Arc::ptr_eq(last_burst, burst) && last_index == burst.len() - 1 && last.seq < bound)
        .then_some((first, last, count))
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::delivery::log::LogLimits;
    use crate::delivery::message::Message;

    fn message(seq: u64, audience: Audience) -> Live {
        Live::Message(Arc::new(Message::new(seq, audience, "", "", "t", Bytes::from_static(b"x"))))
    }

    fn log(entries: usize) -> Arc<Log> {
        Arc::new(Log::new(LogLimits { entries, bytes: 1 << 20 }))
    }

    fn start(audience: Audience, log: &Arc<Log>) -> LogStart {
        LogStart { audience, log: log.clone(), position: log.end(), routed: 0 }
    }

    /// Keys visited (evictions as `E<last evicted>`, overflows as `O`), up to `watermark`.
    fn keys(sources: &mut LiveSources, watermark: u64) -> Vec<String> {
        let mut seen = Vec::new();
        sources.pull(watermark, |found| {
            seen.push(match found {
                Found::Entry(Live::Message(m)) => m.seq.to_string(),
                Found::Entry(Live::Gap { first, last, .. }) => format!("gap{first}-{last}"),
                Found::Burst { first, last, count } => format!("{}..{}({count})", first.seq, last.seq),
                Found::Evicted { last_evicted, .. } => format!("E{last_evicted}"),
                Found::Overflowed => "O".into(),
            });
            Flow::Continue
        });
        seen
    }

    #[test]
    fn merges_personal_and_broadcast_messages_in_stream_order_up_to_the_watermark() {
        let mailbox = Arc::new(Mailbox::new(1 << 20));
        let (all, news) = (log(100), log(100));
        let mut sources = LiveSources::new(
            mailbox.clone(),
            vec![start(Audience::All, &all), start(Audience::Topic("n".into()), &news)],
        );
        for seq in [2, 5, 9] {
            all.append(message(seq, Audience::All));
        }
        news.append(message(3, Audience::Topic("n".into())));
        news.append(Live::Gap { first: 6, last: 7, audience: Audience::Topic("n".into()), first_on_route: false });
        news.append(message(8, Audience::Topic("n".into())));
        for seq in [1, 4, 10] {
            let _ = mailbox.push(message(seq, Audience::User("u".into())));
        }
        assert_eq!(keys(&mut sources, 8), ["1", "2", "3", "4", "5", "gap6-7", "8"]);
        assert_eq!(keys(&mut sources, 10), ["9", "10"]);
        assert!(keys(&mut sources, 10).is_empty());
    }

    #[test]
    fn the_rest_of_a_burst_due_before_every_other_source_is_offered_whole() {
        let mailbox = Arc::new(Mailbox::new(1 << 20));
        let all = log(100);
        let mut sources = LiveSources::new(mailbox.clone(), vec![start(Audience::All, &all)]);
        let tie = |seqs: &[u64]| {
            let messages: Vec<Arc<Message>> =
                seqs.iter().map(|seq| Arc::new(Message::new(*seq, Audience::All, "", "", "t", Bytes::new()))).collect();
            crate::delivery::burst::Burst::tie(&messages.iter().collect::<Vec<_>>());
            for message in messages {
                all.append(Live::Message(message));
            }
        };
        tie(&[1, 2, 4, 5, 6, 7]);
        tie(&[8, 9]);
        let _ = mailbox.push(message(3, Audience::User("u".into())));
        // The personal 3 comes inside the first burst, and 7 is past the watermark: one by one.
        assert_eq!(keys(&mut sources, 6), ["1", "2", "3", "4", "5", "6"]);
        assert_eq!(keys(&mut sources, 9), ["7", "8..9(2)"]);
        tie(&[10, 11, 12]);
        // A visitor that wants them one by one gets each once.
        let mut seen = Vec::new();
        sources.pull(12, |found| match found {
            Found::Entry(entry) => {
                seen.push(entry.key());
                Flow::Continue
            }
            _ => Flow::OneByOne,
        });
        assert_eq!(seen, [10, 11, 12]);
    }

    #[test]
    fn a_session_that_fell_out_of_a_window_learns_what_was_evicted() {
        let mailbox = Arc::new(Mailbox::new(1 << 20));
        let all = log(2);
        let mut sources = LiveSources::new(mailbox, vec![start(Audience::All, &all)]);
        for seq in 1..=5 {
            all.append(message(seq, Audience::All));
        }
        assert_eq!(keys(&mut sources, 5), ["E3", "4", "5"]);
    }

    #[test]
    fn an_overflowed_mailbox_is_reported_first() {
        let mailbox = Arc::new(Mailbox::new(400));
        let mut sources = LiveSources::new(mailbox.clone(), Vec::new());
        // Two fit; the third overflows and is dropped with them; the fourth is queued again.
        for seq in 1..=4 {
            let _ = mailbox.push(message(seq, Audience::User("u".into())));
        }
        assert_eq!(keys(&mut sources, 4), ["O", "4"]);
    }

    #[test]
    fn stopping_consumes_only_the_entry_stopped_at() {
        let mailbox = Arc::new(Mailbox::new(1 << 20));
        let all = log(10);
        let mut sources = LiveSources::new(mailbox, vec![start(Audience::All, &all)]);
        for seq in 1..=3 {
            all.append(message(seq, Audience::All));
        }
        let mut first = Vec::new();
        sources.pull(3, |found| {
            if let Found::Entry(entry) = found {
                first.push(entry.key());
            }
            Flow::Stop
        });
        assert_eq!(first, [1]);
        assert_eq!(keys(&mut sources, 3), ["2", "3"]);
        sources.remove(&Audience::All);
        all.append(message(4, Audience::All));
        assert!(keys(&mut sources, 4).is_empty());
    }
}
