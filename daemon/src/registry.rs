//! The configured models and what inspecting their files told at boot (footprint, tokenizer, template),
//! shared read-only by the state owner and the request handlers.

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
    /// The boot-time inspection, or why it failed (the model then stays unavailable).
    pub inspection: Result<Arc<Inspection>, String>,
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
        let mut models = BTreeMap::new();
        for (path, reason) in &config.skipped {
            tracing::warn!(path = %path.display(), %reason, "model_dirs: skipped");
        }
        for m in &config.models {
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
                }),
            );
        }
        Self { models }
    }

    /// A model by configured name.
    pub fn get(&self, name: &str) -> Option<&Arc<RegisteredModel>> {
        self.models.get(name)
    }
}
