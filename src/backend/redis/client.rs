//! The Redis client that every connection of a backend comes from (the shared command
//! connection and each instance's pub/sub connection), so that a `rediss://` URL and the
//! TLS settings apply to all of them. Everything about them is checked here, when the
//! backend is built, so that a misconfiguration fails there and not at the first command.

use crate::error::{BackendError, MeshError};

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

/// A client for `url`, over TLS when its scheme asks for it.
pub(super) fn open(url: &str, tls: &TlsSettings) -> Result<redis::Client, MeshError> {
    if !names_tls(url) {
        if tls.is_set() {
            return Err(misconfigured(
                "TLS certificates were given for a Redis URL without TLS: use a rediss:// URL",
            ));
        }
        return redis::Client::open(url).map_err(invalid_url);
    }
    open_tls(url, tls)
}

#[cfg(not(feature = "redis-tls-rustls"))]
fn open_tls(_url: &str, _tls: &TlsSettings) -> Result<redis::Client, MeshError> {
    Err(misconfigured(
        "a rediss:// URL needs TLS support: enable tower-mesh's `redis-tls-rustls` feature",
    ))
}

#[cfg(feature = "redis-tls-rustls")]
fn open_tls(url: &str, tls: &TlsSettings) -> Result<redis::Client, MeshError> {
    use rustls::pki_types::pem::PemObject;

    // The redis crate builds each connection's rustls configuration on the process-wide
    // default crypto provider, and rustls panics when there is none it can pick. Installing
    // ring fails harmlessly when the application installed a provider first: that one stays.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = if tls.is_set() {
        // An empty root store would refuse every server, at connect time: say so now.
        if let Some(pem) = &tls.root_certificates {
            if rustls::pki_types::CertificateDer::pem_slice_iter(pem)
                .next()
                .is_none()
            {
                return Err(misconfigured(
                    "the TLS root certificates hold no PEM CERTIFICATE block",
                ));
            }
        }
        let certificates = redis::TlsCertificates {
            client_tls: tls
                .client_identity
                .as_ref()
                .map(|(chain, key)| redis::ClientTlsConfig {
                    client_cert: chain.clone(),
                    client_key: key.clone(),
                }),
            root_cert: tls.root_certificates.clone(),
        };
        redis::Client::build_with_tls(url, certificates).map_err(|err| {
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
        return Err(misconfigured(
            "rediss://...#insecure (no certificate verification) is not supported: trust the \
             server's CA with RedisBackendBuilder::tls_root_certificates",
        ));
    }
    Ok(client)
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
