//! IPC message encodings: the message tag, timeouts, flexpages and map items, and the labels
//! of kernel-generated messages (page faults, exceptions).

/// Number of message words that travel in registers (`r8`, `r9`, `r12`, `r13`).
pub const REGISTER_WORDS: usize = 4;
/// Maximum number of message words (untyped words plus two per typed item).
pub const MAX_WORDS: usize = 64;

/// The message tag (`rdx`): label, untyped word count, typed item count.
///
/// Bits 0..=6: untyped words (0..=64). Bits 7..=11: typed items (map items, two words each,
/// after the untyped words). Bits 32..=63: the label, a protocol number chosen by the sender
/// (the kernel uses negative labels for the messages it generates).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageTag(pub u64);

impl MessageTag {
    /// A tag with a label, `untyped` words and `typed` map items.
    pub const fn new(label: i32, untyped: usize, typed: usize) -> Self {
        MessageTag(
            ((label as u32 as u64) << 32) | ((typed as u64 & 0x1f) << 7) | (untyped as u64 & 0x7f),
        )
    }
    /// The label.
    pub const fn label(self) -> i32 {
        (self.0 >> 32) as u32 as i32
    }
    /// Untyped words.
    pub const fn untyped(self) -> usize {
        (self.0 & 0x7f) as usize
    }
    /// Typed items (each two words).
    pub const fn typed(self) -> usize {
        ((self.0 >> 7) & 0x1f) as usize
    }
    /// Total message words the tag describes.
    pub const fn words(self) -> usize {
        self.untyped() + 2 * self.typed()
    }
    /// Whether the tag is well-formed: no reserved bits, at most [`MAX_WORDS`] words.
    pub const fn is_valid(self) -> bool {
        (self.0 & 0xffff_f000) == 0 && self.words() <= MAX_WORDS
    }
}

/// Label of a page-fault message. Words: fault address, access ([`FaultAccess`] bits),
/// instruction pointer. The reply carries one map item (a memory flexpage of the pager's
/// address space); a reply without one refuses the fault and the thread is killed.
pub const LABEL_PAGE_FAULT: i32 = -2;
/// Label of an exception message: a call from the faulting thread to its exception handler.
/// Words (20): vector, error code, rip, rsp, rflags, rax, rbx, rcx, rdx, rsi, rdi, rbp, r8 ..
/// r15. A reply with label 0 and the same 20 words (0 and 1 ignored) resumes the thread with
/// that state (rflags restricted to the user-changeable bits); any other reply kills it.
pub const LABEL_EXCEPTION: i32 = -3;
/// Label of a death notice the kernel sends to a killed thread's exception handler. Words:
/// reason (a CPU exception vector, or 0x100 pager refused a fault, 0x101 no pager, 0x102 pager
/// died), detail (error code or fault address), instruction pointer.
pub const LABEL_DEATH: i32 = -5;
/// Label of an interrupt message. Word 0: the IRQ line. The badge is the IRQ capability's.
pub const LABEL_IRQ: i32 = -6;
/// Label of a guest page fault: a VM's nested page fault on guest-physical memory nothing is
/// mapped at, sent by the kernel in the name of the thread running the vCPU to the VM's pager
/// (a call). Words: guest-physical address, the nested page fault's error code (EXITINFO1),
/// guest RIP. A reply with a map item (a memory flexpage of the pager's, placed at the
/// address like a page-fault reply) maps it into the VM and the guest retries; any other
/// reply hands the exit to the VMM (its `VcpuRun` returns the nested-page-fault exit), which is
/// how a pager asks for MMIO emulation.
pub const LABEL_GUEST_PAGE_FAULT: i32 = -7;
/// Label a task's runtime sends to its parent when it exits. Word 0: exit code.
pub const LABEL_EXIT: i32 = -16;

bitflags::bitflags! {
    /// Access bits in word 1 of a page-fault message (the x86 error code bits; the kernel
    /// clears the others).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct FaultAccess: u64 {
        /// The page was present (a protection violation, not a missing page).
        const PRESENT = 1;
        /// A write access.
        const WRITE = 2;
        /// An instruction fetch.
        const EXECUTE = 16;
    }
}

