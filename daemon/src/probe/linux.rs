//! Linux memory probe: `/proc/meminfo`, `/proc/vmstat` swap counters, PSI, the process RSS, and ultd's
//! own memory cgroup (v1 or v2, found from `/proc/self/cgroup` and `/proc/self/mountinfo`): the smallest
//! limit from its cgroup up through its ancestors, that cgroup's PSI in preference to the system's, and
//! its OOM and limit events. The parsers take text and the readers take a filesystem root, so both are
//! tested on recorded files and trees (`daemon/tests/fixtures/cgroup`); only [`sample`] reads `/`.

use std::path::{Component, Path, PathBuf};
use std::time::Instant;

use ult_policy::{MemorySnapshot, PoolSource};

use super::{Counters, MemoryEvents, ProbeError};
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

/// A cgroup v2 `memory.max` or `memory.high` value: None for "max".
pub fn parse_cgroup_max(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// A cgroup v1 `memory.limit_in_bytes` value: None for "unlimited", which v1 writes as the largest
/// page-aligned signed 64-bit number (9223372036854771712, about 2^63).
pub fn parse_cgroup_v1_limit(text: &str) -> Option<u64> {
    text.trim().parse().ok().filter(|&v: &u64| v < 1 << 62)
}

/// The value of `key` in a flat-keyed cgroup file (`memory.events`, `memory.stat`, `memory.oom_control`:
/// one `key value` a line).
pub fn parse_flat_keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut parts = line.split_whitespace();
        (parts.next() == Some(key))
            .then(|| parts.next()?.parse().ok())
            .flatten()
    })
}

/// A cgroup hierarchy version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// cgroup v1: one hierarchy per controller (or group of controllers).
    V1,
    /// cgroup v2: the unified hierarchy.
    V2,
}

/// The cgroups `/proc/self/cgroup` names for the memory controller, in order of preference: a v1 line
/// that lists `memory` (`4:memory:/x`, `4:cpu,memory:/x`) first — on a hybrid host the memory
/// controller is there and the v2 hierarchy has none — then the v2 line (`0::/x`).
pub fn parse_proc_cgroup(text: &str) -> Vec<(CgroupVersion, String)> {
    let mut v1 = Vec::new();
    let mut v2 = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            v2.push((CgroupVersion::V2, path.to_string()));
        } else if controllers.split(',').any(|c| c == "memory") {
            v1.push((CgroupVersion::V1, path.to_string()));
        }
    }
    v1.extend(v2);
    v1
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The path inside the filesystem that is mounted (not `/` for a bind mount or a namespaced
    /// cgroup root).
    pub root: String,
    /// Where it is mounted.
    pub mount_point: String,
    /// The filesystem type (`cgroup2`, `cgroup`, …).
    pub fs_type: String,
    /// The per-superblock options (for v1 cgroups they name the controllers).
    pub super_options: Vec<String>,
}

/// Parses `/proc/self/mountinfo`: `id parent major:minor root mount-point options [optional…] - type
/// source super-options`, with spaces and the like escaped as octal (`\040`). Malformed lines are
/// skipped.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let mut right = right.split(' ');
            let (root, mount_point) = (left.get(3)?, left.get(4)?);
            let fs_type = right.next()?;
            let _source = right.next()?;
            let super_options = right.next().unwrap_or("");
            Some(Mount {
                root: unescape(root),
                mount_point: unescape(mount_point),
                fs_type: fs_type.to_string(),
                super_options: super_options.split(',').map(str::to_string).collect(),
            })
        })
        .collect()
}

fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push(
                    d.iter()
                        .fold(0u8, |v, b| v.wrapping_mul(8).wrapping_add(b - b'0')),
                );
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where ultd's memory cgroup lies on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupLocation {
    /// The hierarchy version.
    pub version: CgroupVersion,
    /// ultd's cgroup directory (absolute, e.g. `/sys/fs/cgroup/system.slice/ultd.service`).
    pub dir: PathBuf,
    /// The hierarchy's mount point: the walk up through ancestors stops there.
    pub mount_point: PathBuf,
}

