//! The network uplink: a user-level driver for the Intel 82540EM (e1000) NIC that QEMU puts on
//! the PCI bus, attached as one more port to a virtual switch (`net=SWITCH`, like a VMM, see
//! `vmm::net`). Frames the NIC receives go to the switch; frames the switch sends to this port
//! go out through the NIC, to QEMU's user networking and its port forwards, so that a client on
//! the host reaches a server in a compartment.
//!
//! What it is given, and nothing more: the PCI configuration ports (`io=0xcf8/3`), the right to
//! ask its pager for device memory in the PCI hole (`device-memory`: the e1000's registers,
//! its memory BAR 0), and physically contiguous memory whose physical address it knows
//! (`dma=2M`) for the descriptor rings and buffers, and an IRQ object for the NIC's interrupt
//! line (`irq=LINE`, the line the firmware wrote into the NIC's PCI configuration). The NIC
//! runs in promiscuous mode (the compartments' MAC addresses are not its own).
//!
//! The NIC takes standard frames only: a GSO frame from the switch (a compartment's 64 KiB TCP
//! segment) is cut into standard frames here, and a partial checksum completed
//! (`l4linux_glue::netpacket`); a record whose header does not check is dropped and counted.
//!
//! The NIC's receive interrupts arrive as IRQ IPC; the switch's frames as its notification
//! (badge `NET_NOTIFY_BADGE`). The kernel masks the line at each interrupt until we
//! acknowledge it, and the IOAPIC pin is edge-triggered: so after acknowledging, the driver
//! reads the interrupt causes once more (which lowers the line) and works again, so that a
//! cause that came while the line was masked, and raised no edge, is not lost. Without the
//! IRQ object, or if it is for another line than the NIC's, the driver says so and polls the
//! NIC every millisecond instead.

#![no_std]
#![no_main]

extern crate alloc;

use l4::abi::{slots, IrqOp, Timeout, Timeouts, LABEL_IRQ};
use l4::port::{inl, outl};
use l4::println;
use l4linux_glue::netpacket::{self, Offloads, MAX_FRAME};
use l4linux_glue::virtio::net::{NetBackend, NetHeader};
use vmm::net::NetPort;

/// PCI configuration word `register` of bus 0, `device`.
fn pci_read(device: u32, register: u32) -> u32 {
    outl(0xcf8, 0x8000_0000 | (device << 11) | (register & 0xfc));
    inl(0xcfc)
}

fn pci_write(device: u32, register: u32, value: u32) {
    outl(0xcf8, 0x8000_0000 | (device << 11) | (register & 0xfc));
    outl(0xcfc, value);
}

// e1000 registers (82540EM manual, section 13).
const CTRL: u32 = 0x0000;
const STATUS: u32 = 0x0008;
const ICR: u32 = 0x00c0;
const IMS: u32 = 0x00d0;
const IMC: u32 = 0x00d8;
const RCTL: u32 = 0x0100;
const TCTL: u32 = 0x0400;
const TIPG: u32 = 0x0410;
const RDBAL: u32 = 0x2800;
const RDBAH: u32 = 0x2804;
const RDLEN: u32 = 0x2808;
const RDT: u32 = 0x2818;
const TDBAL: u32 = 0x3800;
const TDBAH: u32 = 0x3804;
const TDLEN: u32 = 0x3808;
const TDT: u32 = 0x3818;
const MTA: u32 = 0x5200;
const RAL0: u32 = 0x5400;
const RAH0: u32 = 0x5404;

const CTRL_RST: u32 = 1 << 26;
const CTRL_SLU: u32 = 1 << 6;
const CTRL_ASDE: u32 = 1 << 5;
const RCTL_EN: u32 = 1 << 1;
const RCTL_UPE: u32 = 1 << 3;
const RCTL_MPE: u32 = 1 << 4;
const RCTL_BAM: u32 = 1 << 15;
/// Interrupt causes we take: link status change, receive descriptors low, receiver overrun,
/// receive timer (a frame arrived).
const INTERRUPTS: u32 = (1 << 2) | (1 << 4) | (1 << 6) | (1 << 7);
const RCTL_SECRC: u32 = 1 << 26;
const TCTL_EN: u32 = 1 << 1;
const TCTL_PSP: u32 = 1 << 3;
const TX_EOP: u8 = 1;
const TX_IFCS: u8 = 1 << 1;
const TX_RS: u8 = 1 << 3;
const DESCRIPTOR_DONE: u8 = 1;

