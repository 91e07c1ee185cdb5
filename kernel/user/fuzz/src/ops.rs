//! The fuzzer's model of what it holds (objects by kind and slot, the memory it owns) and the
//! operations it draws: mostly on live objects and real memory, sometimes on garbage.

use crate::coverage::{self, syscall};
use crate::rng::Rng;
use crate::workers;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering::SeqCst};
use l4::abi::{
    slots, Fpage, IrqOp, MessageTag, ObjectKind, Syscall, Timeout, Timeouts, KIP_ADDRESS,
    MAP_GRANT, NO_CAP, OPEN_WAIT, PAGE_SIZE, UNMAP_SELF, UTCB_AREA, UTCB_SIZE,
};

// The fuzzer speaks the raw ABI (register values, any bits), in the encodings every kernel
// since the hostile review has: so that `scripts/fuzz-old-kernel.sh` can port it onto them.
/// The `SEND` right.
const RIGHT_SEND: u64 = 1;
/// `ExRegs` flags `SET_IP | SET_SP | START`.
const EX_REGS_START_AT: u64 = 1 | 2 | 4;

/// The memory flexpage right `WRITE`.
const RIGHT_WRITE: u64 = 2;

/// A memory flexpage with raw rights bits `rights`.
pub fn raw_memory_fpage(base: u64, order: u32, rights: u64) -> Fpage {
    Fpage((base & !0xfff) | ((order as u64 & 0x3f) << 4) | (rights & 7))
}

/// An object flexpage with raw rights bits `rights` (any bits: hostile ones included).
fn object_fpage(slot: u64, order: u32, rights: u64) -> Fpage {
    Fpage((slot << 12) | (2 << 10) | ((order as u64 & 0x3f) << 4) | (rights & 7))
}

/// Inconsistencies a `QuotaCheck` in the middle of a batch found (0: none yet).
pub static MISMATCHES: AtomicU64 = AtomicU64::new(0);

/// The first capability slot the fuzzer's objects use (below: the fuzzer's own set-up).
pub const FIRST_SLOT: u64 = 128;
/// One past the last slot.
pub const END_SLOT: u64 = 512;

/// Kinds of objects, as indices into [`coverage::KINDS`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    /// A task.
    Task = 0,
    /// A thread.
    Thread = 1,
    /// A gate.
    Gate = 2,
    /// A factory.
    Factory = 3,
    /// An IRQ object.
    Irq = 4,
    /// A VM.
    Vm = 5,
    /// A vCPU.
    Vcpu = 6,
}

const KINDS: [Kind; 7] = [
    Kind::Task,
    Kind::Thread,
    Kind::Gate,
    Kind::Factory,
    Kind::Irq,
    Kind::Vm,
    Kind::Vcpu,
];

impl Kind {
    fn object(self) -> ObjectKind {
        match self {
            Kind::Task => ObjectKind::Task,
            Kind::Thread => ObjectKind::Thread,
            Kind::Gate => ObjectKind::Gate,
            Kind::Factory => ObjectKind::Factory,
            Kind::Irq => ObjectKind::Irq,
            Kind::Vm => ObjectKind::Vm,
            Kind::Vcpu => ObjectKind::Vcpu,
        }
    }
}

/// Memory the fuzzer owns and may map, revoke and (the scratch part) unmap from itself.
#[derive(Clone, Copy)]
pub struct Memory {
    /// A 2 MiB-aligned stretch of heap, every page present (4 KiB mappings).
    pub arena: (u64, u64),
    /// RAM from the parent as 2 MiB pages (size 0 if there is none).
    pub ram: (u64, u64),
    /// Pages that may be unmapped from ourselves or granted away, and are touched again after.
    pub scratch: (u64, u64),
}