/// Finds ultd's memory cgroup from the text of `/proc/self/cgroup` and `/proc/self/mountinfo`. A mount
/// whose root is not `/` (a container's namespaced or bind-mounted cgroup) shows the cgroup at the
/// mount point when the root is the cgroup itself, or at the part of the path below the root; a cgroup
/// outside every visible root (a path with `..`) is read at the mount point, the closest visible one.
pub fn locate_cgroup(proc_cgroup: &str, mountinfo: &str) -> Option<CgroupLocation> {
    let mounts = parse_mountinfo(mountinfo);
    parse_proc_cgroup(proc_cgroup)
        .into_iter()
        .find_map(|(version, path)| {
            let fits = |m: &&Mount| match version {
                CgroupVersion::V2 => m.fs_type == "cgroup2",
                CgroupVersion::V1 => {
                    m.fs_type == "cgroup" && m.super_options.iter().any(|o| o == "memory")
                }
            };
            let candidates: Vec<&Mount> = mounts.iter().filter(fits).collect();
            let (mount, relative) = candidates
                .iter()
                .find_map(|m| relative_to(&path, &m.root).map(|r| (*m, r)))
                .or_else(|| candidates.first().map(|m| (*m, "")))?;
            let mount_point = PathBuf::from(&mount.mount_point);
            Some(CgroupLocation {
                version,
                dir: mount_point.join(relative),
                mount_point,
            })
        })
}

/// `path` below `root` (both absolute cgroup paths), or None when it is not below it.
fn relative_to<'a>(path: &'a str, root: &str) -> Option<&'a str> {
    if Path::new(path)
        .components()
        .any(|c| matches!(c, Component::ParentDir))
    {
        return None;
    }
    let rest = match root.trim_end_matches('/') {
        "" => path,
        root => path.strip_prefix(root)?,
    };
    if rest.is_empty() {
        Some("")
    } else {
        rest.strip_prefix('/')
    }
}

/// One memory limit on the way from ultd's cgroup up to the hierarchy's root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupLimit {
    /// The limit file (absolute, e.g. `/sys/fs/cgroup/user.slice/memory.high`).
    pub file: PathBuf,
    /// The limit in bytes.
    pub limit: u64,
    /// What that cgroup uses now, less its inactive file cache (which reclaim drops first): the working
    /// set.
    pub working_set: u64,
}

impl CgroupLimit {
    /// Bytes this limit still leaves.
    pub fn available(&self) -> u64 {
        self.limit.saturating_sub(self.working_set)
    }
}

/// Where the PSI figures came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PsiSource {
    /// ultd's cgroup's `memory.pressure` (this path).
    Cgroup(PathBuf),
    /// `/proc/pressure/memory`.
    System,
    /// Neither could be read (no PSI in this kernel).
    None,
}

/// What ultd's memory cgroup says now.
#[derive(Debug, Clone, PartialEq)]
pub struct CgroupReading {
    /// Where it is.
    pub location: CgroupLocation,
    /// Every limit set from ultd's cgroup up to the mount root, nearest first (v2: `memory.max` and
    /// `memory.high`; v1: `memory.limit_in_bytes`).
    pub limits: Vec<CgroupLimit>,
    /// Cumulative events of the cgroup whose limit is the smallest (ultd's own when none is set).
    pub events: MemoryEvents,
}

impl CgroupReading {
    /// The smallest limit: it sizes the pool. Ties go to the nearest cgroup.
    pub fn smallest(&self) -> Option<&CgroupLimit> {
        self.limits.iter().min_by_key(|l| l.limit)
    }

    /// The least any limit leaves (a parent's limit shared with siblings can leave less than the
    /// smallest one).
    pub fn available(&self) -> Option<u64> {
        self.limits.iter().map(CgroupLimit::available).min()
    }
}

/// `abs` (an absolute path on the probed machine) under the filesystem `root`.
fn under(root: &Path, abs: &Path) -> PathBuf {
    root.join(abs.strip_prefix("/").unwrap_or(abs))
}

