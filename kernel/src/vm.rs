//! Virtual machines (SVM with nested paging) as kernel objects. A VM is a guest-physical
//! address space whose nested page tables the kernel owns and that is populated only by
//! mapping memory flexpages into it (recorded in the mapping database like any mapping, so
//! `unmap` revokes guest memory recursively). A vCPU is a VMCB plus the guest registers; a VMM
//! thread runs it with `VcpuRun`, which returns at every exit the kernel does not handle
//! itself, with the state in the thread's UTCB (the state changes travel back the same way).

use crate::arch::x86_64::paging::{phys_to_virt, AddressSpace, PAGE_4K};
use crate::arch::x86_64::svm::{self, intercept, vmcb, GuestRegisters};
use crate::ipc::utcb;
use crate::kernel::Kernel;
use crate::memory::FrameSource;
use crate::object::{QuotaId, TaskId, ThreadId};
use l4_abi::vcpu::{self as state, exit};
use l4_abi::{Error, Fpage};

pub use crate::object::{VcpuId, VmId};

/// Per-CPU SVM state, set up at boot when the CPU supports SVM with nested paging.
pub struct Svm {
    /// Host VMCB for `vmsave`/`vmload` of the host's hidden state.
    pub host_vmcb: u64,
    /// I/O permission map (12 KiB, all ports intercepted).
    pub iopm: u64,
    /// MSR permission map (8 KiB, all MSRs intercepted).
    pub msrpm: u64,
    /// The guests' address-space identifiers: each live VM holds one; a VM's death frees it.
    pub asids: kernel_core::AsidAllocator,
    /// Whether XCR0 and the extended state are switched between host and guests.
    pub xcr0_switching: bool,
    /// An all-zero XSAVE area: restoring it clears the extended registers.
    pub zero_area: u64,
    /// The state components saved and restored around guest runs (all the CPU supports whose
    /// XSAVE image fits a page, at least x87 and SSE).
    pub xstate: u64,
}

/// Kernel memory of a VM object with the root of its nested page tables.
pub const VM_BYTES: u64 =
    crate::memory::object_charge(core::mem::size_of::<Vm>()) + crate::memory::FRAME_BYTES;
/// Kernel memory of a vCPU object with its VMCB and extended-state frames.
pub const VCPU_BYTES: u64 =
    crate::memory::object_charge(core::mem::size_of::<Vcpu>()) + 2 * crate::memory::FRAME_BYTES;

/// A virtual machine.
pub struct Vm {
    /// Nested page tables (guest-physical to host-physical).
    pub npt: AddressSpace,
    /// Its ASID.
    pub asid: u32,
    /// The quota its page tables and mapping nodes are charged to.
    pub quota: QuotaId,
    /// Set when the VM is new (its ASID may be reused) or a guest mapping was removed: flush
    /// the guest TLB on the next run.
    pub flush: bool,
    /// Where guest page faults go (`None`: to the VMM as exits).
    pub pager: Option<crate::object::Capability>,
    /// The task that created it (the VM dies with it).
    pub owner: TaskId,
    /// Bytes charged to `quota` for its nested page tables and mapping nodes (the object
    /// itself is charged separately).
    pub charged: u64,
    /// Capabilities that name it plus its vCPUs (each holds one): it is destroyed when the
    /// count drops to zero.
    pub references: u64,
}

/// A virtual CPU.
pub struct Vcpu {
    /// Its VM.
    pub vm: VmId,
    /// Physical address of its VMCB.
    pub vmcb: u64,
    /// Guest registers outside the VMCB.
    pub registers: GuestRegisters,
    /// An event interrupted by the last exit, to re-inject unless the VMM injects another.
    pub reinject: u64,
    /// The guest's XCR0 (x87 only until the guest changes it).
    pub xcr0: u64,
    /// The guest's x87/SSE/AVX state between runs (an XSAVE area frame; zeros: initial state).
    pub fpu: u64,
    /// The guest's DR0-DR3 between runs (VMRUN switches only DR6 and DR7, in the VMCB).
    pub debug: [u64; 4],
    /// The task that created it (the vCPU dies with it).
    pub owner: TaskId,
    /// The quota it was charged to.
    pub quota: QuotaId,
    /// Capabilities that name it (it is destroyed when the last one goes).
    pub references: u64,
}

