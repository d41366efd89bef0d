//! NATS requiring TLS from every client, with a certificate from a private CA: the gateway's two
//! connections (its delivery feed, which speaks the NATS protocol itself, and async-nats) upgrade,
//! verify the server against `nats_tls_ca`, and deliver.

use herald_tests::nats::{Role, ServerTls};
use herald_tests::{Publisher, TestGateway, TestNats};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tokio::io::AsyncBufReadExt;

/// A CA (PEM) and a server certificate it signed for 127.0.0.1 and localhost.
fn certificates() -> (String, ServerTls) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "Herald test CA");
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let names = vec!["127.0.0.1".to_string(), "localhost".to_string()];
    let server = CertificateParams::new(names).unwrap().signed_by(&key, &ca).unwrap();
    (ca.pem(), ServerTls { cert_pem: server.pem(), key_pem: key.serialize_pem() })
}

/// The first line NATS sends a new client, before any TLS.
async fn info_line(nats: &TestNats) -> String {
    let address = nats.url().trim_start_matches("nats://").to_string();
    let stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let mut line = String::new();
    tokio::io::BufReader::new(stream).read_line(&mut line).await.unwrap();
    line
}

#[tokio::test]
async fn the_gateway_delivers_through_nats_that_requires_tls_from_a_private_ca() {
    let (ca_pem, server_tls) = certificates();
    let ca_file = std::env::temp_dir().join(format!("herald-test-ca-{}.pem", std::process::id()));
    std::fs::write(&ca_file, ca_pem).unwrap();
    let nats = TestNats::start_tls(&server_tls, &ca_file).await;
    assert!(info_line(&nats).await.contains(r#""tls_required":true"#), "NATS must require TLS");

    let gateway = TestGateway::start_with(&nats, |c| c.nats.nats_tls_ca = Some(ca_file.clone())).await;
    let mut client = gateway.connect("tina").await;
    let publisher = Publisher::new(&nats).await;
    let seq = publisher.publish("push.user.tina", r#"{"text":"over TLS"}"#).await;
    let msg = client.expect_msg().await;
    assert_eq!((msg.seq, msg.data), (seq, serde_json::json!({"text": "over TLS"})));

    // A client that does not trust the CA is refused: the certificate really is checked.
    let untrusting =
        async_nats::ConnectOptions::with_user_and_password(Role::Admin.user().into(), Role::Admin.password())
            .connect(nats.url())
            .await;
    let error = untrusting.expect_err("no connection without the CA").to_string();
    assert!(error.to_lowercase().contains("certificate"), "{error}");
    let _ = std::fs::remove_file(ca_file);
}