fn read_text(root: &Path, abs: &Path) -> Option<String> {
    std::fs::read_to_string(under(root, abs)).ok()
}

fn read_number(root: &Path, abs: &Path) -> Option<u64> {
    read_text(root, abs)?.trim().parse().ok()
}

/// Reads ultd's memory cgroup under the filesystem `root` ("/" on a live system). None when it has
/// none (no cgroup mount, or not Linux).
pub fn read_cgroup(root: &Path) -> Option<CgroupReading> {
    let location = locate_cgroup(
        &read_text(root, Path::new("/proc/self/cgroup"))?,
        &read_text(root, Path::new("/proc/self/mountinfo"))?,
    )?;
    let (limit_files, usage_file, inactive_keys): (&[&str], &str, &[&str]) = match location.version
    {
        CgroupVersion::V2 => (
            &["memory.max", "memory.high"],
            "memory.current",
            &["inactive_file"],
        ),
        CgroupVersion::V1 => (
            &["memory.limit_in_bytes"],
            "memory.usage_in_bytes",
            &["total_inactive_file", "inactive_file"],
        ),
    };
    let mut limits = Vec::new();
    for dir in location
        .dir
        .ancestors()
        .take_while(|d| d.starts_with(&location.mount_point))
    {
        let mut usage = None;
        for name in limit_files {
            let file = dir.join(name);
            let limit = read_text(root, &file).and_then(|t| match location.version {
                CgroupVersion::V2 => parse_cgroup_max(&t),
                CgroupVersion::V1 => parse_cgroup_v1_limit(&t),
            });
            let Some(limit) = limit else {
                continue;
            };
            let working_set = *usage.get_or_insert_with(|| {
                let used = read_number(root, &dir.join(usage_file)).unwrap_or(0);
                let inactive = read_text(root, &dir.join("memory.stat"))
                    .and_then(|t| inactive_keys.iter().find_map(|k| parse_flat_keyed(&t, k)))
                    .unwrap_or(0);
                used.saturating_sub(inactive)
            });
            limits.push(CgroupLimit {
                file,
                limit,
                working_set,
            });
        }
    }
    let events_dir = limits
        .iter()
        .min_by_key(|l| l.limit)
        .and_then(|l| l.file.parent())
        .unwrap_or(location.dir.as_path())
        .to_path_buf();
    let events = read_events(root, &events_dir, location.version);
    Some(CgroupReading {
        location,
        limits,
        events,
    })
}

/// The cumulative OOM and limit counters of the cgroup at `dir`: v2 `memory.events` (`oom`, `oom_kill`,
/// `high` + `max`); v1 `memory.oom_control` (`oom_kill` on kernels since 4.13, `under_oom`) and
/// `memory.failcnt` (times usage hit the limit).
fn read_events(root: &Path, dir: &Path, version: CgroupVersion) -> MemoryEvents {
    let cgroup = super::intern(&dir.display().to_string());
    match version {
        CgroupVersion::V2 => {
            let text = read_text(root, &dir.join("memory.events")).unwrap_or_default();
            let key = |k| parse_flat_keyed(&text, k).unwrap_or(0);
            MemoryEvents {
                cgroup,
                oom: key("oom"),
                oom_kill: key("oom_kill"),
                limit_hits: key("high").saturating_add(key("max")),
                under_oom: false,
            }
        }
        CgroupVersion::V1 => {
            let text = read_text(root, &dir.join("memory.oom_control")).unwrap_or_default();
            MemoryEvents {
                cgroup,
                oom: 0,
                oom_kill: parse_flat_keyed(&text, "oom_kill").unwrap_or(0),
                limit_hits: read_number(root, &dir.join("memory.failcnt")).unwrap_or(0),
                under_oom: parse_flat_keyed(&text, "under_oom").unwrap_or(0) > 0,
            }
        }
    }
}

