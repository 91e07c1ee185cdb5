//! The virtual Ethernet switch. Its ports are compartments' VMMs (`port=NAME` once per port, in
//! the order of the badges `1..` of their gates, which the root task gives each VMM with
//! `net=SWITCH`). A port's memory is the switch's own (2 MiB from its RAM budget, `ram=`),
//! mapped into the VMM when it attaches ([`vmm::net`]): the ring from the VMM in its first
//! half, the ring to it in its second. A kick makes the switch forward what waits in a port's
//! ring: it learns the source MAC address's port, sends a frame for a known address to that
//! port only and floods the others (broadcast, multicast, unknown) to every other attached
//! port, then triggers the notification IRQ of each port that got frames. Only ports of this
//! switch can reach each other; a second switch task is a second, separate network.
//!
//! A record is a virtio-net header and a frame; a GSO frame (up to 64 KiB of TCP) stays one
//! record. The switch reads a record's header and the frame's first bytes (its Ethernet, IP
//! and TCP headers, `netpacket::CHECKED_PREFIX`) into private memory, checks them and decides
//! where the frame goes, then writes each receiver's record from that checked copy and copies
//! the rest ring to ring: one copy per receiver. It passes records on unchanged: whoever delivers a frame to a receiver that
//! did not take an offload (the VMM's device model for its guest, the uplink for its NIC)
//! segments it or completes its checksum (`l4linux_glue::netpacket`).
//!
//! The forwarding decision is `l4linux_glue::netswitch` (host-tested). Everything in a ring is
//! untrusted: `l4linux_glue::netring` checks indices and lengths, `netpacket::check` every
//! header against its frame (a bad one is dropped and counted as the port's error), a full
//! ring drops the frame (counted), and one kick forwards at most one ring's worth of bytes,
//! so that a flooding port cannot keep the switch from the others.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use l4::abi::{slots, Fpage, IrqOp, MapItem, MessageTag, Timeouts};
use l4::{ipc, println, sys};
use l4linux_glue::netpacket::{self, NetHeader, Offloads, HEADER_SIZE};
use l4linux_glue::netring::{self, Consumer, Producer, RingLayout};
use l4linux_glue::netswitch::{Destinations, MacTable};
use vmm::net::{LABEL_NET_ATTACH, LABEL_NET_DETACH, LABEL_NET_KICK, PORT_BYTES, PORT_ORDER};
use vmm::shared::SharedRegion;

/// Where the ports' memory lives in the switch (port k at `PORTS + k * PORT_BYTES`).
const PORTS: u64 = 0x0000_5c00_0000_0000;
/// MAC addresses learned at most (the oldest is forgotten first).
const TABLE: usize = 256;

struct Port {
    from_vmm: Consumer<SharedRegion>,
    to_vmm: Producer<SharedRegion>,
    /// Frames taken from the port's ring.
    taken: u64,
    /// Frames put in the port's ring / dropped because it was full.
    forwarded: u64,
    dropped: u64,
    /// Bad frames or ring indices from the port.
    errors: u64,
}

struct Switch {
    names: Vec<&'static str>,
    ports: Vec<Option<Port>>,
    /// Which port has the memory already (from the RAM service).
    memory: Vec<bool>,
    /// Learned addresses.
    table: MacTable,
    /// The virtio-net header and first bytes of the record being forwarded (checked here).
    head: [u8; HEADER_SIZE + netpacket::CHECKED_PREFIX],
}

/// The MAC address of port `k`: locally administered, unique on this switch.
fn mac_of(k: usize) -> [u8; 6] {
    [0x52, 0x54, 0x00, 0x4c, 0x34, k as u8 + 1]
}

impl Switch {
    /// Say what port `k` carried, and forget it (its VMM detached or attaches anew).
    fn close(&mut self, k: usize, why: &str) {
        if let Some(p) = self.ports[k].take() {
            println!(
                "[netsw] port {} {why}: {} frames from it, {} to it, {} dropped (its ring was full), {} errors",
                self.names[k], p.taken, p.forwarded, p.dropped, p.errors
            );
        }
        self.table.forget_port(k);
    }

    /// Give port `k` fresh rings; returns the map item of its memory.
    fn attach(&mut self, k: usize) -> Option<MapItem> {
        self.close(k, "attached again (its VMM restarted)");
        let base = PORTS + k as u64 * PORT_BYTES;
        if !self.memory[k] {
            if let Err(e) = l4::parent::request_ram(base, PORT_BYTES) {
                println!("[netsw] no memory for port {}: {e:?}", self.names[k]);
                return None;
            }
            self.memory[k] = true;
        }
        let layout = RingLayout::ethernet();
        // SAFETY: the RAM service mapped PORT_BYTES at `base` into this task for good; only
        // this port's two regions refer to it (the ring from the VMM comes first).
        let (mut from, mut to) = unsafe { vmm::net::port_regions(base) };
        netring::initialize(&mut from, layout).ok()?;
        netring::initialize(&mut to, layout).ok()?;
        self.ports[k] = Some(Port {
            from_vmm: Consumer::new(from, layout).ok()?,
            to_vmm: Producer::new(to, layout).ok()?,
            taken: 0,
            forwarded: 0,
            dropped: 0,
            errors: 0,
        });
        Some(MapItem::map(
            0,
            Fpage::memory(base, PORT_ORDER, Fpage::READ | Fpage::WRITE),
        ))
    }

