//! Ed25519 key material on disk and as TLS certificates.
//!
//! A key file holds a PKCS#8 v2 document (what `ring` generates and OpenSSL reads), mode
//! 0600. The TLS certificate is self-signed by the same key with rcgen; only its key
//! matters: `NodeId = SHA-256(SPKI DER)`, and trust comes from attestations and pins, never
//! from the certificate's own fields.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use hopmesh_protocol::attestation::{SigningKey, VerifyingKey};
use hopmesh_protocol::ids::NodeId;
use ring::rand::SystemRandom;
use ring::signature::Ed25519KeyPair;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::TransportError;

/// The constant SNI every hopmesh client sends; it names no node (docs/design.md, "TLS and QUIC settings").
pub const SNI: &str = "hopmesh";

/// An Ed25519 identity: the PKCS#8 document, its signing key and a self-signed certificate.
pub struct Identity {
    pkcs8: Vec<u8>,
    signing: SigningKey,
    cert: CertificateDer<'static>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("key_id", &self.signing.key_id())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// A fresh identity from the OS random generator.
    pub fn generate() -> Result<Self, TransportError> {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| TransportError::Rng)?;
        Self::from_pkcs8(doc.as_ref())
    }

    /// The identity in a PKCS#8 document.
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, TransportError> {
        let signing =
            SigningKey::from_pkcs8(der).map_err(|e| TransportError::Key(e.to_string()))?;
        let key_pair =
            rcgen::KeyPair::try_from(der).map_err(|e| TransportError::Key(e.to_string()))?;
        let params = rcgen::CertificateParams::new(vec![SNI.to_owned()])
            .map_err(|e| TransportError::Key(e.to_string()))?;
        let cert = params
            .self_signed(&key_pair)
            .map_err(|e| TransportError::Key(e.to_string()))?;
        Ok(Self {
            pkcs8: der.to_vec(),
            signing,
            cert: cert.der().clone(),
        })
    }

    /// Loads a key file, refusing one that others can read.
    pub fn load(path: &Path) -> Result<Self, TransportError> {
        let meta = fs::metadata(path).map_err(|e| TransportError::io(path, e))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(TransportError::KeyPermissions(path.display().to_string()));
        }
        let der = fs::read(path).map_err(|e| TransportError::io(path, e))?;
        Self::from_pkcs8(&der)
    }

    /// Writes the key file with mode 0600; refuses to overwrite an existing file.
    pub fn save_new(&self, path: &Path) -> Result<(), TransportError> {
        write_secret_file(path, &self.pkcs8)
    }

    /// The signing key (for attestations, or a node's own use).
    pub fn signing_key(&self) -> &SigningKey {
        &self.signing
    }

    /// The public key.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    /// The DER SPKI of the key.
    pub fn spki(&self) -> Vec<u8> {
        self.verifying_key().to_spki_der()
    }

    /// `SHA-256(SPKI)`.
    pub fn node_id(&self) -> NodeId {
        NodeId::from_spki(&self.spki())
    }

    /// The self-signed certificate.
    pub fn cert(&self) -> CertificateDer<'static> {
        self.cert.clone()
    }

    /// Consumes the identity and returns its signing key (for a process that signs with the
    /// key but never presents it in TLS, like the verifier's attestation key).
    pub fn into_signing_key(self) -> SigningKey {
        self.signing
    }

    /// The PKCS#8 document (the secret key), for this crate's certificate issuing.
    pub(crate) fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    /// A second handle on the same key.
    pub fn try_clone(&self) -> Result<Self, TransportError> {
        Self::from_pkcs8(&self.pkcs8)
    }

    /// The private key for rustls.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.pkcs8.clone()))
    }
}

/// Writes `bytes` to a new file with mode 0600 (fsync'd); refuses to overwrite.
pub fn write_secret_file(path: &Path, bytes: &[u8]) -> Result<(), TransportError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| TransportError::io(path, e))?;
    f.write_all(bytes)
        .map_err(|e| TransportError::io(path, e))?;
    f.sync_all().map_err(|e| TransportError::io(path, e))
}

/// The DER SPKI inside a certificate, or an error if it does not parse.
pub fn cert_spki(cert: &CertificateDer<'_>) -> Result<Vec<u8>, rustls::Error> {
    let ee = webpki::EndEntityCert::try_from(cert)
        .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))?;
    Ok(ee.subject_public_key_info().as_ref().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cert_carries_the_key() {
        let id = Identity::generate().expect("generate");
        let spki = cert_spki(&id.cert()).expect("parse");
        assert_eq!(spki, id.spki());
        assert_eq!(NodeId::from_spki(&spki), id.node_id());
    }

    #[test]
    fn key_files_are_private_and_never_overwritten() {
        let dir = std::env::temp_dir().join(format!("hopmesh-id-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("node.key");
        let _ = fs::remove_file(&path);
        let id = Identity::generate().expect("generate");
        id.save_new(&path).expect("save");
        assert_eq!(
            fs::metadata(&path).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(Identity::load(&path).expect("load").node_id(), id.node_id());
        assert!(id.save_new(&path).is_err(), "must not overwrite");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(
            Identity::load(&path),
            Err(TransportError::KeyPermissions(_))
        ));
        fs::write(dir.join("bad.key"), b"not a key").expect("write");
        fs::set_permissions(dir.join("bad.key"), fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(matches!(
            Identity::load(&dir.join("bad.key")),
            Err(TransportError::Key(_))
        ));
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
