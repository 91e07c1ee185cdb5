//! A virtio network device (device ID 1, virtio 1.2 §5.1) with one receive and one transmit
//! queue: queue 0 receives (host to guest), queue 1 transmits (guest to host); no control
//! queue, no multiqueue. Linux drives it with its own `virtio_net` driver.
//!
//! Features: `VIRTIO_NET_F_MAC` (the MAC address in the configuration space),
//! `VIRTIO_NET_F_STATUS` (the link state; up unless [`VirtioNet::set_link`] takes it down),
//! `VIRTIO_NET_F_MTU` (1500, so that Linux refuses a larger MTU instead of sending frames this
//! device drops), on top of the transport's `VIRTIO_F_VERSION_1` (every buffer starts with the
//! 12-byte `virtio_net_hdr_v1`, [`HEADER_SIZE`]), and the offloads that let Linux hand over
//! and take 64 KiB TCP segments as one frame: `CSUM` and `HOST_TSO4` / `HOST_ECN` (the guest
//! sends partial checksums and TCP/IPv4 GSO frames), `GUEST_CSUM` and `GUEST_TSO4` /
//! `GUEST_ECN` (it takes them), and `MRG_RXBUF` (a large frame spreads over several receive
//! buffers, `num_buffers` in the first one's header; Linux posts page-sized buffers then).
//!
//! Frames travel with their header ([`NetHeader`]) through a [`NetBackend`]: the device hands
//! it each frame the guest transmits and asks it for frames to receive. A received frame the
//! guest can take as it is (the offloads it acked, [`Offloads::accept`]) goes in whole; any
//! other is rewritten into standard frames with full checksums (`netpacket`'s segmentation
//! and checksum completion), one receive buffer each. The VMM's backend is its port on a
//! switch (`vmm::net::NetPort`); the tests use one of two bounded queues (`FramePort`). Frames
//! are not copied inside the device: the backend copies a transmitted frame from the guest's
//! buffers to where it goes ([`TxFrame`]) and a received one from where it is into the
//! guest's buffers ([`NetBackend::read_received`]); the header and the first
//! [`CHECKED_PREFIX`] bytes, which the checks read, are the device's private copies (a frame
//! being rewritten is copied whole first).
//!
//! Everything the guest hands over is checked, and a bad frame is dropped and counted in
//! [`NetStats`], never fatal:
//! * transmit: a chain with a device-writable buffer, a header shorter than 12 bytes, a header
//!   that [`netpacket::check_prefix`] refuses against the offloads the driver acked (flags, GSO
//!   types, checksum positions, `gso_size`, `hdr_len`, headers that are not what the GSO type
//!   says), or a frame outside 14..=1514 bytes (a GSO frame: 14 + 64 KiB); the chain is
//!   returned with nothing written;
//! * receive: a frame the backend offers that fails the same checks is dropped without using
//!   a buffer; a chain with a device-readable buffer is returned unused (length 0); a frame
//!   that does not fit the chain (or, with mergeable buffers, all the chains the driver made
//!   available) is dropped and the chain returned with length 0, which Linux counts as a
//!   length error and reposts. Frames are never truncated.
//!
//! While the backend has no room for a transmitted frame ([`NetBackend::transmit_ready`]) the
//! device leaves the guest's chains in the queue: the VMM empties the backend and polls again.
//! While no receive buffer is posted, frames wait in the backend. A broken queue (a buffer
//! outside guest memory, a descriptor loop, an index jump) is a [`QueueError`] that puts the
//! device in DEVICE_NEEDS_RESET, as for the other devices ([`super::mmio`]).

use super::mmio::VirtioBackend;
use super::queue::{Chain, Queue, QueueError};
use super::{copy_config, device_id};
use crate::guest_memory::GuestMemory;
use crate::guest_memory::MemoryError;
use crate::netpacket::{self, Offloads, PacketError};
use alloc::vec::Vec;

pub use crate::netpacket::{
    NetHeader, CHECKED_PREFIX, HEADER_SIZE, MAX_FRAME, MAX_GSO_FRAME, MIN_FRAME, MTU,
};

/// The receive queue (host to guest).
pub const RECEIVE_QUEUE: u16 = 0;
/// The transmit queue (guest to host).
pub const TRANSMIT_QUEUE: u16 = 1;
/// Feature: the guest may send partial checksums.
pub const F_CSUM: u64 = 1 << 0;
/// Feature: the guest takes partial checksums.
pub const F_GUEST_CSUM: u64 = 1 << 1;
/// Feature: the device reports its MTU in the configuration space.
pub const F_MTU: u64 = 1 << 3;
/// Feature: the device has a MAC address in the configuration space.
pub const F_MAC: u64 = 1 << 5;
/// Feature: the guest takes TCP/IPv4 GSO frames.
pub const F_GUEST_TSO4: u64 = 1 << 7;
/// Feature: the guest takes GSO frames with ECN.
pub const F_GUEST_ECN: u64 = 1 << 9;
/// Feature: the guest may send TCP/IPv4 GSO frames.
pub const F_HOST_TSO4: u64 = 1 << 11;
/// Feature: the guest may send GSO frames with ECN.
pub const F_HOST_ECN: u64 = 1 << 13;
/// Feature: mergeable receive buffers.
pub const F_MRG_RXBUF: u64 = 1 << 15;
/// Feature: the configuration space has a link status.
pub const F_STATUS: u64 = 1 << 16;
/// The offload features, all offered.
pub const OFFLOADS: u64 =
    F_CSUM | F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_ECN | F_HOST_TSO4 | F_HOST_ECN | F_MRG_RXBUF;
/// Link status bit: the link is up.
pub const S_LINK_UP: u16 = 1;
/// The maximum size of both queues.
pub const QUEUE_SIZE: u16 = 256;
/// Bytes of the configuration space (mac, status, max_virtqueue_pairs, mtu).
pub const CONFIG_SIZE: usize = 12;

/// Whether `length` is a standard frame size.
pub fn frame_size_ok(length: usize) -> bool {
    (MIN_FRAME..=MAX_FRAME).contains(&length)
}

/// What a guest that acked `features` may send.
pub fn transmit_offloads(features: u64) -> Offloads {
    Offloads {
        partial_checksum: features & F_CSUM != 0,
        tso4: features & F_HOST_TSO4 != 0,
        ecn: features & F_HOST_ECN != 0,
    }
}

/// What a guest that acked `features` takes.
pub fn receive_offloads(features: u64) -> Offloads {
    Offloads {
        partial_checksum: features & F_GUEST_CSUM != 0,
        tso4: features & F_GUEST_TSO4 != 0,
        ecn: features & F_GUEST_ECN != 0,
    }
}

/// Where frames go and come from. Frames are not copied on their way through the device:
/// a transmitted frame is read from the guest's buffers by the backend ([`TxFrame::copy`]),
/// a received one written into them from the backend ([`NetBackend::read_received`]); only
/// the virtio header and the frame's first [`CHECKED_PREFIX`] bytes, which the device checks,
/// are private copies, and those copies are what goes on.
pub trait NetBackend {
    /// Whether a frame of any size ([`MAX_GSO_FRAME`]) would be taken now.
    fn transmit_ready(&self) -> bool {
        true
    }

    /// The guest transmitted `frame` with `header` (checked against what it acked; the
    /// virtio header removed from the frame, `num_buffers` 0).
    fn transmit(&mut self, header: &NetHeader, frame: &TxFrame<'_>);

    /// The oldest frame waiting for the guest, left in place: its header, its length and its
    /// first `min(length, CHECKED_PREFIX)` bytes, copied where the sender can no longer change
    /// them (the device checks these copies and hands the guest these). `None` if none waits.
    fn peek_received(&mut self) -> Option<(NetHeader, usize, &[u8])>;

    /// Copy bytes `offset .. offset + buffer.len()` of the frame
    /// [`NetBackend::peek_received`] returned into `buffer` (straight into the guest's
    /// buffers); bytes outside the frame are left as they are.
    fn read_received(&mut self, offset: usize, buffer: &mut [u8]);

    /// Remove the frame [`NetBackend::peek_received`] returned (it was delivered or dropped).
    fn pop_received(&mut self);
}

/// A frame the guest transmitted, still in its buffers: the device checked its header and
/// its first bytes (a private copy, which goes on as checked); the backend copies it to where it
/// goes ([`TxFrame::copy`]).
pub struct TxFrame<'a> {
    chain: &'a Chain,
    memory: &'a dyn GuestMemory,
    prefix: &'a [u8],
    length: usize,
}

impl TxFrame<'_> {
    /// The frame's length (without the virtio header).
    pub fn len(&self) -> usize {
        self.length
    }

    /// Whether the frame is empty (never: the device refuses frames below [`MIN_FRAME`]).
    pub fn is_empty(&self) -> bool {
        self.length == 0
    }

    /// Hand the frame's bytes to `sink(position, bytes)`, in order: the checked prefix, then
    /// the rest in place from the guest's buffers (in one or more pieces).
    pub fn copy(&self, sink: &mut dyn FnMut(usize, &[u8])) -> Result<(), MemoryError> {
        sink(0, self.prefix);
        let skip = self.prefix.len();
        let rest = self.length - skip;
        let copied = self.chain.read_in_place(
            self.memory,
            (HEADER_SIZE + skip) as u64,
            rest,
            &mut |at, bytes| sink(skip + at, bytes),
        )?;
        // The device measured the chain: it holds the whole frame.
        debug_assert_eq!(copied, rest);
        Ok(())
    }
}

