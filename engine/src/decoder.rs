//! The batch-first seam between the worker and model code: a [`Decoder`] runs one step for many sequences
//! at once over the paged [`KvPool`]; an [`Encoder`] embeds inputs. A loaded model is one or the other.

use candle_core::Tensor;

use crate::EngineError;
use crate::kv::{KvLayout, KvPool};
use crate::sched::{BlockId, SeqId, StepPlan};

/// One sequence's part of a step.
#[derive(Debug, Clone, Copy)]
pub struct SeqStep<'a> {
    /// The sequence.
    pub seq: SeqId,
    /// The tokens at positions `start..start + tokens.len()`.
    pub tokens: &'a [u32],
    /// The position of the first token.
    pub start: usize,
    /// Block tables, one per group of the model's [`KvLayout`].
    pub tables: &'a [Vec<BlockId>],
    /// Whether to return logits for the last token.
    pub sample: bool,
}

/// One forward pass: every sequence's new tokens.
#[derive(Debug, Clone, Default)]
pub struct StepInput<'a> {
    /// The sequences, in any order (the output follows it).
    pub seqs: Vec<SeqStep<'a>>,
}

impl<'a> StepInput<'a> {
    /// The input for a scheduler's plan; `tokens(id)` gives each sequence's known tokens.
    pub fn from_plan(plan: &'a StepPlan, tokens: impl Fn(SeqId) -> &'a [u32]) -> Self {
        Self {
            seqs: plan
                .items
                .iter()
                .map(|it| SeqStep {
                    seq: it.seq,
                    tokens: &tokens(it.seq)[it.start..it.start + it.len],
                    start: it.start,
                    tables: &it.tables,
                    sample: it.sample,
                })
                .collect(),
        }
    }

    /// Tokens in the step.
    pub fn tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.tokens.len()).sum()
    }
}

/// The logits of a step, one row per sequence that asked for them, on the model's device.
#[derive(Debug)]
pub struct StepOutput {
    /// `(rows, vocab)` f32, or None when no sequence asked.
    pub logits: Option<Tensor>,
    /// The sequence of each row.
    pub rows: Vec<SeqId>,
}

impl StepOutput {
    /// The most likely token of every row, computed on the device (one small copy back).
    pub fn argmax(&self) -> Result<Vec<u32>, EngineError> {
        match &self.logits {
            None => Ok(Vec::new()),
            Some(l) => crate::attention::argmax_rows(l)
                .map_err(|e| EngineError::candle("argmax".into(), e)),
        }
    }

    /// Every row's logits on the host.
    pub fn host(&self) -> Result<Vec<Vec<f32>>, EngineError> {
        match &self.logits {
            None => Ok(Vec::new()),
            Some(l) => l
                .to_vec2::<f32>()
                .map_err(|e| EngineError::candle("reading logits".into(), e)),
        }
    }
}

/// A decoder-only language model in memory.
pub trait Decoder: Send {
    /// Its KV layout.
    fn kv_layout(&self) -> &KvLayout;
    /// The most positions one sequence may hold.
    fn context(&self) -> usize;
    /// Vocabulary size (token ids at or above it are invalid).
    fn vocab_size(&self) -> usize;
    /// Runs one step for every sequence of `input`, reading and writing `pool`.
    fn forward(&self, input: &StepInput<'_>, pool: &mut KvPool) -> Result<StepOutput, EngineError>;
}

/// An embedding model in memory.
pub trait Encoder: Send {
    /// The longest input, in tokens.
    fn max_input(&self) -> usize;
    /// Embeds one tokenized input.
    fn embed(&mut self, input: &[u32]) -> Result<Vec<f32>, EngineError>;
}

/// A decoder with its block pool.
pub struct LoadedDecoder {
    /// The model.
    pub decoder: Box<dyn Decoder>,
    /// Its KV blocks, allocated at the granted budget.
    pub pool: KvPool,
    /// The most sequences running at once.
    pub max_sequences: usize,
    /// The KV budget granted, in tokens per sequence (the pool holds it rounded up to whole blocks).
    pub kv_tokens: usize,
}

/// A model in memory.
pub enum LoadedModel {
    /// Generates text.
    Decoder(LoadedDecoder),
    /// Embeds text.
    Encoder(Box<dyn Encoder>),
}

impl LoadedModel {
    /// The decoder, or an error for an encoder.
    pub fn into_decoder(self) -> Result<LoadedDecoder, EngineError> {
        match self {
            Self::Decoder(d) => Ok(d),
            Self::Encoder(_) => Err(EngineError::InvalidParameter {
                field: "model",
                reason: "this is an embedding model; it does not generate text".into(),
            }),
        }
    }

    /// The encoder, or an error for a decoder.
    pub fn into_encoder(self) -> Result<Box<dyn Encoder>, EngineError> {
        match self {
            Self::Encoder(e) => Ok(e),
            Self::Decoder(_) => Err(EngineError::InvalidParameter {
                field: "model",
                reason: "this model generates text; it does not embed".into(),
            }),
        }
    }

    /// The KV budget it was loaded with, in tokens per sequence (an encoder's longest input).
    pub fn kv_tokens(&self) -> usize {
        match self {
            Self::Decoder(d) => d.kv_tokens,
            Self::Encoder(e) => e.max_input(),
        }
    }
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Decoder(d) => f
                .debug_struct("Decoder")
                .field("pool_bytes", &d.pool.bytes())
                .field("max_sequences", &d.max_sequences)
                .finish(),
            Self::Encoder(_) => f.write_str("Encoder"),
        }
    }
}