/// Set up SVM if the CPU has it (called at boot); `None` otherwise.
pub fn init(frames: &mut crate::memory::Pool) -> Option<Svm> {
    if !svm::supported() {
        crate::info!("SVM with nested paging not available: VM objects are not supported");
        return None;
    }
    let host_save = frames.allocate_zeroed()?;
    let host_vmcb = frames.allocate_zeroed()?;
    let zero_area = frames.allocate_zeroed()?;
    init_xsave_area(zero_area);
    let iopm = frames.allocate_contiguous(3, 1)?;
    let msrpm = frames.allocate_contiguous(2, 1)?;
    for (base, pages) in [(iopm, 3), (msrpm, 2)] {
        // SAFETY: freshly allocated kernel frames in the direct map.
        unsafe {
            core::ptr::write_bytes(
                phys_to_virt(base) as *mut u8,
                0xff,
                pages * PAGE_4K as usize,
            )
        };
    }
    // MSRs that VMRUN/VMLOAD/VMSAVE keep per guest (the world switch saves and restores the
    // host's around each run): the guest accesses them directly. Everything else exits.
    for msr in PASSTHROUGH_MSRS {
        let (region, index) = match msr {
            0..=0x1fff => (0, msr),
            0xc000_0000..=0xc000_1fff => (0x800, msr - 0xc000_0000),
            _ => continue,
        };
        let bit = index as usize * 2;
        let byte = phys_to_virt(msrpm) as usize + region + bit / 8;
        // SAFETY: inside the MSR permission map allocated above (two pages); clears the read
        // and write intercept bits of this MSR.
        unsafe { *(byte as *mut u8) &= !(0b11 << (bit % 8)) };
    }
    svm::enable(host_save);
    // DR0-DR3 are 0 outside guest runs (whatever the boot loader left).
    svm::take_debug_registers();
    let xcr0_switching = svm::enable_xcr0_switching();
    crate::info!(
        "SVM enabled with nested paging{}",
        if xcr0_switching {
            ", XCR0 switched per guest"
        } else {
            ""
        }
    );
    Some(Svm {
        host_vmcb,
        iopm,
        msrpm,
        // At most 2^16 (a bitmap of 8 KiB), however many the CPU has.
        asids: kernel_core::AsidAllocator::new(svm::asid_count().min(1 << 16)),
        xcr0_switching,
        zero_area,
        xstate: svm::saved_xstate(),
    })
}

/// Make a zeroed XSAVE area the initial state: all components absent (XSTATE_BV = 0) and
/// MXCSR at its reset value (it is loaded whenever SSE state is restored).
fn init_xsave_area(frame: u64) {
    write(frame, 24, 0x1f80u32);
}

fn write<T: Copy>(vmcb_frame: u64, offset: usize, value: T) {
    // SAFETY: the VMCB is a kernel-owned frame in the direct map; offsets are inside it.
    unsafe {
        core::ptr::write_unaligned((phys_to_virt(vmcb_frame) + offset as u64) as *mut T, value)
    }
}

fn read<T: Copy>(vmcb_frame: u64, offset: usize) -> T {
    // SAFETY: as for `write`.
    unsafe { core::ptr::read_unaligned((phys_to_virt(vmcb_frame) + offset as u64) as *const T) }
}

/// Create a VM charged to `quota`, with guest page faults going to `pager`. Each VM holds one
/// of the CPU's ASIDs while it lives: when all are taken, creation fails with `OutOfMemory`.
pub fn create_vm(
    k: &mut Kernel,
    quota: QuotaId,
    pager: Option<crate::object::Capability>,
    owner: TaskId,
) -> Result<VmId, Error> {
    if k.svm.is_none() {
        return Err(Error::NotSupported);
    }
    crate::memory::reserve_kept()?;
    // Room to queue every live VM for destruction, so that dropping one never allocates.
    let wanted = k.vms.len() + k.dying_vms.len() + 1;
    k.dying_vms
        .try_reserve(wanted.saturating_sub(k.dying_vms.len()))
        .map_err(|_| Error::OutOfMemory)?;
    let q = k.quotas.get_mut(quota).ok_or(Error::InvalidCapability)?;
    q.charge(VM_BYTES).map_err(|_| Error::OutOfMemory)?;
    let asid = k.svm.as_mut().and_then(|svm| svm.asids.allocate());
    let root = asid.and_then(|_| k.frames.allocate_zeroed());
    let (Some(asid), Some(root)) = (asid, root) else {
        if let (Some(asid), Some(svm)) = (asid, k.svm.as_mut()) {
            svm.asids.free(asid);
        }
        k.quotas.get_mut(quota).expect("quota").refund(VM_BYTES);
        return Err(Error::OutOfMemory);
    };
    let vm = Vm {
        npt: AddressSpace { root },
        asid,
        quota,
        // The ASID may have served a VM that died: no TLB entry of that one may survive into
        // this one (flush-by-ASID is missing under QEMU, so the first run flushes all).
        flush: true,
        pager,
        owner,
        charged: 0,
        references: 0,
    };
    k.vms.try_insert(vm).map_err(|vm| {
        k.frames.free_frame(vm.npt.root);
        if let Some(svm) = k.svm.as_mut() {
            svm.asids.free(vm.asid);
        }
        k.quotas.get_mut(quota).expect("quota").refund(VM_BYTES);
        Error::OutOfMemory
    })
}