/// Descriptors per ring, buffer size, and where things are in the DMA memory.
const RING: u32 = 32;
const BUFFER: u64 = 2048;
const RX_RING: u64 = 0;
const TX_RING: u64 = 0x1000;
const RX_BUFFERS: u64 = 0x1_0000;
const TX_BUFFERS: u64 = 0x3_0000;
const DMA_NEEDED: u64 = TX_BUFFERS + RING as u64 * BUFFER;

/// Where the NIC's registers are mapped in this task.
const REGISTERS: u64 = 0x0000_6000_0000_0000;
/// The size of the e1000's register BAR (128 KiB).
const REGISTERS_ORDER: u32 = 17;

/// The NIC through its memory BAR.
struct E1000 {
    /// The DMA memory: our address, its physical address.
    memory: u64,
    physical: u64,
    rx_next: u32,
    tx_next: u32,
    received: u64,
    sent: u64,
    dropped: u64,
}

impl E1000 {
    fn write(&self, register: u32, value: u32) {
        // SAFETY: the register window (128 KiB) is mapped at REGISTERS (checked in main), and
        // every register offset used is below it; device registers need volatile accesses.
        unsafe { core::ptr::write_volatile((REGISTERS + register as u64) as *mut u32, value) };
    }

    fn read(&self, register: u32) -> u32 {
        // SAFETY: as for `write`.
        unsafe { core::ptr::read_volatile((REGISTERS + register as u64) as *const u32) }
    }

    /// The byte at `offset` of the DMA memory, as a pointer.
    fn at(&self, offset: u64) -> *mut u8 {
        (self.memory + offset) as *mut u8
    }

    fn descriptor(&self, ring: u64, index: u32) -> *mut u8 {
        self.at(ring + index as u64 * 16)
    }

    fn start(&mut self) -> [u8; 6] {
        self.write(IMC, u32::MAX);
        self.write(CTRL, self.read(CTRL) | CTRL_RST);
        for _ in 0..1000 {
            if self.read(CTRL) & CTRL_RST == 0 {
                break;
            }
        }
        self.write(IMC, u32::MAX);
        self.write(CTRL, self.read(CTRL) | CTRL_SLU | CTRL_ASDE);
        let (low, high) = (self.read(RAL0), self.read(RAH0));
        let mac = [
            low as u8,
            (low >> 8) as u8,
            (low >> 16) as u8,
            (low >> 24) as u8,
            high as u8,
            (high >> 8) as u8,
        ];
        for i in 0..128 {
            self.write(MTA + i * 4, 0);
        }
        for i in 0..RING {
            let d = self.descriptor(RX_RING, i);
            let buffer = self.physical + RX_BUFFERS + i as u64 * BUFFER;
            // SAFETY: `d` is inside our DMA memory (DMA_NEEDED bytes checked at start); a
            // receive descriptor is the buffer's address, then status fields the NIC writes.
            unsafe {
                core::ptr::write_volatile(d as *mut u64, buffer);
                core::ptr::write_volatile(d.add(8) as *mut u64, 0);
            }
        }
        self.write(RDBAL, (self.physical + RX_RING) as u32);
        self.write(RDBAH, ((self.physical + RX_RING) >> 32) as u32);
        self.write(RDLEN, RING * 16);
        self.write(0x2810, 0); // RDH
        self.write(RDT, RING - 1);
        self.write(RCTL, RCTL_EN | RCTL_UPE | RCTL_MPE | RCTL_BAM | RCTL_SECRC);
        for i in 0..RING {
            let d = self.descriptor(TX_RING, i);
            // SAFETY: as above; a free transmit descriptor has DD set.
            unsafe {
                core::ptr::write_volatile(d as *mut u64, 0);
                core::ptr::write_volatile(d.add(8) as *mut u64, 0);
                core::ptr::write_volatile(d.add(12), DESCRIPTOR_DONE);
            }
        }
        self.write(TDBAL, (self.physical + TX_RING) as u32);
        self.write(TDBAH, ((self.physical + TX_RING) >> 32) as u32);
        self.write(TDLEN, RING * 16);
        self.write(0x3810, 0); // TDH
        self.write(TDT, 0);
        self.write(TCTL, TCTL_EN | TCTL_PSP | (0x0f << 4) | (0x40 << 12));
        self.write(TIPG, 0x0060_200a);
        mac
    }

