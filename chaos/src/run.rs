//! One run, phase by phase: the cluster, the gateways, the clients; publishing while the fault
//! schedule runs; the wait for clients to catch up; the count.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use async_nats::jetstream;
use herald_tests::nats::Role;
use tokio_util::sync::CancellationToken;

use crate::cli::Options;
use crate::clients::Client;
use crate::clock::{Clock, tenths, wall_now};
use crate::cluster::Cluster;
use crate::faults::{self, FaultPlan, FaultRecord};
use crate::gateways::{GatewaySetup, Gateways};
use crate::publisher::{Acked, PublishPlan, PublishStats, Published, Publishing};
use crate::report::{GatewayReport, Parts, Report, RunSettings};

/// Publishing before the gateways' memory is first measured (and before the schedule starts).
const WARM_UP: Duration = Duration::from_secs(10);
/// How often a progress line is printed.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// How long every client may take to open its first connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

/// What every phase needs to know.
struct Run {
    options: Options,
    seed: u64,
    run_id: String,
    out_dir: PathBuf,
    clock: Clock,
    started_at: String,
}

/// Runs everything `options` asks for and counts.
pub async fn run(options: Options) -> Result<Report> {
    options.validate()?;
    if !herald_tests::nats::docker_available() {
        bail!("no Docker daemon answers: the chaos run needs Docker for its NATS cluster");
    }
    let seed = options.seed.unwrap_or_else(|| std::time::UNIX_EPOCH.elapsed().map_or(1, |t| t.as_secs()));
    let run_id = format!("herald-chaos-{}", std::process::id());
    let out_dir =
        options.out_dir.clone().unwrap_or_else(|| herald_tests::workspace_root().join("target/chaos").join(&run_id));
    std::fs::create_dir_all(&out_dir).with_context(|| format!("create {}", out_dir.display()))?;
    let run = Run { options, seed, run_id, out_dir, clock: Clock::start(), started_at: wall_now() };
    eprintln!("herald-chaos: run {} with seed {}; logs in {}", run.run_id, run.seed, run.out_dir.display());

    let given = run.options.gateway_bin.clone();
    let binary = tokio::task::spawn_blocking(move || crate::gateways::binary(given.as_deref())).await??;
    eprintln!("[{:7.1}s] starting {} NATS nodes", run.clock.secs(), crate::cluster::NODES);
    let cluster = Cluster::start(&run.run_id, &run.out_dir).await?;
    let result = run.on_cluster(&cluster, binary).await;
    cluster.save_logs(&run.out_dir).await;
    result
}

impl Run {
    /// Everything after the cluster is up.
    async fn on_cluster(&self, cluster: &Cluster, binary: PathBuf) -> Result<Report> {
        let admin = cluster.connect(Role::Admin, "herald-chaos admin").await?;
        let mut gateways = self.start_gateways(cluster, binary).await?;
        let clients = self.start_clients(&gateways).await?;
        let (faults, published, at_start) = self.publish_under_faults(cluster, &admin, &mut gateways, &clients).await?;
        eprintln!(
            "[{:7.1}s] {} messages acknowledged; waiting for clients to catch up",
            self.clock.secs(),
            published.acked
        );
        let catch_up_s = catch_up(&clients, &published.messages, self.options.catch_up_timeout).await;
        let gateways_report = gateway_reports(&gateways, &at_start, &Load::now(&gateways, &clients));
        let stored = stored_messages(cluster, &admin).await;
        let received = clients.into_iter().map(|client| (client.user, client.subscribed, client.stop())).collect();
        drop(gateways);
        Ok(Report::from(Parts {
            run_id: self.run_id.clone(),
            started_at: self.started_at.clone(),
            settings: self.settings(),
            duration_s: self.clock.secs(),
            catch_up_s,
            published,
            stored,
            faults,
            gateways: gateways_report,
            received,
            out_dir: self.out_dir.display().to_string(),
        }))
    }

