//! Memory snapshots from the OS and their mapping to a pressure level, with documented thresholds, and
//! the hysteresis ([`PressureTracker`]) that keeps the level from flapping near a threshold.

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
    /// OOM events or kills in ult's cgroup since the previous sample (Linux `memory.events` `oom` /
    /// `oom_kill`, v1 `memory.oom_control`); 0 when unknown.
    pub oom_kills_since_last: u64,
    /// Times the cgroup ran into its limit since the previous sample (v2 `memory.events` `high` + `max`,
    /// v1 `memory.failcnt`); 0 when unknown.
    pub limit_events_since_last: u64,
    /// Which limit sizes the pool (`total_bytes`).
    pub pool: PoolSource,
    /// On Metal: its working-set limit and what this process has allocated, beside unified memory.
    pub metal: Option<MetalView>,
}

/// The limit that sizes the governed pool: the smallest of the machine's memory, ult's cgroup limits
/// (its own and its ancestors') and, with models on a GPU, the device's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PoolSource {
    /// The machine's memory (or a source that does not say).
    #[default]
    Machine,
    /// A cgroup v1 `memory.limit_in_bytes`.
    CgroupV1 {
        /// The limit file, as a path on this machine.
        path: &'static str,
    },
    /// A cgroup v2 `memory.max` or `memory.high`.
    CgroupV2 {
        /// The limit file, as a path on this machine.
        path: &'static str,
    },
    /// The GPU's memory.
    Device,
    /// Metal's working-set limit (`recommendedMaxWorkingSetSize`), below unified memory.
    MetalWorkingSet,
}

/// What Metal allows this process beside unified memory (both in bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MetalView {
    /// `recommendedMaxWorkingSetSize`: the most Metal buffers this process should hold.
    pub working_set_limit: u64,
    /// `currentAllocatedSize`: what it holds now.
    pub allocated: u64,
    /// Unified memory in all (the machine's pool before Metal's limit).
    pub unified_total: u64,
}