/// The slots of the fuzzer's own set-up that operations use.
#[derive(Clone, Copy)]
pub struct Infra {
    /// The batch's factory (created from ours, all objects come from it and its children).
    pub sandbox: u64,
    /// The sandbox's size.
    pub sandbox_size: u64,
    /// A thread of ours that serves calls at random (gates may be bound to it).
    pub server: u64,
    /// A gate to the server (pager, exception handler and peer of fuzzed threads).
    pub server_gate: u64,
    /// A gate to the pager of worker tasks.
    pub image_gate: u64,
    /// Whether VMs may get a gate of the batch as their pager (unless `vmpager=server`).
    pub any_vm_pager: bool,
}

/// What the fuzzer holds in one batch.
pub struct Model {
    objects: Vec<(Kind, u64)>,
    free: Vec<u64>,
    mappings: u64,
    /// Task slots whose capability went into another task (a cycle of such capabilities
    /// keeps tasks alive while their creator lives: these are destroyed before deletion).
    exported: Vec<u64>,
    /// Worker tasks started (each also a task and thread in `objects`).
    pub workers: u64,
}

impl Model {
    /// An empty model with all fuzzer slots free.
    pub fn new() -> Model {
        Model {
            objects: Vec::new(),
            free: (FIRST_SLOT..END_SLOT).rev().collect(),
            mappings: 0,
            exported: Vec::new(),
            workers: 0,
        }
    }

    fn note_live(&self) {
        for kind in KINDS {
            let n = self.objects.iter().filter(|o| o.0 == kind).count() as u64;
            coverage::live(kind as usize, n);
        }
        coverage::live(7, self.mappings);
    }

    fn pick(&self, rng: &mut Rng, kind: Kind) -> Option<u64> {
        let n = self.objects.iter().filter(|o| o.0 == kind).count() as u64;
        if n == 0 {
            return None;
        }
        let i = rng.below(n) as usize;
        self.objects
            .iter()
            .filter(|o| o.0 == kind)
            .nth(i)
            .map(|o| o.1)
    }

    /// A live object of `kind` most of the time, otherwise garbage (never a set-up slot).
    fn slot(&self, rng: &mut Rng, kind: Kind) -> u64 {
        match self.pick(rng, kind) {
            Some(s) if rng.chance(92) => s,
            _ => safe(rng.garbage()),
        }
    }

    fn any_slot(&self, rng: &mut Rng) -> u64 {
        if !self.objects.is_empty() && rng.chance(90) {
            self.objects[rng.below(self.objects.len() as u64) as usize].1
        } else {
            safe(rng.garbage())
        }
    }

    /// The first slot of an object flexpage (which may be granted away or unmapped from us):
    /// one of ours or garbage, but never a slot below [`FIRST_SLOT`] (an object flexpage from
    /// slot 0 would take our own task, thread and factory).
    fn object_slot(&self, rng: &mut Rng) -> u64 {
        match self.any_slot(rng) {
            0 => FIRST_SLOT,
            slot => slot,
        }
    }

    /// A free slot for a new object (sometimes an occupied or impossible one).
    fn new_slot(&mut self, rng: &mut Rng) -> u64 {
        if rng.chance(95) && !self.free.is_empty() {
            // Mostly the most recently freed slot: freed slots are reused.
            let i = if rng.chance(70) {
                self.free.len() - 1
            } else {
                rng.below(self.free.len() as u64) as usize
            };
            self.free[i]
        } else {
            safe(rng.garbage())
        }
    }

    fn created(&mut self, kind: Kind, slot: u64) {
        if let Some(i) = self.free.iter().position(|&s| s == slot) {
            self.free.remove(i);
            self.objects.push((kind, slot));
        }
    }

    fn export(&mut self, slot: u64) {
        if self.kind_of(slot) == Some(Kind::Task) && !self.exported.contains(&slot) {
            self.exported.push(slot);
        }
    }

    fn deleted(&mut self, slot: u64) {
        self.exported.retain(|&s| s != slot);
        if let Some(i) = self.objects.iter().position(|o| o.1 == slot) {
            self.objects.remove(i);
            self.free.push(slot);
        }
    }

