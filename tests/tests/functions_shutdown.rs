//! Push functions, shutdown: stop taking work, finish what is in flight, abandon what outlives the
//! grace period so another copy takes it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use herald_functions::{Event, Function, RpcReply, RpcRequest};
use herald_tests::functions::{WAIT, call, publish_event, start, test_config, wait_settled};
use herald_tests::{TestNats, eventually};
use serde_json::json;
use tokio::sync::Semaphore;

/// Counts entries into a handler and holds them until released.
#[derive(Clone)]
struct Gate {
    entered: Arc<AtomicUsize>,
    release: Arc<Semaphore>,
}

impl Gate {
    fn new() -> Gate {
        Gate { entered: Arc::new(AtomicUsize::new(0)), release: Arc::new(Semaphore::new(0)) }
    }

    async fn pass(&self) {
        self.entered.fetch_add(1, Ordering::SeqCst);
        let _ = self.release.acquire().await.map(|permit| permit.forget());
    }

    async fn wait_entered(&self, count: usize) {
        eventually(&format!("{count} handlers entered"), WAIT, || async {
            (self.entered.load(Ordering::SeqCst) >= count).then_some(())
        })
        .await;
    }
}

#[tokio::test]
async fn graceful_shutdown_finishes_calls_in_flight_and_takes_no_new_ones() {
    let nats = TestNats::start().await;
    let config = test_config(&nats);
    let gate = Gate::new();
    let functions = {
        let (rpc_gate, event_gate) = (gate.clone(), gate.clone());
        vec![
            Function::rpc("slow", move |_: RpcRequest| {
                let gate = rpc_gate.clone();
                async move {
                    gate.pass().await;
                    RpcReply::json(&"done")
                }
            }),
            Function::events("work", ["events.test.>"], move |_: Event| {
                let gate = event_gate.clone();
                async move {
                    gate.pass().await;
                    Ok(())
                }
            }),
        ]
    };
    let runtime = start(&nats, &config, functions).await;
    let js = nats.jetstream().await;
    let caller = nats.client().await;
    let in_flight_call = tokio::spawn(async move { call(&caller, "slow", Some("u"), json!({})).await });
    let event = publish_event(&js, "events.test.1", "{}").await;
    gate.wait_entered(2).await;

    let stopping = tokio::spawn(runtime.shutdown());
    let client = nats.client().await;
    eventually("new calls find nobody", WAIT, || async {
        let answer = client.request("herald.fn.slow", "{}".into()).await;
        matches!(answer, Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders).then_some(())
    })
    .await;

    gate.release.add_permits(2);
    assert_eq!(in_flight_call.await.unwrap().body, json!("done"), "the call in flight was answered");
    stopping.await.unwrap();
    // The event in flight was acknowledged before the connection was drained.
    wait_settled(&js, &config.events_stream, "work", event).await;
}

#[tokio::test]
async fn calls_outliving_the_grace_are_abandoned_and_their_events_handled_elsewhere() {
    let nats = TestNats::start().await;
    let mut config = test_config(&nats);
    config.shutdown_grace = Duration::from_millis(100);
    config.ack_wait = Duration::from_secs(1);
    let stuck = Gate::new();
    let hanging = {
        let gate = stuck.clone();
        Function::events("work", ["events.test.>"], move |_: Event| {
            let gate = gate.clone();
            async move {
                gate.pass().await;
                Ok(())
            }
        })
    };
    let runtime = start(&nats, &config, vec![hanging]).await;
    let js = nats.jetstream().await;
    let event = publish_event(&js, "events.test.1", "{}").await;
    stuck.wait_entered(1).await;
    runtime.shutdown().await;

    let attempts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let recording = {
        let attempts = attempts.clone();
        Function::events("work", ["events.test.>"], move |event: Event| {
            attempts.lock().unwrap().push(event.attempt);
            async { Ok(()) }
        })
    };
    let other = start(&nats, &config, vec![recording]).await;
    wait_settled(&js, &config.events_stream, "work", event).await;
    assert_eq!(*attempts.lock().unwrap(), [2], "delivered again, once, to the other copy");
    other.shutdown().await;
}

/// A busy copy pulls no event it cannot start: the others wait in the stream, where another copy
/// takes them at their first delivery, even while the busy copy stops with its calls still running.
#[tokio::test]
async fn events_a_busy_copy_cannot_start_wait_in_the_stream_for_another_copy() {
    let nats = TestNats::start().await;
    let mut config = test_config(&nats);
    // An event this copy kept would come back only after an hour.
    config.ack_wait = Duration::from_secs(3600);
    let js = nats.jetstream().await;
    let busy = Gate::new();
    let started_first: Arc<std::sync::Mutex<Vec<u64>>> = Arc::default();
    let holding = {
        let (gate, started) = (busy.clone(), started_first.clone());
        Function::events("work", ["events.test.>"], move |event: Event| {
            let (gate, started) = (gate.clone(), started.clone());
            async move {
                started.lock().unwrap().push(event.stream_sequence.unwrap());
                gate.pass().await;
                Ok(())
            }
        })
        .concurrency(2)
        .timeout(Duration::from_secs(3600))
    };
    let first = start(&nats, &config, vec![holding]).await;
    let mut sequences = Vec::new();
    for n in 0..4 {
        sequences.push(publish_event(&js, &format!("events.test.{n}"), "{}").await);
    }
    busy.wait_entered(2).await;

    let stopping = tokio::spawn(first.shutdown());
    let handled_second: Arc<std::sync::Mutex<Vec<(u64, u64)>>> = Arc::default();
    let recording = {
        let handled = handled_second.clone();
        Function::events("work", ["events.test.>"], move |event: Event| {
            handled.lock().unwrap().push((event.stream_sequence.unwrap(), event.attempt));
            async { Ok(()) }
        })
    };
    let second = start(&nats, &config, vec![recording]).await;
    // The first copy's calls are still running, and the waiting events are already done elsewhere.
    eventually("the second copy handled two events", WAIT, || async {
        (handled_second.lock().unwrap().len() == 2).then_some(())
    })
    .await;
    assert_eq!(busy.entered.load(Ordering::SeqCst), 2);
    let mut handled = handled_second.lock().unwrap().clone();
    handled.sort();
    let started = started_first.lock().unwrap().clone();
    let waiting: Vec<(u64, u64)> = sequences.iter().filter(|seq| !started.contains(seq)).map(|seq| (*seq, 1)).collect();
    assert_eq!(handled, waiting, "the two waiting events, each on its first delivery");

    busy.release.add_permits(2);
    stopping.await.unwrap();
    wait_settled(&js, &config.events_stream, "work", sequences[3]).await;
    assert_eq!(handled_second.lock().unwrap().len(), 2, "nothing handled twice");
    second.shutdown().await;
}
