//! TLS to Redis: a mesh of two instances over a `rediss://` URL, on a private
//! redis-server that speaks TLS only, and on a private TLS-only Redis Cluster, with a CA
//! and certificates made for the test (the client trusts that CA alone, so the server's
//! certificate is really verified).

use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::json;
use tower_mesh::{
    Access, MergeStrategy, Mesh, MeshBuilder, MeshError, RedisBackend, RedisBackendBuilder,
};

use crate::common::*;

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the
/// CA, as PEM text and as files in a directory of their own, removed when dropped.
struct Pki {
    dir: PathBuf,
    ca: String,
    client_certificate: String,
    client_key: String,
}

impl Pki {
    fn generate() -> Pki {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "tower-mesh test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().expect("CA key");
        let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf = |name: &str, purposes: Vec<ExtendedKeyUsagePurpose>| {
            let mut params = CertificateParams::new(vec![name.to_owned()]).expect("params");
            params.extended_key_usages = purposes;
            params.use_authority_key_identifier_extension = true;
            let key = KeyPair::generate().expect("key");
            let certificate = params.signed_by(&key, &issuer).expect("certificate");
            (certificate.pem(), key.serialize_pem())
        };
        // The URL names 127.0.0.1, so the server's certificate must (an IP SAN). A Cluster
        // node presents the same certificate to the other nodes on the cluster bus, as a
        // client.
        let (server_certificate, server_key) = leaf(
            "127.0.0.1",
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        );
        let (client_certificate, client_key) =
            leaf("mesh", vec![ExtendedKeyUsagePurpose::ClientAuth]);

        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tower-mesh-tls-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let pki = Pki {
            dir,
            ca: ca.pem(),
            client_certificate,
            client_key,
        };
        for (name, pem) in [
            ("ca.pem", pki.ca.as_str()),
            ("server.pem", server_certificate.as_str()),
            ("server.key", server_key.as_str()),
        ] {
            std::fs::write(pki.dir.join(name), pem).expect("write PEM");
        }
        pki
    }

