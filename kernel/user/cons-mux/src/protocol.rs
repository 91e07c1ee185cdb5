//! The messages between a console client and the console server.
//!
//! A client calls the server with label [`LABEL_CONSOLE`]: word 0 is a [`Header`] (the number
//! of output bytes and their [`Stream`]), words 1.. the output bytes, eight per word, little
//! endian. The reply (label 0) has the same shape and carries up to [`MAX_BYTES`] bytes of the
//! client's input, with [`Header::more`] set when more input waits. A call with no output
//! bytes just fetches input. The server tells a client that input arrived by triggering the
//! client's notification IRQ; the client then calls to fetch it.

use crate::Stream;
use alloc::vec::Vec;

/// The label of a client's request.
pub const LABEL_CONSOLE: i32 = 0x434e;
/// Message words in all (the kernel's limit).
pub const WORDS: usize = 64;
/// Bytes per message (all words but the header).
pub const MAX_BYTES: usize = (WORDS - 1) * 8;

const COUNT_MASK: u64 = 0xffff;
const SERVICE: u64 = 1 << 16;
const MORE: u64 = 1 << 17;

/// Word 0 of a request or reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The number of bytes in words 1.. (at most [`MAX_BYTES`]).
    pub count: usize,
    /// The stream of a request's bytes.
    pub stream: Stream,
    /// In a reply: more input waits.
    pub more: bool,
}

impl Header {
    /// The header word.
    pub fn encode(self) -> u64 {
        let mut word = self.count.min(MAX_BYTES) as u64;
        if self.stream == Stream::Service {
            word |= SERVICE;
        }
        if self.more {
            word |= MORE;
        }
        word
    }

    /// The header of `word`, or `None` if the count is too large or unknown bits are set.
    pub fn decode(word: u64) -> Option<Header> {
        let count = (word & COUNT_MASK) as usize;
        if count > MAX_BYTES || word & !(COUNT_MASK | SERVICE | MORE) != 0 {
            return None;
        }
        Some(Header {
            count,
            stream: if word & SERVICE != 0 {
                Stream::Service
            } else {
                Stream::Guest
            },
            more: word & MORE != 0,
        })
    }
}

/// The words of a message carrying `bytes` (at most [`MAX_BYTES`] of them are taken) after
/// the header; returns the number of words used, header included.
pub fn encode(header: Header, bytes: &[u8], words: &mut [u64; WORDS]) -> usize {
    let bytes = &bytes[..bytes.len().min(MAX_BYTES)];
    words[0] = Header {
        count: bytes.len(),
        ..header
    }
    .encode();
    for (i, chunk) in bytes.chunks(8).enumerate() {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        words[1 + i] = u64::from_le_bytes(b);
    }
    1 + bytes.len().div_ceil(8)
}

/// The header and bytes of a message of `used` words; `None` if the header is malformed or
/// claims more bytes than the words carry.
pub fn decode(words: &[u64], used: usize) -> Option<(Header, Vec<u8>)> {
    let header = Header::decode(*words.first()?)?;
    if used == 0 || 1 + header.count.div_ceil(8) > used.min(words.len()) {
        return None;
    }
    let bytes = words[1..]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .take(header.count)
        .collect();
    Some((header, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip() {
        let mut words = [0u64; WORDS];
        let data: Vec<u8> = (0..=255u8).cycle().take(MAX_BYTES + 20).collect();
        let header = Header {
            count: 0,
            stream: Stream::Service,
            more: true,
        };
        let used = encode(header, &data, &mut words);
        assert_eq!(used, WORDS);
        let (h, bytes) = decode(&words, used).unwrap();
        assert_eq!(h.count, MAX_BYTES);
        assert_eq!(h.stream, Stream::Service);
        assert!(h.more);
        assert_eq!(bytes, data[..MAX_BYTES]);
        let used = encode(header, b"abc", &mut words);
        assert_eq!(used, 2);
        assert_eq!(decode(&words, used).unwrap().1, b"abc");
    }

    #[test]
    fn malformed_messages_are_refused() {
        let mut words = [0u64; WORDS];
        // More bytes than words sent, a count beyond the limit, unknown flag bits.
        words[0] = 17;
        assert_eq!(decode(&words, 2), None);
        assert!(decode(&words, 4).is_some());
        words[0] = MAX_BYTES as u64 + 1;
        assert_eq!(decode(&words, WORDS), None);
        words[0] = 1 << 40;
        assert_eq!(decode(&words, WORDS), None);
        assert_eq!(decode(&words, 0), None);
        assert_eq!(decode(&[], 0), None);
    }
}
