//! Starting functions and stopping them: gracefully (stop taking work, finish what is in flight
//! within a grace period, drain NATS) or at once.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::service::Service;
use herald_shared::id::{IdError, check_function_name};
use herald_shared::subject;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::durable::{self, Durable};
use crate::events::{LIFECYCLE_SUBJECTS, serve_lifecycle};
use crate::function::{Function, Trigger};
use crate::metrics::{self, Metrics};
use crate::worker::{Tasks, Worker};
use crate::{rpc, service, streams, unreadable};

/// The runtime could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A function name that breaks the function-name rule.
    #[error("function {name:?}: {error}")]
    BadName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        error: IdError,
    },
    /// Two functions with one name.
    #[error("function {0:?} is defined twice")]
    Duplicate(String),
    /// NATS refused something the functions need (a stream, a consumer, a subscription).
    #[error("NATS: {0}")]
    Nats(String),
    /// The metrics listener could not bind.
    #[error("cannot listen on {addr}: {error}")]
    Listen {
        /// The configured address.
        addr: SocketAddr,
        /// Why.
        error: std::io::Error,
    },
    /// A setting that cannot work (an unknown built-in, a bad relay URL or header).
    #[error("configuration: {0}")]
    Config(String),
}

/// Running functions.
pub struct Runtime {
    client: async_nats::Client,
    service: Option<Service>,
    /// Every trigger loop and call in flight, and the signals that stop them.
    tasks: Tasks,
    /// The durable functions started, whose consumers are swept for [`unreadable`] events.
    durables: Vec<(Arc<Durable>, Arc<Worker>)>,
    /// Cancelled when the NATS client stopped for good.
    client_lost: CancellationToken,
    metrics_addr: SocketAddr,
    grace: Duration,
}

impl Runtime {
    /// Starts `functions` on `client` (a connection of their own: shutdown drains it), with the
    /// limits, streams and metrics listener of `config`.
    pub async fn start(
        client: async_nats::Client,
        config: &Config,
        functions: Vec<Function>,
    ) -> Result<Runtime, StartError> {
        check_functions(&functions, &config.events_subjects)?;
        let js = jetstream::new(client.clone());
        if functions.iter().any(|f| matches!(f.trigger, Trigger::Durable { .. })) {
            streams::ensure_events(&js, config).await?;
        }
        let (listener, metrics_addr) = metrics::bind(config.metrics_listen)
            .await
            .map_err(|error| StartError::Listen { addr: config.metrics_listen, error })?;
        let metrics = Arc::new(Metrics::new());
        let mut runtime = Runtime {
            client: client.clone(),
            service: None,
            tasks: Tasks::new(),
            durables: Vec::new(),
            client_lost: CancellationToken::new(),
            metrics_addr,
            grace: config.shutdown_grace,
        };
        tokio::spawn(metrics::serve(listener, metrics.clone(), runtime.tasks.hard.clone()));
        let lost = runtime.client_lost.clone();
        let shutdown = runtime.tasks.shutdown.clone();
        runtime.tasks.tracker.spawn(watch_client(client.clone(), metrics.clone(), lost, shutdown));
        runtime.service = Some(service::register(&client, config, &functions, metrics.clone()).await?);
        let mut consumers = Vec::new();
        for function in functions {
            let worker = Arc::new(runtime.worker(&function, config, metrics.clone()));
            consumers.extend(runtime.start_one(function, worker, config, &js).await?);
        }
        if !runtime.durables.is_empty() {
            // Before the first pull: an event that cut the last copy off NATS may be due again.
            if let Err(error) = unreadable::sweep_all(&runtime.durables, true).await {
                warn!(%error, "cannot look for events the NATS client cannot take before consuming");
            }
            let durables = runtime.durables.clone();
            let shutdown = runtime.tasks.shutdown.clone();
            let ack_wait = config.ack_wait.max(Duration::from_secs(1));
            let lost = runtime.client_lost.clone();
            runtime.tasks.tracker.spawn(unreadable::watch(client.clone(), durables, ack_wait, shutdown, lost));
        }
        for (durable, consumer, worker) in consumers {
            worker.clone().spawn(durable::serve(durable, consumer, worker));
        }
        info!(metrics = %metrics_addr, "functions running");
        Ok(runtime)
    }

    fn worker(&self, function: &Function, config: &Config, metrics: Arc<Metrics>) -> Worker {
        let concurrency = function.concurrency.unwrap_or(config.concurrency);
        let timeout = function.timeout.unwrap_or(config.timeout);
        Worker::new(&function.name, concurrency, timeout, metrics, self.tasks.clone())
    }