/// Everything one sample reads.
#[derive(Debug, Clone, PartialEq)]
pub struct Readings {
    /// `/proc/meminfo`.
    pub meminfo: MemInfo,
    /// `pswpin`, `pswpout` (pages) from `/proc/vmstat`.
    pub swapped_pages: (u64, u64),
    /// PSI `some` and `full` avg10.
    pub psi: (Option<f64>, Option<f64>),
    /// Where they came from.
    pub psi_source: PsiSource,
    /// This process's RSS in bytes.
    pub rss: u64,
    /// ultd's memory cgroup, when it has one.
    pub cgroup: Option<CgroupReading>,
}

const PAGE: u64 = 4096;

/// Reads the files of one sample under the filesystem `root` ("/" on a live system). Only
/// `/proc/meminfo` is required.
pub fn read_at(root: &Path) -> Result<Readings, ProbeError> {
    let meminfo_path = under(root, Path::new("/proc/meminfo"));
    let text = std::fs::read_to_string(&meminfo_path).map_err(|e| ProbeError::Read {
        path: meminfo_path.display().to_string(),
        source: e,
    })?;
    let meminfo = parse_meminfo(&text).map_err(|reason| ProbeError::Parse {
        path: meminfo_path.display().to_string(),
        reason,
    })?;
    let swapped_pages = read_text(root, Path::new("/proc/vmstat"))
        .map(|t| parse_vmstat(&t))
        .unwrap_or((0, 0));
    let rss = read_text(root, Path::new("/proc/self/statm"))
        .and_then(|t| parse_statm(&t, PAGE))
        .unwrap_or(0);
    let cgroup = read_cgroup(root);
    let cgroup_psi = cgroup
        .as_ref()
        .filter(|c| c.location.version == CgroupVersion::V2)
        .map(|c| c.location.dir.join("memory.pressure"))
        .and_then(|file| {
            let psi = parse_psi(&read_text(root, &file)?);
            (psi.0.is_some() || psi.1.is_some()).then_some((psi, PsiSource::Cgroup(file)))
        });
    let (psi, psi_source) = cgroup_psi
        .or_else(|| {
            let psi = parse_psi(&read_text(root, Path::new("/proc/pressure/memory"))?);
            (psi.0.is_some() || psi.1.is_some()).then_some((psi, PsiSource::System))
        })
        .unwrap_or(((None, None), PsiSource::None));
    Ok(Readings {
        meminfo,
        swapped_pages,
        psi,
        psi_source,
        rss,
        cgroup,
    })
}

/// Builds a snapshot from one sample's readings taken at `at`, and the counters the next sample
/// compares with. The pool is the smallest of the machine and every cgroup limit; available is the
/// least that any of them leaves.
pub fn snapshot(
    r: &Readings,
    previous: Option<&Counters>,
    at: Instant,
) -> (MemorySnapshot, Counters) {
    let m = &r.meminfo;
    let counters = Counters {
        at,
        swapped_in: r.swapped_pages.0 * PAGE,
        swapped_out: r.swapped_pages.1 * PAGE,
        compressed: m.zswap,
        events: r.cgroup.as_ref().map(|c| c.events),
    };
    let rates = super::rates(previous, &counters);
    let (mut total, mut available, mut pool) = (m.total, m.available, PoolSource::Machine);
    if let Some(c) = &r.cgroup {
        if let Some(l) = c.smallest()
            && l.limit < total
        {
            total = l.limit;
            let path = super::intern(&l.file.display().to_string());
            pool = match c.location.version {
                CgroupVersion::V1 => PoolSource::CgroupV1 { path },
                CgroupVersion::V2 => PoolSource::CgroupV2 { path },
            };
        }
        if let Some(a) = c.available() {
            available = available.min(a);
        }
    }
    let (oom_kills_since_last, limit_events_since_last) = super::event_increases(
        previous.and_then(|p| p.events.as_ref()),
        counters.events.as_ref(),
    );
    let snapshot = MemorySnapshot {
        total_bytes: total,
        available_bytes: available,
        compressed_bytes: m.zswap,
        compressed_growth_bytes_per_s: rates.2,
        swap_used_bytes: m.swap_total.saturating_sub(m.swap_free),
        swap_in_bytes_per_s: rates.0,
        swap_out_bytes_per_s: rates.1,
        psi_some_avg10: r.psi.0,
        psi_full_avg10: r.psi.1,
        os_level: None,
        process_bytes: r.rss,
        oom_kills_since_last,
        limit_events_since_last,
        pool,
        metal: None,
    };
    (snapshot, counters)
}

