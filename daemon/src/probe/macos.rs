//! macOS memory probe. [`VmCounters`] is a plain struct of `host_statistics64(HOST_VM_INFO64)` counters
//! plus two sysctls; [`snapshot`] turns it into a [`MemorySnapshot`] and is portable (tested here on
//! recorded `vm_stat` output). Only `read_counters` calls Mach, under `cfg(target_os = "macos")`.

use ult_policy::{MemorySnapshot, OsPressure};

#[cfg_attr(not(target_os = "macos"), allow(unused_imports))]
use super::{Counters, ProbeError};

/// The VM counters ult reads, in pages unless named otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VmCounters {
    /// Bytes per page (16384 on Apple Silicon).
    pub page_size: u64,
    /// `hw.memsize` in bytes.
    pub total_bytes: u64,
    /// Free pages.
    pub free: u64,
    /// Active pages.
    pub active: u64,
    /// Inactive pages.
    pub inactive: u64,
    /// Wired pages.
    pub wired: u64,
    /// Speculative pages.
    pub speculative: u64,
    /// Purgeable pages.
    pub purgeable: u64,
    /// Pages the compressor occupies.
    pub compressor: u64,
    /// Anonymous (internal) pages.
    pub internal: u64,
    /// File-backed (external) pages.
    pub external: u64,
    /// Cumulative page-ins.
    pub pageins: u64,
    /// Cumulative page-outs.
    pub pageouts: u64,
    /// Cumulative swap-ins (pages).
    pub swapins: u64,
    /// Cumulative swap-outs (pages).
    pub swapouts: u64,
    /// `kern.memorystatus_vm_pressure_level`: 1 normal, 2 warn, 4 critical.
    pub pressure_level: Option<i32>,
    /// This process's physical footprint in bytes (`task_vm_info.phys_footprint`).
    pub process_footprint: u64,
}

impl VmCounters {
    /// Bytes macOS can hand out without compressing or swapping: total less app memory (anonymous
    /// pages not purgeable), wired memory and the compressor — Activity Monitor's "Memory Used". Inactive
    /// pages are not counted as available: on Apple Silicon they are largely compressor-backed.
    pub fn available_bytes(&self) -> u64 {
        let app = self.internal.saturating_sub(self.purgeable);
        let used = (app + self.wired + self.compressor).saturating_mul(self.page_size);
        self.total_bytes.saturating_sub(used)
    }

    /// Counters for rates.
    pub fn counters(&self, at: std::time::Instant) -> Counters {
        Counters {
            at,
            swapped_in: self.swapins * self.page_size,
            swapped_out: self.swapouts * self.page_size,
            compressed: self.compressor * self.page_size,
            events: None,
        }
    }
}

/// Parses the text `vm_stat` prints (for fixtures; the daemon reads the counters directly).
pub fn parse_vm_stat(text: &str, total_bytes: u64) -> Result<VmCounters, String> {
    let mut c = VmCounters {
        total_bytes,
        ..Default::default()
    };
    for line in text.lines() {
        if let Some(rest) = line.split("page size of ").nth(1) {
            c.page_size = rest
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .ok_or("bad page size")?;
            continue;
        }
        let Some((key, value)) = line.rsplit_once(':') else {
            continue;
        };
        let Ok(value) = value.trim().trim_end_matches('.').parse::<u64>() else {
            continue;
        };
        match key.trim().trim_matches('"') {
            "Pages free" => c.free = value,
            "Pages active" => c.active = value,
            "Pages inactive" => c.inactive = value,
            "Pages speculative" => c.speculative = value,
            "Pages wired down" => c.wired = value,
            "Pages purgeable" => c.purgeable = value,
            "File-backed pages" => c.external = value,
            "Anonymous pages" => c.internal = value,
            "Pages occupied by compressor" => c.compressor = value,
            "Pageins" => c.pageins = value,
            "Pageouts" => c.pageouts = value,
            "Swapins" => c.swapins = value,
            "Swapouts" => c.swapouts = value,
            _ => {}
        }
    }
    if c.page_size == 0 {
        return Err("no page size header".into());
    }
    Ok(c)
}

/// A snapshot from counters and the rates since the previous reading.
pub fn snapshot(c: &VmCounters, rates: (f64, f64, f64), swap_used_bytes: u64) -> MemorySnapshot {
    MemorySnapshot {
        total_bytes: c.total_bytes,
        available_bytes: c.available_bytes(),
        compressed_bytes: c.compressor * c.page_size,
        compressed_growth_bytes_per_s: rates.2,
        swap_used_bytes,
        swap_in_bytes_per_s: rates.0,
        swap_out_bytes_per_s: rates.1,
        psi_some_avg10: None,
        psi_full_avg10: None,
        os_level: c.pressure_level.map(|l| match l {
            4 => OsPressure::Critical,
            2 => OsPressure::Warn,
            _ => OsPressure::Normal,
        }),
        process_bytes: c.process_footprint,
        ..Default::default()
    }
}