    fn kind_of(&self, slot: u64) -> Option<Kind> {
        self.objects.iter().find(|o| o.1 == slot).map(|o| o.0)
    }
}

/// A garbage value that is never a slot of the fuzzer's set-up (1..FIRST_SLOT): those are moved
/// into the fuzzer's range, so that no operation takes the fuzzer's own task, threads,
/// factory or pager (slot 0 stays: it is a slot like any other, emptied after each batch).
fn safe(value: u64) -> u64 {
    if (1..FIRST_SLOT).contains(&value) {
        FIRST_SLOT + value
    } else {
        value
    }
}

fn timeouts(rng: &mut Rng) -> u64 {
    let t = |rng: &mut Rng| match rng.below(3) {
        0 => Timeout::ZERO,
        1 => Timeout::micros(1 + rng.below(500) as u32),
        _ => Timeout::micros(1 + rng.below(5_000) as u32),
    };
    Timeouts::new(t(rng), t(rng)).0
}

/// A flexpage of memory we own, at a random order inside one of our regions (sometimes the
/// KIP, a UTCB or this image, which are not ours to give).
fn memory_fpage(rng: &mut Rng, m: &Memory, rights: u64) -> (Fpage, bool) {
    let (region, scratch) = match rng.below(10) {
        0..=3 => (m.arena, false),
        4..=5 if m.ram.1 > 0 => (m.ram, false),
        4..=6 => (m.scratch, true),
        7 => ((KIP_ADDRESS, PAGE_SIZE), false),
        8 => ((UTCB_AREA, UTCB_SIZE), false),
        _ => ((0x40_0000, 0x40_0000), false),
    };
    let max_order = 63 - region.1.leading_zeros();
    let order = 12 + rng.below((max_order - 11) as u64) as u32;
    let offset = rng.below(region.1) & !((1u64 << order) - 1);
    let rights = if region.0 == 0x40_0000 {
        rights & !RIGHT_WRITE
    } else {
        rights
    };
    (raw_memory_fpage(region.0 + offset, order, rights), scratch)
}

/// Touch every page of the scratch region again (after an unmap or grant took some away: the
/// pager maps fresh ones).
fn touch(region: (u64, u64)) {
    for page in (region.0..region.0 + region.1).step_by(PAGE_SIZE as usize) {
        // SAFETY: the scratch region is ours and holds nothing; reading faults a page in.
        unsafe { core::ptr::read_volatile(page as *const u8) };
    }
}

/// A guest-physical address for a mapping of `size` bytes: mostly in the first GiB, aligned to
/// the size (so that mappings collide and replace each other), sometimes anywhere.
fn guest_address(rng: &mut Rng, size: u64) -> u64 {
    match rng.below(10) {
        0..=5 => rng.below(1 << 30) & !(size - 1),
        6..=8 => rng.below(1 << 40) & !(size - 1),
        _ => rng.garbage(),
    }
}

/// A destination address in a task for a mapping of `size` bytes.
fn task_address(rng: &mut Rng, size: u64) -> u64 {
    match rng.below(10) {
        0..=7 => (0x1_0000_0000 + rng.below(1 << 36)) & !(size - 1),
        _ => rng.garbage(),
    }
}

/// Do one random operation. Returns nothing: every result is counted by `coverage`.
pub fn step(rng: &mut Rng, model: &mut Model, m: &Memory, infra: &Infra) {
    match rng.below(100) {
        0..=18 => create(rng, model, infra),
        19 => create_burst(rng, model, infra),
        20..=21 => map_burst(rng, model, m),
        22..=23 => spawn_worker(rng, model, infra),
        24..=30 => thread_control(rng, model, infra),
        31..=35 => ex_regs(rng, model),
        36..=41 => cap_copy(rng, model),
        42..=48 => cap_delete(rng, model),
        49..=63 => map(rng, model, m),
        64..=70 => unmap(rng, model, m),
        71..=73 => task_destroy(rng, model),
        74..=81 => ipc(rng, model, infra),
        82..=85 => irq(rng, model, infra),
        86..=88 => schedule(rng, model),
        89..=91 => quota(rng, model, infra),
        _ => garbage(rng),
    }
    if rng.chance(10) {
        let vcpu = model.pick(rng, Kind::Vcpu).unwrap_or(workers::NO_VCPU);
        workers::RUN_VCPU.store(vcpu, core::sync::atomic::Ordering::SeqCst);
    }
    model.note_live();
}

