//! The desired state (pins and explicit loads), persisted atomically: written to a temporary file,
//! flushed, renamed over the old one, and the directory flushed — a crash leaves the old or the new
//! file, never a torn one. The previous version is kept as `state.json.bak`; a file ultd cannot use
//! (corrupt, or written by a newer ultd) is moved aside to `state.json.rejected`, never overwritten, and
//! the backup is used instead.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// What the operator asked for, restored at boot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    /// Format version.
    pub version: u32,
    /// Pinned models.
    pub pinned: BTreeSet<String>,
    /// Explicitly loaded models.
    pub loaded: BTreeSet<String>,
}

/// Why the state file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    /// It could not be read or written.
    #[error("state file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// It was written in a format version this ultd does not know (by a newer ultd).
    #[error(
        "state file {path} has format version {found}; this ultd reads version {CURRENT_VERSION}"
    )]
    UnsupportedVersion {
        /// The file.
        path: String,
        /// The version it has.
        found: u32,
    },
    /// It is not valid JSON of the expected shape.
    #[error("state file {path} is invalid: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

/// The format version this ultd writes and reads.
pub const CURRENT_VERSION: u32 = 1;

fn sibling(path: &Path, suffix: &str) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

impl DesiredState {
    /// Reads `path`; a missing file is an empty state.
    pub fn load(path: &Path) -> Result<Self, StateFileError> {
        let state: Self = match std::fs::read(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => {
                return Err(StateFileError::Io {
                    path: path.display().to_string(),
                    source: e,
                });
            }
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StateFileError::Invalid {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?,
        };
        if state.version != CURRENT_VERSION {
            return Err(StateFileError::UnsupportedVersion {
                path: path.display().to_string(),
                found: state.version,
            });
        }
        Ok(state)
    }

    /// Reads `path` for boot. A file that cannot be used is moved aside to `<path>.rejected` (so a later
    /// save cannot destroy what a newer ultd or an operator wrote) and the backup `<path>.bak` is read
    /// instead. Returns the state and what went wrong, for the log.
    pub fn load_or_recover(path: &Path) -> (Self, Vec<String>) {
        let mut problems = Vec::new();
        match Self::load(path) {
            Ok(s) => return (s, problems),
            Err(e @ StateFileError::Io { .. }) => {
                problems.push(e.to_string());
                return (Self::default(), problems);
            }
            Err(e) => {
                let aside = sibling(path, ".rejected");
                problems.push(match std::fs::rename(path, &aside) {
                    Ok(()) => format!("{e}; kept as {}", aside.display()),
                    Err(r) => format!("{e}; could not move it aside: {r}"),
                });
            }
        }
        let bak = sibling(path, ".bak");
        match Self::load(&bak) {
            Ok(s) => {
                problems.push(format!(
                    "restored the previous state from {}",
                    bak.display()
                ));
                (s, problems)
            }
            Err(e) => {
                problems.push(format!("backup unusable too: {e}"));
                (Self::default(), problems)
            }
        }
    }

    /// Writes `path` atomically.
    pub fn save(&self, path: &Path) -> Result<(), StateFileError> {
        let io = |source| StateFileError::Io {
            path: path.display().to_string(),
            source,
        };
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io)?;
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        let json = serde_json::to_vec_pretty(&Self {
            version: CURRENT_VERSION,
            ..self.clone()
        })
        .map_err(|e| StateFileError::Invalid {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        {
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(&json).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        // The previous version stays as the backup (only a file this ultd can read replaces it).
        if Self::load(path).is_ok() && path.exists() {
            let _ = std::fs::copy(path, sibling(path, ".bak"));
        }
        std::fs::rename(&tmp, path).map_err(io)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.json");
        assert_eq!(DesiredState::load(&path).unwrap(), DesiredState::default());
        let s = DesiredState {
            version: 1,
            pinned: ["a".to_string()].into(),
            loaded: ["b".to_string()].into(),
        };
        s.save(&path).unwrap();
        assert_eq!(DesiredState::load(&path).unwrap(), s);
        std::fs::write(&path, b"{not json").unwrap();
        assert!(matches!(
            DesiredState::load(&path),
            Err(StateFileError::Invalid { .. })
        ));
    }

    #[test]
    fn a_file_from_a_newer_ultd_is_kept_aside_and_the_backup_used() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let first = DesiredState {
            version: 1,
            pinned: ["a".to_string()].into(),
            loaded: BTreeSet::new(),
        };
        first.save(&path).unwrap();
        let second = DesiredState {
            pinned: ["a".to_string(), "b".to_string()].into(),
            ..first.clone()
        };
        second.save(&path).unwrap();
        // The backup is the previous version.
        assert_eq!(
            DesiredState::load(&dir.path().join("state.json.bak")).unwrap(),
            first
        );
        let newer = r#"{"version": 2, "pinned": ["x"], "loaded": [], "leases": {}}"#;
        std::fs::write(&path, newer).unwrap();
        assert!(matches!(
            DesiredState::load(&path),
            Err(StateFileError::UnsupportedVersion { found: 2, .. })
        ));
        let (state, problems) = DesiredState::load_or_recover(&path);
        assert_eq!(state, first, "{problems:?}");
        assert!(problems[0].contains("format version 2"), "{problems:?}");
        // Nothing the newer ultd wrote is lost.
        let kept = std::fs::read_to_string(dir.path().join("state.json.rejected")).unwrap();
        assert_eq!(kept, newer);
    }
}
