//! Starting functions, running their calls within limits, and stopping: gracefully (stop taking
//! work, finish what is in flight within a grace period, drain NATS) or at once.

use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::service::{Service, ServiceExt};
use futures::{FutureExt, Stream, StreamExt};
use herald_shared::id::{IdError, check_function_name};
use herald_shared::subject;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};

use crate::config::Config;
use crate::durable::{self, Durable};
use crate::error::HandlerError;
use crate::events::{LIFECYCLE_SUBJECTS, serve_lifecycle};
use crate::function::{Function, Trigger};
use crate::metrics::{self, FunctionLabel, Metrics};
use crate::{rpc, streams};

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
    /// Cancelled when shutdown starts: triggers stop taking work.
    shutdown: CancellationToken,
    /// Cancelled when work in flight is abandoned (grace elapsed, kill, drop).
    hard: CancellationToken,
    /// Every trigger loop and every call in flight.
    tasks: TaskTracker,
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
        check_names(&functions)?;
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
            shutdown: CancellationToken::new(),
            hard: CancellationToken::new(),
            tasks: TaskTracker::new(),
            metrics_addr,
            grace: config.shutdown_grace,
        };
        tokio::spawn(metrics::serve(listener, metrics.clone(), runtime.hard.clone()));
        for function in functions {
            let worker = Arc::new(runtime.worker(&function, config, metrics.clone()));
            runtime.start_one(function, worker, config, &js).await?;
        }
        info!(metrics = %metrics_addr, "functions running");
        Ok(runtime)
    }

    fn worker(&self, function: &Function, config: &Config, metrics: Arc<Metrics>) -> Worker {
        let concurrency = function.concurrency.unwrap_or(config.concurrency).max(1);
        Worker {
            label: metrics.label(&function.name),
            name: function.name.clone(),
            permits: Arc::new(Semaphore::new(concurrency)),
            concurrency,
            timeout: function.timeout.unwrap_or(config.timeout),
            metrics,
            tasks: self.tasks.clone(),
            shutdown: self.shutdown.clone(),
            hard: self.hard.clone(),
        }
    }

    async fn start_one(
        &mut self,
        function: Function,
        worker: Arc<Worker>,
        config: &Config,
        js: &jetstream::Context,
    ) -> Result<(), StartError> {
        let nats = |e: async_nats::Error| StartError::Nats(format!("function {}: {e}", function.name));
        match function.trigger {
            Trigger::Rpc(handler) => {
                let endpoint = self.service(config).await?.endpoint(subject::function(&function.name)).await;
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
                let durable = Durable::new(js.clone(), config, &function.name, subjects, handler);
                let consumer = durable.consumer().await.map_err(StartError::Nats)?;
                worker.clone().spawn(durable::serve(durable, consumer, worker));
            }
        }
        Ok(())
    }

    /// The micro service the rpc functions are endpoints of, registered on first use.
    async fn service(&mut self, config: &Config) -> Result<&Service, StartError> {
        if self.service.is_none() {
            let service = self
                .client
                .service_builder()
                .description("Herald push functions")
                .queue_group(&config.queue_group)
                .start(&config.service_name, env!("CARGO_PKG_VERSION"))
                .await
                .map_err(|e| StartError::Nats(format!("micro service {}: {e}", config.service_name)))?;
            self.service = Some(service);
        }
        Ok(self.service.as_ref().expect("set above"))
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
        self.shutdown.cancel();
        if let Some(service) = self.service.take() {
            let _ = service.stop().await;
        }
        self.tasks.close();
        if tokio::time::timeout(self.grace, self.tasks.wait()).await.is_err() {
            warn!(grace = ?self.grace, "shutdown grace elapsed: abandoning calls in flight");
            self.hard.cancel();
            self.tasks.wait().await;
        }
        if tokio::time::timeout(Duration::from_secs(5), self.client.drain()).await.is_err() {
            warn!("NATS drain timed out");
        }
        info!("functions stopped");
    }

    /// Stops at once, like a crash: every call is abandoned, nothing is acknowledged or handed
    /// back; unacknowledged events are delivered again (to another copy) after `ack_wait`.
    pub async fn kill(mut self) {
        self.hard.cancel();
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        if let Some(service) = self.service.take() {
            let _ = service.stop().await;
        }
    }
}