    /// Forward what waits from port `k`, at most a ring's worth of bytes; returns the ports
    /// that got frames (bit per port).
    fn forward(&mut self, k: usize) -> u64 {
        // Out of the table while its records are copied into the others' rings.
        let Some(mut source) = self.ports[k].take() else {
            return 0;
        };
        let mut woken = 0;
        let mut budget = RingLayout::ethernet().data() as usize;
        while budget > 0 {
            let length = match source.from_vmm.peek() {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(_) => {
                    source.errors += 1;
                    break;
                }
            };
            budget = budget.saturating_sub(length.max(8));
            // The header and the frame's first bytes are checked on a private copy and
            // forwarded from it; the rest is copied ring to ring.
            let head_length = length.min(HEADER_SIZE + netpacket::CHECKED_PREFIX);
            let head = &mut self.head[..head_length];
            source.from_vmm.read(0, head);
            let verdict = NetHeader::split_record(head).filter(|(header, prefix)| {
                netpacket::check_prefix(header, prefix, length - HEADER_SIZE, Offloads::ALL).is_ok()
            });
            let Some((_, prefix)) = verdict else {
                source.errors += 1;
                source.from_vmm.release();
                continue;
            };
            source.taken += 1;
            let destinations = self.table.forward(prefix, k);
            let head = &self.head[..head_length];
            for target in 0..self.ports.len() {
                let wanted = match destinations {
                    Destinations::One(p) => p == target,
                    Destinations::AllBut(p) => p != target,
                    Destinations::None => false,
                };
                if !wanted {
                    continue;
                }
                if let Some(out) = self.ports[target].as_mut() {
                    let pushed = out.to_vmm.push_with(length, |slot| {
                        slot.write(0, head)
                            && slot.copy_from(
                                head.len(),
                                &source.from_vmm,
                                head.len(),
                                length - head.len(),
                            )
                    });
                    match pushed {
                        Ok(()) => {
                            out.forwarded += 1;
                            woken |= 1 << target;
                        }
                        Err(_) => out.dropped += 1,
                    }
                }
            }
            source.from_vmm.release();
        }
        self.ports[k] = Some(source);
        woken
    }
}

fn main() -> i64 {
    let names: Vec<&'static str> = l4::rt::arguments()
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("port="))
        .collect();
    if names.is_empty() || names.len() > slots::MAX_NET_PORTS as usize {
        println!(
            "[netsw] give 1 to {} ports (port=NAME)",
            slots::MAX_NET_PORTS
        );
        return 1;
    }
    println!("[netsw] {} ports: {}", names.len(), names.join(" "));
    let mut switch = Switch {
        ports: names.iter().map(|_| None).collect(),
        memory: names.iter().map(|_| false).collect(),
        names,
        table: MacTable::new(TABLE),
        head: [0; HEADER_SIZE + netpacket::CHECKED_PREFIX],
    };
    let mut reply: Option<(MessageTag, [u64; 3])> = None;
    loop {
        let next = match reply.take() {
            Some((tag, words)) => ipc::reply_wait(tag, &words, Timeouts::INFINITE),
            None => ipc::wait(Timeouts::INFINITE),
        };
        let Ok(message) = next else {
            continue;
        };
        let k = message.badge.wrapping_sub(1) as usize;
        if k >= switch.ports.len() {
            reply = Some((MessageTag::new(-1, 0, 0), [0; 3]));
            continue;
        }
        match message.tag.label() {
            LABEL_NET_ATTACH => {
                reply = Some(match switch.attach(k) {
                    Some(item) => {
                        let mut mac = [0u8; 8];
                        mac[..6].copy_from_slice(&mac_of(k));
                        println!("[netsw] port {} attached", switch.names[k]);
                        (
                            MessageTag::new(0, 1, 1),
                            [u64::from_le_bytes(mac), item.control, item.fpage.0],
                        )
                    }
                    None => (MessageTag::new(-1, 0, 0), [0; 3]),
                });
            }
            LABEL_NET_KICK if switch.ports[k].is_some() => {
                let woken = switch.forward(k);
                // Answer the kick first, then wake the ports that got frames.
                reply = Some((MessageTag::new(0, 0, 0), [0; 3]));
                for target in 0..switch.ports.len() {
                    if woken & (1 << target) != 0 {
                        let _ =
                            sys::irq_control(slots::NET_PORTS + target as u64, IrqOp::Trigger, 0);
                    }
                }
            }
            LABEL_NET_DETACH => {
                switch.close(k, "detached");
                reply = Some((MessageTag::new(0, 0, 0), [0; 3]));
            }
            _ => reply = Some((MessageTag::new(-1, 0, 0), [0; 3])),
        }
    }
}

l4::main!(main);
