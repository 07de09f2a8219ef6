//! The desired state (pins and explicit loads), persisted atomically: written to a temporary file,
//! flushed, renamed over the old one, and the directory flushed — a crash leaves the old or the new
//! file, never a torn one.

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
    /// It is not valid JSON of the expected shape.
    #[error("state file {path} is invalid: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

impl DesiredState {
    /// Reads `path`; a missing file is an empty state.
    pub fn load(path: &Path) -> Result<Self, StateFileError> {
        match std::fs::read(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(StateFileError::Io {
                path: path.display().to_string(),
                source: e,
            }),
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StateFileError::Invalid {
                path: path.display().to_string(),
                reason: e.to_string(),
            }),
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
            version: 1,
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
}
