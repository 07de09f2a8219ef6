//! A resident model's worker: one OS thread that owns the loaded model and its KV block pool. A decoder's
//! worker runs steps: each step the pure scheduler (`ult_engine::sched`) picks which sequences advance
//! (decodes first, then prefill chunks, then new arrivals in FIFO order, under a per-step token budget),
//! the decoder computes them in one forward pass over the paged KV, and each sequence samples and streams
//! its own token. Deltas go out through unbounded channels (bounded in practice by `max_tokens`), so a
//! client that stops reading never blocks the model; a dropped receiver leaves the batch, and its blocks
//! are free, before the next step. An encoder's worker embeds jobs in arrival order.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::{mpsc as tmpsc, oneshot};

use ult_engine::constraint::Constraint;
use ult_engine::decoder::{Decoder, Encoder, StepInput};
use ult_engine::kv::KvPool;
use ult_engine::sampler::SamplingParams;
use ult_engine::sched::{Refusal, Scheduler, SchedulerConfig, SeqId, StepPlan};
pub use ult_engine::sequence::FinishReason;
use ult_engine::sequence::{Sequence, SequenceParams, TokenLogprob};
use ult_engine::tokenizer::Tokenizer;
use ult_engine::{EngineError, LoadedDecoder, LoadedModel, PREFILL_CHUNK};

/// Statistics of one generation.
#[derive(Debug, Clone, PartialEq)]
pub struct GenStats {
    /// Why it ended.
    pub finish: FinishReason,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens (stop tokens excluded).
    pub completion_tokens: usize,
    /// Prefill wall time (from admission to the first token).
    pub prefill_ms: f64,
    /// Decode wall time after the first token.
    pub decode_ms: f64,
    /// Time waiting for admission into the running batch.
    pub queue_ms: f64,
    /// From submission to the first token.
    pub ttft_ms: f64,
    /// From submission to the end.
    pub total_ms: f64,
    /// Times the sequence was preempted (its KV freed and recomputed later).
    pub preemptions: u32,
    /// Prompt tokens whose KV came from the prefix cache (not computed).
    pub cached_tokens: usize,
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
    /// Text to show, with the log-probabilities of the tokens it completes when they were asked for.
    Delta(Delta),
    /// The end, with statistics.
    Done(GenStats),
    /// It failed.
    Failed(EngineError),
}

/// A piece of generated text.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Delta {
    /// The text (empty when a delta carries only the last tokens' log-probabilities).
    pub text: String,
    /// Log-probabilities of the tokens since the last delta, when the request asked for them.
    pub logprobs: Vec<TokenLogprob>,
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
    /// Report log-probabilities with this many alternatives per token.
    pub logprobs: Option<usize>,
    /// The output grammar, compiled for this job.
    pub constraint: Option<Constraint>,
    /// Where deltas go; dropping the receiver cancels.
    pub events: tmpsc::UnboundedSender<GenEvent>,
    /// Deltas sent but not yet taken by the client's side ([`Backlog`]).
    pub backlog: Backlog,
    /// When the job was submitted.
    pub submitted: Instant,
}

/// Deltas a sequence has sent that its client's side has not taken yet. At [`Backlog::PAUSE_AT`] the
/// sequence leaves the batch (its blocks go back to the pool, or to the prefix cache) so a client that does
/// not read costs nothing; once the client has taken half of them it rejoins, recomputing what it held
/// (from the prefix cache where it can). A client that never reads is cancelled by its front door after
/// `[daemon] write_timeout`.
#[derive(Debug, Clone, Default)]
pub struct Backlog(Arc<std::sync::atomic::AtomicUsize>);

impl Backlog {
    /// Unread deltas at which a sequence pauses.
    pub const PAUSE_AT: usize = 64;

