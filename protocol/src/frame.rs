//! Length-delimited frames: `[u32 BE length][version byte][postcard payload]`.
//!
//! The length covers the version byte and the payload. It is checked against the cap of
//! the stream it arrives on **before** anything is buffered or decoded, so a length bomb
//! costs four bytes and a refusal. The version byte sits outside the payload so that a
//! future format can be recognised without decoding this one.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::wire::{DecodeError, EncodeError, decode_canonical, encode_capped};

/// Frame format version.
pub const FRAME_VERSION: u8 = 1;
/// Bytes in the length prefix.
pub const LEN_PREFIX: usize = 4;
/// Cap on control-stream frames (docs/design.md, "Wire hardening": 4 KiB control frames).
pub const CONTROL_CAP: usize = 4 * 1024;
/// Cap on data-plane request headers (docs/design.md, "Wire hardening": 64 KiB).
pub const HEADER_CAP: usize = 64 * 1024;

/// Encodes `msg` as one frame whose body (version + payload) is at most `cap` bytes.
pub fn encode_frame<T: Serialize>(msg: &T, cap: usize) -> Result<Vec<u8>, EncodeError> {
    let payload = encode_capped(msg, cap.saturating_sub(1))?;
    let body_len = payload.len() + 1;
    // Invariant: body_len <= cap, and every cap in this crate fits in u32.
    let len = u32::try_from(body_len).map_err(|_| EncodeError::TooLarge { len: body_len, cap })?;
    let mut out = Vec::with_capacity(LEN_PREFIX + body_len);
    out.extend_from_slice(&len.to_be_bytes());
    out.push(FRAME_VERSION);
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Reads a length prefix and checks it against `cap`. For IO code that reads the prefix,
/// then exactly that many bytes, then calls [`decode_body`].
pub fn body_len(prefix: [u8; LEN_PREFIX], cap: usize) -> Result<usize, DecodeError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len == 0 {
        return Err(DecodeError::EmptyFrame);
    }
    if len > cap {
        return Err(DecodeError::TooLarge { len, cap });
    }
    Ok(len)
}

/// Decodes a frame body (version byte and payload, without the length prefix).
pub fn decode_body<T: Serialize + DeserializeOwned>(
    body: &[u8],
    cap: usize,
) -> Result<T, DecodeError> {
    let (&version, payload) = body.split_first().ok_or(DecodeError::EmptyFrame)?;
    if version != FRAME_VERSION {
        return Err(DecodeError::UnknownVersion(version));
    }
    decode_canonical(payload, cap)
}

/// Decodes one frame from the front of `buf`. Returns `Ok(None)` when more bytes are needed,
/// and the message with the number of bytes it used otherwise.
pub fn decode_frame<T: Serialize + DeserializeOwned>(
    buf: &[u8],
    cap: usize,
) -> Result<Option<(T, usize)>, DecodeError> {
    let Some(prefix) = buf.first_chunk::<LEN_PREFIX>() else {
        return Ok(None);
    };
    let len = body_len(*prefix, cap)?;
    let Some(body) = buf.get(LEN_PREFIX..LEN_PREFIX + len) else {
        return Ok(None);
    };
    Ok(Some((decode_body(body, cap)?, LEN_PREFIX + len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_and_round_trip() {
        let frame = encode_frame(&(7u8, "hi"), CONTROL_CAP).expect("encode");
        assert_eq!(frame, [0, 0, 0, 5, FRAME_VERSION, 7, 2, b'h', b'i']);
        let (back, used): ((u8, String), usize) = decode_frame(&frame, CONTROL_CAP)
            .expect("decode")
            .expect("whole");
        assert_eq!(back, (7, "hi".to_owned()));
        assert_eq!(used, frame.len());
    }

    #[test]
    fn partial_input_needs_more_bytes() {
        let frame = encode_frame(&(7u8, "hi"), CONTROL_CAP).expect("encode");
        for cut in 0..frame.len() {
            assert_eq!(
                decode_frame::<(u8, String)>(&frame[..cut], CONTROL_CAP),
                Ok(None),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn length_bomb_is_refused_before_buffering() {
        // Declares 4 GiB; only the prefix has arrived.
        assert_eq!(
            decode_frame::<u8>(&[0xFF, 0xFF, 0xFF, 0xFF], CONTROL_CAP),
            Err(DecodeError::TooLarge {
                len: u32::MAX as usize,
                cap: CONTROL_CAP
            })
        );
        assert_eq!(
            decode_frame::<u8>(&[0, 0, 0, 0], CONTROL_CAP),
            Err(DecodeError::EmptyFrame)
        );
    }

    #[test]
    fn bad_version_trailing_and_overlong_are_refused() {
        assert_eq!(
            decode_frame::<u8>(&[0, 0, 0, 2, 9, 1], 16),
            Err(DecodeError::UnknownVersion(9))
        );
        assert_eq!(
            decode_frame::<u8>(&[0, 0, 0, 3, 1, 1, 0], 16),
            Err(DecodeError::TrailingBytes(1))
        );
        assert_eq!(
            decode_frame::<u32>(&[0, 0, 0, 3, 1, 0x81, 0x00], 16),
            Err(DecodeError::NonCanonical)
        );
        // Two frames back to back: the first is decoded and the rest left alone.
        let mut two = encode_frame(&1u8, 16).expect("encode");
        two.extend(encode_frame(&2u8, 16).expect("encode"));
        assert_eq!(decode_frame::<u8>(&two, 16), Ok(Some((1, 6))));
    }

    #[test]
    fn encoder_refuses_over_cap() {
        let big = vec![0u8; 100];
        assert!(matches!(
            encode_frame(&big, 50),
            Err(EncodeError::TooLarge { .. })
        ));
    }
}
