//! The command line: one subcommand per scenario, `all` for the whole comparison, and `raw-server`
//! (the bare broadcaster, started by the tool itself).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use clap::{Args, Parser, Subcommand};

use crate::limits;
use crate::raw::RawOptions;
use crate::report::Report;
use crate::scenarios::fanout::{self, FanoutOptions};
use crate::scenarios::idle::{self, IdleOptions};
use crate::scenarios::replay::{self, ReplayOptions};
use crate::scenarios::storm::{self, StormOptions};
use crate::scenarios::unicast::{self, UnicastOptions};
use crate::scenarios::{Context, secs};
use crate::targets::{TargetKind, Tools};

/// Load tool for Herald: measures the gateway side by side with nats-server's own WebSocket
/// listener (nats-ws) and a bare broadcaster (raw), each started fresh as separate processes.
#[derive(Debug, Parser)]
#[command(version)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
    /// Worker threads of this tool's runtime (default: one per CPU).
    #[arg(long, global = true)]
    pub threads: Option<usize>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Every scenario on every target: <out-dir>/<scenario>.json and <out-dir>/summary.md.
    All(AllArgs),
    /// Memory per idle connection.
    Idle(One<IdleOptions>),
    /// Max sustained push.all deliveries per second.
    Fanout(One<FanoutOptions>),
    /// Publish→receive latency of messages to single users, at fractions of a maximum.
    Unicast(One<UnicastOptions>),
    /// Clients connecting at once, then resuming at once.
    Storm(One<StormOptions>),
    /// One client catching up on many stored messages.
    Replay(One<ReplayOptions>),
    /// The bare broadcaster (started by the tool for the `raw` target).
    RawServer(RawOptions),
}

/// Settings every scenario shares.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Targets, comma-separated.
    #[arg(long, value_delimiter = ',', default_values = ["herald", "nats-ws", "raw"])]
    pub targets: Vec<TargetKind>,
    /// Herald's protocols to compare, comma-separated, in place of --targets: `--protocol json,stomp`
    /// runs the targets `herald,herald-stomp`.
    #[arg(long = "protocol", value_delimiter = ',', value_name = "LIST", conflicts_with = "targets")]
    pub protocols: Vec<WireProtocol>,
    /// Size of every published payload in bytes.
    #[arg(long, default_value_t = 100)]
    pub payload_bytes: usize,
    /// Loopback source addresses to spread client sockets over (default: one per 20,000 sockets).
    #[arg(long)]
    pub sources: Option<usize>,
    /// Directory of the JSON reports and the processes' logs.
    #[arg(long, default_value = "target/bench")]
    pub out_dir: PathBuf,
    /// The herald-gateway binary (default: next to this tool's binary).
    #[arg(long)]
    pub gateway_bin: Option<PathBuf>,
    /// The nats-server binary (default: .tools/bin/nats-server of the workspace).
    #[arg(long)]
    pub nats_server: Option<PathBuf>,
    /// HERALD_LOG of the gateway (its default `info` logs every connection).
    #[arg(long, default_value = "warn")]
    pub gateway_log: String,
    /// Extra environment of the gateway, KEY=VALUE (repeatable), e.g. HERALD_OUTBOUND_QUEUE_BYTES=4194304.
    #[arg(long = "gateway-env", value_parser = key_value)]
    pub gateway_env: Vec<(String, String)>,
    /// Extra argument of the raw server (repeatable), e.g. --raw-arg=--ring-entries=16384.
    #[arg(long = "raw-arg", allow_hyphen_values = true)]
    pub raw_args: Vec<String>,
    /// Seconds a client may take to connect and get its welcome.
    #[arg(long, default_value_t = 30.0)]
    pub connect_timeout_secs: f64,
}

/// A protocol the gateway speaks, for `--protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WireProtocol {
    /// Herald's own JSON protocol at /ws.
    Json,
    /// STOMP 1.2 at /stomp.
    Stomp,
    /// The Centrifugal protocol (JSON) at /connection/websocket.
    Centrifugal,
    /// Socket.IO (WebSocket transport) at /socket.io/.
    Socketio,
    /// STOMP 1.2 over SockJS's WebSocket transport at /stomp/<server>/<session>/websocket.
    Sockjs,
    /// Server-Sent Events at /sse.
    Sse,
}