fn factory_of(rng: &mut Rng, model: &Model, infra: &Infra) -> u64 {
    match model.pick(rng, Kind::Factory) {
        Some(f) if rng.chance(50) => f,
        _ if rng.chance(97) => infra.sandbox,
        _ => safe(rng.garbage()),
    }
}

fn create(rng: &mut Rng, model: &mut Model, infra: &Infra) {
    let kind = rng.pick(&KINDS);
    let slot = model.new_slot(rng);
    let mut factory = factory_of(rng, model, infra);
    let argument = match kind {
        Kind::Factory => rng.size_between(1, infra.sandbox_size),
        Kind::Gate => match model.pick(rng, Kind::Thread) {
            Some(t) if rng.chance(50) => t,
            _ if rng.chance(95) => infra.server,
            _ => safe(rng.garbage()),
        },
        Kind::Irq => {
            factory = if rng.chance(95) {
                slots::PLATFORM
            } else {
                factory
            };
            if rng.chance(90) {
                32 + rng.below(32)
            } else {
                rng.garbage()
            }
        }
        // A VM pager may be one of the batch's gates, which die at its end, with guest faults
        // waiting for them (`VcpuRun` then returns the NPF exit; `vmpager=server` turns it off).
        Kind::Vm => match rng.below(4) {
            0 if infra.any_vm_pager => model.slot(rng, Kind::Gate),
            0 | 1 => infra.server_gate,
            _ => NO_CAP,
        },
        Kind::Vcpu => model.slot(rng, Kind::Vm),
        Kind::Task | Kind::Thread => 0,
    };
    let badge = rng.garbage();
    // SAFETY: creating an object changes no memory of ours.
    let (rax, ..) = unsafe {
        syscall(
            Syscall::FactoryCreate as u64,
            [factory, kind.object() as u64, slot, argument, badge],
        )
    };
    if rax == 0 {
        model.created(kind, slot);
    }
}

/// A sequence: create an object of one kind and delete its capability, again and again (up
/// to 512 times), from one factory; the kernel must refund each (or refuse with OutOfMemory).
fn create_burst(rng: &mut Rng, model: &mut Model, infra: &Infra) {
    let kind = rng.pick(&[
        Kind::Gate,
        Kind::Thread,
        Kind::Task,
        Kind::Vm,
        Kind::Factory,
    ]);
    let factory = factory_of(rng, model, infra);
    let slot = model.new_slot(rng);
    let argument = match kind {
        Kind::Gate => infra.server,
        Kind::Vm => NO_CAP,
        Kind::Factory => rng.size_between(1, 64 << 10),
        _ => 0,
    };
    for _ in 0..1 + rng.below(512) {
        // SAFETY: creates an object and deletes its capability; no memory of ours changes.
        let (rax, ..) = unsafe {
            syscall(
                Syscall::FactoryCreate as u64,
                [factory, kind.object() as u64, slot, argument, 0],
            )
        };
        if rax != 0 {
            break;
        }
        // SAFETY: as above.
        unsafe { syscall(Syscall::CapDelete as u64, [slot, 0, 0, 0, 0]) };
    }
}

