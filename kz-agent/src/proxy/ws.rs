//! WebSocket relay after a 101, frames re-framed in both directions:
//! - client → server ([`relay_up`]): payloads follow the request body's rules (a masked token
//!   is swapped only for a secret whose `credential_location` lists `body` and whose scope holds
//!   the host; anywhere else it stays masked, and with `refuse_out_of_scope` the relay is closed
//!   before the frame goes out). Frames are unmasked, rewritten, and masked again with a fresh
//!   key, as RFC 6455 wants of a client.
//! - server → client ([`relay_down`]): payloads scrubbed (real → masked, every spelling
//!   `egress::scrub` knows), so an upstream echoing a secret over a WebSocket does not hand it
//!   to the agent.
//!
//! Either way:
//!
//! - data frames (text, binary, continuation) are scrubbed as one stream per message, so a
//!   value split across a message's fragments is found;
//! - control frames (ping, pong, close) are scrubbed one by one: each is complete, may arrive
//!   between two fragments of a message (without disturbing that message's carried tail), and
//!   a pong the agent's client sends back for a ping repeats what the ping held. A close
//!   frame's 2-byte status code is kept and its reason scrubbed. A control payload may hold at
//!   most 125 bytes; when the replacement (a masked token longer than the value) makes it
//!   longer, it is cut to 125 (a close reason at a UTF-8 boundary): what is cut is replacement
//!   text, never part of a value.
//!
//! Compression extensions are stripped from the handshake by the caller, so payloads are
//! plain; a compressed (RSV1) or oversized frame closes the relay instead of leaking.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::egress::rewrite::StreamRewriter;

/// Largest frame buffered for scrubbing.
const MAX_FRAME: u64 = 16 * 1024 * 1024;

/// Largest control frame payload (RFC 6455 §5.5).
const MAX_CONTROL: usize = 125;

const CLOSE: u8 = 0x8;

#[derive(Debug, thiserror::Error)]
pub enum WsError {
    #[error("WebSocket frame of {0} bytes is larger than kz scrubs ({MAX_FRAME}); closing")]
    TooLarge(u64),
    #[error("compressed WebSocket frame (RSV1) although no extension was negotiated; closing")]
    Compressed,
    #[error(
        "a WebSocket frame from the agent carries a masked token kz may not swap there; closing (see the audit log)"
    )]
    Refused,
    #[error("WebSocket relay I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Copies server → client, scrubbing data frames. Returns payload bytes relayed.
pub async fn relay_down<R, W>(
    from: R,
    to: W,
    rw: StreamRewriter,
    seen: &mut (dyn FnMut(usize, bool) + Send),
) -> Result<u64, WsError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    relay(from, to, rw, seen, false, &|| false).await
}

/// Copies client → server, swapping where the rewriter's decisions allow; `refused()` is asked
/// after each frame is rewritten (the caller's `seen` notes tokens left masked) and, when it
/// says so, the relay stops before that frame is sent. Returns payload bytes relayed.
pub async fn relay_up<R, W>(
    from: R,
    to: W,
    rw: StreamRewriter,
    seen: &mut (dyn FnMut(usize, bool) + Send),
    refused: &(dyn Fn() -> bool + Send + Sync),
) -> Result<u64, WsError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    relay(from, to, rw, seen, true, refused).await
}

async fn relay<R, W>(
    from: R,
    mut to: W,
    rw: StreamRewriter,
    seen: &mut (dyn FnMut(usize, bool) + Send),
    mask: bool,
    refused: &(dyn Fn() -> bool + Send + Sync),
) -> Result<u64, WsError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let r = frames(from, &mut to, rw, seen, mask, refused).await;
    // However the relay ends, the other side hears of it: the write half shares its stream
    // with the read half of the other direction, so dropping it alone would not close it,
    // and a peer waiting for a close handshake would wait forever.
    let _ = to.shutdown().await;
    r
}

