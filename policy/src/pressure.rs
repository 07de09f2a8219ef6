//! Memory snapshots from the OS and their mapping to a pressure level, with documented thresholds.

use std::fmt;

/// One sample of the governed memory pool, filled by a platform probe (Linux, macOS, CUDA, or a file).
///
/// Rates are per second, computed by the probe from two consecutive cumulative counters.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct MemorySnapshot {
    /// Size of the governed pool in bytes.
    pub total_bytes: u64,
    /// Bytes the OS could hand out now without swapping.
    pub available_bytes: u64,
    /// Bytes held compressed (macOS compressor, Linux zswap); 0 when unknown.
    pub compressed_bytes: u64,
    /// Growth of the compressed store in bytes per second (negative when it shrinks).
    pub compressed_growth_bytes_per_s: f64,
    /// Swap space in use.
    pub swap_used_bytes: u64,
    /// Bytes swapped in per second.
    pub swap_in_bytes_per_s: f64,
    /// Bytes swapped out per second.
    pub swap_out_bytes_per_s: f64,
    /// Linux PSI: share of the last 10 s in which some task stalled on memory (percent).
    pub psi_some_avg10: Option<f64>,
    /// Linux PSI: share of the last 10 s in which all tasks stalled on memory (percent).
    pub psi_full_avg10: Option<f64>,
    /// The OS's own verdict where it gives one (macOS `kern.memorystatus_vm_pressure_level`).
    pub os_level: Option<OsPressure>,
    /// Bytes of the pool this process holds (RSS on CPU, device bytes in use on a GPU). With
    /// `available_bytes` it tells how much ult could hold at most: the OS-derived ceiling.
    pub process_bytes: u64,
}

/// The OS's own pressure verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum OsPressure {
    /// No pressure.
    Normal,
    /// The OS warns (macOS level 2).
    Warn,
    /// The OS is critical (macOS level 4).
    Critical,
}

/// ult's pressure level: what the policy acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum PressureLevel {
    /// Nothing to do.
    #[default]
    Normal,
    /// Shed caches and shrink KV budgets; evict only to restore headroom.
    Warning,
    /// Also evict idle models by score, and refuse new loads.
    Critical,
}

impl fmt::Display for PressureLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Normal => "normal",
            Self::Warning => "warning",
            Self::Critical => "critical",
        })
    }
}

/// The thresholds that map a snapshot to a level. Each signal is checked on its own and the worst
/// level wins.
///
/// | signal | Warning | Critical |
/// |---|---|---|
/// | available bytes | < headroom | < headroom / 2 |
/// | swap-out rate | ≥ `swap_out_warning` | ≥ `swap_out_critical` |
/// | compressor growth | ≥ `compressor_growth_warning` | — |
/// | PSI full avg10 | ≥ `psi_full_warning` | ≥ `psi_full_critical` |
/// | PSI some avg10 | ≥ `psi_some_warning` | — |
/// | OS level (macOS) | warn | critical |
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PressureThresholds {
    /// Swap-out bytes per second that mean Warning (default 1 MiB/s).
    pub swap_out_warning: f64,
    /// Swap-out bytes per second that mean Critical (default 32 MiB/s).
    pub swap_out_critical: f64,
    /// Compressor growth in bytes per second that means Warning (default 64 MiB/s).
    pub compressor_growth_warning: f64,
    /// PSI full avg10 (percent) that means Warning (default 5).
    pub psi_full_warning: f64,
    /// PSI full avg10 (percent) that means Critical (default 20).
    pub psi_full_critical: f64,
    /// PSI some avg10 (percent) that means Warning (default 25).
    pub psi_some_warning: f64,
}

impl Default for PressureThresholds {
    fn default() -> Self {
        Self {
            swap_out_warning: 1.0 * 1024.0 * 1024.0,
            swap_out_critical: 32.0 * 1024.0 * 1024.0,
            compressor_growth_warning: 64.0 * 1024.0 * 1024.0,
            psi_full_warning: 5.0,
            psi_full_critical: 20.0,
            psi_some_warning: 25.0,
        }
    }
}

/// A snapshot's level, the reason in words, and how many bytes must be freed to restore headroom.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// The worst level any signal reached.
    pub level: PressureLevel,
    /// The signal that decided the level, in words ("available 1.2 GiB < headroom 2.00 GiB").
    pub reason: String,
    /// Bytes to free so that available reaches the headroom again (0 when it already does).
    pub deficit_bytes: u64,
}

