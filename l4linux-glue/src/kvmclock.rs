//! kvmclock: the paravirtual clock a Linux guest finds behind the KVM CPUID signature
//! ([`crate::cpuid_linux`]). The guest writes the guest-physical address of a
//! `pvclock_vcpu_time_info` to [`MSR_KVM_SYSTEM_TIME_NEW`] (bit 0 enables it) and of a
//! `pvclock_wall_clock` to [`MSR_KVM_WALL_CLOCK_NEW`]; the VMM answers each write by storing
//! the bytes this module computes at that address, before the guest runs on.
//!
//! The guest computes nanoseconds since boot as `system_time + scale(tsc - tsc_timestamp)`,
//! where `scale` shifts the delta by `tsc_shift` and takes the upper half of its 96-bit product
//! with `tsc_to_system_mul` ([`TimeScale::scale`], the formula of Linux's
//! `pvclock_scale_delta`). Linux 6.1 also derives its TSC frequency from `mul` and `shift`
//! (`kvm_get_tsc_khz` -> `pvclock_tsc_khz`, then marks it known, so there is no calibration
//! against the PIT); [`TimeScale::tsc_khz`] mirrors that. With a constant TSC one record made
//! when the MSR is written stays valid: [`PVCLOCK_TSC_STABLE_BIT`] tells the guest so.

use alloc::vec::Vec;
use core::fmt;

/// MSR_KVM_WALL_CLOCK_NEW: the guest-physical address of a `pvclock_wall_clock`.
pub const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
/// MSR_KVM_SYSTEM_TIME_NEW: the address of a `pvclock_vcpu_time_info`, bit 0 = enable.
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
/// `pvclock_vcpu_time_info.flags`: the TSC is stable (synchronized, constant rate).
pub const PVCLOCK_TSC_STABLE_BIT: u8 = 1 << 0;
/// `pvclock_vcpu_time_info.flags`: the guest was stopped (not used).
pub const PVCLOCK_GUEST_STOPPED: u8 = 1 << 1;
/// Size of `pvclock_vcpu_time_info`.
pub const VCPU_TIME_INFO_SIZE: usize = 32;
/// Size of `pvclock_wall_clock`.
pub const WALL_CLOCK_SIZE: usize = 12;
/// Nanoseconds per second.
pub const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// Why a clock cannot be made or an MSR write is refused (the VMM answers #GP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockError {
    /// A TSC frequency that mul/shift cannot express (0, or beyond 2^31 GHz).
    BadFrequency(u64),
    /// A structure address whose end wraps around.
    BadAddress(u64),
}

impl fmt::Display for ClockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ClockError::BadFrequency(hz) => write!(f, "kvmclock: TSC frequency {hz} Hz unusable"),
            ClockError::BadAddress(a) => write!(f, "kvmclock: structure address {a:#x} wraps"),
        }
    }
}

/// The TSC-to-nanoseconds scale: `ns = ((delta << shift) * mul) >> 32` (a right shift when
/// `shift` is negative).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeScale {
    /// `tsc_to_system_mul`, a 0.32 fixed-point factor in [0.5, 1).
    pub mul: u32,
    /// `tsc_shift`.
    pub shift: i8,
}

impl TimeScale {
    /// The scale for a TSC of `tsc_hz`, with `mul` normalized to [2^31, 2^32) and rounded, so
    /// that it carries 31 significant bits (a relative error below 2.5e-10).
    pub fn for_frequency(tsc_hz: u64) -> Result<TimeScale, ClockError> {
        if tsc_hz == 0 {
            return Err(ClockError::BadFrequency(tsc_hz));
        }
        // mul(shift) = 10^9 * 2^(32 - shift) / tsc_hz; halving per step up, so the search
        // below ends without oscillating.
        let mul_for =
            |shift: i32| (u128::from(NANOS_PER_SECOND) << (32 - shift) as u32) / u128::from(tsc_hz);
        let mut shift: i32 = 0;
        loop {
            let mul = mul_for(shift);
            if mul >= 1 << 32 {
                shift += 1;
            } else if mul < 1 << 31 {
                shift -= 1;
            } else {
                return Ok(TimeScale {
                    mul: mul as u32,
                    shift: shift as i8,
                });
            }
            if !(-31..=31).contains(&shift) {
                return Err(ClockError::BadFrequency(tsc_hz));
            }
        }
    }

    /// Nanoseconds for `delta` TSC ticks, exactly as the guest computes them.
    pub fn scale(&self, delta: u64) -> u64 {
        let shifted = if self.shift < 0 {
            delta >> u32::from(self.shift.unsigned_abs())
        } else {
            delta.wrapping_shl(self.shift as u32)
        };
        ((u128::from(shifted) * u128::from(self.mul)) >> 32) as u64
    }

