//! One sequence at a time through a [`LoadedDecoder`], scheduled by the same [`Scheduler`] the worker uses:
//! for benchmarks, correctness checks and tests that need "the same request, alone".

use crate::EngineError;
use crate::decoder::{LoadedDecoder, StepInput, StepOutput};
use crate::sched::{Scheduler, SchedulerConfig};

/// A single sequence over a decoder's pool.
pub struct Solo<'a> {
    model: &'a mut LoadedDecoder,
    sched: Scheduler,
    tokens: Vec<u32>,
}

impl<'a> Solo<'a> {
    /// A runner over `model` with prefill chunks of at most `step_tokens`.
    pub fn new(model: &'a mut LoadedDecoder, step_tokens: usize) -> Self {
        let layout = model.pool.layout().clone();
        let config = SchedulerConfig {
            max_running: 1,
            step_tokens,
            block_tokens: layout.block_tokens,
            context: model.decoder.context(),
            groups: layout.group_configs(model.pool.blocks()),
            prefix_cache: false,
        };
        Self {
            model,
            sched: Scheduler::new(config),
            tokens: Vec::new(),
        }
    }

    /// Starts a new sequence with `prompt` and returns the next-token logits.
    pub fn begin(&mut self, prompt: &[u32]) -> Result<Vec<f32>, EngineError> {
        self.begin_output(prompt).and_then(|o| first_row(o.host()?))
    }

    /// Starts a new sequence and returns the most likely next token (argmax on the device).
    pub fn begin_greedy(&mut self, prompt: &[u32]) -> Result<u32, EngineError> {
        self.begin_output(prompt).and_then(|o| first(o.argmax()?))
    }

    /// Appends `token` and returns the next-token logits.
    pub fn step(&mut self, token: u32) -> Result<Vec<f32>, EngineError> {
        self.step_output(token).and_then(|o| first_row(o.host()?))
    }

    /// Appends `token` and returns the most likely next token.
    pub fn step_greedy(&mut self, token: u32) -> Result<u32, EngineError> {
        self.step_output(token).and_then(|o| first(o.argmax()?))
    }

    /// Positions the sequence holds.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// True before the first `begin`.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    fn begin_output(&mut self, prompt: &[u32]) -> Result<StepOutput, EngineError> {
        self.sched.remove(0);
        self.tokens = prompt.to_vec();
        self.sched.add(0, prompt).map_err(|e| match e {
            crate::sched::Refusal::TooLong {
                prompt_tokens,
                limit,
            } => EngineError::ContextTooLong {
                prompt_tokens,
                context_tokens: limit,
            },
            _ => EngineError::EmptyPrompt,
        })?;
        self.run()
    }

    fn step_output(&mut self, token: u32) -> Result<StepOutput, EngineError> {
        self.tokens.push(token);
        self.sched.push_token(0, token);
        self.run()
    }

    /// Runs steps until the sequence's last token has logits.
    fn run(&mut self) -> Result<StepOutput, EngineError> {
        loop {
            let plan = self.sched.schedule();
            if !plan.stalled.is_empty() || plan.items.is_empty() {
                return Err(EngineError::ContextTooLong {
                    prompt_tokens: self.tokens.len(),
                    context_tokens: self.sched.max_prompt(),
                });
            }
            let tokens = &self.tokens;
            let input = StepInput::from_plan(&plan, |_| tokens.as_slice());
            let out = self.model.decoder.forward(&input, &mut self.model.pool)?;
            self.sched.step_done();
            if !out.rows.is_empty() {
                return Ok(out);
            }
        }
    }
}

fn first(v: Vec<u32>) -> Result<u32, EngineError> {
    v.first().copied().ok_or(EngineError::WorkerGone)
}

fn first_row(v: Vec<Vec<f32>>) -> Result<Vec<f32>, EngineError> {
    v.into_iter().next().ok_or(EngineError::WorkerGone)
}
