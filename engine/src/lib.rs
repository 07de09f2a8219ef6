//! ult's engine: reads model files, predicts their footprint, loads them with Candle and runs them —
//! many sequences per step over a paged KV cache, scheduled by a pure step scheduler.
//!
//! [`Engine`] is the seam between the daemon and models: the daemon asks it to inspect (headers only) and
//! to load (weights, the KV block pool at the granted budget, a warm-up pass), and gets back a
//! [`LoadedModel`]: a [`decoder::Decoder`] with its [`kv::KvPool`], which a worker drives step by step
//! with a [`sched::Scheduler`], or an [`decoder::Encoder`]. [`CandleEngine`] is the real one.
#![deny(missing_docs)]

pub mod attention;
pub mod bert;
pub mod constraint;
#[cfg(feature = "cuda")]
pub mod cuda_jit;
#[cfg(feature = "cuda")]
pub mod cuda_kernels;
pub mod decoder;
pub mod device;
pub mod gguf;
pub mod hf;
pub mod kv;
pub mod repack;
pub mod sampler;
pub mod sched;
pub mod sequence;
pub mod solo;
pub mod stream;
pub mod template;
pub mod tokenizer;
pub mod transformer;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use ult_policy::Footprint;

use bert::{Bert, BertConfig, SafetensorsHeader};
pub use decoder::{Decoder, Encoder, LoadedDecoder, LoadedModel};
use kv::KvPool;
use template::ChatTemplate;
use tokenizer::{Tokenizer, TokenizerError};
use transformer::{Transformer, WeightData, WeightSource};

/// The most tokens one step computes (decodes and prefill chunks together), bounding activation memory.
pub const PREFILL_CHUNK: usize = 512;

/// The context of a decoder whose config sets none (capped at the model's trained context).
pub const DEFAULT_CONTEXT: usize = 4096;

/// What can go wrong reading, loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid model (bad magic, truncated, lying header).
    #[error("corrupt model file {path}: {reason}")]
    CorruptModel {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The file is valid but ult cannot run its architecture.
    #[error(
        "unsupported architecture {arch:?} in {path} (ult runs llama, gemma3, qwen2, qwen3, qwen3moe, \
         phi3 and deepseek2 from GGUF, and bert from safetensors)"
    )]
    UnsupportedArchitecture {
        /// The file.
        path: String,
        /// The architecture.
        arch: String,
    },
    /// The architecture is supported but the file asks for a variant ult does not implement.
    #[error("{path} needs {what}, which ult does not implement")]
    UnsupportedFeature {
        /// The file.
        path: String,
        /// What it needs.
        what: String,
    },
    /// A tensor the architecture needs is missing.
    #[error("{path} lacks tensor {name}")]
    MissingTensor {
        /// The file.
        path: String,
        /// The tensor.
        name: String,
    },
    /// The tokenizer could not be built.
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] TokenizerError),
    /// The chat template could not be compiled or rendered.
    #[error("chat template: {reason}")]
    Template {
        /// Why.
        reason: String,
    },
    /// A tensor operation failed. The message leaves out any backtrace Candle captured (with
    /// `RUST_BACKTRACE` set): clients get the message, logs get the detail (`{:?}`).
    #[error("{context}: {}", without_backtrace(&source.to_string()))]
    Candle {
        /// What was being done.
        context: String,
        /// Candle's error.
        #[source]
        source: Box<candle_core::Error>,
    },
    /// The prompt does not fit the context (or the current KV budget).
    #[error("the prompt has {prompt_tokens} tokens but the model's context holds {context_tokens}")]
    ContextTooLong {
        /// Tokens in the prompt.
        prompt_tokens: usize,
        /// Tokens the context holds.
        context_tokens: usize,
    },
    /// The prompt is empty.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// A request parameter is out of range.
    #[error("invalid {field}: {reason}")]
    InvalidParameter {
        /// The parameter.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The configured context is larger than the model supports.
    #[error("context {configured} exceeds the {trained} tokens {path} supports")]
    ContextBeyondModel {
        /// The file.
        path: String,
        /// The configured context.
        configured: usize,
        /// What the model supports.
        trained: usize,
    },
    /// The model's worker stopped (it was unloaded or crashed).
    #[error("the model's worker is gone")]
    WorkerGone,
    /// The output grammar failed while decoding (llguidance's reason).
    #[error("the output grammar failed: {0}")]
    Grammar(String),
    /// Model code panicked; the model was dropped and the daemon carries on.
    #[error("model code crashed while {context}: {message}")]
    Crashed {
        /// What was being done.
        context: &'static str,
        /// The panic message.
        message: String,
    },
}