impl WireProtocol {
    /// The target whose clients speak this protocol.
    pub fn target(self) -> TargetKind {
        match self {
            WireProtocol::Json => TargetKind::Herald,
            WireProtocol::Stomp => TargetKind::HeraldStomp,
            WireProtocol::Centrifugal => TargetKind::HeraldCentrifugal,
            WireProtocol::Socketio => TargetKind::HeraldSocketio,
            WireProtocol::Sockjs => TargetKind::HeraldSockjs,
            WireProtocol::Sse => TargetKind::HeraldSse,
        }
    }
}

impl Common {
    /// The targets to run: those of `--protocol` when given, else `--targets`.
    fn chosen_targets(&self) -> Vec<TargetKind> {
        match self.protocols.as_slice() {
            [] => self.targets.clone(),
            protocols => protocols.iter().map(|protocol| protocol.target()).collect(),
        }
    }
}

/// One scenario.
#[derive(Debug, Clone, Args)]
pub struct One<T: Args> {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    options: T,
    /// Where to write the JSON report (default: <out-dir>/<scenario>.json).
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The whole comparison.
#[derive(Debug, Clone, Args)]
pub struct AllArgs {
    #[command(flatten)]
    common: Common,
    /// Scenarios to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_values = ["idle", "fanout", "unicast", "storm", "replay"])]
    scenarios: Vec<String>,
    #[command(flatten)]
    idle: IdleOptions,
    #[command(flatten)]
    fanout: FanoutOptions,
    #[command(flatten)]
    unicast: UnicastOptions,
    #[command(flatten)]
    storm: StormOptions,
    #[command(flatten)]
    replay: ReplayOptions,
}

/// Runs a scenario command; returns whether every target ran without error.
pub async fn run(command: Command) -> Result<bool> {
    match command {
        Command::All(args) => all(args).await,
        Command::Idle(one) => {
            single(&one.common, one.json, "idle", async |ctx| idle::run(ctx, &one.options).await).await
        }
        Command::Fanout(one) => {
            single(&one.common, one.json, "fanout", async |ctx| fanout::run(ctx, &one.options).await).await
        }
        Command::Unicast(one) => {
            single(&one.common, one.json, "unicast", async |ctx| unicast::run(ctx, &one.options).await).await
        }
        Command::Storm(one) => {
            single(&one.common, one.json, "storm", async |ctx| storm::run(ctx, &one.options).await).await
        }
        Command::Replay(one) => {
            single(&one.common, one.json, "replay", async |ctx| replay::run(ctx, &one.options).await).await
        }
        Command::RawServer(_) => bail!("raw-server runs on its own runtime"),
    }
}

async fn single(
    common: &Common,
    json: Option<PathBuf>,
    scenario: &str,
    body: impl AsyncFnOnce(&Context) -> Report,
) -> Result<bool> {
    let ctx = context(common)?;
    let report = body(&ctx).await;
    let json = json.unwrap_or_else(|| common.out_dir.join(format!("{scenario}.json")));
    emit(&report, &json)?;
    Ok(report.ok)
}

async fn all(args: AllArgs) -> Result<bool> {
    let ctx = context(&args.common)?;
    let wants = |name: &str| args.scenarios.iter().any(|s| s == name);
    let mut reports = Vec::new();
    if wants("idle") {
        reports.push(idle::run(&ctx, &args.idle).await);
    }
    if wants("fanout") {
        reports.push(fanout::run(&ctx, &args.fanout).await);
    }
    if wants("unicast") {
        reports.push(unicast::run(&ctx, &args.unicast).await);
    }
    if wants("storm") {
        reports.push(storm::run(&ctx, &args.storm).await);
    }
    if wants("replay") {
        reports.push(replay::run(&ctx, &args.replay).await);
    }
    for report in &reports {
        emit(report, &args.common.out_dir.join(format!("{}.json", report.scenario)))?;
    }
    let summary = args.common.out_dir.join("summary.md");
    std::fs::write(&summary, summary_markdown(&reports)).with_context(|| format!("write {}", summary.display()))?;
    println!("summary: {}", summary.display());
    Ok(reports.iter().all(|report| report.ok))
}

/// Prints the table and writes the JSON.
fn emit(report: &Report, json: &Path) -> Result<()> {
    println!("{}", report.render_text());
    report.write_json(json)?;
    println!("json: {}\n", json.display());
    Ok(())
}

fn summary_markdown(reports: &[Report]) -> String {
    let machine = reports.first().map(|r| r.machine.summary()).unwrap_or_default();
    let command: Vec<String> = std::env::args().collect();
    let mut out = format!(
        "# herald-bench results\n\nMachine: {machine}\n\nCommand: `{}`\n\n\
         Ratios are Herald / peer; ↑ marks figures where higher is better, ↓ lower.\n\n",
        command.join(" ")
    );
    for report in reports {
        out.push_str(&report.render_markdown());
        out.push('\n');
    }
    out
}

fn context(common: &Common) -> Result<Context> {
    let logs = common.out_dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("create {}", logs.display()))?;
    let bench = std::env::current_exe().context("locate this binary")?;
    let gateway = common.gateway_bin.clone().unwrap_or_else(|| bench.with_file_name("herald-gateway"));
    let nats_server = common.nats_server.clone().unwrap_or_else(|| find_nats_server(&bench));
    let targets = common.chosen_targets();
    if targets.is_empty() {
        bail!("no targets");
    }
    limits::raise_nofile()?;
    Ok(Context {
        tools: Tools {
            nats_server,
            gateway,
            bench,
            logs,
            gateway_log: common.gateway_log.clone(),
            gateway_env: common.gateway_env.clone(),
            raw_args: common.raw_args.clone(),
            stream_max_msgs_per_subject: None,
        },
        targets,
        payload_bytes: common.payload_bytes,
        sources: common.sources,
        connect_timeout: secs(common.connect_timeout_secs),
    })
}