/// IPC timeouts (`r10`): bits 0..=31 the send timeout, 32..=63 the receive timeout, each a
/// [`Timeout`] encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts(pub u64);

impl Timeouts {
    /// Both phases wait forever.
    pub const INFINITE: Timeouts = Timeouts(0);
    /// Combine a send and a receive timeout.
    pub const fn new(send: Timeout, receive: Timeout) -> Self {
        Timeouts((send.0 as u64) | ((receive.0 as u64) << 32))
    }
    /// The send timeout.
    pub const fn send(self) -> Timeout {
        Timeout(self.0 as u32)
    }
    /// The receive timeout.
    pub const fn receive(self) -> Timeout {
        Timeout((self.0 >> 32) as u32)
    }
}

/// One timeout: 0 is infinite, `u32::MAX` is zero (poll: fail at once if the partner is not
/// ready), anything else is that many microseconds (rounded up to the timer tick).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeout(pub u32);

impl Timeout {
    /// Wait forever.
    pub const INFINITE: Timeout = Timeout(0);
    /// Do not wait.
    pub const ZERO: Timeout = Timeout(u32::MAX);
    /// Wait at most `us` microseconds (1..u32::MAX-1).
    pub const fn micros(us: u32) -> Timeout {
        if us == 0 {
            Timeout::ZERO
        } else if us == u32::MAX {
            Timeout(u32::MAX - 1)
        } else {
            Timeout(us)
        }
    }
    /// What the timeout means.
    pub const fn kind(self) -> TimeoutKind {
        match self.0 {
            0 => TimeoutKind::Infinite,
            u32::MAX => TimeoutKind::Zero,
            us => TimeoutKind::Micros(us),
        }
    }
}

/// The meaning of a [`Timeout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutKind {
    /// Wait forever.
    Infinite,
    /// Do not wait.
    Zero,
    /// Wait this many microseconds.
    Micros(u32),
}

/// Kinds of flexpages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FpageKind {
    /// Memory pages (base is a virtual address).
    Memory = 0,
    /// I/O ports (base is the first port).
    Io = 1,
    /// Capability slots (base is the first slot).
    Object = 2,
}

bitflags::bitflags! {
    /// The rights of a memory flexpage (bits 0..=2 of its encoding).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct MemoryRights: u64 {
        /// Read.
        const READ = 4;
        /// Write.
        const WRITE = 2;
        /// Execute.
        const EXECUTE = 1;
    }
}

/// A flexpage: a naturally aligned power-of-two region of an address space, with rights.
///
/// Encoding: bits 0..=2 rights ([`Fpage::READ`], [`Fpage::WRITE`], [`Fpage::EXECUTE`]),
/// bits 4..=9 the size as log2 of the unit count (memory: log2 bytes, at least 12),
/// bits 10..=11 the [`FpageKind`], bits 12..=63 the base: for memory the address (its low 12
/// bits are implied zero), for I/O ports and capability slots the index shifted left by 12.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fpage(pub u64);

impl Fpage {
    /// Read right (memory).
    pub const READ: MemoryRights = MemoryRights::READ;
    /// Write right (memory).
    pub const WRITE: MemoryRights = MemoryRights::WRITE;
    /// Execute right (memory).
    pub const EXECUTE: MemoryRights = MemoryRights::EXECUTE;
    /// All memory rights.
    pub const RWX: MemoryRights = MemoryRights::all();
    /// The smallest memory flexpage order (4 KiB).
    pub const MIN_MEMORY_ORDER: u32 = 12;
    /// The largest order: the whole 47-bit user address space.
    pub const MAX_MEMORY_ORDER: u32 = 47;