#[cfg(test)]
pub(crate) use frame_port::{FramePort, FrameQueue};

/// The tests' backend: frames in memory instead of a switch's rings.
#[cfg(test)]
mod frame_port {
    use super::{NetBackend, NetHeader, TxFrame, CHECKED_PREFIX};
    use alloc::collections::VecDeque;
    use alloc::vec::Vec;

    /// A bounded queue of frames with their headers: when it is full, a new frame pushes out the
    /// oldest, which is counted in [`FrameQueue::dropped`].
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct FrameQueue {
        frames: VecDeque<(NetHeader, Vec<u8>)>,
        capacity: usize,
        dropped: u64,
    }

    impl FrameQueue {
        /// An empty queue for at most `capacity` frames (at least 1).
        pub fn new(capacity: usize) -> Self {
            FrameQueue {
                frames: VecDeque::new(),
                capacity: capacity.max(1),
                dropped: 0,
            }
        }

        /// Append a copy of `frame` with `header`, dropping the oldest frame if the queue is
        /// full.
        pub fn push(&mut self, header: &NetHeader, frame: &[u8]) {
            if self.frames.len() >= self.capacity {
                self.frames.pop_front();
                self.dropped += 1;
            }
            self.frames.push_back((*header, frame.to_vec()));
        }

        /// The oldest frame and its header.
        pub fn front(&self) -> Option<(NetHeader, &[u8])> {
            self.frames.front().map(|(h, f)| (*h, f.as_slice()))
        }

        /// Remove and return the oldest frame and its header.
        pub fn pop(&mut self) -> Option<(NetHeader, Vec<u8>)> {
            self.frames.pop_front()
        }

        /// Frames waiting.
        pub fn len(&self) -> usize {
            self.frames.len()
        }

        /// Whether no frame waits.
        pub fn is_empty(&self) -> bool {
            self.frames.is_empty()
        }

        /// The most frames that wait.
        pub fn capacity(&self) -> usize {
            self.capacity
        }

        /// Frames pushed out by newer ones.
        pub fn dropped(&self) -> u64 {
            self.dropped
        }
    }

    /// A backend of two bounded queues: frames the guest transmitted wait in `outgoing` until
    /// they are taken ([`FramePort::take_transmitted`]), frames for the guest wait in `incoming`
    /// ([`FramePort::offer`]) until it posts receive buffers. Wiring two devices back to back is
    /// moving frames from one port's outgoing queue to the other's incoming queue.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct FramePort {
        outgoing: FrameQueue,
        incoming: FrameQueue,
    }

    impl FramePort {
        /// Frames each queue holds by default.
        pub const DEFAULT_CAPACITY: usize = 256;

        /// A port whose queues hold [`FramePort::DEFAULT_CAPACITY`] frames each.
        pub fn new() -> Self {
            FramePort::with_capacity(Self::DEFAULT_CAPACITY)
        }

        /// A port whose queues hold `capacity` frames each.
        pub fn with_capacity(capacity: usize) -> Self {
            FramePort {
                outgoing: FrameQueue::new(capacity),
                incoming: FrameQueue::new(capacity),
            }
        }

        /// Queue the standard `frame` (a header of zeros) for the guest (the oldest waiting frame
        /// is dropped if the queue is full; a frame the device does not carry is dropped when it
        /// is its turn).
        pub fn offer(&mut self, frame: &[u8]) {
            self.incoming.push(&NetHeader::default(), frame);
        }

        /// Queue `frame` with `header` for the guest.
        pub fn offer_with(&mut self, header: &NetHeader, frame: &[u8]) {
            self.incoming.push(header, frame);
        }

        /// The oldest frame the guest transmitted that was not taken yet.
        pub fn take_transmitted(&mut self) -> Option<Vec<u8>> {
            self.outgoing.pop().map(|(_, f)| f)
        }

        /// The oldest frame the guest transmitted that was not taken yet, with its header.
        pub fn take_transmitted_with(&mut self) -> Option<(NetHeader, Vec<u8>)> {
            self.outgoing.pop()
        }

        /// Frames the guest transmitted, waiting.
        pub fn outgoing(&self) -> &FrameQueue {
            &self.outgoing
        }

        /// Frames waiting for the guest's receive buffers.
        pub fn incoming(&self) -> &FrameQueue {
            &self.incoming
        }
    }

    impl Default for FramePort {
        fn default() -> Self {
            FramePort::new()
        }
    }

    impl NetBackend for FramePort {
        fn transmit(&mut self, header: &NetHeader, frame: &TxFrame<'_>) {
            let mut bytes = alloc::vec![0; frame.len()];
            frame
                .copy(&mut |at, piece| bytes[at..at + piece.len()].copy_from_slice(piece))
                .expect("the device checked the chain");
            self.outgoing.push(header, &bytes);
        }

        fn peek_received(&mut self) -> Option<(NetHeader, usize, &[u8])> {
            let (header, frame) = self.incoming.front()?;
            Some((
                header,
                frame.len(),
                &frame[..frame.len().min(CHECKED_PREFIX)],
            ))
        }

        fn read_received(&mut self, offset: usize, buffer: &mut [u8]) {
            if let Some((_, frame)) = self.incoming.front() {
                if let Some(bytes) = frame.get(offset..offset + buffer.len()) {
                    buffer.copy_from_slice(bytes);
                }
            }
        }

        fn pop_received(&mut self) {
            self.incoming.pop();
        }
    }
}

/// What the device carried and what it dropped, and why.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames handed to the backend.
    pub tx_frames: u64,
    /// Their bytes (without virtio headers).
    pub tx_bytes: u64,
    /// Of them, GSO frames.
    pub tx_gso: u64,
    /// Transmitted chains dropped because they had a device-writable buffer.
    pub tx_bad_chain: u64,
    /// Transmitted frames dropped because the header was short or refused.
    pub tx_bad_header: u64,
    /// Transmitted frames dropped because of their size.
    pub tx_bad_size: u64,
    /// Frames placed in receive buffers (each segment of a rewritten GSO frame counts).
    pub rx_frames: u64,
    /// Their bytes (without virtio headers).
    pub rx_bytes: u64,
    /// Of them, GSO frames that went in whole.
    pub rx_gso: u64,
    /// GSO frames cut into standard frames for a guest without the offload.
    pub rx_segmented: u64,
    /// Receive chains returned unused because they had a device-readable buffer.
    pub rx_bad_chain: u64,
    /// Frames from the backend dropped because their size or header was refused.
    pub rx_bad_size: u64,
    /// Frames dropped because they did not fit the receive chains they were given.
    pub rx_too_big: u64,
}

/// The network backend.
pub struct VirtioNet<B> {
    backend: B,
    mac: [u8; 6],
    link_up: bool,
    generation: u32,
    stats: NetStats,
    /// The features the driver acked (0 until DRIVER_OK).
    features: u64,
    /// The received frame being rewritten for the guest, copied out of the backend (only
    /// when the guest lacks an offload; allocated at the first such frame), and whether it
    /// holds the waiting frame.
    whole: Vec<u8>,
    whole_loaded: bool,
    /// The next standard frame to make of the received frame that waits (when it is being
    /// rewritten for the guest).
    segment: usize,
    /// The receive chains a frame is being placed into, and those refused (reused per frame).
    rx_chains: Vec<Chain>,
    rx_bad: Vec<u16>,
}

/// Whether the frame that waits goes to the guest whole or rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    Whole,
    Rewritten,
}

impl<B: NetBackend> VirtioNet<B> {
    /// A device with MAC address `mac`, the link up, exchanging frames with `backend`.
    pub fn new(mac: [u8; 6], backend: B) -> Self {
        VirtioNet {
            backend,
            mac,
            link_up: true,
            generation: 0,
            stats: NetStats::default(),
            features: 0,
            whole: Vec::new(),
            whole_loaded: false,
            segment: 0,
            rx_chains: Vec::new(),
            rx_bad: Vec::new(),
        }
    }

    /// The MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Whether the link is up.
    pub fn link_up(&self) -> bool {
        self.link_up
    }

