//! Opening the feed's connection: dial one of the known servers ([`Servers`]), read its `INFO`, upgrade to
//! TLS when the URL or the server asks for it, authenticate (user and password, or a `.creds` file's
//! JWT with the nonce signed by its NKey), and wait for the server's `PONG` to our first `PING`.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::BytesMut;
use herald_shared::nats::NatsSettings;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::proto::{self, ServerOp};
use super::servers::Servers;

/// A connection, plain or TLS.
pub(super) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An established, authenticated connection and the bytes already read past the handshake.
pub(super) struct Stream {
    io: Box<dyn Io>,
    /// Read past the handshake's `PONG`; consumed before the socket.
    leftover: BytesMut,
}

impl Stream {
    /// Reads into `buf` (what the handshake left first).
    pub(super) async fn read_buf(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        if !self.leftover.is_empty() {
            let n = self.leftover.len();
            buf.extend_from_slice(&self.leftover.split());
            return Ok(n);
        }
        self.io.read_buf(buf).await
    }

    pub(super) async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.io.write_all(bytes).await
    }
}

/// How long dialing and the handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection just made: the stream, the server's address and its `INFO`.
pub(super) struct Dialed {
    pub(super) stream: Stream,
    pub(super) server: String,
    pub(super) info: serde_json::Value,
}

/// Connects to the server picked by `turn` (round robin over `servers`).
pub(super) async fn dial(
    settings: &NatsSettings,
    name: &str,
    servers: &Servers,
    turn: usize,
) -> Result<Dialed, String> {
    let url = servers.pick(turn).ok_or("no NATS server configured")?;
    let server = shown(url);
    let (stream, info) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(settings, name, url))
        .await
        .map_err(|_| format!("{server}: handshake timed out"))?
        .map_err(|error| format!("{server}: {error}"))?;
    Ok(Dialed { stream, server, info })
}

/// A URL as logs show it: without the password of a `user:password@`.
fn shown(url: &str) -> String {
    match parse_url(url) {
        Ok(ServerUrl { credentials: Some((user, _)), .. }) => match url.rsplit_once('@') {
            Some((before, host)) => {
                let scheme = before.split_once("://").map_or(String::new(), |(scheme, _)| format!("{scheme}://"));
                format!("{scheme}{user}:***@{host}")
            }
            None => url.to_string(),
        },
        _ => url.to_string(),
    }
}

/// Where and how to reach one server.
#[derive(Debug, PartialEq, Eq)]
struct ServerUrl {
    host: String,
    port: u16,
    /// `tls://`: TLS whatever the server says.
    tls: bool,
    /// `user:password@` in the URL, used when the settings name no user.
    credentials: Option<(String, String)>,
}

/// `nats://[user:password@]host[:port]`, `tls://…` or `host[:port]`.
fn parse_url(url: &str) -> Result<ServerUrl, String> {
    let (tls, rest) = match url.split_once("://") {
        Some(("tls", rest)) => (true, rest),
        Some(("nats", rest)) => (false, rest),
        Some((scheme, _)) => {
            return Err(format!("unsupported scheme {scheme}:// for the gateway's own NATS connections"));
        }
        None => (false, url),
    };
    let (credentials, host_port) = match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            (Some((user.to_string(), password.to_string())), host)
        }
        None => (None, rest),
    };
    let host_port = host_port.trim_end_matches('/');
    let (host, port) = match host_port.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(':') => {
            (host, port.parse::<u16>().map_err(|_| format!("bad port in {url}"))?)
        }
        _ => (host_port, 4222),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    Ok(ServerUrl { host, port, tls, credentials })
}

async fn handshake(settings: &NatsSettings, name: &str, url: &str) -> Result<(Stream, serde_json::Value), String> {
    let ServerUrl { host, port, tls: tls_asked, credentials } = parse_url(url)?;
    let tcp = TcpStream::connect((host.as_str(), port)).await.map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let mut io: Box<dyn Io> = Box::new(tcp);
    let mut buf = BytesMut::with_capacity(4096);
    let info = match next_op(&mut io, &mut buf).await? {
        ServerOp::Info(info) => info,
        other => return Err(format!("expected INFO, got {other:?}")),
    };
    let info: serde_json::Value = serde_json::from_slice(&info).map_err(|e| format!("bad INFO: {e}"))?;
    let tls = tls_asked || info["tls_required"].as_bool().unwrap_or(false);
    if tls {
        io = upgrade(io, &host, settings.nats_tls_ca.as_deref()).await?;
    }
    let mut options = serde_json::json!({
        "verbose": false,
        "pedantic": false,
        "tls_required": tls,
        "name": name,
        "lang": "rust",
        "version": env!("CARGO_PKG_VERSION"),
        "protocol": 1,
        "echo": true,
        "headers": true,
        "no_responders": true,
    });
    if let Some((user, password)) = credentials {
        options["user"] = user.into();
        options["pass"] = password.into();
    }
    authenticate(settings, info["nonce"].as_str(), &mut options).await?;
    let mut hello = BytesMut::new();
    proto::connect(&mut hello, &options);
    io.write_all(&hello).await.map_err(|e| e.to_string())?;
    loop {
        match next_op(&mut io, &mut buf).await? {
            ServerOp::Pong => return Ok((Stream { io, leftover: buf }, info)),
            ServerOp::Err(error) => return Err(error),
            ServerOp::Ping => io.write_all(proto::PONG).await.map_err(|e| e.to_string())?,
            ServerOp::Ok | ServerOp::Info(_) | ServerOp::Msg(_) => {}
        }
    }
}

