//! Guest virtual to guest physical translation by walking the guest's own page tables, as the
//! guest CPU would, through a caller-supplied reader of guest-physical memory.
//!
//! Supported: paging off, 32-bit (2-level) paging with 4 KiB and (CR4.PSE) 4 MiB pages including
//! PSE-36 high address bits, PAE paging with 4 KiB and 2 MiB pages, and long-mode paging with
//! 4 KiB, 2 MiB and 1 GiB pages (4-level, or 5-level when CR4.LA57 is set).
//!
//! The walk answers "where does this address go", not "may this access happen": it checks only
//! the present bit. It does not check permissions (R/W, U/S, NX), reserved bits or canonical
//! form, and it does not set accessed/dirty bits. Physical addresses are taken to be at most 52
//! bits wide.

use x86_64::registers::control::{Cr0Flags, Cr4Flags};
use x86_64::registers::model_specific::EferFlags;
use x86_64::structures::paging::PageTableFlags;

/// The guest's paging-related control registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagingMode {
    /// CR0 (PG, bit 31, enables paging).
    pub cr0: u64,
    /// CR4 (PSE bit 4, PAE bit 5, LA57 bit 12).
    pub cr4: u64,
    /// EFER (LME bit 8, LMA bit 10).
    pub efer: u64,
}

/// Why a translation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkError {
    /// The entry at `level` is not present. Levels count from the leaf: 1 is the page table
    /// entry, 2 the page directory entry, 3 the PDPT entry (PAE and long mode), 4 the PML4 entry
    /// and 5 the PML5 entry.
    NotPresent {
        /// The paging-structure level whose entry had the present bit clear.
        level: u8,
    },
    /// The reader returned `None` for the (8-byte-aligned) guest-physical address `gpa`.
    Unreadable {
        /// The guest-physical address that could not be read.
        gpa: u64,
    },
    /// The control registers describe a combination the CPU does not allow (long mode without
    /// PAE).
    Unsupported,
}

const CR0_PG: u64 = Cr0Flags::PAGING.bits();
const CR4_PSE: u64 = Cr4Flags::PAGE_SIZE_EXTENSION.bits();
const CR4_PAE: u64 = Cr4Flags::PHYSICAL_ADDRESS_EXTENSION.bits();
const CR4_LA57: u64 = Cr4Flags::L5_PAGING.bits();
const EFER_LME: u64 = EferFlags::LONG_MODE_ENABLE.bits();
const EFER_LMA: u64 = EferFlags::LONG_MODE_ACTIVE.bits();