impl PressureThresholds {
    /// Classifies `snapshot` given the configured `headroom_bytes`.
    pub fn classify(&self, snapshot: &MemorySnapshot, headroom_bytes: u64) -> Verdict {
        let mut level = PressureLevel::Normal;
        let mut reason = String::from("all signals below their thresholds");
        let mut raise = |candidate: PressureLevel, why: String| {
            if candidate > level {
                level = candidate;
                reason = why;
            }
        };
        let available = snapshot.available_bytes;
        if available < headroom_bytes / 2 {
            raise(
                PressureLevel::Critical,
                format!(
                    "available {} < half the headroom {}",
                    crate::format_bytes(available),
                    crate::format_bytes(headroom_bytes)
                ),
            );
        } else if available < headroom_bytes {
            raise(
                PressureLevel::Warning,
                format!(
                    "available {} < headroom {}",
                    crate::format_bytes(available),
                    crate::format_bytes(headroom_bytes)
                ),
            );
        }
        let swap_out = finite_or_zero(snapshot.swap_out_bytes_per_s);
        if swap_out >= self.swap_out_critical {
            raise(
                PressureLevel::Critical,
                format!("swapping out {}/s", rate(swap_out)),
            );
        } else if swap_out >= self.swap_out_warning {
            raise(
                PressureLevel::Warning,
                format!("swapping out {}/s", rate(swap_out)),
            );
        }
        let growth = finite_or_zero(snapshot.compressed_growth_bytes_per_s);
        if growth >= self.compressor_growth_warning {
            raise(
                PressureLevel::Warning,
                format!("compressor growing {}/s", rate(growth)),
            );
        }
        if let Some(full) = snapshot.psi_full_avg10.map(finite_or_zero) {
            if full >= self.psi_full_critical {
                raise(
                    PressureLevel::Critical,
                    format!("PSI full avg10 {full:.1}%"),
                );
            } else if full >= self.psi_full_warning {
                raise(PressureLevel::Warning, format!("PSI full avg10 {full:.1}%"));
            }
        }
        if let Some(some) = snapshot.psi_some_avg10.map(finite_or_zero)
            && some >= self.psi_some_warning
        {
            raise(PressureLevel::Warning, format!("PSI some avg10 {some:.1}%"));
        }
        match snapshot.os_level {
            Some(OsPressure::Critical) => raise(
                PressureLevel::Critical,
                "the OS reports critical memory pressure".into(),
            ),
            Some(OsPressure::Warn) => raise(
                PressureLevel::Warning,
                "the OS reports memory pressure (warn)".into(),
            ),
            _ => {}
        }
        Verdict {
            level,
            reason,
            deficit_bytes: headroom_bytes.saturating_sub(available),
        }
    }
}

fn finite_or_zero(x: f64) -> f64 {
    if x.is_finite() { x } else { 0.0 }
}

fn rate(bytes_per_s: f64) -> String {
    crate::format_bytes(bytes_per_s.max(0.0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn snapshot(available_gib: u64) -> MemorySnapshot {
        MemorySnapshot {
            total_bytes: 512 * GIB,
            available_bytes: available_gib * GIB,
            ..Default::default()
        }
    }

    fn check(s: MemorySnapshot, expected: PressureLevel, reason_contains: &str) {
        let v = PressureThresholds::default().classify(&s, 16 * GIB);
        assert_eq!(v.level, expected, "{v:?}");
        assert!(v.reason.contains(reason_contains), "{v:?}");
    }

    #[test]
    fn levels() {
        check(snapshot(100), PressureLevel::Normal, "below");
        check(snapshot(12), PressureLevel::Warning, "headroom");
        check(snapshot(7), PressureLevel::Critical, "half the headroom");
        check(
            MemorySnapshot {
                swap_out_bytes_per_s: 4e6,
                ..snapshot(100)
            },
            PressureLevel::Warning,
            "swapping out",
        );
        check(
            MemorySnapshot {
                swap_out_bytes_per_s: 1e9,
                ..snapshot(100)
            },
            PressureLevel::Critical,
            "swapping out",
        );
        check(
            MemorySnapshot {
                compressed_growth_bytes_per_s: 1e9,
                ..snapshot(100)
            },
            PressureLevel::Warning,
            "compressor",
        );
        check(
            MemorySnapshot {
                psi_full_avg10: Some(7.0),
                ..snapshot(100)
            },
            PressureLevel::Warning,
            "PSI full",
        );
        check(
            MemorySnapshot {
                psi_full_avg10: Some(40.0),
                ..snapshot(100)
            },
            PressureLevel::Critical,
            "PSI full",
        );
        check(
            MemorySnapshot {
                psi_some_avg10: Some(30.0),
                ..snapshot(100)
            },
            PressureLevel::Warning,
            "PSI some",
        );
        check(
            MemorySnapshot {
                os_level: Some(OsPressure::Warn),
                ..snapshot(100)
            },
            PressureLevel::Warning,
            "OS",
        );
        check(
            MemorySnapshot {
                os_level: Some(OsPressure::Critical),
                ..snapshot(100)
            },
            PressureLevel::Critical,
            "OS",
        );
    }

    #[test]
    fn worst_signal_wins_and_nan_is_ignored() {
        let s = MemorySnapshot {
            swap_out_bytes_per_s: f64::NAN,
            psi_full_avg10: Some(f64::INFINITY),
            os_level: Some(OsPressure::Warn),
            ..snapshot(7)
        };
        let v = PressureThresholds::default().classify(&s, 16 * GIB);
        assert_eq!(v.level, PressureLevel::Critical);
        assert_eq!(v.deficit_bytes, 9 * GIB);
    }
}
