//! Kernel algorithms that need no hardware, built and unit-tested on the host: the physical
//! frame allocator, the capability table, the object arena, kernel-memory quotas, the
//! scheduler's ready queues, the mapping database with its radix index, and the validation of
//! guest state a VMM hands to `VcpuRun`, and the windows of a string copy in steps.
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod capability_table;
pub mod chunked;
pub mod frame_allocator;
pub mod ready_queues;

pub use capability_table::{CapabilityError, CapabilityTable};
pub use frame_allocator::{FrameAllocator, FrameError};
pub use ready_queues::ReadyQueues;
pub mod arena;
pub mod quota;
pub mod radix_index;
pub use arena::{Arena, ObjectId};
pub use quota::{Quota, QuotaExceeded};
pub mod mapping_database;
pub use mapping_database::{
    Changes, Demand, MapPlan, Mapping, MappingDatabase, MappingError, SpaceKey, UnmapPlan,
};
pub mod asid_allocator;
pub use asid_allocator::AsidAllocator;
pub mod pool_size;
pub mod string_window;
pub mod vcpu_state;
