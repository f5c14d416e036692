//! Hand-built rustls configurations (docs/design.md, "TLS and QUIC settings").
//!
//! - TLS 1.3 only; AES-128-GCM first (measured 5–13 % faster than ring's default
//!   AES-256-GCM on these machines, docs/design.md, pitfall 9).
//! - 0-RTT off and session resumption off on both sides: a resumed handshake skips the
//!   certificate verifiers and would let a revoked key back in (docs/design.md, pitfall 3).
//! - Custom verifiers that **do** verify the TLS 1.3 `CertificateVerify` signature with
//!   `rustls::crypto::verify_tls13_signature`; a pin or attestation check alone is forgeable
//!   because certificates are public (docs/design.md, pitfall 4).
//! - Only Ed25519 keys; identity is `SHA-256(SPKI)`; authorization is a synchronous lookup in
//!   an in-memory snapshot ([`PeerAuthorizer`]), never IO inside a handshake callback.

use std::fmt;
use std::sync::Arc;

use hopmesh_protocol::attestation::VerifyingKey;
use hopmesh_protocol::ids::NodeId;
use rustls::client::Resumption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::NoServerSessionStorage;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2_shim::sha256;

use crate::TransportError;
use crate::identity::{Identity, cert_spki};

/// ALPN of node-to-node data connections.
pub const ALPN_DATA: &[u8] = b"hopmesh/1";
/// ALPN of node-to-verifier control connections.
pub const ALPN_CONTROL: &[u8] = b"hopmesh-verifier/1";

/// The ring provider restricted to TLS 1.3 suites, AES-128-GCM first.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::{cipher_suite, default_provider};
    let mut p = default_provider();
    p.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// Decides from an in-memory snapshot whether a peer key may complete a handshake.
/// Implementations must not block or do IO: they run inside the TLS state machine.
pub trait PeerAuthorizer: Send + Sync + fmt::Debug {
    /// `Ok` to let the peer in; `Err(reason)` to fail the handshake.
    fn authorize(&self, node: &NodeId, spki: &[u8]) -> Result<(), String>;
}

/// Accepts any Ed25519 key (whose possession the handshake signature proves). The verifier
/// uses it: enrollment and refresh decide afterwards what the key may do.
#[derive(Debug)]
pub struct AnyKey;

impl PeerAuthorizer for AnyKey {
    fn authorize(&self, _: &NodeId, _: &[u8]) -> Result<(), String> {
        Ok(())
    }
}

/// What a client expects of the server it dials.
#[derive(Debug, Clone)]
pub enum ServerExpectation {
    /// A server whose SPKI must hash to this pin (no trust on first use).
    Pinned([u8; 32]),
    /// The verifier: its SPKI hashes to the pin (the first verifier's key), or its certificate
    /// is certified by one of the pinned signing keys (any replica; `verifier_cert`).
    Verifier {
        /// The TLS pin.
        pin: [u8; 32],
        /// The pinned signing keys.
        signing_keys: Vec<hopmesh_protocol::attestation::VerifyingKey>,
    },
    /// A node: it must be this node and pass the authorizer.
    Node(NodeId, Arc<dyn PeerAuthorizer>),
}

struct Verifier {
    algs: WebPkiSupportedAlgorithms,
    expect: Expect,
}

enum Expect {
    Server(ServerExpectation),
    Client(Arc<dyn PeerAuthorizer>),
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("hopmesh::Verifier")
    }
}

fn refuse(reason: impl Into<String>) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(Refused(reason.into())),
    )))
}

/// A handshake refusal with its reason, carried inside `rustls::Error`.
#[derive(Debug)]
struct Refused(String);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