impl EngineError {
    /// Turns a caught panic into an error.
    pub fn from_panic(context: &'static str, payload: Box<dyn std::any::Any + Send>) -> Self {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Self::Crashed { context, message }
    }

    /// Wraps a Candle error with what was being done.
    pub fn candle(context: String, source: candle_core::Error) -> Self {
        Self::Candle {
            context,
            source: Box::new(source),
        }
    }
}

/// `text` up to where a captured backtrace begins (a line `0: …` of frames, or `stack backtrace:`), with
/// trailing whitespace trimmed: what an error may show a client.
pub fn without_backtrace(text: &str) -> &str {
    let mut end = text.len();
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let t = line.trim_start();
        if offset > 0 && (t.starts_with("0: ") || t.starts_with("stack backtrace:")) {
            end = offset;
            break;
        }
        offset += line.len();
    }
    text[..end].trim_end()
}

/// What a model is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// Chat: messages rendered with the model's template; also serves raw completions.
    Chat,
    /// Completion only (a base model).
    Completion,
    /// Embeddings.
    Embedding,
}

impl ModelKind {
    /// The config spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Completion => "completion",
            Self::Embedding => "embedding",
        }
    }
}

/// Where a model comes from and how it is to be served.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSource {
    /// The configured name.
    pub name: String,
    /// What it is for.
    pub kind: ModelKind,
    /// A GGUF file, or a directory with config.json, model.safetensors and tokenizer.json.
    pub path: PathBuf,
    /// Context window in tokens (None: [`DEFAULT_CONTEXT`], capped at what the model supports).
    pub context: Option<usize>,
    /// Sequences served at once.
    pub max_sequences: u32,
    /// A chat template that replaces the file's.
    pub chat_template: Option<String>,
}

/// What inspecting a model's headers tells, before any weight is read.
#[derive(Debug, Clone)]
pub struct Inspection {
    /// Predicted footprint.
    pub footprint: Footprint,
    /// "llama", "gemma3", "bert".
    pub architecture: String,
    /// The tokenizer (kept for the life of the daemon: prompts are checked before loading).
    pub tokenizer: Arc<Tokenizer>,
    /// The chat template, when the model has one.
    pub template: Option<Arc<ChatTemplate>>,
    /// The kind it is served as: a chat model without a template is served as completion.
    pub kind: ModelKind,
    /// The context window (decoders) or the longest input (encoders), in tokens.
    pub context: usize,
    /// Bytes the load reads (for progress).
    pub load_bytes: u64,
}

/// Loads models. The seam between scheduling and model code.
pub trait Engine: Send + Sync + 'static {
    /// Reads headers: footprint, tokenizer, template. No weights.
    fn inspect(&self, source: &ModelSource) -> Result<Inspection, EngineError>;
    /// Loads weights, allocates the KV block pool for a budget of `kv_tokens` per sequence (of
    /// `source.max_sequences`) and runs a warm-up pass, calling `progress` with the bytes read so far.
    /// Blocking.
    fn load(
        &self,
        source: &ModelSource,
        inspection: &Inspection,
        kv_tokens: usize,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<LoadedModel, EngineError>;
    /// "cpu", "cuda:0", "metal:0".
    fn device_name(&self) -> String;
    /// The Candle device models run on (the memory probe watches its pool).
    fn device(&self) -> Device;
    /// Free and total device memory, settled (pending frees landed, the pool trimmed) for measuring a load;
    /// None on CPU.
    fn device_memory(&self) -> Option<(u64, u64)>;
}

/// The Candle engine.
pub struct CandleEngine {
    device: Device,
    /// Matrices dequantized to f32 at load (see [`CandleEngine::reference`]).
    dequantize: bool,
    /// KV pools as Candle tensors with the portable attention ops (the default on every backend: the path
    /// Metal runs, and CUDA until ult's kernels land); false keeps
    /// them in host memory for the CPU's block loops (see [`CandleEngine::host_loops`]).
    portable_kv: bool,
    /// The background compile of Candle's CUDA kernels that loads wait for.
    #[cfg(feature = "cuda")]
    jit: Option<cuda_jit::WarmUp>,
}

