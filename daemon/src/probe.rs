//! Memory probes: sample the governed pool into a portable [`MemorySnapshot`] about every 500 ms.
//!
//! The OS-specific parts are small: `linux` reads `/proc` and ultd's memory cgroup (the parsers and
//! readers are portable and tested on recorded text and trees), `macos` calls `host_statistics64` and sysctl to fill a plain [`macos::VmCounters`]
//! (the arithmetic over it is portable and tested on recorded numbers), `cuda` asks the driver for free
//! and total device memory. A `file` source replays snapshots written by tests; it is for tests only.

pub mod linux;
pub mod macos;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use ult_policy::{MemorySnapshot, PoolSource};

/// Where snapshots come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeSource {
    /// The operating system (and the GPU, when models run on one).
    Os,
    /// A JSON file rewritten by a test: `{"total_bytes": …, "available_bytes": …, …}`. For tests only.
    File(PathBuf),
}

/// Why a sample failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// A counter file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A counter file did not parse.
    #[error("cannot parse {path}: {reason}")]
    Parse {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// This platform has no probe.
    #[error("no memory probe for this platform")]
    Unsupported,
}

/// Cumulative counters kept between samples to turn them into rates.
#[derive(Debug, Clone, Copy)]
pub struct Counters {
    /// When they were read.
    pub at: Instant,
    /// Bytes swapped in so far.
    pub swapped_in: u64,
    /// Bytes swapped out so far.
    pub swapped_out: u64,
    /// Compressed bytes now.
    pub compressed: u64,
    /// The cgroup's OOM and limit counters, where there is a cgroup.
    pub events: Option<MemoryEvents>,
}

/// Cumulative memory events of one cgroup (Linux), turned into increases between samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryEvents {
    /// The cgroup directory they were read from: increases are counted only within one cgroup.
    pub cgroup: &'static str,
    /// v2 `oom`: times the limit was hit and the OOM killer invoked (0 on v1).
    pub oom: u64,
    /// Processes of the cgroup killed by an OOM killer (v2 `oom_kill`, v1 `oom_control`'s `oom_kill`).
    pub oom_kill: u64,
    /// Times the cgroup ran into a limit: v2 `high` + `max`, v1 `memory.failcnt`.
    pub limit_hits: u64,
    /// v1 `under_oom 1`: the cgroup is out of memory now.
    pub under_oom: bool,
}

/// (OOM events or kills, limit hits) since `previous`: the larger of the `oom` and `oom_kill`
/// increases (at least 1 while v1 reports `under_oom`), and the increase of the limit hits. Nothing is
/// counted on the first sample or across a move to another cgroup.
pub fn event_increases(previous: Option<&MemoryEvents>, now: Option<&MemoryEvents>) -> (u64, u64) {
    let Some(now) = now else {
        return (0, 0);
    };
    let under = u64::from(now.under_oom);
    match previous {
        Some(p) if p.cgroup == now.cgroup => (
            now.oom
                .saturating_sub(p.oom)
                .max(now.oom_kill.saturating_sub(p.oom_kill))
                .max(under),
            now.limit_hits.saturating_sub(p.limit_hits),
        ),
        _ => (under, 0),
    }
}

/// A `'static` copy of `path`, made once per distinct path, so snapshots naming a cgroup file stay
/// `Copy`. A process sees a handful of distinct cgroup paths in its life (one, unless it is moved), so
/// what this keeps is bounded.
pub fn intern(path: &str) -> &'static str {
    static PATHS: OnceLock<Mutex<BTreeSet<&'static str>>> = OnceLock::new();
    let mut paths = PATHS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(p) = paths.get(path) {
        return p;
    }
    let p: &'static str = Box::leak(path.to_owned().into_boxed_str());
    paths.insert(p);
    p
}

/// Samples the governed pool.
#[derive(Debug)]
pub struct Prober {
    source: ProbeSource,
    previous: Option<Counters>,
    /// The pool of the latest sample, to log when it changes.
    pool: Option<PoolSource>,
    /// (device handle, bytes the device had in use before ult loaded anything): a discrete GPU.
    device: Option<(candle_core::Device, u64)>,
    /// A Metal device: unified memory, capped by Metal's working-set limit.
    metal: Option<candle_core::Device>,
}

impl Prober {
    /// A prober; with a GPU `device`, the governed pool is that device's memory.
    pub fn new(source: ProbeSource, device: &candle_core::Device) -> Self {
        let (device, metal) = match device {
            candle_core::Device::Cpu => (None, None),
            d @ candle_core::Device::Metal(_) => (None, Some(d.clone())),
            d => (
                device_memory(d, true).map(|(free, total)| (d.clone(), total.saturating_sub(free))),
                None,
            ),
        };
        Self {
            source,
            previous: None,
            pool: None,
            device,
            metal,
        }
    }

