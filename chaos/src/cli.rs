//! The command line. Every size is a flag; the defaults are the full run (a million messages in
//! about 17 minutes); docs/operations.md gives the short one for CI.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::faults::FaultKind;

/// Runs a three-node NATS cluster, gateways, clients and publishers on this machine while it kills
/// gateways and NATS nodes and cuts nodes off, then counts, for every client, the messages it was
/// owed, received, lost, got twice or out of order. Exits with 1 if any was lost, duplicated,
/// reordered or misdelivered. Needs Docker (the NATS image is built locally, no registry).
/// A flag given twice takes its last value.
#[derive(Debug, Clone, Parser)]
#[command(version, args_override_self = true)]
pub struct Options {
    /// Messages to publish (the run may end earlier with --duration).
    #[arg(long, default_value_t = 1_000_000)]
    pub messages: u64,
    /// Stop publishing after this long (e.g. 1h), even with messages left.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Messages published per second.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Messages being published at once (each awaits its acknowledgement).
    #[arg(long, default_value_t = 64)]
    pub in_flight: usize,
    /// Users, one WebSocket client each.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub users: u32,
    /// Gateways (processes of herald-gateway).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(2..=3))]
    pub gateways: u8,
    /// Share of messages sent to push.all.
    #[arg(long, default_value_t = 0.05)]
    pub all_share: f64,
    /// Share of messages sent to push.topic.chaos (every other user subscribes).
    #[arg(long, default_value_t = 0.05)]
    pub topic_share: f64,
    /// Faults to inject, comma-separated; each round injects each once, in a seeded order.
    #[arg(long, value_enum, value_delimiter = ',', action = clap::ArgAction::Set, default_values_t = FaultKind::ALL)]
    pub faults: Vec<FaultKind>,
    /// Calm time before the first fault and between one fault's recovery and the next.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub fault_interval: Duration,
    /// How long a killed gateway or node stays down, and how long a partition lasts.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub fault_downtime: Duration,
    /// Most faults to inject (default: as many as fit while publishing).
    #[arg(long)]
    pub max_faults: Option<usize>,
    /// How long the cluster and the gateways may take to be whole again after a fault.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub recovery_timeout: Duration,
    /// After publishing, how long clients may take to receive everything owed to them.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub catch_up_timeout: Duration,
    /// Seeds audiences, the fault order and victims (default: from the clock; printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// The herald-gateway binary (default: the workspace's, built with this build's profile).
    #[arg(long)]
    pub gateway_bin: Option<PathBuf>,
    /// HERALD_LOG of the gateways.
    #[arg(long, default_value = "info,async_nats=warn")]
    pub gateway_log: String,
    /// Directory for the gateways' and NATS nodes' logs (default: target/chaos/<run id>).
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Also write the full report (every client, every fault) as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

impl Options {
    /// Checks what clap cannot.
    pub fn validate(&self) -> anyhow::Result<()> {
        let share = |x: f64| (0.0..=1.0).contains(&x);
        anyhow::ensure!(self.rate > 0.0, "--rate must be positive");
        anyhow::ensure!(self.in_flight > 0, "--in-flight must be positive");
        anyhow::ensure!(
            share(self.all_share) && share(self.topic_share) && self.all_share + self.topic_share <= 1.0,
            "--all-share and --topic-share are shares of the messages: between 0 and 1, together at most 1"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn a_later_flag_overrides_an_earlier_one() {
        let options = Options::parse_from(["herald-chaos", "--fault-downtime", "5s", "--fault-downtime", "15s"]);
        assert_eq!(options.fault_downtime, Duration::from_secs(15));
        let options = Options::parse_from(["herald-chaos", "--faults", "nats-kill,partition", "--faults", "partition"]);
        assert_eq!(options.faults, vec![FaultKind::Partition]);
    }
}