impl fmt::Display for PoolSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Machine => f.write_str("machine"),
            Self::CgroupV1 { path } => write!(f, "cgroup v1 {path}"),
            Self::CgroupV2 { path } => write!(f, "cgroup v2 {path}"),
            Self::Device => f.write_str("device"),
            Self::MetalWorkingSet => {
                f.write_str("Metal working set (recommendedMaxWorkingSetSize)")
            }
        }
    }
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
/// | signal | Warning | Critical | a level is held while (hysteresis) |
/// |---|---|---|---|
/// | available bytes | < headroom | < headroom / 2 | < 1.1 × its threshold |
/// | swap-out rate | ≥ `swap_out_warning` | ≥ `swap_out_critical` | ≥ 0.8 × its threshold |
/// | compressor growth | ≥ `compressor_growth_warning` | — | ≥ 0.8 × its threshold |
/// | PSI full avg10 | ≥ `psi_full_warning` | ≥ `psi_full_critical` | ≥ 0.8 × its threshold |
/// | PSI some avg10 | ≥ `psi_some_warning` | — | ≥ 0.8 × its threshold |
/// | OS level (macOS) | warn | critical | the same |
/// | cgroup limit hits since the last sample | > 0 | — | the same |
/// | cgroup OOM events or kills since the last sample | — | > 0 | the same |
///
/// A level is entered at once when a sample reaches its threshold ([`classify`](Self::classify)). It
/// is left only when the samples fall below the "held while" column ([`classify_leaving`](
/// Self::classify_leaving), factors `leave_available_factor` and `leave_rate_factor`) and stay there for
/// the dwell ([`PressureTracker`]).
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
    /// A level entered on available bytes is held until available reaches this multiple of its
    /// threshold (default 1.1).
    pub leave_available_factor: f64,
    /// A level entered on a rate or PSI is held until the signal falls below this fraction of its
    /// threshold (default 0.8).
    pub leave_rate_factor: f64,
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
            leave_available_factor: 1.1,
            leave_rate_factor: 0.8,
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
    /// Classifies `snapshot` given the configured `headroom_bytes`: the level a sample enters.
    pub fn classify(&self, snapshot: &MemorySnapshot, headroom_bytes: u64) -> Verdict {
        self.classify_scaled(snapshot, headroom_bytes, 1.0, 1.0, "")
    }

    /// The level `snapshot` holds under the leave thresholds (the last column of the table): never
    /// lower than [`classify`](Self::classify)'s. A tracked level above it may step down to it.
    pub fn classify_leaving(&self, snapshot: &MemorySnapshot, headroom_bytes: u64) -> Verdict {
        let bytes = finite_or_zero(self.leave_available_factor).max(1.0);
        let rates = finite_or_zero(self.leave_rate_factor).clamp(0.0, 1.0);
        self.classify_scaled(
            snapshot,
            headroom_bytes,
            bytes,
            rates,
            "not yet recovered: ",
        )
    }

    fn classify_scaled(
        &self,
        snapshot: &MemorySnapshot,
        headroom_bytes: u64,
        bytes_factor: f64,
        rate_factor: f64,
        prefix: &str,
    ) -> Verdict {
        let mut level = PressureLevel::Normal;
        let mut reason = String::from("all signals below their thresholds");
        let mut raise = |candidate: PressureLevel, why: String| {
            if candidate > level {
                level = candidate;
                reason = format!("{prefix}{why}");
            }
        };
        let scale = |bytes: u64| (bytes as f64 * bytes_factor) as u64;
        let available = snapshot.available_bytes;
        let (critical_bytes, warning_bytes) = (scale(headroom_bytes / 2), scale(headroom_bytes));
        let times = if bytes_factor > 1.0 {
            format!("{bytes_factor} × ")
        } else {
            String::new()
        };
        if available < critical_bytes {
            raise(
                PressureLevel::Critical,
                format!(
                    "available {} < {times}half the headroom {}",
                    crate::format_bytes(available),
                    crate::format_bytes(critical_bytes)
                ),
            );
        } else if available < warning_bytes {
            raise(
                PressureLevel::Warning,
                format!(
                    "available {} < {times}headroom {}",
                    crate::format_bytes(available),
                    crate::format_bytes(warning_bytes)
                ),
            );
        }
        let swap_out = finite_or_zero(snapshot.swap_out_bytes_per_s);
        if swap_out >= self.swap_out_critical * rate_factor {
            raise(
                PressureLevel::Critical,
                format!("swapping out {}/s", rate(swap_out)),
            );
        } else if swap_out >= self.swap_out_warning * rate_factor {
            raise(
                PressureLevel::Warning,
                format!("swapping out {}/s", rate(swap_out)),
            );
        }
        let growth = finite_or_zero(snapshot.compressed_growth_bytes_per_s);
        if growth >= self.compressor_growth_warning * rate_factor {
            raise(
                PressureLevel::Warning,
                format!("compressor growing {}/s", rate(growth)),
            );
        }
        if let Some(full) = snapshot.psi_full_avg10.map(finite_or_zero) {
            if full >= self.psi_full_critical * rate_factor {
                raise(
                    PressureLevel::Critical,
                    format!("PSI full avg10 {full:.1}%"),
                );
            } else if full >= self.psi_full_warning * rate_factor {
                raise(PressureLevel::Warning, format!("PSI full avg10 {full:.1}%"));
            }
        }
        if let Some(some) = snapshot.psi_some_avg10.map(finite_or_zero)
            && some >= self.psi_some_warning * rate_factor
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
        if snapshot.oom_kills_since_last > 0 {
            raise(
                PressureLevel::Critical,
                format!(
                    "{} OOM event(s) in the cgroup since the last sample",
                    snapshot.oom_kills_since_last
                ),
            );
        }
        if snapshot.limit_events_since_last > 0 {
            raise(
                PressureLevel::Warning,
                format!(
                    "the cgroup hit its memory limit {} time(s) since the last sample",
                    snapshot.limit_events_since_last
                ),
            );
        }
        Verdict {
            level,
            reason,
            deficit_bytes: headroom_bytes.saturating_sub(available),
        }
    }
}

/// A change of the tracked pressure level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LevelChange {
    /// The level before.
    pub from: PressureLevel,
    /// The level now.
    pub to: PressureLevel,
}

/// The pressure level with hysteresis, fed one snapshot at a time with the caller's clock (`now` in
/// milliseconds; it reads none itself).
///
/// - Up is immediate: a sample that [`classify`](PressureThresholds::classify)es above the level raises
///   it at once, because pressure must be acted on now.
/// - Down takes two conditions: the samples fall below the level's leave thresholds
///   ([`classify_leaving`](PressureThresholds::classify_leaving): 10% more available than the
///   threshold, rates and PSI under 80% of theirs), and no sample has held the level for `dwell_ms`.
///   Then the level steps down to the highest level the calm samples held (Critical may go straight to
///   Normal when every sample since was normal).
///
/// So a signal oscillating around a threshold changes the level once, not at every crossing.
#[derive(Debug, Clone, PartialEq)]
pub struct PressureTracker {
    /// The tracked level and the reason that put or holds it there.
    verdict: Verdict,
    /// The latest sample's own verdict, without hysteresis.
    sample: Verdict,
    /// When the tracked level was entered.
    since_ms: u64,
    /// The latest sample that held the tracked level.
    held_ms: u64,
    /// The reason of that sample.
    held_reason: String,
    /// The highest level the samples since `held_ms` held (below the tracked level).
    easing_to: PressureLevel,
}

