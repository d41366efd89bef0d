//! The gateway's counters, exported in the Prometheus / OpenMetrics text format at `/metrics`.
//! Counters and gauges are atomics: updating them on the hot path takes no lock.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::close::CloseCode;

/// Labels of per-function rpc counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RpcLabels {
    pub(crate) function: String,
    pub(crate) outcome: String,
}

/// Labels of refused connections: the HTTP status and the `error` of the JSON body.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RefusalLabels {
    pub(crate) status: u16,
    pub(crate) reason: &'static str,
}

/// Labels of closed connections: the close code the gateway chose, or `client`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CloseLabels {
    pub(crate) code: String,
}

/// The refusals docs/operations.md lists, by status and `error`.
const REFUSALS: [(u16, &str); 9] = [
    (400, "bad_request"),
    (401, "unauthorized"),
    (403, "forbidden"),
    (403, "forbidden_origin"),
    (409, "conflict"),
    (426, "upgrade_required"),
    (429, "too_many_connections"),
    (503, "too_many_connections"),
    (503, "unavailable"),
];

pub(crate) struct Metrics {
    pub(crate) connections: Gauge,
    pub(crate) users: Gauge,
    pub(crate) subscriptions: Gauge,
    pub(crate) messages_in: Counter,
    pub(crate) messages_out: Counter,
    pub(crate) bytes_out: Counter,
    pub(crate) replays: Counter,
    pub(crate) replayed_messages: Counter,
    pub(crate) replays_incomplete: Counter,
    pub(crate) replays_reopened: Counter,
    pub(crate) slow_consumer_closes: Counter,
    pub(crate) delivery_gaps: Counter,
    pub(crate) repairs: Counter,
    pub(crate) unrepairable_gaps: Counter,
    pub(crate) losses_assumed: Counter,
    pub(crate) nats_connected: Gauge,
    pub(crate) buckets_recreated: Counter,
    pub(crate) streams_replaced: Counter,
    pub(crate) read_flush_failures: Counter,
    pub(crate) rpc_calls: Family<RpcLabels, Counter>,
    pub(crate) connections_refused: Family<RefusalLabels, Counter>,
    pub(crate) connections_closed: Family<CloseLabels, Counter>,
    registry: Registry,
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let mut registry = Registry::with_prefix("herald_gateway");
        let metrics = Metrics {
            connections: Gauge::default(),
            users: Gauge::default(),
            subscriptions: Gauge::default(),
            messages_in: Counter::default(),
            messages_out: Counter::default(),
            bytes_out: Counter::default(),
            replays: Counter::default(),
            replayed_messages: Counter::default(),
            replays_incomplete: Counter::default(),
            replays_reopened: Counter::default(),
            slow_consumer_closes: Counter::default(),
            delivery_gaps: Counter::default(),
            repairs: Counter::default(),
            unrepairable_gaps: Counter::default(),
            losses_assumed: Counter::default(),
            nats_connected: Gauge::default(),
            buckets_recreated: Counter::default(),
            streams_replaced: Counter::default(),
            read_flush_failures: Counter::default(),
            rpc_calls: Family::default(),
            connections_refused: Family::default(),
            connections_closed: Family::default(),
            registry: Registry::default(),
        };
        let m = &metrics;
        registry.register("connections", "Open connections, whatever their protocol", m.connections.clone());
        registry.register("users", "Users with at least one open connection", m.users.clone());
        registry.register("subscriptions", "NATS delivery subscriptions (users, topics, all)", m.subscriptions.clone());
        registry.register("messages_in", "Messages received from the stream's republish", m.messages_in.clone());
        registry.register("messages_out", "msg frames queued to sockets, live", m.messages_out.clone());
        registry.register("bytes_out", "Bytes of live msg frames queued to sockets", m.bytes_out.clone());
        registry.register("replays", "Replays run (resume, topic since, repair)", m.replays.clone());
        registry.register("replayed_messages", "Messages sent by replays", m.replayed_messages.clone());
        registry.register("replays_incomplete", "Replays that reported complete=false", m.replays_incomplete.clone());
        registry.register(
            "replays_reopened",
            "Replays the stream failed for a moment, opened again where they stopped",
            m.replays_reopened.clone(),
        );
        registry.register("slow_consumer_closes", "Connections closed with 4008", m.slow_consumer_closes.clone());
        registry.register("delivery_gaps", "Gaps seen on delivery subjects", m.delivery_gaps.clone());
        registry.register("repairs", "Sessions repaired from the stream after a gap", m.repairs.clone());
        registry.register(
            "unrepairable_gaps",
            "Sessions closed with 4008 because a gap was behind newer messages",
            m.unrepairable_gaps.clone(),
        );
        registry.register(
            "losses_assumed",
            "Unrepairable gaps the stream's leader could not tell about for 30 s: the loss was assumed",
            m.losses_assumed.clone(),
        );
        registry.register("nats_connected", "1 while connected to NATS", m.nats_connected.clone());
        registry.register(
            "kv_buckets_recreated",
            "Times KV buckets this gateway had seen were found lost and made anew",
            m.buckets_recreated.clone(),
        );
        registry.register(
            "streams_replaced",
            "Times the stream HERALD was found made again under a running gateway (its sessions ended)",
            m.streams_replaced.clone(),
        );
        registry.register(
            "read_flush_failures",
            "Flushes of clients' read positions KV did not take (NATS away, no leader): tried again at the next",
            m.read_flush_failures.clone(),
        );
        registry.register("rpc_calls", "rpc frames by function and outcome", m.rpc_calls.clone());
        registry.register(
            "connections_refused",
            "Connections refused before the upgrade (or the stream), by status and reason",
            m.connections_refused.clone(),
        );
        registry.register(
            "connections_closed",
            "Connections ended, by the close code the gateway chose (client: the client closed)",
            m.connections_closed.clone(),
        );
        // Every documented refusal and close from the start, at 0: an alert on one sees a series,
        // not "no data".
        for (status, reason) in REFUSALS {
            let _ = metrics.connections_refused.get_or_create(&RefusalLabels { status, reason });
        }
        for code in CloseCode::CHOSEN.into_iter().chain([CloseCode::Echo(1000)]) {
            let _ = metrics.connections_closed.get_or_create(&CloseLabels { code: code.label() });
        }
        Metrics { registry, ..metrics }
    }

    /// The text exposition of every metric.
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
