//! The configured models and what inspecting their files told (footprint, tokenizer, template), shared
//! read-only by the state owner and the request handlers; a reload builds a new one, reusing the
//! inspections of models whose configuration and files did not change.

use std::collections::BTreeMap;
use std::sync::Arc;

use ult_policy::ModelSpec;

use crate::config::{Config, ModelConfig};
use ult_engine::{Engine, Inspection, ModelSource};

/// One configured model.
#[derive(Debug)]
pub struct RegisteredModel {
    /// Its configuration.
    pub config: ModelConfig,
    /// Where it comes from, for the engine.
    pub source: ModelSource,
    /// The inspection, or why it failed (the model then stays unavailable until a reload).
    pub inspection: Result<Arc<Inspection>, String>,
    /// The files' sizes and modification times when inspected: a reload re-inspects a model whose files
    /// changed.
    pub stamp: Option<FileStamp>,
}

/// What a reload compares to tell whether a model's files changed: total bytes and the newest
/// modification time of the file (or of the folder's files, one level deep).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamp {
    /// Bytes.
    pub len: u64,
    /// The newest modification time.
    pub modified: Option<std::time::SystemTime>,
}

impl FileStamp {
    /// The stamp of `path` now, or None when it cannot be read.
    pub fn of(path: &std::path::Path) -> Option<Self> {
        let meta = std::fs::metadata(path).ok()?;
        if !meta.is_dir() {
            return Some(Self {
                len: meta.len(),
                modified: meta.modified().ok(),
            });
        }
        let mut stamp = Self {
            len: 0,
            modified: meta.modified().ok(),
        };
        for e in std::fs::read_dir(path).ok()?.flatten() {
            if let Ok(m) = e.metadata()
                && m.is_file()
            {
                stamp.len += m.len();
                stamp.modified = stamp.modified.max(m.modified().ok());
            }
        }
        Some(stamp)
    }
}

/// How a reload treats one model of the new configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// Not in the old registry.
    Added,
    /// Same configuration and files: the old registration itself.
    Unchanged,
    /// Only settings the policy applies in place changed (keep-alive, priority, pin, aliases, the
    /// smallest KV budget): the resident instance keeps serving.
    Settings,
    /// Its files or serving configuration changed: reloaded once idle.
    Reload,
}

impl RegisteredModel {
    /// The policy's view of this model, when it could be inspected.
    pub fn spec(&self) -> Option<ModelSpec> {
        let i = self.inspection.as_ref().ok()?;
        let context = i.context;
        Some(ModelSpec {
            name: self.config.name.clone(),
            footprint: i.footprint,
            pinned: self.config.pinned,
            priority: self.config.priority,
            keep_alive: self.config.keep_alive,
            min_kv_tokens: u32::try_from(
                self.config
                    .min_context
                    .unwrap_or(context / 4)
                    .clamp(1, context),
            )
            .unwrap_or(u32::MAX),
        })
    }
}

/// Whether two configurations of a model serve it alike (what changing needs a reload): path, kind,
/// context, `max_sequences`, chat template and prefix cache.
fn same_serving(a: &ModelConfig, b: &ModelConfig) -> bool {
    a.kind == b.kind
        && a.path == b.path
        && a.context == b.context
        && a.max_sequences == b.max_sequences
        && a.chat_template == b.chat_template
        && a.prefix_cache == b.prefix_cache
}

/// Every configured model, by name.
#[derive(Debug, Default)]
pub struct Registry {
    /// The models.
    pub models: BTreeMap<String, Arc<RegisteredModel>>,
}

impl Registry {
    /// Inspects every configured model's files. A model whose files cannot be read is registered as
    /// unavailable with the reason; the others are unaffected.
    pub fn inspect(config: &Config, engine: &dyn Engine) -> Self {
        Self::inspect_reusing(config, engine, &Self::default()).0
    }

    /// Like [`Registry::inspect`], reusing `old`'s registration of every model whose configuration and
    /// files are unchanged; also says, per model of `config`, how it relates to `old`.
    pub fn inspect_reusing(
        config: &Config,
        engine: &dyn Engine,
        old: &Registry,
    ) -> (Self, BTreeMap<String, Reuse>) {
        let mut models = BTreeMap::new();
        let mut reuse = BTreeMap::new();
        for (path, reason) in &config.skipped {
            tracing::warn!(path = %path.display(), %reason, "model_dirs: skipped");
        }
        for m in &config.models {
            let stamp = FileStamp::of(&m.path);
            if let Some(prev) = old.get(&m.name) {
                let same_files = prev.stamp == stamp && prev.inspection.is_ok();
                if same_files && prev.config == *m {
                    models.insert(m.name.clone(), prev.clone());
                    reuse.insert(m.name.clone(), Reuse::Unchanged);
                    continue;
                }
                if same_files && same_serving(&prev.config, m) {
                    models.insert(
                        m.name.clone(),
                        Arc::new(RegisteredModel {
                            config: m.clone(),
                            source: prev.source.clone(),
                            inspection: prev.inspection.clone(),
                            stamp,
                        }),
                    );
                    reuse.insert(m.name.clone(), Reuse::Settings);
                    continue;
                }
                reuse.insert(m.name.clone(), Reuse::Reload);
            } else {
                reuse.insert(m.name.clone(), Reuse::Added);
            }
            let source = ModelSource {
                name: m.name.clone(),
                kind: m.kind,
                path: m.path.clone(),
                context: m.context,
                max_sequences: m.max_sequences,
                chat_template: m.chat_template.clone(),
            };
            let started = std::time::Instant::now();
            let inspection = engine
                .inspect(&source)
                .map(Arc::new)
                .map_err(|e| ult_engine::without_backtrace(&e.to_string()).to_string());
            match &inspection {
                Ok(i) => tracing::info!(
                    model = %m.name,
                    origin = %m.origin,
                    architecture = %i.architecture,
                    kind = i.kind.as_str(),
                    context = i.context,
                    predicted_bytes = i.footprint.total(),
                    ms = started.elapsed().as_millis() as u64,
                    "inspected"
                ),
                Err(e) => tracing::error!(model = %m.name, error = %e, "model unavailable"),
            }
            models.insert(
                m.name.clone(),
                Arc::new(RegisteredModel {
                    config: m.clone(),
                    source,
                    inspection,
                    stamp,
                }),
            );
        }
        (Self { models }, reuse)
    }

    /// A model by configured name.
    pub fn get(&self, name: &str) -> Option<&Arc<RegisteredModel>> {
        self.models.get(name)
    }
}
