//! A verifier's TLS key certified by the mesh's signing key, so that nodes accept any replica
//! of the verifier without new pins.
//!
//! A node pins two things (`pins.json`): the first verifier's TLS key and the signing keys.
//! Every verifier presents a leaf certificate for its own TLS key signed by the signing key
//! (issuer `CN=hopmesh signing key`, name [`SNI`], EKU serverAuth, valid
//! [`VERIFIER_CERT_LIFETIME`]). A node accepts a verifier whose key matches the TLS pin, or
//! whose certificate verifies against a pinned signing key (webpki path validation with the
//! signing key as the trust anchor): a replica with a TLS key of its own is accepted, and one
//! certified by any other key is refused. The signing key can already sign attestations for
//! any key, so trusting what it certifies adds no new trust.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hopmesh_protocol::attestation::VerifyingKey;
use hopmesh_protocol::time::{Clock, UnixTime};
use rustls::pki_types::{CertificateDer, ServerName, TrustAnchor};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::TransportError;
use crate::identity::{Identity, SNI};

/// The common name of the signing key as an issuer of verifier certificates.
pub const SIGNING_KEY_CN: &str = "hopmesh signing key";
/// How long a verifier certificate is valid.
pub const VERIFIER_CERT_LIFETIME: Duration = Duration::from_secs(30 * 86_400);
/// A serving verifier certifies its key again when its certificate has less than this left.
pub const VERIFIER_CERT_RENEW_BEFORE: Duration = Duration::from_secs(10 * 86_400);
/// The certificate's validity starts this long before it was made (clocks differ).
pub const VERIFIER_CERT_BACKDATE: Duration = Duration::from_secs(86_400);

fn key_err(e: impl std::fmt::Display) -> TransportError {
    TransportError::Key(e.to_string())
}

fn time_of(secs: u64) -> Result<time::OffsetDateTime, TransportError> {
    let secs = i64::try_from(secs).map_err(key_err)?;
    time::OffsetDateTime::from_unix_timestamp(secs).map_err(key_err)
}

fn issuer_params() -> rcgen::CertificateParams {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, SIGNING_KEY_CN);
    params
}

/// Certifies `tls`'s key with `signing`, valid from a day before `now` for
/// [`VERIFIER_CERT_LIFETIME`].
pub fn certify(
    signing: &Identity,
    tls: &Identity,
    now: UnixTime,
) -> Result<CertificateDer<'static>, TransportError> {
    let signing_pair = rcgen::KeyPair::try_from(signing.pkcs8()).map_err(key_err)?;
    let tls_pair = rcgen::KeyPair::try_from(tls.pkcs8()).map_err(key_err)?;
    let mut params = rcgen::CertificateParams::new(vec![SNI.to_owned()]).map_err(key_err)?;
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = time_of(
        now.as_secs()
            .saturating_sub(VERIFIER_CERT_BACKDATE.as_secs()),
    )?;
    params.not_after = time_of(
        now.as_secs()
            .saturating_add(VERIFIER_CERT_LIFETIME.as_secs()),
    )?;
    let issuer = rcgen::Issuer::new(issuer_params(), signing_pair);
    let cert = params.signed_by(&tls_pair, &issuer).map_err(key_err)?;
    Ok(cert.der().clone())
}

/// The DER contents of the issuer name `CN=hopmesh signing key` (as a trust anchor's subject).
fn anchor_subject() -> Vec<u8> {
    let cn = SIGNING_KEY_CN.as_bytes();
    // UTF8String, in AttributeTypeAndValue (OID 2.5.4.3), in a SET: short-form lengths.
    let mut atv = vec![0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, cn.len() as u8];
    atv.extend_from_slice(cn);
    let mut set = vec![0x30, atv.len() as u8];
    set.extend(atv);
    let mut out = vec![0x31, set.len() as u8];
    out.extend(set);
    out
}

/// The trust anchor a pinned signing key stands for.
fn anchor(key: &VerifyingKey) -> TrustAnchor<'static> {
    let spki = key.to_spki_der();
    TrustAnchor {
        subject: anchor_subject().into(),
        // The SPKI's contents, without its outer SEQUENCE header (two bytes for Ed25519).
        subject_public_key_info: spki[2..].to_vec().into(),
        name_constraints: None,
    }
}

/// Checks that `cert` is a verifier certificate issued by one of `keys`, valid at `now` (Ed25519
/// only); the reason otherwise.
pub fn check_certified(
    cert: &CertificateDer<'_>,
    keys: &[VerifyingKey],
    now: rustls::pki_types::UnixTime,
) -> Result<(), String> {
    let ee = webpki::EndEntityCert::try_from(cert).map_err(|e| format!("certificate: {e}"))?;
    let anchors: Vec<TrustAnchor<'static>> = keys.iter().map(anchor).collect();
    ee.verify_for_usage(
        &[webpki::ring::ED25519],
        &anchors,
        &[],
        now,
        webpki::KeyUsage::server_auth(),
        None,
        None,
    )
    .map_err(|e| format!("not certified by a pinned signing key: {e}"))?;
    let name = ServerName::try_from(SNI).map_err(|e| e.to_string())?;
    ee.verify_is_valid_for_subject_name(&name)
        .map_err(|e| format!("certificate name: {e}"))
}

/// The verifier's TLS certificate, certified again by the signing key before it runs out.
pub struct CertifiedTlsKey {
    signing: Identity,
    tls: Identity,
    clock: Arc<dyn Clock>,
    current: Mutex<(Arc<CertifiedKey>, u64)>,
}

