//! Guest memory: RAM from the parent's RAM service mapped into this task and, as flexpages,
//! into the VM at guest-physical 0 ([`Ram`], [`create_vm`]); the view the device models get
//! ([`GuestRam`]); and reading guest memory through the guest's own page tables.

use core::sync::atomic::{AtomicU64, Ordering::SeqCst};
use l4::abi::vcpu as state;
use l4::abi::MapFlags;
use l4::abi::{slots, Error, Fpage, ObjectKind, PAGE_SIZE};
use l4::sys;
use l4::thread::alloc_slot;

/// Guest RAM in our address space.
pub struct Ram {
    /// Where it is in our address space.
    pub base: u64,
    /// Its size in bytes (guest-physical `0..size`).
    pub size: u64,
}

/// Where guest RAM from the parent goes in our address space (bump-allocated, each block
/// aligned to its size so that it can be mapped into a VM as one flexpage).
const GUEST_RAM_WINDOW: u64 = 0x0000_4000_0000_0000;
static NEXT_GUEST_RAM: AtomicU64 = AtomicU64::new(GUEST_RAM_WINDOW);

impl Ram {
    /// `size` bytes (a power of two) of zeroed guest RAM from the parent's RAM service:
    /// 2 MiB pages that the VM gets as large pages too, with all rights.
    pub fn new(size: u64) -> Result<Ram, l4::parent::RamError> {
        let granule = l4::parent::RAM_GRANULE;
        let align = size.max(granule);
        let base = NEXT_GUEST_RAM.load(SeqCst).next_multiple_of(align);
        let bytes = size.next_multiple_of(granule);
        l4::parent::request_ram(base, bytes)?;
        NEXT_GUEST_RAM.store(base + bytes, SeqCst);
        Ok(Ram { base, size })
    }

    /// Whether `gpa..gpa + length` lies inside.
    pub fn contains(&self, gpa: u64, length: u64) -> bool {
        gpa.checked_add(length).is_some_and(|end| end <= self.size)
    }

    /// Copy `bytes` to guest-physical `gpa` (which must be inside).
    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        assert!(self.contains(gpa, bytes.len() as u64));
        // SAFETY: inside our RAM allocation.
        unsafe {
            core::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                (self.base + gpa) as *mut u8,
                bytes.len(),
            )
        };
    }

    /// All of it as words (read while the guest is stopped: the VMM's only vCPU is this
    /// thread's).
    pub fn words(&self) -> &[u64] {
        // SAFETY: the allocation is `size` bytes at `base` (2 MiB aligned, so 8-byte aligned),
        // mapped into this task for its lifetime; any bit pattern is a valid u64.
        unsafe { core::slice::from_raw_parts(self.base as *const u64, (self.size / 8) as usize) }
    }

    /// The (unaligned) word at guest-physical `gpa`, if inside.
    pub fn read_u64(&self, gpa: u64) -> Option<u64> {
        if !self.contains(gpa, 8) {
            return None;
        }
        // SAFETY: inside our RAM allocation.
        Some(unsafe { core::ptr::read_unaligned((self.base + gpa) as *const u64) })
    }

    /// Copy guest-physical `gpa..` into `out`; false if outside.
    pub fn read_bytes(&self, gpa: u64, out: &mut [u8]) -> bool {
        if !self.contains(gpa, out.len() as u64) {
            return false;
        }
        // SAFETY: inside our RAM allocation.
        unsafe {
            core::ptr::copy_nonoverlapping(
                (self.base + gpa) as *const u8,
                out.as_mut_ptr(),
                out.len(),
            )
        };
        true
    }
}

/// Guest RAM as the device models see it ([`GuestMemory`]): a copyable view of a [`Ram`].
#[derive(Clone, Copy)]
pub struct GuestRam {
    base: u64,
    size: u64,
}

impl GuestRam {
    /// The view of `ram`.
    pub fn of(ram: &Ram) -> GuestRam {
        GuestRam {
            base: ram.base,
            size: ram.size,
        }
    }
}

