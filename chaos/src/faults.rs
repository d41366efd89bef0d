//! The fault schedule: one fault at a time, each undone after a while (a killed process or node
//! restarted, a partition healed), then a wait until the cluster and every gateway are whole again,
//! then a calm interval before the next. Kinds come in a seeded order, every kind once per round;
//! victims are chosen with the same seed.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::clock::{Clock, tenths};
use crate::cluster::Cluster;
use crate::gateways::Gateways;

/// What can go wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// SIGKILL a gateway; start it again after the downtime.
    GatewayKill,
    /// Rolling restart: SIGTERM each gateway in turn (close 1012, graceful exit), start it again,
    /// wait until it is ready, then the next.
    GatewayRestart,
    /// SIGKILL a NATS node (`docker kill`); start it again after the downtime.
    NatsKill,
    /// SIGKILL the node leading the stream; start it again after the downtime.
    LeaderKill,
    /// Cut the NATS node holding a gateway's delivery connection off from the others (`docker
    /// network disconnect`); reconnect it after the downtime. Its clients still reach it.
    Partition,
}

impl FaultKind {
    /// Every kind.
    pub const ALL: [FaultKind; 5] = [
        FaultKind::GatewayKill,
        FaultKind::GatewayRestart,
        FaultKind::NatsKill,
        FaultKind::LeaderKill,
        FaultKind::Partition,
    ];

    /// The name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::GatewayKill => "gateway-kill",
            FaultKind::GatewayRestart => "gateway-restart",
            FaultKind::NatsKill => "nats-kill",
            FaultKind::LeaderKill => "leader-kill",
            FaultKind::Partition => "partition",
        }
    }
}

/// The schedule's settings.
#[derive(Debug, Clone)]
pub struct FaultPlan {
    /// Kinds to inject (in a seeded order, each once per round).
    pub kinds: Vec<FaultKind>,
    /// Calm time before the first fault and after each recovery.
    pub interval: Duration,
    /// How long a killed process or node stays down, and how long a partition lasts.
    pub downtime: Duration,
    /// Most faults (none: until publishing ends).
    pub max: Option<usize>,
    /// How long the cluster and the gateways may take to be whole again after a fault.
    pub recovery_timeout: Duration,
    /// Seeds the order and the victims.
    pub seed: u64,
}

/// One fault, as it happened.
#[derive(Debug, Clone, Serialize)]
pub struct FaultRecord {
    /// 1, 2, … in order.
    pub number: usize,
    pub kind: FaultKind,
    /// The gateway(s) or node hit.
    pub target: String,
    /// When it was injected, in seconds into the run.
    pub at: f64,
    /// Seconds from the injection until it was undone (restarted, reconnected).
    pub undone_after: f64,
    /// Seconds from the injection until the cluster and every gateway were whole again; none if
    /// they were not within the recovery timeout.
    pub recovered_after: Option<f64>,
    /// What went wrong while injecting or undoing it, or what was still broken at the timeout.
    pub problems: Vec<String>,
}

/// Runs the schedule until `stop` is cancelled (a fault under way is finished and recovered
/// first), `plan.max` faults were injected, or the system did not recover from one. `current`
/// names the fault under way, for progress lines.
pub async fn run(
    plan: &FaultPlan,
    cluster: &Cluster,
    gateways: &mut Gateways,
    admin: &async_nats::Client,
    clock: Clock,
    stop: &CancellationToken,
    current: Arc<Mutex<Option<String>>>,
) -> Vec<FaultRecord> {
    let mut chaos = Chaos { plan, cluster, gateways, admin, rng: StdRng::seed_from_u64(plan.seed ^ 0xfa17) };
    let mut order = Vec::new();
    let mut records = Vec::new();
    while !plan.kinds.is_empty() && plan.max.is_none_or(|max| records.len() < max) {
        tokio::select! {
            _ = tokio::time::sleep(plan.interval) => {}
            _ = stop.cancelled() => break,
        }
        if order.is_empty() {
            order = plan.kinds.clone();
            order.shuffle(&mut chaos.rng);
        }
        let kind = order.remove(0);
        let record = chaos.inject(kind, records.len() + 1, clock, &current).await;
        *current.lock().unwrap() = None;
        let recovered = record.recovered_after.is_some();
        records.push(record);
        if !recovered {
            eprintln!("[{:7.1}s] no more faults: the system did not recover from the last one", clock.secs());
            break;
        }
    }
    records
}

/// The schedule's state.
struct Chaos<'a> {
    plan: &'a FaultPlan,
    cluster: &'a Cluster,
    gateways: &'a mut Gateways,
    admin: &'a async_nats::Client,
    rng: StdRng,
}

