//! The proxy's own TLS: the kz CA and its leaf cache (the agent's side), and the verifying
//! upstream client configs its pools dial with (built by [`crate::tls::client_config`] over the
//! system roots plus an optional extra CA).
//!
//! One leaf key pair per proxy instance signs every minted leaf, so minting is a single ECDSA
//! signature; leaves are cached per host in a bounded LRU together with their three
//! `ServerConfig`s (ALPN h2 / http/1.1 / none), so a cached host costs no allocation per
//! handshake and keeps TLS session resumption working.

use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use lru::LruCache;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::ClientConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig};
use rustls::sign::CertifiedKey;

use crate::tls::{ALPN_H1, ALPN_H2, CaFileError, provider};

const CA_CERT_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca-key.pem";
const CA_CN: &str = "kz proxy CA";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "the CA directory {path} has mode {mode:o}; it must be 0700 (chmod 700 {path}) because it holds the CA private key"
    )]
    LoosePermissions { path: String, mode: u32 },
    #[error("cannot read or write the CA directory {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "the CA directory {path} has only one of ca.pem / ca-key.pem; restore both or remove both to generate a new CA"
    )]
    HalfCa { path: String },
    #[error("cannot use the CA in {path}: {reason}")]
    BadCa { path: String, reason: String },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("TLS configuration failed: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("extra upstream CA: {0}; it must be a PEM file with at least one certificate")]
    ExtraCa(#[from] CaFileError),
}

/// The kz CA: signs leaves for whatever host the agent connects to. Its key never leaves memory
/// (or the 0700 directory it was loaded from).
pub struct CertAuthority {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    leaf_key: KeyPair,
    leaf_signer: Arc<dyn rustls::sign::SigningKey>,
    provider: Arc<CryptoProvider>,
    cache: Mutex<LruCache<String, Arc<Leaf>>>,
}

impl fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertAuthority").finish_non_exhaustive()
    }
}

/// A minted leaf and the server configs that present it.
pub struct Leaf {
    pub key: Arc<CertifiedKey>,
    h2: Arc<ServerConfig>,
    h1: Arc<ServerConfig>,
    none: Arc<ServerConfig>,
}

impl Leaf {
    /// The server config whose ALPN list is exactly `alpn` (or empty).
    pub fn config(&self, alpn: Option<&[u8]>) -> Arc<ServerConfig> {
        match alpn {
            Some(ALPN_H2) => self.h2.clone(),
            Some(ALPN_H1) => self.h1.clone(),
            _ => self.none.clone(),
        }
    }
}

fn ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_CN);
    dn.push(DnType::OrganizationName, "kz");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(p)
}

