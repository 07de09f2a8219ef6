//! A resident model's worker: one OS thread that owns the loaded model and its KV cache and takes jobs
//! from a FIFO queue (so requests to one model are served fairly, in arrival order). Token deltas flow
//! back through a channel; a dropped receiver cancels the job at the next decode step.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::{mpsc as tmpsc, oneshot};

use super::sampler::{Sampler, SamplingParams};
use super::stream::TextStream;
use super::tokenizer::Tokenizer;
use super::{EngineError, LoadedModel};

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence or end-of-turn token.
    Eos,
    /// A stop sequence matched.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The context (KV budget) is full.
    Context,
    /// The client went away.
    Cancelled,
}

/// Statistics of one generation.
#[derive(Debug, Clone, PartialEq)]
pub struct GenStats {
    /// Why it ended.
    pub finish: FinishReason,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens (stop tokens excluded).
    pub completion_tokens: usize,
    /// Prefill wall time.
    pub prefill_ms: f64,
    /// Decode wall time after the first token.
    pub decode_ms: f64,
    /// Time queued behind other jobs of this model.
    pub queue_ms: f64,
    /// From submission to the first token.
    pub ttft_ms: f64,
    /// From submission to the end.
    pub total_ms: f64,
}

impl GenStats {
    /// Prompt tokens per second.
    pub fn prompt_tps(&self) -> f64 {
        rate(self.prompt_tokens, self.prefill_ms)
    }

    /// Decode tokens per second (tokens after the first, over the time after the first).
    pub fn decode_tps(&self) -> f64 {
        rate(self.completion_tokens.saturating_sub(1), self.decode_ms)
    }
}

fn rate(n: usize, ms: f64) -> f64 {
    if ms > 0.0 {
        n as f64 / (ms / 1000.0)
    } else {
        0.0
    }
}

/// What a generation streams back.
#[derive(Debug)]
pub enum GenEvent {
    /// Text to show.
    Delta(String),
    /// The end, with statistics.
    Done(GenStats),
    /// It failed.
    Failed(EngineError),
}

/// A generation job.
#[derive(Debug)]
pub struct GenerateJob {
    /// The prompt's tokens.
    pub prompt: Vec<u32>,
    /// The most tokens to generate.
    pub max_tokens: usize,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Stop sequences.
    pub stop: Vec<String>,
    /// Keep going past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Where deltas go; dropping the receiver cancels.
    pub events: tmpsc::Sender<GenEvent>,
    /// When the job was submitted.
    pub submitted: Instant,
}

/// An embedding job.
#[derive(Debug)]
pub struct EmbedJob {
    /// Tokenized inputs.
    pub inputs: Vec<Vec<u32>>,
    /// The answer.
    pub reply: oneshot::Sender<Result<Vec<Vec<f32>>, EngineError>>,
}

/// Work for a worker.
#[derive(Debug)]
pub enum Job {
    /// Generate text.
    Generate(GenerateJob),
    /// Embed texts.
    Embed(EmbedJob),
    /// Free the idle KV cache.
    ReleaseKv,
    /// Change the KV budget.
    SetBudget(usize),
}

/// Counters a worker keeps for status and metrics.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Prompt tokens processed.
    pub prompt_tokens: AtomicU64,
    /// Tokens generated.
    pub generated_tokens: AtomicU64,
    /// Generations completed (any finish reason but cancellation).
    pub completed: AtomicU64,
    /// Generations cancelled because the client went away.
    pub cancelled: AtomicU64,
    /// Generations or embeddings that failed.
    pub failed: AtomicU64,
    /// Inputs embedded.
    pub embedded: AtomicU64,
}

/// A clonable way to queue jobs on a worker (held by a request while it runs).
#[derive(Debug, Clone)]
pub struct JobSender(mpsc::Sender<Job>);