/// Reads the counters now.
#[cfg(target_os = "macos")]
pub fn sample(previous: Option<&Counters>) -> Result<(MemorySnapshot, Counters), ProbeError> {
    let (c, swap_used) = mach::read_counters()?;
    let counters = c.counters(std::time::Instant::now());
    let rates = super::rates(previous, &counters);
    Ok((snapshot(&c, rates, swap_used), counters))
}

#[cfg(target_os = "macos")]
mod mach {
    //! The Mach and sysctl calls, each in one small function.
    use mach2::kern_return::KERN_SUCCESS;
    use mach2::message::mach_msg_type_number_t;
    use mach2::vm_statistics::vm_statistics64;
    use mach2::vm_types::integer_t;

    use super::{ProbeError, VmCounters};

    const HOST_VM_INFO64: i32 = 4;
    const TASK_VM_INFO: u32 = 22;

    unsafe extern "C" {
        fn host_statistics64(
            host: u32,
            flavor: i32,
            info: *mut integer_t,
            count: *mut mach_msg_type_number_t,
        ) -> i32;
    }

    fn unsupported(what: &str) -> ProbeError {
        ProbeError::Parse {
            path: what.to_string(),
            reason: "the call failed".into(),
        }
    }

    fn sysctl<T: Copy + Default>(name: &str) -> Option<T> {
        let cname = std::ffi::CString::new(name).ok()?;
        let mut value = T::default();
        let mut size = std::mem::size_of::<T>();
        // SAFETY: `value` is a properly aligned `T` and `size` is its size; sysctlbyname writes at most
        // `size` bytes and updates `size`.
        #[allow(unsafe_code)]
        let rc = unsafe {
            libc::sysctlbyname(
                cname.as_ptr(),
                (&mut value as *mut T).cast(),
                &mut size,
                std::ptr::null_mut(),
                0,
            )
        };
        (rc == 0 && size == std::mem::size_of::<T>()).then_some(value)
    }

    fn vm_statistics() -> Result<vm_statistics64, ProbeError> {
        let mut stats = vm_statistics64::default();
        let mut count = (std::mem::size_of::<vm_statistics64>() / std::mem::size_of::<integer_t>())
            as mach_msg_type_number_t;
        // SAFETY: `stats` is a `vm_statistics64` and `count` its size in `integer_t`s, as the call requires.
        #[allow(unsafe_code)]
        let rc = unsafe {
            host_statistics64(
                mach2::mach_init::mach_host_self(),
                HOST_VM_INFO64,
                (&mut stats as *mut vm_statistics64).cast(),
                &mut count,
            )
        };
        if rc != KERN_SUCCESS {
            return Err(unsupported("host_statistics64"));
        }
        Ok(stats)
    }

    fn phys_footprint() -> u64 {
        let mut info = mach2::task_info::task_vm_info::default();
        let mut count = (std::mem::size_of::<mach2::task_info::task_vm_info>()
            / std::mem::size_of::<integer_t>()) as mach_msg_type_number_t;
        // SAFETY: `info` is a `task_vm_info` and `count` its size in `integer_t`s for TASK_VM_INFO.
        #[allow(unsafe_code)]
        let rc = unsafe {
            mach2::task::task_info(
                mach2::traps::mach_task_self(),
                TASK_VM_INFO,
                (&mut info as *mut mach2::task_info::task_vm_info).cast(),
                &mut count,
            )
        };
        if rc == KERN_SUCCESS {
            info.phys_footprint
        } else {
            0
        }
    }

    /// Reads the counters and the swap in use (`vm.swapusage`).
    pub(super) fn read_counters() -> Result<(VmCounters, u64), ProbeError> {
        let s = vm_statistics()?;
        let page_size = sysctl::<u64>("hw.pagesize").unwrap_or(16384);
        #[derive(Clone, Copy, Default)]
        #[repr(C)]
        struct SwapUsage {
            total: u64,
            avail: u64,
            used: u64,
            pagesize: u32,
            encrypted: u32,
        }
        let swap_used = sysctl::<SwapUsage>("vm.swapusage").map_or(0, |u| u.used);
        Ok((
            VmCounters {
                page_size,
                total_bytes: sysctl::<u64>("hw.memsize")
                    .ok_or_else(|| unsupported("hw.memsize"))?,
                free: u64::from(s.free_count),
                active: u64::from(s.active_count),
                inactive: u64::from(s.inactive_count),
                wired: u64::from(s.wire_count),
                speculative: u64::from(s.speculative_count),
                purgeable: u64::from(s.purgeable_count),
                compressor: u64::from(s.compressor_page_count),
                internal: u64::from(s.internal_page_count),
                external: u64::from(s.external_page_count),
                pageins: s.pageins,
                pageouts: s.pageouts,
                swapins: s.swapins,
                swapouts: s.swapouts,
                pressure_level: sysctl::<i32>("kern.memorystatus_vm_pressure_level"),
                process_footprint: phys_footprint(),
            },
            swap_used,
        ))
    }
}