    /// Frames the NIC received, handed to `deliver`.
    fn receive(&mut self, deliver: &mut dyn FnMut(&[u8])) {
        loop {
            let d = self.descriptor(RX_RING, self.rx_next);
            // SAFETY: inside our DMA memory; the NIC writes the status byte (offset 12) and
            // the length (offset 8) before it sets DD.
            let (status, length) = unsafe {
                (
                    core::ptr::read_volatile(d.add(12)),
                    core::ptr::read_volatile(d.add(8) as *const u16),
                )
            };
            if status & DESCRIPTOR_DONE == 0 {
                return;
            }
            let length = (length as u64).min(BUFFER) as usize;
            let buffer = self.at(RX_BUFFERS + self.rx_next as u64 * BUFFER);
            // SAFETY: the buffer is ours, BUFFER bytes, and the NIC is done with it (DD).
            let frame = unsafe { core::slice::from_raw_parts(buffer, length) };
            if (14..=1514).contains(&length) {
                self.received += 1;
                deliver(frame);
            } else {
                self.dropped += 1;
            }
            // SAFETY: as above; clearing the status gives the descriptor back.
            unsafe { core::ptr::write_volatile(d.add(12), 0) };
            self.write(RDT, self.rx_next);
            self.rx_next = (self.rx_next + 1) % RING;
        }
    }

    /// Send `frame`; false if the ring is full.
    fn transmit(&mut self, frame: &[u8]) -> bool {
        let d = self.descriptor(TX_RING, self.tx_next);
        // SAFETY: inside our DMA memory.
        let free = unsafe { core::ptr::read_volatile(d.add(12)) } & DESCRIPTOR_DONE != 0;
        if !free || frame.len() > BUFFER as usize {
            self.dropped += 1;
            return false;
        }
        let offset = TX_BUFFERS + self.tx_next as u64 * BUFFER;
        // SAFETY: the buffer is ours and the NIC is done with it (DD); the descriptor is the
        // buffer's physical address, the length, and the command.
        unsafe {
            core::ptr::copy_nonoverlapping(frame.as_ptr(), self.at(offset), frame.len());
            core::ptr::write_volatile(d as *mut u64, self.physical + offset);
            core::ptr::write_volatile(d.add(8) as *mut u16, frame.len() as u16);
            core::ptr::write_volatile(d.add(11), TX_EOP | TX_IFCS | TX_RS);
            core::ptr::write_volatile(d.add(12), 0);
        }
        self.tx_next = (self.tx_next + 1) % RING;
        self.write(TDT, self.tx_next);
        self.sent += 1;
        true
    }
}

/// `dma:ADDRESS+SIZE@PHYSICAL` from our arguments.
fn dma() -> Option<(u64, u64, u64)> {
    let word = l4::rt::arguments()
        .split_whitespace()
        .find_map(|w| w.strip_prefix("dma:"))?;
    let (address, rest) = word.split_once('+')?;
    let (size, physical) = rest.split_once('@')?;
    Some((
        address.parse().ok()?,
        size.parse().ok()?,
        physical.parse().ok()?,
    ))
}