    /// A memory flexpage of `1 << order` bytes at `base` (must be aligned) with `rights`.
    pub const fn memory(base: u64, order: u32, rights: MemoryRights) -> Fpage {
        Fpage((base & !0xfff) | ((order as u64 & 0x3f) << 4) | rights.bits())
    }
    /// The receive window covering the whole user address space.
    pub const fn whole_space() -> Fpage {
        Fpage::memory(0, Fpage::MAX_MEMORY_ORDER, Fpage::RWX)
    }
    /// The kind, or `None` for the reserved encoding.
    pub const fn kind(self) -> Option<FpageKind> {
        match (self.0 >> 10) & 3 {
            0 => Some(FpageKind::Memory),
            1 => Some(FpageKind::Io),
            2 => Some(FpageKind::Object),
            _ => None,
        }
    }
    /// log2 of the size.
    pub const fn order(self) -> u32 {
        ((self.0 >> 4) & 0x3f) as u32
    }
    /// The base address (memory).
    pub const fn base(self) -> u64 {
        self.0 & !0xfff
    }
    /// The size in bytes (memory); saturates for orders of 64 and above.
    pub const fn size(self) -> u64 {
        if self.order() >= 64 {
            u64::MAX
        } else {
            1u64 << self.order()
        }
    }
    /// The rights bits (of any kind).
    pub const fn rights(self) -> u64 {
        self.0 & 7
    }
    /// The rights of a memory flexpage.
    pub const fn memory_rights(self) -> MemoryRights {
        MemoryRights::from_bits_truncate(self.0)
    }
    /// An I/O-port flexpage of `1 << order` ports from `port` (aligned).
    pub const fn io(port: u64, order: u32) -> Fpage {
        Fpage((port << 12) | (1 << 10) | ((order as u64 & 0x3f) << 4) | 7)
    }
    /// A capability flexpage of `1 << order` slots from `slot` (aligned), with capability
    /// `rights` ([`crate::Rights`] `SEND`, `CONTROL`, `COPY`; `CONTROL` also covers `SCHEDULE`).
    pub const fn object(slot: u64, order: u32, rights: crate::Rights) -> Fpage {
        Fpage((slot << 12) | (2 << 10) | ((order as u64 & 0x3f) << 4) | (rights.bits() & 7))
    }
    /// The first port or slot of an I/O or capability flexpage.
    pub const fn index(self) -> u64 {
        self.0 >> 12
    }
    /// The capability rights an object flexpage passes on.
    pub const fn object_rights(self) -> crate::Rights {
        use crate::Rights;
        let r = Rights::from_bits_truncate(self.rights());
        let rights = r.intersection(Rights::SEND.union(Rights::COPY));
        if r.contains(Rights::CONTROL) {
            rights.union(Rights::CONTROL).union(Rights::SCHEDULE)
        } else {
            rights
        }
    }
    /// Whether this is a well-formed I/O flexpage: order 0..=16, aligned, below port 65536.
    pub const fn is_valid_io(self) -> bool {
        let order = self.order();
        matches!(self.kind(), Some(FpageKind::Io))
            && order <= 16
            && self.index() & ((1 << order) - 1) == 0
            && self.index() + (1 << order) <= 65536
            && (self.0 & 0b1000) == 0
    }
    /// Whether this is a well-formed capability flexpage: aligned, inside the capability
    /// table.
    pub const fn is_valid_object(self) -> bool {
        let order = self.order();
        matches!(self.kind(), Some(FpageKind::Object))
            && order <= 9
            && self.index() & ((1 << order) - 1) == 0
            && self.index() + (1 << order) <= crate::CAP_SLOTS as u64
            && (self.0 & 0b1000) == 0
    }
    /// Whether this is a well-formed flexpage of any kind.
    pub const fn is_valid(self) -> bool {
        self.is_valid_memory() || self.is_valid_io() || self.is_valid_object()
    }
    /// Whether this is a well-formed memory flexpage inside the user half: order in
    /// 12..=47, base aligned to the size, the region below [`crate::USER_END`].
    pub const fn is_valid_memory(self) -> bool {
        let order = self.order();
        matches!(self.kind(), Some(FpageKind::Memory))
            && order >= Fpage::MIN_MEMORY_ORDER
            && order <= Fpage::MAX_MEMORY_ORDER
            && self.base() & (self.size() - 1) == 0
            && self.base() + self.size() <= crate::USER_END
            && (self.0 & 0b1000) == 0
    }
}