    /// The client's side took one delta.
    pub fn taken(&self) {
        let _ = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    fn sent(&self) -> usize {
        self.0.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Deltas not yet taken.
    pub fn pending(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
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
    /// Free the KV pool once no sequence holds blocks (it is allocated again for the next one).
    ReleaseKv,
    /// Change the KV budget (tokens per sequence): the pool grows or shrinks, preempting the newest
    /// sequences when what is running does not fit.
    SetBudget(usize),
    /// Forget the prefix cache's unreferenced blocks (the first thing shed under memory pressure).
    DropCache,
}

/// Counters and gauges a worker keeps for status and metrics.
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
    /// Sequences paused now because their client stopped reading.
    pub paused: AtomicU64,
    /// Times a sequence was paused for a client that stopped reading.
    pub pauses: AtomicU64,
    /// Generations or embeddings that failed.
    pub failed: AtomicU64,
    /// Inputs embedded.
    pub embedded: AtomicU64,
    /// Sequences in the running batch now.
    pub running: AtomicU64,
    /// Sequences waiting for admission now (new or preempted).
    pub waiting: AtomicU64,
    /// KV blocks held by sequences now (all groups).
    pub kv_blocks_used: AtomicU64,
    /// KV blocks in the pool (all groups).
    pub kv_blocks_total: AtomicU64,
    /// Bytes the KV pool holds now (zero while released).
    pub kv_bytes: AtomicU64,
    /// Preemptions so far.
    pub preemptions: AtomicU64,
    /// Forward steps run.
    pub steps: AtomicU64,
    /// KV blocks the prefix cache keeps that no sequence holds (all groups).
    pub cached_blocks: AtomicU64,
    /// Bytes of those blocks (the cache's share of the KV pool).
    pub cached_bytes: AtomicU64,
    /// Admissions that reused cached blocks.
    pub cache_hits: AtomicU64,
    /// Admissions that found nothing cached.
    pub cache_misses: AtomicU64,
    /// Prompt tokens not computed thanks to the cache.
    pub cache_tokens_saved: AtomicU64,
    /// Cached blocks dropped at the governor's request.
    pub cache_dropped_blocks: AtomicU64,
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
    /// Starts a worker for `model` (keeping a prefix cache when `prefix_cache`). When it stops, `measure`
    /// runs on the worker thread while the model is still alive, then the model is dropped, then `on_exit`
    /// runs (its memory is back) with `None` after a stop, or the error when model code crashed, and what
    /// `measure` returned: so an unload can be measured by the device's figures on either side of the drop.
    pub fn spawn<M: Send + 'static>(
        name: &str,
        model: LoadedModel,
        tokenizer: Arc<Tokenizer>,
        prefix_cache: bool,
        measure: impl FnOnce() -> M + Send + 'static,
        on_exit: impl FnOnce(Option<EngineError>, M) + Send + 'static,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let stats = Arc::new(WorkerStats::default());
        let counters = stats.clone();
        let thread = std::thread::Builder::new()
            .name(format!("ult-{name}"))
            .spawn(move || {
                let (crash, measured) = match model {
                    LoadedModel::Encoder(mut e) => {
                        let crash = run_encoder(&mut e, &rx, &counters);
                        let measured = measure();
                        drop(e);
                        (crash, measured)
                    }
                    LoadedModel::Decoder(d) => {
                        let mut steps = StepLoop::new(d, &tokenizer, prefix_cache, &counters);
                        let crash = steps.run(&rx);
                        let measured = measure();
                        drop(steps);
                        (crash, measured)
                    }
                };
                on_exit(crash, measured);
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

    /// Stops taking jobs; the thread finishes what is queued and running, drops the model and runs
    /// `on_exit`.
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

/// Serves embedding jobs until every sender is gone. A panic in model code fails the job at hand, drops
/// the model and ends the worker; the error is returned.
fn run_encoder(
    model: &mut Box<dyn Encoder>,
    rx: &mpsc::Receiver<Job>,
    counters: &WorkerStats,
) -> Option<EngineError> {
    use std::panic::{AssertUnwindSafe, catch_unwind};
    while let Ok(job) = rx.recv() {
        match job {
            Job::Generate(job) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                let _ = job
                    .events
                    .send(GenEvent::Failed(EngineError::InvalidParameter {
                        field: "model",
                        reason: "this is an embedding model; it does not generate text".into(),
                    }));
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
                        return Some(crashed("embedding"));
                    }
                }
            }
            Job::ReleaseKv | Job::SetBudget(_) | Job::DropCache => {}
        }
    }
    None
}

fn crashed(context: &'static str) -> EngineError {
    EngineError::Crashed {
        context,
        message: "see the failed request".into(),
    }
}

/// A generation in the worker: its sequence state, where its events go, and its timings.
struct Active {
    seq: Sequence,
    /// Log-probabilities of tokens whose text is not complete yet.
    logprobs: Vec<TokenLogprob>,
    events: tmpsc::UnboundedSender<GenEvent>,
    backlog: Backlog,
    /// Out of the batch (and of the scheduler) until its client catches up.
    paused: bool,
    submitted: Instant,
    admitted: Option<Instant>,
    first_token: Option<Instant>,
}

/// A decoder's step loop.
struct StepLoop<'a> {
    decoder: Box<dyn Decoder>,
    pool: KvPool,
    sched: Scheduler,
    max_sequences: usize,
    active: BTreeMap<SeqId, Active>,
    next_id: SeqId,
    release_when_idle: bool,
    tokenizer: &'a Tokenizer,
    counters: &'a WorkerStats,
}

impl<'a> StepLoop<'a> {
    fn new(
        model: LoadedDecoder,
        tokenizer: &'a Tokenizer,
        prefix_cache: bool,
        counters: &'a WorkerStats,
    ) -> Self {
        let layout = model.pool.layout().clone();
        let config = SchedulerConfig {
            max_running: model.max_sequences,
            step_tokens: PREFILL_CHUNK,
            block_tokens: layout.block_tokens,
            context: model.decoder.context(),
            groups: layout.group_configs(model.pool.blocks()),
            prefix_cache,
        };
        let s = Self {
            decoder: model.decoder,
            pool: model.pool,
            sched: Scheduler::new(config),
            max_sequences: model.max_sequences,
            active: BTreeMap::new(),
            next_id: 0,
            release_when_idle: false,
            tokenizer,
            counters,
        };
        s.publish();
        s
    }