impl l4linux_glue::guest_memory::GuestMemory for GuestRam {
    fn read(
        &self,
        address: u64,
        buffer: &mut [u8],
    ) -> Result<(), l4linux_glue::guest_memory::MemoryError> {
        self.check_range(address, buffer.len() as u64)?;
        // SAFETY: inside the guest RAM allocation (checked above), which stays mapped in this
        // task for its lifetime; the vCPU is stopped while the VMM handles devices.
        unsafe {
            core::ptr::copy_nonoverlapping(
                (self.base + address) as *const u8,
                buffer.as_mut_ptr(),
                buffer.len(),
            )
        };
        Ok(())
    }

    fn write(
        &mut self,
        address: u64,
        data: &[u8],
    ) -> Result<(), l4linux_glue::guest_memory::MemoryError> {
        self.check_range(address, data.len() as u64)?;
        // SAFETY: as for `read`.
        unsafe {
            core::ptr::copy_nonoverlapping(
                data.as_ptr(),
                (self.base + address) as *mut u8,
                data.len(),
            )
        };
        Ok(())
    }

    fn check_range(
        &self,
        address: u64,
        length: u64,
    ) -> Result<(), l4linux_glue::guest_memory::MemoryError> {
        match address.checked_add(length) {
            Some(end) if end <= self.size && address < self.size.max(1) => Ok(()),
            _ => Err(l4linux_glue::guest_memory::MemoryError::OutOfRange { address, length }),
        }
    }

    fn with_bytes(
        &self,
        address: u64,
        length: usize,
        f: &mut dyn FnMut(&[u8]),
    ) -> Result<(), l4linux_glue::guest_memory::MemoryError> {
        self.check_range(address, length as u64)?;
        // SAFETY: inside the guest RAM allocation (checked above), which stays mapped in this
        // task for its lifetime; the vCPU is stopped while the VMM handles devices, so nothing
        // writes these bytes while the slice lives, and the VMM holds no other reference to
        // guest RAM meanwhile (every access goes through this view, one at a time).
        let bytes =
            unsafe { core::slice::from_raw_parts((self.base + address) as *const u8, length) };
        f(bytes);
        Ok(())
    }

    fn with_bytes_mut(
        &mut self,
        address: u64,
        length: usize,
        f: &mut dyn FnMut(&mut [u8]),
    ) -> Result<(), l4linux_glue::guest_memory::MemoryError> {
        self.check_range(address, length as u64)?;
        // SAFETY: as for `with_bytes`; `&mut self` makes this the only access meanwhile.
        let bytes =
            unsafe { core::slice::from_raw_parts_mut((self.base + address) as *mut u8, length) };
        f(bytes);
        Ok(())
    }
}

/// A VM with one vCPU and its RAM.
pub struct Vm {
    /// The VM's capability slot (flexpages are mapped into it).
    pub vm: u64,
    /// The vCPU's capability slot.
    pub vcpu: u64,
    /// Its RAM at guest-physical 0.
    pub ram: Ram,
}

/// A VM with `ram_size` bytes of RAM at guest-physical 0; its guest page faults go to the
/// thread or gate in slot `pager` (or, with `NO_CAP`, to the VMM as exits).
pub fn create_vm(ram_size: u64, pager: u64) -> Result<Vm, Error> {
    let vm = alloc_slot();
    sys::factory_create(slots::FACTORY, ObjectKind::Vm, vm, pager, 0)?;
    let vcpu = alloc_slot();
    sys::factory_create(slots::FACTORY, ObjectKind::Vcpu, vcpu, vm, 0)?;
    let ram = Ram::new(ram_size).map_err(|e| {
        crate::say!("no guest RAM ({} KiB): {e}", ram_size >> 10);
        Error::OutOfMemory
    })?;
    let before = sys::quota(slots::FACTORY).map(|q| q.used);
    sys::map(
        vm,
        Fpage::memory(ram.base, ram_size.trailing_zeros(), Fpage::RWX),
        0,
        MapFlags::empty(),
    )?;
    // What the nested page tables and mapping nodes of guest RAM cost (a 1 GiB page: one
    // node and one table; 2 MiB pages: a node each and a table per GiB).
    if let (Ok(before), Ok(after)) = (before, sys::quota(slots::FACTORY).map(|q| q.used)) {
        if ram_size >= 16 << 20 {
            crate::say!(
                "guest RAM {} MiB mapped into the VM with {} KiB of kernel memory",
                ram_size >> 20,
                after.saturating_sub(before).div_ceil(1024)
            );
        }
    }
    Ok(Vm { vm, vcpu, ram })
}