    /// The TSC frequency in kHz the guest derives from the scale (Linux's `pvclock_tsc_khz`:
    /// its truncating division, shifted left for fast TSCs, can be a few kHz off, below 1 ppm).
    pub fn tsc_khz(&self) -> u64 {
        let khz = (1_000_000u64 << 32) / u64::from(self.mul);
        if self.shift < 0 {
            khz << u32::from(self.shift.unsigned_abs())
        } else {
            khz >> self.shift as u32
        }
    }
}

/// `struct pvclock_vcpu_time_info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuTimeInfo {
    /// Even when consistent (the guest retries while it is odd or changes under it).
    pub version: u32,
    /// The TSC at which `system_time` was taken.
    pub tsc_timestamp: u64,
    /// Nanoseconds since boot at `tsc_timestamp`.
    pub system_time: u64,
    /// The scale.
    pub scale: TimeScale,
    /// `PVCLOCK_*` flags.
    pub flags: u8,
}

impl VcpuTimeInfo {
    /// The guest's reading at `tsc`: nanoseconds since boot.
    pub fn guest_nanoseconds(&self, tsc: u64) -> u64 {
        self.system_time
            .wrapping_add(self.scale.scale(tsc.wrapping_sub(self.tsc_timestamp)))
    }

    /// The 32 bytes in guest memory (little-endian, Linux's layout: version at 0, padding at
    /// 4, tsc_timestamp at 8, system_time at 16, mul at 24, shift at 28, flags at 29).
    pub fn to_bytes(&self) -> [u8; VCPU_TIME_INFO_SIZE] {
        let mut b = [0; VCPU_TIME_INFO_SIZE];
        b[0..4].copy_from_slice(&self.version.to_le_bytes());
        b[8..16].copy_from_slice(&self.tsc_timestamp.to_le_bytes());
        b[16..24].copy_from_slice(&self.system_time.to_le_bytes());
        b[24..28].copy_from_slice(&self.scale.mul.to_le_bytes());
        b[28] = self.scale.shift as u8;
        b[29] = self.flags;
        b
    }
}

/// `struct pvclock_wall_clock`: the wall-clock time at which system time was 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WallClock {
    /// Even when consistent.
    pub version: u32,
    /// Seconds since the Unix epoch.
    pub seconds: u32,
    /// Nanoseconds within the second.
    pub nanoseconds: u32,
}

impl WallClock {
    /// The 12 bytes in guest memory (version, seconds, nanoseconds; little-endian).
    pub fn to_bytes(&self) -> [u8; WALL_CLOCK_SIZE] {
        let mut b = [0; WALL_CLOCK_SIZE];
        b[0..4].copy_from_slice(&self.version.to_le_bytes());
        b[4..8].copy_from_slice(&self.seconds.to_le_bytes());
        b[8..12].copy_from_slice(&self.nanoseconds.to_le_bytes());
        b
    }
}

/// Bytes the VMM must store in guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestWrite {
    /// Guest-physical address.
    pub address: u64,
    /// The bytes.
    pub bytes: Vec<u8>,
}

/// One vCPU's kvmclock.
#[derive(Debug, Clone)]
pub struct KvmClock {
    scale: TimeScale,
    boot_tsc: u64,
    boot_wall_nanoseconds: u64,
    system_time_msr: u64,
    wall_clock_msr: u64,
    version: u32,
}

impl KvmClock {
    /// A clock for a TSC of `tsc_hz` on which system time 0 is TSC `boot_tsc`, at wall-clock
    /// time `boot_wall_nanoseconds` since the Unix epoch (0 if the VMM knows no time of day).
    pub fn new(
        tsc_hz: u64,
        boot_tsc: u64,
        boot_wall_nanoseconds: u64,
    ) -> Result<KvmClock, ClockError> {
        Ok(KvmClock {
            scale: TimeScale::for_frequency(tsc_hz)?,
            boot_tsc,
            boot_wall_nanoseconds,
            system_time_msr: 0,
            wall_clock_msr: 0,
            version: 0,
        })
    }

    /// The scale in use.
    pub fn scale(&self) -> TimeScale {
        self.scale
    }

    /// Whether the MSR is one of kvmclock's.
    pub fn handles_msr(msr: u32) -> bool {
        msr == MSR_KVM_WALL_CLOCK_NEW || msr == MSR_KVM_SYSTEM_TIME_NEW
    }

    /// RDMSR: the value last written (`None` for other MSRs).
    pub fn msr_read(&self, msr: u32) -> Option<u64> {
        match msr {
            MSR_KVM_WALL_CLOCK_NEW => Some(self.wall_clock_msr),
            MSR_KVM_SYSTEM_TIME_NEW => Some(self.system_time_msr),
            _ => None,
        }
    }