impl CandleEngine {
    /// An engine on `device` ("cpu", "cuda", "cuda:N", "metal", "metal:N", or "auto").
    pub fn new(device: &str) -> Result<Self, EngineError> {
        let wrap = |e| EngineError::candle(format!("opening device {device}"), e);
        let (kind, index) = device
            .split_once(':')
            .map_or((device, 0), |(k, i)| (k, i.parse().unwrap_or(0)));
        let device = match kind {
            "cpu" => Device::Cpu,
            "cuda" => Device::new_cuda(index).map_err(wrap)?,
            "metal" => Device::new_metal(index).map_err(wrap)?,
            _ => {
                if candle_core::utils::cuda_is_available() {
                    Device::new_cuda(0).map_err(wrap)?
                } else if candle_core::utils::metal_is_available() {
                    Device::new_metal(0).map_err(wrap)?
                } else {
                    Device::Cpu
                }
            }
        };
        #[cfg(feature = "cuda")]
        let jit = match &device {
            // ULT_CUDA_WARMUP=0 leaves every compile to Candle's on-demand path (the baseline it is
            // measured against in scripts/bench-gpu.sh).
            Device::Cuda(d) if std::env::var_os("ULT_CUDA_WARMUP").is_none_or(|v| v != "0") => {
                Some(cuda_jit::WarmUp::start(d))
            }
            _ => None,
        };
        // ULT_ATTENTION=host: the CPU's block loops (a diagnostic for benchmarks; see `host_loops`).
        let portable_kv =
            !(device.is_cpu() && std::env::var_os("ULT_ATTENTION").is_some_and(|v| v == "host"));
        Ok(Self {
            device,
            dequantize: false,
            portable_kv,
            #[cfg(feature = "cuda")]
            jit,
        })
    }

    /// A numerical reference engine on `device`: every matrix is dequantized to f32 at load, so matmuls
    /// run in f32 instead of on quantized activations. For correctness checks (`examples/compare.rs`);
    /// several times the memory of the quantized model.
    pub fn reference(device: &str) -> Result<Self, EngineError> {
        let mut e = Self::new(device)?;
        e.dequantize = true;
        Ok(e)
    }

    /// A CPU engine whose KV pools live in host memory, read by the hand-written block loops of
    /// `attention::host`. They compute the same attention as the portable ops up to summation order
    /// (within 3e-6 on SmolLM2's real activations), but a small model behind 8-bit activation
    /// quantization amplifies even that: SmolLM2's greedy answer to a chat prompt flips at a near-tie
    /// ("La" for "The"), away from what llama.cpp and the portable ops (Candle's matmuls, as ult has
    /// always computed attention) give. So serving uses the portable ops, and the loops stay an
    /// alternative that benchmarks and tests hold to them.
    pub fn host_loops(device: &str) -> Result<Self, EngineError> {
        let mut e = Self::new(device)?;
        e.portable_kv = false;
        Ok(e)
    }

    /// Waits for the device's kernels to be compiled (a no-op except on CUDA); returns how long the compile
    /// took in all.
    pub fn wait_for_kernels(&self) -> std::time::Duration {
        #[cfg(feature = "cuda")]
        if let Some(j) = &self.jit {
            return j.wait();
        }
        std::time::Duration::ZERO
    }
}

impl Engine for CandleEngine {
    fn inspect(&self, source: &ModelSource) -> Result<Inspection, EngineError> {
        match source.kind {
            ModelKind::Embedding => inspect_bert(source),
            ModelKind::Chat | ModelKind::Completion => inspect_gguf(source, self.device.is_cpu()),
        }
    }