impl Default for PressureTracker {
    fn default() -> Self {
        Self::new()
    }
}

impl PressureTracker {
    /// Normal, before any sample.
    pub fn new() -> Self {
        let verdict = Verdict {
            level: PressureLevel::Normal,
            reason: "no memory sample yet".into(),
            deficit_bytes: 0,
        };
        Self {
            sample: verdict.clone(),
            held_reason: verdict.reason.clone(),
            verdict,
            since_ms: 0,
            held_ms: 0,
            easing_to: PressureLevel::Normal,
        }
    }

    /// The tracked level.
    pub fn level(&self) -> PressureLevel {
        self.verdict.level
    }

    /// The tracked verdict: its level, why, and the latest sample's deficit.
    pub fn verdict(&self) -> &Verdict {
        &self.verdict
    }

    /// The latest sample's own verdict, without hysteresis: what shedding acts on.
    pub fn sample(&self) -> &Verdict {
        &self.sample
    }

    /// When the tracked level was entered.
    pub fn since_ms(&self) -> u64 {
        self.since_ms
    }

    /// Feeds one snapshot taken at `now`; returns the change of level, if any.
    pub fn observe(
        &mut self,
        thresholds: &PressureThresholds,
        snapshot: &MemorySnapshot,
        headroom_bytes: u64,
        dwell_ms: u64,
        now: u64,
    ) -> Option<LevelChange> {
        let entered = thresholds.classify(snapshot, headroom_bytes);
        let from = self.verdict.level;
        let mut change = None;
        if entered.level >= from {
            if entered.level > from {
                change = Some(LevelChange {
                    from,
                    to: entered.level,
                });
                self.since_ms = now;
            }
            self.hold(now, entered.reason.clone());
        } else {
            let leaving = thresholds.classify_leaving(snapshot, headroom_bytes);
            if leaving.level >= from {
                // Inside the band between the enter and the leave thresholds: still held.
                self.hold(now, leaving.reason);
            } else {
                self.easing_to = self.easing_to.max(leaving.level);
                let calm_ms = now.saturating_sub(self.held_ms);
                if calm_ms >= dwell_ms {
                    let to = self.easing_to;
                    change = Some(LevelChange { from, to });
                    self.since_ms = now;
                    let reason = if to == entered.level {
                        entered.reason.clone()
                    } else {
                        leaving.reason
                    };
                    self.verdict.level = to;
                    self.hold(now, reason);
                } else {
                    self.verdict.reason = format!(
                        "{} (recovering: calm for {calm_ms} ms of {dwell_ms} ms)",
                        self.held_reason
                    );
                }
            }
        }
        self.verdict.deficit_bytes = entered.deficit_bytes;
        self.sample = entered;
        if let Some(c) = change {
            self.verdict.level = c.to;
        }
        change
    }

