//! Running one function's calls: within its concurrency limit and timeout, counted, traced with
//! the message id, and as part of the runtime's tasks so shutdown can wait for them or drop them.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, Stream, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info_span, warn};

use crate::error::HandlerError;
use crate::metrics::{FunctionLabel, Metrics};

/// The runtime's tasks and the signals that stop them.
#[derive(Clone)]
pub(crate) struct Tasks {
    /// Every trigger loop and every call in flight.
    pub(crate) tracker: TaskTracker,
    /// Cancelled when shutdown starts: triggers stop taking work.
    pub(crate) shutdown: CancellationToken,
    /// Cancelled when work in flight is abandoned (grace elapsed, kill, drop).
    pub(crate) hard: CancellationToken,
}

impl Tasks {
    pub(crate) fn new() -> Tasks {
        Tasks { tracker: TaskTracker::new(), shutdown: CancellationToken::new(), hard: CancellationToken::new() }
    }
}

/// What one function's calls share: its limits, its counters, and the runtime's lifecycle.
pub(crate) struct Worker {
    name: String,
    label: FunctionLabel,
    permits: Arc<Semaphore>,
    timeout: Duration,
    metrics: Arc<Metrics>,
    tasks: Tasks,
}

impl Worker {
    pub(crate) fn new(
        name: &str,
        concurrency: usize,
        timeout: Duration,
        metrics: Arc<Metrics>,
        tasks: Tasks,
    ) -> Worker {
        let concurrency = concurrency.max(1);
        Worker {
            label: metrics.label(name),
            name: name.to_string(),
            permits: Arc::new(Semaphore::new(concurrency)),
            timeout,
            metrics,
            tasks,
        }
    }

    /// The function's name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub(crate) fn label(&self) -> &FunctionLabel {
        &self.label
    }

    /// Cancelled when shutdown starts.
    pub(crate) fn shutdown(&self) -> &CancellationToken {
        &self.tasks.shutdown
    }

    /// Permits to run calls: one, waited for, with every other one free now (split one off per
    /// call); `None` once shutdown started.
    pub(crate) async fn free_permits(&self) -> Option<OwnedSemaphorePermit> {
        let mut permits = tokio::select! {
            permit = self.permits.clone().acquire_owned() => permit.ok()?,
            _ = self.tasks.shutdown.cancelled() => return None,
        };
        let free = self.permits.available_permits() as u32;
        if let Ok(more) = self.permits.clone().try_acquire_many_owned(free) {
            permits.merge(more);
        }
        Some(permits)
    }

    /// Runs `task` as part of the runtime: waited for at shutdown, dropped when work is abandoned.
    pub(crate) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let hard = self.tasks.hard.clone();
        self.tasks.tracker.spawn(async move {
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
        if !stopped && worker.shutdown().is_cancelled() {
            source.stop_taking().await;
            stopped = true;
        }
        let permit = tokio::select! {
            permit = worker.permits.clone().acquire_owned() => permit,
            _ = worker.shutdown().cancelled(), if !stopped => continue,
        };
        let Ok(permit) = permit else { return };
        let item = tokio::select! {
            item = source.next() => item,
            _ = worker.shutdown().cancelled(), if !stopped => continue,
        };
        match item {
            Some(item) => dispatch(item, permit),
            None => return,
        }
    }
}
