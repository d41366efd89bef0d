//! The count at the end: for every client, what it was owed (every acknowledged message addressed
//! to its user, to everyone, or to the topic it subscribes to) against what it received; the
//! faults; the gateways' memory; and a verdict.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::clients::{IncompleteReplay, Received};
use crate::faults::FaultRecord;
use crate::publisher::{Acked, Published, user_id};

/// Lost sequences listed per client (the rest are only counted).
const LOST_LISTED: usize = 20;

/// One client's count.
#[derive(Debug, Clone, Serialize)]
pub struct ClientReport {
    pub user: String,
    /// Whether it subscribes to the topic.
    pub topic: bool,
    /// Acknowledged messages addressed to it.
    pub expected: u64,
    /// Of those, the ones it received.
    pub delivered: u64,
    /// Of those, the ones it never received.
    pub lost: u64,
    /// `msg` frames whose `seq` it had received before.
    pub duplicated: u64,
    /// `msg` frames with a new `seq` lower than one received before.
    pub out_of_order: u64,
    /// Sequences it received that were not addressed to it (or never acknowledged).
    pub unexpected: u64,
    /// `msg` frames received in all.
    pub frames: u64,
    /// Connections that got a `welcome`.
    pub connects: u64,
    /// Connection attempts that failed.
    pub failed_connects: u64,
    /// How its connections ended, by close code (`abrupt`: no close frame).
    pub closes: BTreeMap<String, u64>,
    /// `replayed` frames with `complete:false`.
    pub incomplete_replays: Vec<IncompleteReplay>,
    /// Frames that were not the protocol's JSON.
    pub bad_frames: u64,
    /// The first lost sequences.
    pub first_lost: Vec<u64>,
    /// The gateway it was connected to at the end.
    pub gateway_at_end: Option<String>,
    /// The first anomalies, described.
    pub examples: Vec<String>,
}

impl ClientReport {
    /// Counts what user `user` (subscribed to the topic or not) received against `acked`, sorted
    /// by sequence.
    pub fn count(user: u32, topic: bool, received: Received, acked: &[Acked]) -> ClientReport {
        let (mut expected, mut delivered, mut first_lost) = (0, 0, Vec::new());
        for message in acked.iter().filter(|message| message.audience.reaches(user, topic)) {
            expected += 1;
            if received.seen.contains(message.seq) {
                delivered += 1;
            } else if first_lost.len() < LOST_LISTED {
                first_lost.push(message.seq);
            }
        }
        ClientReport {
            user: user_id(user),
            topic,
            expected,
            delivered,
            lost: expected - delivered,
            duplicated: received.duplicates,
            out_of_order: received.out_of_order,
            unexpected: received.seen.len() - delivered,
            frames: received.frames,
            connects: received.connects,
            failed_connects: received.failed_connects,
            closes: received.closes,
            incomplete_replays: received.incomplete_replays,
            bad_frames: received.bad_frames,
            first_lost,
            gateway_at_end: received.gateway,
            examples: received.examples,
        }
    }

    /// Whether it got exactly what it was owed, each once, in order.
    pub fn is_clean(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.out_of_order == 0 && self.unexpected == 0
    }
}

/// Every client's count, summed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub unexpected: u64,
    pub frames: u64,
    pub connects: u64,
    pub failed_connects: u64,
    pub incomplete_replays: u64,
    pub bad_frames: u64,
    pub closes: BTreeMap<String, u64>,
}

impl Totals {
    fn of(clients: &[ClientReport]) -> Totals {
        let mut totals = Totals::default();
        for client in clients {
            totals.expected += client.expected;
            totals.delivered += client.delivered;
            totals.lost += client.lost;
            totals.duplicated += client.duplicated;
            totals.out_of_order += client.out_of_order;
            totals.unexpected += client.unexpected;
            totals.frames += client.frames;
            totals.connects += client.connects;
            totals.failed_connects += client.failed_connects;
            totals.incomplete_replays += client.incomplete_replays.len() as u64;
            totals.bad_frames += client.bad_frames;
            for (how, count) in &client.closes {
                *totals.closes.entry(how.clone()).or_default() += count;
            }
        }
        totals
    }
}

/// One gateway's memory and restarts.
#[derive(Debug, Clone, Serialize)]
pub struct GatewayReport {
    pub name: String,
    pub addr: String,
    /// Times a fault stopped it (it was started again each time).
    pub restarts: u32,
    /// `VmRSS` after the warm-up, before the first fault, in bytes.
    pub rss_start: u64,
    /// `VmRSS` at the end, in bytes (of the process running then).
    pub rss_end: u64,
    /// Clients connected to it after the warm-up (its memory depends on them).
    pub clients_start: usize,
    /// Clients connected to it at the end.
    pub clients_end: usize,
}

impl GatewayReport {
    /// RSS growth from start to end, in percent.
    pub fn growth_percent(&self) -> f64 {
        if self.rss_start == 0 { 0.0 } else { 100.0 * (self.rss_end as f64 / self.rss_start as f64 - 1.0) }
    }
}

