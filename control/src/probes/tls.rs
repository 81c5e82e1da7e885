//! TLS for the HTTPS health probes (rustls, ring provider).
//!
//! Cloud balancers probe HTTPS members without checking their certificate: a member is
//! healthy if it completes a TLS handshake and answers the request with 200, whatever
//! certificate it shows (self-signed, expired, another name). That is the default here too.
//! With `tls_verify` the chain is checked against `tls_ca_file` (a PEM bundle) or the system's
//! trust store, and the name against `tls_server_name` (default: the member's address). The
//! handshake's signatures are checked in both modes: an unverified certificate is still the
//! one the member holds the key of.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring, verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// An HTTPS probe's TLS settings.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TlsSpec {
    pub verify: bool,
    /// SNI and the name checked; `None`: the member's address (no SNI is sent for an address).
    pub server_name: Option<String>,
    /// PEM CA bundle for verification; `None`: the system's trust store.
    pub ca_file: Option<String>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// Client configurations by (verify, CA file): building one reads the trust store, which is
/// not done per attempt. [`forget_configs`] drops them (the probe thread does on every new
/// configuration generation, so an edited CA file is read again).
type Configs = Mutex<HashMap<(bool, Option<String>), Arc<ClientConfig>>>;

fn cache() -> &'static Configs {
    static CACHE: OnceLock<Configs> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

pub fn forget_configs() {
    cache()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clear();
}

/// The client configuration for `spec` (cached).
pub fn client_config(spec: &TlsSpec) -> Result<Arc<ClientConfig>, String> {
    let key = (spec.verify, spec.ca_file.clone());
    if let Some(c) = cache()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&key)
    {
        return Ok(Arc::clone(c));
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let config = if spec.verify {
        builder
            .with_root_certificates(roots(spec.ca_file.as_deref())?)
            .with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider())))
            .with_no_client_auth()
    };
    let config = Arc::new(config);
    cache()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(key, Arc::clone(&config));
    Ok(config)
}

fn roots(ca_file: Option<&str>) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("tls_ca_file {path}: {e}"))?
                .collect::<Result<_, _>>()
                .map_err(|e| format!("tls_ca_file {path}: {e}"))?;
            if certs.is_empty() {
                return Err(format!("tls_ca_file {path}: no certificate in it"));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| format!("tls_ca_file {path}: {e}"))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(
                    "no trusted certificate authority in the system's store; set tls_ca_file"
                        .into(),
                );
            }
        }
    }
    Ok(roots)
}

/// TLS over `tcp` to `member` as `spec` says.
pub async fn connect(
    tcp: TcpStream,
    spec: &TlsSpec,
    member: IpAddr,
) -> Result<TlsStream<TcpStream>, String> {
    let config = client_config(spec)?;
    let name = match &spec.server_name {
        Some(n) => {
            ServerName::try_from(n.clone()).map_err(|e| format!("tls_server_name {n:?}: {e}"))?
        }
        None => ServerName::IpAddress(member.into()),
    };
    TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))
}

/// Accepts any certificate chain and name; still checks the handshake's signatures against
/// the certificate the member presented.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