    /// Publishes the plan while the fault schedule runs: first a warm-up, after which the gateways'
    /// memory and clients are counted, then faults until publishing ends. Returns the faults, what
    /// was published, and the gateways' load after the warm-up.
    async fn publish_under_faults(
        &self,
        cluster: &Cluster,
        admin: &async_nats::Client,
        gateways: &mut Gateways,
        clients: &[Client],
    ) -> Result<(Vec<FaultRecord>, Published, Load)> {
        let publisher = cluster.connect(Role::Publisher, "herald-chaos publisher").await?;
        let publishing = Publishing::start(jetstream::new(publisher), self.publish_plan());
        let current_fault = Arc::new(Mutex::new(None));
        let progress = Progress { clock: self.clock, stats: publishing.stats(), clients, fault: &current_fault };
        progress.until(|| publishing.is_done(), Some(WARM_UP)).await;
        let at_start = Load::now(gateways, clients);
        let stop = CancellationToken::new();
        let plan = self.fault_plan();
        let (faults, published) = tokio::join!(
            faults::run(&plan, cluster, gateways, admin, self.clock, &stop, current_fault.clone()),
            async {
                progress.until(|| publishing.is_done(), None).await;
                stop.cancel();
                eprintln!("[{:7.1}s] publishing ended; the fault under way, if any, finishes", self.clock.secs());
                publishing.finish(self.options.recovery_timeout).await
            }
        );
        Ok((faults, published, at_start))
    }

    /// Starts the gateways on every node of `cluster`.
    async fn start_gateways(&self, cluster: &Cluster, binary: PathBuf) -> Result<Gateways> {
        eprintln!("[{:7.1}s] starting {} gateways", self.clock.secs(), self.options.gateways);
        let setup = GatewaySetup {
            binary,
            nats_url: cluster.url(),
            log_dir: self.out_dir.clone(),
            log_filter: self.options.gateway_log.clone(),
        };
        Gateways::start(setup, usize::from(self.options.gateways)).await
    }

    /// Starts one client per user (every other one subscribed to the topic), spread over the
    /// gateways, and waits until each has connected.
    async fn start_clients(&self, gateways: &Gateways) -> Result<Vec<Client>> {
        let urls = Arc::new(gateways.list().iter().map(|gateway| gateway.ws_url()).collect::<Vec<_>>());
        let clients: Vec<Client> = (0..self.options.users)
            .map(|user| Client::spawn(user, user % 2 == 0, urls.clone(), self.seed, self.clock))
            .collect();
        wait_connected(&clients).await?;
        eprintln!("[{:7.1}s] {} clients connected; publishing", self.clock.secs(), clients.len());
        Ok(clients)
    }

    fn publish_plan(&self) -> PublishPlan {
        let options = &self.options;
        PublishPlan {
            messages: options.messages,
            duration: options.duration,
            rate: options.rate,
            in_flight: options.in_flight,
            users: options.users,
            all_share: options.all_share,
            topic_share: options.topic_share,
            seed: self.seed,
            run_id: format!("{}-{}", self.run_id, self.seed),
        }
    }

    fn fault_plan(&self) -> FaultPlan {
        let options = &self.options;
        FaultPlan {
            kinds: options.faults.clone(),
            interval: options.fault_interval,
            downtime: options.fault_downtime,
            max: options.max_faults,
            recovery_timeout: options.recovery_timeout,
            seed: self.seed,
        }
    }

    fn settings(&self) -> RunSettings {
        let options = &self.options;
        RunSettings {
            messages: options.messages,
            duration_limit_s: options.duration.map(|duration| duration.as_secs_f64()),
            rate: options.rate,
            users: options.users,
            gateways: options.gateways,
            faults: options.faults.iter().map(|kind| kind.name().to_string()).collect(),
            fault_interval_s: options.fault_interval.as_secs_f64(),
            fault_downtime_s: options.fault_downtime.as_secs_f64(),
            seed: self.seed,
        }
    }
}

/// Each gateway's memory and clients at one moment.
struct Load {
    rss: Vec<u64>,
    clients: Vec<usize>,
}

impl Load {
    fn now(gateways: &Gateways, clients: &[Client]) -> Load {
        let on =
            |name: &str| clients.iter().filter(|client| client.received().gateway.as_deref() == Some(name)).count();
        Load { rss: gateways.rss(), clients: gateways.list().iter().map(|gateway| on(&gateway.name)).collect() }
    }
}

