//! Linux memory probe: `/proc/meminfo`, `/proc/vmstat` swap counters, PSI from `/proc/pressure/memory`,
//! the process RSS, and a cgroup v2 limit when one is lower than the machine. The parsers take text so
//! they are tested on recorded files; only [`sample`] touches `/proc`.

use ult_policy::MemorySnapshot;

#[cfg_attr(not(target_os = "linux"), allow(unused_imports))]
use super::{Counters, ProbeError};

/// The fields of `/proc/meminfo` ult uses, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemInfo {
    /// MemTotal.
    pub total: u64,
    /// MemAvailable.
    pub available: u64,
    /// SwapTotal.
    pub swap_total: u64,
    /// SwapFree.
    pub swap_free: u64,
    /// Zswap (compressed pool), when present.
    pub zswap: u64,
}

/// Parses `/proc/meminfo` (values in kB).
pub fn parse_meminfo(text: &str) -> Result<MemInfo, String> {
    let mut m = MemInfo::default();
    let mut seen_total = false;
    let mut seen_available = false;
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let (Some(key), Some(value)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Ok(value) = value.parse::<u64>() else {
            continue;
        };
        let bytes = value.saturating_mul(1024);
        match key {
            "MemTotal:" => {
                m.total = bytes;
                seen_total = true;
            }
            "MemAvailable:" => {
                m.available = bytes;
                seen_available = true;
            }
            "SwapTotal:" => m.swap_total = bytes,
            "SwapFree:" => m.swap_free = bytes,
            "Zswap:" => m.zswap = bytes,
            _ => {}
        }
    }
    if !seen_total || !seen_available {
        return Err("MemTotal or MemAvailable missing".into());
    }
    Ok(m)
}

/// Parses `pswpin` and `pswpout` (pages) from `/proc/vmstat`.
pub fn parse_vmstat(text: &str) -> (u64, u64) {
    let mut pswpin = 0;
    let mut pswpout = 0;
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next().and_then(|v| v.parse().ok())) {
            (Some("pswpin"), Some(v)) => pswpin = v,
            (Some("pswpout"), Some(v)) => pswpout = v,
            _ => {}
        }
    }
    (pswpin, pswpout)
}

/// Parses `some avg10` and `full avg10` from `/proc/pressure/memory`.
pub fn parse_psi(text: &str) -> (Option<f64>, Option<f64>) {
    let avg10 = |prefix: &str| {
        text.lines().find(|l| l.starts_with(prefix)).and_then(|l| {
            l.split_whitespace()
                .find_map(|kv| kv.strip_prefix("avg10="))
                .and_then(|v| v.parse().ok())
        })
    };
    (avg10("some"), avg10("full"))
}

/// Parses the RSS (second field, pages) of `/proc/self/statm`.
pub fn parse_statm(text: &str, page_size: u64) -> Option<u64> {
    text.split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|p| p * page_size)
}