    /// What a redis-server needs to serve TLS with this CA's server certificate.
    fn server_files(&self, verify_clients: bool) -> TlsFiles {
        TlsFiles {
            certificate: self.dir.join("server.pem"),
            key: self.dir.join("server.key"),
            ca_certificate: self.dir.join("ca.pem"),
            verify_clients,
        }
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn mesh_on(backend: RedisBackendBuilder) -> MeshBuilder {
    Mesh::builder()
        .redis_backend(backend.build().expect("Redis backend"))
        .expose_channel("news", Access::open())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_rooms_channels_and_records_over_tls() {
    let pki = Pki::generate();
    let redis = RedisServer::start_tls(pki.server_files(false));
    let backend = || {
        RedisBackend::builder(redis.url().as_str())
            .prefix("mesh:tls:")
            .tls_root_certificates(pki.ca.as_str())
    };
    let a = serve(mesh_on(backend())).await;
    let b = serve(mesh_on(backend())).await;

    let mut client = RawClient::connect(&a.url()).await;
    join(&mut client, 1, "lobby").await;
    let subscribed = call(
        &mut client,
        2,
        "mesh/subscribe-channel",
        json!({ "channel": "news" }),
    )
    .await;
    assert_eq!(subscribed["success"], true, "{subscribed}");

    // Both travel through Redis pub/sub: from B's commands connection to A's subscriber.
    b.mesh
        .room("lobby")
        .broadcast("room-message", &json!({ "text": "hi" }))
        .await
        .expect("room broadcast");
    assert_eq!(
        client.push_within("room-message").await,
        json!({ "command": "room-message", "payload": { "text": "hi" } })
    );
    b.mesh
        .write_channel("news", "over TLS", 0)
        .await
        .expect("write_channel");
    assert_eq!(
        client.push_within("mesh/subscription-message").await["payload"],
        json!({ "channel": "news", "message": "over TLS", "offset": 1 })
    );

    let version = a
        .mesh
        .write_record("doc", json!({ "n": 1 }), MergeStrategy::Replace)
        .await
        .expect("write_record");
    assert_eq!(version, Some(1));
    let record = b.mesh.record("doc").await.expect("record").expect("stored");
    assert_eq!((record.value, record.version), (json!({ "n": 1 }), 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_presented_to_a_server_that_verifies_clients() {
    let pki = Pki::generate();
    let redis = RedisServer::start_tls(pki.server_files(true));
    let backend = RedisBackend::builder(redis.url().as_str())
        .prefix("mesh:mtls:")
        .tls_root_certificates(pki.ca.as_str());

    let with_certificate = serve(mesh_on(
        backend
            .clone()
            .tls_client_certificate(pki.client_certificate.as_str(), pki.client_key.as_str()),
    ))
    .await;
    let version = with_certificate
        .mesh
        .write_record("doc", json!("signed"), MergeStrategy::Replace)
        .await
        .expect("write_record");
    assert_eq!(version, Some(1));

    let without_certificate = mesh_on(backend).build().1;
    let refused = within("the refused read", without_certificate.record("doc")).await;
    assert!(
        matches!(refused, Err(MeshError::Unavailable(_))),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_ca_is_not_trusted_is_refused() {
    let pki = Pki::generate();
    let redis = RedisServer::start_tls(pki.server_files(false));
    // The system's roots do not include the test's CA.
    let untrusting = mesh_on(RedisBackend::builder(redis.url().as_str()).prefix("mesh:untrusted:"))
        .build()
        .1;
    let refused = within("the refused read", untrusting.record("doc")).await;
    assert!(
        matches!(refused, Err(MeshError::Unavailable(_))),
        "{refused:?}"
    );
}

#[test]
fn tls_settings_that_cannot_work_fail_at_build() {
    let pki = Pki::generate();
    let ca = pki.ca.as_str();
    let error = |builder: RedisBackendBuilder| match builder.build() {
        Ok(_) => panic!("built"),
        Err(err) => err.to_string(),
    };
    let plain = error(RedisBackend::builder("redis://127.0.0.1:6379").tls_root_certificates(ca));
    assert!(plain.contains("rediss://"), "{plain}");
    let insecure = error(RedisBackend::builder("rediss://127.0.0.1:6380/#insecure"));
    assert!(insecure.contains("#insecure"), "{insecure}");
    let no_certificate =
        error(RedisBackend::builder("rediss://127.0.0.1:6380").tls_root_certificates("not PEM"));
    assert!(no_certificate.contains("CERTIFICATE"), "{no_certificate}");
    // Nothing connects at build: a server that is not there is no error yet.
    RedisBackend::builder("rediss://127.0.0.1:6380")
        .tls_root_certificates(ca)
        .tls_client_certificate(pki.client_certificate.as_str(), pki.client_key.as_str())
        .build()
        .expect("valid settings");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_rooms_channels_and_records_over_a_tls_cluster() {
    let pki = Pki::generate();
    let cluster = RedisTlsCluster::start(pki.server_files(false));
    let seeds = cluster.urls();
    let backend = |seeds: &[String]| {
        RedisBackend::cluster(seeds.to_vec()).tls_root_certificates(pki.ca.as_str())
    };
    // A is given one seed: it reaches the other nodes through the addresses the Cluster
    // reports (their TLS ports), over TLS, as it must for most slots.
    let a = serve(mesh_on(backend(&seeds[..1]))).await;
    let b = serve(mesh_on(backend(&seeds))).await;

    let mut client = RawClient::connect(&a.url()).await;
    join(&mut client, 1, "lobby").await;
    let subscribed = call(
        &mut client,
        2,
        "mesh/subscribe-channel",
        json!({ "channel": "news" }),
    )
    .await;
    assert_eq!(subscribed["success"], true, "{subscribed}");

    // From B's commands to A's subscriber: the room's and the channel's sharded channels,
    // A's own sharded channel (a push to one connection) and the classic broadcast channel.
    b.mesh
        .room("lobby")
        .broadcast("room-message", &json!({ "text": "hi" }))
        .await
        .expect("room broadcast");
    assert_eq!(
        client.push_within("room-message").await,
        json!({ "command": "room-message", "payload": { "text": "hi" } })
    );
    b.mesh
        .write_channel("news", "over TLS", 0)
        .await
        .expect("write_channel");
    assert_eq!(
        client.push_within("mesh/subscription-message").await["payload"],
        json!({ "channel": "news", "message": "over TLS", "offset": 1 })
    );
    b.mesh
        .send(&client.id, "direct", &json!(1))
        .await
        .expect("send");
    assert_eq!(client.push_within("direct").await["payload"], json!(1));
    b.mesh
        .broadcast("everyone", &json!(2))
        .await
        .expect("broadcast");
    assert_eq!(client.push_within("everyone").await["payload"], json!(2));

    // Records in several buckets: their slots are spread over the three masters.
    for n in 0..8 {
        let id = format!("doc-{n}");
        let version = a
            .mesh
            .write_record(&id, json!({ "n": n }), MergeStrategy::Replace)
            .await
            .expect("write_record");
        assert_eq!(version, Some(1), "{id}");
        let record = b.mesh.record(&id).await.expect("record").expect("stored");
        assert_eq!(
            (record.value, record.version),
            (json!({ "n": n }), 1),
            "{id}"
        );
    }
    // The key layout is deterministic, so this is no matter of luck: every master holds
    // some of the mesh's keys, so both instances spoke TLS to every node.
    let key_counts = cluster.key_counts();
    assert!(key_counts.iter().all(|&keys| keys > 0), "{key_counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_presented_to_every_node_of_a_cluster_that_verifies_clients() {
    let pki = Pki::generate();
    let cluster = RedisTlsCluster::start(pki.server_files(true));
    let backend = RedisBackend::cluster(cluster.urls()).tls_root_certificates(pki.ca.as_str());
    let with_certificate = || {
        mesh_on(
            backend
                .clone()
                .tls_client_certificate(pki.client_certificate.as_str(), pki.client_key.as_str()),
        )
    };
    let a = serve(with_certificate()).await;
    let b = serve(with_certificate()).await;

    // A's subscriber connections present it too, or the broadcast would not arrive.
    let mut client = RawClient::connect(&a.url()).await;
    join(&mut client, 1, "lobby").await;
    b.mesh
        .room("lobby")
        .broadcast("room-message", &json!("signed"))
        .await
        .expect("room broadcast");
    assert_eq!(
        client.push_within("room-message").await["payload"],
        json!("signed")
    );
    for n in 0..8 {
        let id = format!("doc-{n}");
        let version = b
            .mesh
            .write_record(&id, json!(n), MergeStrategy::Replace)
            .await
            .expect("write_record");
        assert_eq!(version, Some(1), "{id}");
        let record = a.mesh.record(&id).await.expect("record").expect("stored");
        assert_eq!(record.value, json!(n), "{id}");
    }
    let key_counts = cluster.key_counts();
    assert!(key_counts.iter().all(|&keys| keys > 0), "{key_counts:?}");

    let without_certificate = mesh_on(backend).build().1;
    let refused = within("the refused read", without_certificate.record("doc-0")).await;
    assert!(
        matches!(refused, Err(MeshError::Unavailable(_))),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_whose_ca_is_not_trusted_is_refused() {
    let pki = Pki::generate();
    let cluster = RedisTlsCluster::start(pki.server_files(false));
    // The system's roots do not include the test's CA.
    let untrusting = mesh_on(RedisBackend::cluster(cluster.urls())).build().1;
    let refused = within("the refused read", untrusting.record("doc")).await;
    // Refused for the certificate (rustls's reason), not for some other failure.
    assert!(
        matches!(refused, Err(MeshError::Unavailable(_)))
            && format!("{refused:?}").contains("UnknownIssuer"),
        "{refused:?}"
    );
    let refused = within(
        "the refused write",
        untrusting.write_record("doc", json!(1), MergeStrategy::Replace),
    )
    .await;
    assert!(
        matches!(refused, Err(MeshError::Unavailable(_))),
        "{refused:?}"
    );

    // The nodes speak TLS only: the same ports without it are refused as well.
    let plain_seeds = cluster
        .urls()
        .iter()
        .map(|url| url.replacen("rediss://", "redis://", 1))
        .collect::<Vec<_>>();
    let plain = mesh_on(RedisBackend::cluster(plain_seeds)).build().1;
    let refused = within("the refused plain read", plain.record("doc")).await;
    assert!(
        matches!(refused, Err(MeshError::Unavailable(_))),
        "{refused:?}"
    );
}

#[test]
fn cluster_tls_settings_that_cannot_work_fail_at_build() {
    let pki = Pki::generate();
    let ca = pki.ca.as_str();
    let error = |builder: RedisBackendBuilder| match builder.build() {
        Ok(_) => panic!("built"),
        Err(err) => err.to_string(),
    };
    let plain = "redis://127.0.0.1:7000";
    let tls = "rediss://127.0.0.1:7001";
    for seeds in [[plain, tls], [tls, plain]] {
        for backend in [
            RedisBackend::cluster(seeds),
            RedisBackend::cluster(seeds).tls_root_certificates(ca),
        ] {
            let mixed = error(backend);
            assert!(
                mixed.contains("must all use TLS (rediss://) or none"),
                "{seeds:?}: {mixed}"
            );
        }
    }
    let certificates_without_tls =
        error(RedisBackend::cluster([plain, "redis://127.0.0.1:7002"]).tls_root_certificates(ca));
    assert!(
        certificates_without_tls.contains("use rediss://"),
        "{certificates_without_tls}"
    );
    // As for a single Redis: verification is not to be turned off, with or without a CA.
    for backend in [
        RedisBackend::cluster(["rediss://127.0.0.1:7002/#insecure"]),
        RedisBackend::cluster([tls, "rediss://127.0.0.1:7002/#insecure"]),
        RedisBackend::cluster(["rediss://127.0.0.1:7002/#insecure"]).tls_root_certificates(ca),
    ] {
        let insecure = error(backend);
        assert!(insecure.contains("#insecure"), "{insecure}");
    }
    let no_certificate = error(RedisBackend::cluster([tls]).tls_root_certificates("not PEM"));
    assert!(no_certificate.contains("CERTIFICATE"), "{no_certificate}");
    let no_seed = error(RedisBackend::cluster(Vec::<String>::new()));
    assert!(no_seed.contains("at least one seed"), "{no_seed}");
    // Nothing connects at build: nodes that are not there are no error yet.
    RedisBackend::cluster([tls, "rediss://127.0.0.1:7002"])
        .tls_root_certificates(ca)
        .tls_client_certificate(pki.client_certificate.as_str(), pki.client_key.as_str())
        .build()
        .expect("valid settings");
    RedisBackend::cluster([tls])
        .build()
        .expect("the system's roots");
}
