//! Virtual machines (SVM with nested paging) as kernel objects. A VM is a guest-physical
//! address space whose nested page tables the kernel owns and that is populated only by
//! mapping memory flexpages into it (recorded in the mapping database like any mapping, so
//! `unmap` revokes guest memory recursively). A vCPU is a VMCB plus the guest registers; a VMM
//! thread runs it with `VcpuRun`, which returns at every exit the kernel does not handle
//! itself, with the state in the thread's UTCB (the state changes travel back the same way).
//!
//! This file holds the objects (creation, destruction in steps); `vcpu_state.rs` the state
//! transfer through the UTCB, `run.rs` `VcpuRun` itself. SVM host set-up is in
//! `arch/x86_64/svm.rs`, guest page faults next to task page faults in `fault.rs`.

use crate::arch::x86_64::paging::{phys_to_virt, AddressSpace};
use crate::arch::x86_64::svm::{self, intercept, vmcb, GuestRegisters};
use crate::factory::{charge, refund};
use crate::kernel::Kernel;
use crate::memory::FrameSource;
use crate::object::{QuotaId, TaskId};
use l4_abi::Error;

pub use crate::object::{VcpuId, VmId};
pub(crate) use run::{keep_unstored, transfer_groups};
pub use run::{run, run_thread};
pub(crate) use vcpu_state::store_state;

mod run;
mod vcpu_state;

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
    /// Whether the guest has written DR0-DR3: until its first write (intercepted, then no
    /// longer) they are 0 for it as for the host, and runs skip loading and saving them.
    pub debug_live: bool,
    /// The task that created it (the vCPU dies with it).
    pub owner: TaskId,
    /// The quota it was charged to.
    pub quota: QuotaId,
    /// Capabilities that name it (it is destroyed when the last one goes).
    pub references: u64,
}

pub(crate) fn write<T: Copy>(vmcb_frame: u64, offset: usize, value: T) {
    // SAFETY: the VMCB is a kernel-owned frame in the direct map; offsets are inside it.
    unsafe {
        core::ptr::write_unaligned((phys_to_virt(vmcb_frame) + offset as u64) as *mut T, value)
    }
}

pub(crate) fn read<T: Copy>(vmcb_frame: u64, offset: usize) -> T {
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
    // Room to queue every live VM for destruction, so that dropping one never allocates.
    let wanted = k.vms.len() + k.dying_vms.len() + 1;
    k.dying_vms
        .try_reserve(wanted.saturating_sub(k.dying_vms.len()))
        .map_err(|_| Error::OutOfMemory)?;
    charge(k, quota, VM_BYTES)?;
    let asid = k.svm.as_mut().and_then(|svm| svm.asids.allocate());
    let root = asid.and_then(|_| k.frames.allocate_zeroed());
    let (Some(asid), Some(root)) = (asid, root) else {
        if let (Some(asid), Some(svm)) = (asid, k.svm.as_mut()) {
            svm.asids.free(asid);
        }
        refund(k, quota, VM_BYTES);
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
        refund(k, quota, VM_BYTES);
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
    charge(k, quota, bytes)?;
    let Some(frame) = k.frames.allocate_zeroed() else {
        refund(k, quota, bytes);
        return Err(Error::OutOfMemory);
    };
    let Some(fpu) = k.frames.allocate_zeroed() else {
        k.frames.free_frame(frame);
        refund(k, quota, bytes);
        return Err(Error::OutOfMemory);
    };
    svm::init_xsave_area(fpu);
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
    write(frame, vmcb::INTERCEPT_DR, intercept::DR0_3_WRITES);
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
        debug_live: false,
        owner,
        quota,
        references: 0,
    };
    let id = k.vcpus.try_insert(vcpu).map_err(|vcpu| {
        k.frames.free_frame(vcpu.vmcb);
        k.frames.free_frame(vcpu.fpu);
        refund(k, quota, bytes);
        Error::OutOfMemory
    })?;
    // The vCPU holds a reference on its VM.
    if let Some(v) = k.vms.get_mut(vm) {
        v.references += 1;
    }
    Ok(id)
}

pub(crate) fn write_segment(
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
    crate::fpu::forget_guest(k, vcpu.fpu);
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
/// `destroy::STEP_UNITS`); called with the task reaping at the end of every syscall and at
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
