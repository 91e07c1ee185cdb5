//! A compartment's network port: the guest's virtio-net device on one side, the switch task
//! on the other (the root task's `net=SWITCH`: a gate in slot `NET`, and a notification IRQ
//! with badge `NET_NOTIFY_BADGE` attached to this thread).
//!
//! At boot the VMM attaches: it calls the switch ([`LABEL_NET_ATTACH`]), which answers with
//! the port's MAC address and maps the port's 2 MiB of shared memory into our receive window:
//! the ring to the switch in its first half, the ring from the switch in its second
//! (`l4linux_glue::netring`, 256 KiB of records each). The port is the device's
//! [`NetBackend`]: each frame the guest sends goes into the first ring as one record (its
//! virtio-net header, then the frame: a 64 KiB GSO frame is one record), and once the device
//! is done a call ([`LABEL_NET_KICK`]) makes the switch forward them. While the ring lacks room
//! for the largest frame the device leaves the guest's frames in its queue, the VMM kicks the
//! switch (which empties the ring) and lets the device go on ([`NetPort::kick`]). Frames for us
//! arrive in the second ring, announced by the notification; the device takes one record at a
//! time, only when the guest has buffers for it. Only the ring indices and the records cross.
//!
//! Frames are copied once on each side: the device model hands the port a transmitted frame
//! still in the guest's buffers ([`TxFrame`]) and the port copies it straight into its place
//! in the ring ([`Producer::push_with`]); a received frame is copied from the ring straight
//! into the guest's receive buffers ([`NetBackend::read_received`]). The virtio-net header and
//! the frame's first bytes, which the device checks, are private copies and go on as checked.

use alloc::vec::Vec;
use l4::abi::{slots, Fpage, MessageTag, Timeouts};
use l4linux_glue::netring::{Consumer, Producer, PushError, RingLayout};
use l4linux_glue::virtio::net::{NetBackend, NetHeader, TxFrame, CHECKED_PREFIX, HEADER_SIZE};

use crate::shared::SharedRegion;

/// Attach to the switch; the reply maps the port memory (untyped word 0: the MAC address).
pub const LABEL_NET_ATTACH: i32 = 0x4e41;
/// Frames wait in the ring to the switch.
pub const LABEL_NET_KICK: i32 = 0x4e4b;
/// The VMM ends: the switch reports the port's counts and forgets it.
pub const LABEL_NET_DETACH: i32 = 0x4e44;
/// The order of the port memory's size: 2 MiB (one page of the RAM service), a ring in each
/// half (of which each uses 256 KiB and 128 bytes).
pub const PORT_ORDER: u32 = 21;
/// The port memory's size.
pub const PORT_BYTES: u64 = 1 << PORT_ORDER;
/// Where the ring from the switch starts in the port memory.
pub const FROM_SWITCH: u64 = PORT_BYTES / 2;
/// Where the port memory is mapped in a VMM.
const WINDOW: u64 = 0x0000_5800_0000_0000;
/// Kicks in a row while the ring to the switch stays full before [`NetPort::kick`]'s caller
/// gives up for this round (a switch that does not empty it).
pub const MAX_KICKS: usize = 64;

/// Frames moved and lost at the port.
#[derive(Default, Debug, Clone, Copy)]
pub struct PortCounts {
    /// Frames sent to the switch / received from it.
    pub sent: u64,
    pub received: u64,
    /// Frames dropped because the ring to the switch was full.
    pub dropped: u64,
    /// Ring errors seen (a misbehaving switch).
    pub errors: u64,
}

/// The VMM's side of its switch port.
pub struct NetPort {
    to_switch: Producer<SharedRegion>,
    from_switch: Consumer<SharedRegion>,
    /// The record peeked in the ring from the switch and not delivered yet: its header, its
    /// frame's length and first bytes (private copies, [`NetBackend::peek_received`]).
    waiting: Option<(NetHeader, usize)>,
    prefix: [u8; CHECKED_PREFIX],
    /// A whole received frame, for [`NetPort::peek_whole`] (allocated at its first use).
    whole: Vec<u8>,
    /// Frames went into the ring to the switch since the last kick.
    unkicked: bool,
    /// The guest's MAC address, as the switch assigned it.
    pub mac: [u8; 6],
    pub counts: PortCounts,
}

/// Call the switch with `label` (keeping the vCPU state words).
fn call(label: i32) -> Option<l4::ipc::Received> {
    l4::utcb::with_utcb(|u| {
        crate::vcpu::keeping_state(u, |u| {
            u.call(
                slots::NET,
                MessageTag::new(label, 0, 0),
                &[],
                Timeouts::INFINITE,
            )
        })
    })
    .ok()
    .filter(|r| r.tag.label() == 0)
}

/// The two rings' regions of port memory at `base` of our address space: to the switch, from
/// the switch.
///
/// # Safety
/// `PORT_BYTES` at `base` (aligned to them) must stay mapped readable and writable in this
/// task while the regions live, and be used only through them.
pub unsafe fn port_regions(base: u64) -> (SharedRegion, SharedRegion) {
    // SAFETY: the caller vouches for the memory; the two halves do not overlap.
    unsafe {
        (
            SharedRegion::new(base, FROM_SWITCH as usize),
            SharedRegion::new(base + FROM_SWITCH, (PORT_BYTES - FROM_SWITCH) as usize),
        )
    }
}