    async fn start_one(
        &mut self,
        function: Function,
        worker: Arc<Worker>,
        config: &Config,
        js: &jetstream::Context,
    ) -> Result<Option<DurableStart>, StartError> {
        let nats = |e: async_nats::Error| StartError::Nats(format!("function {}: {e}", function.name));
        match function.trigger {
            Trigger::Rpc(handler) => {
                let service = self.service.as_ref().ok_or_else(|| StartError::Nats("no micro service".into()))?;
                let mut metadata = HashMap::new();
                metadata.insert("function".to_string(), function.name.clone());
                let endpoint =
                    service.endpoint_builder().metadata(metadata).add(subject::function(&function.name)).await;
                worker.clone().spawn(rpc::serve(endpoint.map_err(nats)?, worker, handler));
            }
            Trigger::Lifecycle(handler) => {
                let group = format!("{}.{}", config.queue_group, function.name);
                for subject in LIFECYCLE_SUBJECTS {
                    let subscriber = self.client.queue_subscribe(subject, group.clone()).await;
                    let subscriber = subscriber.map_err(|e| nats(e.into()))?;
                    worker.clone().spawn(serve_lifecycle(subscriber, worker.clone(), handler.clone()));
                }
            }
            Trigger::Durable { subjects, handler } => {
                let durable = Arc::new(Durable::new(js.clone(), config, &function.name, subjects, handler));
                let consumer = durable.consumer().await.map_err(StartError::Nats)?;
                self.durables.push((durable.clone(), worker.clone()));
                return Ok(Some((durable, consumer, worker)));
            }
        }
        Ok(None)
    }

    /// Resolves when the NATS client stopped for good (its connection task ended, as when async-nats
    /// panics on a message it cannot parse): the functions can do nothing more, and `/healthz` says
    /// so. The binary exits then, for its supervisor to start it again.
    pub async fn nats_client_lost(&self) {
        self.client_lost.cancelled().await
    }

    /// Where `GET /metrics` is served.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// Stops gracefully: no new calls (rpc and lifecycle subscriptions end, so the queue groups
    /// send work to other copies; no more durable events are pulled), the calls in flight finish
    /// within the grace period (those still running after it are abandoned: their events are
    /// delivered again elsewhere), then the NATS connection is drained.
    pub async fn shutdown(mut self) {
        self.tasks.shutdown.cancel();
        if let Some(service) = self.service.take() {
            let _ = service.stop().await;
        }
        self.tasks.tracker.close();
        if tokio::time::timeout(self.grace, self.tasks.tracker.wait()).await.is_err() {
            warn!(grace = ?self.grace, "shutdown grace elapsed: abandoning calls in flight");
            self.tasks.hard.cancel();
            self.tasks.tracker.wait().await;
        }
        // drain() only starts draining: first make sure the server has processed every
        // acknowledgement, reply and unsubscription sent so far.
        let drained = async {
            round_trip(&self.client).await?;
            self.client.drain().await.map_err(|e| e.to_string())
        };
        match tokio::time::timeout(Duration::from_secs(5), drained).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => warn!(%error, "NATS drain failed"),
            Err(_) => warn!("NATS drain timed out"),
        }
        info!("functions stopped");
    }

    /// Stops at once, like a crash: every call is abandoned, nothing is acknowledged or handed
    /// back; unacknowledged events are delivered again (to another copy) after `ack_wait`.
    pub async fn kill(mut self) {
        self.tasks.hard.cancel();
        self.tasks.shutdown.cancel();
        self.tasks.tracker.close();
        self.tasks.tracker.wait().await;
        if let Some(service) = self.service.take() {
            let _ = service.stop().await;
        }
    }
}

impl Drop for Runtime {
    /// A runtime dropped without [`Runtime::shutdown`] stops at once, as with [`Runtime::kill`].
    fn drop(&mut self) {
        self.tasks.hard.cancel();
        self.tasks.shutdown.cancel();
    }
}

/// A durable function whose consumer exists, to be served once the runtime has started.
type DurableStart = (Arc<Durable>, async_nats::jetstream::consumer::PullConsumer, Arc<Worker>);

/// How often the NATS client is checked for being alive.
const CLIENT_CHECK_EVERY: Duration = Duration::from_secs(2);

/// Watches that the NATS client still runs until `shutdown`: when its connection task is gone, no
/// command reaches it any more (a flush cannot even be sent), while a client that is only
/// disconnected takes the flush and answers later.
async fn watch_client(
    client: async_nats::Client,
    metrics: Arc<Metrics>,
    lost: CancellationToken,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(CLIENT_CHECK_EVERY) => {}
            _ = shutdown.cancelled() => return,
        }
        let flushed = tokio::time::timeout(CLIENT_CHECK_EVERY, client.flush()).await;
        if let Ok(Err(error)) = flushed
            && error.kind() == async_nats::client::FlushErrorKind::SendError
            && !shutdown.is_cancelled()
        {
            error!(%error, "the NATS client stopped for good (it panicked, was drained, or ran out of reconnects): the functions can do nothing more");
            metrics.nats_client_lost.store(true, std::sync::atomic::Ordering::Relaxed);
            lost.cancel();
            return;
        }
    }
}