async fn frames<R, W>(
    mut from: R,
    to: &mut W,
    mut rw: StreamRewriter,
    seen: &mut (dyn FnMut(usize, bool) + Send),
    mask: bool,
    refused: &(dyn Fn() -> bool + Send + Sync),
) -> Result<u64, WsError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(8192);
    let mut total = 0u64;
    loop {
        while let Some((b0, payload)) = parse(&mut buf)? {
            let opcode = b0 & 0x0f;
            let fin = b0 & 0x80 != 0;
            let out = if opcode < 8 {
                // Data (text, binary, continuation): rewritten across the message's frames.
                let mut out = rw.push(payload, seen);
                if fin {
                    let tail = rw.finish(seen);
                    if !tail.is_empty() {
                        let mut o = BytesMut::from(&out[..]);
                        o.extend_from_slice(&tail);
                        out = o.freeze();
                    }
                }
                out
            } else {
                control(opcode, payload, &rw, seen)
            };
            if refused() {
                return Err(WsError::Refused);
            }
            total += out.len() as u64;
            to.write_all(&encode(b0, &out, mask)).await?;
        }
        to.flush().await?;
        if from.read_buf(&mut buf).await? == 0 {
            return Ok(total);
        }
    }
}

/// One frame: header byte `b0`, `payload`, masked with a fresh key when `mask`.
fn encode(b0: u8, payload: &[u8], mask: bool) -> BytesMut {
    let n = payload.len();
    let mut frame = BytesMut::with_capacity(n + 14);
    frame.put_u8(b0);
    let bit = if mask { 0x80 } else { 0 };
    if n < 126 {
        frame.put_u8(bit | n as u8);
    } else if n <= 0xffff {
        frame.put_u8(bit | 126);
        frame.put_u16(n as u16);
    } else {
        frame.put_u8(bit | 127);
        frame.put_u64(n as u64);
    }
    if mask {
        let key: [u8; 4] = rand::random();
        frame.extend_from_slice(&key);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        frame.extend_from_slice(payload);
    }
    frame
}

/// A control frame's payload scrubbed (a close frame's reason, after its status code), and
/// cut to [`MAX_CONTROL`] bytes if the replacement made it longer.
fn control(
    opcode: u8,
    payload: Bytes,
    rw: &StreamRewriter,
    seen: &mut (dyn FnMut(usize, bool) + Send),
) -> Bytes {
    let keep = if opcode == CLOSE {
        payload.len().min(2)
    } else {
        0
    };
    let Some(text) = payload.get(keep..) else {
        return payload;
    };
    let Some(scrubbed) = rw.rewrite_value(text, seen) else {
        return payload;
    };
    let mut out = BytesMut::with_capacity(keep + scrubbed.len());
    out.extend_from_slice(payload.get(..keep).unwrap_or_default());
    out.extend_from_slice(&scrubbed);
    if out.len() > MAX_CONTROL {
        let mut cut = MAX_CONTROL;
        if opcode == CLOSE {
            // Not inside a UTF-8 sequence: the reason must stay valid text.
            while cut > keep && out.get(cut).is_some_and(|b| b & 0xc0 == 0x80) {
                cut -= 1;
            }
        }
        out.truncate(cut);
    }
    out.freeze()
}