/// Asks macOS to announce memory-pressure changes (`DISPATCH_SOURCE_TYPE_MEMORYPRESSURE`, normal, warn
/// and critical) and to send on `wake` each time, so the probe samples at once instead of at its next
/// interval. Returns false where there is no such source (the caller keeps polling).
#[cfg(target_os = "macos")]
pub fn watch_pressure(wake: std::sync::mpsc::Sender<()>) -> bool {
    dispatch::watch(wake)
}

/// Asks the OS to announce memory-pressure changes; this platform has no such source (false).
#[cfg(not(target_os = "macos"))]
pub fn watch_pressure(wake: std::sync::mpsc::Sender<()>) -> bool {
    drop(wake);
    false
}

#[cfg(target_os = "macos")]
#[allow(unsafe_code, non_camel_case_types, non_upper_case_globals)]
mod dispatch {
    //! libdispatch's memory-pressure source (<dispatch/source.h>), in libSystem: a source created on a
    //! global queue whose handler, given the context set on the source, sends on the wake channel.
    use std::ffi::c_void;

    #[repr(C)]
    pub struct dispatch_source_type_s {
        _private: [u8; 0],
    }
    type dispatch_source_t = *mut c_void;
    type dispatch_queue_t = *mut c_void;
    type dispatch_function_t = Option<unsafe extern "C" fn(*mut c_void)>;

    const DISPATCH_MEMORYPRESSURE_NORMAL: usize = 0x01;
    const DISPATCH_MEMORYPRESSURE_WARN: usize = 0x02;
    const DISPATCH_MEMORYPRESSURE_CRITICAL: usize = 0x04;
    const DISPATCH_QUEUE_PRIORITY_HIGH: isize = 2;

    #[link(name = "System", kind = "dylib")]
    unsafe extern "C" {
        static _dispatch_source_type_memorypressure: dispatch_source_type_s;
        fn dispatch_get_global_queue(identifier: isize, flags: usize) -> dispatch_queue_t;
        fn dispatch_source_create(
            type_: *const dispatch_source_type_s,
            handle: usize,
            mask: usize,
            queue: dispatch_queue_t,
        ) -> dispatch_source_t;
        fn dispatch_set_context(object: *mut c_void, context: *mut c_void);
        fn dispatch_source_set_event_handler_f(
            source: dispatch_source_t,
            handler: dispatch_function_t,
        );
        fn dispatch_resume(object: *mut c_void);
    }

    unsafe extern "C" fn on_pressure(context: *mut c_void) {
        // SAFETY: the context is the leaked sender set in `watch`, alive for the process's life.
        let wake = unsafe { &*context.cast::<std::sync::mpsc::Sender<()>>() };
        let _ = wake.send(());
    }