/// A map item: two message words after the untyped words. Word 0: [`MapItem::GRANT`] bit and
/// the send base (the hint where in the receive window the flexpage lands, low 12 bits zero);
/// word 1: the [`Fpage`] in the sender's space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapItem {
    /// Flags and send base.
    pub control: u64,
    /// The flexpage.
    pub fpage: Fpage,
}

impl MapItem {
    /// Grant (move) instead of map (copy).
    pub const GRANT: u64 = 1;
    /// A map item for `fpage` with send base `send_base`.
    pub const fn map(send_base: u64, fpage: Fpage) -> MapItem {
        MapItem {
            control: send_base & !0xfff,
            fpage,
        }
    }
    /// The send base.
    pub const fn send_base(self) -> u64 {
        self.control & !0xfff
    }
    /// Whether the item grants.
    pub const fn is_grant(self) -> bool {
        self.control & MapItem::GRANT != 0
    }
}

/// A string item (indirect long IPC): two message words after the untyped words, like a map
/// item. Word 0: the length in bytes shifted left by 12, with [`StringItem::FLAG`] set; word 1:
/// the address of the bytes in the sender's space. The receiver names its buffers in
/// [`crate::Utcb::br`]`[2..10]` (up to [`MAX_STRINGS`] pairs in the same format). The kernel
/// copies string `i` into buffer `i` (at most the buffer's length) and rewrites the item the
/// receiver sees: word 0 the copied length, word 1 the buffer address. Pages missing in the
/// sender's string raise a page fault of the sender (its IPC restarts once resolved); pages
/// missing in a waiting receiver's buffer raise a page fault of the receiver before the copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StringItem {
    /// Length in bytes.
    pub length: u64,
    /// Address.
    pub address: u64,
}

/// Maximum string items per message (and receive buffers).
pub const MAX_STRINGS: usize = 4;
/// Maximum length of one string item.
pub const MAX_STRING_LENGTH: u64 = 4 << 20;

impl StringItem {
    /// Bit 1 of word 0 marks a string item (bit 0 is the grant bit of map items).
    pub const FLAG: u64 = 2;
    /// The two words.
    pub const fn words(self) -> [u64; 2] {
        [(self.length << 12) | StringItem::FLAG, self.address]
    }
    /// Decode two words, if they are a string item.
    pub const fn decode(word0: u64, word1: u64) -> Option<StringItem> {
        if word0 & StringItem::FLAG == 0 {
            return None;
        }
        Some(StringItem {
            length: word0 >> 12,
            address: word1,
        })
    }
}

/// Where a flexpage of size `1 << send_order` lands in a receive window of size
/// `1 << window_order` at `window_base`, given the sender's `send_base` hint, following the
/// classic L4 rule. Returns `(destination address, source offset inside the flexpage, size)`.
///
/// If the flexpage is smaller than the window it lands at `send_base` modulo the window size,
/// rounded down to the flexpage size. If it is larger, only the window-sized part of it that
/// contains `send_base` is transferred, into the whole window.
pub const fn place_in_window(
    window_base: u64,
    window_order: u32,
    send_order: u32,
    send_base: u64,
) -> (u64, u64, u64) {
    if send_order <= window_order {
        let window_mask = low_mask(window_order);
        let offset = (send_base & window_mask) & !low_mask(send_order);
        (window_base + offset, 0, 1u64 << send_order)
    } else {
        let offset = (send_base & low_mask(send_order)) & !low_mask(window_order);
        (window_base, offset, 1u64 << window_order)
    }
}

