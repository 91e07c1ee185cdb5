//! How big the kernel memory pool is: a fraction of RAM, bounded, or what the kernel command
//! line says (`kmem=SIZE`).

/// One mebibyte.
pub const MIB: u64 = 1 << 20;
/// The default pool is RAM divided by this.
pub const DEFAULT_FRACTION: u64 = 8;
/// The smallest pool.
pub const MIN_POOL: u64 = 16 * MIB;
/// The largest default pool (`kmem=` may ask for more, up to half of RAM).
pub const MAX_DEFAULT_POOL: u64 = 1024 * MIB;

use l4_abi::parse_size;

/// Why a `kmem=` value was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolSizeError {
    /// Not a size.
    Unreadable,
    /// Below [`MIN_POOL`] or above half of RAM.
    OutOfRange,
}

/// The pool for `ram` bytes of free memory and the command line's `kmem=` value (if any),
/// 2 MiB aligned: the requested size, or RAM / [`DEFAULT_FRACTION`] within [`MIN_POOL`] ..=
/// [`MAX_DEFAULT_POOL`]. A bad request falls back to the default and says why.
pub fn pool_size(ram: u64, request: Option<&str>) -> (u64, Option<PoolSizeError>) {
    let default = (ram / DEFAULT_FRACTION).clamp(MIN_POOL, MAX_DEFAULT_POOL);
    let align = |x: u64| x & !(2 * MIB - 1);
    let Some(request) = request else {
        return (align(default), None);
    };
    match parse_size(request) {
        None => (align(default), Some(PoolSizeError::Unreadable)),
        Some(size) if size < MIN_POOL || size > ram / 2 => {
            (align(default), Some(PoolSizeError::OutOfRange))
        }
        Some(size) => (align(size), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_an_eighth_within_bounds() {
        assert_eq!(pool_size(5 << 30, None), (640 * MIB, None));
        assert_eq!(pool_size(64 * MIB, None), (MIN_POOL, None));
        assert_eq!(pool_size(64 << 30, None), (MAX_DEFAULT_POOL, None));
        // 16 compartments of 256 MiB fit beside the default pool of a 5 GiB machine.
        let ram = 5u64 << 30;
        assert!(ram - pool_size(ram, None).0 >= 16 * 256 * MIB);
    }

    #[test]
    fn requests_are_taken_or_refused_with_a_reason() {
        assert_eq!(pool_size(1 << 30, Some("64M")), (64 * MIB, None));
        assert_eq!(pool_size(1 << 30, Some("65M")), (64 * MIB, None));
        assert_eq!(
            pool_size(1 << 30, Some("lots")),
            (128 * MIB, Some(PoolSizeError::Unreadable))
        );
        assert_eq!(
            pool_size(1 << 30, Some("1M")),
            (128 * MIB, Some(PoolSizeError::OutOfRange))
        );
        assert_eq!(
            pool_size(1 << 30, Some("600M")),
            (128 * MIB, Some(PoolSizeError::OutOfRange))
        );
    }
}