/// The run's settings, as reported.
#[derive(Debug, Clone, Serialize)]
pub struct RunSettings {
    pub messages: u64,
    pub duration_limit_s: Option<f64>,
    pub rate: f64,
    pub users: u32,
    pub gateways: u8,
    pub faults: Vec<String>,
    pub fault_interval_s: f64,
    pub fault_downtime_s: f64,
    pub seed: u64,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Nothing lost, duplicated, reordered or misdelivered.
    pub ok: bool,
    pub run_id: String,
    /// Wall-clock start, RFC 3339.
    pub started_at: String,
    pub settings: RunSettings,
    /// Seconds from start to the end of the count.
    pub duration_s: f64,
    /// Seconds clients took to receive everything after publishing ended (none: not within the
    /// timeout).
    pub catch_up_s: Option<f64>,
    pub published: Published,
    /// Messages the stream holds at the end (should equal the acknowledged ones).
    pub stored: Option<u64>,
    pub totals: Totals,
    pub faults: Vec<FaultRecord>,
    pub gateways: Vec<GatewayReport>,
    pub clients: Vec<ClientReport>,
    /// Where the logs are.
    pub out_dir: String,
}

impl Report {
    /// The verdict from the counts.
    pub fn judge(&mut self) {
        self.ok = self.clients.iter().all(ClientReport::is_clean);
    }

    /// The report as a table, for people.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut line = |text: String| {
            out.push_str(&text);
            out.push('\n');
        };
        line(format!("== herald-chaos {} (seed {}), {}", self.run_id, self.settings.seed, self.started_at));
        line(format!(
            "{} users, {} gateways, {} messages at {}/s, faults {} every {}s (down {}s)",
            self.settings.users,
            self.settings.gateways,
            self.settings.messages,
            self.settings.rate,
            self.settings.faults.join(","),
            self.settings.fault_interval_s,
            self.settings.fault_downtime_s
        ));
        line(String::new());
        line(format!(
            "{:<8} {:>5} {:>10} {:>10} {:>6} {:>6} {:>6} {:>6} {:>9} {:>10}  closes",
            "client", "topic", "expected", "delivered", "lost", "dup", "ooo", "unexp", "connects", "incomplete"
        ));
        for client in &self.clients {
            line(format!(
                "{:<8} {:>5} {:>10} {:>10} {:>6} {:>6} {:>6} {:>6} {:>9} {:>10}  {}",
                client.user,
                if client.topic { "yes" } else { "no" },
                client.expected,
                client.delivered,
                client.lost,
                client.duplicated,
                client.out_of_order,
                client.unexpected,
                client.connects,
                client.incomplete_replays.len(),
                closes(&client.closes)
            ));
        }
        let totals = &self.totals;
        line(format!(
            "{:<8} {:>5} {:>10} {:>10} {:>6} {:>6} {:>6} {:>6} {:>9} {:>10}  {}",
            "total",
            "",
            totals.expected,
            totals.delivered,
            totals.lost,
            totals.duplicated,
            totals.out_of_order,
            totals.unexpected,
            totals.connects,
            totals.incomplete_replays,
            closes(&totals.closes)
        ));
        for client in self.clients.iter().filter(|client| !client.is_clean() || client.bad_frames > 0) {
            line(format!(
                "  {}: first lost {:?}; at the end on {:?}",
                client.user, client.first_lost, client.gateway_at_end
            ));
            for example in &client.examples {
                line(format!("    {example}"));
            }
        }
        for client in &self.clients {
            for replay in &client.incomplete_replays {
                line(format!(
                    "  {}: replayed complete:false at {}s on {}: from {} to {}, {} messages",
                    client.user, replay.at, replay.gateway, replay.from, replay.to, replay.count
                ));
            }
        }
        line(String::new());
        let published = &self.published;
        line(format!(
            "published: {} acknowledged of {} sent ({} never acknowledged), stream holds {}; {} retried attempts, {} acknowledged as duplicates, {} after the duplicate window; {}s",
            published.acked,
            published.sent,
            published.unacked,
            self.stored.map_or("?".to_string(), |stored| stored.to_string()),
            published.retries,
            published.duplicate_acks,
            published.late,
            published.seconds
        ));
        for (error, count) in &published.errors {
            line(format!("  publish failures: {count} × {error}"));
        }
        line(String::new());
        line(format!(
            "{:<3} {:>8}  {:<16} {:<14} {:>8} {:>10}  problems",
            "#", "at (s)", "fault", "target", "undone", "whole"
        ));
        for fault in &self.faults {
            line(format!(
                "{:<3} {:>8.1}  {:<16} {:<14} {:>7.1}s {:>10}  {}",
                fault.number,
                fault.at,
                fault.kind.name(),
                fault.target,
                fault.undone_after,
                fault.recovered_after.map_or("NO".to_string(), |after| format!("{after:.1}s")),
                fault.problems.join("; ")
            ));
        }
        line(String::new());
        line(format!(
            "{:<8} {:<16} {:>8} {:>12} {:>12} {:>8}  clients",
            "gateway", "address", "restarts", "rss start", "rss end", "growth"
        ));
        for gateway in &self.gateways {
            line(format!(
                "{:<8} {:<16} {:>8} {:>12} {:>12} {:>+7.1}%  {} → {}",
                gateway.name,
                gateway.addr,
                gateway.restarts,
                mib(gateway.rss_start),
                mib(gateway.rss_end),
                gateway.growth_percent(),
                gateway.clients_start,
                gateway.clients_end
            ));
        }
        line(String::new());
        line(format!(
            "run: {}s (publishing {}s, catch-up {}); logs in {}",
            self.duration_s,
            published.seconds,
            self.catch_up_s.map_or("NOT within the timeout".to_string(), |s| format!("{s}s")),
            self.out_dir
        ));
        line(format!(
            "verdict: {} — {} lost, {} duplicated, {} out of order, {} unexpected; {} incomplete replays",
            if self.ok { "OK" } else { "FAILED" },
            totals.lost,
            totals.duplicated,
            totals.out_of_order,
            totals.unexpected,
            totals.incomplete_replays
        ));
        out
    }

    /// The totals as one line of JSON, for machines.
    pub fn summary(&self) -> serde_json::Value {
        let totals = &self.totals;
        let max_growth = self.gateways.iter().map(GatewayReport::growth_percent).fold(f64::MIN, f64::max);
        serde_json::json!({
            "ok": self.ok,
            "run_id": self.run_id,
            "seed": self.settings.seed,
            "messages": self.published.acked,
            "unacked": self.published.unacked,
            "stored": self.stored,
            "expected": totals.expected,
            "delivered": totals.delivered,
            "lost": totals.lost,
            "duplicated": totals.duplicated,
            "out_of_order": totals.out_of_order,
            "unexpected": totals.unexpected,
            "incomplete_replays": totals.incomplete_replays,
            "faults": self.faults.len(),
            "faults_not_recovered": self.faults.iter().filter(|fault| fault.recovered_after.is_none()).count(),
            "duration_s": self.duration_s,
            "publish_s": self.published.seconds,
            "catch_up_s": self.catch_up_s,
            "gateway_rss_growth_max_percent": crate::clock::tenths(max_growth),
        })
    }
}

