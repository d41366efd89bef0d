//! `herald-gateway`: runs a gateway, or signs a token with the configured secret.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use clap::{Parser, Subcommand};
use herald_gateway::{Config, Gateway, dev_token};
use herald_shared::token::{Claims, issue_hs256, now_secs};
use serde::Serialize;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Herald's WebSocket gateway. Settings: defaults < --config file < HERALD_* environment < flags.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML configuration file (also HERALD_CONFIG).
    #[arg(long, global = true, env = "HERALD_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    flags: Flags,
}

/// Flags that override the file and the environment.
#[derive(clap::Args, Serialize)]
struct Flags {
    /// Listen address, e.g. 127.0.0.1:8080.
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<String>,
    /// NATS server URL(s), comma-separated.
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    nats_url: Option<String>,
    /// Dev mode: built-in token secret, /dev/token, a token printed at start.
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    dev: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Serve,
    /// Print a connect token signed with the configured HS256 secret (or the dev secret with --dev).
    Token {
        /// The user id (the token's sub).
        #[arg(long)]
        user: String,
        /// Topics the user may subscribe to (names, or prefixes ending in *), comma-separated.
        #[arg(long, value_delimiter = ',')]
        topics: Vec<String>,
        /// Lifetime, e.g. 1h, 30m, 7d.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Publish a message with JetStream and print its stream sequence (for machines without the
    /// `nats` CLI): `herald-gateway pub push.user.42 '{"text":"hi"}'`.
    Pub {
        /// push.user.<id>, push.all or push.topic.<topic>.
        subject: String,
        /// The payload (JSON recommended).
        data: String,
        /// Idempotency key (Nats-Msg-Id).
        #[arg(long)]
        id: Option<String>,
        /// The message's kind (Herald-Type).
        #[arg(long)]
        kind: Option<String>,
    },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let logging = match cli.command {
        Some(Command::Pub { .. }) => herald_shared::log::init_with("warn,async_nats=off"),
        _ => herald_shared::log::init(),
    };
    if let Err(error) = logging {
        fail(error);
    }
    let config: Config = match herald_shared::config::load(cli.config.as_deref(), &cli.flags) {
        Ok(config) => config,
        Err(error) => fail(error),
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(config).await,
        Command::Token { user, topics, ttl } => {
            let Some(secret) = config.effective_secret() else {
                fail("no jwt_secret configured (set HERALD_JWT_SECRET, or use --dev)")
            };
            if secret.is_empty() {
                fail("jwt_secret is empty: anyone could sign tokens with an empty key")
            }
            let claims = Claims { sub: user, exp: now_secs() + ttl.as_secs(), topics };
            // A token the gateway would refuse is not signed.
            if let Err(error) = herald_shared::token::check_claims(&claims) {
                fail(error);
            }
            if ttl.is_zero() {
                fail("--ttl 0 would sign a token that has expired already");
            }
            println!("{}", issue_hs256(secret.as_bytes(), &claims));
        }
        Command::Pub { subject, data, id, kind } => publish(&config, subject, data, id, kind).await,
    }
}

async fn publish(config: &Config, subject: String, data: String, id: Option<String>, kind: Option<String>) {
    use herald_shared::subject::{Audience, header};
    if Audience::from_push_subject(&subject).is_none() {
        fail(format!("{subject}: not push.user.<id>, push.all or push.topic.<topic>"));
    }
    if let Some(Err(error)) = kind.as_deref().map(herald_shared::id::check_kind) {
        fail(error);
    }
    // A publisher's tool: replies under the publishers' prefix, not the gateways'.
    let nats = herald_shared::nats::NatsSettings { nats_inbox_prefix: "_INBOX".into(), ..config.nats.clone() };
    let violation = Arc::new(std::sync::Mutex::new(None::<String>));
    let js = async_nats::jetstream::new(connect_once(&nats, violation.clone()).await);
    let mut headers = async_nats::HeaderMap::new();
    if let Some(id) = id {
        headers.insert(header::NATS_MSG_ID, id.as_str());
    }
    if let Some(kind) = kind {
        headers.insert(header::HERALD_TYPE, kind.as_str());
    }
    let ack = async { js.publish_with_headers(subject, headers, data.into()).await?.await.map_err(Into::into) };
    let outcome = tokio::time::timeout(Duration::from_secs(10), ack).await;
    let user = nats.nats_user.as_deref().unwrap_or("(none)");
    // A refusal explains a publish that got no answer better than the timeout does.
    if let (Ok(Err(_)) | Err(_), Some(violation)) = (&outcome, violation.lock().unwrap().take()) {
        fail(match violation.contains("Subscription") {
            true => format!(
                "NATS refused user {user} the acknowledgement ({violation}): the message may be stored; publish as a user \
                 that may read _INBOX.> (nats.conf's publisher)"
            ),
            false => format!("NATS refused user {user} ({violation}): publish as nats.conf's publisher"),
        })
    }
    match outcome {
        Ok(Ok(ack)) => println!("stored: seq {} (duplicate: {})", ack.sequence, ack.duplicate),
        Ok(Err::<_, async_nats::Error>(error))
            if error.downcast_ref::<PublishError>().is_some_and(|e| e.kind() == PublishErrorKind::StreamNotFound) =>
        {
            fail(
                "no stream stores this subject: NATS needs JetStream (nats.conf's jetstream block) and the HERALD \
                  stream, which a gateway or the functions make when they start",
            )
        }
        Ok(Err(error)) if error.downcast_ref::<PublishError>().is_some_and(herald_shared::nats::out_of_storage) => {
            fail(herald_shared::nats::OUT_OF_STORAGE)
        }
        Ok(Err(error)) => fail(error),
        Err(_) => fail("publish timed out: is NATS running with the HERALD stream?"),
    }
}

/// Connects to NATS once, or ends the process saying why: a refused user or password, or no server.
/// A permissions violation NATS reports later is put in `violation`.
async fn connect_once(
    nats: &herald_shared::nats::NatsSettings,
    violation: Arc<std::sync::Mutex<Option<String>>>,
) -> async_nats::Client {
    use async_nats::ConnectErrorKind;
    let options = nats.one_shot_options("herald-gateway pub").await.unwrap_or_else(|e| fail(e));
    let options = options.event_callback(move |event| {
        if let async_nats::Event::ServerError(async_nats::ServerError::Other(text)) = &event
            && text.to_lowercase().contains("permissions violation")
        {
            *violation.lock().unwrap() = Some(text.clone());
        }
        std::future::ready(())
    });
    let addresses = nats.addresses().unwrap_or_else(|e| fail(format!("nats_url {}: {e}", nats.nats_url)));
    match options.connect(addresses).await {
        Ok(client) => client,
        Err(error)
            if matches!(error.kind(), ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication) =>
        {
            let user = nats.nats_user.as_deref().unwrap_or("(none)");
            fail(format!(
                "authorization violation: NATS at {} refused user {user} (check HERALD_NATS_USER and HERALD_NATS_PASSWORD)",
                nats.nats_url
            ))
        }
        Err(error) => fail(format!("cannot connect to NATS at {}: {error}", nats.nats_url)),
    }
}

async fn serve(config: Config) {
    let dev = config.dev;
    let printed_token = dev.then(|| dev_token(&config, "dev", Duration::from_secs(24 * 3600))).flatten();
    let gateway = match Gateway::start(config).await {
        Ok(gateway) => gateway,
        Err(error) => fail(error),
    };
    if let Some(token) = printed_token {
        let addr = gateway.local_addr();
        println!("Herald gateway (dev mode) at http://{addr}/");
        println!("WebSocket: ws://{addr}/ws?token=<token>");
        println!("Dev token for user \"dev\" (24h): {token}");
        println!("Try: nats pub --user publisher --password <its password> push.user.dev '{{\"text\":\"hello\"}}'");
    }
    wait_for_signal().await;
    gateway.shutdown();
    tokio::select! {
        _ = gateway.stopped() => {}
        _ = wait_for_signal() => tracing::warn!("second signal: exiting now"),
    }
}

async fn wait_for_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .unwrap_or_else(|error| fail(format!("cannot listen for SIGTERM: {error}")));
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

fn fail(error: impl std::fmt::Display) -> ! {
    eprintln!("herald-gateway: {error}");
    std::process::exit(2);
}