/// Create a vCPU of `vm` charged to `quota`, with default intercepts (everything that could
/// reach host state) and a 32-bit flat protected-mode reset state.
pub fn create_vcpu(
    k: &mut Kernel,
    vm: VmId,
    quota: QuotaId,
    owner: TaskId,
) -> Result<VcpuId, Error> {
    let (iopm, msrpm) = match k.svm.as_ref() {
        Some(svm) => (svm.iopm, svm.msrpm),
        None => return Err(Error::NotSupported),
    };
    let (asid, npt) = {
        let v = k.vms.get(vm).ok_or(Error::InvalidCapability)?;
        (v.asid, v.npt.root)
    };
    let bytes = VCPU_BYTES;
    crate::memory::reserve_kept()?;
    k.quotas
        .get_mut(quota)
        .ok_or(Error::InvalidCapability)?
        .charge(bytes)
        .map_err(|_| Error::OutOfMemory)?;
    let Some(frame) = k.frames.allocate_zeroed() else {
        k.quotas.get_mut(quota).expect("quota").refund(bytes);
        return Err(Error::OutOfMemory);
    };
    let Some(fpu) = k.frames.allocate_zeroed() else {
        k.frames.free_frame(frame);
        k.quotas.get_mut(quota).expect("quota").refund(bytes);
        return Err(Error::OutOfMemory);
    };
    init_xsave_area(fpu);
    let misc1 = intercept::INTR
        | intercept::NMI
        | intercept::SMI
        | intercept::INIT
        | intercept::CPUID
        | intercept::RSM
        | intercept::INVD
        | intercept::HLT
        | intercept::INVLPGA
        | intercept::IOIO
        | intercept::MSR
        | intercept::TASK_SWITCH
        | intercept::SHUTDOWN;
    write(frame, vmcb::INTERCEPT_MISC1, misc1);
    write(frame, vmcb::INTERCEPT_MISC2, intercept::MISC2_ALL);
    write(frame, vmcb::IOPM_BASE, iopm);
    write(frame, vmcb::MSRPM_BASE, msrpm);
    write(frame, vmcb::ASID, asid);
    write(frame, vmcb::TLB_CONTROL, 1u8);
    // V_INTR_MASKING: the guest's IF masks only virtual interrupts.
    write(frame, vmcb::V_INTR, 1u64 << 24);
    write(frame, vmcb::NP_ENABLE, 1u64);
    write(frame, vmcb::N_CR3, npt);
    write(frame, vmcb::G_PAT, 0x0007_0406_0007_0406u64);
    write(frame, vmcb::EFER, svm::EFER_SVME);
    write(frame, vmcb::CR0, 0x11u64); // PE | ET
    write(frame, vmcb::RFLAGS, 2u64);
    write(frame, vmcb::DR6, 0xffff_0ff0u64);
    write(frame, vmcb::DR7, 0x400u64);
    let flat_code = (0x08u16, 0xc9bu16, 0xffff_ffffu32, 0u64);
    let flat_data = (0x10u16, 0xc93u16, 0xffff_ffffu32, 0u64);
    for (offset, seg) in [
        (vmcb::CS, flat_code),
        (vmcb::SS, flat_data),
        (vmcb::DS, flat_data),
        (vmcb::ES, flat_data),
        (vmcb::FS, flat_data),
        (vmcb::GS, flat_data),
        (vmcb::TR, (0, 0x8b, 0xffff, 0)),
        (vmcb::LDTR, (0, 0x82, 0xffff, 0)),
    ] {
        write_segment(frame, offset, seg);
    }
    let vcpu = Vcpu {
        vm,
        vmcb: frame,
        registers: GuestRegisters::default(),
        reinject: 0,
        xcr0: 1,
        fpu,
        debug: [0; 4],
        owner,
        quota,
        references: 0,
    };
    let id = k.vcpus.try_insert(vcpu).map_err(|vcpu| {
        k.frames.free_frame(vcpu.vmcb);
        k.frames.free_frame(vcpu.fpu);
        k.quotas.get_mut(quota).expect("quota").refund(bytes);
        Error::OutOfMemory
    })?;
    // The vCPU holds a reference on its VM.
    if let Some(v) = k.vms.get_mut(vm) {
        v.references += 1;
    }
    Ok(id)
}

