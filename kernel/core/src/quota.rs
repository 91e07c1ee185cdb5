//! Kernel-memory quotas: a limit of bytes that the objects and page tables a task causes to be
//! allocated are charged to. A creator hands a task a factory whose quota it carved from its
//! own, so a task can never make the kernel allocate more than it was given.

/// Why a charge failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaExceeded;

/// A kernel-memory quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    limit: u64,
    used: u64,
    /// The quota this one was carved out of (`None` for the kernel's own).
    parent: Option<crate::ObjectId>,
    /// Factory capabilities that name it (a carved quota whose last one went goes back to
    /// its parent once nothing is charged to it any more).
    references: u64,
}

impl Quota {
    /// A quota of `limit` bytes, nothing used.
    pub const fn new(limit: u64) -> Self {
        Quota {
            limit,
            used: 0,
            parent: None,
            references: 0,
        }
    }

    /// A quota of `limit` bytes carved out of quota `parent` (which is charged the limit).
    pub const fn carved(limit: u64, parent: crate::ObjectId) -> Self {
        Quota {
            limit,
            used: 0,
            parent: Some(parent),
            references: 0,
        }
    }

    /// The quota this one was carved out of.
    pub fn parent(&self) -> Option<crate::ObjectId> {
        self.parent
    }

    /// Bytes allowed.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes charged now.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Bytes still available.
    pub fn available(&self) -> u64 {
        self.limit - self.used
    }

    /// Charge `bytes`, or fail without change.
    pub fn charge(&mut self, bytes: u64) -> Result<(), QuotaExceeded> {
        match self.used.checked_add(bytes) {
            Some(total) if total <= self.limit => {
                self.used = total;
                Ok(())
            }
            _ => Err(QuotaExceeded),
        }
    }

    /// Give back `bytes` charged earlier (saturating: never below zero).
    pub fn refund(&mut self, bytes: u64) {
        self.used = self.used.saturating_sub(bytes);
    }

    /// Count one more capability naming this quota.
    pub fn add_reference(&mut self) {
        self.references += 1;
    }

    /// Count one capability less (saturating); returns how many are left.
    pub fn drop_reference(&mut self) -> u64 {
        self.references = self.references.saturating_sub(1);
        self.references
    }

    /// Capabilities naming this quota.
    pub fn references(&self) -> u64 {
        self.references
    }

    /// Whether the quota can go back to its parent: carved, no capability names it and
    /// nothing is charged to it.
    pub fn is_released(&self) -> bool {
        self.parent.is_some() && self.references == 0 && self.used == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_up_to_the_limit_and_no_further() {
        let mut q = Quota::new(100);
        assert_eq!(q.charge(60), Ok(()));
        assert_eq!(q.charge(41), Err(QuotaExceeded));
        assert_eq!(q.used(), 60);
        assert_eq!(q.charge(40), Ok(()));
        assert_eq!(q.available(), 0);
        assert_eq!(q.charge(1), Err(QuotaExceeded));
    }

    #[test]
    fn refunds_and_overflow() {
        let mut q = Quota::new(u64::MAX - 1);
        assert_eq!(q.charge(u64::MAX - 1), Ok(()));
        assert_eq!(q.charge(u64::MAX), Err(QuotaExceeded));
        q.refund(10);
        assert_eq!(q.available(), 10);
        q.refund(u64::MAX);
        assert_eq!(q.used(), 0);
    }

    #[test]
    fn released_only_when_carved_unreferenced_and_empty() {
        let parent = crate::ObjectId {
            index: 0,
            generation: 0,
        };
        let mut top = Quota::new(100);
        assert!(!top.is_released());
        top.add_reference();
        assert_eq!(top.drop_reference(), 0);
        assert!(!top.is_released(), "a top-level quota is never given back");
        let mut q = Quota::carved(100, parent);
        q.add_reference();
        q.add_reference();
        assert_eq!(q.charge(10), Ok(()));
        assert_eq!(q.drop_reference(), 1);
        assert_eq!(q.drop_reference(), 0);
        assert!(!q.is_released(), "still charged");
        q.refund(10);
        assert!(q.is_released());
        assert_eq!(q.drop_reference(), 0, "saturates");
    }
}