    /// A sample at `now` justified the tracked level (once it is set) for `reason`.
    fn hold(&mut self, now: u64, reason: String) {
        self.held_ms = now;
        self.easing_to = PressureLevel::Normal;
        self.verdict.reason = reason.clone();
        self.held_reason = reason;
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

    const MIB: u64 = 1 << 20;

    /// Available MiB every 500 ms for 10 s against a 4 GiB headroom, oscillating around it (the shape of
    /// the flapping seen in issue 13: six level changes in ten seconds without hysteresis).
    const NEAR_THRESHOLD: [u64; 20] = [
        4300, 4010, 4150, 3980, 4120, 4230, 3950, 4060, 4180, 3990, 4210, 4080, 3970, 4140, 4260,
        4020, 4190, 3940, 4110, 4240,
    ];

    fn mib(available_mib: u64) -> MemorySnapshot {
        MemorySnapshot {
            total_bytes: 64 * GIB,
            available_bytes: available_mib * MIB,
            ..Default::default()
        }
    }

    /// Feeds `(t_ms, snapshot)` to a tracker with a 5 s dwell; returns its changes with their times.
    fn run(
        tracker: &mut PressureTracker,
        trace: impl IntoIterator<Item = (u64, MemorySnapshot)>,
    ) -> Vec<(u64, LevelChange)> {
        let t = PressureThresholds::default();
        trace
            .into_iter()
            .filter_map(|(now, s)| {
                tracker
                    .observe(&t, &s, 4 * GIB, 5_000, now)
                    .map(|c| (now, c))
            })
            .collect()
    }

    fn near_threshold() -> impl Iterator<Item = (u64, MemorySnapshot)> {
        NEAR_THRESHOLD
            .iter()
            .enumerate()
            .map(|(i, &m)| (i as u64 * 500, mib(m)))
    }

    #[test]
    fn a_signal_oscillating_around_the_headroom_changes_the_level_once() {
        // Without hysteresis the trace flaps.
        let t = PressureThresholds::default();
        let levels: Vec<_> = near_threshold()
            .map(|(_, s)| t.classify(&s, 4 * GIB).level)
            .collect();
        let flaps = levels.windows(2).filter(|w| w[0] != w[1]).count();
        assert!(flaps >= 6, "{levels:?}");
        // With it: Warning at the first dip, held for the whole trace.
        let mut tracker = PressureTracker::new();
        let changes = run(&mut tracker, near_threshold());
        assert_eq!(
            changes,
            vec![(
                500,
                LevelChange {
                    from: PressureLevel::Normal,
                    to: PressureLevel::Warning
                }
            )]
        );
        assert_eq!(tracker.level(), PressureLevel::Warning);
        assert_eq!(tracker.since_ms(), 500);
        // The last sample (4240 MiB) is itself normal: shedding sees that, the level does not.
        assert_eq!(tracker.sample().level, PressureLevel::Normal);
        assert!(
            tracker.verdict().reason.contains("not yet recovered"),
            "{:?}",
            tracker.verdict()
        );
    }

    #[test]
    fn a_rise_is_immediate_and_a_fall_waits_for_the_dwell() {
        let mut tracker = PressureTracker::new();
        run(&mut tracker, near_threshold());
        // A real fall to under half the headroom: Critical on that very sample.
        let changes = run(&mut tracker, [(10_000, mib(1800))]);
        assert_eq!(changes[0].1.to, PressureLevel::Critical);
        // Memory comes back well above the band: nothing for 5 s after the last critical sample, then
        // straight to Normal.
        let recovery = (21..=32).map(|i| (i * 500, mib(6000)));
        let changes = run(&mut tracker, recovery);
        assert_eq!(
            changes,
            vec![(
                15_000,
                LevelChange {
                    from: PressureLevel::Critical,
                    to: PressureLevel::Normal
                }
            )]
        );
        assert_eq!(
            tracker.verdict().reason,
            "all signals below their thresholds"
        );
    }

    #[test]
    fn a_fall_into_the_band_steps_down_to_the_level_it_still_holds() {
        let mut tracker = PressureTracker::new();
        run(&mut tracker, [(0, mib(1000))]);
        assert_eq!(tracker.level(), PressureLevel::Critical);
        // 4200 MiB is above the headroom but inside its 10% band: Warning is held, Critical is not.
        let changes = run(&mut tracker, (1..=12).map(|i| (i * 1000, mib(4200))));
        assert_eq!(
            changes,
            vec![(
                5_000,
                LevelChange {
                    from: PressureLevel::Critical,
                    to: PressureLevel::Warning
                }
            )]
        );
        // A dip back under the headroom holds Warning again: the dwell restarts from it.
        let changes = run(&mut tracker, [(13_000, mib(2100)), (15_000, mib(5000))]);
        assert!(changes.is_empty(), "{changes:?}");
        assert!(
            tracker.verdict().reason.contains("recovering"),
            "{:?}",
            tracker.verdict()
        );
        let changes = run(&mut tracker, [(18_000, mib(5000))]);
        assert_eq!(changes[0].1.to, PressureLevel::Normal);
    }

    #[test]
    fn psi_has_a_band_too_and_oom_kills_are_critical_at_once() {
        let psi = |some: f64| MemorySnapshot {
            psi_some_avg10: Some(some),
            ..mib(60_000)
        };
        let mut tracker = PressureTracker::new();
        // Enters at 25%, held at 21% (≥ 0.8 × 25), calm at 19%.
        let changes = run(
            &mut tracker,
            [(0, psi(26.0)), (4_000, psi(21.0)), (8_000, psi(19.0))],
        );
        assert_eq!(changes.len(), 1);
        let changes = run(&mut tracker, [(9_000, psi(19.0))]);
        assert_eq!(
            changes[0].1.to,
            PressureLevel::Normal,
            "held at 4 s, calm for 5 s"
        );
        let oom = MemorySnapshot {
            oom_kills_since_last: 1,
            ..mib(60_000)
        };
        let changes = run(&mut tracker, [(10_000, oom), (10_500, mib(60_000))]);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].1.to, PressureLevel::Critical);
        assert!(
            tracker.verdict().reason.contains("OOM"),
            "{:?}",
            tracker.verdict()
        );
        let limit_hits = MemorySnapshot {
            limit_events_since_last: 3,
            ..mib(60_000)
        };
        let v = PressureThresholds::default().classify(&limit_hits, 4 * GIB);
        assert_eq!(v.level, PressureLevel::Warning);
        assert!(v.reason.contains("limit 3 time"), "{v:?}");
    }
}