fn write_segment(
    frame: u64,
    offset: usize,
    (selector, attributes, limit, base): (u16, u16, u32, u64),
) {
    write(frame, offset, selector);
    write(frame, offset + 2, attributes);
    write(frame, offset + 4, limit);
    write(frame, offset + 8, base);
}

/// Destroy vCPU `vcpu` (removed from its arena: its last capability went, or its creator is
/// being destroyed): its VMCB and extended-state area are freed, its quota refunded, and its
/// reference on its VM dropped (which may destroy the VM).
pub fn destroy_vcpu(k: &mut Kernel, vcpu: &Vcpu) {
    k.frames.free_frame(vcpu.vmcb);
    k.frames.free_frame(vcpu.fpu);
    if let Some(q) = k.quotas.get_mut(vcpu.quota) {
        q.refund(VCPU_BYTES);
    }
    crate::lifetime::release_quota(k, vcpu.quota);
    crate::lifetime::drop_vm_reference(k, vcpu.vm);
}

/// Destroy VM `id` (removed from its arena as `vm`: no capability and no vCPU names it any
/// more, or its creator is being destroyed): it is queued, and [`destroy_vm_step`] removes
/// its nodes from the mapping database (they were derived from the VMM's memory; nothing is
/// derived from them), frees its nested page tables, its ASID and refunds its quota, in
/// bounded steps.
pub fn destroy_vm(k: &mut Kernel, id: VmId, vm: alloc::boxed::Box<Vm>) {
    // `create_vm` reserved room for every live VM, so this does not allocate.
    k.dying_vms.push(DyingVm {
        id,
        vm,
        stage: VmDeath::Mappings,
    });
}

/// A VM taken out of the arena (no capability or vCPU reaches it any more) whose mapping
/// nodes and nested page tables are freed in bounded steps ([`destroy_vm_step`]); it keeps its
/// charge and its ASID until the last step.
pub struct DyingVm {
    /// Its id (the key of its mapping nodes).
    pub id: VmId,
    /// The VM.
    pub vm: alloc::boxed::Box<Vm>,
    /// How far its destruction got.
    pub stage: VmDeath,
}

/// The stages of a VM's destruction.
#[derive(Clone, Copy, Debug)]
pub enum VmDeath {
    /// Its nodes leave the mapping database (nothing is derived from them).
    Mappings,
    /// Its nested page tables are freed, from this 1 GiB slot on.
    Tables(u64),
}

/// One step of destroying the first dying VM, for about `budget` units (those of
/// `syscall::STEP_UNITS`); called with the task reaping at the end of every syscall and at
/// every timer tick while any VM is dying.
pub fn destroy_vm_step(k: &mut Kernel, budget: usize) {
    let mut budget = budget;
    loop {
        let Some(dying) = k.dying_vms.first_mut() else {
            return;
        };
        match dying.stage {
            VmDeath::Mappings => {
                let space = crate::map::Space::Vm(dying.id);
                // A mapping-database unit is about as much work as 16 of ours, and removing
                // a node about 8 of those; the removed nodes stay charged until the last
                // step refunds everything at once.
                let (removed, done) = k
                    .memory_db
                    .remove_space_bounded(space, (budget / 16).max(1));
                budget = budget.saturating_sub(16 + removed.len() * 128);
                if !done {
                    return;
                }
                if let Some(d) = k.dying_vms.first_mut() {
                    d.stage = VmDeath::Tables(0);
                }
                if budget == 0 {
                    return;
                }
            }
            VmDeath::Tables(mut cursor) => {
                // A frame freed is about 4 units.
                let npt = dying.vm.npt;
                let frames = (budget / 4).max(1) as u64;
                if !npt.destroy_step(&mut cursor, frames, &mut k.frames) {
                    if let Some(d) = k.dying_vms.first_mut() {
                        d.stage = VmDeath::Tables(cursor);
                    }
                    return;
                }
                let dying = k.dying_vms.remove(0);
                if let Some(svm) = k.svm.as_mut() {
                    svm.asids.free(dying.vm.asid);
                }
                // The nodes, the tables (the root too) and the object itself.
                if let Some(q) = k.quotas.get_mut(dying.vm.quota) {
                    q.refund(dying.vm.charged + VM_BYTES);
                }
                crate::lifetime::release_quota(k, dying.vm.quota);
                return;
            }
        }
    }
}