    /// Takes one sample.
    pub fn sample(&mut self) -> Result<MemorySnapshot, ProbeError> {
        let snapshot = self.sample_pool()?;
        if self.pool != Some(snapshot.pool) {
            tracing::info!(
                pool = %snapshot.pool,
                total_bytes = snapshot.total_bytes,
                "governed memory pool"
            );
            self.pool = Some(snapshot.pool);
        }
        Ok(snapshot)
    }

    fn sample_pool(&mut self) -> Result<MemorySnapshot, ProbeError> {
        match &self.source {
            ProbeSource::File(path) => read_file_snapshot(path),
            ProbeSource::Os => {
                let (mut snapshot, counters) = os_sample(self.previous.as_ref())?;
                self.previous = Some(counters);
                if let Some((device, baseline)) = &self.device
                    && let Some((free, total)) = device_memory(device, false)
                {
                    // On a GPU the pool is device memory; ult's share is what is in use beyond what was in
                    // use before it loaded anything.
                    snapshot.total_bytes = total;
                    snapshot.available_bytes = free;
                    snapshot.process_bytes = total.saturating_sub(free).saturating_sub(*baseline);
                    snapshot.pool = PoolSource::Device;
                }
                if let Some(m) = self
                    .metal
                    .as_ref()
                    .and_then(|d| ult_engine::device::metal(d, false))
                {
                    cap_by_metal(&mut snapshot, m);
                }
                Ok(snapshot)
            }
        }
    }

    /// The size of the governed pool now (for resolving a percentage ceiling).
    pub fn pool_total(&mut self) -> Result<u64, ProbeError> {
        self.sample().map(|s| s.total_bytes)
    }
}

#[cfg(target_os = "linux")]
fn os_sample(previous: Option<&Counters>) -> Result<(MemorySnapshot, Counters), ProbeError> {
    linux::sample(previous)
}

#[cfg(target_os = "macos")]
fn os_sample(previous: Option<&Counters>) -> Result<(MemorySnapshot, Counters), ProbeError> {
    macos::sample(previous)
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
fn os_sample(_previous: Option<&Counters>) -> Result<(MemorySnapshot, Counters), ProbeError> {
    Err(ProbeError::Unsupported)
}

/// Samples every `interval`, or at once when `wake` fires (the OS announced a pressure change), handing
/// each sample to `send` until it returns false. With no wake source (its sender gone) it only polls.
pub fn sample_loop(
    prober: &mut Prober,
    interval: std::time::Duration,
    wake: &std::sync::mpsc::Receiver<()>,
    mut send: impl FnMut(MemorySnapshot) -> bool,
) {
    let mut events = true;
    loop {
        if events {
            match wake.recv_timeout(interval) {
                Ok(()) => while wake.try_recv().is_ok() {},
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => events = false,
            }
        }
        if !events {
            std::thread::sleep(interval);
        }
        match prober.sample() {
            Ok(s) => {
                if !send(s) {
                    return;
                }
            }
            Err(e) => tracing::debug!(error = %e, "memory sample failed"),
        }
    }
}

/// On Apple silicon, Metal's buffers live in unified memory, but Metal caps what one process should hold at
/// its working-set limit (`recommendedMaxWorkingSetSize`, about 84% of unified memory stock; raised by
/// `sudo sysctl iogpu.wired_limit_mb=N`). Models that "fit" in unified memory but not under that limit
/// would fail or page, so the governed pool is the smaller of the two, available is at most what the limit
/// leaves (as ggml-metal counts free: limit − allocated), and ult's share is at least what Metal holds.
pub fn cap_by_metal(s: &mut MemorySnapshot, m: ult_engine::device::MetalCounters) {
    s.metal = Some(ult_policy::MetalView {
        working_set_limit: m.working_set_limit,
        allocated: m.allocated,
        unified_total: s.total_bytes,
    });
    if m.working_set_limit < s.total_bytes {
        s.total_bytes = m.working_set_limit;
        s.pool = PoolSource::MetalWorkingSet;
    }
    s.available_bytes = s
        .available_bytes
        .min(m.working_set_limit.saturating_sub(m.allocated));
    s.process_bytes = s.process_bytes.max(m.allocated);
}

/// This process's resident memory in bytes, where the OS tells.
pub fn process_rss() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|t| linux::parse_statm(&t, 4096))
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// Rates between two counter readings, per second.
pub fn rates(previous: Option<&Counters>, now: &Counters) -> (f64, f64, f64) {
    let Some(p) = previous else {
        return (0.0, 0.0, 0.0);
    };
    let dt = now.at.duration_since(p.at).as_secs_f64();
    if dt <= 0.0 {
        return (0.0, 0.0, 0.0);
    }
    (
        now.swapped_in.saturating_sub(p.swapped_in) as f64 / dt,
        now.swapped_out.saturating_sub(p.swapped_out) as f64 / dt,
        (now.compressed as f64 - p.compressed as f64) / dt,
    )
}