const PRESENT: u64 = PageTableFlags::PRESENT.bits();
const PAGE_SIZE: u64 = PageTableFlags::HUGE_PAGE.bits();
/// Bits 12..51 of a PAE/long-mode entry: the next table or the 4 KiB frame.
const ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Translate `virtual_address`. With CR0.PG clear the address is physical (truncated to 32 bits
/// unless EFER.LMA is set). Supports 4-level (and 5-level) long-mode paging (4 KiB, 2 MiB, 1 GiB
/// pages), PAE paging (4 KiB, 2 MiB pages), and 2-level 32-bit paging (4 KiB and, with CR4.PSE,
/// 4 MiB pages). Long mode is taken to be active when paging is on and EFER.LMA or EFER.LME is
/// set.
///
/// `read_u64` reads the 8 bytes of guest-physical memory at the address it is given, which is
/// always 8-byte aligned (32-bit paging entries are taken from the matching half of the aligned
/// word), or returns `None` if that memory cannot be read.
pub fn translate(
    mode: PagingMode,
    cr3: u64,
    virtual_address: u64,
    read_u64: &mut dyn FnMut(u64) -> Option<u64>,
) -> Result<u64, WalkError> {
    if mode.cr0 & CR0_PG == 0 {
        return Ok(if mode.efer & EFER_LMA != 0 {
            virtual_address
        } else {
            virtual_address & 0xffff_ffff
        });
    }
    let pae = mode.cr4 & CR4_PAE != 0;
    if mode.efer & (EFER_LMA | EFER_LME) != 0 {
        if !pae {
            return Err(WalkError::Unsupported);
        }
        let top_level = if mode.cr4 & CR4_LA57 != 0 { 5 } else { 4 };
        walk_long(cr3 & ADDRESS_MASK, top_level, virtual_address, read_u64)
    } else if pae {
        walk_pae(cr3, virtual_address & 0xffff_ffff, read_u64)
    } else {
        walk_32(
            cr3,
            virtual_address & 0xffff_ffff,
            mode.cr4 & CR4_PSE != 0,
            read_u64,
        )
    }
}

/// Read the 8-byte entry at the 8-byte-aligned `gpa`.
fn read_entry(gpa: u64, read_u64: &mut dyn FnMut(u64) -> Option<u64>) -> Result<u64, WalkError> {
    read_u64(gpa).ok_or(WalkError::Unreadable { gpa })
}

/// Walk a 4- or 5-level long-mode hierarchy (also the PD/PT part of PAE paging, from `level`
/// down) whose table at `level` is at `table`.
fn walk_long(
    mut table: u64,
    top_level: u8,
    virtual_address: u64,
    read_u64: &mut dyn FnMut(u64) -> Option<u64>,
) -> Result<u64, WalkError> {
    let mut level = top_level;
    loop {
        let shift = 12 + 9 * u32::from(level - 1);
        let index = (virtual_address >> shift) & 0x1ff;
        let entry = read_entry(table + index * 8, read_u64)?;
        if entry & PRESENT == 0 {
            return Err(WalkError::NotPresent { level });
        }
        // A large page at the PDPT (1 GiB) or page directory (2 MiB) level; PS is reserved
        // above that and is ignored here.
        if level == 1 || ((level == 2 || level == 3) && entry & PAGE_SIZE != 0) {
            let page_mask = (1u64 << shift) - 1;
            return Ok((entry & ADDRESS_MASK & !page_mask) | (virtual_address & page_mask));
        }
        table = entry & ADDRESS_MASK;
        level -= 1;
    }
}

/// Walk PAE paging: four PDPT entries at `cr3` bits 5..31, then a long-mode-format page
/// directory and page table.
fn walk_pae(
    cr3: u64,
    virtual_address: u64,
    read_u64: &mut dyn FnMut(u64) -> Option<u64>,
) -> Result<u64, WalkError> {
    let pdpt = cr3 & 0xffff_ffe0;
    let index = (virtual_address >> 30) & 0x3;
    let entry = read_entry(pdpt + index * 8, read_u64)?;
    if entry & PRESENT == 0 {
        return Err(WalkError::NotPresent { level: 3 });
    }
    walk_long(entry & ADDRESS_MASK, 2, virtual_address, read_u64)
}

/// Walk 32-bit paging: a page directory at `cr3` bits 12..31 of 4-byte entries, 4 MiB pages when
/// `pse`, else a page table of 4-byte entries.
fn walk_32(
    cr3: u64,
    virtual_address: u64,
    pse: bool,
    read_u64: &mut dyn FnMut(u64) -> Option<u64>,
) -> Result<u64, WalkError> {
    let directory = cr3 & 0xffff_f000;
    let pde = read_entry_32(directory + ((virtual_address >> 22) & 0x3ff) * 4, read_u64)?;
    if pde & PRESENT == 0 {
        return Err(WalkError::NotPresent { level: 2 });
    }
    if pse && pde & PAGE_SIZE != 0 {
        // Bits 22..31 of the frame from bits 22..31 of the entry, bits 32..39 (PSE-36) from
        // bits 13..20.
        let low = pde & 0xffc0_0000;
        let high = ((pde >> 13) & 0xff) << 32;
        return Ok(high | low | (virtual_address & 0x3f_ffff));
    }
    let table = pde & 0xffff_f000;
    let pte = read_entry_32(table + ((virtual_address >> 12) & 0x3ff) * 4, read_u64)?;
    if pte & PRESENT == 0 {
        return Err(WalkError::NotPresent { level: 1 });
    }
    Ok((pte & 0xffff_f000) | (virtual_address & 0xfff))
}

/// Read the 4-byte entry at the 4-byte-aligned `gpa` (from the aligned 8-byte word holding it).
fn read_entry_32(gpa: u64, read_u64: &mut dyn FnMut(u64) -> Option<u64>) -> Result<u64, WalkError> {
    let word = read_entry(gpa & !7, read_u64)?;
    Ok((word >> ((gpa & 4) * 8)) & 0xffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;
    extern crate alloc;
    use alloc::collections::BTreeMap;
    use alloc::vec::Vec;

    const P: u64 = PRESENT | 0x2; // present + writable
    const PS: u64 = PAGE_SIZE;

    const OFF: PagingMode = PagingMode {
        cr0: 0x11,
        cr4: 0,
        efer: 0,
    };
    const LONG: PagingMode = PagingMode {
        cr0: CR0_PG | 0x11,
        cr4: CR4_PAE,
        efer: EFER_LME | EFER_LMA,
    };
    const LONG5: PagingMode = PagingMode {
        cr0: CR0_PG | 0x11,
        cr4: CR4_PAE | CR4_LA57,
        efer: EFER_LME | EFER_LMA,
    };
    const PAE: PagingMode = PagingMode {
        cr0: CR0_PG | 0x11,
        cr4: CR4_PAE,
        efer: 0,
    };
    const BITS32: PagingMode = PagingMode {
        cr0: CR0_PG | 0x11,
        cr4: 0,
        efer: 0,
    };
    const BITS32_PSE: PagingMode = PagingMode {
        cr0: CR0_PG | 0x11,
        cr4: CR4_PSE,
        efer: 0,
    };

    /// Sparse guest-physical memory of aligned 8-byte words; reads outside `readable` fail.
    struct Memory {
        words: BTreeMap<u64, u64>,
        readable: core::ops::Range<u64>,
        reads: Vec<u64>,
    }

    impl Memory {
        fn new() -> Self {
            Memory {
                words: BTreeMap::new(),
                readable: 0..1 << 40,
                reads: Vec::new(),
            }
        }

        fn set64(&mut self, gpa: u64, value: u64) {
            assert_eq!(gpa % 8, 0);
            self.words.insert(gpa, value);
        }

        fn set32(&mut self, gpa: u64, value: u32) {
            assert_eq!(gpa % 4, 0);
            let word = self.words.entry(gpa & !7).or_insert(0);
            let shift = (gpa & 4) * 8;
            *word = (*word & !(0xffff_ffffu64 << shift)) | (u64::from(value) << shift);
        }

        fn translate(&mut self, mode: PagingMode, cr3: u64, va: u64) -> Result<u64, WalkError> {
            let Memory {
                words,
                readable,
                reads,
            } = self;
            translate(mode, cr3, va, &mut |gpa| {
                assert_eq!(gpa % 8, 0, "reads are 8-byte aligned");
                reads.push(gpa);
                readable
                    .contains(&gpa)
                    .then(|| words.get(&gpa).copied().unwrap_or(0))
            })
        }
    }

    /// Index of `va` at long-mode `level`.
    fn index(va: u64, level: u32) -> u64 {
        (va >> (12 + 9 * (level - 1))) & 0x1ff
    }

    /// A long-mode hierarchy mapping `va` with a 4 KiB page to `frame`, tables at 0x1000.. .
    fn long_4k(memory: &mut Memory, va: u64, frame: u64) -> u64 {
        let (pml4, pdpt, pd, pt) = (0x1000, 0x2000, 0x3000, 0x4000);
        memory.set64(pml4 + index(va, 4) * 8, pdpt | P);
        memory.set64(pdpt + index(va, 3) * 8, pd | P);
        memory.set64(pd + index(va, 2) * 8, pt | P);
        memory.set64(pt + index(va, 1) * 8, frame | P | (1 << 63));
        pml4
    }

    #[test]
    fn paging_off_is_identity_truncated_to_32_bits() {
        let mut memory = Memory::new();
        assert_eq!(memory.translate(OFF, 0x1000, 0x1234_5678), Ok(0x1234_5678));
        assert_eq!(
            memory.translate(OFF, 0x1000, 0xffff_0001_dead_beef),
            Ok(0xdead_beef)
        );
        // With EFER.LMA (not reachable on hardware with PG clear) the address is kept whole.
        let mode = PagingMode {
            efer: EFER_LMA,
            ..OFF
        };
        assert_eq!(memory.translate(mode, 0, 0x1_0000_0000), Ok(0x1_0000_0000));
        assert!(memory.reads.is_empty());
    }

    #[test]
    fn long_mode_4k_page() {
        let mut memory = Memory::new();
        let va = 0xffff_8880_1234_5678;
        let cr3 = long_4k(&mut memory, va, 0xabcd_e000);
        assert_eq!(memory.translate(LONG, cr3, va), Ok(0xabcd_e678));
        assert_eq!(memory.reads.len(), 4);
        // PCID bits in CR3 are ignored.
        assert_eq!(memory.translate(LONG, cr3 | 0x5, va), Ok(0xabcd_e678));
    }

    #[test]
    fn long_mode_2m_page() {
        let mut memory = Memory::new();
        let va = 0x0000_7f12_3456_789a;
        memory.set64(0x1000 + index(va, 4) * 8, 0x2000 | P);
        memory.set64(0x2000 + index(va, 3) * 8, 0x3000 | P);
        // Bit 12 is PAT for a large page, not an address bit.
        memory.set64(
            0x3000 + index(va, 2) * 8,
            0x8_4000_0000 | PS | P | (1 << 12),
        );
        assert_eq!(
            memory.translate(LONG, 0x1000, va),
            Ok(0x8_4000_0000 | (va & 0x1f_ffff))
        );
    }

    #[test]
    fn long_mode_1g_page() {
        let mut memory = Memory::new();
        let va = 0xffff_ffff_8123_4567;
        memory.set64(0x1000 + index(va, 4) * 8, 0x2000 | P);
        memory.set64(0x2000 + index(va, 3) * 8, 0x40_0000_0000 | PS | P);
        assert_eq!(
            memory.translate(LONG, 0x1000, va),
            Ok(0x40_0000_0000 | (va & 0x3fff_ffff))
        );
        assert_eq!(memory.reads.len(), 2);
    }

    #[test]
    fn long_mode_five_levels() {
        let mut memory = Memory::new();
        let va = 0x00ab_cdef_1234_5678u64;
        let pml5 = 0x9000;
        memory.set64(pml5 + ((va >> 48) & 0x1ff) * 8, 0x1000 | P);
        long_4k(&mut memory, va, 0x7000);
        assert_eq!(memory.translate(LONG5, pml5, va), Ok(0x7678));
        memory.set64(pml5 + ((va >> 48) & 0x1ff) * 8, 0);
        assert_eq!(
            memory.translate(LONG5, pml5, va),
            Err(WalkError::NotPresent { level: 5 })
        );
    }

    #[test]
    fn long_mode_not_present_reports_level() {
        let va = 0xffff_8880_1234_5678;
        for (level, table) in [(4u8, 0x1000u64), (3, 0x2000), (2, 0x3000), (1, 0x4000)] {
            let mut memory = Memory::new();
            let cr3 = long_4k(&mut memory, va, 0xabcd_e000);
            let slot = table + index(va, u32::from(level)) * 8;
            let entry = memory.words[&slot];
            memory.set64(slot, entry & !PRESENT);
            assert_eq!(
                memory.translate(LONG, cr3, va),
                Err(WalkError::NotPresent { level })
            );
        }
    }

    #[test]
    fn long_mode_unreadable_table() {
        let mut memory = Memory::new();
        let va = 0x40_0000;
        let cr3 = long_4k(&mut memory, va, 0x5000);
        memory.readable = 0..0x3000;
        let pd_entry = 0x3000 + index(va, 2) * 8;
        assert_eq!(
            memory.translate(LONG, cr3, va),
            Err(WalkError::Unreadable { gpa: pd_entry })
        );
        memory.readable = 0..0;
        assert_eq!(
            memory.translate(LONG, cr3, va),
            Err(WalkError::Unreadable {
                gpa: 0x1000 + index(va, 4) * 8
            })
        );
    }

    #[test]
    fn long_mode_without_pae_is_unsupported() {
        let mut memory = Memory::new();
        let mode = PagingMode { cr4: 0, ..LONG };
        assert_eq!(
            memory.translate(mode, 0x1000, 0),
            Err(WalkError::Unsupported)
        );
    }

    #[test]
    fn pae_4k_page() {
        let mut memory = Memory::new();
        let va = 0xc123_4567u64;
        // The PDPT is only 32-byte aligned under PAE.
        let pdpt = 0x1fe0;
        memory.set64(pdpt + 3 * 8, 0x3000 | PRESENT);
        memory.set64(0x3000 + ((va >> 21) & 0x1ff) * 8, 0x4000 | P);
        memory.set64(
            0x4000 + ((va >> 12) & 0x1ff) * 8,
            0x1_2345_6000 | P | (1 << 63),
        );
        assert_eq!(memory.translate(PAE, pdpt, va), Ok(0x1_2345_6567));
        // The upper half of a 64-bit virtual address plays no part.
        assert_eq!(
            memory.translate(PAE, pdpt, va | 0xffff_ffff_0000_0000),
            Ok(0x1_2345_6567)
        );
    }

    #[test]
    fn pae_2m_page_and_not_present() {
        let mut memory = Memory::new();
        let va = 0x4056_789au64;
        memory.set64(0x1000 + 8, 0x3000 | PRESENT);
        memory.set64(0x3000 + ((va >> 21) & 0x1ff) * 8, 0x2_0020_0000 | PS | P);
        assert_eq!(
            memory.translate(PAE, 0x1000, va),
            Ok(0x2_0020_0000 | (va & 0x1f_ffff))
        );
        // PDPT entry 0 (for 0..1 GiB) is not present.
        assert_eq!(
            memory.translate(PAE, 0x1000, 0x1000),
            Err(WalkError::NotPresent { level: 3 })
        );
        // Page directory entry not present.
        assert_eq!(
            memory.translate(PAE, 0x1000, va + 0x20_0000),
            Err(WalkError::NotPresent { level: 2 })
        );
        // Page table entry not present.
        memory.set64(0x3000 + 8, 0x5000 | P);
        assert_eq!(
            memory.translate(PAE, 0x1000, 0x4020_0000),
            Err(WalkError::NotPresent { level: 1 })
        );
    }

    #[test]
    fn thirty_two_bit_4k_pages() {
        let mut memory = Memory::new();
        // An odd page-directory index (4-byte entry in the upper half of an 8-byte word), then
        // an even one.
        let va = 0xc040_3abcu64;
        assert_eq!((va >> 22) & 1, 1);
        memory.set32(0x1000 + (va >> 22) * 4, 0x2000 | 0x3);
        memory.set32(0x2000 + ((va >> 12) & 0x3ff) * 4, 0x0abc_d000 | 0x3);
        let va2 = 0x0000_0123u64;
        memory.set32(0x1000, 0x3000 | 0x3);
        memory.set32(0x3000, 0x0777_7000 | 0x3);
        assert_eq!(memory.translate(BITS32, 0x1000, va), Ok(0x0abc_dabc));
        assert_eq!(memory.translate(BITS32, 0x1000, va2), Ok(0x0777_7123));
        // The last entries of a table, at offset 4092, read the word at 4088 only.
        let va3 = 0xffff_f010u64;
        memory.set32(0x1000 + 1023 * 4, 0x4000 | 0x1);
        memory.set32(0x4000 + 1023 * 4, 0x0555_5000 | 0x1);
        memory.reads.clear();
        assert_eq!(memory.translate(BITS32, 0x1000, va3), Ok(0x0555_5010));
        assert_eq!(memory.reads, [0x1ff8, 0x4ff8]);
    }

    #[test]
    fn thirty_two_bit_4m_pages() {
        let mut memory = Memory::new();
        let va = 0x8123_4567u64;
        // 4 MiB page at 0x0c00_0000 with PSE-36 bits selecting 0x3_0000_0000.
        memory.set32(0x1000 + (va >> 22) * 4, 0x0c00_0000 | (0x3 << 13) | 0x83);
        assert_eq!(memory.translate(BITS32_PSE, 0x1000, va), Ok(0x3_0c23_4567));
        // Without CR4.PSE the PS bit is ignored and the entry points to a page table.
        memory.set32(0x1000 + (va >> 22) * 4, 0x2000 | 0x83);
        memory.set32(0x2000 + ((va >> 12) & 0x3ff) * 4, 0x0066_6000 | 0x1);
        assert_eq!(memory.translate(BITS32, 0x1000, va), Ok(0x0066_6567));
    }

    #[test]
    fn thirty_two_bit_not_present_and_unreadable() {
        let mut memory = Memory::new();
        let va = 0x0040_1000u64;
        assert_eq!(
            memory.translate(BITS32, 0x1000, va),
            Err(WalkError::NotPresent { level: 2 })
        );
        memory.set32(0x1000 + 4, 0x2000 | 0x1);
        assert_eq!(
            memory.translate(BITS32, 0x1000, va),
            Err(WalkError::NotPresent { level: 1 })
        );
        memory.readable = 0x1000..0x2000;
        assert_eq!(
            memory.translate(BITS32, 0x1000, va),
            Err(WalkError::Unreadable { gpa: 0x2000 })
        );
        // Entries hold only 32 bits: garbage in the other half of the word must not leak.
        memory.readable = 0..1 << 40;
        memory.set32(0x2000 + 4, 0x0123_4000 | 0x1);
        memory.set32(0x2000, 0xffff_ffff);
        assert_eq!(memory.translate(BITS32, 0x1000, va), Ok(0x0123_4000));
    }
}