    /// The features the driver acked (0 before DRIVER_OK).
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Take the link up or down (the driver is told with a configuration-change interrupt at
    /// the next poll). Frames are carried either way; Linux stops transmitting while it is
    /// down.
    pub fn set_link(&mut self, up: bool) {
        if self.link_up != up {
            self.link_up = up;
            self.generation = self.generation.wrapping_add(1);
        }
    }

    /// The counters.
    pub fn stats(&self) -> &NetStats {
        &self.stats
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, writable (to offer frames or take transmitted ones; then poll the
    /// device).
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Check one transmitted chain and hand its frame to the backend, or count why not.
    fn transmit_chain(
        &mut self,
        chain: &Chain,
        memory: &dyn GuestMemory,
    ) -> Result<(), QueueError> {
        if chain.writable_length() != 0 {
            self.stats.tx_bad_chain += 1;
            return Ok(());
        }
        let total = chain.readable_length();
        let mut bytes = [0u8; HEADER_SIZE];
        if chain.read(memory, 0, &mut bytes)? < HEADER_SIZE {
            self.stats.tx_bad_header += 1;
            return Ok(());
        }
        let header = NetHeader {
            num_buffers: 0,
            ..NetHeader::from_bytes(&bytes)
        };
        let largest = if self.features & F_HOST_TSO4 != 0 {
            MAX_GSO_FRAME
        } else {
            MAX_FRAME
        };
        let Some(length) = usize::try_from(total - HEADER_SIZE as u64)
            .ok()
            .filter(|&l| l <= largest)
        else {
            self.stats.tx_bad_size += 1;
            return Ok(());
        };
        let mut prefix = [0u8; CHECKED_PREFIX];
        let prefix = &mut prefix[..length.min(CHECKED_PREFIX)];
        chain.read(memory, HEADER_SIZE as u64, prefix)?;
        match netpacket::check_prefix(&header, prefix, length, transmit_offloads(self.features)) {
            Ok(()) => {
                let frame = TxFrame {
                    chain,
                    memory,
                    prefix,
                    length,
                };
                self.backend.transmit(&header, &frame);
                self.stats.tx_frames += 1;
                self.stats.tx_bytes += length as u64;
                if header.is_gso() {
                    self.stats.tx_gso += 1;
                }
            }
            Err(PacketError::TooShort(_) | PacketError::TooLong(_)) => self.stats.tx_bad_size += 1,
            Err(_) => self.stats.tx_bad_header += 1,
        }
        Ok(())
    }

    fn transmit(
        &mut self,
        queue: &mut Queue,
        memory: &mut dyn GuestMemory,
    ) -> Result<(), QueueError> {
        loop {
            while self.backend.transmit_ready() {
                let Some(chain) = queue.pop(&*memory)? else {
                    break;
                };
                self.transmit_chain(&chain, &*memory)?;
                queue.add_used(memory, chain.head(), 0)?;
            }
            if !self.backend.transmit_ready() {
                // The rest waits in the queue until the backend has room (the VMM polls).
                return Ok(());
            }
            if !queue.enable_notification(memory)? {
                return Ok(());
            }
        }
    }

    /// The waiting frame's header, length and checked prefix (copied), if one waits.
    fn waiting(&mut self) -> Option<(NetHeader, usize, [u8; CHECKED_PREFIX])> {
        let (header, length, first) = self.backend.peek_received()?;
        let mut prefix = [0u8; CHECKED_PREFIX];
        let n = first.len().min(CHECKED_PREFIX);
        prefix[..n].copy_from_slice(&first[..n]);
        Some((header, length, prefix))
    }

    /// Drop the waiting frame.
    fn pop_waiting(&mut self) {
        self.backend.pop_received();
        self.segment = 0;
        self.whole_loaded = false;
    }

    /// How the waiting frame goes to the guest; drops (and counts) frames that fail their
    /// checks. `None` if no frame waits.
    fn next_frame(&mut self) -> Option<Delivery> {
        let accepts = receive_offloads(self.features);
        loop {
            let (header, length, first) = self.backend.peek_received()?;
            // (A backend that gives a wrong prefix has its frame refused by the check too.)
            match netpacket::check_prefix(&header, first, length, Offloads::ALL) {
                Ok(()) if accepts.accept(&header) => return Some(Delivery::Whole),
                Ok(()) => return Some(Delivery::Rewritten),
                Err(_) => {
                    self.pop_waiting();
                    self.stats.rx_bad_size += 1;
                }
            }
        }
    }

    /// Place the waiting frame whole: in one chain, or with mergeable buffers in as many as
    /// it needs. Returns false (nothing taken from the queue) if the driver has not made
    /// enough buffers available yet.
    fn receive_whole(
        &mut self,
        queue: &mut Queue,
        memory: &mut dyn GuestMemory,
    ) -> Result<bool, QueueError> {
        let mergeable = self.features & F_MRG_RXBUF != 0;
        let Some((header, length, prefix)) = self.waiting() else {
            return Ok(true);
        };
        let needed = (HEADER_SIZE + length) as u64;
        let mut next_available = queue.next_available();
        // Kept across frames (a 64 KiB frame takes some 20 chains): no allocation per frame.
        self.rx_chains.clear();
        self.rx_bad.clear();
        let mut room = 0u64;
        while room < needed && (mergeable || self.rx_chains.is_empty()) {
            let Some(chain) = queue.pop(&*memory)? else {
                if self.rx_chains.len() + self.rx_bad.len() >= usize::from(queue.size()) {
                    // Every buffer the driver has is not enough: the frame can never fit.
                    break;
                }
                queue.rewind(next_available);
                return Ok(false);
            };
            if chain.readable_length() != 0 {
                if self.rx_chains.is_empty() {
                    // Nothing to give back before it: return it now.
                    queue.add_used(memory, chain.head(), 0)?;
                    self.stats.rx_bad_chain += 1;
                    next_available = queue.next_available();
                } else {
                    self.rx_bad.push(chain.head());
                }
            } else {
                room += chain.writable_length();
                self.rx_chains.push(chain);
            }
        }
        let header = NetHeader {
            num_buffers: self.rx_chains.len() as u16,
            ..header
        };
        let fits = room >= needed;
        if fits {
            // The stream the guest gets: the header, the checked prefix (our copies), then
            // the rest of the frame straight from the backend.
            let header_bytes = header.to_bytes();
            let checked = length.min(CHECKED_PREFIX);
            let backend = &mut self.backend;
            let mut fill = |position: usize, out: &mut [u8]| {
                let mut at = 0;
                while at < out.len() {
                    let p = position + at;
                    let n = if p < HEADER_SIZE {
                        let n = (HEADER_SIZE - p).min(out.len() - at);
                        out[at..at + n].copy_from_slice(&header_bytes[p..p + n]);
                        n
                    } else if p - HEADER_SIZE < checked {
                        let f = p - HEADER_SIZE;
                        let n = (checked - f).min(out.len() - at);
                        out[at..at + n].copy_from_slice(&prefix[f..f + n]);
                        n
                    } else {
                        let n = out.len() - at;
                        backend.read_received(p - HEADER_SIZE, &mut out[at..]);
                        n
                    };
                    at += n;
                }
            };
            let mut done = 0u64;
            for chain in &self.rx_chains {
                let take = chain.writable_length().min(needed - done);
                // At most 12 + 64 KiB.
                chain.write_in_place(memory, 0, take as usize, &mut |at, out| {
                    fill(done as usize + at, out)
                })?;
                queue.add_used(memory, chain.head(), take as u32)?;
                done += take;
            }
            self.stats.rx_frames += 1;
            self.stats.rx_bytes += length as u64;
            if header.is_gso() {
                self.stats.rx_gso += 1;
            }
        } else {
            for chain in &self.rx_chains {
                queue.add_used(memory, chain.head(), 0)?;
            }
            self.stats.rx_too_big += 1;
        }
        for &head in &self.rx_bad {
            queue.add_used(memory, head, 0)?;
        }
        self.stats.rx_bad_chain += self.rx_bad.len() as u64;
        self.pop_waiting();
        Ok(true)
    }

    /// Copy the waiting frame into `whole` (its checked prefix from our copy), once per frame.
    fn load_whole(&mut self) -> Option<(NetHeader, usize)> {
        let (header, length, prefix) = self.waiting()?;
        if !self.whole_loaded {
            if self.whole.len() < length {
                self.whole.resize(MAX_GSO_FRAME.max(length), 0);
            }
            let checked = length.min(CHECKED_PREFIX);
            self.whole[..checked].copy_from_slice(&prefix[..checked]);
            self.backend
                .read_received(checked, &mut self.whole[checked..length]);
            self.whole_loaded = true;
        }
        Some((header, length))
    }

    /// Place the next standard frame made of the waiting frame (a segment, or the frame with
    /// its checksum completed) in one chain. Returns false if no chain is available.
    fn receive_rewritten(
        &mut self,
        queue: &mut Queue,
        memory: &mut dyn GuestMemory,
    ) -> Result<bool, QueueError> {
        let Some((header, length)) = self.load_whole() else {
            return Ok(true);
        };
        let Ok(checked) = netpacket::check(&header, &self.whole[..length], Offloads::ALL) else {
            // Checked in next_frame already, on the same prefix.
            self.pop_waiting();
            return Ok(true);
        };
        let Some(chain) = queue.pop(&*memory)? else {
            return Ok(false);
        };
        if chain.readable_length() != 0 {
            self.stats.rx_bad_chain += 1;
            queue.add_used(memory, chain.head(), 0)?;
            return Ok(true);
        }
        let count = checked.segments();
        let mut out = [0u8; MAX_FRAME];
        let length = checked.write_standard(self.segment.min(count - 1), &mut out);
        let needed = (HEADER_SIZE + length) as u64;
        if chain.writable_length() < needed {
            self.stats.rx_too_big += 1;
            queue.add_used(memory, chain.head(), 0)?;
        } else {
            let header = NetHeader {
                num_buffers: 1,
                ..NetHeader::default()
            };
            chain.write(memory, 0, &header.to_bytes())?;
            chain.write(memory, HEADER_SIZE as u64, &out[..length])?;
            // At most 12 + 1514 bytes.
            queue.add_used(memory, chain.head(), needed as u32)?;
            self.stats.rx_frames += 1;
            self.stats.rx_bytes += length as u64;
        }
        self.segment += 1;
        if self.segment >= count {
            if count > 1 {
                self.stats.rx_segmented += 1;
            }
            self.pop_waiting();
        }
        Ok(true)
    }

    fn receive(
        &mut self,
        queue: &mut Queue,
        memory: &mut dyn GuestMemory,
    ) -> Result<(), QueueError> {
        loop {
            let mut starved = false;
            while let Some(delivery) = self.next_frame() {
                let placed = match delivery {
                    Delivery::Whole => self.receive_whole(queue, memory)?,
                    Delivery::Rewritten => self.receive_rewritten(queue, memory)?,
                };
                if !placed {
                    starved = true;
                    break;
                }
            }
            if self.next_frame().is_none() {
                return Ok(());
            }
            // A frame waits for buffers: ask the driver to say when it adds some. (When some
            // are there but not enough for the frame, more cannot have come meanwhile: the
            // guest is stopped while the device works.)
            if !queue.enable_notification(memory)? || starved {
                return Ok(());
            }
        }
    }

    fn work(
        &mut self,
        queues: &mut [Queue],
        memory: &mut dyn GuestMemory,
    ) -> Result<(), QueueError> {
        if let Some(queue) = queues.get_mut(usize::from(TRANSMIT_QUEUE)) {
            if queue.is_ready() {
                self.transmit(queue, memory)?;
            }
        }
        if let Some(queue) = queues.get_mut(usize::from(RECEIVE_QUEUE)) {
            if queue.is_ready() {
                self.receive(queue, memory)?;
            }
        }
        Ok(())
    }
}

impl<B: NetBackend> VirtioBackend for VirtioNet<B> {
    fn device_id(&self) -> u32 {
        device_id::NET
    }

    fn features(&self) -> u64 {
        F_MAC | F_STATUS | F_MTU | OFFLOADS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; CONFIG_SIZE];
        config[0..6].copy_from_slice(&self.mac);
        let status = if self.link_up { S_LINK_UP } else { 0 };
        config[6..8].copy_from_slice(&status.to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
                                                            // 1500 fits.
        config[10..12].copy_from_slice(&(MTU as u16).to_le_bytes());
        copy_config(&config, offset, data);
    }

    fn config_generation(&self) -> u32 {
        self.generation
    }

    fn activate(&mut self, features: u64) {
        self.features = features;
    }

    fn reset(&mut self) {
        // Waiting frames, the counters and the link state stay.
        self.features = 0;
        self.segment = 0;
        self.whole_loaded = false;
    }

    fn notify(
        &mut self,
        _queue: u16,
        queues: &mut [Queue],
        memory: &mut dyn GuestMemory,
    ) -> Result<(), QueueError> {
        self.work(queues, memory)
    }

    fn poll(
        &mut self,
        queues: &mut [Queue],
        memory: &mut dyn GuestMemory,
    ) -> Result<(), QueueError> {
        self.work(queues, memory)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest_memory::VecMemory;
    use crate::mmio::MmioDevice;
    use crate::virtio::feature;
    use crate::virtio::mmio::test_transport::*;
    use crate::virtio::mmio::{
        reg, VirtioMmio, INTERRUPT_CONFIG_CHANGE, INTERRUPT_USED_BUFFER, TRANSPORT_FEATURES,
    };
    use crate::virtio::queue::test_driver::Driver;
    use crate::virtio::queue::{DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
    use crate::virtio::status;
    use alloc::vec;

    const RX: usize = RECEIVE_QUEUE as usize;
    const TX: usize = TRANSMIT_QUEUE as usize;
    /// Transmit buffers.
    const TX_DATA: u64 = 0x8000;
    /// Receive buffers: 16 of 2 KiB.
    const RX_DATA: u64 = 0x10000;
    const RX_BUFFER: u32 = 2048;
    const MAC_A: [u8; 6] = [0x52, 0x54, 0x00, 0x4c, 0x34, 0x01];
    const MAC_B: [u8; 6] = [0x52, 0x54, 0x00, 0x4c, 0x34, 0x02];
    /// What Linux's driver accepts here but the offloads.
    const LEGACY: u64 = feature::VERSION_1
        | feature::RING_EVENT_IDX
        | feature::RING_INDIRECT_DESC
        | F_MAC
        | F_STATUS
        | F_MTU;
    /// What Linux's driver accepts here.
    const LINUX: u64 = LEGACY | OFFLOADS;

    type Net = VirtioMmio<VirtioNet<FramePort>, VecMemory>;

    fn net_with(mac: [u8; 6], port: FramePort, features: u64) -> (Net, Vec<Driver>) {
        let mut d = VirtioMmio::new(VirtioNet::new(mac, port), VecMemory::new(0, 0x20000));
        let drivers = bring_up(&mut d, features, 2, 16);
        (d, drivers)
    }

    fn net(features: u64) -> (Net, Vec<Driver>) {
        net_with(MAC_A, FramePort::new(), features)
    }

    /// Run `f` on a copy of the device's memory and put it back (the driver side).
    fn guest(d: &mut Net, f: impl FnOnce(&mut VecMemory)) {
        let mut m = d.memory().clone();
        f(&mut m);
        *d.memory_mut() = m;
    }

    /// A frame of `length` bytes: destination, source, EtherType 0x88b5 (local experimental),
    /// then a pattern made of `seed`.
    fn frame(length: usize, seed: u8) -> Vec<u8> {
        let mut f: Vec<u8> = (0..length)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect();
        let header = [MAC_B, MAC_A].concat();
        let n = length.min(12);
        f[..n].copy_from_slice(&header[..n]);
        if length >= 14 {
            f[12..14].copy_from_slice(&[0x88, 0xb5]);
        }
        f
    }

    /// A transmit header: Linux's (all zero) unless a test asks for offloads.
    fn tx_header(flags: u8, gso_type: u8) -> [u8; HEADER_SIZE] {
        let mut h = [0u8; HEADER_SIZE];
        h[0] = flags;
        h[1] = gso_type;
        h
    }

    /// Queue a transmit chain of header + frame at `at` in one buffer; returns its head.
    fn send(d: &mut Net, driver: &mut Driver, at: u64, header: &[u8], frame: &[u8]) -> u16 {
        let mut head = 0;
        guest(d, |m| {
            m.write(at, header).unwrap();
            m.write(at + header.len() as u64, frame).unwrap();
            head = driver.add_chain(m, &[(at, (header.len() + frame.len()) as u32, false)]);
        });
        write(d, reg::QUEUE_NOTIFY, TRANSMIT_QUEUE.into());
        head
    }

    /// Post receive buffer `i` (2 KiB at RX_DATA + 2 KiB * i) as Linux's small buffers do,
    /// and ask for an interrupt at the next used buffer (`used_event`, as Linux's
    /// `virtqueue_enable_cb` does; ignored without EVENT_IDX).
    fn post(d: &mut Net, driver: &mut Driver, i: u64, length: u32) -> u16 {
        let mut head = 0;
        guest(d, |m| {
            let used_event = driver.available + 4 + 2 * u64::from(driver.size);
            m.write_u16(used_event, driver.used_index(m)).unwrap();
            head = driver.add_chain(m, &[(RX_DATA + u64::from(RX_BUFFER) * i, length, true)]);
        });
        write(d, reg::QUEUE_NOTIFY, RECEIVE_QUEUE.into());
        head
    }

    /// The header and frame in receive buffer `i`, `used` bytes long.
    fn received(d: &Net, i: u64, used: u32) -> (Vec<u8>, Vec<u8>) {
        let at = (RX_DATA + u64::from(RX_BUFFER) * i) as usize;
        let bytes = &d.memory().bytes()[at..at + used as usize];
        (bytes[..HEADER_SIZE].to_vec(), bytes[HEADER_SIZE..].to_vec())
    }

    fn transmitted(d: &mut Net) -> Vec<Vec<u8>> {
        core::iter::from_fn(|| d.backend_mut().backend_mut().take_transmitted()).collect()
    }

    fn stats(d: &Net) -> NetStats {
        *d.backend().stats()
    }

    #[test]
    fn identity_features_and_config() {
        let (mut d, _) = net(LINUX);
        assert_eq!(read(&mut d, reg::DEVICE_ID), 1);
        assert_eq!(device_features(&mut d), LINUX | TRANSPORT_FEATURES);
        assert_eq!(d.read(reg::CONFIG, 4), 0x4c00_5452);
        let mut mac = [0u8; 6];
        for (i, b) in mac.iter_mut().enumerate() {
            *b = d.read(reg::CONFIG + i as u64, 1) as u8;
        }
        assert_eq!(mac, MAC_A);
        assert_eq!(d.read(reg::CONFIG + 6, 2), u64::from(S_LINK_UP));
        assert_eq!(d.read(reg::CONFIG + 8, 2), 1, "max_virtqueue_pairs");
        assert_eq!(d.read(reg::CONFIG + 10, 2), 1500, "mtu");
        assert_eq!(d.read(reg::CONFIG + 12, 4), 0);
        // Writes to the configuration space change nothing.
        d.write(reg::CONFIG, 4, 0);
        assert_eq!(d.backend().mac(), MAC_A);
        // The link goes down and up with a configuration interrupt each.
        d.backend_mut().set_link(false);
        d.poll();
        assert_eq!(take_interrupt(&mut d), INTERRUPT_CONFIG_CHANGE);
        assert_eq!(read(&mut d, reg::CONFIG_GENERATION), 1);
        assert_eq!(d.read(reg::CONFIG + 6, 2), 0);
        d.backend_mut().set_link(false);
        d.poll();
        assert!(!d.irq_level(), "no change, no interrupt");
        d.backend_mut().set_link(true);
        d.poll();
        assert_eq!(take_interrupt(&mut d), INTERRUPT_CONFIG_CHANGE);
        assert!(d.backend().link_up());
        // A driver that wants features not offered (e.g. the control queue, bit 17) fails.
        assert!(!negotiate(&mut d, LINUX | 1 << 17));
        // The minimal driver: VERSION_1 alone works too.
        let (d, _) = net(feature::VERSION_1);
        assert_eq!(d.error(), None);
    }

    #[test]
    fn transmit_hands_frames_to_the_backend() {
        let (mut d, mut drivers) = net(LINUX);
        let small = frame(MIN_FRAME, 1);
        let big = frame(MAX_FRAME, 2);
        let h0 = send(&mut d, &mut drivers[TX], TX_DATA, &tx_header(0, 0), &small);
        assert_eq!(take_interrupt(&mut d), INTERRUPT_USED_BUFFER);
        // Linux's layout when it cannot push the header: header, then the frame in pieces.
        let mut h1 = 0;
        guest(&mut d, |m| {
            m.write(TX_DATA, &tx_header(0, 0)).unwrap();
            m.write(TX_DATA + 0x100, &big[..100]).unwrap();
            m.write(TX_DATA + 0x1000, &big[100..]).unwrap();
            h1 = drivers[TX].add_chain(
                m,
                &[
                    (TX_DATA, HEADER_SIZE as u32, false),
                    (TX_DATA + 0x100, 100, false),
                    (TX_DATA + 0x1000, (MAX_FRAME - 100) as u32, false),
                ],
            );
        });
        write(&mut d, reg::QUEUE_NOTIFY, TRANSMIT_QUEUE.into());
        assert_eq!(transmitted(&mut d), [small, big]);
        assert_eq!(drivers[TX].used_entry(d.memory(), 0), (h0.into(), 0));
        assert_eq!(drivers[TX].used_entry(d.memory(), 1), (h1.into(), 0));
        let s = stats(&d);
        assert_eq!(
            (s.tx_frames, s.tx_bytes),
            (2, (MIN_FRAME + MAX_FRAME) as u64)
        );
        assert_eq!(
            s,
            NetStats {
                tx_frames: 2,
                tx_bytes: s.tx_bytes,
                ..NetStats::default()
            }
        );
        // Without offloads gso_size, csum_start and csum_offset are not looked at, nor is
        // num_buffers on transmit.
        let mut header = tx_header(0, 0);
        header[4..12].copy_from_slice(&[0xff; 8]);
        send(&mut d, &mut drivers[TX], TX_DATA, &header, &frame(60, 3));
        assert_eq!(transmitted(&mut d), [frame(60, 3)]);
    }

    #[test]
    fn bad_transmit_frames_are_dropped_and_counted() {
        let (mut d, mut drivers) = net(LEGACY);
        let good = frame(60, 7);
        let tx = &mut drivers[TX];
        // Offloads were not offered: NEEDS_CSUM (1), DATA_VALID (2), a GSO type.
        send(&mut d, tx, TX_DATA, &tx_header(1, 0), &good);
        send(&mut d, tx, TX_DATA, &tx_header(2, 0), &good);
        send(&mut d, tx, TX_DATA, &tx_header(0, 1), &good);
        send(&mut d, tx, TX_DATA, &tx_header(0, 0x80), &good);
        // A header cut short, and nothing at all.
        send(&mut d, tx, TX_DATA, &[0; 11], &[]);
        send(&mut d, tx, TX_DATA, &[], &[]);
        // Frames too short (13 bytes, a header alone) and too long (1515, jumbo).
        send(&mut d, tx, TX_DATA, &tx_header(0, 0), &frame(13, 0));
        send(&mut d, tx, TX_DATA, &tx_header(0, 0), &[]);
        send(
            &mut d,
            tx,
            TX_DATA,
            &tx_header(0, 0),
            &frame(MAX_FRAME + 1, 0),
        );
        send(&mut d, tx, TX_DATA, &tx_header(0, 0), &frame(9000, 0));
        // A device-writable buffer in a transmit chain.
        guest(&mut d, |m| {
            m.write(TX_DATA, &tx_header(0, 0)).unwrap();
            m.write(TX_DATA + 12, &good).unwrap();
            tx.add_chain(m, &[(TX_DATA, 72, false), (TX_DATA + 0x1000, 16, true)]);
            tx.add_chain(m, &[(TX_DATA, 72, true)]);
        });
        write(&mut d, reg::QUEUE_NOTIFY, TRANSMIT_QUEUE.into());
        assert!(transmitted(&mut d).is_empty());
        assert_eq!(d.error(), None, "bad frames are not fatal");
        assert_eq!(
            drivers[TX].used_index(d.memory()),
            12,
            "every chain is returned"
        );
        for slot in 0..12 {
            assert_eq!(drivers[TX].used_entry(d.memory(), slot).1, 0);
        }
        let s = stats(&d);
        assert_eq!(
            (s.tx_bad_header, s.tx_bad_size, s.tx_bad_chain, s.tx_frames),
            (6, 4, 2, 0)
        );
        // The device goes on.
        send(&mut d, &mut drivers[TX], TX_DATA, &tx_header(0, 0), &good);
        assert_eq!(transmitted(&mut d), [good]);
    }

    #[test]
    fn received_frames_fill_posted_buffers() {
        let (mut d, mut drivers) = net(LINUX);
        let frames = [frame(MIN_FRAME, 1), frame(98, 2), frame(MAX_FRAME, 3)];
        for f in &frames {
            d.backend_mut().backend_mut().offer(f);
        }
        // No buffers posted yet: the frames wait.
        d.poll();
        assert_eq!(d.backend().backend().incoming().len(), 3);
        assert!(!d.irq_level());
        // Linux's small buffers: 12 + 1518 bytes, one descriptor each.
        let full = (HEADER_SIZE + MAX_FRAME + 4) as u32;
        let heads: Vec<u16> = (0..2)
            .map(|i| post(&mut d, &mut drivers[RX], i, full))
            .collect();
        assert_eq!(d.backend().backend().incoming().len(), 1);
        assert_eq!(take_interrupt(&mut d), INTERRUPT_USED_BUFFER);
        for (i, f) in frames[..2].iter().enumerate() {
            let (id, used) = drivers[RX].used_entry(d.memory(), i as u16);
            assert_eq!(
                (id, used),
                (heads[i].into(), (HEADER_SIZE + f.len()) as u32)
            );
            let (header, bytes) = received(&d, i as u64, used);
            assert_eq!(
                header,
                [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
                "num_buffers = 1"
            );
            assert_eq!(&bytes, f);
        }
        // A chain split over two buffers, exactly as long as header + frame.
        let at = RX_DATA + 2 * u64::from(RX_BUFFER);
        guest(&mut d, |m| {
            drivers[RX].add_chain(
                m,
                &[
                    (at, 7, true),
                    (at + 7, (HEADER_SIZE + MAX_FRAME) as u32 - 7, true),
                ],
            );
        });
        write(&mut d, reg::QUEUE_NOTIFY, RECEIVE_QUEUE.into());
        let used = drivers[RX].used_entry(d.memory(), 2).1;
        assert_eq!(used, (HEADER_SIZE + MAX_FRAME) as u32);
        assert_eq!(received(&d, 2, used).1, frames[2]);
        // A frame offered while buffers wait arrives at the next poll.
        post(&mut d, &mut drivers[RX], 3, full);
        take_interrupt(&mut d);
        d.backend_mut().backend_mut().offer(&frame(200, 9));
        d.poll();
        assert_eq!(take_interrupt(&mut d), INTERRUPT_USED_BUFFER);
        let used = drivers[RX].used_entry(d.memory(), 3).1;
        assert_eq!(received(&d, 3, used).1, frame(200, 9));
        let s = stats(&d);
        assert_eq!(
            (s.rx_frames, s.rx_too_big, s.rx_bad_chain, s.rx_bad_size),
            (4, 0, 0, 0)
        );
        assert_eq!(s.rx_bytes, (MIN_FRAME + 98 + MAX_FRAME + 200) as u64);
    }

    #[test]
    fn frames_that_do_not_fit_are_dropped_not_truncated() {
        // Without mergeable buffers (with them, see `mergeable_buffers`).
        let (mut d, mut drivers) = net(LEGACY);
        let port = d.backend_mut().backend_mut();
        port.offer(&frame(100, 1));
        port.offer(&frame(50, 2));
        // 12 + 99 bytes: one short for the first frame.
        let short = post(&mut d, &mut drivers[RX], 0, HEADER_SIZE as u32 + 99);
        assert_eq!(drivers[RX].used_entry(d.memory(), 0), (short.into(), 0));
        assert_eq!(stats(&d).rx_too_big, 1);
        assert_eq!(
            d.backend().backend().incoming().len(),
            1,
            "the next frame waits"
        );
        assert!(d.memory().bytes()[RX_DATA as usize..][..111]
            .iter()
            .all(|&b| b == 0));
        // A buffer that holds the header alone is no use either.
        post(&mut d, &mut drivers[RX], 1, HEADER_SIZE as u32);
        assert_eq!(stats(&d).rx_too_big, 2);
        assert!(d.backend().backend().incoming().is_empty());
        // Exactly enough is enough.
        d.backend_mut().backend_mut().offer(&frame(50, 3));
        post(&mut d, &mut drivers[RX], 2, HEADER_SIZE as u32 + 50);
        assert_eq!(drivers[RX].used_entry(d.memory(), 2).1, 62);
        assert_eq!(received(&d, 2, 62).1, frame(50, 3));
        assert_eq!(d.error(), None);
    }

    #[test]
    fn bad_receive_chains_and_frames() {
        let (mut d, mut drivers) = net(LINUX);
        // Sizes the device does not carry are dropped without using a buffer.
        let port = d.backend_mut().backend_mut();
        port.offer(&[0; 13]);
        port.offer(&[]);
        port.offer(&frame(MAX_FRAME + 1, 0));
        port.offer(&frame(64, 4));
        // A receive chain with a device-readable buffer is returned unused; the frame waits.
        let rx = &mut drivers[RX];
        let mut bad = 0;
        guest(&mut d, |m| {
            bad = rx.add_chain(m, &[(RX_DATA, 16, false), (RX_DATA + 16, 2000, true)]);
        });
        write(&mut d, reg::QUEUE_NOTIFY, RECEIVE_QUEUE.into());
        assert_eq!(drivers[RX].used_entry(d.memory(), 0), (bad.into(), 0));
        let s = stats(&d);
        assert_eq!((s.rx_bad_size, s.rx_bad_chain, s.rx_frames), (3, 1, 0));
        assert_eq!(d.backend().backend().incoming().len(), 1);
        post(&mut d, &mut drivers[RX], 1, RX_BUFFER);
        let used = drivers[RX].used_entry(d.memory(), 1).1;
        assert_eq!(received(&d, 1, used).1, frame(64, 4));
        assert_eq!(d.error(), None);
    }

    #[test]
    fn waiting_frames_are_bounded_oldest_dropped() {
        let port = FramePort::with_capacity(4);
        let (mut d, mut drivers) = net_with(MAC_A, port, LINUX);
        for i in 0..6 {
            d.backend_mut().backend_mut().offer(&frame(60, i));
        }
        d.poll();
        let incoming = d.backend().backend().incoming();
        assert_eq!(
            (incoming.len(), incoming.dropped(), incoming.capacity()),
            (4, 2, 4)
        );
        for i in 0..4 {
            post(&mut d, &mut drivers[RX], i, RX_BUFFER);
        }
        for i in 0..4u8 {
            let used = drivers[RX].used_entry(d.memory(), i.into()).1;
            assert_eq!(
                received(&d, i.into(), used).1,
                frame(60, i + 2),
                "the oldest two went"
            );
        }
        // The outgoing side is bounded the same way when the VMM does not drain it.
        for i in 0..6 {
            send(
                &mut d,
                &mut drivers[TX],
                TX_DATA,
                &tx_header(0, 0),
                &frame(60, i),
            );
        }
        let outgoing = d.backend().backend().outgoing();
        assert_eq!((outgoing.len(), outgoing.dropped()), (4, 2));
        assert_eq!(transmitted(&mut d)[0], frame(60, 2));
        assert_eq!(FrameQueue::new(0).capacity(), 1);
        assert_eq!(
            FramePort::default().incoming().capacity(),
            FramePort::DEFAULT_CAPACITY
        );
    }

    #[test]
    fn hostile_transmit_queues_break_the_device() {
        // A buffer outside guest memory.
        let (mut d, mut drivers) = net(LINUX);
        guest(&mut d, |m| {
            drivers[TX].add_chain(m, &[(0x1f_fff0, 0x100, false)]);
        });
        write(&mut d, reg::QUEUE_NOTIFY, TRANSMIT_QUEUE.into());
        assert!(matches!(
            d.error(),
            Some(QueueError::BufferOutOfRange { .. })
        ));
        assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(take_interrupt(&mut d), INTERRUPT_CONFIG_CHANGE);
        // A descriptor loop.
        let (mut d, mut drivers) = net(LINUX);
        guest(&mut d, |m| {
            drivers[TX].set_descriptor(m, 0, TX_DATA, 12, DESC_F_NEXT, 1);
            drivers[TX].set_descriptor(m, 1, TX_DATA, 60, DESC_F_NEXT, 0);
            drivers[TX].publish(m, 0);
        });
        write(&mut d, reg::QUEUE_NOTIFY, TRANSMIT_QUEUE.into());
        assert_eq!(d.error(), Some(QueueError::ChainTooLong));
        // Huge lengths: one past memory, two that add up past 4 GiB.
        let (mut d, mut drivers) = net(LINUX);
        guest(&mut d, |m| {
            drivers[TX].add_chain(m, &[(TX_DATA, u32::MAX, false)]);
        });
        write(&mut d, reg::QUEUE_NOTIFY, TRANSMIT_QUEUE.into());
        assert!(matches!(
            d.error(),
            Some(QueueError::BufferOutOfRange { .. })
        ));
        let (mut d, mut drivers) = net(LINUX);
        guest(&mut d, |m| {
            drivers[TX].set_descriptor(m, 0, TX_DATA, 0x1000, DESC_F_NEXT, 1);
            drivers[TX].set_descriptor(m, 1, TX_DATA, u32::MAX - 0xfff, 0, 0);
            drivers[TX].publish(m, 0);
        });
        write(&mut d, reg::QUEUE_NOTIFY, TRANSMIT_QUEUE.into());
        assert_eq!(d.error(), Some(QueueError::LengthOverflow));
        // A bad indirect table, an index past the table, an available index jump.
        let (mut d, mut drivers) = net(LINUX);
        guest(&mut d, |m| {
            drivers[TX].set_descriptor(m, 0, 0x1f_fff0, 32, DESC_F_INDIRECT, 0);
            drivers[TX].publish(m, 0);
        });
        write(&mut d, reg::QUEUE_NOTIFY, TRANSMIT_QUEUE.into());
        assert!(matches!(
            d.error(),
            Some(QueueError::BadIndirectTable { .. })
        ));
        let (mut d, mut drivers) = net(LINUX);
        guest(&mut d, |m| drivers[TX].publish(m, 16));
        write(&mut d, reg::QUEUE_NOTIFY, TRANSMIT_QUEUE.into());
        assert_eq!(d.error(), Some(QueueError::DescriptorIndex(16)));
        let (mut d, drivers) = net(LINUX);
        guest(&mut d, |m| {
            m.write_u16(drivers[TX].available + 2, 17).unwrap()
        });
        write(&mut d, reg::QUEUE_NOTIFY, TRANSMIT_QUEUE.into());
        assert!(matches!(
            d.error(),
            Some(QueueError::AvailableIndexJump { .. })
        ));
        assert!(transmitted(&mut d).is_empty());
        // After a reset the device works again.
        write(&mut d, reg::STATUS, 0);
        d.memory_mut().bytes_mut().fill(0);
        let mut drivers = bring_up(&mut d, LINUX, 2, 16);
        send(
            &mut d,
            &mut drivers[TX],
            TX_DATA,
            &tx_header(0, 0),
            &frame(60, 0),
        );
        assert_eq!(transmitted(&mut d), [frame(60, 0)]);
    }

    #[test]
    fn hostile_receive_queues_break_the_device() {
        // A looping receive chain is looked at only once a frame waits.
        let (mut d, mut drivers) = net(LINUX);
        guest(&mut d, |m| {
            drivers[RX].set_descriptor(m, 0, RX_DATA, 1, DESC_F_NEXT | DESC_F_WRITE, 1);
            drivers[RX].set_descriptor(m, 1, RX_DATA, 1, DESC_F_NEXT | DESC_F_WRITE, 0);
            drivers[RX].publish(m, 0);
        });
        write(&mut d, reg::QUEUE_NOTIFY, RECEIVE_QUEUE.into());
        assert_eq!(d.error(), None);
        d.backend_mut().backend_mut().offer(&frame(60, 0));
        d.poll();
        assert_eq!(d.error(), Some(QueueError::ChainTooLong));
        assert_eq!(stats(&d).rx_frames, 0);
        // A receive buffer outside guest memory.
        let (mut d, mut drivers) = net(LINUX);
        d.backend_mut().backend_mut().offer(&frame(60, 0));
        guest(&mut d, |m| {
            drivers[RX].add_chain(m, &[(0x1f_f000, 0x2000, true)]);
        });
        write(&mut d, reg::QUEUE_NOTIFY, RECEIVE_QUEUE.into());
        assert!(matches!(
            d.error(),
            Some(QueueError::BufferOutOfRange { .. })
        ));
        // The frame is still there for the device after its reset.
        assert_eq!(d.backend().backend().incoming().len(), 1);
    }

    /// Move every frame `from` transmitted to `to`'s incoming queue, as the switch will.
    fn wire(from: &mut Net, to: &mut Net) -> usize {
        let mut n = 0;
        while let Some(f) = from.backend_mut().backend_mut().take_transmitted() {
            to.backend_mut().backend_mut().offer(&f);
            n += 1;
        }
        to.poll();
        n
    }

    #[test]
    fn two_devices_back_to_back() {
        let (mut a, mut da) = net_with(MAC_A, FramePort::new(), LINUX);
        let (mut b, mut db) = net_with(MAC_B, FramePort::new(), feature::VERSION_1 | F_MAC);
        for i in 0..16 {
            post(&mut a, &mut da[RX], i, RX_BUFFER);
            post(&mut b, &mut db[RX], i, RX_BUFFER);
        }
        let sizes = [MIN_FRAME, 42, 60, 64, 577, 1000, MAX_FRAME - 1, MAX_FRAME];
        let mut received_by_b = 0u16;
        let mut received_by_a = 0u16;
        for round in 0..4u8 {
            for (k, &size) in sizes.iter().enumerate() {
                let seed = round * 16 + k as u8;
                // A to B.
                let f = frame(size, seed);
                send(&mut a, &mut da[TX], TX_DATA, &tx_header(0, 0), &f);
                assert_eq!(wire(&mut a, &mut b), 1);
                let (id, used) = db[RX].used_entry(b.memory(), received_by_b);
                assert_eq!(used as usize, HEADER_SIZE + size);
                let (header, bytes) = received(&b, u64::from(id), used);
                assert_eq!(header[10..12], [1, 0]);
                assert_eq!(bytes, f, "round {round}, {size} bytes, A to B");
                received_by_b += 1;
                // Give the buffer back, as Linux reposts one.
                post(&mut b, &mut db[RX], u64::from(id), RX_BUFFER);
                // B to A, the frame reversed in the payload.
                let mut g = frame(size, seed ^ 0xff);
                g[14..].reverse();
                send(&mut b, &mut db[TX], TX_DATA, &tx_header(0, 0), &g);
                assert_eq!(wire(&mut b, &mut a), 1);
                let (id, used) = da[RX].used_entry(a.memory(), received_by_a);
                assert_eq!(received(&a, u64::from(id), used).1, g, "B to A");
                received_by_a += 1;
                post(&mut a, &mut da[RX], u64::from(id), RX_BUFFER);
            }
        }
        for d in [&a, &b] {
            let s = stats(d);
            assert_eq!((s.tx_frames, s.rx_frames), (32, 32));
            assert_eq!(s.tx_bytes, s.rx_bytes);
            assert_eq!(d.error(), None);
        }
        // A burst larger than the posted buffers: the rest waits, then arrives in order.
        let burst: Vec<Vec<u8>> = (0..24).map(|i| frame(100 + i, i as u8)).collect();
        for f in &burst {
            send(&mut a, &mut da[TX], TX_DATA, &tx_header(0, 0), f);
        }
        assert_eq!(wire(&mut a, &mut b), 24);
        assert_eq!(b.backend().backend().incoming().len(), 8);
        let mut got = Vec::new();
        for _ in 0..24 {
            let (id, used) = db[RX].used_entry(b.memory(), received_by_b);
            got.push(received(&b, u64::from(id), used).1);
            received_by_b += 1;
            post(&mut b, &mut db[RX], u64::from(id), RX_BUFFER);
        }
        assert_eq!(got, burst);
        assert!(b.backend().backend().incoming().is_empty());
    }

    /// Random descriptor chains never panic the device, never hand the backend a bad frame,
    /// and every call returns.
    #[test]
    fn random_chains() {
        let mut random = crate::xorshift(0x9e37_79b9_7f4a_7c15u64);
        for _ in 0..300 {
            let (mut d, drivers) = net(LINUX);
            let mut m = d.memory().clone();
            for queue in [RX, TX] {
                for i in 0..16u16 {
                    let address = match random() % 8 {
                        0 => random(),
                        _ => TX_DATA + random() % 0x18000,
                    };
                    let length = match random() % 4 {
                        0 => random() as u32,
                        1 => (random() % 2000) as u32,
                        _ => (random() % 100) as u32,
                    };
                    let flags = (random() % 8) as u16;
                    let next = (random() % 20) as u16;
                    drivers[queue].set_descriptor(&mut m, i, address, length, flags, next);
                }
                for slot in 0..16u64 {
                    m.write_u16(
                        drivers[queue].available + 4 + 2 * slot,
                        (random() % 18) as u16,
                    )
                    .unwrap();
                }
                m.write_u16(drivers[queue].available + 2, (random() % 20) as u16)
                    .unwrap();
            }
            // Plausible headers at the start of the data area.
            m.write(TX_DATA, &[0; 12]).unwrap();
            *d.memory_mut() = m;
            for i in 0..20 {
                d.backend_mut()
                    .backend_mut()
                    .offer(&frame((random() % 1600) as usize, i));
            }
            write(&mut d, reg::QUEUE_NOTIFY, TRANSMIT_QUEUE.into());
            write(&mut d, reg::QUEUE_NOTIFY, RECEIVE_QUEUE.into());
            d.poll();
            for f in transmitted(&mut d) {
                assert!(frame_size_ok(f.len()));
            }
        }
    }

    /// A device with 512 KiB of memory and queues of 64 (room for 64 KiB frames).
    fn net_big(features: u64) -> (Net, Vec<Driver>) {
        let mut d = VirtioMmio::new(
            VirtioNet::new(MAC_A, FramePort::new()),
            VecMemory::new(0, 0x80000),
        );
        let drivers = bring_up(&mut d, features, 2, 64);
        (d, drivers)
    }

    /// Receive buffers of the big device: `count` of 2 KiB from 0x40000.
    const BIG_RX: u64 = 0x40000;

    fn post_big(d: &mut Net, driver: &mut Driver, first: u64, count: u64) {
        guest(d, |m| {
            for i in first..first + count {
                driver.add_chain(m, &[(BIG_RX + 2048 * i, 2048, true)]);
            }
        });
        write(d, reg::QUEUE_NOTIFY, RECEIVE_QUEUE.into());
    }

    /// A TCP/IPv4 frame of `payload` bytes from etherparse (full checksums), and the header a
    /// Linux sender with CSUM and TSO4 gives it (the TCP checksum is recomputed by whoever
    /// segments, so its partial seed does not matter here).
    fn tso_frame(payload: usize) -> (NetHeader, Vec<u8>) {
        let data: Vec<u8> = (0..payload).map(|i| (i % 251) as u8).collect();
        let mut frame = Vec::new();
        etherparse::PacketBuilder::ethernet2(MAC_B, MAC_A)
            .ipv4([10, 0, 0, 2], [10, 0, 0, 1], 64)
            .tcp(40000, 5001, 1000, 500)
            .ack(1)
            .psh()
            .write(&mut frame, &data)
            .unwrap();
        let header = NetHeader {
            flags: netpacket::F_NEEDS_CSUM,
            gso_type: if frame.len() > MAX_FRAME {
                netpacket::GSO_TCPV4
            } else {
                netpacket::GSO_NONE
            },
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 0,
        };
        (header, frame)
    }

    #[test]
    fn gso_frames_are_transmitted_whole() {
        let (mut d, mut drivers) = net_big(LINUX);
        let (header, frame) = tso_frame(60000);
        // Header alone, then the frame in three pieces, as Linux's scatter-gather does.
        guest(&mut d, |m| {
            m.write(0x10000, &header.to_bytes()).unwrap();
            m.write(0x11000, &frame).unwrap();
            let cut = [0, 100, 30000, frame.len()];
            let mut buffers = vec![(0x10000, HEADER_SIZE as u32, false)];
            for w in cut.windows(2) {
                buffers.push((0x11000 + w[0] as u64, (w[1] - w[0]) as u32, false));
            }
            drivers[TX].add_chain(m, &buffers);
        });
        write(&mut d, reg::QUEUE_NOTIFY, TRANSMIT_QUEUE.into());
        let sent = d.backend_mut().backend_mut().take_transmitted_with();
        assert_eq!(sent, Some((header, frame.clone())));
        assert_eq!((stats(&d).tx_gso, stats(&d).tx_frames), (1, 1));
        // A guest that did not ack TSO4 may not send it.
        let (mut d, mut drivers) = net_big(LEGACY | F_CSUM);
        guest(&mut d, |m| {
            m.write(0x10000, &header.to_bytes()).unwrap();
            m.write(0x10000 + HEADER_SIZE as u64, &frame).unwrap();
            drivers[TX].add_chain(m, &[(0x10000, (HEADER_SIZE + frame.len()) as u32, false)]);
        });
        write(&mut d, reg::QUEUE_NOTIFY, TRANSMIT_QUEUE.into());
        assert!(transmitted(&mut d).is_empty());
        assert_eq!(stats(&d).tx_bad_size, 1, "longer than its largest frame");
    }

    #[test]
    fn frames_cross_buffer_boundaries_whole() {
        // Receive chains of several odd-sized buffers, so that the header, the checked prefix
        // and the rest of the frame each end inside a buffer: the guest gets every byte in
        // order.
        let (mut d, mut drivers) = net_big(LINUX);
        let (header, frame) = tso_frame(9000);
        d.backend_mut().backend_mut().offer_with(&header, &frame);
        let sizes = [5u32, 7, 100, 23, 1000, 3, 4000, 5000];
        let mut chains = Vec::new();
        guest(&mut d, |m| {
            let mut at = BIG_RX;
            for pair in sizes.chunks(2) {
                let buffers: Vec<(u64, u32, bool)> = pair
                    .iter()
                    .map(|&n| {
                        let b = (at, n, true);
                        at += u64::from(n) + 64;
                        b
                    })
                    .collect();
                chains.push(buffers.clone());
                drivers[RX].add_chain(m, &buffers);
            }
        });
        write(&mut d, reg::QUEUE_NOTIFY, RECEIVE_QUEUE.into());
        let needed = HEADER_SIZE + frame.len();
        let mut bytes = Vec::new();
        let used = drivers[RX].used_index(d.memory());
        assert_eq!(used, 4, "all four chains");
        for (slot, chain) in chains.iter().enumerate() {
            let (_, length) = drivers[RX].used_entry(d.memory(), slot as u16);
            let mut left = length as usize;
            for &(address, n, _) in chain {
                let take = left.min(n as usize);
                bytes.extend_from_slice(&d.memory().bytes()[address as usize..][..take]);
                left -= take;
            }
        }
        assert_eq!(bytes.len(), needed);
        assert_eq!(
            NetHeader::from_bytes(bytes[..HEADER_SIZE].try_into().unwrap()),
            NetHeader {
                num_buffers: 4,
                ..header
            }
        );
        assert_eq!(bytes[HEADER_SIZE..], frame[..]);
    }

    #[test]
    fn mergeable_buffers_take_a_gso_frame_whole() {
        let (mut d, mut drivers) = net_big(LINUX);
        let (header, frame) = tso_frame(40000);
        d.backend_mut().backend_mut().offer_with(&header, &frame);
        // 12 + 40054 bytes need 20 buffers of 2 KiB: with 10 posted the frame waits, nothing
        // is used.
        post_big(&mut d, &mut drivers[RX], 0, 10);
        assert_eq!(drivers[RX].used_index(d.memory()), 0);
        assert_eq!(d.backend().backend().incoming().len(), 1);
        post_big(&mut d, &mut drivers[RX], 10, 12);
        let needed = HEADER_SIZE + frame.len();
        let buffers = needed.div_ceil(2048);
        assert_eq!(buffers, 20);
        assert_eq!(drivers[RX].used_index(d.memory()), buffers as u16);
        let mut bytes = Vec::new();
        for slot in 0..buffers as u16 {
            let (id, used) = drivers[RX].used_entry(d.memory(), slot);
            assert_eq!(id, u32::from(slot));
            let at = (BIG_RX + 2048 * u64::from(id)) as usize;
            bytes.extend_from_slice(&d.memory().bytes()[at..at + used as usize]);
        }
        assert_eq!(bytes.len(), needed);
        let got = NetHeader::from_bytes(bytes[..HEADER_SIZE].try_into().unwrap());
        assert_eq!(
            got,
            NetHeader {
                num_buffers: buffers as u16,
                ..header
            }
        );
        assert_eq!(bytes[HEADER_SIZE..], frame[..]);
        assert_eq!((stats(&d).rx_gso, stats(&d).rx_frames), (1, 1));
        // A frame that all the buffers of the queue could not hold is dropped, not waited for.
        let (mut d, mut drivers) = net_big(LINUX);
        let (header, frame) = tso_frame(65000);
        d.backend_mut().backend_mut().offer_with(&header, &frame);
        guest(&mut d, |m| {
            for i in 0..64 {
                drivers[RX].add_chain(m, &[(BIG_RX + 512 * i, 512, true)]);
            }
        });
        write(&mut d, reg::QUEUE_NOTIFY, RECEIVE_QUEUE.into());
        assert_eq!(stats(&d).rx_too_big, 1);
        assert!(d.backend().backend().incoming().is_empty());
        assert_eq!(drivers[RX].used_entry(d.memory(), 0).1, 0);
    }

    /// Parse a standard frame with etherparse and check its checksums; returns the TCP
    /// sequence number and payload.
    fn verify_tcp(frame: &[u8]) -> (u32, Vec<u8>) {
        use etherparse::{NetSlice, SlicedPacket, TransportSlice};
        assert!(frame_size_ok(frame.len()));
        let packet = SlicedPacket::from_ethernet(frame).unwrap();
        let Some(NetSlice::Ipv4(ip)) = &packet.net else {
            panic!("not IPv4")
        };
        let ip = ip.header().to_header();
        assert_eq!(ip.header_checksum, ip.calc_header_checksum());
        let Some(TransportSlice::Tcp(tcp)) = &packet.transport else {
            panic!("not TCP")
        };
        let header = tcp.to_header();
        assert_eq!(
            header.checksum,
            header.calc_checksum_ipv4(&ip, tcp.payload()).unwrap()
        );
        (header.sequence_number, tcp.payload().to_vec())
    }

    #[test]
    fn guests_without_the_offloads_get_standard_frames() {
        // No GUEST_TSO4, no GUEST_CSUM, no mergeable buffers: Linux's small buffers.
        let (mut d, mut drivers) = net_big(LEGACY);
        let (header, frame) = tso_frame(10000);
        d.backend_mut().backend_mut().offer_with(&header, &frame);
        // A standard frame with a partial checksum behind it.
        let (mut small_header, small) = tso_frame(500);
        small_header.hdr_len = 0;
        let mut partial = small.clone();
        partial[50..52].copy_from_slice(&[0x12, 0x34]);
        let seed = {
            // The pseudo-header sum, folded, as Linux leaves it in the field.
            let mut sum = 6u32 + (partial.len() - 34) as u32;
            for pair in partial[26..34].chunks(2) {
                sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
            }
            while sum >> 16 != 0 {
                sum = (sum & 0xffff) + (sum >> 16);
            }
            sum as u16
        };
        partial[50..52].copy_from_slice(&seed.to_be_bytes());
        d.backend_mut()
            .backend_mut()
            .offer_with(&small_header, &partial);
        // Seven segments of 1448 bytes (the last 1312), then the completed frame.
        post_big(&mut d, &mut drivers[RX], 0, 4);
        assert_eq!(
            drivers[RX].used_index(d.memory()),
            4,
            "as far as buffers go"
        );
        post_big(&mut d, &mut drivers[RX], 4, 8);
        assert_eq!(drivers[RX].used_index(d.memory()), 8);
        let mut data = Vec::new();
        for slot in 0..8u16 {
            let (id, used) = drivers[RX].used_entry(d.memory(), slot);
            let at = (BIG_RX + 2048 * u64::from(id)) as usize;
            let bytes = &d.memory().bytes()[at..at + used as usize];
            let h = NetHeader::from_bytes(bytes[..HEADER_SIZE].try_into().unwrap());
            assert_eq!(
                h,
                NetHeader {
                    num_buffers: 1,
                    ..NetHeader::default()
                }
            );
            let (sequence, payload) = verify_tcp(&bytes[HEADER_SIZE..]);
            if slot < 7 {
                assert_eq!(sequence, 1000 + 1448 * u32::from(slot));
                data.extend_from_slice(&payload);
            } else {
                assert_eq!(&bytes[HEADER_SIZE..], &small[..], "the checksum completed");
            }
        }
        assert_eq!(data, frame[54..]);
        let s = stats(&d);
        assert_eq!((s.rx_frames, s.rx_segmented, s.rx_gso), (8, 1, 0));
        assert!(d.backend().backend().incoming().is_empty());
    }

    #[test]
    fn hostile_headers_from_the_backend_are_dropped() {
        let (mut d, mut drivers) = net_big(LINUX);
        let (header, frame) = tso_frame(5000);
        let bad = [
            NetHeader {
                gso_size: 0,
                ..header
            },
            NetHeader {
                gso_type: 4,
                ..header
            },
            NetHeader {
                csum_start: 60000,
                ..header
            },
            NetHeader {
                hdr_len: 6000,
                ..header
            },
            NetHeader {
                flags: 0x80,
                ..header
            },
        ];
        for h in &bad {
            d.backend_mut().backend_mut().offer_with(h, &frame);
        }
        // A standard-typed frame longer than a standard frame.
        d.backend_mut()
            .backend_mut()
            .offer_with(&NetHeader::default(), &frame);
        d.backend_mut().backend_mut().offer_with(&header, &frame);
        post_big(&mut d, &mut drivers[RX], 0, 8);
        let s = stats(&d);
        assert_eq!((s.rx_bad_size, s.rx_gso), (6, 1));
        assert_eq!(drivers[RX].used_index(d.memory()), 3, "only the good frame");
        assert_eq!(d.error(), None);
    }

    #[test]
    fn frame_queue_basics() {
        let mut q = FrameQueue::new(2);
        assert!(q.is_empty());
        let h = NetHeader::default();
        q.push(&h, b"one");
        q.push(&h, b"two");
        q.push(&h, b"three");
        assert_eq!((q.len(), q.dropped()), (2, 1));
        assert_eq!(q.front(), Some((h, &b"two"[..])));
        assert_eq!(q.pop(), Some((h, b"two".to_vec())));
        assert_eq!(q.pop(), Some((h, b"three".to_vec())));
        assert_eq!(q.pop(), None);
        assert!(!frame_size_ok(13) && frame_size_ok(14) && frame_size_ok(1514));
        assert!(!frame_size_ok(1515));
    }
}
