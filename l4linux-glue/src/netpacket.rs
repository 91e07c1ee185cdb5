//! The virtio-net header that travels with every frame through the rings and the switch
//! (virtio 1.2 §5.1.6: `virtio_net_hdr_v1`), its checks, and the software fallbacks for a
//! receiver that did not take an offload: completing a partial checksum and segmenting a
//! TCP/IPv4 GSO frame into standard Ethernet frames.
//!
//! A sender that negotiated the offloads hands over frames whose transport checksum is only
//! partial (`NEEDS_CSUM`: the checksum field holds the pseudo-header sum, the rest is to be
//! summed from `csum_start`) and TCP segments of up to 64 KiB (`gso_type` TCPV4, cut at
//! `gso_size` payload bytes by whoever cannot pass them on whole). Everything in a header is
//! the sender's word and so hostile: [`check`] refuses flags, GSO types and offloads that were
//! not negotiated, checksum positions outside the frame, a `gso_size` of 0 or one whose
//! segments would not fit a standard frame, GSO frames that are not plain TCP over IPv4 as
//! the header claims (IP total length, protocol, fragments, header lengths, `csum_start`),
//! frames longer than their kind allows and segment counts past [`MAX_SEGMENTS`]. Only a
//! [`Checked`] packet can be rewritten, so the rewriting itself never fails and never
//! indexes outside the frame.

use core::fmt;

/// Bytes of `virtio_net_hdr_v1` (flags, gso_type, hdr_len, gso_size, csum_start,
/// csum_offset, num_buffers).
pub const HEADER_SIZE: usize = 12;
/// Header flag: the checksum at `csum_start + csum_offset` is partial.
pub const F_NEEDS_CSUM: u8 = 1;
/// Header flag (device to driver): the checksum was verified.
pub const F_DATA_VALID: u8 = 2;
/// GSO type: not a GSO frame.
pub const GSO_NONE: u8 = 0;
/// GSO type: TCP over IPv4.
pub const GSO_TCPV4: u8 = 1;
/// GSO type bit: the segments carry ECN (CWR only in the first one).
pub const GSO_ECN: u8 = 0x80;
/// An Ethernet header (no VLAN tag).
pub const ETHERNET_HEADER: usize = 14;
/// The MTU of every port (Ethernet payload bytes).
pub const MTU: usize = 1500;
/// The smallest frame: an Ethernet header.
pub const MIN_FRAME: usize = ETHERNET_HEADER;
/// The largest standard frame: an Ethernet header and an MTU of payload (no FCS).
pub const MAX_FRAME: usize = ETHERNET_HEADER + MTU;
/// The largest GSO frame: an Ethernet header and the largest IPv4 packet.
pub const MAX_GSO_FRAME: usize = ETHERNET_HEADER + 65535;
/// The most segments one GSO frame may be cut into (64 KiB at a `gso_size` of 64 bytes); a
/// frame asking for more is refused, so that one frame costs a bounded amount of work.
pub const MAX_SEGMENTS: usize = 1024;

const ETHERTYPE_IPV4: u16 = 0x0800;
const PROTOCOL_TCP: u8 = 6;
/// Offset of the checksum in a TCP header.
const TCP_CHECKSUM: usize = 16;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// A `virtio_net_hdr_v1`, decoded (little-endian fields).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetHeader {
    /// `F_NEEDS_CSUM`, `F_DATA_VALID`.
    pub flags: u8,
    /// `GSO_NONE` or `GSO_TCPV4`, with `GSO_ECN`.
    pub gso_type: u8,
    /// The sender's hint of the headers' length (Linux: the linear part of the buffer).
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where the partial checksum's sum starts.
    pub csum_start: u16,
    /// Where the checksum field is, from `csum_start`.
    pub csum_offset: u16,
    /// Receive buffers the frame occupies (mergeable receive buffers; 0 on transmit).
    pub num_buffers: u16,
}

impl NetHeader {
    /// Decode the 12 header bytes.
    pub fn from_bytes(b: &[u8; HEADER_SIZE]) -> NetHeader {
        let word = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        NetHeader {
            flags: b[0],
            gso_type: b[1],
            hdr_len: word(2),
            gso_size: word(4),
            csum_start: word(6),
            csum_offset: word(8),
            num_buffers: word(10),
        }
    }

