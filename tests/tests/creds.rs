//! The `.creds` (decentralized JWT) path: a NATS in operator mode, whose accounts come from JWTs
//! preloaded into a memory resolver, and a gateway that authenticates both of its connections
//! (the delivery feed signs the server's nonce itself) with a `.creds` file.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use herald_tests::{TestGateway, eventually, free_port, workspace_root};
use nkeys::KeyPair;
use serde_json::{Value, json};

/// A JWT signed with `issuer` (NATS's `ed25519-nkey` algorithm), with the standard claims added.
fn jwt(issuer: &KeyPair, subject: &str, name: &str, nats: Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(json!({"typ": "JWT", "alg": "ed25519-nkey"}).to_string());
    let iat = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let claims = json!({
        "jti": format!("{subject}-{iat}"),
        "iat": iat,
        "iss": issuer.public_key(),
        "sub": subject,
        "name": name,
        "nats": nats,
    });
    let signed = format!("{header}.{}", URL_SAFE_NO_PAD.encode(claims.to_string()));
    let signature = issuer.sign(signed.as_bytes()).unwrap();
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature))
}

fn account_jwt(operator: &KeyPair, account: &KeyPair, name: &str, jetstream: bool) -> String {
    let storage = if jetstream { -1 } else { 0 };
    let limits = json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": true,
        "conn": -1, "leaf": -1,
        "mem_storage": storage, "disk_storage": storage, "streams": -1, "consumer": -1,
    });
    jwt(operator, &account.public_key(), name, json!({"type": "account", "version": 2, "limits": limits}))
}

/// A `.creds` file for a new user of `account`, allowed everything.
fn creds(account: &KeyPair, name: &str) -> String {
    let user = KeyPair::new_user();
    let nats = json!({"type": "user", "version": 2, "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1});
    let token = jwt(account, &user.public_key(), name, nats);
    format!(
        "-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\n\
         -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
        user.seed().unwrap()
    )
}

/// nats-server in operator mode with JetStream, stopped on drop.
struct OperatorNats {
    child: Child,
    dir: std::path::PathBuf,
    url: String,
    /// A `.creds` file for the gateway and one for a publisher, both in the `HERALD` account.
    gateway_creds: std::path::PathBuf,
    publisher_creds: std::path::PathBuf,
}

impl OperatorNats {
    async fn start() -> OperatorNats {
        let operator = KeyPair::new_operator();
        let system = KeyPair::new_account();
        let herald = KeyPair::new_account();
        let operator_jwt = jwt(
            &operator,
            &operator.public_key(),
            "herald-test",
            json!({"type": "operator", "version": 2, "system_account": system.public_key()}),
        );
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("herald-operator-nats-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let config = format!(
            "listen: 127.0.0.1:{port}\n\
             jetstream {{ store_dir: \"{store}\" }}\n\
             operator: {operator_jwt}\n\
             system_account: {system_key}\n\
             resolver: MEMORY\n\
             resolver_preload: {{\n  {system_key}: {system_jwt}\n  {herald_key}: {herald_jwt}\n}}\n",
            store = dir.join("jetstream").display(),
            system_key = system.public_key(),
            system_jwt = account_jwt(&operator, &system, "SYS", false),
            herald_key = herald.public_key(),
            herald_jwt = account_jwt(&operator, &herald, "HERALD", true),
        );
        std::fs::write(dir.join("nats.conf"), config).unwrap();
        let gateway_creds = dir.join("gateway.creds");
        std::fs::write(&gateway_creds, creds(&herald, "gateway")).unwrap();
        let publisher_creds = dir.join("publisher.creds");
        std::fs::write(&publisher_creds, creds(&herald, "publisher")).unwrap();
        let child = Command::new(workspace_root().join(".tools/bin/nats-server"))
            .arg("-c")
            .arg(dir.join("nats.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nats-server (run scripts/install-nats)");
        let nats = OperatorNats { child, dir, url: format!("nats://127.0.0.1:{port}"), gateway_creds, publisher_creds };
        eventually("the operator-mode NATS accepting the publisher", Duration::from_secs(30), || async {
            nats.publisher().await.ok().map(|_| ())
        })
        .await;
        nats
    }

    async fn publisher(&self) -> Result<async_nats::Client, async_nats::ConnectError> {
        async_nats::ConnectOptions::with_credentials_file(&self.publisher_creds).await?.connect(&self.url).await
    }
}

impl Drop for OperatorNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn a_gateway_authenticated_by_a_creds_file_delivers_from_an_operator_mode_nats() {
    let nats = OperatorNats::start().await;
    // Nothing but the .creds file: a user and password would be refused by this server.
    let gateway = TestGateway::start_on(&nats.url, |c| {
        c.nats.nats_user = None;
        c.nats.nats_password = None;
        c.nats.nats_creds = Some(nats.gateway_creds.clone());
    })
    .await;
    let mut client = gateway.connect("cara").await;

    let js = async_nats::jetstream::new(nats.publisher().await.unwrap());
    for n in 0..3 {
        let seq = js.publish("push.user.cara", format!("{n}").into()).await.unwrap().await.unwrap().sequence;
        let msg = client.expect_msg().await;
        assert_eq!((msg.seq, msg.data), (seq, json!(n)));
    }
    assert_eq!(gateway.metric("herald_gateway_messages_in_total").await, 3.0);
}