/// A sequence: map one region of our memory into one VM (or task) again and again at new
/// addresses (successive or random), up to 64 times.
fn map_burst(rng: &mut Rng, model: &mut Model, m: &Memory) {
    let to_vm = rng.chance(80);
    let destination = if to_vm {
        model.slot(rng, Kind::Vm)
    } else {
        model.slot(rng, Kind::Task)
    };
    let region = if m.ram.1 > 0 && rng.chance(50) {
        m.ram
    } else {
        m.arena
    };
    let order = 63 - region.1.leading_zeros() - rng.below(3) as u32;
    let fpage = Fpage::memory(region.0, order, Fpage::RWX);
    let size = 1u64 << order;
    let successive = rng.chance(50);
    let mut at = if to_vm {
        guest_address(rng, size)
    } else {
        task_address(rng, size)
    };
    for _ in 0..1 + rng.below(64) {
        // SAFETY: into a VM or task of the fuzzer's, never our own task.
        let (rax, ..) = unsafe { syscall(Syscall::Map as u64, [destination, fpage.0, at, 0, 0]) };
        if rax != 0 {
            break;
        }
        model.mappings += 1;
        at = if successive {
            at.wrapping_add(size)
        } else if to_vm {
            guest_address(rng, size)
        } else {
            task_address(rng, size)
        };
    }
}

/// A task with a thread that runs [`workers::worker`] on this image (paged by our image pager)
/// with the server as its peer, made from a factory of the batch.
fn spawn_worker(rng: &mut Rng, model: &mut Model, infra: &Infra) {
    let factory = factory_of(rng, model, infra);
    let (task, thread) = (model.new_slot(rng), model.new_slot(rng));
    // SAFETY: creates an object, no memory of ours changes.
    let (rax, ..) = unsafe {
        syscall(
            Syscall::FactoryCreate as u64,
            [factory, ObjectKind::Task as u64, task, 0, 0],
        )
    };
    if rax != 0 {
        return;
    }
    model.created(Kind::Task, task);
    let thread = if thread == task {
        model.new_slot(rng)
    } else {
        thread
    };
    // SAFETY: creates an object, no memory of ours changes.
    let (rax, ..) = unsafe {
        syscall(
            Syscall::FactoryCreate as u64,
            [factory, ObjectKind::Thread as u64, thread, 0, 0],
        )
    };
    if rax != 0 {
        return;
    }
    model.created(Kind::Thread, thread);
    // SAFETY: configures and starts the worker's thread in its own task; nothing of ours.
    let ok = unsafe {
        syscall(
            Syscall::ThreadControl as u64,
            [thread, task, UTCB_AREA, infra.image_gate, infra.server_gate],
        )
        .0 == 0
            && syscall(
                Syscall::CapCopy as u64,
                [task, infra.server_gate, slots::PEER, RIGHT_SEND, 0],
            )
            .0 == 0
            && syscall(
                Syscall::ThreadSchedule as u64,
                [thread, 1 + rng.below(99), 1_000 + rng.below(20_000), 0, 0],
            )
            .0 == 0
            && syscall(
                Syscall::ExRegs as u64,
                [
                    thread,
                    workers::worker as *const () as u64,
                    workers::WORKER_STACK_TOP - 8,
                    EX_REGS_START_AT,
                    0,
                ],
            )
            .0 == 0
    };
    if ok {
        model.workers += 1;
    }
}

fn ipc_partner(rng: &mut Rng, model: &Model, infra: &Infra) -> u64 {
    match rng.below(4) {
        0 => model.slot(rng, Kind::Thread),
        1 => model.slot(rng, Kind::Gate),
        2 => infra.server_gate,
        _ => model.any_slot(rng),
    }
}

fn thread_control(rng: &mut Rng, model: &mut Model, infra: &Infra) {
    let thread = model.slot(rng, Kind::Thread);
    let task = if rng.chance(90) {
        model.slot(rng, Kind::Task)
    } else {
        NO_CAP
    };
    let utcb = if rng.chance(90) {
        UTCB_AREA + rng.below(8) * UTCB_SIZE
    } else {
        rng.garbage()
    };
    let pager = if rng.chance(70) {
        ipc_partner(rng, model, infra)
    } else {
        NO_CAP
    };
    let handler = if rng.chance(70) {
        ipc_partner(rng, model, infra)
    } else {
        NO_CAP
    };
    // SAFETY: binds one of the fuzzer's threads (never ours: the task is never our own).
    unsafe {
        syscall(
            Syscall::ThreadControl as u64,
            [thread, task, utcb, pager, handler],
        )
    };
}