fn main() -> i64 {
    let Some((memory, size, physical)) = dma().filter(|&(_, size, _)| size >= DMA_NEEDED) else {
        println!("[uplink] no DMA memory (dma=2M)");
        return 1;
    };
    let Some(device) = (0..32).find(|&d| pci_read(d, 0) == 0x100e_8086) else {
        println!("[uplink] no e1000 (8086:100e) on PCI bus 0");
        return 1;
    };
    let bar = pci_read(device, 0x10);
    let base = (bar & !0xf) as u64;
    if bar & 1 != 0 || base == 0 {
        println!("[uplink] the e1000's BAR 0 is not memory ({bar:#x})");
        return 1;
    }
    match l4::sigma0::request_physical(
        l4::abi::slots::PAGER,
        base,
        REGISTERS_ORDER,
        l4::abi::Fpage::memory(
            REGISTERS,
            REGISTERS_ORDER,
            l4::abi::Fpage::READ | l4::abi::Fpage::WRITE,
        ),
    ) {
        Ok(true) => {}
        _ => {
            println!("[uplink] no mapping of the e1000's registers at {base:#x} (device-memory)");
            return 1;
        }
    }
    // Memory space and bus mastering on.
    pci_write(device, 0x04, pci_read(device, 0x04) | 0x2 | 0x4);
    let mut nic = E1000 {
        memory,
        physical,
        rx_next: 0,
        tx_next: 0,
        received: 0,
        sent: 0,
        dropped: 0,
    };
    let mac = nic.start();
    println!(
        "[uplink] e1000 at PCI 00:{device:02x}.0, registers at {base:#x}, MAC {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}, link {}, {} KiB of DMA memory at {physical:#x}",
        mac[0], mac[1], mac[2], mac[3], mac[4], mac[5],
        if nic.read(STATUS) & 2 != 0 { "up" } else { "down" },
        size / 1024
    );
    let Some(mut port) = NetPort::attach() else {
        println!("[uplink] no switch port (net=SWITCH)");
        return 1;
    };
    println!("[uplink] attached to the switch");
    let interrupts = take_interrupts(device);
    if interrupts {
        nic.write(IMS, INTERRUPTS);
    }
    let (mut nic_interrupts, mut polls) = (0u64, 0u64);
    // A standard frame made of a record from the switch.
    let mut standard = [0u8; MAX_FRAME];
    let mut refused = 0u64;
    // Whether the NIC interrupted and its line waits for our acknowledgement.
    let mut masked = false;
    loop {
        if interrupts {
            // Reading the causes clears them and lowers the NIC's line.
            let _ = nic.read(ICR);
        }
        // NIC -> switch: standard frames with full checksums, a header of zeros.
        nic.receive(&mut |frame| port.send(&NetHeader::default(), frame));
        port.kick();
        // Switch -> NIC.
        while let Some((header, frame)) = port.peek_whole() {
            match netpacket::check(&header, frame, Offloads::ALL) {
                Ok(checked) => {
                    for k in 0..checked.segments() {
                        let n = checked.write_standard(k, &mut standard);
                        nic.transmit(&standard[..n]);
                    }
                }
                Err(_) => {
                    refused += 1;
                    if refused.is_power_of_two() {
                        println!("[uplink] {refused} frames from the switch refused (bad headers)");
                    }
                }
            }
            port.pop_received();
        }
        if masked {
            // Unmask, then look once more (above) before waiting.
            masked = false;
            let _ = l4::sys::irq_control(slots::IRQ, IrqOp::Acknowledge, 0);
            continue;
        }
        let timeout = if interrupts {
            Timeout::INFINITE
        } else {
            polls += 1;
            Timeout::micros(1000)
        };
        // Until the NIC interrupts or the switch signals frames for us (or, polling, a
        // millisecond passes).
        if let Ok(message) = l4::ipc::wait(Timeouts::new(Timeout::INFINITE, timeout)) {
            if interrupts
                && message.tag.label() == LABEL_IRQ
                && message.badge != slots::NET_NOTIFY_BADGE
            {
                nic_interrupts += 1;
                masked = true;
                if nic_interrupts.is_power_of_two() && nic_interrupts >= 1024 {
                    println!("[uplink] {nic_interrupts} NIC interrupts, {polls} polls so far");
                }
            }
        }
    }
}

/// Attach the IRQ object (`irq=LINE`) if it is for the NIC's line; otherwise say why the
/// driver polls.
fn take_interrupts(device: u32) -> bool {
    let line = pci_read(device, 0x3c) & 0xff;
    let given = vmm::platform::argument("irq").and_then(|v| v.parse::<u32>().ok());
    let attached = match given {
        Some(g) if g == line => {
            l4::sys::irq_control(slots::IRQ, IrqOp::Attach, slots::SELF_THREAD).is_ok()
        }
        _ => false,
    };
    if attached {
        println!("[uplink] NIC interrupts on line {line}");
    } else {
        println!(
            "[uplink] the NIC interrupts on line {line}, but the IRQ object is {}: polling it every millisecond",
            given.map_or("missing (irq=LINE)".into(), |g| alloc::format!("for line {g}"))
        );
    }
    attached
}

l4::main!(main);