impl Chaos<'_> {
    /// Injects fault `kind`, undoes it, waits for recovery, and says what happened.
    async fn inject(
        &mut self,
        kind: FaultKind,
        number: usize,
        clock: Clock,
        current: &Mutex<Option<String>>,
    ) -> FaultRecord {
        let target = self.choose_target(kind).await;
        let at = clock.secs();
        let started = Instant::now();
        eprintln!("[{at:7.1}s] fault {number}: {} {target}", kind.name());
        *current.lock().unwrap() = Some(format!("{} {target}", kind.name()));
        let mut problems = Vec::new();
        if let Err(error) = self.perform(kind, &target).await {
            eprintln!("[{:7.1}s]   {error:#}", clock.secs());
            problems.push(format!("{error:#}"));
        }
        let undone_after = tenths(started.elapsed().as_secs_f64());
        let recovered_after = match self.wait_whole().await {
            Ok(()) => Some(tenths(started.elapsed().as_secs_f64())),
            Err(still) => {
                problems.extend(still);
                None
            }
        };
        match recovered_after {
            Some(after) => {
                eprintln!("[{:7.1}s]   undone after {undone_after}s, whole again after {after}s", clock.secs())
            }
            None => eprintln!(
                "[{:7.1}s]   NOT whole again after {:?}: {problems:?}",
                clock.secs(),
                self.plan.recovery_timeout
            ),
        }
        FaultRecord { number, kind, target, at, undone_after, recovered_after, problems }
    }

    /// The gateway(s) or node the fault hits.
    async fn choose_target(&mut self, kind: FaultKind) -> String {
        let gateways = self.gateways.list();
        let nodes = self.cluster.nodes();
        match kind {
            FaultKind::GatewayKill => gateways[self.rng.random_range(0..gateways.len())].name.clone(),
            FaultKind::GatewayRestart => {
                gateways.iter().map(|gateway| gateway.name.clone()).collect::<Vec<_>>().join(",")
            }
            FaultKind::NatsKill => nodes[self.rng.random_range(0..nodes.len())].name.clone(),
            FaultKind::Partition => {
                let gateway = &gateways[self.rng.random_range(0..gateways.len())].name;
                let feed = format!("herald-gateway {gateway} delivery");
                match self.cluster.node_of_connection(&feed).await {
                    Some(node) => node,
                    None => {
                        eprintln!(
                            "herald-chaos: no node holds {gateway}'s delivery connection; cutting one off at random"
                        );
                        nodes[self.rng.random_range(0..nodes.len())].name.clone()
                    }
                }
            }
            FaultKind::LeaderKill => match self.cluster.stream_leader(self.admin).await {
                Ok(Some(leader)) => leader,
                other => {
                    eprintln!("herald-chaos: no stream leader to kill ({other:?}); killing a node at random");
                    nodes[self.rng.random_range(0..nodes.len())].name.clone()
                }
            },
        }
    }

    /// Injects the fault on `target` and undoes it.
    async fn perform(&mut self, kind: FaultKind, target: &str) -> Result<()> {
        let downtime = self.plan.downtime;
        match kind {
            FaultKind::GatewayKill => {
                let index = self.gateway_index(target)?;
                self.gateways.kill(index).await?;
                tokio::time::sleep(downtime).await;
                self.gateways.launch(index).await
            }
            FaultKind::GatewayRestart => self.rolling_restart().await,
            FaultKind::NatsKill | FaultKind::LeaderKill => {
                self.cluster.kill(target).await?;
                tokio::time::sleep(downtime).await;
                self.cluster.restart(target).await
            }
            FaultKind::Partition => {
                self.cluster.isolate(target).await?;
                tokio::time::sleep(downtime).await;
                self.cluster.rejoin(target).await
            }
        }
    }

    /// SIGTERM and start again each gateway in turn; a gateway that does not stop cleanly is
    /// reported, and the restart goes on.
    async fn rolling_restart(&mut self) -> Result<()> {
        let mut failures = Vec::new();
        for index in 0..self.gateways.list().len() {
            if let Err(error) = self.gateways.terminate(index).await {
                failures.push(format!("{error:#}"));
            }
            self.gateways.launch(index).await?;
        }
        match failures.is_empty() {
            true => Ok(()),
            false => anyhow::bail!(failures.join("; ")),
        }
    }

    fn gateway_index(&self, name: &str) -> Result<usize> {
        self.gateways
            .list()
            .iter()
            .position(|gateway| gateway.name == name)
            .with_context(|| format!("no gateway {name}"))
    }

    /// Waits until the cluster and every gateway are whole; what is still wrong at the timeout.
    async fn wait_whole(&self) -> Result<(), Vec<String>> {
        let deadline = tokio::time::Instant::now() + self.plan.recovery_timeout;
        loop {
            let mut problems = self.cluster.problems(self.admin).await;
            problems.extend(self.gateways.problems().await);
            if problems.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(problems);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}