    /// Encode the header.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0] = self.flags;
        b[1] = self.gso_type;
        for (i, word) in [
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
            self.num_buffers,
        ]
        .into_iter()
        .enumerate()
        {
            b[2 + 2 * i..4 + 2 * i].copy_from_slice(&word.to_le_bytes());
        }
        b
    }

    /// A ring record (this header's bytes, then the frame) split into the two, or `None` if it
    /// is shorter than a header.
    pub fn split_record(record: &[u8]) -> Option<(NetHeader, &[u8])> {
        let (header, frame) = record.split_first_chunk::<HEADER_SIZE>()?;
        Some((NetHeader::from_bytes(header), frame))
    }

    /// Whether the frame is a GSO frame (to be cut at `gso_size`).
    pub fn is_gso(&self) -> bool {
        self.gso_type != GSO_NONE
    }
}

/// What a port takes beyond standard frames with full checksums: what a sender may hand
/// over, or what a receiver accepts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offloads {
    /// Partial checksums (`F_NEEDS_CSUM`; virtio's CSUM on transmit, GUEST_CSUM on receive).
    pub partial_checksum: bool,
    /// TCP/IPv4 GSO frames (HOST_TSO4 / GUEST_TSO4).
    pub tso4: bool,
    /// GSO frames with ECN (HOST_ECN / GUEST_ECN).
    pub ecn: bool,
}

impl Offloads {
    /// Standard frames only.
    pub const NONE: Offloads = Offloads {
        partial_checksum: false,
        tso4: false,
        ecn: false,
    };
    /// Everything this module knows.
    pub const ALL: Offloads = Offloads {
        partial_checksum: true,
        tso4: true,
        ecn: true,
    };

    /// Whether `header`'s frame can go to a port that accepts these offloads as it is.
    pub fn accept(&self, header: &NetHeader) -> bool {
        let checksum_ok = header.flags & F_NEEDS_CSUM == 0 || self.partial_checksum;
        let gso_ok = match header.gso_type & !GSO_ECN {
            GSO_NONE => true,
            _ => self.tso4 && self.partial_checksum && (header.gso_type & GSO_ECN == 0 || self.ecn),
        };
        checksum_ok && gso_ok
    }
}

/// Why a header and its frame were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketError {
    /// Shorter than an Ethernet header.
    TooShort(usize),
    /// Longer than a standard frame (or, for GSO, than the largest IPv4 packet).
    TooLong(usize),
    /// Flags other than `F_NEEDS_CSUM`.
    UnknownFlags(u8),
    /// A GSO type other than TCPV4 (with or without ECN).
    UnknownGsoType(u8),
    /// An offload the sender did not negotiate.
    NotNegotiated,
    /// The checksum field (`csum_start + csum_offset`, two bytes) is not inside the frame.
    ChecksumOutside {
        /// `csum_start`.
        start: u16,
        /// `csum_offset`.
        offset: u16,
    },
    /// `hdr_len` is past the end of the frame.
    HeaderLength(u16),
    /// A GSO frame without a partial checksum.
    GsoWithoutChecksum,
    /// `gso_size` is 0, or its segments would not fit a standard frame.
    GsoSize(u16),
    /// A GSO frame that is not TCP over IPv4 as its header says, or whose checksum position
    /// is not the TCP checksum's.
    NotTcpIpv4,
    /// A GSO frame that would be more than [`MAX_SEGMENTS`] segments.
    TooManySegments(usize),
}

impl fmt::Display for PacketError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            PacketError::TooShort(n) => write!(f, "a frame of {n} bytes is too short"),
            PacketError::TooLong(n) => write!(f, "a frame of {n} bytes is too long"),
            PacketError::UnknownFlags(flags) => write!(f, "unknown header flags {flags:#x}"),
            PacketError::UnknownGsoType(t) => write!(f, "unknown GSO type {t:#x}"),
            PacketError::NotNegotiated => write!(f, "an offload that was not negotiated"),
            PacketError::ChecksumOutside { start, offset } => {
                write!(f, "checksum at {start} + {offset} is outside the frame")
            }
            PacketError::HeaderLength(n) => write!(f, "hdr_len {n} is past the frame"),
            PacketError::GsoWithoutChecksum => write!(f, "a GSO frame without NEEDS_CSUM"),
            PacketError::GsoSize(n) => write!(f, "gso_size {n} does not make standard frames"),
            PacketError::NotTcpIpv4 => write!(f, "a GSO frame that is not TCP over IPv4"),
            PacketError::TooManySegments(n) => write!(f, "a GSO frame of {n} segments"),
        }
    }
}

/// Where the headers of a TCP/IPv4 GSO frame are (all checked against the frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TcpLayout {
    /// Bytes of the IPv4 header.
    ip_header: usize,
    /// Offset of the TCP header.
    tcp: usize,
    /// Offset of the payload (the end of the TCP header).
    payload: usize,
    /// Payload bytes per segment.
    segment: usize,
    /// Segments.
    count: usize,
}