/// Where each segment register of the transfer state lives in the VMCB.
const SEGMENT_REGISTERS: [(usize, usize); 8] = [
    (state::CS, vmcb::CS),
    (state::SS, vmcb::SS),
    (state::DS, vmcb::DS),
    (state::ES, vmcb::ES),
    (state::FS, vmcb::FS),
    (state::GS, vmcb::GS),
    (state::TR, vmcb::TR),
    (state::LDTR, vmcb::LDTR),
];
/// Where the descriptor-table registers live.
const TABLE_REGISTERS: [(usize, usize); 2] = [(state::GDTR, vmcb::GDTR), (state::IDTR, vmcb::IDTR)];

/// SYSENTER_CS/ESP/EIP, STAR, LSTAR, CSTAR, SFMASK, FS_BASE, GS_BASE, KERNEL_GS_BASE.
const PASSTHROUGH_MSRS: [u32; 10] = [
    0x174,
    0x175,
    0x176,
    0xc000_0081,
    0xc000_0082,
    0xc000_0083,
    0xc000_0084,
    0xc000_0100,
    0xc000_0101,
    0xc000_0102,
];

/// CR4.OSXSAVE.
const CR4_OSXSAVE: u64 = 1 << 18;
/// Event injection of #UD: valid, exception, vector 6.
const INJECT_UD: u64 = state::event::UD;
/// Event injection of #GP(0): valid, error code (0), exception, vector 13.
const INJECT_GP0: u64 = state::event::GP0;

/// Load the state groups in `mask` from `words` into the vCPU, refusing state the kernel does
/// not allow (it cannot count on the CPU to reject inconsistent state).
fn load_state(vcpu: &mut Vcpu, words: &[u64; 64], mask: u64) -> Result<(), Error> {
    let frame = vcpu.vmcb;
    if mask & state::CONTROL != 0 {
        let (cr0, cr4, efer) = (words[state::CR0], words[state::CR4], words[state::EFER]);
        if !kernel_core::vcpu_state::control_valid(cr0, cr4, efer) {
            return Err(Error::InvalidArgument);
        }
        write(frame, vmcb::CR0, cr0);
        write(frame, vmcb::CR2, words[state::CR2]);
        write(frame, vmcb::CR3, words[state::CR3] & 0x000f_ffff_ffff_ffff);
        write(frame, vmcb::CR4, cr4);
        write(frame, vmcb::EFER, efer | svm::EFER_SVME);
    }
    if mask & state::SEGMENTS != 0 {
        for (index, offset) in SEGMENT_REGISTERS {
            let w = words[index];
            write_segment(
                frame,
                offset,
                (
                    w as u16,
                    (w >> 16) as u16 & 0xfff,
                    (w >> 32) as u32,
                    words[index + 1],
                ),
            );
        }
        for (index, offset) in TABLE_REGISTERS {
            write(frame, offset + 4, words[index] as u32);
            write(frame, offset + 8, words[index + 1]);
        }
        let ss_attributes = (words[state::SS] >> 16) as u16;
        write(frame, vmcb::CPL, ((ss_attributes >> 5) & 3) as u8);
    }
    if mask & state::GPRS != 0 {
        write(frame, vmcb::RIP, words[state::RIP]);
        write(frame, vmcb::RSP, words[state::RSP]);
        // The defined flags; reserved bit 1 set, the other reserved bits clear.
        write(
            frame,
            vmcb::RFLAGS,
            kernel_core::vcpu_state::guest_rflags(words[state::RFLAGS]),
        );
        write(frame, vmcb::RAX, words[state::RAX]);
        let r = &mut vcpu.registers;
        let g = &words[state::RBX..state::RBX + 14];
        (r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp) = (g[0], g[1], g[2], g[3], g[4], g[5]);
        (r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15) =
            (g[6], g[7], g[8], g[9], g[10], g[11], g[12], g[13]);
    }
    if mask & state::EVENTS != 0 {
        let event = words[state::EVENT_INJECT];
        if !kernel_core::vcpu_state::event_valid(event) {
            return Err(Error::InvalidArgument);
        }
        write(frame, vmcb::EVENT_INJECT, event);
        if event != 0 {
            vcpu.reinject = 0;
        }
        let irq = words[state::VIRTUAL_IRQ];
        let mut v_intr: u64 = read(frame, vmcb::V_INTR);
        v_intr &= !((1 << 8) | (0xff << 32) | (0xf << 16));
        if irq & (1 << 63) != 0 {
            v_intr |= (1 << 8) | ((irq & 0xff) << 32) | (0xf << 16);
        }
        write(frame, vmcb::V_INTR, v_intr);
        // The VMM may end an interrupt shadow (e.g. after emulating the HLT that `sti` shadowed).
        let shadow: u64 = read(frame, vmcb::INTERRUPT_SHADOW);
        write(
            frame,
            vmcb::INTERRUPT_SHADOW,
            (shadow & !1) | (words[state::INTERRUPT_SHADOW] & 1),
        );
    }
    Ok(())
}

