//! A function: a name, a trigger, a handler, and its limits.

use std::sync::Arc;
use std::time::Duration;

use crate::events::EventHandler;
use crate::rpc::RpcHandler;

/// What makes a function run.
#[derive(Clone)]
pub(crate) enum Trigger {
    /// Request/reply on `herald.fn.<name>`.
    Rpc(Arc<dyn RpcHandler>),
    /// Gateway lifecycle events, core NATS, at most once.
    Lifecycle(Arc<dyn EventHandler>),
    /// Business events captured by the events stream, through a shared durable consumer, at
    /// least once.
    Durable { subjects: Vec<String>, handler: Arc<dyn EventHandler> },
}

/// A push function, ready to be started by [`crate::Runtime::start`].
///
/// ```
/// use herald_functions::{Function, RpcReply, RpcRequest};
///
/// let echo = Function::rpc("echo", |request: RpcRequest| async move { Ok(RpcReply::bytes(request.body)) })
///     .concurrency(4);
/// assert_eq!(echo.name(), "echo");
/// ```
#[derive(Clone)]
pub struct Function {
    pub(crate) name: String,
    pub(crate) trigger: Trigger,
    /// `None`: the runtime's default.
    pub(crate) concurrency: Option<usize>,
    /// `None`: the runtime's default.
    pub(crate) timeout: Option<Duration>,
}

impl Function {
    /// A function answering requests on `herald.fn.<name>`.
    pub fn rpc(name: impl Into<String>, handler: impl RpcHandler) -> Function {
        Function::new(name, Trigger::Rpc(Arc::new(handler)))
    }

    /// A function told of every socket opened and closed on any gateway.
    pub fn lifecycle(name: impl Into<String>, handler: impl EventHandler) -> Function {
        Function::new(name, Trigger::Lifecycle(Arc::new(handler)))
    }

    /// A function consuming the business events on `subjects` (inside the events stream's
    /// subjects) at least once, with retries and a dead-letter subject.
    pub fn events<S: Into<String>>(
        name: impl Into<String>,
        subjects: impl IntoIterator<Item = S>,
        handler: impl EventHandler,
    ) -> Function {
        let subjects = subjects.into_iter().map(Into::into).collect();
        Function::new(name, Trigger::Durable { subjects, handler: Arc::new(handler) })
    }

    fn new(name: impl Into<String>, trigger: Trigger) -> Function {
        Function { name: name.into(), trigger, concurrency: None, timeout: None }
    }

    /// Runs at most `limit` calls at once in this process (at least 1).
    pub fn concurrency(mut self, limit: usize) -> Function {
        self.concurrency = Some(limit.max(1));
        self
    }

    /// Fails a call running longer than `timeout`.
    pub fn timeout(mut self, timeout: Duration) -> Function {
        self.timeout = Some(timeout);
        self
    }

    /// The function's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}