fn ex_regs(rng: &mut Rng, model: &mut Model) {
    let thread = model.slot(rng, Kind::Thread);
    let ip = if rng.chance(50) {
        0x40_0000 + rng.below(0x10_0000)
    } else {
        rng.garbage()
    };
    let sp = if rng.chance(50) {
        workers::WORKER_STACK_TOP - 8 * rng.below(64)
    } else {
        rng.garbage()
    };
    let flags = rng.below(16);
    // SAFETY: a thread of the fuzzer's objects, which never runs in our task.
    unsafe { syscall(Syscall::ExRegs as u64, [thread, ip, sp, flags, 0]) };
}

fn cap_copy(rng: &mut Rng, model: &mut Model) {
    let source = model.any_slot(rng);
    let r = rng.below(16);
    let badge = rng.garbage();
    if rng.chance(30) {
        // Into our own table: the copy becomes another object of the model.
        let destination = model.new_slot(rng);
        // SAFETY: copies a capability into a free slot of ours.
        let (rax, ..) = unsafe {
            syscall(
                Syscall::CapCopy as u64,
                [slots::SELF_TASK, source, destination, r, badge],
            )
        };
        if rax == 0 {
            if let Some(kind) = model.kind_of(source) {
                model.created(kind, destination);
                if model.exported.contains(&source) {
                    model.export(destination);
                }
            }
        }
    } else {
        let task = model.slot(rng, Kind::Task);
        let destination = rng.below(600);
        model.export(source);
        // SAFETY: copies into a task of the fuzzer's.
        unsafe {
            syscall(
                Syscall::CapCopy as u64,
                [task, source, destination, r, badge],
            )
        };
    }
}

fn cap_delete(rng: &mut Rng, model: &mut Model) {
    let slot = model.any_slot(rng);
    if model.exported.contains(&slot) {
        // SAFETY: a task of the fuzzer's, never ours.
        unsafe { syscall(Syscall::TaskDestroy as u64, [slot, 0, 0, 0, 0]) };
    }
    // SAFETY: one of the fuzzer's slots (or garbage that is none of the set-up).
    let (rax, ..) = unsafe { syscall(Syscall::CapDelete as u64, [slot, 0, 0, 0, 0]) };
    if rax == 0 {
        model.deleted(slot);
    }
}

fn map(rng: &mut Rng, model: &mut Model, m: &Memory) {
    let to_vm = rng.chance(50);
    let destination = if to_vm {
        model.slot(rng, Kind::Vm)
    } else {
        model.slot(rng, Kind::Task)
    };
    let (fpage, scratch) = match rng.below(10) {
        0 => (
            object_fpage(model.object_slot(rng), rng.below(4) as u32, rng.below(16)),
            false,
        ),
        1 => (Fpage::io(rng.below(0x1_0000), rng.below(17) as u32), false),
        2 => (Fpage(rng.garbage()), false),
        _ => {
            let r = rng.below(8);
            memory_fpage(rng, m, r)
        }
    };
    if fpage.is_valid_object() {
        for slot in fpage.index()..fpage.index() + (1 << fpage.order().min(9)) {
            model.export(slot);
        }
    }
    let size = 1u64 << fpage.order().clamp(12, 47);
    let at = if to_vm {
        guest_address(rng, size)
    } else {
        task_address(rng, size)
    };
    // Grants take the pages away from us: only the scratch region, and objects.
    let grant = (scratch || fpage.is_valid_object()) && rng.chance(30);
    let flags = if grant {
        MAP_GRANT
    } else if rng.chance(3) {
        rng.garbage() & !MAP_GRANT
    } else {
        0
    };
    // SAFETY: the destination is never our own task; a grant gives away only scratch pages
    // (touched again below) or fuzzer capabilities.
    let (rax, ..) = unsafe { syscall(Syscall::Map as u64, [destination, fpage.0, at, flags, 0]) };
    if rax == 0 {
        model.mappings += 1;
        if grant && fpage.is_valid_object() {
            for slot in fpage.index()..fpage.index() + (1 << fpage.order().min(9)) {
                model.deleted(slot);
            }
        }
    }
    if grant && scratch {
        touch(m.scratch);
    }
}