    fn load(
        &self,
        source: &ModelSource,
        inspection: &Inspection,
        kv_tokens: usize,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<LoadedModel, EngineError> {
        self.wait_for_kernels();
        match source.kind {
            ModelKind::Embedding => {
                let dir = &source.path;
                let header = SafetensorsHeader::read(&dir.join("model.safetensors"))?;
                let config = BertConfig::read(&dir.join("config.json"))?;
                let map = map_file(&header.path)?;
                let bert = Bert::load(&header, &map, config, &self.device, progress)?;
                let mut model = EmbeddingModel {
                    bert,
                    max_input: inspection.context,
                };
                // Warm-up: the first pass sizes Candle's lazily built structures.
                model.embed(&[101, 2023, 102])?;
                Ok(LoadedModel::Encoder(Box::new(model)))
            }
            ModelKind::Chat | ModelKind::Completion => {
                // The file's mapping ends with this block, once its tensors are on the device.
                let transformer = {
                    let files = hf::DecoderFiles::read(&source.path)?;
                    let (map, weights);
                    let data = match &files {
                        hf::DecoderFiles::Gguf(_) => {
                            map = map_file(&source.path)?;
                            WeightData::Gguf(&map)
                        }
                        hf::DecoderFiles::Folder(model) => {
                            weights = model.open()?;
                            WeightData::Folder(&weights)
                        }
                    };
                    let src = WeightSource {
                        header: files.header(),
                        data,
                        device: &self.device,
                        progress,
                        dequantize: self.dequantize,
                    };
                    Transformer::load(&src, inspection.context)?
                };
                let max_sequences = source.max_sequences.max(1) as usize;
                let layout = transformer.kv_layout().clone();
                let kv_tokens = kv_tokens.clamp(1, inspection.context);
                let blocks = layout.pool_blocks(kv_tokens, max_sequences);
                let mut pool = KvPool::new(layout, blocks, &self.device, self.portable_kv)
                    .map_err(|e| EngineError::candle("allocating the KV pool".into(), e))?;
                warm_up(&transformer, &mut pool)?;
                Ok(LoadedModel::Decoder(LoadedDecoder {
                    decoder: Box::new(transformer),
                    pool,
                    max_sequences,
                    kv_tokens,
                }))
            }
        }
    }

    fn device_name(&self) -> String {
        match &self.device {
            Device::Cpu => "cpu".into(),
            Device::Cuda(_) => "cuda:0".into(),
            Device::Metal(_) => "metal:0".into(),
        }
    }

    fn device(&self) -> Device {
        self.device.clone()
    }

    fn device_memory(&self) -> Option<(u64, u64)> {
        // The driver reports device-wide figures, and a cold-cache warm-up runs child processes that each
        // hold a context: a reading taken while they live would shrink the next load's measured delta.
        self.wait_for_kernels();
        device::memory(&self.device, true)
    }
}

/// Maps a file read-only.
pub(crate) fn map_file(path: &Path) -> Result<memmap2::Mmap, EngineError> {
    let file = std::fs::File::open(path).map_err(|e| EngineError::Io {
        path: path.display().to_string(),
        source: e,
    })?;
    // SAFETY: the map is read-only and lives only for the load; ult's model files are not modified while
    // it runs (a truncation under it would fault the loader, which the header checks make unlikely).
    #[allow(unsafe_code)]
    let map = unsafe { memmap2::Mmap::map(&file) };
    map.map_err(|e| EngineError::Io {
        path: path.display().to_string(),
        source: e,
    })
}

fn inspect_gguf(source: &ModelSource, cpu: bool) -> Result<Inspection, EngineError> {
    let files = hf::DecoderFiles::read(&source.path)?;
    let header = files.header();
    let trained = header.hparams.trained_context;
    let context = match source.context {
        Some(c) if c > trained => {
            return Err(EngineError::ContextBeyondModel {
                path: source.path.display().to_string(),
                configured: c,
                trained,
            });
        }
        Some(c) => c,
        None => DEFAULT_CONTEXT.min(trained),
    };
    let tokenizer = Arc::new(Tokenizer::from_gguf(&header.vocab)?);
    let template_source = source
        .chat_template
        .clone()
        .or_else(|| header.chat_template.clone());
    let template = match (source.kind, template_source) {
        (ModelKind::Chat, Some(src)) => {
            let bos = tokenizer
                .bos()
                .map(|id| tokenizer.piece_text(id))
                .unwrap_or_default();
            let eos = tokenizer.eos().map(|id| {
                header
                    .vocab
                    .tokens
                    .get(id as usize)
                    .cloned()
                    .unwrap_or_default()
            });
            Some(Arc::new(ChatTemplate::new(
                &src,
                bos,
                eos.unwrap_or_default(),
            )?))
        }
        _ => None,
    };
    let kind = match (source.kind, &template) {
        (ModelKind::Chat, None) => {
            tracing::warn!(model = %source.name, "no chat template: serving as completion only");
            ModelKind::Completion
        }
        (k, _) => k,
    };
    Ok(Inspection {
        footprint: header.footprint(context, source.max_sequences, cpu),
        architecture: header.hparams.arch.as_str().to_string(),
        tokenizer,
        template,
        kind,
        context,
        load_bytes: header.tensors.values().map(|t| t.bytes).sum(),
    })
}

fn inspect_bert(source: &ModelSource) -> Result<Inspection, EngineError> {
    let dir = &source.path;
    let header = SafetensorsHeader::read(&dir.join("model.safetensors"))?;
    let config = BertConfig::read(&dir.join("config.json"))?;
    let tokenizer = Arc::new(Tokenizer::from_bert_json(&dir.join("tokenizer.json"))?);
    let max_input = source
        .context
        .unwrap_or(config.max_positions)
        .min(config.max_positions);
    // Activations for one input of max_input tokens: hidden states, q/k/v, scores, intermediate.
    let (h, n) = (config.hidden, max_input);
    let activations = n * (6 * h + 4 * h) * 4 + 2 * config.heads * n * n * 4;
    let weights: u64 = header
        .tensors
        .values()
        .map(|t| ((t.end - t.start) / t.dtype.size_in_bytes() * 4) as u64)
        .sum();
    Ok(Inspection {
        footprint: Footprint {
            weights_bytes: weights,
            overhead_bytes: 0,
            scratch_bytes: activations as u64,
            kv_bytes_per_token: 0,
            kv_fixed_bytes_per_sequence: 0,
            kv_block_tokens: 0,
            context_tokens: u32::try_from(max_input).unwrap_or(u32::MAX),
            max_sequences: 1,
        },
        architecture: "bert".into(),
        tokenizer,
        template: None,
        kind: ModelKind::Embedding,
        context: max_input,
        load_bytes: header.data_bytes,
    })
}

/// Runs a short prefill and a decode step of a throwaway sequence through `pool`, so that the matmul paths
/// for both m > 1 and m = 1 have built their lazy structures (Candle repacks some weights on first use)
/// before the load is measured. The blocks it writes are garbage that no sequence reads: a sequence only
/// reads positions it wrote itself.
fn warm_up(transformer: &Transformer, pool: &mut KvPool) -> Result<(), EngineError> {
    use decoder::{SeqStep, StepInput};
    let layout = pool.layout().clone();
    let bt = layout.block_tokens;
    let n = (bt * pool.blocks().iter().copied().min().unwrap_or(0)).clamp(0, 9);
    if n < 2 {
        return Ok(());
    }
    let tables: Vec<Vec<sched::BlockId>> = layout
        .groups
        .iter()
        .map(|_| (0..n.div_ceil(bt) as sched::BlockId).collect())
        .collect();
    let prompt: Vec<u32> = (1..n as u32).collect();
    let step = |tokens: &[u32], start: usize, pool: &mut KvPool| {
        let input = StepInput {
            seqs: vec![SeqStep {
                seq: 0,
                tokens,
                start,
                tables: &tables,
                sample: true,
            }],
        };
        transformer.forward(&input, pool).and_then(|o| o.argmax())
    };
    let next = step(&prompt, 0, pool)?;
    step(&next, prompt.len(), pool)?;
    Ok(())
}

/// A BERT encoder.
struct EmbeddingModel {
    bert: Bert,
    max_input: usize,
}

impl Encoder for EmbeddingModel {
    fn max_input(&self) -> usize {
        self.max_input
    }

    fn embed(&mut self, input: &[u32]) -> Result<Vec<f32>, EngineError> {
        if input.len() > self.max_input.min(self.bert.max_positions()) {
            return Err(EngineError::ContextTooLong {
                prompt_tokens: input.len(),
                context_tokens: self.max_input,
            });
        }
        self.bert
            .embed(input)
            .map_err(|e| EngineError::candle("embedding".into(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_leave_backtraces_to_the_logs() {
        let source = candle_core::Error::WithBacktrace {
            inner: Box::new(candle_core::Error::Msg("tensor too small".into())),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        assert!(source.to_string().contains("0: "), "a captured backtrace");
        let e = EngineError::candle("loading weights".into(), source);
        assert_eq!(e.to_string(), "loading weights: tensor too small");
        assert!(format!("{e:?}").len() > e.to_string().len() + 100);
        assert_eq!(
            without_backtrace("plain\nsecond line"),
            "plain\nsecond line"
        );
    }
}