/// Parses a snapshot file written by a test. Keys missing are 0 (or unknown); `pool` is `machine`,
/// `cgroup-v1` or `cgroup-v2` (with `pool_path`) or `device`.
fn read_file_snapshot(path: &std::path::Path) -> Result<MemorySnapshot, ProbeError> {
    let text = std::fs::read_to_string(path).map_err(|e| ProbeError::Read {
        path: path.display().to_string(),
        source: e,
    })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ProbeError::Parse {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let u = |k: &str| v[k].as_u64().unwrap_or(0);
    let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
    Ok(MemorySnapshot {
        total_bytes: u("total_bytes"),
        available_bytes: u("available_bytes"),
        compressed_bytes: u("compressed_bytes"),
        compressed_growth_bytes_per_s: f("compressed_growth_bytes_per_s"),
        swap_used_bytes: u("swap_used_bytes"),
        swap_in_bytes_per_s: f("swap_in_bytes_per_s"),
        swap_out_bytes_per_s: f("swap_out_bytes_per_s"),
        psi_some_avg10: v["psi_some_avg10"].as_f64(),
        psi_full_avg10: v["psi_full_avg10"].as_f64(),
        os_level: match v["os_level"].as_str() {
            Some("warn") => Some(ult_policy::OsPressure::Warn),
            Some("critical") => Some(ult_policy::OsPressure::Critical),
            Some("normal") => Some(ult_policy::OsPressure::Normal),
            _ => None,
        },
        process_bytes: u("process_bytes"),
        oom_kills_since_last: u("oom_kills_since_last"),
        limit_events_since_last: u("limit_events_since_last"),
        pool: match (v["pool"].as_str(), v["pool_path"].as_str()) {
            (Some("cgroup-v1"), Some(p)) => PoolSource::CgroupV1 { path: intern(p) },
            (Some("cgroup-v2"), Some(p)) => PoolSource::CgroupV2 { path: intern(p) },
            (Some("device"), _) => PoolSource::Device,
            _ => PoolSource::Machine,
        },
        metal: None,
    })
}

pub use ult_engine::device::memory as device_memory;

#[cfg(test)]
mod tests {
    use super::*;
    use ult_engine::device::MetalCounters;

    const GIB: u64 = 1 << 30;

    fn mac(total_gib: u64, available_gib: u64, rss_gib: u64) -> MemorySnapshot {
        MemorySnapshot {
            total_bytes: total_gib * GIB,
            available_bytes: available_gib * GIB,
            process_bytes: rss_gib * GIB,
            ..Default::default()
        }
    }

    /// A 128 GiB Mac reports a working-set limit of about 107.5 GiB stock: that is the pool, not 128.
    #[test]
    fn metals_working_set_limit_caps_unified_memory() {
        let limit = 107 * GIB + GIB / 2;
        let mut s = mac(128, 110, 1);
        cap_by_metal(
            &mut s,
            MetalCounters {
                working_set_limit: limit,
                allocated: 0,
            },
        );
        assert_eq!(s.total_bytes, limit);
        assert_eq!(s.pool, PoolSource::MetalWorkingSet);
        assert_eq!(
            s.available_bytes, limit,
            "110 GiB free, but Metal allows 107.5"
        );
        let m = s.metal.unwrap();
        assert_eq!((m.unified_total, m.working_set_limit), (128 * GIB, limit));
        // 100 GiB of models on the GPU: what Metal leaves is the limit less that, however much is free.
        let mut s = mac(128, 20, 101);
        cap_by_metal(
            &mut s,
            MetalCounters {
                working_set_limit: limit,
                allocated: 100 * GIB,
            },
        );
        assert_eq!(s.available_bytes, 7 * GIB + GIB / 2);
        assert_eq!(s.process_bytes, 101 * GIB);
    }

    /// A pressure event samples at once, long before the interval; without a source the loop polls.
    #[test]
    fn a_pressure_event_samples_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        std::fs::write(&path, r#"{"total_bytes": 100, "available_bytes": 50}"#).unwrap();
        let mut prober = Prober::new(ProbeSource::File(path), &candle_core::Device::Cpu);
        let (wake, rx) = std::sync::mpsc::channel();
        let (out, samples) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            sample_loop(
                &mut prober,
                std::time::Duration::from_secs(3600),
                &rx,
                |s| out.send(s).is_ok(),
            );
        });
        wake.send(()).unwrap();
        // The interval is an hour: only the wake can bring a sample within a minute.
        let s = samples
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("a sample on the wake");
        assert_eq!(s.available_bytes, 50);
        drop(samples);
        wake.send(()).unwrap();
        t.join().unwrap();
    }

    /// With `iogpu.wired_limit_mb` raised past unified memory's free share, unified memory binds again.
    #[test]
    fn a_raised_wired_limit_leaves_unified_memory_binding() {
        let mut s = mac(512, 300, 2);
        cap_by_metal(
            &mut s,
            MetalCounters {
                working_set_limit: 600 * GIB,
                allocated: GIB,
            },
        );
        assert_eq!(s.total_bytes, 512 * GIB);
        assert_eq!(s.pool, PoolSource::Machine);
        assert_eq!(s.available_bytes, 300 * GIB);
        assert_eq!(
            s.process_bytes,
            2 * GIB,
            "RSS counts the GPU buffers already"
        );
    }
}