fn store_state(vcpu: &Vcpu, words: &mut [u64; 64]) {
    let frame = vcpu.vmcb;
    words[state::EXIT_CODE] = read::<u64>(frame, vmcb::EXIT_CODE) & 0xffff_ffff;
    words[state::EXIT_INFO1] = read(frame, vmcb::EXIT_INFO1);
    words[state::EXIT_INFO2] = read(frame, vmcb::EXIT_INFO2);
    words[state::EXIT_INT_INFO] = read(frame, vmcb::EXIT_INT_INFO);
    words[state::RIP] = read(frame, vmcb::RIP);
    words[state::RSP] = read(frame, vmcb::RSP);
    words[state::RFLAGS] = read(frame, vmcb::RFLAGS);
    words[state::RAX] = read(frame, vmcb::RAX);
    let r = &vcpu.registers;
    words[state::RBX..state::RBX + 14].copy_from_slice(&[
        r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14,
        r.r15,
    ]);
    words[state::CR0] = read(frame, vmcb::CR0);
    words[state::CR2] = read(frame, vmcb::CR2);
    words[state::CR3] = read(frame, vmcb::CR3);
    words[state::CR4] = read(frame, vmcb::CR4);
    words[state::EFER] = read(frame, vmcb::EFER);
    words[state::EVENT_INJECT] = read(frame, vmcb::EVENT_INJECT);
    let v_intr: u64 = read(frame, vmcb::V_INTR);
    words[state::VIRTUAL_IRQ] = if v_intr & (1 << 8) != 0 {
        (1 << 63) | ((v_intr >> 32) & 0xff)
    } else {
        0
    };
    words[state::INTERRUPT_SHADOW] = read::<u64>(frame, vmcb::INTERRUPT_SHADOW) & 1;
    for (index, offset) in SEGMENT_REGISTERS {
        words[index] = state::segment(
            read(frame, offset),
            read(frame, offset + 2),
            read(frame, offset + 4),
        );
        words[index + 1] = read(frame, offset + 8);
    }
    for (index, offset) in TABLE_REGISTERS {
        words[index] = read::<u32>(frame, offset + 4) as u64;
        words[index + 1] = read(frame, offset + 8);
    }
}

/// Send the nested page fault of `vcpu` to its VM's pager, in the name of `caller` (which
/// re-issues its `VcpuRun` once the fault is resolved). False if the VM has no usable pager.
fn guest_fault_to_pager(k: &mut Kernel, caller: ThreadId, vm: VmId, vcpu: VcpuId) -> bool {
    let Some(Ok((pager, badge))) = k
        .vms
        .get(vm)
        .and_then(|v| v.pager)
        .map(|cap| k.ipc_target(cap))
    else {
        return false;
    };
    let frame = k.vcpus.get(vcpu).expect("vcpu").vmcb;
    let (gpa, error, rip): (u64, u64, u64) = (
        read(frame, vmcb::EXIT_INFO2),
        read(frame, vmcb::EXIT_INFO1),
        read(frame, vmcb::RIP),
    );
    let thread = k.thread(caller);
    thread.frame.rip -= 2;
    thread.frame.rsi = 0;
    thread.fault_address = gpa;
    thread.guest_fault = Some((vm, vcpu));
    let mut words = [0; crate::thread::KERNEL_MESSAGE_WORDS];
    words[..3].copy_from_slice(&[gpa, error, rip]);
    thread.kernel_message = Some(crate::thread::KernelMessage {
        tag: l4_abi::MessageTag::new(l4_abi::LABEL_GUEST_PAGE_FAULT, 3, 0),
        words,
        after: crate::thread::AfterDelivery::AwaitFaultReply,
    });
    let sent = crate::ipc::send(
        k,
        caller,
        pager,
        badge,
        true,
        l4_abi::Timeout::INFINITE,
        l4_abi::Timeout::INFINITE,
    );
    if sent.is_err() {
        let thread = k.thread(caller);
        thread.kernel_message = None;
        thread.guest_fault = None;
        thread.frame.rip += 2;
        return false;
    }
    true
}