/// One complete frame from `buf` (header byte 0 and unmasked payload), if buffered.
fn parse(buf: &mut BytesMut) -> Result<Option<(u8, Bytes)>, WsError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let b0 = buf[0];
    if b0 & 0x40 != 0 {
        return Err(WsError::Compressed);
    }
    let masked = buf[1] & 0x80 != 0;
    let len7 = u64::from(buf[1] & 0x7f);
    let (len, mut at) = match len7 {
        126 if buf.len() >= 4 => (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
        127 if buf.len() >= 10 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        126 | 127 => return Ok(None),
        n => (n, 2),
    };
    if len > MAX_FRAME {
        return Err(WsError::TooLarge(len));
    }
    let key = if masked {
        if buf.len() < at + 4 {
            return Ok(None);
        }
        let k = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
        at += 4;
        Some(k)
    } else {
        None
    };
    let len = len as usize;
    if buf.len() < at + len {
        buf.reserve(at + len - buf.len());
        return Ok(None);
    }
    buf.advance(at);
    let mut payload = buf.split_to(len);
    if let Some(k) = key {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= k[i % 4];
        }
    }
    Ok(Some((b0, payload.freeze())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::egress::rewrite::{Fixed, Patterns};
    use std::sync::Arc;

    fn frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![b0];
        if payload.len() < 126 {
            f.push(payload.len() as u8);
        } else {
            f.push(126);
            f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        f.extend_from_slice(payload);
        f
    }

    #[tokio::test]
    async fn data_frames_are_scrubbed_across_fragments() {
        let pats = Arc::new(Patterns::new(vec![b"sk-real".to_vec().into_boxed_slice()]).unwrap());
        let rw = StreamRewriter::new(
            pats,
            Arc::new(Fixed(vec![b"kz_masked_x".to_vec().into_boxed_slice()])),
        );
        let mut input = frame(0x01, b"a sk-re"); // text, not final
        input.extend(frame(0x80, b"al b")); // continuation, final
        input.extend(frame(0x89, b"ping")); // ping passes
        input.extend(frame(0x82, &[b'x'; 300])); // binary, 16-bit length
        let mut out = Vec::new();
        let n = relay_down(&input[..], &mut out, rw, &mut |_, _| {})
            .await
            .unwrap();
        let mut want = frame(0x01, b"a ");
        want.extend(frame(0x80, b"kz_masked_x b"));
        want.extend(frame(0x89, b"ping"));
        want.extend(frame(0x82, &[b'x'; 300]));
        assert_eq!(out, want);
        assert_eq!(n, 2 + 13 + 4 + 300);
    }

    fn masked(b0: u8, payload: &[u8]) -> Vec<u8> {
        let key = [1u8, 2, 3, 4];
        let mut f = vec![b0, 0x80 | payload.len() as u8];
        f.extend_from_slice(&key);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        f
    }

    /// Unmasks the frames of a client → server stream.
    fn unmask_all(wire: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut buf = BytesMut::from(wire);
        let mut out = Vec::new();
        while let Some((b0, p)) = parse(&mut buf).unwrap() {
            out.push((b0, p.to_vec()));
        }
        assert!(buf.is_empty());
        out
    }

    #[tokio::test]
    async fn frames_from_the_agent_are_swapped_and_masked_again() {
        let pats = Arc::new(Patterns::new(vec![b"kz_tok".to_vec().into_boxed_slice()]).unwrap());
        let rw = StreamRewriter::new(
            pats,
            Arc::new(Fixed(vec![b"REAL-VALUE".to_vec().into_boxed_slice()])),
        );
        let mut input = masked(0x01, b"auth kz_t"); // split across fragments
        input.extend(masked(0x80, b"ok end"));
        let mut out = Vec::new();
        relay_up(&input[..], &mut out, rw, &mut |_, _| {}, &|| false)
            .await
            .unwrap();
        assert!(out[1] & 0x80 != 0, "client frames must be masked");
        let frames = unmask_all(&out);
        let text: Vec<u8> = frames.iter().flat_map(|(_, p)| p.clone()).collect();
        assert_eq!(text, b"auth REAL-VALUE end");
    }

    #[tokio::test]
    async fn a_refused_frame_is_never_sent() {
        let pats = Arc::new(Patterns::new(vec![b"kz_tok".to_vec().into_boxed_slice()]).unwrap());
        // Nothing may be swapped: every token found is left masked, and refused.
        let rw = StreamRewriter::new(pats, Arc::new(Fixed(Vec::new())));
        let input = masked(0x81, b"leak kz_tok");
        let mut out = Vec::new();
        let flag = std::sync::atomic::AtomicBool::new(false);
        let r = relay_up(
            &input[..],
            &mut out,
            rw,
            &mut |_, swapped| {
                if !swapped {
                    flag.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            },
            &|| flag.load(std::sync::atomic::Ordering::Relaxed),
        )
        .await;
        assert!(matches!(r, Err(WsError::Refused)));
        assert!(out.is_empty());
    }

    #[tokio::test]
    async fn compressed_frames_are_refused() {
        let pats = Arc::new(Patterns::new(vec![b"x".to_vec().into_boxed_slice()]).unwrap());
        let rw = StreamRewriter::new(
            pats,
            Arc::new(Fixed(vec![b"y".to_vec().into_boxed_slice()])),
        );
        let input = frame(0xc1, b"abc");
        let mut out = Vec::new();
        assert!(matches!(
            relay_down(&input[..], &mut out, rw, &mut |_, _| {}).await,
            Err(WsError::Compressed)
        ));
    }

    fn scrubber(to: &[u8]) -> StreamRewriter {
        let pats = Arc::new(Patterns::new(vec![b"sk-real".to_vec().into_boxed_slice()]).unwrap());
        StreamRewriter::new(pats, Arc::new(Fixed(vec![to.to_vec().into_boxed_slice()])))
    }

    #[tokio::test]
    async fn control_frames_are_scrubbed_even_between_fragments() {
        let mut input = frame(0x01, b"a sk-r"); // text, not final: "sk-r" is carried
        input.extend(frame(0x89, b"ping sk-real")); // ping in the middle of the message
        input.extend(frame(0x8a, b"sk-real pong")); // unsolicited pong
        input.extend(frame(0x80, b"eal b")); // continuation, final
        let mut close = 1000u16.to_be_bytes().to_vec();
        close.extend_from_slice(b"bye sk-real");
        input.extend(frame(0x88, &close));
        let mut out = Vec::new();
        let mut hits = 0;
        relay_down(
            &input[..],
            &mut out,
            scrubber(b"kz_masked_x"),
            &mut |_, _| hits += 1,
        )
        .await
        .unwrap();
        let mut want = frame(0x01, b"a ");
        want.extend(frame(0x89, b"ping kz_masked_x"));
        want.extend(frame(0x8a, b"kz_masked_x pong"));
        want.extend(frame(0x80, b"kz_masked_x b"));
        let mut close = 1000u16.to_be_bytes().to_vec();
        close.extend_from_slice(b"bye kz_masked_x");
        want.extend(frame(0x88, &close));
        assert_eq!(out, want);
        assert_eq!(hits, 4);
    }

    #[tokio::test]
    async fn a_control_payload_stays_within_125_bytes() {
        // 2-byte code + 116 bytes of reason holding the value: the replacement is longer.
        let mut close = 1000u16.to_be_bytes().to_vec();
        close.extend_from_slice(&[b'r'; 100]);
        close.extend_from_slice(b"sk-real");
        close.extend_from_slice("\u{e9}\u{e9}\u{e9}\u{e9}".as_bytes());
        assert!(close.len() <= MAX_CONTROL);
        let long = [b'M'; 20];
        let mut out = Vec::new();
        relay_down(
            &frame(0x88, &close)[..],
            &mut out,
            scrubber(&long),
            &mut |_, _| {},
        )
        .await
        .unwrap();
        let n = usize::from(out[1]);
        assert!(n <= MAX_CONTROL, "{n}");
        let payload = &out[2..];
        assert_eq!(payload.len(), n);
        assert_eq!(&payload[..2], &1000u16.to_be_bytes());
        let reason = std::str::from_utf8(&payload[2..]).unwrap();
        assert!(
            !reason.contains("sk-real") && reason.contains("MMMM"),
            "{reason}"
        );
        // A ping is cut at 125 bytes exactly.
        let mut ping = vec![b'p'; 118];
        ping.extend_from_slice(b"sk-real");
        let mut out = Vec::new();
        relay_down(
            &frame(0x89, &ping)[..],
            &mut out,
            scrubber(&long),
            &mut |_, _| {},
        )
        .await
        .unwrap();
        assert_eq!(usize::from(out[1]), MAX_CONTROL);
        assert!(!out.windows(7).any(|w| w == b"sk-real"));
    }
}
