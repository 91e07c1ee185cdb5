//! A compartment's network port: the guest's virtio-net device on one side, the switch task
//! on the other (the root task's `net=SWITCH`: a gate in slot `NET`, and a notification IRQ
//! with badge `NET_NOTIFY_BADGE` attached to this thread).
//!
//! At boot the VMM attaches: it calls the switch ([`LABEL_NET_ATTACH`]), which answers with
//! the port's MAC address and maps the port's 2 MiB of shared memory into our receive window:
//! the ring to the switch in its first MiB, the ring from the switch in its second
//! (`l4linux_glue::netring`). Frames the guest sends go into the first ring, followed by a
//! call ([`LABEL_NET_KICK`]) that makes the switch forward them; frames for us arrive in the
//! second ring, announced by the notification, and go to the guest's receive queue. Only the
//! ring indices and the frames cross; a frame the ring cannot take is dropped and counted.

use l4::abi::{slots, Fpage, MessageTag, Timeouts};
use l4linux_glue::netring::{Consumer, Producer, RingLayout};
use l4linux_glue::virtio::net::FramePort;

use crate::shared::SharedRegion;

/// Attach to the switch; the reply maps the port memory (untyped word 0: the MAC address).
pub const LABEL_NET_ATTACH: i32 = 0x4e41;
/// Frames wait in the ring to the switch.
pub const LABEL_NET_KICK: i32 = 0x4e4b;
/// The VMM ends: the switch reports the port's counts and forgets it.
pub const LABEL_NET_DETACH: i32 = 0x4e44;
/// The port memory: two rings, one MiB each.
pub const PORT_BYTES: u64 = 2 << 20;
/// Where the ring from the switch starts in the port memory.
pub const FROM_SWITCH: u64 = 1 << 20;
/// Where the port memory is mapped in a VMM.
const WINDOW: u64 = 0x0000_5800_0000_0000;

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
/// `PORT_BYTES` at `base` (2 MiB aligned) must stay mapped readable and writable in this task
/// while the regions live, and be used only through them.
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
        l4::utcb::set_receive_window(Fpage::memory(WINDOW, 21, Fpage::READ | Fpage::WRITE));
        let reply = call(LABEL_NET_ATTACH);
        l4::utcb::set_receive_window(Fpage(0));
        let Some(reply) = reply.filter(|r| r.tag.typed() == 1 && r.tag.words() >= 1) else {
            crate::say!("the switch refused this port");
            return None;
        };
        let word = reply.word(0).to_le_bytes();
        let mac = [word[0], word[1], word[2], word[3], word[4], word[5]];
        let layout = RingLayout::ethernet();
        // SAFETY: the switch mapped its 2 MiB of port memory at WINDOW (the reply's map item),
        // for as long as it lives; only the rings touch it, through these regions.
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

    /// Move frames both ways between the guest's device backend and the switch.
    ///
    /// From the switch it takes only as many frames as the backend has room for: the rest
    /// wait in the ring (and once that is full the switch drops and counts them), so a flood
    /// costs this VMM neither memory nor a loop that the switch keeps feeding.
    pub fn pump(&mut self, backend: &mut FramePort) {
        let mut sent = false;
        while let Some(frame) = backend.take_transmitted() {
            match self.to_switch.push(&frame) {
                Ok(()) => {
                    self.counts.sent += 1;
                    sent = true;
                }
                Err(_) => self.counts.dropped += 1,
            }
        }
        if sent && call(LABEL_NET_KICK).is_none() {
            self.counts.errors += 1;
        }
        let room = backend.incoming().capacity() - backend.incoming().len();
        for _ in 0..room {
            match self.from_switch.pop() {
                Ok(Some(frame)) => {
                    self.counts.received += 1;
                    backend.offer(frame);
                }
                Ok(None) => break,
                Err(_) => {
                    self.counts.errors += 1;
                    break;
                }
            }
        }
    }
}