/// The VM pager's answer to the guest page fault of `thread`'s vCPU: a map item maps into the
/// VM and the vCPU run is re-issued; anything else returns the exit to the VMM.
pub fn apply_guest_fault_reply(
    k: &mut Kernel,
    pager: ThreadId,
    thread: ThreadId,
    vm: VmId,
    vcpu: VcpuId,
    message: &crate::ipc::Message,
) {
    let tag = message.tag;
    let gpa = k.thread(thread).fault_address;
    let mut mapped = false;
    if tag.label() == 0 && tag.typed() > 0 {
        let item = l4_abi::MapItem {
            control: message.words[tag.untyped()],
            fpage: Fpage(message.words[tag.untyped() + 1]),
        };
        let (source, destination) =
            crate::map::place_window(Fpage::memory(0, 46, Fpage::RWX), item);
        if let Some(from) = k.task_of(pager) {
            let to = crate::map::Space::Vm(vm);
            mapped = crate::map::map_memory(k, from, source, to, destination, false).is_ok()
                && k.vms.get(vm).is_some_and(|v| v.npt.lookup(gpa).is_some());
        }
    }
    if !mapped {
        // Hand the exit to the VMM: its VcpuRun returns the nested page fault.
        let words = &mut utcb(k, thread).mr;
        if let Some(v) = k.vcpus.get(vcpu) {
            store_state(v, words);
        }
        let f = &mut k.thread(thread).frame;
        f.rip += 2;
        f.rax = 0;
        f.rdi = exit::NPF;
    }
    k.wake(thread);
}

/// The exit `VcpuRun` of `caller` takes instead of entering the guest, if any: a message
/// waiting for the caller ([`exit::MESSAGE`], checked first), or `deadline` (a TSC value; 0:
/// none) reached ([`exit::DEADLINE`]). Without pending IRQs or queued senders this is two
/// loads and, with a deadline, an `rdtsc`.
fn software_exit(k: &mut Kernel, caller: ThreadId, deadline: u64) -> Option<u64> {
    if crate::irq::pending_for(k, caller).is_some() || crate::ipc::sender_waiting(k, caller) {
        return Some(exit::MESSAGE);
    }
    if deadline != 0 && crate::arch::x86_64::cpu::rdtsc() >= deadline {
        return Some(exit::DEADLINE);
    }
    None
}