impl std::fmt::Debug for CertifiedTlsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertifiedTlsKey")
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl CertifiedTlsKey {
    /// Certifies `tls` with `signing` now.
    pub fn new(
        signing: Identity,
        tls: Identity,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, TransportError> {
        let now = clock.now();
        let first = Self::make(&signing, &tls, now)?;
        Ok(Self {
            signing,
            tls,
            clock,
            current: Mutex::new(first),
        })
    }

    fn make(
        signing: &Identity,
        tls: &Identity,
        now: UnixTime,
    ) -> Result<(Arc<CertifiedKey>, u64), TransportError> {
        let cert = certify(signing, tls, now)?;
        let key = crate::tls::provider()
            .key_provider
            .load_private_key(tls.private_key())?;
        let renew_at = now.as_secs().saturating_add(
            VERIFIER_CERT_LIFETIME
                .saturating_sub(VERIFIER_CERT_RENEW_BEFORE)
                .as_secs(),
        );
        Ok((Arc::new(CertifiedKey::new(vec![cert], key)), renew_at))
    }

    /// The certificate served now (renewed first if due).
    pub fn current(&self) -> Arc<CertifiedKey> {
        let now = self.clock.now();
        let mut cur = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if now.as_secs() >= cur.1 {
            match Self::make(&self.signing, &self.tls, now) {
                Ok(next) => *cur = next,
                Err(e) => tracing::error!(error = %e, "renewing the verifier certificate failed"),
            }
        }
        cur.0.clone()
    }
}

impl ResolvesServerCert for CertifiedTlsKey {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hopmesh_protocol::time::UnixTime as Now;

    fn pki_now(secs: u64) -> rustls::pki_types::UnixTime {
        rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_secs(secs))
    }

    const T: u64 = 1_800_000_000;

    #[test]
    fn the_anchor_subject_is_what_rcgen_writes() {
        let signing = Identity::generate().expect("id");
        let pair = rcgen::KeyPair::try_from(signing.pkcs8()).expect("pair");
        let ca = issuer_params().self_signed(&pair).expect("self-signed");
        let parsed = webpki::anchor_from_trusted_cert(ca.der()).expect("anchor");
        assert_eq!(parsed.subject.as_ref(), anchor_subject().as_slice());
        let mine = anchor(&signing.verifying_key());
        assert_eq!(
            parsed.subject_public_key_info.as_ref(),
            mine.subject_public_key_info.as_ref()
        );
    }

    #[test]
    fn a_certified_key_verifies_only_under_its_signing_key_and_in_time() {
        let signing = Identity::generate().expect("id");
        let other = Identity::generate().expect("id");
        let tls = Identity::generate().expect("id");
        let cert = certify(&signing, &tls, Now::from_secs(T)).expect("certify");
        assert_eq!(
            crate::identity::cert_spki(&cert).expect("spki"),
            tls.spki(),
            "the leaf carries the TLS key"
        );
        let keys = [other.verifying_key(), signing.verifying_key()];
        check_certified(&cert, &keys, pki_now(T)).expect("certified");
        check_certified(&cert, &keys, pki_now(T - 3600)).expect("backdated for skew");
        let e = check_certified(&cert, &[other.verifying_key()], pki_now(T)).expect_err("other");
        assert!(e.contains("not certified"), "{e}");
        let late = T + VERIFIER_CERT_LIFETIME.as_secs() + 1;
        let e = check_certified(&cert, &keys, pki_now(late)).expect_err("expired");
        assert!(e.contains("not certified"), "{e}");
        let early = T - VERIFIER_CERT_BACKDATE.as_secs() - 1;
        assert!(
            check_certified(&cert, &keys, pki_now(early)).is_err(),
            "not yet valid"
        );
        // A self-signed certificate (what a verifier presented before) is not certified.
        let e = check_certified(&tls.cert(), &keys, pki_now(T)).expect_err("self-signed");
        assert!(e.contains("not certified"), "{e}");
        // Signed by the TLS key itself, claiming the issuer name: refused.
        let forged = certify(&tls, &tls, Now::from_secs(T)).expect("forged");
        assert!(check_certified(&forged, &keys, pki_now(T)).is_err());
        assert!(
            check_certified(&CertificateDer::from(vec![0x30, 0x00]), &keys, pki_now(T)).is_err()
        );
    }

    #[derive(Debug)]
    struct At(std::sync::atomic::AtomicU64);
    impl Clock for At {
        fn now(&self) -> Now {
            Now::from_secs(self.0.load(std::sync::atomic::Ordering::SeqCst))
        }
    }

    #[test]
    fn the_served_certificate_is_renewed_before_it_runs_out() {
        let signing = Identity::generate().expect("id");
        let clock = Arc::new(At(T.into()));
        let resolver = CertifiedTlsKey::new(
            Identity::from_pkcs8(signing.pkcs8()).expect("copy"),
            Identity::generate().expect("id"),
            clock.clone(),
        )
        .expect("resolver");
        let first = resolver.current();
        assert!(
            Arc::ptr_eq(&first, &resolver.current()),
            "not renewed early"
        );
        let due = T + (VERIFIER_CERT_LIFETIME - VERIFIER_CERT_RENEW_BEFORE).as_secs();
        clock.0.store(due, std::sync::atomic::Ordering::SeqCst);
        let renewed = resolver.current();
        assert!(!Arc::ptr_eq(&first, &renewed), "renewed when due");
        let keys = [signing.verifying_key()];
        let past_first = T + VERIFIER_CERT_LIFETIME.as_secs() + 1;
        assert!(check_certified(&first.cert[0], &keys, pki_now(past_first)).is_err());
        check_certified(&renewed.cert[0], &keys, pki_now(past_first)).expect("the renewed one");
    }
}