impl Drop for Runtime {
    /// A runtime dropped without [`Runtime::shutdown`] stops at once, as with [`Runtime::kill`].
    fn drop(&mut self) {
        self.hard.cancel();
        self.shutdown.cancel();
    }
}

fn check_names(functions: &[Function]) -> Result<(), StartError> {
    let mut seen = HashSet::new();
    for function in functions {
        check_function_name(&function.name)
            .map_err(|error| StartError::BadName { name: function.name.clone(), error })?;
        if !seen.insert(function.name.as_str()) {
            return Err(StartError::Duplicate(function.name.clone()));
        }
    }
    Ok(())
}

/// What one function's calls share: its limits, its counters, and the runtime's lifecycle.
pub(crate) struct Worker {
    name: String,
    label: FunctionLabel,
    permits: Arc<Semaphore>,
    concurrency: usize,
    timeout: Duration,
    metrics: Arc<Metrics>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    hard: CancellationToken,
}

impl Worker {
    /// The function's name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The most calls run at once.
    pub(crate) fn concurrency(&self) -> usize {
        self.concurrency
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub(crate) fn label(&self) -> &FunctionLabel {
        &self.label
    }

    /// Cancelled when shutdown starts.
    pub(crate) fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// A permit to run one call, or `None` once shutdown started.
    pub(crate) async fn permit(&self) -> Option<OwnedSemaphorePermit> {
        tokio::select! {
            permit = self.permits.clone().acquire_owned() => permit.ok(),
            _ = self.shutdown.cancelled() => None,
        }
    }

    /// Runs `task` as part of the runtime: waited for at shutdown, dropped when work is abandoned.
    pub(crate) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let hard = self.hard.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = task => {}
                _ = hard.cancelled() => {}
            }
        });
    }

    /// Runs one call of the handler: counted, traced with the message id, bounded by the
    /// timeout; a panic is an error like any other.
    pub(crate) async fn call<T>(
        &self,
        id: &str,
        call: impl Future<Output = Result<T, HandlerError>>,
    ) -> Result<T, HandlerError> {
        self.metrics.calls.get_or_create(&self.label).inc();
        let _in_flight = InFlight::enter(&self.metrics, &self.label);
        let span = info_span!("function", function = %self.name, msg_id = %id);
        let guarded = AssertUnwindSafe(call).catch_unwind();
        let result = match tokio::time::timeout(self.timeout, guarded).instrument(span.clone()).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(HandlerError::transient("the handler panicked")),
            Err(_) => Err(HandlerError::transient(format!("timed out after {:?}", self.timeout))),
        };
        if let Err(error) = &result {
            self.metrics.errors.get_or_create(&self.label).inc();
            span.in_scope(|| warn!(%error, permanent = error.is_permanent(), "call failed"));
        }
        result
    }
}

/// Counts a call in flight until dropped (also when its task is abandoned).
struct InFlight(prometheus_client::metrics::gauge::Gauge);

impl InFlight {
    fn enter(metrics: &Metrics, label: &FunctionLabel) -> InFlight {
        let gauge = metrics.in_flight.get_or_create(label).clone();
        gauge.inc();
        InFlight(gauge)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A subscription a trigger takes work from.
pub(crate) trait Source: Stream + Unpin + Send {
    /// Stops new work from arriving (unsubscribes); what was already received can still be read.
    fn stop_taking(&mut self) -> impl Future<Output = ()> + Send;
}

/// Hands each item of `source` to `dispatch` with a permit, until the source ends. Once shutdown
/// starts, stops the source and still dispatches what it had already received.
pub(crate) async fn pump<S: Source>(
    worker: &Worker,
    mut source: S,
    mut dispatch: impl FnMut(S::Item, OwnedSemaphorePermit),
) {
    let mut stopped = false;
    loop {
        if !stopped && worker.shutdown.is_cancelled() {
            source.stop_taking().await;
            stopped = true;
        }
        let permit = tokio::select! {
            permit = worker.permits.clone().acquire_owned() => permit,
            _ = worker.shutdown.cancelled(), if !stopped => continue,
        };
        let Ok(permit) = permit else { return };
        let item = tokio::select! {
            item = source.next() => item,
            _ = worker.shutdown.cancelled(), if !stopped => continue,
        };
        match item {
            Some(item) => dispatch(item, permit),
            None => return,
        }
    }
}