impl Verifier {
    fn check_key(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        if !intermediates.is_empty() {
            return Err(refuse("certificate chains are not accepted"));
        }
        let spki = cert_spki(end_entity)?;
        if VerifyingKey::from_spki_der(&spki).is_none() {
            return Err(refuse("only Ed25519 keys are accepted"));
        }
        let node = NodeId::from_spki(&spki);
        match &self.expect {
            Expect::Server(ServerExpectation::Pinned(pin)) => {
                if sha256(&spki) != *pin {
                    return Err(refuse("server key does not match the pinned verifier key"));
                }
                Ok(())
            }
            Expect::Server(ServerExpectation::Verifier { pin, signing_keys }) => {
                if sha256(&spki) == *pin {
                    return Ok(());
                }
                crate::verifier_cert::check_certified(end_entity, signing_keys, now).map_err(|e| {
                    refuse(format!(
                        "the verifier's key is neither the pinned one nor certified: {e}"
                    ))
                })
            }
            Expect::Server(ServerExpectation::Node(want, authz)) => {
                if node != *want {
                    return Err(refuse(format!(
                        "reached node {} instead of {}",
                        node.short(),
                        want.short()
                    )));
                }
                authz.authorize(&node, &spki).map_err(refuse)
            }
            Expect::Client(authz) => authz.authorize(&node, &spki).map_err(refuse),
        }
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check_key(end_entity, intermediates, now)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not supported".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

impl ClientCertVerifier for Verifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check_key(end_entity, intermediates, now)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not supported".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// A server config: mutual TLS 1.3 with `alpn`, clients checked by `authz`, no tickets, no
/// session cache, no early data.
pub fn server_config(
    identity: &Identity,
    alpn: &[u8],
    authz: Arc<dyn PeerAuthorizer>,
) -> Result<rustls::ServerConfig, TransportError> {
    let provider = provider();
    let verifier = Arc::new(Verifier {
        algs: provider.signature_verification_algorithms,
        expect: Expect::Client(authz),
    });
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![identity.cert()], identity.private_key())?;
    Ok(harden_server(cfg, alpn))
}

fn harden_server(mut cfg: rustls::ServerConfig, alpn: &[u8]) -> rustls::ServerConfig {
    cfg.alpn_protocols = vec![alpn.to_vec()];
    cfg.max_early_data_size = 0;
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(NoServerSessionStorage {});
    cfg
}

/// [`server_config`], its certificate chosen by `certs` at each handshake (the verifier's
/// certified, renewed certificate: `verifier_cert::CertifiedTlsKey`).
pub fn server_config_with(
    certs: Arc<dyn rustls::server::ResolvesServerCert>,
    alpn: &[u8],
    authz: Arc<dyn PeerAuthorizer>,
) -> Result<rustls::ServerConfig, TransportError> {
    let provider = provider();
    let verifier = Arc::new(Verifier {
        algs: provider.signature_verification_algorithms,
        expect: Expect::Client(authz),
    });
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(certs);
    Ok(harden_server(cfg, alpn))
}

/// A client config for one kind of server: presents `identity`, checks the server as
/// `expect` says, resumption and early data disabled.
pub fn client_config(
    identity: &Identity,
    alpn: &[u8],
    expect: ServerExpectation,
) -> Result<rustls::ClientConfig, TransportError> {
    let provider = provider();
    let verifier = Arc::new(Verifier {
        algs: provider.signature_verification_algorithms,
        expect: Expect::Server(expect),
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![identity.cert()], identity.private_key())?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    cfg.resumption = Resumption::disabled();
    cfg.enable_early_data = false;
    Ok(cfg)
}

/// SHA-256 via ring, kept private to this module.
mod sha2_shim {
    pub(super) fn sha256(data: &[u8]) -> [u8; 32] {
        let d = ring::digest::digest(&ring::digest::SHA256, data);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        out
    }
}

/// The pin of a TLS key: `SHA-256(SPKI DER)`.
pub fn spki_pin(spki: &[u8]) -> [u8; 32] {
    sha256(spki)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_disable_resumption_and_early_data() {
        let id = Identity::generate().expect("identity");
        let s = server_config(&id, ALPN_DATA, Arc::new(AnyKey)).expect("server");
        assert_eq!(s.max_early_data_size, 0);
        assert_eq!(s.send_tls13_tickets, 0);
        assert!(!s.session_storage.can_cache());
        assert_eq!(s.alpn_protocols, vec![ALPN_DATA.to_vec()]);
        let c =
            client_config(&id, ALPN_CONTROL, ServerExpectation::Pinned([0; 32])).expect("client");
        assert!(!c.enable_early_data);
        assert_eq!(c.alpn_protocols, vec![ALPN_CONTROL.to_vec()]);
        assert_eq!(
            format!("{:?}", c.resumption),
            format!("{:?}", Resumption::disabled())
        );
        let suites: Vec<_> = provider().cipher_suites.iter().map(|s| s.suite()).collect();
        assert_eq!(suites[0], rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        assert!(
            suites
                .iter()
                .all(|s| format!("{s:?}").starts_with("TLS13_"))
        );
    }
}