/// `.tools/bin/nats-server` in the workspace that holds this binary (or the current directory, or
/// this source tree), else `nats-server` from the PATH.
fn find_nats_server(bench: &Path) -> PathBuf {
    let relative = Path::new(".tools/bin/nats-server");
    let source_tree = Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf);
    let current = std::env::current_dir().ok();
    bench
        .ancestors()
        .map(Path::to_path_buf)
        .chain(current)
        .chain(source_tree)
        .map(|dir| dir.join(relative))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| PathBuf::from("nats-server"))
}

fn key_value(text: &str) -> Result<(String, String), String> {
    let (key, value) = text.split_once('=').ok_or_else(|| format!("{text}: expected KEY=VALUE"))?;
    Ok((key.to_string(), value.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_subcommand_parses() {
        Cli::command().debug_assert();
        let cli =
            Cli::try_parse_from(["herald-bench", "all", "--idle-connections", "5", "--fanout-connections", "1,2"])
                .unwrap();
        let Command::All(all) = cli.command else { panic!("not all") };
        assert_eq!((all.idle.connections, all.fanout.connections), (5, vec![1, 2]));
        assert_eq!(all.common.targets, [TargetKind::Herald, TargetKind::NatsWs, TargetKind::Raw]);
        let cli = Cli::try_parse_from(["herald-bench", "fanout", "--raw-arg", "--coalesce=1", "--raw-arg=--threads=1"])
            .unwrap();
        let Command::Fanout(fanout) = cli.command else { panic!("not fanout") };
        assert_eq!(fanout.common.raw_args, ["--coalesce=1", "--threads=1"]);
        let cli = Cli::try_parse_from(["herald-bench", "fanout", "--protocol", "json,stomp,centrifugal,socketio,sse"])
            .unwrap();
        let Command::Fanout(fanout) = cli.command else { panic!("not fanout") };
        assert_eq!(
            fanout.common.chosen_targets(),
            [
                TargetKind::Herald,
                TargetKind::HeraldStomp,
                TargetKind::HeraldCentrifugal,
                TargetKind::HeraldSocketio,
                TargetKind::HeraldSse
            ]
        );
        assert!(Cli::try_parse_from(["herald-bench", "fanout", "--protocol", "json", "--targets", "raw"]).is_err());
    }
}