/// Adds the configured credentials to the `CONNECT` options.
async fn authenticate(
    settings: &NatsSettings,
    nonce: Option<&str>,
    options: &mut serde_json::Value,
) -> Result<(), String> {
    if let (Some(user), Some(password)) = (&settings.nats_user, &settings.nats_password) {
        options["user"] = user.clone().into();
        options["pass"] = password.clone().into();
    }
    if let Some(path) = &settings.nats_creds {
        let contents =
            tokio::fs::read_to_string(path).await.map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let (jwt, seed) =
            parse_creds(&contents).ok_or_else(|| format!("{}: not a NATS .creds file", path.display()))?;
        let key = nkeys::KeyPair::from_seed(seed).map_err(|e| format!("bad NKey seed: {e}"))?;
        let nonce = nonce.ok_or("the server sent no nonce to sign")?;
        let signature = key.sign(nonce.as_bytes()).map_err(|e| format!("cannot sign the nonce: {e}"))?;
        options["jwt"] = jwt.into();
        options["sig"] = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(signature).into();
    }
    Ok(())
}

/// The user JWT and the NKey seed of a `.creds` file: the first line of each `-----BEGIN …-----`
/// block.
fn parse_creds(contents: &str) -> Option<(&str, &str)> {
    let mut blocks = contents.lines().map(str::trim).scan(false, |inside, line| {
        let opening = line.starts_with("---") && line.contains("BEGIN");
        let value = (*inside && !line.is_empty() && !line.starts_with("---")).then_some(line);
        *inside = opening;
        Some(value)
    });
    let jwt = blocks.by_ref().flatten().next()?;
    let seed = blocks.flatten().next()?;
    Some((jwt, seed))
}

/// TLS with the server, trusting the authorities of `private_ca` (a PEM file) if given, else the
/// system's: the same rule as async-nats's `add_root_certificates`, so the feed and the gateway's other
/// NATS connection accept the same servers.
async fn upgrade(io: Box<dyn Io>, host: &str, private_ca: Option<&std::path::Path>) -> Result<Box<dyn Io>, String> {
    use tokio_rustls::rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    if let Some(path) = private_ca {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("cannot read the CA file {}: {e}", path.display()))?;
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(format!("no usable certificate in the CA file {}", path.display()));
        }
    } else {
        roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    }
    let config = tokio_rustls::rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| format!("bad TLS server name {host}: {e}"))?;
    let tls =
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, io).await.map_err(|e| format!("TLS: {e}"))?;
    Ok(Box::new(tls))
}

async fn next_op(io: &mut Box<dyn Io>, buf: &mut BytesMut) -> Result<ServerOp, String> {
    loop {
        if let Some(op) = proto::parse(buf).map_err(|e| e.to_string())? {
            return Ok(op);
        }
        if io.read_buf(buf).await.map_err(|e| e.to_string())? == 0 {
            return Err("connection closed during the handshake".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_host_port_tls_and_credentials() {
        let url = |host: &str, port, tls, credentials: Option<(&str, &str)>| ServerUrl {
            host: host.into(),
            port,
            tls,
            credentials: credentials.map(|(u, p)| (u.into(), p.into())),
        };
        assert_eq!(parse_url("nats://127.0.0.1:4223"), Ok(url("127.0.0.1", 4223, false, None)));
        assert_eq!(parse_url("tls://nats.example:4443"), Ok(url("nats.example", 4443, true, None)));
        assert_eq!(parse_url("localhost"), Ok(url("localhost", 4222, false, None)));
        assert_eq!(parse_url("nats://u:p@n1:4222"), Ok(url("n1", 4222, false, Some(("u", "p")))));
        assert_eq!(parse_url("nats://[::1]:4222"), Ok(url("::1", 4222, false, None)));
        assert!(parse_url("ws://n1:80").is_err());
        assert!(parse_url("nats://n1:x").is_err());
    }

    #[test]
    fn logs_show_no_password() {
        assert_eq!(shown("nats://u:secret@n1:4222"), "nats://u:***@n1:4222");
        assert_eq!(shown("n1:4222"), "n1:4222");
    }

    #[test]
    fn creds_files_give_the_jwt_and_the_seed() {
        let creds = "-----BEGIN NATS USER JWT-----\neyJhbGciOi.jwt.sig\n------END NATS USER JWT------\n\n\
                     ************************* IMPORTANT *************************\n\
                     NKEY Seed printed below can be used to sign and prove identity.\n\n\
                     -----BEGIN USER NKEY SEED-----\nSUAEXAMPLESEED\n------END USER NKEY SEED------\n";
        assert_eq!(parse_creds(creds), Some(("eyJhbGciOi.jwt.sig", "SUAEXAMPLESEED")));
        assert_eq!(parse_creds("nothing here"), None);
    }
}