const fn low_mask(order: u32) -> u64 {
    if order >= 64 {
        u64::MAX
    } else {
        (1u64 << order) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_fields_round_trip() {
        let t = MessageTag::new(-2, 3, 1);
        assert_eq!(t.label(), -2);
        assert_eq!(t.untyped(), 3);
        assert_eq!(t.typed(), 1);
        assert_eq!(t.words(), 5);
        assert!(t.is_valid());
        let big = MessageTag::new(7, 64, 0);
        assert!(big.is_valid());
        assert!(!MessageTag::new(7, 63, 1).is_valid());
        assert!(!MessageTag(1 << 13).is_valid());
    }

    #[test]
    fn timeouts_encode_both_phases() {
        let t = Timeouts::new(Timeout::ZERO, Timeout::micros(500));
        assert_eq!(t.send().kind(), TimeoutKind::Zero);
        assert_eq!(t.receive().kind(), TimeoutKind::Micros(500));
        assert_eq!(Timeouts::INFINITE.send().kind(), TimeoutKind::Infinite);
        assert_eq!(Timeout::micros(0), Timeout::ZERO);
    }

    #[test]
    fn memory_fpage_validation() {
        let f = Fpage::memory(0x20_0000, 21, Fpage::READ | Fpage::WRITE);
        assert!(f.is_valid_memory());
        assert_eq!(f.size(), 0x20_0000);
        assert_eq!(f.rights(), 6);
        assert_eq!(f.kind(), Some(FpageKind::Memory));
        // misaligned
        assert!(!Fpage::memory(0x1000, 21, Fpage::RWX).is_valid_memory());
        // too small
        assert!(!Fpage::memory(0x1000, 11, Fpage::RWX).is_valid_memory());
        // kernel half
        assert!(!Fpage::memory(0xffff_8000_0000_0000, 12, Fpage::RWX).is_valid_memory());
        assert!(!Fpage::memory(0, 48, Fpage::RWX).is_valid_memory());
        assert!(Fpage::whole_space().is_valid_memory());
        // wrong kind
        assert!(!Fpage(Fpage::memory(0x1000, 12, Fpage::RWX).0 | (1 << 10)).is_valid_memory());
    }

    #[test]
    fn io_and_object_fpages() {
        let io = Fpage::io(0x40, 2);
        assert!(io.is_valid_io() && io.is_valid() && !io.is_valid_memory());
        assert_eq!((io.index(), io.order()), (0x40, 2));
        assert!(!Fpage::io(0x41, 2).is_valid_io());
        assert!(!Fpage::io(0xfffc, 3).is_valid_io());
        assert!(Fpage::io(0, 16).is_valid_io());
        let obj = Fpage::object(16, 4, crate::Rights::SEND);
        assert!(obj.is_valid_object() && !obj.is_valid_io());
        assert_eq!(obj.object_rights(), crate::Rights::SEND);
        assert_eq!(
            Fpage::object(0, 0, crate::Rights::from_bits_truncate(7)).object_rights(),
            crate::Rights::all()
        );
        assert!(!Fpage::object(17, 4, crate::Rights::all()).is_valid_object());
        assert!(!Fpage::object(0, 10, crate::Rights::all()).is_valid_object());
    }

    #[test]
    fn placement_small_into_large_window() {
        // 4 KiB page, window 0x10_0000..0x20_0000 (1 MiB), hint 0x12_3456
        let (dst, off, size) = place_in_window(0x10_0000, 20, 12, 0x12_3456);
        assert_eq!((dst, off, size), (0x12_3000, 0, 0x1000));
        // page fault style: whole space window, hint = fault address
        let (dst, _, _) = place_in_window(0, 47, 12, 0x40_1234);
        assert_eq!(dst, 0x40_1000);
    }

    #[test]
    fn placement_large_into_small_window() {
        // 2 MiB flexpage into a 4 KiB window: the 4 KiB part containing the hint.
        let (dst, off, size) = place_in_window(0x5000, 12, 21, 0x1_3000);
        assert_eq!((dst, off, size), (0x5000, 0x1_3000, 0x1000));
    }

    #[test]
    fn map_item_fields() {
        let m = MapItem::map(
            0x40_1234,
            Fpage::memory(0x1000, 12, Fpage::READ | Fpage::EXECUTE),
        );
        assert_eq!(m.send_base(), 0x40_1000);
        assert!(!m.is_grant());
        let g = MapItem {
            control: m.control | MapItem::GRANT,
            ..m
        };
        assert!(g.is_grant());
    }
}