    /// WRMSR at TSC `now`: the structure to store, if any (system time disabled: none).
    pub fn msr_write(
        &mut self,
        msr: u32,
        value: u64,
        now: u64,
    ) -> Result<Option<GuestWrite>, ClockError> {
        match msr {
            MSR_KVM_WALL_CLOCK_NEW => {
                check_address(value, WALL_CLOCK_SIZE)?;
                self.wall_clock_msr = value;
                Ok(Some(GuestWrite {
                    address: value,
                    bytes: self.wall_clock().to_bytes().to_vec(),
                }))
            }
            MSR_KVM_SYSTEM_TIME_NEW => {
                check_address(value & !1, VCPU_TIME_INFO_SIZE)?;
                self.system_time_msr = value;
                Ok(self.refresh(now))
            }
            _ => Ok(None),
        }
    }

    /// A fresh `pvclock_vcpu_time_info` at TSC `now` for the registered address (`None` while
    /// disabled). Not needed with a constant TSC; for a VMM that changes the TSC offset.
    pub fn refresh(&mut self, now: u64) -> Option<GuestWrite> {
        if self.system_time_msr & 1 == 0 {
            return None;
        }
        let info = self.time_info(now);
        Some(GuestWrite {
            address: self.system_time_msr & !1,
            bytes: info.to_bytes().to_vec(),
        })
    }

    /// The time record at TSC `now` (each call takes the next even version).
    pub fn time_info(&mut self, now: u64) -> VcpuTimeInfo {
        self.version = self.version.wrapping_add(2);
        VcpuTimeInfo {
            version: self.version,
            tsc_timestamp: now,
            system_time: self.scale.scale(now.saturating_sub(self.boot_tsc)),
            scale: self.scale,
            flags: PVCLOCK_TSC_STABLE_BIT,
        }
    }

    /// The wall clock at boot.
    pub fn wall_clock(&self) -> WallClock {
        WallClock {
            version: 2,
            seconds: (self.boot_wall_nanoseconds / NANOS_PER_SECOND) as u32,
            nanoseconds: (self.boot_wall_nanoseconds % NANOS_PER_SECOND) as u32,
        }
    }
}