/// The report of a run, from its parts.
pub struct Parts {
    pub run_id: String,
    pub started_at: String,
    pub settings: RunSettings,
    pub duration_s: f64,
    pub catch_up_s: Option<f64>,
    pub published: Published,
    pub stored: Option<u64>,
    pub faults: Vec<FaultRecord>,
    pub gateways: Vec<GatewayReport>,
    /// (user, subscribed, what it received) per client.
    pub received: Vec<(u32, bool, Received)>,
    pub out_dir: String,
}

impl From<Parts> for Report {
    fn from(mut parts: Parts) -> Report {
        let mut acked = std::mem::take(&mut parts.published.messages);
        acked.sort_unstable_by_key(|message| message.seq);
        let clients: Vec<ClientReport> = parts
            .received
            .into_iter()
            .map(|(user, topic, received)| ClientReport::count(user, topic, received, &acked))
            .collect();
        let mut report = Report {
            ok: false,
            run_id: parts.run_id,
            started_at: parts.started_at,
            settings: parts.settings,
            duration_s: parts.duration_s,
            catch_up_s: parts.catch_up_s,
            published: parts.published,
            stored: parts.stored,
            totals: Totals::of(&clients),
            faults: parts.faults,
            gateways: parts.gateways,
            clients,
            out_dir: parts.out_dir,
        };
        report.judge();
        report
    }
}

/// `1012×40 abrupt×12`.
fn closes(closes: &BTreeMap<String, u64>) -> String {
    closes.iter().map(|(how, count)| format!("{how}×{count}")).collect::<Vec<_>>().join(" ")
}

/// Bytes in MiB, one decimal.
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;
    use crate::publisher::Audience;

    #[test]
    fn a_client_is_owed_its_own_messages_everyones_and_its_topics() {
        let acked = [
            Acked { seq: 1, audience: Audience::User(0) },
            Acked { seq: 2, audience: Audience::User(1) },
            Acked { seq: 3, audience: Audience::All },
            Acked { seq: 4, audience: Audience::Topic },
            Acked { seq: 5, audience: Audience::User(0) },
        ];
        let clock = Clock::start();
        let mut received = Received::default();
        // 1 and 3 arrive, 3 twice; 5 never does; 2 (someone else's) does.
        for seq in [1, 3, 3, 2] {
            received.on_msg(seq, &clock);
        }
        let report = ClientReport::count(0, true, received, &acked);
        assert_eq!((report.expected, report.delivered, report.lost), (4, 2, 2));
        assert_eq!(report.first_lost, vec![4, 5]);
        assert_eq!((report.duplicated, report.out_of_order, report.unexpected), (1, 1, 1));
        assert!(!report.is_clean());

        let report = ClientReport::count(1, false, Received::default(), &acked);
        assert_eq!(report.expected, 2, "its own message and everyone's");
    }
}