/// Each gateway's load at the start and at the end, and its restarts.
fn gateway_reports(gateways: &Gateways, start: &Load, end: &Load) -> Vec<GatewayReport> {
    let mut reports = Vec::new();
    for (index, gateway) in gateways.list().iter().enumerate() {
        reports.push(GatewayReport {
            name: gateway.name.clone(),
            addr: gateway.addr.to_string(),
            restarts: gateway.restarts,
            rss_start: start.rss[index],
            rss_end: end.rss[index],
            clients_start: start.clients[index],
            clients_end: end.clients[index],
        });
    }
    reports
}

/// How many messages the stream holds, if it says.
async fn stored_messages(cluster: &Cluster, admin: &async_nats::Client) -> Option<u64> {
    match cluster.stream_info(admin).await {
        Ok(info) => info["state"]["messages"].as_u64(),
        Err(error) => {
            eprintln!("herald-chaos: {error:#}");
            None
        }
    }
}

/// Waits until every client has had its first `welcome`.
async fn wait_connected(clients: &[Client]) -> Result<()> {
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    loop {
        let waiting = clients.iter().filter(|client| client.received().connects == 0).count();
        if waiting == 0 {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{waiting} clients not connected after {CONNECT_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every client has received every message owed to it; the seconds that took, or
/// none after `timeout` (naming the clients still missing messages).
async fn catch_up(clients: &[Client], acked: &[Acked], timeout: Duration) -> Option<f64> {
    let started = Instant::now();
    let mut owed: Vec<Vec<u64>> = clients
        .iter()
        .map(|client| {
            let addressed = acked.iter().filter(|message| message.audience.reaches(client.user, client.subscribed));
            addressed.map(|message| message.seq).collect()
        })
        .collect();
    loop {
        for (client, owed) in clients.iter().zip(&mut owed) {
            let received = client.received();
            owed.retain(|seq| !received.seen.contains(*seq));
        }
        if owed.iter().all(Vec::is_empty) {
            return Some(tenths(started.elapsed().as_secs_f64()));
        }
        if started.elapsed() > timeout {
            for (client, owed) in clients.iter().zip(&owed).filter(|(_, owed)| !owed.is_empty()) {
                let received = client.received();
                let silent = received.last_frame.map(|at| tenths(at.elapsed().as_secs_f64()));
                eprintln!(
                    "herald-chaos: u{} still misses {} messages (first {}) after {timeout:?}; on {:?}, last frame {silent:?}s ago",
                    client.user,
                    owed.len(),
                    owed.iter().min().unwrap_or(&0),
                    received.gateway,
                );
            }
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Progress lines on standard error while publishing runs.
struct Progress<'a> {
    clock: Clock,
    stats: Arc<PublishStats>,
    clients: &'a [Client],
    fault: &'a Mutex<Option<String>>,
}

impl Progress<'_> {
    /// Prints a line every [`PROGRESS_EVERY`] until `done` or `limit` has passed.
    async fn until(&self, done: impl Fn() -> bool, limit: Option<Duration>) {
        let started = tokio::time::Instant::now();
        let mut next_line = started + PROGRESS_EVERY;
        while !done() && limit.is_none_or(|limit| started.elapsed() < limit) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if tokio::time::Instant::now() >= next_line {
                next_line += PROGRESS_EVERY;
                eprintln!("{}", self.line());
            }
        }
    }

    fn line(&self) -> String {
        use std::sync::atomic::Ordering::Relaxed;
        let stats = &self.stats;
        let mut frames = 0;
        let mut per_gateway = std::collections::BTreeMap::<String, usize>::new();
        for client in self.clients {
            let received = client.received();
            frames += received.frames;
            *per_gateway.entry(received.gateway.clone().unwrap_or_else(|| "none".into())).or_default() += 1;
        }
        let per_gateway: Vec<String> = per_gateway.iter().map(|(gateway, n)| format!("{gateway}:{n}")).collect();
        let fault = self.fault.lock().unwrap().clone().unwrap_or_else(|| "-".into());
        format!(
            "[{:7.1}s] sent {} acked {} retries {} | received {frames} | clients on {} | fault: {fault}",
            self.clock.secs(),
            stats.sent.load(Relaxed),
            stats.acked.load(Relaxed),
            stats.retries.load(Relaxed),
            per_gateway.join(" ")
        )
    }
}