/// Identity page tables for the first 4 GiB (2 MiB pages) at 0x1000..0x7000.
pub fn identity_tables(ram: &Ram) {
    let mut tables = [0u64; 512 * 6];
    tables[0] = 0x2000 | 7; // PML4[0] -> PDPT
    for i in 0..4 {
        tables[512 + i] = (0x3000 + i as u64 * 0x1000) | 7; // PDPT[i] -> PD i
    }
    for i in 0..2048u64 {
        tables[1024 + i as usize] = (i << 21) | 0x87; // 2 MiB pages, identity
    }
    let bytes: alloc::vec::Vec<u8> = tables[..512 * 6]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
    ram.write(0x1000, &bytes);
}

/// The guest-physical address of guest-virtual `va`, through the guest's page tables as of
/// the exit state `w`; `None` if it is not mapped.
fn guest_physical(vm: &Vm, w: &[u64; 64], va: u64) -> Option<u64> {
    let mode = l4linux_glue::guest_paging::PagingMode {
        cr0: w[state::CR0],
        cr4: w[state::CR4],
        efer: w[state::EFER],
    };
    l4linux_glue::guest_paging::translate(mode, w[state::CR3], va, &mut |a| vm.ram.read_u64(a)).ok()
}

/// Bytes from `done` on of a `length`-byte guest-virtual range at `address` that lie in the
/// same page.
fn in_page(address: u64, done: usize, length: usize) -> usize {
    let va = address.wrapping_add(done as u64);
    ((PAGE_SIZE - (va & (PAGE_SIZE - 1))) as usize).min(length - done)
}

/// Copy `out.len()` bytes from guest-virtual `address` (translated through the guest's page
/// tables as of the exit state `w`, page by page); false if any page is not mapped.
pub fn read_guest_virtual(vm: &Vm, w: &[u64; 64], address: u64, out: &mut [u8]) -> bool {
    let mut done = 0;
    while done < out.len() {
        let Some(gpa) = guest_physical(vm, w, address.wrapping_add(done as u64)) else {
            return false;
        };
        let chunk = in_page(address, done, out.len());
        if !vm.ram.read_bytes(gpa, &mut out[done..done + chunk]) {
            return false;
        }
        done += chunk;
    }
    true
}

/// Copy `bytes` (at most a page: they span at most two) to guest-virtual `address`
/// (translated as for [`read_guest_virtual`]); false, with nothing written, if any page is not
/// mapped or `bytes` is longer. (The guest's page permissions are not checked: this serves
/// `INS`, which the VMM completes for the guest.)
pub fn write_guest_virtual(vm: &Vm, w: &[u64; 64], address: u64, bytes: &[u8]) -> bool {
    if bytes.len() as u64 > PAGE_SIZE {
        return false;
    }
    let mut pieces = [(0u64, 0usize, 0usize); 2];
    let mut count = 0;
    let mut done = 0;
    while done < bytes.len() {
        let Some(gpa) = guest_physical(vm, w, address.wrapping_add(done as u64)) else {
            return false;
        };
        let chunk = in_page(address, done, bytes.len());
        if !vm.ram.contains(gpa, chunk as u64) {
            return false;
        }
        pieces[count] = (gpa, done, chunk);
        count += 1;
        done += chunk;
    }
    for &(gpa, at, chunk) in &pieces[..count] {
        vm.ram.write(gpa, &bytes[at..at + chunk]);
    }
    true
}

/// The 15 bytes at the guest's RIP (translated as for [`read_guest_virtual`]; zero beyond
/// RAM), for decoding the instruction of an exit.
pub fn fetch_instruction(vm: &Vm, w: &[u64; 64]) -> Option<[u8; 15]> {
    let gpa = guest_physical(vm, w, w[state::RIP])?;
    let mut bytes = [0u8; 15];
    let available = vm.ram.size.saturating_sub(gpa).min(15) as usize;
    vm.ram
        .read_bytes(gpa, &mut bytes[..available])
        .then_some(bytes)
}