    pub fn watch(wake: std::sync::mpsc::Sender<()>) -> bool {
        // SAFETY: the calls follow <dispatch/source.h>: a source on a global queue, its context a pointer
        // that lives forever (the source is never cancelled: ultd watches until it exits), resumed once.
        unsafe {
            let queue = dispatch_get_global_queue(DISPATCH_QUEUE_PRIORITY_HIGH, 0);
            let source = dispatch_source_create(
                &raw const _dispatch_source_type_memorypressure,
                0,
                DISPATCH_MEMORYPRESSURE_NORMAL
                    | DISPATCH_MEMORYPRESSURE_WARN
                    | DISPATCH_MEMORYPRESSURE_CRITICAL,
                queue,
            );
            if source.is_null() {
                return false;
            }
            let context = Box::into_raw(Box::new(wake));
            dispatch_set_context(source, context.cast());
            dispatch_source_set_event_handler_f(source, Some(on_pressure));
            dispatch_resume(source);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ult_policy::{PressureLevel, PressureThresholds};

    /// Recorded on a 16 GiB Apple Silicon Mac under heavy memory pressure, published in
    /// github.com/whanyu1212/gem-dota pull request 173 ("memory-pressure-1.txt", 2026-09-06).
    const APPLE_SILICON_PRESSURED: &str =
        "Mach Virtual Memory Statistics: (page size of 16384 bytes)
Pages free:                                     4229.
Pages active:                                 186123.
Pages inactive:                               184925.
Pages speculative:                               681.
Pages throttled:                                   0.
Pages wired down:                             198107.
Pages purgeable:                                  24.
\"Translation faults\":                     6085905557.
Pages copy-on-write:                       391952527.
Pages zero filled:                        2318477816.
Pages reactivated:                        1417078090.
Pages purged:                               61860720.
File-backed pages:                            133056.
Anonymous pages:                              238673.
Pages stored in compressor:                  1736474.
Pages occupied by compressor:                 436782.
Decompressions:                            950112330.
Compressions:                             1066060384.
Pageins:                                    86971767.
Pageouts:                                    1809283.
Swapins:                                     4693446.
Swapouts:                                    6168528.
";

    /// Recorded on an idle Intel Mac, published in github.com/wazuh/wazuh issue 22113.
    const INTEL_IDLE: &str = "Mach Virtual Memory Statistics: (page size of 4096 bytes)
Pages free:                             6127229.
Pages active:                            485320.
Pages inactive:                          628646.
Pages speculative:                       430715.
Pages throttled:                              0.
Pages wired down:                        715958.
Pages purgeable:                          11820.
\"Translation faults\":                  11477162.
Pages copy-on-write:                     356264.
Pages zero filled:                      7628050.
Pages reactivated:                         9561.
Pages purged:                              1423.
File-backed pages:                      1080348.
Anonymous pages:                         464333.
Pages stored in compressor:                   0.
Pages occupied by compressor:                 0.
Decompressions:                               0.
Compressions:                                 0.
Pageins:                                 280307.
Pageouts:                                     0.
Swapins:                                      0.
Swapouts:                                     0.
";

    const GIB: u64 = 1 << 30;

    #[test]
    fn available_on_a_pressured_apple_silicon_mac() {
        let c = parse_vm_stat(APPLE_SILICON_PRESSURED, 16 * GIB).unwrap();
        assert_eq!(c.page_size, 16384);
        assert_eq!(c.compressor, 436_782);
        // App (238673 - 24) + wired 198107 + compressor 436782 = 873538 pages used of 1048576.
        assert_eq!(c.available_bytes(), (1_048_576 - 873_538) * 16384);
        let s = snapshot(&c, (0.0, 0.0, 0.0), 0);
        assert_eq!(s.compressed_bytes, 436_782 * 16384);
        // 2.67 GiB available against a 4 GiB headroom: warning even before any rate is known.
        let v = PressureThresholds::default().classify(&s, 4 * GIB);
        assert_eq!(v.level, PressureLevel::Warning, "{v:?}");
    }

    #[test]
    fn swap_rate_between_two_readings_escalates() {
        let first = parse_vm_stat(APPLE_SILICON_PRESSURED, 16 * GIB).unwrap();
        // A second reading one second later (synthetic: the recorded counters plus 4000 swapped-out pages).
        let mut second = first;
        second.swapouts += 4000;
        let t0 = std::time::Instant::now();
        let t1 = t0 + std::time::Duration::from_secs(1);
        let rates = super::super::rates(Some(&first.counters(t0)), &second.counters(t1));
        assert_eq!(rates.1, 4000.0 * 16384.0);
        let s = snapshot(&second, rates, 0);
        let v = PressureThresholds::default().classify(&s, GIB);
        assert_eq!(v.level, PressureLevel::Critical, "{v:?}");
        assert!(v.reason.contains("swapping out"));
    }

    #[test]
    fn an_idle_mac_is_normal() {
        let total = 8_388_608 * 4096; // 32 GiB in 4 KiB pages
        let c = parse_vm_stat(INTEL_IDLE, total).unwrap();
        let s = snapshot(&c, (0.0, 0.0, 0.0), 0);
        assert_eq!(
            s.available_bytes,
            total - (464_333 - 11_820 + 715_958) * 4096
        );
        let v = PressureThresholds::default().classify(&s, 4 * GIB);
        assert_eq!(v.level, PressureLevel::Normal);
        let level = |l| {
            snapshot(
                &VmCounters {
                    pressure_level: Some(l),
                    ..c
                },
                (0.0, 0.0, 0.0),
                0,
            )
            .os_level
        };
        assert_eq!(level(4), Some(OsPressure::Critical));
        assert_eq!(level(2), Some(OsPressure::Warn));
        assert!(parse_vm_stat("no header", 1).is_err());
    }
}
