//! The Redis client that every connection of a backend comes from (the shared command
//! connection and each instance's pub/sub connection), so that a `rediss://` URL and the
//! TLS settings apply to all of them. Everything about them is checked here, when the
//! backend is built, so that a misconfiguration fails there and not at the first command.

use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::AsyncConnectionConfig;

use super::OPERATION_TIMEOUT;
use crate::error::{BackendError, MeshError};

/// Where a backend's connections go: one Redis, or a Cluster through its seed nodes.
#[derive(Clone)]
// One per backend, cloned only when a subscriber starts: its size does not matter.
#[allow(clippy::large_enum_variant)]
pub(super) enum Client {
    Single(redis::Client),
    Cluster(Box<ClusterSettings>),
}

/// A Cluster's clients.
#[derive(Clone)]
pub(super) struct ClusterSettings {
    /// Commands: routed by slot, following redirections.
    pub(super) commands: ClusterClient,
    /// What each pub/sub connection is built from (it needs a push sender of its own).
    pub(super) seeds: Vec<String>,
    pub(super) tls: TlsSettings,
}

/// The settings of every single-node connection. The operation timeout bounds every
/// command; the redis crate's own default response timeout (500 ms) would otherwise fail
/// commands that a busy machine answers a little late, well within what the backend
/// promises to wait.
pub(super) fn config() -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(OPERATION_TIMEOUT))
        .set_response_timeout(Some(OPERATION_TIMEOUT))
}

/// A Cluster client on `seeds`, with the backend's timeouts and TLS settings. The crate
/// retries a redirected or failed command a few times; the backend's operation timeout
/// ends the wait for it, though a command already sent may still run after that (as on a
/// single Redis whose reply is late).
pub(super) fn cluster_builder(
    seeds: &[String],
    tls: &TlsSettings,
) -> Result<ClusterClientBuilder, MeshError> {
    if seeds.is_empty() {
        return Err(misconfigured("a Redis Cluster needs at least one seed URL"));
    }
    let uses_tls = seeds.iter().any(|seed| names_tls(seed));
    if uses_tls != seeds.iter().all(|seed| names_tls(seed)) {
        return Err(misconfigured(
            "the Cluster's seed URLs must all use TLS (rediss://) or none",
        ));
    }
    if !uses_tls && tls.is_set() {
        return Err(misconfigured(
            "TLS certificates were given for Redis URLs without TLS: use rediss:// URLs",
        ));
    }
    let builder = ClusterClientBuilder::new(seeds.to_vec())
        .connection_timeout(OPERATION_TIMEOUT)
        .response_timeout(OPERATION_TIMEOUT)
        .retries(6)
        .max_retry_wait(500);
    cluster_tls(builder, seeds, uses_tls, tls)
}

#[cfg(not(feature = "redis-tls-rustls"))]
fn cluster_tls(
    builder: ClusterClientBuilder,
    _seeds: &[String],
    uses_tls: bool,
    _tls: &TlsSettings,
) -> Result<ClusterClientBuilder, MeshError> {
    if uses_tls {
        return Err(misconfigured(
            "a rediss:// URL needs TLS support: enable tower-mesh's `redis-tls-rustls` feature",
        ));
    }
    Ok(builder)
}