fn unmap(rng: &mut Rng, model: &mut Model, m: &Memory) {
    let r = rng.below(8);
    let (fpage, scratch) = memory_fpage(rng, m, r);
    let own = (scratch || fpage.base() == KIP_ADDRESS) && rng.chance(40);
    let fpage = if rng.chance(5) {
        object_fpage(model.object_slot(rng), rng.below(3) as u32, rng.below(16))
    } else {
        fpage
    };
    let flags = if own { UNMAP_SELF } else { 0 };
    // SAFETY: with UNMAP_SELF only the scratch region (touched again below) or the KIP, which
    // nothing of ours reads after start-up.
    unsafe { syscall(Syscall::Unmap as u64, [fpage.0, flags, 0, 0, 0]) };
    if own && scratch {
        touch(m.scratch);
    }
    if rng.chance(20) {
        model.mappings = 0;
    }
}

fn task_destroy(rng: &mut Rng, model: &mut Model) {
    let task = model.slot(rng, Kind::Task);
    // SAFETY: a task of the fuzzer's, never ours.
    unsafe { syscall(Syscall::TaskDestroy as u64, [task, 0, 0, 0, 0]) };
}

fn ipc(rng: &mut Rng, model: &mut Model, infra: &Infra) {
    let destination = ipc_partner(rng, model, infra);
    let number = rng.pick(&[
        Syscall::Send,
        Syscall::Call,
        Syscall::Receive,
        Syscall::Reply,
        Syscall::ReplyWait,
    ]);
    let source = match number {
        Syscall::Receive | Syscall::ReplyWait if rng.chance(50) => OPEN_WAIT,
        _ => ipc_partner(rng, model, infra),
    };
    let mut words = [rng.next(), rng.next(), rng.next(), rng.next()];
    let arena = workers::arena();
    let tag = if rng.chance(25) {
        crate::strings::message(rng, arena, 16, &mut words).0
    } else if rng.chance(90) {
        MessageTag::new(rng.below(16) as i32, rng.below(9) as usize, 0).0
    } else {
        rng.garbage()
    };
    if rng.chance(30) {
        crate::strings::receive_buffers(rng, arena);
    }
    coverage::ipc(number, destination, source, tag, timeouts(rng), words);
}

fn irq(rng: &mut Rng, model: &mut Model, infra: &Infra) {
    let irq = model.slot(rng, Kind::Irq);
    let op = rng.pick(&[
        IrqOp::Attach as u64,
        IrqOp::Detach as u64,
        IrqOp::Acknowledge as u64,
        IrqOp::Trigger as u64,
        0,
        5,
    ]);
    let thread = if rng.chance(50) {
        infra.server
    } else {
        model.slot(rng, Kind::Thread)
    };
    // SAFETY: IRQ operations change no memory of ours.
    unsafe { syscall(Syscall::IrqControl as u64, [irq, op, thread, 0, 0]) };
}

fn schedule(rng: &mut Rng, model: &mut Model) {
    let thread = model.slot(rng, Kind::Thread);
    let (priority, slice) = (
        rng.below(100),
        if rng.chance(80) {
            1_000 + rng.below(50_000)
        } else {
            rng.garbage()
        },
    );
    // SAFETY: a fuzzer thread's priority, always below ours (100).
    unsafe {
        syscall(
            Syscall::ThreadSchedule as u64,
            [thread, priority, slice, 0, 0],
        )
    };
}