/// A header and frame that passed [`check`]: safe to pass on or to rewrite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked<'a> {
    header: NetHeader,
    frame: &'a [u8],
    tcp: Option<TcpLayout>,
}

fn be16(frame: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([frame[at], frame[at + 1]])
}

/// The bytes at the start of a frame that [`check`] reads: an Ethernet header and the largest
/// IPv4 and TCP headers. Everything after them only counts towards the frame's length, so a
/// frame can be checked on a private copy of this prefix while its payload is copied straight
/// from one buffer to the next ([`check_prefix`]).
pub const CHECKED_PREFIX: usize = ETHERNET_HEADER + 60 + 60;

/// Check `header` and `frame` from a sender allowed the offloads `allowed`.
pub fn check<'a>(
    header: &NetHeader,
    frame: &'a [u8],
    allowed: Offloads,
) -> Result<Checked<'a>, PacketError> {
    let prefix = &frame[..frame.len().min(CHECKED_PREFIX)];
    let tcp = check_headers(header, prefix, frame.len(), allowed)?;
    Ok(Checked {
        header: *header,
        frame,
        tcp,
    })
}

/// Check `header` and a frame of `length` bytes that starts with `prefix` (its first
/// `min(length, CHECKED_PREFIX)` bytes) from a sender allowed the offloads `allowed`: the
/// same verdict as [`check`] on the whole frame, which never reads past the prefix.
pub fn check_prefix(
    header: &NetHeader,
    prefix: &[u8],
    length: usize,
    allowed: Offloads,
) -> Result<(), PacketError> {
    if prefix.len() != length.min(CHECKED_PREFIX) {
        // A caller bug; refuse rather than read past what was copied.
        return Err(PacketError::TooShort(prefix.len()));
    }
    check_headers(header, prefix, length, allowed).map(|_| ())
}

/// [`check`] on the first bytes of a frame of `length` bytes (`prefix` holds
/// `min(length, CHECKED_PREFIX)` of them).
fn check_headers(
    header: &NetHeader,
    prefix: &[u8],
    length: usize,
    allowed: Offloads,
) -> Result<Option<TcpLayout>, PacketError> {
    if length < MIN_FRAME {
        return Err(PacketError::TooShort(length));
    }
    if header.flags & !F_NEEDS_CSUM != 0 {
        return Err(PacketError::UnknownFlags(header.flags));
    }
    if usize::from(header.hdr_len) > length {
        return Err(PacketError::HeaderLength(header.hdr_len));
    }
    let partial = header.flags & F_NEEDS_CSUM != 0;
    if partial {
        if !allowed.partial_checksum {
            return Err(PacketError::NotNegotiated);
        }
        let field = usize::from(header.csum_start) + usize::from(header.csum_offset);
        if field + 2 > length {
            return Err(PacketError::ChecksumOutside {
                start: header.csum_start,
                offset: header.csum_offset,
            });
        }
    }
    let ecn = header.gso_type & GSO_ECN != 0;
    Ok(match header.gso_type & !GSO_ECN {
        GSO_NONE if ecn => return Err(PacketError::UnknownGsoType(header.gso_type)),
        GSO_NONE if length > MAX_FRAME => return Err(PacketError::TooLong(length)),
        GSO_NONE => None,
        GSO_TCPV4 => {
            if !allowed.tso4 || (ecn && !allowed.ecn) {
                return Err(PacketError::NotNegotiated);
            }
            if length > MAX_GSO_FRAME {
                return Err(PacketError::TooLong(length));
            }
            if !partial {
                return Err(PacketError::GsoWithoutChecksum);
            }
            Some(tcp_layout(header, prefix, length)?)
        }
        _ => return Err(PacketError::UnknownGsoType(header.gso_type)),
    })
}

/// The headers of a GSO frame of `length` bytes whose first bytes are `frame`, checked against
/// the frame and the header.
fn tcp_layout(header: &NetHeader, frame: &[u8], length: usize) -> Result<TcpLayout, PacketError> {
    // `frame` is the prefix: every index below is checked against `length` and lies inside
    // the headers, so inside the prefix.
    let ip = ETHERNET_HEADER;
    if length < ip + 20 || be16(frame, 12) != ETHERTYPE_IPV4 {
        return Err(PacketError::NotTcpIpv4);
    }
    let version_ihl = frame[ip];
    let ip_header = usize::from(version_ihl & 0x0f) * 4;
    let total = usize::from(be16(frame, ip + 2));
    let fragment = be16(frame, ip + 6);
    if version_ihl >> 4 != 4
        || ip_header < 20
        || total != length - ip
        || fragment & 0x3fff != 0
        || frame[ip + 9] != PROTOCOL_TCP
    {
        return Err(PacketError::NotTcpIpv4);
    }
    let tcp = ip + ip_header;
    if tcp + 20 > length {
        return Err(PacketError::NotTcpIpv4);
    }
    let payload = tcp + usize::from(frame[tcp + 12] >> 4) * 4;
    if payload < tcp + 20
        || payload > length
        || usize::from(header.csum_start) != tcp
        || usize::from(header.csum_offset) != TCP_CHECKSUM
    {
        return Err(PacketError::NotTcpIpv4);
    }
    let segment = usize::from(header.gso_size);
    if segment == 0 || payload - ip + segment > MTU {
        return Err(PacketError::GsoSize(header.gso_size));
    }
    let count = (length - payload).div_ceil(segment).max(1);
    if count > MAX_SEGMENTS {
        return Err(PacketError::TooManySegments(count));
    }
    Ok(TcpLayout {
        ip_header,
        tcp,
        payload,
        segment,
        count,
    })
}