fn check_address(address: u64, size: usize) -> Result<(), ClockError> {
    address
        .checked_add(size as u64)
        .map(|_| ())
        .ok_or(ClockError::BadAddress(address))
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    /// Frequencies from 1 to 5 GHz: round ones, odd ones, and a pseudo-random sweep.
    fn frequencies() -> Vec<u64> {
        let mut f = vec![
            1_000_000_000,
            1_000_000_001,
            1_500_000_000,
            1_999_999_999,
            2_000_000_000,
            2_400_123_456,
            2_999_999_999,
            3_300_000_000,
            4_194_304_000,
            4_999_999_999,
            5_000_000_000,
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..200 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            f.push(1_000_000_000 + x % 4_000_000_001);
        }
        f
    }

    #[test]
    fn guest_formula_within_one_ppm() {
        for hz in frequencies() {
            let scale = TimeScale::for_frequency(hz).unwrap();
            assert!(scale.mul >= 1 << 31, "{hz}: {scale:?}");
            for seconds in [1u64, 7, 60, 3600, 86_400, 30 * 86_400] {
                let ticks = hz * seconds;
                let exact = u128::from(ticks) * 1_000_000_000 / u128::from(hz);
                let got = u128::from(scale.scale(ticks));
                let error = exact.abs_diff(got);
                assert!(
                    error * 1_000_000 <= exact,
                    "{hz} Hz, {seconds} s: {got} vs {exact}"
                );
            }
            // Short deltas: within a nanosecond or two of truncation.
            let exact = 1000u128 * 1_000_000_000 / u128::from(hz);
            assert!(exact.abs_diff(u128::from(scale.scale(1000))) <= 2);
        }
    }

    #[test]
    fn guest_derives_the_tsc_frequency() {
        for hz in frequencies() {
            let khz = TimeScale::for_frequency(hz).unwrap().tsc_khz();
            let tolerance = hz / 1000 / 1_000_000 + 1; // 1 ppm, at least 1 kHz
            assert!(khz.abs_diff(hz / 1000) <= tolerance, "{hz}: {khz}");
        }
        // Under -icount shift=0 the TSC runs at exactly 1 GHz: 1 tick = 1 ns.
        let s = TimeScale::for_frequency(1_000_000_000).unwrap();
        assert_eq!(
            s,
            TimeScale {
                mul: 1 << 31,
                shift: 1
            }
        );
        assert_eq!(s.scale(123_456_789), 123_456_789);
        assert_eq!(s.tsc_khz(), 1_000_000);
    }

    #[test]
    fn other_frequencies_and_errors() {
        assert_eq!(
            TimeScale::for_frequency(0),
            Err(ClockError::BadFrequency(0))
        );
        let slow = TimeScale::for_frequency(10_000_000).unwrap(); // 10 MHz: 100 ns a tick
        assert!(slow.scale(10).abs_diff(1000) <= 1);
        assert!(slow.shift > 0);
        let fast = TimeScale::for_frequency(5_000_000_000).unwrap();
        assert_eq!(fast.shift, -2);
        assert!(TimeScale::for_frequency(u64::MAX).is_err());
    }

    #[test]
    fn structure_layout() {
        let info = VcpuTimeInfo {
            version: 2,
            tsc_timestamp: 0x1122_3344_5566_7788,
            system_time: 0x99aa_bbcc_ddee_ff00,
            scale: TimeScale {
                mul: 0xdead_beef,
                shift: -1,
            },
            flags: PVCLOCK_TSC_STABLE_BIT,
        };
        let b = info.to_bytes();
        assert_eq!(b[0..8], [2, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(b[8..16], 0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(b[16..24], 0x99aa_bbcc_ddee_ff00u64.to_le_bytes());
        assert_eq!(b[24..28], [0xef, 0xbe, 0xad, 0xde]);
        assert_eq!((b[28], b[29], b[30], b[31]), (0xff, 1, 0, 0));
        let wall = WallClock {
            version: 2,
            seconds: 1_700_000_000,
            nanoseconds: 5,
        };
        let w = wall.to_bytes();
        assert_eq!(w[4..8], 1_700_000_000u32.to_le_bytes());
        assert_eq!(w[8..12], [5, 0, 0, 0]);
    }

    #[test]
    fn msr_protocol() {
        let hz = 2_500_000_000;
        let mut clock = KvmClock::new(hz, 1000, 1_700_000_000_123_456_789).unwrap();
        assert!(KvmClock::handles_msr(0x4b56_4d01) && !KvmClock::handles_msr(0x12));
        // Disabled: remembered, nothing to write.
        assert_eq!(
            clock.msr_write(MSR_KVM_SYSTEM_TIME_NEW, 0x5000, 2000),
            Ok(None)
        );
        let write = clock
            .msr_write(MSR_KVM_SYSTEM_TIME_NEW, 0x5001, 1000 + hz)
            .unwrap()
            .unwrap();
        assert_eq!(write.address, 0x5000);
        assert_eq!(write.bytes.len(), VCPU_TIME_INFO_SIZE);
        assert_eq!(clock.msr_read(MSR_KVM_SYSTEM_TIME_NEW), Some(0x5001));
        let version = u32::from_le_bytes(write.bytes[0..4].try_into().unwrap());
        assert_eq!(version % 2, 0);
        assert_eq!(write.bytes[29], PVCLOCK_TSC_STABLE_BIT);
        // One second after boot the record says one second.
        let system_time = u64::from_le_bytes(write.bytes[16..24].try_into().unwrap());
        assert!(system_time.abs_diff(NANOS_PER_SECOND) <= 1);
        // Wall clock: the boot time, split in seconds and nanoseconds.
        let wall = clock
            .msr_write(MSR_KVM_WALL_CLOCK_NEW, 0x6000, 0)
            .unwrap()
            .unwrap();
        assert_eq!(wall.address, 0x6000);
        assert_eq!(wall.bytes[4..8], 1_700_000_000u32.to_le_bytes());
        assert_eq!(wall.bytes[8..12], 123_456_789u32.to_le_bytes());
        assert_eq!(clock.msr_read(MSR_KVM_WALL_CLOCK_NEW), Some(0x6000));
        assert_eq!(
            clock.msr_write(MSR_KVM_WALL_CLOCK_NEW, u64::MAX - 4, 0),
            Err(ClockError::BadAddress(u64::MAX - 4))
        );
        assert_eq!(clock.msr_read(0x11), None);
    }

    #[test]
    fn records_agree_with_each_other() {
        let hz = 3_123_456_789;
        let mut clock = KvmClock::new(hz, 500, 0).unwrap();
        let early = clock.time_info(1_000);
        let late = clock.time_info(1_000 + 10 * hz);
        assert!(late.version > early.version);
        let t = 1_000 + 20 * hz;
        assert!(
            early
                .guest_nanoseconds(t)
                .abs_diff(late.guest_nanoseconds(t))
                <= 2
        );
        assert!(late.guest_nanoseconds(t) >= 20 * NANOS_PER_SECOND);
    }
}