/// A cgroup v2 `memory.max` value: None for "max".
pub fn parse_cgroup_max(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// Builds a snapshot from parsed readings; `cgroup` is (limit, usage) when the process is limited.
pub fn snapshot(
    meminfo: &MemInfo,
    cgroup: Option<(u64, u64)>,
    psi: (Option<f64>, Option<f64>),
    rss: u64,
    rates: (f64, f64, f64),
) -> MemorySnapshot {
    let (mut total, mut available) = (meminfo.total, meminfo.available);
    if let Some((limit, usage)) = cgroup
        && limit < total
    {
        total = limit;
        available = available.min(limit.saturating_sub(usage));
    }
    MemorySnapshot {
        total_bytes: total,
        available_bytes: available,
        compressed_bytes: meminfo.zswap,
        compressed_growth_bytes_per_s: rates.2,
        swap_used_bytes: meminfo.swap_total.saturating_sub(meminfo.swap_free),
        swap_in_bytes_per_s: rates.0,
        swap_out_bytes_per_s: rates.1,
        psi_some_avg10: psi.0,
        psi_full_avg10: psi.1,
        os_level: None,
        process_bytes: rss,
        ..Default::default()
    }
}

/// Reads `/proc` now.
#[cfg(target_os = "linux")]
pub fn sample(previous: Option<&Counters>) -> Result<(MemorySnapshot, Counters), ProbeError> {
    let read = |path: &str| {
        std::fs::read_to_string(path).map_err(|e| ProbeError::Read {
            path: path.to_string(),
            source: e,
        })
    };
    let meminfo = parse_meminfo(&read("/proc/meminfo")?).map_err(|reason| ProbeError::Parse {
        path: "/proc/meminfo".into(),
        reason,
    })?;
    const PAGE: u64 = 4096;
    let (pswpin, pswpout) = read("/proc/vmstat")
        .map(|t| parse_vmstat(&t))
        .unwrap_or((0, 0));
    let psi = read("/proc/pressure/memory")
        .map(|t| parse_psi(&t))
        .unwrap_or((None, None));
    let rss = read("/proc/self/statm")
        .ok()
        .and_then(|t| parse_statm(&t, PAGE))
        .unwrap_or(0);
    let cgroup = read("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|t| parse_cgroup_max(&t))
        .zip(
            read("/sys/fs/cgroup/memory.current")
                .ok()
                .and_then(|t| t.trim().parse().ok()),
        );
    let counters = Counters {
        at: std::time::Instant::now(),
        swapped_in: pswpin * PAGE,
        swapped_out: pswpout * PAGE,
        compressed: meminfo.zswap,
    };
    let rates = super::rates(previous, &counters);
    Ok((snapshot(&meminfo, cgroup, psi, rss, rates), counters))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:       24589648 kB\nMemFree:        21980352 kB\nMemAvailable:   23616928 kB\nBuffers:          123456 kB\nSwapTotal:       2097148 kB\nSwapFree:        1048574 kB\nZswap:              2048 kB\n";
    const PSI: &str = "some avg10=1.50 avg60=0.80 avg300=0.10 total=123456\nfull avg10=0.25 avg60=0.00 avg300=0.00 total=2345\n";
    const VMSTAT: &str = "nr_free_pages 5495088\npswpin 120\npswpout 4500\npgfault 1\n";

    #[test]
    fn parses_recorded_files() {
        let m = parse_meminfo(MEMINFO).unwrap();
        assert_eq!(m.total, 24_589_648 * 1024);
        assert_eq!(m.available, 23_616_928 * 1024);
        assert_eq!(m.swap_total - m.swap_free, 1_048_574 * 1024);
        assert_eq!(m.zswap, 2048 * 1024);
        assert_eq!(parse_psi(PSI), (Some(1.5), Some(0.25)));
        assert_eq!(parse_vmstat(VMSTAT), (120, 4500));
        assert_eq!(
            parse_statm("12345 6789 100 1 0 500 0", 4096),
            Some(6789 * 4096)
        );
        assert_eq!(parse_cgroup_max("max\n"), None);
        assert_eq!(parse_cgroup_max("8589934592\n"), Some(8 << 30));
        assert!(parse_meminfo("garbage").is_err());
        assert_eq!(parse_psi("nonsense"), (None, None));
    }

    #[test]
    fn cgroup_limit_shrinks_the_pool() {
        let m = parse_meminfo(MEMINFO).unwrap();
        let s = snapshot(
            &m,
            Some((8 << 30, 6 << 30)),
            (None, None),
            0,
            (0.0, 0.0, 0.0),
        );
        assert_eq!(s.total_bytes, 8 << 30);
        assert_eq!(s.available_bytes, 2 << 30);
        let s = snapshot(&m, Some((u64::MAX, 0)), (None, None), 0, (0.0, 0.0, 0.0));
        assert_eq!(s.total_bytes, m.total);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn reads_this_machine() {
        let (first, counters) = sample(None).unwrap();
        assert!(first.total_bytes > 0);
        assert!(first.available_bytes <= first.total_bytes);
        assert!(first.process_bytes > 0, "RSS of this test process");
        let (second, _) = sample(Some(&counters)).unwrap();
        assert!(second.swap_out_bytes_per_s >= 0.0);
    }
}
