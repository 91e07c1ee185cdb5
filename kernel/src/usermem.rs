//! Access to user memory: every read of memory a task names goes through here, checked
//! against the task's page tables (present and user-accessible) and copied via the direct map.

use crate::arch::x86_64::paging::{phys_to_virt, AddressSpace, PAGE_4K, USER};
use l4_abi::{Error, USER_END};

/// Copy `buffer.len()` bytes at user address `address` of `space` into `buffer`.
pub fn copy_from_user(space: AddressSpace, address: u64, buffer: &mut [u8]) -> Result<(), Error> {
    let end = address
        .checked_add(buffer.len() as u64)
        .ok_or(Error::InvalidArgument)?;
    if end > USER_END {
        return Err(Error::InvalidArgument);
    }
    let mut done = 0usize;
    while done < buffer.len() {
        let va = address + done as u64;
        let t = space.lookup(va).ok_or(Error::InvalidArgument)?;
        if t.flags & USER == 0 {
            return Err(Error::InvalidArgument);
        }
        let in_page = (PAGE_4K - (va % PAGE_4K)) as usize;
        let n = in_page.min(buffer.len() - done);
        // SAFETY: the physical page is mapped user-accessible in the task, lies in the direct
        // map, and `n` bytes stay within it.
        let source =
            unsafe { core::slice::from_raw_parts(phys_to_virt(t.physical) as *const u8, n) };
        buffer[done..done + n].copy_from_slice(source);
        done += n;
    }
    Ok(())
}