impl NetPort {
    /// Attach to the switch if the arguments say `net=...`; `None` without a port, or (with a
    /// message) if the switch refused.
    pub fn attach() -> Option<NetPort> {
        crate::platform::argument("net")?;
        l4::utcb::set_receive_window(Fpage::memory(
            WINDOW,
            PORT_ORDER,
            Fpage::READ | Fpage::WRITE,
        ));
        let reply = call(LABEL_NET_ATTACH);
        l4::utcb::set_receive_window(Fpage(0));
        let Some(reply) = reply.filter(|r| r.tag.typed() == 1 && r.tag.words() >= 1) else {
            crate::say!("the switch refused this port");
            return None;
        };
        let word = reply.word(0).to_le_bytes();
        let mac = [word[0], word[1], word[2], word[3], word[4], word[5]];
        let layout = RingLayout::ethernet();
        // SAFETY: the switch mapped its port memory at WINDOW (the reply's map item), for as
        // long as it lives; only the rings touch it, through these regions.
        let (to, from) = unsafe { port_regions(WINDOW) };
        let (Ok(to_switch), Ok(from_switch)) =
            (Producer::new(to, layout), Consumer::new(from, layout))
        else {
            crate::say!("the switch's port memory does not hold its rings");
            return None;
        };
        Some(NetPort {
            to_switch,
            from_switch,
            waiting: None,
            prefix: [0; CHECKED_PREFIX],
            whole: Vec::new(),
            unkicked: false,
            mac,
            counts: PortCounts::default(),
        })
    }

    /// Leave the switch (at the VMM's end; the switch says what the port carried).
    pub fn detach(&mut self) {
        if call(LABEL_NET_DETACH).is_none() {
            self.counts.errors += 1;
        }
    }

    /// Make the switch forward what waits in the ring to it, if anything does (it empties the
    /// ring before it answers).
    pub fn kick(&mut self) {
        if core::mem::take(&mut self.unkicked) && call(LABEL_NET_KICK).is_none() {
            self.counts.errors += 1;
        }
    }

    /// Send `frame` with `header` (for a driver that has the frame in its own memory: the
    /// uplink).
    pub fn send(&mut self, header: &NetHeader, frame: &[u8]) {
        let result = self.to_switch.push(&[&header.to_bytes(), frame]);
        self.sent(result);
    }

    fn sent(&mut self, result: Result<(), PushError>) {
        match result {
            Ok(()) => {
                self.counts.sent += 1;
                self.unkicked = true;
            }
            Err(_) => self.counts.dropped += 1,
        }
    }

    /// The oldest frame from the switch, copied whole into private memory (for the uplink,
    /// which checks and segments it for its NIC); [`NetBackend::pop_received`] removes it.
    pub fn peek_whole(&mut self) -> Option<(NetHeader, &[u8])> {
        let (header, length) = self.peek()?;
        if self.whole.len() < length {
            self.whole.resize(RingLayout::ethernet().max_record(), 0);
        }
        self.from_switch
            .read(HEADER_SIZE, &mut self.whole[..length])
            .then_some((header, &self.whole[..length]))
    }

    /// Peek the next record from the switch: its header and frame length, the frame's first
    /// bytes in `prefix`.
    fn peek(&mut self) -> Option<(NetHeader, usize)> {
        while self.waiting.is_none() {
            match self.from_switch.peek() {
                Ok(Some(n)) if n >= HEADER_SIZE => {
                    let mut header = [0u8; HEADER_SIZE];
                    let length = n - HEADER_SIZE;
                    let prefix = length.min(CHECKED_PREFIX);
                    self.from_switch.read(0, &mut header);
                    self.from_switch
                        .read(HEADER_SIZE, &mut self.prefix[..prefix]);
                    self.waiting = Some((NetHeader::from_bytes(&header), length));
                }
                Ok(Some(_)) => {
                    self.counts.errors += 1;
                    self.from_switch.release();
                }
                Ok(None) => return None,
                Err(_) => {
                    // The ring skipped what it could not read, or the switch's index is
                    // impossible (nothing consumed): try again at the next poll.
                    self.counts.errors += 1;
                    return None;
                }
            }
        }
        self.waiting
    }
}

impl NetBackend for NetPort {
    fn transmit_ready(&self) -> bool {
        // An impossible consumer index: let `transmit` count the failure.
        self.to_switch
            .has_room(self.to_switch.layout().max_record())
            .unwrap_or(true)
    }

    fn transmit(&mut self, header: &NetHeader, frame: &TxFrame<'_>) {
        // Straight from the guest's buffers into the ring: the header and the checked prefix
        // from the device's copies, the rest from guest memory.
        let result = self.to_switch.push_with(HEADER_SIZE + frame.len(), |slot| {
            let mut ok = slot.write(0, &header.to_bytes());
            let copied = frame.copy(&mut |at, bytes| ok &= slot.write(HEADER_SIZE + at, bytes));
            ok && copied.is_ok()
        });
        self.sent(result);
    }

    fn peek_received(&mut self) -> Option<(NetHeader, usize, &[u8])> {
        let (header, length) = self.peek()?;
        Some((header, length, &self.prefix[..length.min(CHECKED_PREFIX)]))
    }

    fn read_received(&mut self, offset: usize, buffer: &mut [u8]) {
        if self.waiting.is_some() && !self.from_switch.read(HEADER_SIZE + offset, buffer) {
            self.counts.errors += 1;
        }
    }

    fn pop_received(&mut self) {
        if self.waiting.take().is_some() {
            self.counts.received += 1;
            self.from_switch.release();
        }
    }
}
