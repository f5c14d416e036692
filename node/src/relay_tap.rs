//! Test instrumentation of a relay in the real binary, for the netns suite: what a compromised
//! relay sees and what changing one byte does. Enabled only by environment variables (never by
//! the config file, so a deployed config cannot turn it on), and announced with a warning:
//!
//! - `HOPMESH_TEST_RELAY_DUMP=<file>`: append every byte this node relays (both directions,
//!   after the stream header it checked) to `<file>`.
//! - `HOPMESH_TEST_RELAY_FLIP=<flow>:<up|down>:<offset>`: in the `<flow>`th stream this node
//!   relays (1 = the first), flip the lowest bit of byte `<offset>` of the direction toward the
//!   serving node (`up`) or back to the origin (`down`).
//!
//! A relay operator can do all of this with a debugger; the hook only makes it repeatable.

use std::io::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use crate::splice::RelayTap;

/// The environment variable naming the dump file.
pub const DUMP_VAR: &str = "HOPMESH_TEST_RELAY_DUMP";
/// The environment variable naming the byte to flip.
pub const FLIP_VAR: &str = "HOPMESH_TEST_RELAY_FLIP";

/// The tap the two variables describe.
#[derive(Debug)]
pub struct EnvTap {
    dump: Option<Mutex<std::fs::File>>,
    flip: Option<Flip>,
    flows: AtomicU64,
    /// Bytes seen in the flipped direction of the flow to flip.
    seen: AtomicU64,
}

impl EnvTap {
    /// The tap from the environment, `Ok(None)` when neither variable is set.
    pub fn from_env() -> Result<Option<Self>, String> {
        let dump = std::env::var_os(DUMP_VAR);
        let flip = std::env::var(FLIP_VAR).ok();
        if dump.is_none() && flip.is_none() {
            return Ok(None);
        }
        let dump = match dump {
            None => None,
            Some(path) => Some(Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(|e| format!("{DUMP_VAR}: {}: {e}", path.to_string_lossy()))?,
            )),
        };
        let flip = match flip {
            None => None,
            Some(v) => Some(parse_flip(&v).ok_or_else(|| {
                format!("{FLIP_VAR}: `{v}` is not <flow>:<up|down>:<offset> (flow from 1)")
            })?),
        };
        Ok(Some(EnvTap {
            dump,
            flip,
            flows: AtomicU64::new(0),
            seen: AtomicU64::new(0),
        }))
    }
}

/// Which byte to flip.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Flip {
    flow: u64,
    toward_serving: bool,
    offset: u64,
}

fn parse_flip(v: &str) -> Option<Flip> {
    let mut parts = v.split(':');
    let flow: u64 = parts.next()?.parse().ok()?;
    let toward_serving = match parts.next()? {
        "up" => true,
        "down" => false,
        _ => return None,
    };
    let offset = parts.next()?.parse().ok()?;
    (flow >= 1 && parts.next().is_none()).then_some(Flip {
        flow,
        toward_serving,
        offset,
    })
}

impl RelayTap for EnvTap {
    fn begin(&self) -> u64 {
        self.flows.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn chunk(&self, flow: u64, toward_serving: bool, chunk: &mut Bytes) {
        if let Some(dump) = &self.dump {
            let mut f = dump
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let _ = f.write_all(chunk);
        }
        if let Some(Flip {
            flow: at_flow,
            toward_serving: dir,
            offset,
        }) = self.flip
            && at_flow == flow
            && dir == toward_serving
        {
            let start = self.seen.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            if (start..start + chunk.len() as u64).contains(&offset) {
                let mut changed = chunk.to_vec();
                changed[(offset - start) as usize] ^= 0x01;
                *chunk = Bytes::from(changed);
                tracing::warn!(flow, offset, "test hook: flipped one relayed byte");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flip_specs_parse_or_are_refused() {
        assert_eq!(
            parse_flip("2:down:300000"),
            Some(Flip {
                flow: 2,
                toward_serving: false,
                offset: 300_000
            })
        );
        assert!(parse_flip("1:up:0").is_some_and(|f| f.toward_serving));
        for bad in [
            "0:up:1",
            "1:up",
            "x:up:1",
            "1:sideways:1",
            "1:up:1:2",
            "1:up:-1",
        ] {
            assert_eq!(parse_flip(bad), None, "{bad}");
        }
    }

    #[test]
    fn only_the_chosen_flow_and_byte_change() {
        let tap = EnvTap {
            dump: None,
            flip: Some(Flip {
                flow: 2,
                toward_serving: true,
                offset: 5,
            }),
            flows: AtomicU64::new(0),
            seen: AtomicU64::new(0),
        };
        let (one, two) = (tap.begin(), tap.begin());
        let mut c = Bytes::from_static(&[0; 4]);
        tap.chunk(one, true, &mut c);
        assert_eq!(&c[..], &[0; 4]);
        tap.chunk(two, false, &mut c);
        assert_eq!(&c[..], &[0; 4], "only toward the serving node");
        tap.chunk(two, true, &mut c);
        assert_eq!(&c[..], &[0; 4], "bytes 0..4");
        let mut c = Bytes::from_static(&[0; 4]);
        tap.chunk(two, true, &mut c);
        assert_eq!(&c[..], &[0, 1, 0, 0], "byte 5 is the second of 4..8");
    }
}