impl JobSender {
    /// Queues a job.
    pub fn submit(&self, job: Job) -> Result<(), EngineError> {
        self.0.send(job).map_err(|_| EngineError::WorkerGone)
    }
}

/// A handle to a worker thread.
#[derive(Debug)]
pub struct Worker {
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<WorkerStats>,
}

impl Worker {
    /// Starts a worker for `model`. `on_exit` runs on the worker thread after the model is dropped (its
    /// memory is back), with `None` after a stop, or the error when model code crashed.
    pub fn spawn(
        name: &str,
        model: Box<dyn LoadedModel>,
        tokenizer: Arc<Tokenizer>,
        on_exit: impl FnOnce(Option<EngineError>) + Send + 'static,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let stats = Arc::new(WorkerStats::default());
        let counters = stats.clone();
        let thread = std::thread::Builder::new()
            .name(format!("ult-{name}"))
            .spawn(move || {
                let crash = run(model, &tokenizer, rx, &counters);
                on_exit(crash);
            })?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
            stats,
        })
    }

    /// The worker's counters.
    pub fn stats(&self) -> &Arc<WorkerStats> {
        &self.stats
    }

    /// A sender for requests to hold while they run.
    pub fn sender(&self) -> Option<JobSender> {
        self.tx.clone().map(JobSender)
    }

    /// Queues a job.
    pub fn submit(&self, job: Job) -> Result<(), EngineError> {
        self.tx
            .as_ref()
            .ok_or(EngineError::WorkerGone)?
            .send(job)
            .map_err(|_| EngineError::WorkerGone)
    }

    /// Stops taking jobs; the thread finishes what is queued, drops the model and runs `on_exit`.
    pub fn stop(mut self) {
        self.tx = None;
        // Detach: the exit callback reports when memory is back.
        drop(self.thread.take());
    }

    /// Stops and waits for the thread to end (used at shutdown).
    pub fn join(mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves jobs until every sender is gone. A panic in model code fails the job at hand, drops the model
/// and ends the worker (its state can no longer be trusted); the error is returned.
fn run(
    mut model: Box<dyn LoadedModel>,
    tokenizer: &Tokenizer,
    rx: mpsc::Receiver<Job>,
    counters: &WorkerStats,
) -> Option<EngineError> {
    use std::panic::{AssertUnwindSafe, catch_unwind};
    while let Ok(job) = rx.recv() {
        match job {
            Job::Generate(job) => {
                if job.events.is_closed() {
                    continue;
                }
                let events = job.events.clone();
                match catch_unwind(AssertUnwindSafe(|| {
                    generate(model.as_mut(), tokenizer, job)
                })) {
                    Ok(Ok(stats)) => {
                        counters
                            .prompt_tokens
                            .fetch_add(stats.prompt_tokens as u64, Ordering::Relaxed);
                        counters
                            .generated_tokens
                            .fetch_add(stats.completion_tokens as u64, Ordering::Relaxed);
                        let outcome = if stats.finish == FinishReason::Cancelled {
                            &counters.cancelled
                        } else {
                            &counters.completed
                        };
                        outcome.fetch_add(1, Ordering::Relaxed);
                        let _ = events.blocking_send(GenEvent::Done(stats));
                    }
                    Ok(Err(e)) => {
                        counters.failed.fetch_add(1, Ordering::Relaxed);
                        let _ = events.blocking_send(GenEvent::Failed(e));
                    }
                    Err(panic) => {
                        let _ = events.blocking_send(GenEvent::Failed(EngineError::from_panic(
                            "generating",
                            panic,
                        )));
                        return Some(EngineError::Crashed {
                            context: "generating",
                            message: "see the failed request".into(),
                        });
                    }
                }
            }
            Job::Embed(job) => {
                let result = catch_unwind(AssertUnwindSafe(|| {
                    job.inputs
                        .iter()
                        .map(|ids| model.embed(ids))
                        .collect::<Result<Vec<_>, _>>()
                }));
                match result {
                    Ok(r) => {
                        let counter = if r.is_ok() {
                            &counters.embedded
                        } else {
                            &counters.failed
                        };
                        counter.fetch_add(job.inputs.len() as u64, Ordering::Relaxed);
                        let _ = job.reply.send(r);
                    }
                    Err(panic) => {
                        let _ = job
                            .reply
                            .send(Err(EngineError::from_panic("embedding", panic)));
                        return Some(EngineError::Crashed {
                            context: "embedding",
                            message: "see the failed request".into(),
                        });
                    }
                }
            }
            Job::ReleaseKv => model.release_kv(),
            Job::SetBudget(tokens) => {
                if let Err(e) = model.set_budget(tokens) {
                    tracing::warn!(error = %e, "could not change the KV budget");
                }
            }
        }
    }
    None
}

/// What a forward pass gave the sampler.
enum Next {
    /// The argmax, computed on the device.
    Token(u32),
    /// Every logit, for sampling.
    Logits(Vec<f32>),
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

/// Runs one generation: prefill, then sample and decode until a stop, streaming deltas.
pub fn generate(
    model: &mut dyn LoadedModel,
    tokenizer: &Tokenizer,
    job: GenerateJob,
) -> Result<GenStats, EngineError> {
    let start = Instant::now();
    let queue_ms = start.duration_since(job.submitted).as_secs_f64() * 1000.0;
    let budget = model.budget();
    if job.prompt.len() >= budget {
        return Err(EngineError::ContextTooLong {
            prompt_tokens: job.prompt.len(),
            context_tokens: budget,
        });
    }
    // Greedy decoding without a repetition penalty needs only the argmax: it stays on the device.
    let greedy = job.sampling.is_greedy() && job.sampling.repetition_penalty == 1.0;
    let mut next = if greedy {
        Next::Token(model.begin_greedy(&job.prompt)?)
    } else {
        Next::Logits(model.begin(&job.prompt)?)
    };
    let prefill_ms = ms(start);
    let mut sampler = Sampler::new(job.sampling.clone());
    let mut stream = TextStream::new(job.stop.clone());
    let mut history = job.prompt.clone();
    let mut generated = 0usize;
    let mut first_token_at = None;
    let finish = loop {
        if job.events.is_closed() {
            break FinishReason::Cancelled;
        }
        let token = match &mut next {
            Next::Token(t) => *t,
            Next::Logits(logits) => sampler.sample(logits, &history),
        };
        if tokenizer.is_stop(token) && !job.ignore_eos {
            break FinishReason::Eos;
        }
        history.push(token);
        generated += 1;
        first_token_at.get_or_insert_with(Instant::now);
        if let Some(text) = stream.push(tokenizer.token_bytes(token))
            && job.events.blocking_send(GenEvent::Delta(text)).is_err()
        {
            break FinishReason::Cancelled;
        }
        if stream.stopped() {
            break FinishReason::Stop;
        }
        if generated >= job.max_tokens {
            break FinishReason::Length;
        }
        if history.len() >= budget {
            break FinishReason::Context;
        }
        next = if greedy {
            Next::Token(model.step_greedy(token)?)
        } else {
            Next::Logits(model.step(token)?)
        };
    };
    if matches!(
        finish,
        FinishReason::Eos | FinishReason::Length | FinishReason::Context
    ) && let Some(text) = stream.finish()
    {
        let _ = job.events.blocking_send(GenEvent::Delta(text));
    }
    Ok(GenStats {
        finish,
        prompt_tokens: job.prompt.len(),
        completion_tokens: generated,
        prefill_ms,
        decode_ms: first_token_at.map_or(0.0, ms),
        queue_ms,
        ttft_ms: first_token_at.map_or(0.0, |t| {
            t.duration_since(job.submitted).as_secs_f64() * 1000.0
        }),
        total_ms: ms(job.submitted),
    })
}