    /// Serves until every sender is gone and nothing runs.
    fn run(&mut self, rx: &mpsc::Receiver<Job>) -> Option<EngineError> {
        let mut open = true;
        loop {
            if self.sched.is_idle() {
                if self.release_when_idle {
                    self.release_pool();
                    self.release_when_idle = false;
                    self.publish();
                }
                if !open && !self.any_paused() {
                    return None;
                }
                if self.any_paused() {
                    // Paused sequences rejoin when their clients read: look again shortly.
                    match rx.recv_timeout(std::time::Duration::from_millis(20)) {
                        Ok(job) => self.handle(job),
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => open = false,
                    }
                } else {
                    match rx.recv() {
                        Ok(job) => self.handle(job),
                        Err(_) => return None,
                    }
                }
            }
            // Everything that arrived meanwhile joins at this step boundary.
            loop {
                match rx.try_recv() {
                    Ok(job) => self.handle(job),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            self.drop_cancelled();
            self.resume_readers();
            if self.sched.is_idle() {
                continue;
            }
            if let Err(e) = self.step() {
                return Some(e);
            }
        }
    }

    fn handle(&mut self, job: Job) {
        match job {
            Job::Generate(job) => self.admit(job),
            Job::Embed(job) => {
                let _ = job.reply.send(Err(EngineError::InvalidParameter {
                    field: "model",
                    reason: "this model generates text; it does not embed".into(),
                }));
            }
            Job::ReleaseKv => self.release_when_idle = true,
            Job::SetBudget(tokens) => self.set_budget(tokens),
            Job::DropCache => {
                let dropped = self.sched.drop_cache();
                self.counters
                    .cache_dropped_blocks
                    .fetch_add(dropped as u64, Ordering::Relaxed);
                if dropped > 0 {
                    tracing::info!(blocks = dropped, "prefix cache dropped");
                }
                self.publish();
            }
        }
    }

    fn admit(&mut self, job: GenerateJob) {
        if job.events.is_closed() {
            return;
        }
        let vocab = self.decoder.vocab_size() as u32;
        if let Some(bad) = job.prompt.iter().find(|&&t| t >= vocab) {
            self.counters.failed.fetch_add(1, Ordering::Relaxed);
            let _ = job
                .events
                .send(GenEvent::Failed(EngineError::InvalidParameter {
                    field: "prompt",
                    reason: format!("token id {bad} is outside the vocabulary"),
                }));
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        if let Err(refusal) = self.sched.add(id, &job.prompt) {
            self.counters.failed.fetch_add(1, Ordering::Relaxed);
            let error = match refusal {
                Refusal::EmptyPrompt => EngineError::EmptyPrompt,
                Refusal::TooLong {
                    prompt_tokens,
                    limit,
                } => EngineError::ContextTooLong {
                    prompt_tokens,
                    context_tokens: limit,
                },
                Refusal::DuplicateId(_) => EngineError::WorkerGone,
            };
            let _ = job.events.send(GenEvent::Failed(error));
            return;
        }
        self.release_when_idle = false;
        let params = SequenceParams {
            max_tokens: job.max_tokens,
            sampling: job.sampling,
            stop: job.stop,
            ignore_eos: job.ignore_eos,
            logprobs: job.logprobs,
        };
        let limit = self.decoder.context();
        self.active.insert(
            id,
            Active {
                seq: Sequence::new(job.prompt, params, limit).with_constraint(job.constraint),
                logprobs: Vec::new(),
                events: job.events,
                backlog: job.backlog,
                paused: false,
                submitted: job.submitted,
                admitted: None,
                first_token: None,
            },
        );
        self.publish();
    }

    fn set_budget(&mut self, tokens: usize) {
        let tokens = tokens.clamp(1, self.decoder.context());
        let blocks = self.pool.layout().pool_blocks(tokens, self.max_sequences);
        let resize = self.sched.resize(&blocks);
        if let Err(e) = self.pool.resize(blocks, &resize.moves) {
            // The storage could not follow (out of memory): release it; sequences recompute.
            tracing::warn!(error = %e, "could not resize the KV pool; releasing it");
            let message = e.to_string();
            for id in self.active.keys().copied().collect::<Vec<_>>() {
                let error = EngineError::Crashed {
                    context: "resizing the KV pool",
                    message: message.clone(),
                };
                self.finish(id, None, Some(error));
            }
            self.release_pool();
        }
        if !resize.preempted.is_empty() {
            tracing::info!(
                preempted = resize.preempted.len(),
                tokens,
                "KV budget shrank"
            );
        }
        self.publish();
    }

    /// Frees the pool's storage; the prefix cache, whose content lived there, goes with it.
    fn release_pool(&mut self) {
        self.sched.drop_cache();
        self.pool.release();
    }

    /// Removes sequences whose client went away, freeing their blocks before the next step.
    fn drop_cancelled(&mut self) {
        let gone: Vec<SeqId> = self
            .active
            .iter()
            .filter(|(_, a)| a.events.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.finish(id, Some(FinishReason::Cancelled), None);
        }
    }

    fn any_paused(&self) -> bool {
        self.active.values().any(|a| a.paused)
    }

    /// Paused sequences whose clients have read half their backlog rejoin the scheduler with everything
    /// they hold so far as their prompt.
    fn resume_readers(&mut self) {
        let ready: Vec<SeqId> = self
            .active
            .iter()
            .filter(|(_, a)| a.paused && a.backlog.pending() <= Backlog::PAUSE_AT / 2)
            .map(|(&id, _)| id)
            .collect();
        if ready.is_empty() {
            return;
        }
        for id in ready {
            let Some(a) = self.active.get_mut(&id) else {
                continue;
            };
            a.paused = false;
            self.counters.paused.fetch_sub(1, Ordering::Relaxed);
            if self.sched.add(id, a.seq.tokens()).is_err() {
                self.finish(id, Some(FinishReason::Context), None);
            }
        }
        self.publish();
    }

    /// Plans and runs one step. Returns an error only when model code panicked (the worker ends).
    fn step(&mut self) -> Result<(), EngineError> {
        use std::panic::{AssertUnwindSafe, catch_unwind};
        let plan = self.sched.schedule();
        for &id in &plan.stalled {
            // The pool cannot hold this sequence's next position even alone: its budget is full.
            self.finish(id, Some(FinishReason::Context), None);
        }
        if plan.items.is_empty() {
            self.publish();
            return Ok(());
        }
        let now = Instant::now();
        for it in &plan.items {
            if let Some(a) = self.active.get_mut(&it.seq) {
                a.admitted.get_or_insert(now);
            }
        }
        let result = {
            let active = &self.active;
            let input = step_input(&plan, active);
            let decoder = &self.decoder;
            let pool = &mut self.pool;
            let copies = &plan.copies;
            catch_unwind(AssertUnwindSafe(|| {
                pool.ensure()
                    .map_err(|e| EngineError::candle("allocating the KV pool".into(), e))?;
                pool.copy_blocks(copies)
                    .map_err(|e| EngineError::candle("copying cached KV blocks".into(), e))?;
                let out = decoder.forward(&input, pool)?;
                let argmax = out.argmax()?;
                let needs_logits = out
                    .rows
                    .iter()
                    .any(|id| active.get(id).is_some_and(|a| a.seq.needs_logits()));
                let logits = if needs_logits {
                    Some(out.host()?)
                } else {
                    None
                };
                Ok::<_, EngineError>((out.rows, argmax, logits))
            }))
        };
        self.counters.steps.fetch_add(1, Ordering::Relaxed);
        let (rows, argmax, mut logits) = match result {
            Ok(Ok(r)) => {
                self.sched.step_done();
                r
            }
            Ok(Err(e)) => {
                // The step failed as a whole: every sequence in it fails; the others go on.
                tracing::warn!(error = %e, sequences = plan.items.len(), "forward step failed");
                // The plan's block copies may not have happened: trust no cached block.
                self.sched.drop_cache();
                for it in &plan.items {
                    self.finish(it.seq, None, Some(clone_error(&e)));
                }
                self.publish();
                return Ok(());
            }
            Err(panic) => {
                let e = EngineError::from_panic("generating", panic);
                let ids: Vec<SeqId> = self.active.keys().copied().collect();
                for id in ids {
                    self.finish(id, None, Some(clone_error(&e)));
                }
                return Err(crashed("generating"));
            }
        };
        let now = Instant::now();
        for (i, id) in rows.iter().enumerate() {
            let Some(a) = self.active.get_mut(id) else {
                continue;
            };
            let row = logits
                .as_mut()
                .and_then(|l| l.get_mut(i))
                .map(Vec::as_mut_slice);
            let token = match a.seq.choose(argmax[i], row) {
                Ok(t) => t,
                Err(e) => {
                    self.finish(*id, None, Some(e));
                    continue;
                }
            };
            let accepted = a.seq.accept(token, self.tokenizer);
            a.first_token.get_or_insert(now);
            a.logprobs.extend(accepted.logprob);
            let mut finish = accepted.finish;
            let mut unread = 0;
            if let Some(text) = accepted.delta {
                let delta = Delta {
                    text,
                    logprobs: std::mem::take(&mut a.logprobs),
                };
                if a.events.send(GenEvent::Delta(delta)).is_err() {
                    finish = Some(FinishReason::Cancelled);
                } else {
                    unread = a.backlog.sent();
                }
            }
            match finish {
                Some(f) => self.finish(*id, Some(f), None),
                None if unread >= Backlog::PAUSE_AT => {
                    // The client is not reading: leave the batch until it does.
                    a.paused = true;
                    self.sched.remove(*id);
                    self.counters.paused.fetch_add(1, Ordering::Relaxed);
                    self.counters.pauses.fetch_add(1, Ordering::Relaxed);
                }
                None => {
                    self.sched.push_token(*id, token);
                }
            }
        }
        self.publish();
        Ok(())
    }

    /// Ends sequence `id` with a finish reason (statistics sent) or an error.
    fn finish(&mut self, id: SeqId, reason: Option<FinishReason>, error: Option<EngineError>) {
        let preemptions = self.sched.preemptions_of(id).unwrap_or(0);
        let cached_tokens = self.sched.cached_tokens(id).unwrap_or(0);
        self.sched.remove(id);
        let Some(mut a) = self.active.remove(&id) else {
            return;
        };
        if a.paused {
            self.counters.paused.fetch_sub(1, Ordering::Relaxed);
        }
        // The gauges show the sequence gone before its client can see it end, so a scrape that
        // follows the last event never counts it as running.
        self.publish();
        let c = self.counters;
        c.prompt_tokens
            .fetch_add(a.seq.prompt_tokens() as u64, Ordering::Relaxed);
        c.generated_tokens
            .fetch_add(a.seq.generated() as u64, Ordering::Relaxed);
        if let Some(e) = error {
            c.failed.fetch_add(1, Ordering::Relaxed);
            let _ = a.events.send(GenEvent::Failed(e));
            return;
        }
        let finish = reason.unwrap_or(FinishReason::Context);
        let rest = if finish == FinishReason::Context {
            a.seq.flush()
        } else {
            None
        };
        if rest.is_some() || !a.logprobs.is_empty() {
            let _ = a.events.send(GenEvent::Delta(Delta {
                text: rest.unwrap_or_default(),
                logprobs: std::mem::take(&mut a.logprobs),
            }));
        }
        let counter = if finish == FinishReason::Cancelled {
            &c.cancelled
        } else {
            &c.completed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let ms = |from: Instant, to: Instant| to.duration_since(from).as_secs_f64() * 1000.0;
        let end = Instant::now();
        let admitted = a.admitted.unwrap_or(end);
        let stats = GenStats {
            finish,
            prompt_tokens: a.seq.prompt_tokens(),
            completion_tokens: a.seq.generated(),
            prefill_ms: a.first_token.map_or(0.0, |t| ms(admitted, t)),
            decode_ms: a.first_token.map_or(0.0, |t| ms(t, end)),
            queue_ms: ms(a.submitted, admitted),
            ttft_ms: a.first_token.map_or(0.0, |t| ms(a.submitted, t)),
            total_ms: ms(a.submitted, end),
            preemptions,
            cached_tokens,
        };
        let _ = a.events.send(GenEvent::Done(stats));
    }

    /// Publishes the gauges.
    fn publish(&self) {
        let c = self.counters;
        let usage = self.sched.usage();
        c.running
            .store(self.sched.running() as u64, Ordering::Relaxed);
        c.waiting
            .store(self.sched.waiting() as u64, Ordering::Relaxed);
        c.kv_blocks_used
            .store(usage.iter().map(|u| u.used as u64).sum(), Ordering::Relaxed);
        c.kv_blocks_total.store(
            usage.iter().map(|u| u.total as u64).sum(),
            Ordering::Relaxed,
        );
        c.kv_bytes.store(self.pool.bytes(), Ordering::Relaxed);
        c.preemptions
            .store(self.sched.preemptions(), Ordering::Relaxed);
        let layout = self.pool.layout();
        c.cached_blocks.store(
            usage.iter().map(|u| u.cached as u64).sum(),
            Ordering::Relaxed,
        );
        let cached_bytes: u64 = if self.pool.is_allocated() {
            usage
                .iter()
                .enumerate()
                .map(|(g, u)| (u.cached * layout.block_bytes(g)) as u64)
                .sum()
        } else {
            0
        };
        c.cached_bytes.store(cached_bytes, Ordering::Relaxed);
        let cache = self.sched.cache_stats();
        c.cache_hits.store(cache.hits, Ordering::Relaxed);
        c.cache_misses.store(cache.misses, Ordering::Relaxed);
        c.cache_tokens_saved
            .store(cache.tokens_saved, Ordering::Relaxed);
    }
}

/// The decoder's input for `plan`: each item's tokens from its sequence.
fn step_input<'p>(plan: &'p StepPlan, active: &'p BTreeMap<SeqId, Active>) -> StepInput<'p> {
    StepInput::from_plan(plan, |id| {
        active.get(&id).map_or(&[][..], |a| a.seq.tokens())
    })
}

/// Engine errors are not `Clone` (they carry Candle's); the copy keeps the message.
fn clone_error(e: &EngineError) -> EngineError {
    match e {
        EngineError::InvalidParameter { field, reason } => EngineError::InvalidParameter {
            field,
            reason: reason.clone(),
        },
        EngineError::ContextTooLong {
            prompt_tokens,
            context_tokens,
        } => EngineError::ContextTooLong {
            prompt_tokens: *prompt_tokens,
            context_tokens: *context_tokens,
        },
        other => EngineError::Crashed {
            context: "generating",
            message: other.to_string(),
        },
    }
}