/// `VcpuRun` of thread `caller` on `vcpu`, loading `mask` first, until `deadline` (a TSC
/// value; 0: none). Returns with the exit in the caller's UTCB and the exit code in its `rdi`,
/// or an error; a physical interrupt makes the caller re-issue the call (with an empty mask,
/// the same deadline) after the kernel handled it.
pub fn run(
    k: &mut Kernel,
    caller: ThreadId,
    vcpu_id: VcpuId,
    mask: u64,
    deadline: u64,
) -> Result<(), Error> {
    let (host_vmcb, xcr0_switching, zero_area, xstate) = k
        .svm
        .as_ref()
        .map(|s| (s.host_vmcb, s.xcr0_switching, s.zero_area, s.xstate))
        .ok_or(Error::NotSupported)?;
    if mask & !state::ALL != 0 {
        return Err(Error::InvalidArgument);
    }
    let words = &mut utcb(k, caller).mr;
    let vm_id = k.vcpus.get(vcpu_id).ok_or(Error::InvalidCapability)?.vm;
    if !k.vms.contains(vm_id) {
        return Err(Error::InvalidCapability);
    }
    let vcpu = k.vcpus.get_mut(vcpu_id).expect("vcpu");
    load_state(vcpu, words, mask)?;
    // The guest gets the registers: the owner's user state is saved first (the VMM thread
    // gets its own back when it next runs), and user threads run with the user XCR0.
    crate::fpu::surrender(k);
    let user_xcr0 = k.fpu.hardware.xcr0;
    loop {
        // Before every entry: a waiting message or the deadline returns to the VMM with the
        // state as it stands (a pending re-injection stays pending, and is reported).
        if let Some(code) = software_exit(k, caller, deadline) {
            let words = &mut utcb(k, caller).mr;
            let vcpu = k.vcpus.get(vcpu_id).expect("vcpu");
            store_state(vcpu, words);
            words[state::EXIT_CODE] = code;
            words[state::EXIT_INFO1] = 0;
            words[state::EXIT_INFO2] = 0;
            words[state::EXIT_INT_INFO] = vcpu.reinject;
            k.thread(caller).frame.rdi = code;
            return Ok(());
        }
        let flush = k
            .vms
            .get_mut(vm_id)
            .map(|v| core::mem::take(&mut v.flush))
            .unwrap_or(false);
        let vcpu = k.vcpus.get_mut(vcpu_id).expect("vcpu");
        let frame = vcpu.vmcb;
        // Flush the guest's TLB entries when a guest mapping was removed since the last run.
        write(frame, vmcb::TLB_CONTROL, if flush { 1u8 } else { 0u8 });
        let injected: u64 = read(frame, vmcb::EVENT_INJECT);
        if injected & (1 << 31) == 0 && vcpu.reinject & (1 << 31) != 0 {
            write(frame, vmcb::EVENT_INJECT, vcpu.reinject);
        }
        vcpu.reinject = 0;
        // SAFETY: the VMCB was built by `create_vcpu` and only changed through `load_state`;
        // its nested page tables hold only what the VMM mapped.
        unsafe {
            if xcr0_switching {
                // The guest's x87/SSE/AVX registers (nothing of another guest's), then its XCR0.
                svm::set_xcr0(xstate);
                svm::xrstor(vcpu.fpu, xstate);
                svm::set_xcr0(vcpu.xcr0);
            }
            // Its DR0-DR3 (DR6 and DR7 are in the VMCB); afterwards they are saved and
            // cleared, so no task or other guest sees them.
            svm::load_debug_registers(&vcpu.debug);
            svm::run(frame, &mut vcpu.registers, host_vmcb);
            vcpu.debug = svm::take_debug_registers();
            if xcr0_switching {
                // Save what the guest left (XCR0 as the CPU accepted it), clear the registers
                // so no task or other guest sees them, and return to the host's XCR0.
                vcpu.xcr0 = svm::xcr0();
                svm::set_xcr0(xstate);
                svm::xsave(vcpu.fpu, xstate);
                svm::xrstor(zero_area, xstate);
                svm::set_xcr0(user_xcr0);
            }
        }
        let code = read::<u64>(frame, vmcb::EXIT_CODE) & 0xffff_ffff;
        let interrupted: u64 = read(frame, vmcb::EXIT_INT_INFO);
        if interrupted & (1 << 31) != 0 {
            vcpu.reinject = interrupted;
        }
        write(frame, vmcb::EVENT_INJECT, 0u64);
        match code {
            exit::INTR | exit::NMI => {
                // A physical interrupt: let the kernel take it (it stays pending until interrupts
                // are enabled again, at the latest when a thread runs) and make the VMM's call
                // resume the guest afterwards, loading nothing new.
                let f = &mut k.thread(caller).frame;
                f.rip -= 2;
                f.rsi = 0;
                k.schedule()
            }
            exit::INVALID => {
                crate::warn!("VMRUN refused the vCPU state (invalid VMCB)");
                return Err(Error::InvalidArgument);
            }
            exit::NPF if guest_fault_to_pager(k, caller, vm_id, vcpu_id) => k.schedule(),
            exit::XSETBV if xcr0_switching => {
                // Handled here: XCR0 is switched per guest, so the guest may set its own
                // (within what the CPU supports). The intercept comes before the CPU's own
                // checks, so they are made here as the CPU makes them: #UD without the
                // guest's CR4.OSXSAVE, #GP(0) at CPL > 0, for an XCR other than XCR0 or an
                // invalid value.
                let vcpu = k.vcpus.get_mut(vcpu_id).expect("vcpu");
                let value =
                    (vcpu.registers.rdx << 32) | (read::<u64>(frame, vmcb::RAX) & 0xffff_ffff);
                let supported = svm::supported_xcr0();
                let osxsave = read::<u64>(frame, vmcb::CR4) & CR4_OSXSAVE != 0;
                let valid = read::<u8>(frame, vmcb::CPL) == 0
                    && vcpu.registers.rcx & 0xffff_ffff == 0
                    && value & 1 != 0
                    && value & !supported == 0
                    && (value & 4 == 0 || value & 2 != 0);
                if !osxsave {
                    write(frame, vmcb::EVENT_INJECT, INJECT_UD);
                } else if valid {
                    vcpu.xcr0 = value;
                    let rip: u64 = read(frame, vmcb::RIP);
                    write(frame, vmcb::RIP, rip + 3);
                } else {
                    write(frame, vmcb::EVENT_INJECT, INJECT_GP0);
                }
                continue;
            }
            _ => {
                let words = &mut utcb(k, caller).mr;
                let vcpu = k.vcpus.get(vcpu_id).expect("vcpu");
                store_state(vcpu, words);
                k.thread(caller).frame.rdi = code;
                return Ok(());
            }
        }
    }
}
