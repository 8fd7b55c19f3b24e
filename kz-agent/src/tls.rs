//! TLS client trust for every client kz runs: the proxy's upstreams, the Vault/OpenBao/AWS/KeyZero
//! resolvers, JWKS fetches, the PDP's token-exchange proxy and MCP `fetch`.
//!
//! Three pieces, each in one place so the clients cannot drift apart:
//! - [`system_roots`]: the system's root certificates, parsed once per process (and
//!   [`preload_system_roots`] to start that early). A system certificate that does not parse is
//!   skipped with a warning: one bad file in `/etc/ssl/certs` must not take TLS down.
//! - [`add_ca_file`] / [`trusted_roots`]: an extra CA from a PEM file on top of them (a private
//!   Vault's CA, a test upstream).
//! - [`client_config`]: the one `rustls::ClientConfig` builder: the ring provider, rustls's safe
//!   default protocol versions (TLS 1.2 and 1.3), WebPKI verification against the given roots,
//!   no client certificate, rustls's default session resumption, and the caller's ALPN offer.
//!
//! The proxy's own TLS (its CA, minted leaves, server configs) stays in `proxy::tls`; this module
//! sits below both the data plane and the control plane and depends on neither.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::RootCertStore;
use rustls::client::ClientConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// ALPN protocol id of HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN protocol id of HTTP/1.1.
pub const ALPN_H1: &[u8] = b"http/1.1";

/// Why a CA file (PEM) could not be added to a set of trusted roots.
#[derive(Debug, thiserror::Error)]
pub enum CaFileError {
    #[error("cannot read CA file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("CA file {path} is not valid PEM: {reason}")]
    Pem { path: String, reason: String },
    #[error("CA file {path} holds no certificate")]
    Empty { path: String },
    #[error("CA file {path} has an unusable certificate: {reason}")]
    Unusable { path: String, reason: String },
}

/// The crypto provider of every TLS endpoint kz runs, client and server: ring.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The system's root certificates, read and parsed once per process (~3 ms for a Debian bundle:
/// most of the proxy's start-up), shared by every TLS client kz runs. Callers clone the store
/// when they add an extra CA.
pub fn system_roots() -> &'static RootCertStore {
    static ROOTS: OnceLock<RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            tracing::warn!(error = %e, "some system root certificates could not be loaded");
        }
        let (added, _ignored) = roots.add_parsable_certificates(native.certs);
        tracing::debug!(added, "system root certificates loaded");
        roots
    })
}

/// Starts [`system_roots`] on a thread of its own, so `kz run --blind` parses them while it
/// reads its config and resolves secrets; the proxy then finds them ready (or waits for the
/// rest).
pub fn preload_system_roots() {
    // A thread that cannot be spawned only loses the head start: the first client parses them.
    let _ = std::thread::Builder::new()
        .name("kz-roots".into())
        .spawn(|| {
            system_roots();
        });
}

/// Adds every certificate in the PEM file `path` to `roots` (an extra CA for a private Vault, a
/// test upstream…). A file without a certificate is an error: trusting nothing extra is never
/// what the user meant.
pub fn add_ca_file(roots: &mut RootCertStore, path: &Path) -> Result<(), CaFileError> {
    let shown = || path.display().to_string();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| CaFileError::Read {
            path: shown(),
            reason: e.to_string(),
        })?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaFileError::Pem {
            path: shown(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(CaFileError::Empty { path: shown() });
    }
    for cert in certs {
        roots.add(cert).map_err(|e| CaFileError::Unusable {
            path: shown(),
            reason: e.to_string(),
        })?;
    }
    Ok(())
}

/// The system roots plus, when given, the certificates in `extra_ca` (PEM).
pub fn trusted_roots(extra_ca: Option<&Path>) -> Result<RootCertStore, CaFileError> {
    let mut roots = system_roots().clone();
    if let Some(path) = extra_ca {
        add_ca_file(&mut roots, path)?;
    }
    Ok(roots)
}

/// The client config of every TLS client in kz: verifies the server against `roots` and offers
/// `alpn` (in order; empty offers nothing). Pass an `Arc` to share one store between several
/// configs (the proxy builds one per ALPN offer).
pub fn client_config(roots: impl Into<Arc<RootCertStore>>, alpn: &[&[u8]]) -> ClientConfig {
    let mut config = ClientConfig::builder_with_provider(provider())
        // Fails only for a provider without cipher suites or key-exchange groups for TLS 1.2 and
        // 1.3; ring has both, and the unit test below builds this on every run.
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_config_offers_the_given_alpn_in_order() {
        let c = client_config(RootCertStore::empty(), &[ALPN_H2, ALPN_H1]);
        assert_eq!(c.alpn_protocols, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
        assert!(
            client_config(RootCertStore::empty(), &[])
                .alpn_protocols
                .is_empty()
        );
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let path = std::env::temp_dir().join(format!("kz-tls-empty-{}.pem", std::process::id()));
        std::fs::write(&path, "not a certificate\n").unwrap();
        let mut roots = RootCertStore::empty();
        let err = add_ca_file(&mut roots, &path).unwrap_err();
        assert!(matches!(err, CaFileError::Empty { .. }), "{err}");
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            add_ca_file(&mut roots, &path),
            Err(CaFileError::Read { .. })
        ));
    }
}