#[cfg(feature = "redis-tls-rustls")]
fn cluster_tls(
    builder: ClusterClientBuilder,
    seeds: &[String],
    uses_tls: bool,
    tls: &TlsSettings,
) -> Result<ClusterClientBuilder, MeshError> {
    if !uses_tls {
        return Ok(builder);
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    // On a seed, the redis crate takes `#insecure` as a mode that fails every connect
    // (without its insecure feature), ignores it once certificates are given, and calls a
    // mix with verified seeds "different TLS modes": refused here as for a single Redis.
    if seeds.iter().any(|seed| asks_insecure(seed)) {
        return Err(insecure_refused());
    }
    check_root_certificates(tls)?;
    Ok(if tls.is_set() {
        builder.certs(certificates(tls))
    } else {
        builder
    })
}

/// A client for the Cluster that `seeds` lead to.
pub(super) fn open_cluster(seeds: Vec<String>, tls: &TlsSettings) -> Result<Client, MeshError> {
    let commands = cluster_builder(&seeds, tls)?.build().map_err(invalid_url)?;
    Ok(Client::Cluster(Box::new(ClusterSettings {
        commands,
        seeds,
        tls: tls.clone(),
    })))
}

/// The TLS settings of a [`RedisBackendBuilder`](super::RedisBackendBuilder): whom to
/// trust, and whom to present.
#[derive(Clone, Default)]
pub(super) struct TlsSettings {
    /// PEM certificates the server's chain must lead to, instead of the system's roots.
    pub(super) root_certificates: Option<Vec<u8>>,
    /// A PEM certificate chain and its PEM private key, for servers that verify clients.
    pub(super) client_identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl TlsSettings {
    fn is_set(&self) -> bool {
        self.root_certificates.is_some() || self.client_identity.is_some()
    }
}

impl std::fmt::Debug for TlsSettings {
    // Certificates are long and a private key is a secret: neither is printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let given = |set: bool| if set { "<given>" } else { "<none>" };
        f.debug_struct("TlsSettings")
            .field(
                "root_certificates",
                &given(self.root_certificates.is_some()),
            )
            .field("client_identity", &given(self.client_identity.is_some()))
            .finish()
    }
}

fn misconfigured(context: &'static str) -> MeshError {
    MeshError::Unavailable(BackendError::new(context))
}

fn invalid_url(err: redis::RedisError) -> MeshError {
    MeshError::Unavailable(BackendError::caused_by("invalid Redis URL", err))
}

/// `rediss://` and `valkeys://` are the schemes the redis crate connects to over TLS.
fn names_tls(url: &str) -> bool {
    url.split_once("://").is_some_and(|(scheme, _)| {
        scheme.eq_ignore_ascii_case("rediss") || scheme.eq_ignore_ascii_case("valkeys")
    })
}

/// A client for the single Redis at `url`, over TLS when its scheme asks for it.
pub(super) fn open(url: &str, tls: &TlsSettings) -> Result<Client, MeshError> {
    if !names_tls(url) {
        if tls.is_set() {
            return Err(misconfigured(
                "TLS certificates were given for a Redis URL without TLS: use a rediss:// URL",
            ));
        }
        return redis::Client::open(url)
            .map(Client::Single)
            .map_err(invalid_url);
    }
    open_tls(url, tls).map(Client::Single)
}

#[cfg(not(feature = "redis-tls-rustls"))]
fn open_tls(_url: &str, _tls: &TlsSettings) -> Result<redis::Client, MeshError> {
    Err(misconfigured(
        "a rediss:// URL needs TLS support: enable tower-mesh's `redis-tls-rustls` feature",
    ))
}

#[cfg(feature = "redis-tls-rustls")]
fn open_tls(url: &str, tls: &TlsSettings) -> Result<redis::Client, MeshError> {
    // The redis crate builds each connection's rustls configuration on the process-wide
    // default crypto provider, and rustls panics when there is none it can pick. Installing
    // ring fails harmlessly when the application installed a provider first: that one stays.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = if tls.is_set() {
        check_root_certificates(tls)?;
        redis::Client::build_with_tls(url, certificates(tls)).map_err(|err| {
            MeshError::Unavailable(BackendError::caused_by(
                "invalid Redis URL or TLS certificates",
                err,
            ))
        })?
    } else {
        redis::Client::open(url).map_err(invalid_url)?
    };
    // The redis crate accepts `#insecure` here but, without its `tls-rustls-insecure`
    // feature, refuses it on every connect; verification is not to be turned off anyway.
    if let redis::ConnectionAddr::TcpTls { insecure: true, .. } =
        client.get_connection_info().addr()
    {
        return Err(insecure_refused());
    }
    Ok(client)
}

/// Whether `url` parses to a TLS address without certificate verification. One that does
/// not parse is left to the client's build, which says why.
#[cfg(feature = "redis-tls-rustls")]
fn asks_insecure(url: &str) -> bool {
    use redis::IntoConnectionInfo;

    url.into_connection_info().is_ok_and(|info| {
        matches!(
            info.addr(),
            redis::ConnectionAddr::TcpTls { insecure: true, .. }
        )
    })
}

#[cfg(feature = "redis-tls-rustls")]
fn insecure_refused() -> MeshError {
    misconfigured(
        "rediss://...#insecure (no certificate verification) is not supported: trust the \
         server's CA with RedisBackendBuilder::tls_root_certificates",
    )
}

/// An empty root store would refuse every server, at connect time: say so now.
#[cfg(feature = "redis-tls-rustls")]
fn check_root_certificates(tls: &TlsSettings) -> Result<(), MeshError> {
    use rustls::pki_types::pem::PemObject;

    match &tls.root_certificates {
        Some(pem)
            if rustls::pki_types::CertificateDer::pem_slice_iter(pem)
                .next()
                .is_none() =>
        {
            Err(misconfigured(
                "the TLS root certificates hold no PEM CERTIFICATE block",
            ))
        }
        _ => Ok(()),
    }
}

#[cfg(feature = "redis-tls-rustls")]
fn certificates(tls: &TlsSettings) -> redis::TlsCertificates {
    redis::TlsCertificates {
        client_tls: tls
            .client_identity
            .as_ref()
            .map(|(chain, key)| redis::ClientTlsConfig {
                client_cert: chain.clone(),
                client_key: key.clone(),
            }),
        root_cert: tls.root_certificates.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_is_read_from_the_scheme_in_any_case() {
        assert!(names_tls("rediss://host:6380"));
        assert!(names_tls("REDISS://host"));
        assert!(names_tls("valkeys://host"));
        assert!(!names_tls("redis://host"));
        assert!(!names_tls("redis+unix:///tmp/redis.sock"));
        assert!(!names_tls("rediss"));
    }

    // Runs in a build without the feature (`cargo test --lib`, default features).
    #[cfg(not(feature = "redis-tls-rustls"))]
    #[test]
    fn a_tls_url_without_the_feature_names_the_feature() {
        let err = open("rediss://127.0.0.1:6380", &TlsSettings::default())
            .err()
            .map(|err| err.to_string())
            .unwrap_or_default();
        assert!(err.contains("`redis-tls-rustls` feature"), "{err}");
    }
}
