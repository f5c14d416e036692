//! The authority's audit plumbing: best-effort records (a failure is counted and logged, never
//! fatal), durable records that gate the operation they record, the signed head anchored in
//! the store, and periodic signed checkpoints.
//!
//! # Order of a durable operation (revoke, ban, reissue, a node's report)
//! decide → **audit record, fsynced** → **anchor** (the signed head, in the store) → commit
//! (store) → apply (in memory) → acknowledge. The record is written ahead of the commit:
//! - the audit write fails (a full disk): nothing is committed or applied, the caller gets an
//!   error ([`StoreError::Audit`], HTTP 500, the CLI exits 1);
//! - the anchor or the commit fails: nothing is applied, the caller gets an error, and a
//!   best-effort `<event>_aborted` record names the seq of the record that did not take effect;
//! - a crash between the record and the commit leaves a record of an operation that did not
//!   happen (the store is the truth for state). The reverse — an acknowledged operation with no
//!   record on disk — cannot happen.
//!
//! The anchor only ever names a record already on disk, so it never runs ahead of the log:
//! a log that ends before the anchored seq, or holds another hash there, was cut or rewritten.
//!
//! # Checkpoints
//! At most every [`CHECKPOINT_INTERVAL_SECS`] (from [`Authority::tick`]) and only when the log
//! grew: fsync the log, anchor its signed head in the store, then append an
//! [`audit::CHECKPOINT_EVENT`] record holding that signed head. Records written since the last
//! anchor (best-effort ones) can be cut undetected for at most that long.
//!
//! Signed with the verifier's signing key (the one attestations and revocation lists use,
//! under its own domain string, see [`SignedHead`]): it is in the authority already, and its
//! public half is pinned by every node and in `pins.json`, so `audit verify` (or anyone with
//! the pins) can check a log without any secret. An HMAC key would need a new secret file and
//! could not be checked off the host.

use hopmesh_protocol::time::UnixTime;
use hopmesh_transport::audit::{self, SignedHead};
use hopmesh_transport::fields;
use serde_json::{Map, Value};

use super::Authority;
use crate::store::{StoreError, lock};

/// Most seconds between signed checkpoints while the audit log grows (10 s): the window in
/// which best-effort records can be cut from the tail without `audit verify` noticing.
pub const CHECKPOINT_INTERVAL_SECS: u64 = 10;

/// When the last checkpoint was written.
#[derive(Debug, Default)]
pub(super) struct Checkpoints {
    /// When one was last attempted.
    last_at: Option<UnixTime>,
    /// The seq of the last checkpoint record (nothing new since: no checkpoint due).
    last_seq: u64,
}

impl Authority {
    /// A best-effort record: a failure is counted (`audit_write_failures{kind="best_effort"}`)
    /// and logged; the operation goes on.
    pub(super) fn audit(&mut self, now: UnixTime, event: &str, fields: Map<String, Value>) {
        if let Err(e) = self.audit.record(now.as_secs(), event, fields) {
            self.metrics.audit_failed("best_effort");
            tracing::error!(error = %e, event, "audit log write failed; the record is lost");
        }
    }

    /// A durable record, written ahead of the operation it records, then anchored. An error
    /// means the operation must not be committed nor acknowledged (see the module docs).
    pub(super) fn audit_durable(
        &mut self,
        now: UnixTime,
        event: &str,
        fields: Map<String, Value>,
    ) -> Result<(), StoreError> {
        if let Err(e) = self.audit.record_durable(now.as_secs(), event, fields) {
            self.metrics.audit_failed("durable");
            tracing::error!(error = %e, event, "durable audit write failed; the operation is refused");
            return Err(e.into());
        }
        let signed = SignedHead::sign(&self.audit.head(), self.issuer.key());
        let anchored = lock(&self.store).put_audit_anchor(&signed);
        if let Err(e) = anchored {
            self.metrics.audit_failed("anchor");
            tracing::error!(error = %e, event, "anchoring the audit head failed; the operation is refused");
            self.audit_aborted(now, event, &e);
            return Err(e);
        }
        Ok(())
    }

    /// After a durable record whose operation then failed: records that it did not take
    /// effect (best effort).
    pub(super) fn audit_aborted(
        &mut self,
        now: UnixTime,
        event: &str,
        error: &dyn std::fmt::Display,
    ) {
        let seq = self.audit.head().seq;
        self.audit(
            now,
            &format!("{event}_aborted"),
            fields! {"record" => seq, "error" => error.to_string()},
        );
    }

    /// Writes a signed checkpoint if one is due (see the module docs). Failures are counted
    /// (`audit_write_failures{kind="checkpoint"}`) and retried after the interval.
    pub(super) fn checkpoint_if_due(&mut self, now: UnixTime) {
        let head = self.audit.head();
        if head.seq <= self.checkpoints.last_seq
            || self.checkpoints.last_at.is_some_and(|at| {
                now.as_secs() < at.as_secs().saturating_add(CHECKPOINT_INTERVAL_SECS)
            })
        {
            return;
        }
        self.checkpoints.last_at = Some(now);
        let signed = SignedHead::sign(&head, self.issuer.key());
        let done = self
            .audit
            .sync()
            .map_err(StoreError::from)
            .and_then(|()| lock(&self.store).put_audit_anchor(&signed));
        if let Err(e) = done {
            self.metrics.audit_failed("checkpoint");
            tracing::error!(error = %e, "audit checkpoint failed");
            return;
        }
        match self
            .audit
            .record(now.as_secs(), audit::CHECKPOINT_EVENT, signed.to_fields())
        {
            Ok(seq) => self.checkpoints.last_seq = seq,
            Err(e) => {
                self.metrics.audit_failed("checkpoint");
                tracing::error!(error = %e, "audit checkpoint record failed");
            }
        }
    }
}
