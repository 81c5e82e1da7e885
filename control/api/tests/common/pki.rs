//! Test certificates: a CA that signs the server's certificate (localhost, 127.0.0.1, ::1) and
//! a client certificate, and a second, untrusted CA with a client certificate of its own.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use xlb_api::server::{ClientTls, ServerTls};

/// A certificate and its key, PEM.
#[derive(Clone, Debug)]
pub struct Pair {
    pub cert: String,
    pub key: String,
}

#[derive(Debug)]
pub struct Pki {
    pub ca: String,
    pub server: Pair,
    pub client: Pair,
    pub rogue_ca: String,
    pub rogue_client: Pair,
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
}

fn leaf(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> Pair {
    let key = KeyPair::generate().unwrap();
    let mut p =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, names[0]);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![usage];
    let cert = p.signed_by(&key, issuer).unwrap();
    Pair {
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

impl Pki {
    pub fn new() -> Pki {
        let ca = ca("xlb test CA");
        let rogue = ca_named_rogue();
        Pki {
            ca: ca.pem(),
            server: leaf(
                &ca,
                &["localhost", "127.0.0.1", "::1"],
                ExtendedKeyUsagePurpose::ServerAuth,
            ),
            client: leaf(&ca, &["operator"], ExtendedKeyUsagePurpose::ClientAuth),
            rogue_ca: rogue.pem(),
            rogue_client: leaf(&rogue, &["operator"], ExtendedKeyUsagePurpose::ClientAuth),
        }
    }

    /// The server side; `mutual`: clients must present a certificate of the CA.
    pub fn server_tls(&self, mutual: bool) -> ServerTls {
        ServerTls {
            cert_pem: self.server.cert.clone().into_bytes(),
            key_pem: self.server.key.clone().into_bytes(),
            client_ca_pem: mutual.then(|| self.ca.clone().into_bytes()),
        }
    }

    /// A client that trusts `ca` and presents `identity`.
    pub fn client_tls(ca: &str, identity: Option<&Pair>) -> ClientTls {
        ClientTls {
            ca_pem: Some(ca.as_bytes().to_vec()),
            identity: identity.map(|p| (p.cert.clone().into_bytes(), p.key.clone().into_bytes())),
            server_name: None,
        }
    }

    /// Writes every PEM into `dir` (mode 0600): ca.pem, server.pem, server.key, client.pem,
    /// client.key, rogue-ca.pem, rogue-client.pem, rogue-client.key.
    pub fn write(&self, dir: &Path) -> PathBuf {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(dir).unwrap();
        for (name, text) in [
            ("ca.pem", &self.ca),
            ("server.pem", &self.server.cert),
            ("server.key", &self.server.key),
            ("client.pem", &self.client.cert),
            ("client.key", &self.client.key),
            ("rogue-ca.pem", &self.rogue_ca),
            ("rogue-client.pem", &self.rogue_client.cert),
            ("rogue-client.key", &self.rogue_client.key),
        ] {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(dir.join(name))
                .unwrap();
            f.write_all(text.as_bytes()).unwrap();
        }
        dir.to_path_buf()
    }
}

fn ca_named_rogue() -> CertifiedIssuer<'static, KeyPair> {
    // Same name as the real CA: only the key tells them apart.
    ca("xlb test CA")
}
