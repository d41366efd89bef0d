//! Per-function counters in the Prometheus / OpenMetrics text format, served at `GET /metrics`
//! (and `GET /healthz`) by a small HTTP listener.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// The label of every counter: the function's name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct FunctionLabel {
    pub(crate) function: String,
}

/// The runtime's counters, labelled by function.
pub(crate) struct Metrics {
    /// Handler runs started (rpc calls, event deliveries).
    pub(crate) calls: Family<FunctionLabel, Counter>,
    /// Handler runs that failed (error, timeout, panic).
    pub(crate) errors: Family<FunctionLabel, Counter>,
    /// Durable events handed back for another delivery after a failure.
    pub(crate) retries: Family<FunctionLabel, Counter>,
    /// Durable events given up on and published to `herald.dlq.<function>`.
    pub(crate) dead_letters: Family<FunctionLabel, Counter>,
    /// Handler runs in progress.
    pub(crate) in_flight: Family<FunctionLabel, Gauge>,
    /// The NATS client stopped for good (its connection task ended): `/healthz` fails.
    pub(crate) nats_client_lost: std::sync::atomic::AtomicBool,
    registry: Registry,
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let metrics = Metrics {
            calls: Family::default(),
            errors: Family::default(),
            retries: Family::default(),
            dead_letters: Family::default(),
            in_flight: Family::default(),
            nats_client_lost: std::sync::atomic::AtomicBool::new(false),
            registry: Registry::default(),
        };
        let mut registry = Registry::with_prefix("herald_functions");
        registry.register("calls", "Handler runs started", metrics.calls.clone());
        registry.register("errors", "Handler runs that failed (error, timeout, panic)", metrics.errors.clone());
        registry.register("retries", "Events handed back for a later delivery", metrics.retries.clone());
        registry.register("dead_letters", "Events published to herald.dlq.<function>", metrics.dead_letters.clone());
        registry.register("in_flight", "Handler runs in progress", metrics.in_flight.clone());
        Metrics { registry, ..metrics }
    }

    /// The counters' label for `function`; its series are exported (at 0) from now on.
    pub(crate) fn label(&self, function: &str) -> FunctionLabel {
        let label = FunctionLabel { function: function.to_string() };
        for family in [&self.calls, &self.errors, &self.retries, &self.dead_letters] {
            let _ = family.get_or_create(&label);
        }
        let _ = self.in_flight.get_or_create(&label);
        label
    }

    /// The text exposition of every metric.
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Binds the metrics listener.
pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// Serves `/metrics` and `/healthz` until `shutdown` is cancelled.
pub(crate) async fn serve(listener: TcpListener, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    debug!(%error, "metrics listener: accept failed");
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let metrics = metrics.clone();
        let service = hyper::service::service_fn(move |request| {
            let metrics = metrics.clone();
            async move { Ok::<_, Infallible>(route(&request, &metrics)) }
        });
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            if let Err(error) = connection.await {
                debug!(%error, "metrics connection ended with an error");
            }
        });
    }
}

fn route(request: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    // HEAD is GET without the body (hyper leaves it out), for probes.
    let method = if request.method() == Method::HEAD { &Method::GET } else { request.method() };
    let (status, content_type, body) = match (method, request.uri().path()) {
        (&Method::GET, "/metrics") => {
            (StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", metrics.render())
        }
        (&Method::GET, "/healthz") if metrics.nats_client_lost.load(std::sync::atomic::Ordering::Relaxed) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "application/json",
            r#"{"ok":false,"reason":"the NATS client stopped for good: restart this process"}"#.to_string(),
        ),
        (&Method::GET, "/healthz") => (StatusCode::OK, "application/json", r#"{"ok":true}"#.to_string()),
        _ => (StatusCode::NOT_FOUND, "application/json", r#"{"error":"not_found"}"#.to_string()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}