/// Reads `/proc` and ultd's cgroup now.
#[cfg(target_os = "linux")]
pub fn sample(previous: Option<&Counters>) -> Result<(MemorySnapshot, Counters), ProbeError> {
    let readings = read_at(Path::new("/"))?;
    Ok(snapshot(&readings, previous, Instant::now()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ult_policy::{PressureLevel, PressureThresholds};

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

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    /// A recorded tree under `daemon/tests/fixtures/cgroup` (their layouts: see `fixtures` below).
    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/cgroup")
            .join(name)
    }

    fn sample_fixture(name: &str) -> (Readings, MemorySnapshot, Counters) {
        let r = read_at(&fixture(name)).unwrap();
        let (s, c) = snapshot(&r, None, Instant::now());
        (r, s, c)
    }

    fn v2(path: &str) -> PoolSource {
        PoolSource::CgroupV2 {
            path: super::super::intern(path),
        }
    }

    /// The fixtures:
    /// - `v2-systemd`: `ultd.service` with `MemoryMax=8G` on a 32 GiB systemd host (Ubuntu's mountinfo).
    /// - `v2-nested-high`: a user service (`MemoryMax=12G`) whose `user-1000.slice` has
    ///   `MemoryHigh=6G`, mostly used by other processes of the session.
    /// - `v2-root-unlimited`: ultd in the root cgroup; no cgroup PSI.
    /// - `v2-container`: Docker with `--memory=2g --cgroupns=host`: the cgroup2 mount's root is the
    ///   container's cgroup.
    /// - `v1`: recorded on the build machine (hybrid: memory on v1, an empty cgroup2 at
    ///   `/sys/fs/cgroup/unified`), with a 4 GiB limit added on the parent cgroup.
    #[test]
    fn fixtures() {
        // A limit on ultd's own cgroup; its PSI and events.
        let (r, s, c) = sample_fixture("v2-systemd");
        let dir = "/sys/fs/cgroup/system.slice/ultd.service";
        assert_eq!(r.cgroup.as_ref().unwrap().location.dir, Path::new(dir));
        assert_eq!(s.pool, v2(&format!("{dir}/memory.max")));
        assert_eq!(s.total_bytes, 8 * GIB);
        // 8 GiB less a working set of 6 GiB used minus 768 MiB of inactive file cache.
        assert_eq!(s.available_bytes, 2 * GIB + 768 * MIB);
        assert_eq!(
            r.psi_source,
            PsiSource::Cgroup(format!("{dir}/memory.pressure").into())
        );
        assert_eq!(
            (s.psi_some_avg10, s.psi_full_avg10),
            (Some(3.12), Some(0.87))
        );
        assert_eq!(c.events.unwrap().limit_hits, 12);
        assert_eq!(
            s.limit_events_since_last, 0,
            "nothing counted on a first sample"
        );
        assert_eq!(s.swap_used_bytes, (2_097_148 - 2_093_308) * 1024);

        // A parent's memory.high binds: it is smaller, and other processes use most of it.
        let (r, s, c) = sample_fixture("v2-nested-high");
        let slice = "/sys/fs/cgroup/user.slice/user-1000.slice";
        assert_eq!(s.pool, v2(&format!("{slice}/memory.high")));
        assert_eq!(s.total_bytes, 6 * GIB);
        assert_eq!(s.available_bytes, GIB);
        let cgroup = r.cgroup.as_ref().unwrap();
        assert_eq!(cgroup.limits.len(), 2, "{cgroup:?}");
        assert_eq!(
            cgroup.limits[0].available(),
            12 * GIB - (3 * GIB - 256 * MIB)
        );
        let service = format!("{slice}/user@1000.service/app.slice/ultd.service");
        assert_eq!(
            r.psi_source,
            PsiSource::Cgroup(format!("{service}/memory.pressure").into())
        );
        assert_eq!(s.psi_some_avg10, Some(12.4));
        // Events come from the cgroup whose limit binds.
        assert_eq!(c.events.unwrap().cgroup, slice);
        assert_eq!(c.events.unwrap().limit_hits, 431);

        // No limit anywhere: the machine is the pool, and PSI is the system's.
        let (r, s, _) = sample_fixture("v2-root-unlimited");
        assert_eq!(s.pool, PoolSource::Machine);
        assert_eq!(s.total_bytes, 65_652_216 * 1024);
        assert_eq!(s.available_bytes, 58_720_256 * 1024);
        assert_eq!(r.psi_source, PsiSource::System);
        assert_eq!(s.psi_some_avg10, Some(0.52));

        // A namespaced mount root: the container's cgroup is the mount point itself.
        let (r, s, _) = sample_fixture("v2-container");
        assert_eq!(
            r.cgroup.as_ref().unwrap().location.dir,
            Path::new("/sys/fs/cgroup")
        );
        assert_eq!(s.pool, v2("/sys/fs/cgroup/memory.max"));
        assert_eq!(s.total_bytes, 2 * GIB);
        assert_eq!(s.available_bytes, 2 * GIB - (1800 - 100) * MIB);
        assert_eq!(
            r.psi_source,
            PsiSource::Cgroup("/sys/fs/cgroup/memory.pressure".into())
        );

        // v1 on a hybrid host: the parent's limit_in_bytes binds (ultd's own is "unlimited", 2^63 - 4096).
        let (r, s, c) = sample_fixture("v1");
        let parent = "/sys/fs/cgroup/memory/process_api";
        assert_eq!(
            r.cgroup.as_ref().unwrap().location.dir,
            Path::new(parent).join("8fc477481a70aacb187fdd55e69efae9")
        );
        assert_eq!(
            s.pool,
            PoolSource::CgroupV1 {
                path: super::super::intern(&format!("{parent}/memory.limit_in_bytes"))
            }
        );
        assert_eq!(s.total_bytes, 4 * GIB);
        // 4 GiB less 3.5 GiB used plus 512 MiB of inactive file cache (total_inactive_file).
        assert_eq!(s.available_bytes, GIB);
        assert_eq!(r.psi_source, PsiSource::System);
        assert_eq!(s.psi_some_avg10, Some(0.0));
        let events = c.events.unwrap();
        assert_eq!((events.oom_kill, events.limit_hits), (2, 57));
    }

    #[test]
    fn oom_kills_since_the_last_sample_are_critical() {
        let thresholds = PressureThresholds::default();
        for name in ["v2-container", "v1"] {
            let r = read_at(&fixture(name)).unwrap();
            let (first, counters) = snapshot(&r, None, Instant::now());
            // The same counters again: nothing new, no pressure from events.
            let (again, _) = snapshot(&r, Some(&counters), Instant::now());
            assert_eq!(
                (again.oom_kills_since_last, again.limit_events_since_last),
                (0, 0)
            );
            assert_eq!(first.oom_kills_since_last, 0);
            // The previous sample saw one kill and two limit hits fewer.
            let mut e = counters.events.unwrap();
            e.oom_kill -= 1;
            e.oom = e.oom.saturating_sub(1);
            e.limit_hits -= 2;
            let previous = Counters {
                events: Some(e),
                ..counters
            };
            let (s, _) = snapshot(&r, Some(&previous), Instant::now());
            assert_eq!(s.oom_kills_since_last, 1, "{name}");
            assert_eq!(s.limit_events_since_last, 2, "{name}");
            let v = thresholds.classify(&s, 64 * MIB);
            assert_eq!(v.level, PressureLevel::Critical, "{name}: {v:?}");
            assert!(v.reason.contains("OOM"), "{v:?}");
            // Limit hits alone are a warning.
            let (s, _) = snapshot(
                &r,
                Some(&Counters {
                    events: Some(MemoryEvents {
                        oom: e.oom + 1,
                        oom_kill: e.oom_kill + 1,
                        ..e
                    }),
                    ..previous
                }),
                Instant::now(),
            );
            let v = thresholds.classify(&s, 64 * MIB);
            assert_eq!(v.level, PressureLevel::Warning, "{name}: {v:?}");
            // Counters of another cgroup (ultd was moved) are not compared.
            let moved = Counters {
                events: Some(MemoryEvents {
                    cgroup: "/elsewhere",
                    ..e
                }),
                ..previous
            };
            let (s, _) = snapshot(&r, Some(&moved), Instant::now());
            assert_eq!(s.oom_kills_since_last, 0);
        }
    }

    #[test]
    fn proc_cgroup_and_mountinfo_lines() {
        use CgroupVersion::{V1, V2};
        assert_eq!(
            parse_proc_cgroup("0::/system.slice/ultd.service\n"),
            vec![(V2, "/system.slice/ultd.service".to_string())]
        );
        // Several controllers on one v1 hierarchy; the v1 memory line is preferred over v2's.
        assert_eq!(
            parse_proc_cgroup("5:cpuset:/\n4:cpu,memory:/x/y\n0::/z\n"),
            vec![(V1, "/x/y".to_string()), (V2, "/z".to_string())]
        );
        assert!(parse_proc_cgroup("garbage\n3:cpu:/\n").is_empty());
        let mounts = parse_mountinfo(
            "36 31 0:32 / /sys/fs/cgroup/cpu,memory rw,relatime shared:9 - cgroup cgroup rw,cpu,memory\n\
             721 712 259:2 /home/dev/My\\040Models /models ro,relatime - ext4 /dev/nvme0n1p2 rw\n\
             not a mountinfo line\n",
        );
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[0].super_options, ["rw", "cpu", "memory"]);
        assert_eq!(mounts[1].root, "/home/dev/My Models");
        let loc = locate_cgroup("4:cpu,memory:/x/y\n", &format!("{MOUNT_CPU_MEMORY}\n")).unwrap();
        assert_eq!(loc.version, V1);
        assert_eq!(loc.dir, Path::new("/sys/fs/cgroup/cpu,memory/x/y"));
        // A bind-mounted v1 root (a container without its own cgroup namespace) below which ultd sits.
        let bound = "40 31 0:32 /docker/abc /sys/fs/cgroup/memory ro - cgroup cgroup rw,memory\n";
        let loc = locate_cgroup("4:memory:/docker/abc/worker\n", bound).unwrap();
        assert_eq!(loc.dir, Path::new("/sys/fs/cgroup/memory/worker"));
        // A path outside the visible root is read at the mount point.
        let loc = locate_cgroup(
            "0::/../../other\n",
            "1 0 0:1 / /cg rw - cgroup2 cgroup2 rw\n",
        )
        .unwrap();
        assert_eq!(loc.dir, Path::new("/cg"));
        let loc = locate_cgroup("0::/a/b\n", "1 0 0:1 /c /cg rw - cgroup2 cgroup2 rw\n").unwrap();
        assert_eq!(loc.dir, Path::new("/cg"));
        // No memory hierarchy mounted.
        assert!(locate_cgroup("4:memory:/x\n", "1 0 0:1 / /sys rw - sysfs sysfs rw\n").is_none());
        assert_eq!(parse_cgroup_v1_limit("9223372036854771712\n"), None);
        assert_eq!(parse_cgroup_v1_limit("4294967296\n"), Some(4 * GIB));
        assert_eq!(parse_flat_keyed("low 0\nhigh 5\nmax 2\n", "high"), Some(5));
        assert_eq!(parse_flat_keyed("oom_kill_disable 0\n", "oom_kill"), None);
    }

    const MOUNT_CPU_MEMORY: &str =
        "36 31 0:32 / /sys/fs/cgroup/cpu,memory rw,relatime shared:9 - cgroup cgroup rw,cpu,memory";

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