impl CertAuthority {
    /// A fresh CA for this run (ECDSA P-256), in memory only.
    pub fn generate(cache_size: usize) -> Result<Self, TlsError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let params = ca_params()?;
        let cert = params.self_signed(&key)?;
        Self::from_parts(cert.pem(), cert.der().clone(), params, key, cache_size)
    }

    /// Loads `dir/ca.pem` + `dir/ca-key.pem`, or creates them when neither exists. The directory
    /// must be mode 0700: a looser one is refused, since it holds the CA key.
    pub fn load_or_create(dir: &Path, cache_size: usize) -> Result<Self, TlsError> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let io = |source| TlsError::Io {
            path: dir.display().to_string(),
            source,
        };
        let meta = std::fs::metadata(dir).map_err(io)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(TlsError::LoosePermissions {
                path: dir.display().to_string(),
                mode,
            });
        }
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => {
                let bad = |reason: String| TlsError::BadCa {
                    path: dir.display().to_string(),
                    reason,
                };
                let cert_pem = std::fs::read_to_string(&cert_path).map_err(io)?;
                let key_pem = std::fs::read_to_string(&key_path).map_err(io)?;
                let key = KeyPair::from_pem(&key_pem)
                    .map_err(|e| bad(format!("ca-key.pem is not a usable key ({e})")))?;
                let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
                    .map_err(|e| bad(format!("ca.pem is not a PEM certificate ({e})")))?;
                // Leaves name the issuer by our fixed DN and key id (derived from the key), so
                // rebuilding the params reproduces the issuer of the stored certificate.
                Self::from_parts(cert_pem, der, ca_params()?, key, cache_size)
            }
            (false, false) => {
                let ca = Self::generate(cache_size)?;
                std::fs::write(&cert_path, &ca.cert_pem).map_err(io)?;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&key_path)
                    .map_err(io)?;
                use std::io::Write;
                f.write_all(ca.issuer.key().serialize_pem().as_bytes())
                    .map_err(io)?;
                Ok(ca)
            }
            _ => Err(TlsError::HalfCa {
                path: dir.display().to_string(),
            }),
        }
    }

    /// A CA from its certificate and key as [`CertAuthority::cert_pem`] and
    /// [`CertAuthority::key_pem`] gave them (the node daemon keeps a sandbox's CA across a
    /// restart, so that its agent's trust still holds). `what` names their source in errors.
    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        what: &str,
        cache_size: usize,
    ) -> Result<Self, TlsError> {
        let bad = |reason: String| TlsError::BadCa {
            path: what.to_owned(),
            reason,
        };
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| bad(format!("the CA key is not a usable key ({e})")))?;
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| bad(format!("the CA certificate is not PEM ({e})")))?;
        // As in load_or_create: the fixed DN and the key reproduce the certificate's issuer.
        Self::from_parts(cert_pem.to_owned(), der, ca_params()?, key, cache_size)
    }

    /// The CA's private key (PKCS#8 PEM), zeroed when dropped: only for a root-only store.
    pub fn key_pem(&self) -> zeroize::Zeroizing<String> {
        zeroize::Zeroizing::new(self.issuer.key().serialize_pem())
    }

    fn from_parts(
        cert_pem: String,
        cert_der: CertificateDer<'static>,
        params: CertificateParams,
        key: KeyPair,
        cache_size: usize,
    ) -> Result<Self, TlsError> {
        let provider = provider();
        let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let leaf_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let leaf_signer = provider.key_provider.load_private_key(leaf_der)?;
        let cap = NonZeroUsize::new(cache_size.max(1)).unwrap_or(NonZeroUsize::MIN);
        Ok(Self {
            cert_pem,
            cert_der,
            issuer: Issuer::new(params, key),
            leaf_key,
            leaf_signer,
            provider,
            cache: Mutex::new(LruCache::new(cap)),
        })
    }

    /// The CA certificate (PEM), for the agent's trust bundle. Never the key.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The cached leaf for `host` (a DNS name or an IP literal), minting it on first use. The
    /// cache lock is held while minting so concurrent first connections mint exactly once.
    pub fn leaf(&self, host: &str) -> Result<Arc<Leaf>, TlsError> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = cache.get(host) {
            return Ok(l.clone());
        }
        let leaf = Arc::new(self.mint(host)?);
        cache.put(host.to_owned(), leaf.clone());
        Ok(leaf)
    }

    /// How many leaves are cached (for metrics).
    pub fn cached(&self) -> usize {
        self.cache.lock().map(|c| c.len()).unwrap_or(0)
    }

    fn mint(&self, host: &str) -> Result<Leaf, TlsError> {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        let san = match host.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(host.try_into()?),
        };
        p.subject_alt_names = vec![san];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host);
        p.distinguished_name = dn;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(&self.leaf_key, &self.issuer)?;
        let key = Arc::new(CertifiedKey::new(
            vec![cert.der().clone(), self.cert_der.clone()],
            self.leaf_signer.clone(),
        ));
        let make = |alpn: &[&[u8]]| -> Result<Arc<ServerConfig>, TlsError> {
            let mut c = ServerConfig::builder_with_provider(self.provider.clone())
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(Fixed(key.clone())));
            c.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
            Ok(Arc::new(c))
        };
        Ok(Leaf {
            h2: make(&[ALPN_H2])?,
            h1: make(&[ALPN_H1])?,
            none: make(&[])?,
            key,
        })
    }
}