/// The ones' complement sum of `bytes` as big-endian 16-bit words (an odd last byte padded
/// with zero), added to `sum`, not yet folded.
fn sum(mut sum: u64, bytes: &[u8]) -> u64 {
    let mut pairs = bytes.chunks_exact(2);
    for pair in &mut pairs {
        sum += u64::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    if let [last] = pairs.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

/// Fold a sum to 16 bits and complement it: the checksum field's value (0 sent as 0xffff,
/// the same number in ones' complement, since 0 means "no checksum" to UDP).
fn finish(mut sum: u64) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    match !(sum as u16) {
        0 => 0xffff,
        value => value,
    }
}

impl<'a> Checked<'a> {
    /// The header.
    pub fn header(&self) -> &NetHeader {
        &self.header
    }

    /// The frame.
    pub fn frame(&self) -> &'a [u8] {
        self.frame
    }

    /// The standard frames a receiver without the offloads gets: the GSO frame's segments,
    /// or 1.
    pub fn segments(&self) -> usize {
        self.tcp.map_or(1, |t| t.count)
    }

    /// Write standard frame `index` (below [`Checked::segments`]) with a full checksum into
    /// `out` (at least [`MAX_FRAME`] bytes); returns its length. A GSO frame gives its
    /// segment `index`: the headers copied, the IPv4 total length, identification (+ `index`)
    /// and header checksum, the TCP sequence number (+ `index * gso_size`), FIN and PSH only
    /// in the last segment, CWR only in the first, and the TCP checksum; any other frame is
    /// copied with its partial checksum (if any) completed.
    ///
    /// # Panics
    /// If `out` is shorter than [`MAX_FRAME`] or `index` is not below [`Checked::segments`]
    /// (caller bugs).
    pub fn write_standard(&self, index: usize, out: &mut [u8]) -> usize {
        assert!(out.len() >= MAX_FRAME && index < self.segments());
        let Some(t) = self.tcp else {
            let out = &mut out[..self.frame.len()];
            out.copy_from_slice(self.frame);
            if self.header.flags & F_NEEDS_CSUM != 0 {
                let start = usize::from(self.header.csum_start);
                let field = start + usize::from(self.header.csum_offset);
                // The field holds the pseudo-header sum: it is part of the sum.
                let value = finish(sum(0, &out[start..]));
                out[field..field + 2].copy_from_slice(&value.to_be_bytes());
            }
            return out.len();
        };
        let first = t.payload + index * t.segment;
        let last = index + 1 == t.count;
        let end = if last {
            self.frame.len()
        } else {
            first + t.segment
        };
        let payload = end - first;
        let length = t.payload + payload;
        out[..t.payload].copy_from_slice(&self.frame[..t.payload]);
        out[t.payload..length].copy_from_slice(&self.frame[first..end]);
        // IPv4: total length, identification, header checksum.
        let ip = ETHERNET_HEADER;
        let total = (length - ip) as u16;
        out[ip + 2..ip + 4].copy_from_slice(&total.to_be_bytes());
        let id = be16(self.frame, ip + 4).wrapping_add(index as u16);
        out[ip + 4..ip + 6].copy_from_slice(&id.to_be_bytes());
        out[ip + 10..ip + 12].fill(0);
        let checksum = finish(sum(0, &out[ip..ip + t.ip_header]));
        out[ip + 10..ip + 12].copy_from_slice(&checksum.to_be_bytes());
        // TCP: sequence number, flags, checksum over the pseudo-header and the segment.
        let tcp = t.tcp;
        let sequence = u32::from_be_bytes([
            self.frame[tcp + 4],
            self.frame[tcp + 5],
            self.frame[tcp + 6],
            self.frame[tcp + 7],
        ])
        .wrapping_add((index * t.segment) as u32);
        out[tcp + 4..tcp + 8].copy_from_slice(&sequence.to_be_bytes());
        if !last {
            out[tcp + 13] &= !(TCP_FIN | TCP_PSH);
        }
        if index > 0 {
            out[tcp + 13] &= !TCP_CWR;
        }
        out[tcp + TCP_CHECKSUM..tcp + TCP_CHECKSUM + 2].fill(0);
        let tcp_length = (length - tcp) as u64;
        let pseudo = sum(u64::from(PROTOCOL_TCP) + tcp_length, &out[ip + 12..ip + 20]);
        let checksum = finish(sum(pseudo, &out[tcp..length]));
        out[tcp + TCP_CHECKSUM..tcp + TCP_CHECKSUM + 2].copy_from_slice(&checksum.to_be_bytes());
        length
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;
    use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};

    const MSS: u16 = 1448;

    /// A TCP/IPv4 frame built by etherparse (full checksums), `payload` bytes of a pattern,
    /// with the given TCP flags.
    fn tcp_frame(payload: usize, fin: bool, psh: bool, cwr: bool) -> Vec<u8> {
        let data: Vec<u8> = (0..payload).map(|i| (i * 7 + i / 251) as u8).collect();
        let mut builder = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([10, 0, 0, 2], [10, 0, 0, 1], 64)
            .tcp(40000, 5001, 0xffff_f000, 502)
            .ack(77);
        if fin {
            builder = builder.fin();
        }
        if psh {
            builder = builder.psh();
        }
        if cwr {
            builder = builder.cwr();
        }
        let mut frame = Vec::new();
        builder.write(&mut frame, &data).unwrap();
        // Identification 0xfffe, so that segments wrap it; DF set, as Linux's TCP does.
        frame[18..20].copy_from_slice(&0xfffeu16.to_be_bytes());
        frame[20] = 0x40;
        let (ip, _) = etherparse::Ipv4Header::from_slice(&frame[14..]).unwrap();
        frame[24..26].copy_from_slice(&ip.calc_header_checksum().to_be_bytes());
        frame
    }

    /// `frame` as Linux's TCP hands it to a device with CSUM and TSO4: the TCP checksum field
    /// holding the pseudo-header sum only.
    fn partial(frame: &mut [u8]) -> NetHeader {
        let tcp_length = (frame.len() - 34) as u64;
        let pseudo = sum(u64::from(PROTOCOL_TCP) + tcp_length, &frame[26..34]);
        let mut folded = pseudo;
        while folded >> 16 != 0 {
            folded = (folded & 0xffff) + (folded >> 16);
        }
        frame[50..52].copy_from_slice(&(folded as u16).to_be_bytes());
        NetHeader {
            flags: F_NEEDS_CSUM,
            gso_type: if frame.len() > MAX_FRAME {
                GSO_TCPV4
            } else {
                GSO_NONE
            },
            hdr_len: frame.len().min(66) as u16,
            gso_size: MSS,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 0,
        }
    }

    /// Parse `frame` with etherparse and check both checksums; returns (sequence number,
    /// flags (FIN, PSH, CWR), identification, payload).
    fn verify(frame: &[u8]) -> (u32, (bool, bool, bool), u16, Vec<u8>) {
        assert!(frame.len() <= MAX_FRAME, "{} bytes", frame.len());
        let packet = SlicedPacket::from_ethernet(frame).expect("etherparse parses the frame");
        let Some(NetSlice::Ipv4(ip)) = &packet.net else {
            panic!("not IPv4")
        };
        let ip_header = ip.header().to_header();
        assert_eq!(ip_header.header_checksum, ip_header.calc_header_checksum());
        assert_eq!(usize::from(ip_header.total_len), frame.len() - 14);
        let Some(TransportSlice::Tcp(tcp)) = &packet.transport else {
            panic!("not TCP")
        };
        let header = tcp.to_header();
        let expected = header
            .calc_checksum_ipv4(&ip_header, tcp.payload())
            .unwrap();
        assert_eq!(header.checksum, expected, "TCP checksum");
        (
            header.sequence_number,
            (header.fin, header.psh, header.cwr),
            ip_header.identification,
            tcp.payload().to_vec(),
        )
    }

    #[test]
    fn headers_round_trip() {
        let h = NetHeader {
            flags: 1,
            gso_type: 0x81,
            hdr_len: 0x1234,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 3,
        };
        let b = h.to_bytes();
        assert_eq!(b, [1, 0x81, 0x34, 0x12, 0xa8, 5, 34, 0, 16, 0, 3, 0]);
        assert_eq!(NetHeader::from_bytes(&b), h);
        assert!(h.is_gso() && !NetHeader::default().is_gso());
        let record = [&b[..], b"frame"].concat();
        assert_eq!(NetHeader::split_record(&record), Some((h, &b"frame"[..])));
        assert_eq!(NetHeader::split_record(&b), Some((h, &[][..])));
        assert_eq!(NetHeader::split_record(&b[..HEADER_SIZE - 1]), None);
    }

    #[test]
    fn segments_verify_against_etherparse() {
        for (payload, fin, psh, cwr) in [
            (65535 - 40, true, true, true),
            (10 * usize::from(MSS), false, true, false),
            (10 * usize::from(MSS) + 1, true, false, false),
            (2 * usize::from(MSS) - 1, false, false, true),
            (1, false, true, false),
        ] {
            let original = tcp_frame(payload, fin, psh, cwr);
            let mut frame = original.clone();
            let mut header = partial(&mut frame);
            header.gso_type = GSO_TCPV4 | if cwr { GSO_ECN } else { 0 };
            let checked = check(&header, &frame, Offloads::ALL).unwrap();
            let count = payload.div_ceil(usize::from(MSS));
            assert_eq!(checked.segments(), count);
            let mut data = Vec::new();
            let mut out = vec![0u8; MAX_FRAME];
            for k in 0..count {
                let n = checked.write_standard(k, &mut out);
                let (sequence, flags, id, bytes) = verify(&out[..n]);
                let last = k + 1 == count;
                assert_eq!(
                    sequence,
                    0xffff_f000u32.wrapping_add((k * usize::from(MSS)) as u32)
                );
                assert_eq!(flags, (fin && last, psh && last, cwr && k == 0));
                assert_eq!(id, 0xfffeu16.wrapping_add(k as u16));
                if !last {
                    assert_eq!(bytes.len(), usize::from(MSS));
                }
                data.extend_from_slice(&bytes);
            }
            assert_eq!(data, original[54..], "the payload arrives whole, in order");
        }
    }

    #[test]
    fn partial_checksums_are_completed() {
        // TCP: the completed frame is etherparse's (which had the full checksum).
        let original = tcp_frame(1000, false, true, false);
        let mut frame = original.clone();
        let header = partial(&mut frame);
        assert_ne!(frame, original);
        let checked = check(&header, &frame, Offloads::ALL).unwrap();
        assert_eq!(checked.segments(), 1);
        let mut out = vec![0u8; MAX_FRAME];
        let n = checked.write_standard(0, &mut out);
        assert_eq!(&out[..n], &original[..]);
        verify(&out[..n]);
        // UDP through the same generic completion (csum_offset 6).
        let mut udp = Vec::new();
        PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .udp(53, 5353)
            .write(&mut udp, &[0x42; 333])
            .unwrap();
        let expected = udp.clone();
        let pseudo = sum(17 + (udp.len() - 34) as u64, &udp[26..34]);
        udp[40..42].copy_from_slice(&(!finish(pseudo)).to_be_bytes());
        let header = NetHeader {
            flags: F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 6,
            ..NetHeader::default()
        };
        let checked = check(&header, &udp, Offloads::ALL).unwrap();
        let n = checked.write_standard(0, &mut out);
        assert_eq!(&out[..n], &expected[..]);
        // Without NEEDS_CSUM the frame is copied unchanged.
        let plain = check(&NetHeader::default(), &original, Offloads::NONE).unwrap();
        assert_eq!(plain.write_standard(0, &mut out), original.len());
        assert_eq!(&out[..original.len()], &original[..]);
    }

    #[test]
    fn what_a_receiver_accepts() {
        let gso = NetHeader {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            ..NetHeader::default()
        };
        let ecn = NetHeader {
            gso_type: GSO_TCPV4 | GSO_ECN,
            ..gso
        };
        let csum = NetHeader {
            gso_type: GSO_NONE,
            ..gso
        };
        let plain = NetHeader::default();
        let tso = Offloads {
            partial_checksum: true,
            tso4: true,
            ecn: false,
        };
        let csum_only = Offloads {
            partial_checksum: true,
            ..Offloads::NONE
        };
        let cases = [
            (Offloads::NONE, [true, false, false, false]),
            (csum_only, [true, true, false, false]),
            (tso, [true, true, true, false]),
            (Offloads::ALL, [true, true, true, true]),
            // TSO without partial checksums is no TSO.
            (
                Offloads {
                    partial_checksum: false,
                    ..Offloads::ALL
                },
                [true, false, false, false],
            ),
        ];
        for (offloads, expected) in cases {
            let got = [plain, csum, gso, ecn].map(|h| offloads.accept(&h));
            assert_eq!(got, expected, "{offloads:?}");
        }
    }

    /// Every kind of bad header is refused with its reason, and no error panics.
    #[test]
    fn hostile_headers_are_refused() {
        let mut big = tcp_frame(20000, false, true, false);
        let good = partial(&mut big);
        assert!(check(&good, &big, Offloads::ALL).is_ok());
        let refused = |h: NetHeader, frame: &[u8], allowed| check(&h, frame, allowed).unwrap_err();
        assert_eq!(
            refused(good, &big[..13], Offloads::ALL),
            PacketError::TooShort(13)
        );
        assert_eq!(
            refused(NetHeader::default(), &big[..MAX_FRAME + 1], Offloads::ALL),
            PacketError::TooLong(MAX_FRAME + 1)
        );
        let huge = vec![0u8; MAX_GSO_FRAME + 1];
        assert_eq!(
            refused(good, &huge, Offloads::ALL),
            PacketError::TooLong(MAX_GSO_FRAME + 1)
        );
        for flags in [2, 4, 0x80, 0xff] {
            let h = NetHeader { flags, ..good };
            assert_eq!(
                refused(h, &big, Offloads::ALL),
                PacketError::UnknownFlags(flags)
            );
        }
        for gso_type in [3, 4, 5, 0x80, 0x83, 0x7f] {
            let h = NetHeader { gso_type, ..good };
            assert_eq!(
                refused(h, &big, Offloads::ALL),
                PacketError::UnknownGsoType(gso_type)
            );
        }
        // Offloads the sender did not negotiate.
        assert_eq!(
            refused(good, &big, Offloads::NONE),
            PacketError::NotNegotiated
        );
        let csum_only = Offloads {
            partial_checksum: true,
            ..Offloads::NONE
        };
        assert_eq!(refused(good, &big, csum_only), PacketError::NotNegotiated);
        let ecn = NetHeader {
            gso_type: GSO_TCPV4 | GSO_ECN,
            ..good
        };
        let no_ecn = Offloads {
            ecn: false,
            ..Offloads::ALL
        };
        assert_eq!(refused(ecn, &big, no_ecn), PacketError::NotNegotiated);
        // Checksum positions past the frame (also for a standard frame), or just inside it.
        let small = &big[..100];
        for (start, offset) in [(99, 0), (98, 1), (0, 99), (u16::MAX, u16::MAX), (60000, 0)] {
            let h = NetHeader {
                gso_type: GSO_NONE,
                csum_start: start,
                csum_offset: offset,
                ..good
            };
            assert_eq!(
                refused(h, small, Offloads::ALL),
                PacketError::ChecksumOutside { start, offset }
            );
        }
        let last = NetHeader {
            gso_type: GSO_NONE,
            csum_start: 90,
            csum_offset: 8,
            hdr_len: 0,
            ..good
        };
        assert!(check(&last, small, Offloads::ALL).is_ok());
        assert_eq!(
            refused(
                NetHeader {
                    hdr_len: 101,
                    ..last
                },
                small,
                Offloads::ALL
            ),
            PacketError::HeaderLength(101)
        );
        // GSO without NEEDS_CSUM; gso_size 0, too big for the MTU; just fitting.
        let h = NetHeader { flags: 0, ..good };
        assert_eq!(
            refused(h, &big, Offloads::ALL),
            PacketError::GsoWithoutChecksum
        );
        for size in [0, 1461, u16::MAX] {
            let h = NetHeader {
                gso_size: size,
                ..good
            };
            assert_eq!(refused(h, &big, Offloads::ALL), PacketError::GsoSize(size));
        }
        let h = NetHeader {
            gso_size: 1460,
            ..good
        };
        let checked = check(&h, &big, Offloads::ALL).unwrap();
        let mut out = vec![0u8; MAX_FRAME];
        assert_eq!(checked.write_standard(0, &mut out), MAX_FRAME);
        // Tiny segments: too many of them.
        let h = NetHeader {
            gso_size: 8,
            ..good
        };
        assert_eq!(
            refused(h, &big, Offloads::ALL),
            PacketError::TooManySegments(2500)
        );
        // Checksum not at the TCP checksum, or the headers not what the header claims.
        for (start, offset) in [(34, 6), (14, 16), (35, 16)] {
            let h = NetHeader {
                csum_start: start,
                csum_offset: offset,
                ..good
            };
            assert_eq!(refused(h, &big, Offloads::ALL), PacketError::NotTcpIpv4);
        }
        let corruptions: [(usize, u8); 7] = [
            (12, 0x86), // EtherType IPv6
            (14, 0x65), // IP version 6
            (14, 0x44), // IHL 4
            (16, 0x00), // total length too short
            (20, 0x20), // more fragments
            (23, 17),   // UDP
            (46, 0x40), // TCP data offset 4
        ];
        for (at, value) in corruptions {
            let mut bad = big.clone();
            bad[at] = value;
            let result = check(&good, &bad, Offloads::ALL);
            assert_eq!(result.unwrap_err(), PacketError::NotTcpIpv4, "byte {at}");
        }
        // A 60-byte TCP header: its options are copied into every segment, which then no
        // longer fit the MTU at this gso_size, but do at a smaller one.
        let mut long = big.clone();
        long[46] = 0xf0;
        assert_eq!(
            refused(good, &long, Offloads::ALL),
            PacketError::GsoSize(MSS)
        );
        let h = NetHeader {
            gso_size: 1420,
            ..good
        };
        assert!(check(&h, &long, Offloads::ALL).is_ok());
        // A GSO frame cut short (its IPv4 total length says more).
        assert_eq!(
            refused(NetHeader { hdr_len: 0, ..good }, &big[..60], Offloads::ALL),
            PacketError::NotTcpIpv4
        );
        for e in [PacketError::TooShort(1), PacketError::TooManySegments(2)] {
            assert!(!alloc::format!("{e}").is_empty());
        }
    }

    /// Random headers over random and real frames: `check` never panics, and whatever it
    /// accepts rewrites into frames of standard size without panicking.
    #[test]
    fn random_headers() {
        let mut random = crate::xorshift(0x1234_5678_9abc_def1u64);
        let mut base = tcp_frame(30000, true, true, true);
        let good = partial(&mut base);
        let mut out = vec![0u8; MAX_FRAME];
        let mut accepted = 0;
        for _ in 0..20000 {
            let mut frame = base.clone();
            if random().is_multiple_of(4) {
                frame.truncate(14 + (random() % base.len() as u64) as usize);
            }
            for _ in 0..random() % 3 {
                let at = (random() % 60) as usize % frame.len().max(1);
                if let Some(b) = frame.get_mut(at) {
                    *b = random() as u8;
                }
            }
            let mut h = good;
            match random() % 6 {
                0 => {
                    h = NetHeader::from_bytes(
                        &(random() as u128).to_le_bytes()[..12].try_into().unwrap(),
                    )
                }
                1 => h.gso_size = random() as u16,
                2 => h.csum_start = random() as u16 % 80,
                3 => h.gso_type = random() as u8,
                4 => h.hdr_len = random() as u16,
                _ => {}
            }
            if let Ok(checked) = check(&h, &frame, Offloads::ALL) {
                accepted += 1;
                for k in 0..checked.segments() {
                    let n = checked.write_standard(k, &mut out);
                    assert!((MIN_FRAME..=MAX_FRAME).contains(&n));
                }
            }
        }
        assert!(accepted > 100, "some were accepted ({accepted})");
    }

    #[test]
    fn the_verdict_depends_on_the_prefix_only() {
        let mut random = crate::xorshift(0x9e37_79b9_7f4a_7c15u64);
        let mut base = tcp_frame(20000, false, true, false);
        let good = partial(&mut base);
        let (mut accepted, mut refused) = (0, 0);
        for _ in 0..5000 {
            let mut frame = base.clone();
            if random().is_multiple_of(3) {
                frame.truncate(14 + (random() % 200) as usize);
            }
            // Hostile bytes anywhere in the headers, and options that move TCP's start.
            for _ in 0..random() % 3 {
                let at = (random() % CHECKED_PREFIX as u64) as usize;
                if let Some(b) = frame.get_mut(at) {
                    *b = random() as u8;
                }
            }
            let mut h = good;
            if random().is_multiple_of(4) {
                h.csum_start = 14 + (random() % 64) as u16;
            }
            let verdict = check(&h, &frame, Offloads::ALL).map(|_| ());
            let prefix = &frame[..frame.len().min(CHECKED_PREFIX)];
            assert_eq!(
                check_prefix(&h, prefix, frame.len(), Offloads::ALL),
                verdict
            );
            // Whatever follows the prefix cannot change the verdict.
            let mut other = frame.clone();
            for b in other.iter_mut().skip(CHECKED_PREFIX) {
                *b = random() as u8;
            }
            assert_eq!(check(&h, &other, Offloads::ALL).map(|_| ()), verdict);
            if verdict.is_ok() {
                accepted += 1;
            } else {
                refused += 1;
            }
        }
        assert!(
            accepted > 100 && refused > 100,
            "{accepted} accepted, {refused} refused"
        );
        // A prefix that is not the frame's first bytes is refused, never read past.
        let prefix = &base[..CHECKED_PREFIX - 1];
        assert!(check_prefix(&good, prefix, base.len(), Offloads::ALL).is_err());
    }
}