/// Waits until the server has processed everything this connection sent so far: it handles a
/// connection's messages in order, so the answer to a request it answers itself (`$JS.API.INFO`)
/// comes back only after all of them. (Not a message to our own inbox: the functions' NATS user
/// may not publish there.)
async fn round_trip(client: &async_nats::Client) -> Result<(), String> {
    async_nats::jetstream::new(client.clone()).query_account().await.map(|_| ()).map_err(|e| e.to_string())
}

/// Refuses bad or repeated names, durable functions without subjects (they would consume the
/// whole events stream), and durable functions with subjects outside `events_subjects`: their
/// consumer is shared by every copy, so one copy started with such subjects would move its filter
/// off the events the others consume, and the events stored meanwhile would be skipped for good.
fn check_functions(functions: &[Function], events_subjects: &[String]) -> Result<(), StartError> {
    if events_subjects.is_empty() && functions.iter().any(|f| matches!(f.trigger, Trigger::Durable { .. })) {
        return Err(StartError::Config("events_subjects is empty: durable functions would get no events".into()));
    }
    let mut seen = HashSet::new();
    for function in functions {
        check_function_name(&function.name)
            .map_err(|error| StartError::BadName { name: function.name.clone(), error })?;
        if !seen.insert(function.name.as_str()) {
            return Err(StartError::Duplicate(function.name.clone()));
        }
        if matches!(&function.trigger, Trigger::Durable { subjects, .. } if subjects.is_empty()) {
            return Err(StartError::Config(format!("function {:?} consumes no subjects", function.name)));
        }
        if let Trigger::Durable { subjects, .. } = &function.trigger
            && let Some(outside) = subjects.iter().find(|s| !events_subjects.iter().any(|e| subject_within(s, e)))
        {
            return Err(StartError::Config(format!(
                "function {:?} consumes {outside:?}, outside events_subjects {events_subjects:?}",
                function.name
            )));
        }
    }
    Ok(())
}

/// Whether every subject `inner` matches (a NATS subject, with `*` and `>` wildcards) `outer`
/// matches too.
fn subject_within(inner: &str, outer: &str) -> bool {
    let (mut inner, mut outer) = (inner.split('.'), outer.split('.'));
    loop {
        match (inner.next(), outer.next()) {
            (None, None) => return true,
            (Some(_), Some(">")) => return true,
            (Some(">"), _) | (Some(_), None) | (None, Some(_)) => return false,
            (Some(token), Some(pattern)) if pattern == "*" || token == pattern => {
                if token == "*" && pattern != "*" {
                    return false;
                }
            }
            (Some(_), Some(_)) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Event, RpcReply, RpcRequest};

    fn rpc(name: &str) -> Function {
        Function::rpc(name, |_: RpcRequest| async { RpcReply::json(&()) })
    }

    #[test]
    fn bad_names_repeats_and_subjectless_events_are_refused() {
        assert!(check_functions(&[rpc("prefs.get"), rpc("prefs.set")], &events()).is_ok());
        for bad in ["", "a.*", "a..b", "a b", ">"] {
            assert!(matches!(check_functions(&[rpc(bad)], &events()), Err(StartError::BadName { .. })), "{bad:?}");
        }
        assert!(matches!(check_functions(&[rpc("x"), rpc("x")], &events()), Err(StartError::Duplicate(_))));
        let nothing = Function::events("e", Vec::<String>::new(), |_: Event| async { Ok(()) });
        assert!(matches!(check_functions(&[nothing], &events()), Err(StartError::Config(_))));
    }

    fn events() -> Vec<String> {
        vec!["events.>".into()]
    }

    fn consuming(subject: &str) -> Function {
        Function::events("notify", vec![subject.to_string()], |_: Event| async { Ok(()) })
    }

    #[test]
    fn durable_functions_must_consume_inside_the_events_subjects() {
        assert!(check_functions(&[consuming("events.notify.>")], &events()).is_ok());
        let refused = |subject: &str, events: &[String]| {
            matches!(check_functions(&[consuming(subject)], events), Err(StartError::Config(_)))
        };
        assert!(refused("other.>", &events()));
        assert!(refused("events.notify.>", &[]), "no events subjects at all");
        assert!(check_functions(&[rpc("x")], &[]).is_ok(), "no durable function: nothing to check");
    }

    #[test]
    fn a_subject_is_within_another_when_it_matches_nothing_more() {
        for (inner, outer) in [("events.a", "events.>"), ("events.*.b", "events.>"), ("a.b", "a.*"), ("a.*", "a.*")] {
            assert!(subject_within(inner, outer), "{inner} in {outer}");
        }
        for (inner, outer) in [("events", "events.>"), ("events.>", "events.*"), ("a.*", "a.b"), ("a.b.c", "a.*")] {
            assert!(!subject_within(inner, outer), "{inner} not in {outer}");
        }
        assert!(subject_within("events.>", "events.>") && !subject_within("other.>", "events.>"));
    }
}