fn quota(rng: &mut Rng, model: &mut Model, infra: &Infra) {
    let factory = if rng.chance(70) {
        factory_of(rng, model, infra)
    } else {
        model.any_slot(rng)
    };
    let flags = if rng.chance(90) {
        rng.below(2)
    } else {
        rng.garbage()
    };
    // SAFETY: QuotaCheck changes nothing.
    let (rax, _, _, mismatches) = unsafe { syscall(26, [factory, flags, 0, 0, 0]) };
    if rax == 0 && flags == 1 && mismatches != 0 {
        // The books must balance between any two syscalls, not just after a batch.
        let _ = MISMATCHES.compare_exchange(0, mismatches, SeqCst, SeqCst);
    }
}

/// Any syscall (but those that end us, power off, run a vCPU or wait without a timeout) with
/// garbage arguments, none of them a slot of our set-up.
fn garbage(rng: &mut Rng) {
    let number = rng.pick(&[
        1u64, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15, 16, 18, 20, 22, 23, 24, 26, 0, 27, 99,
    ]);
    let mut a = [0u64; 5];
    for v in a.iter_mut() {
        *v = safe(rng.garbage());
    }
    if (1..=5).contains(&number) {
        let number = Syscall::from_u64(number).unwrap_or(Syscall::Send);
        coverage::ipc(
            number,
            a[0],
            a[1],
            a[2],
            Timeouts::new(Timeout::ZERO, Timeout::ZERO).0,
            [a[3], a[4], 0, 0],
        );
        return;
    }
    if number == 16 {
        a[1] = 0; // never UNMAP_SELF: it could take our code and stack
    }
    if number == 15 {
        a[3] &= !MAP_GRANT; // never grant our own memory away
    }
    if number == 13 || number == 15 {
        // No capability of ours into another task behind the model's back (it could close a
        // cycle of task capabilities, which lives as long as we do).
        a[0] |= 1 << 40;
    }
    // SAFETY: the arguments name none of our set-up slots, and nothing is unmapped or granted
    // from us.
    unsafe { syscall(number, a) };
}

/// End the batch: destroy every task, delete every capability, revoke everything derived from
/// our memory.
pub fn teardown(model: &mut Model, m: &Memory) {
    let tasks: Vec<u64> = model
        .objects
        .iter()
        .filter(|o| o.0 == Kind::Task)
        .map(|o| o.1)
        .collect();
    for task in tasks {
        // SAFETY: a task of the fuzzer's.
        unsafe { syscall(Syscall::TaskDestroy as u64, [task, 0, 0, 0, 0]) };
    }
    // Every slot of the fuzzer's range, whatever the model knows (grants and copies may have
    // filled or emptied some behind its back).
    for slot in (FIRST_SLOT..END_SLOT).rev().chain([0]) {
        // SAFETY: a slot of the fuzzer's.
        unsafe { syscall(Syscall::CapDelete as u64, [slot, 0, 0, 0, 0]) };
    }
    model.objects.clear();
    workers::RUN_VCPU.store(workers::NO_VCPU, core::sync::atomic::Ordering::SeqCst);
    for region in [m.arena, m.ram, m.scratch] {
        if region.1 > 0 {
            let order = 63 - region.1.leading_zeros();
            // SAFETY: revokes only what others derived from our memory, not our own mapping.
            unsafe {
                syscall(
                    Syscall::Unmap as u64,
                    [Fpage::memory(region.0, order, Fpage::RWX).0, 0, 0, 0, 0],
                )
            };
        }
    }
    model.mappings = 0;
    model.exported.clear();
    // A slot given away by a grant of an object flexpage is free again in any case.
    model.free = (FIRST_SLOT..END_SLOT).rev().collect();
}