/// Presents one certificate whatever the client asks for (the leaf was chosen before).
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Verifying upstream client configs, one per ALPN offer.
pub struct Upstream {
    /// Offers h2 and http/1.1.
    pub both: Arc<ClientConfig>,
    pub h1: Arc<ClientConfig>,
    pub h2: Arc<ClientConfig>,
}

impl Upstream {
    /// System roots (rustls-native-certs) plus `extra_ca` (PEM) when given; one root store
    /// shared by the three configs.
    pub fn new(extra_ca: Option<&PathBuf>) -> Result<Self, TlsError> {
        let roots = Arc::new(crate::tls::trusted_roots(extra_ca.map(PathBuf::as_path))?);
        let make = |alpn: &[&[u8]]| Arc::new(crate::tls::client_config(roots.clone(), alpn));
        Ok(Self {
            both: make(&[ALPN_H2, ALPN_H1]),
            h1: make(&[ALPN_H1]),
            h2: make(&[ALPN_H2]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_are_cached_and_chain_to_the_ca() {
        let ca = CertAuthority::generate(2).unwrap();
        let a = ca.leaf("api.example.com").unwrap();
        let b = ca.leaf("api.example.com").unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        let ip = ca.leaf("10.1.2.3").unwrap();
        assert_eq!(ip.key.cert.len(), 2);
        ca.leaf("c").unwrap();
        ca.leaf("d").unwrap();
        assert_eq!(ca.cached(), 2, "bounded");
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
    }

    #[test]
    fn concurrent_first_use_mints_once() {
        let ca = Arc::new(CertAuthority::generate(8).unwrap());
        let leaves: Vec<Arc<Leaf>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| s.spawn(|| ca.leaf("same.example.com").unwrap()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(leaves.iter().all(|l| Arc::ptr_eq(l, &leaves[0])));
        assert!(verifies(&ca, "same.example.com"));
    }

    fn verifies(ca: &CertAuthority, host: &str) -> bool {
        use rustls::client::WebPkiServerVerifier;
        use rustls::client::danger::ServerCertVerifier;
        use rustls::pki_types::{ServerName, UnixTime};
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let v = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .unwrap();
        let leaf = ca.leaf(host).unwrap();
        v.verify_server_cert(
            &leaf.key.cert[0],
            &leaf.key.cert[1..],
            &ServerName::try_from(host.to_owned()).unwrap(),
            &[],
            UnixTime::now(),
        )
        .is_ok()
    }

    #[test]
    fn a_ca_restored_from_its_pem_mints_leaves_the_old_trust_accepts() {
        let ca = CertAuthority::generate(4).unwrap();
        let back = CertAuthority::from_pem(ca.cert_pem(), &ca.key_pem(), "test", 4).unwrap();
        assert_eq!(
            back.cert_der(),
            ca.cert_der(),
            "the agent's trust is unchanged"
        );
        assert!(verifies(&back, "api.example.com"));
        let other = CertAuthority::generate(4).unwrap();
        assert!(matches!(
            CertAuthority::from_pem(ca.cert_pem(), "not a key", "test", 4),
            Err(TlsError::BadCa { .. })
        ));
        assert!(matches!(
            CertAuthority::from_pem("not a certificate", &other.key_pem(), "test", 4),
            Err(TlsError::BadCa { .. })
        ));
    }

    #[test]
    fn ca_dir_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("kz-ca-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(matches!(
            CertAuthority::load_or_create(&dir, 4),
            Err(TlsError::LoosePermissions { .. })
        ));
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let a = CertAuthority::load_or_create(&dir, 4).unwrap();
        let b = CertAuthority::load_or_create(&dir, 4).unwrap();
        assert_eq!(a.cert_pem(), b.cert_pem());
        // Leaves minted by the reloaded CA chain to the stored certificate.
        assert!(verifies(&a, "api.example.com"));
        assert!(verifies(&b, "api.example.com"));
        assert!(verifies(&b, "10.0.0.7"));
        let key_mode = std::fs::metadata(dir.join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(key_mode & 0o777, 0o600);
        std::fs::remove_file(dir.join(CA_KEY_FILE)).unwrap();
        assert!(matches!(
            CertAuthority::load_or_create(&dir, 4),
            Err(TlsError::HalfCa { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
