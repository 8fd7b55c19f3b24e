//! Test certificate authorities and server certificates (rcgen, ECDSA P-256).
//!
//! A [`TestCa`] stands in for a public CA: upstream test servers present certificates it signed,
//! and the proxy under test is told to trust it as its extra upstream CA. [`self_signed`] makes
//! a certificate nobody trusts (the "bad upstream certificate" case).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

pub struct TestCa {
    pub pem: String,
    der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

/// A server certificate chain and key, ready for rustls.
pub struct ServerCert {
    pub chain: Vec<CertificateDer<'static>>,
    pub key_der: Vec<u8>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = p.self_signed(&key).unwrap();
        TestCa {
            pem: cert.pem(),
            der: cert.der().clone(),
            issuer: Issuer::new(p, key),
        }
    }

    /// A leaf for the given DNS names and IPs, signed by this CA.
    pub fn server_cert(&self, names: &[&str], ips: &[IpAddr]) -> ServerCert {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
        for ip in ips {
            p.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        ServerCert {
            chain: vec![cert.der().clone(), self.der.clone()],
            key_der: key.serialize_der(),
        }
    }

    /// A leaf for `names` (DNS names or IP literals), without the CA in its chain: (chain, key).
    pub fn leaf(&self, names: &[&str]) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let (dns, ips): (Vec<&str>, Vec<&str>) =
            names.iter().partition(|n| n.parse::<IpAddr>().is_err());
        let ips: Vec<IpAddr> = ips.iter().map(|i| i.parse().unwrap()).collect();
        let mut cert = self.server_cert(&dns, &ips);
        cert.chain.truncate(1);
        (
            cert.chain,
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_der)),
        )
    }

    /// Writes the CA certificate to `dir/name` and returns the path.
    pub fn write_pem(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, &self.pem).unwrap();
        p
    }
}

/// A self-signed certificate for `names` that no CA vouches for.
pub fn self_signed(names: &[&str]) -> ServerCert {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let p =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    let cert = p.self_signed(&key).unwrap();
    ServerCert {
        chain: vec![cert.der().clone()],
        key_der: key.serialize_der(),
    }
}

/// ALPN of a server that speaks h2 and HTTP/1.1.
pub const H2_H1: &[&[u8]] = &[b"h2", b"http/1.1"];
/// ALPN of a server that speaks HTTP/1.1 only.
pub const H1: &[&[u8]] = &[b"http/1.1"];

/// A rustls server config presenting `cert`, offering h2 and http/1.1.
pub fn server_config(cert: &ServerCert) -> Arc<rustls::ServerConfig> {
    server_config_alpn(cert, H2_H1)
}

/// A rustls server config presenting `cert`, offering the protocols in `alpn`.
pub fn server_config_alpn(cert: &ServerCert, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
    let mut c = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        cert.chain.clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_der.clone())),
    )
    .unwrap();
    c.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(c)
}

/// A rustls client config trusting only `ca_pem` (e.g. the kz CA), with the given ALPN list.
pub fn client_config(ca_pem: &str, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(c)
}
