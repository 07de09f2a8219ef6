//! Request preparation governed like models: templating and tokenizing run on a few blocking threads, never
//! on the async runtime, and each request first reserves the transient memory that work will hold from a
//! daemon-wide budget (`[daemon] request_memory`), so a burst of huge prompts is refused with
//! RESOURCE_EXHAUSTED instead of growing ultd until the OS kills it.
//!
//! The estimate a request reserves is stated here, not measured: the request's own bytes (the decoded
//! message, the rendered template) plus [`TOKENIZE_BYTES_PER_BYTE`] for every byte that will actually be
//! tokenized (SentencePiece's merge queue is the largest: ~24 bytes per symbol and ~32 per candidate pair).
//! A text longer than its model's context could hold is refused from its length alone before any of this.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Semaphore;

use crate::error::ServiceError;

/// Transient bytes the tokenizer holds per byte of text it encodes (an upper estimate).
pub const TOKENIZE_BYTES_PER_BYTE: u64 = 64;

/// The budget and the threads.
#[derive(Debug)]
pub struct RequestWork {
    threads: Arc<Semaphore>,
    budget: u64,
    in_flight: AtomicU64,
    refused: AtomicU64,
}

/// Bytes reserved by one request; dropping it returns them.
#[derive(Debug)]
pub struct Reservation {
    work: Arc<RequestWork>,
    bytes: u64,
}

impl Reservation {
    /// The bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.work.in_flight.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

impl RequestWork {
    /// At most `threads` preparations at once, holding at most `budget` bytes together.
    pub fn new(threads: usize, budget: u64) -> Arc<Self> {
        Arc::new(Self {
            threads: Arc::new(Semaphore::new(threads.max(1))),
            budget,
            in_flight: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        })
    }

    /// The transient memory to reserve for a request of `request_bytes` that will tokenize
    /// `tokenized_bytes` of text.
    pub fn estimate(request_bytes: usize, tokenized_bytes: usize) -> u64 {
        (request_bytes as u64)
            .saturating_mul(2)
            .saturating_add((tokenized_bytes as u64).saturating_mul(TOKENIZE_BYTES_PER_BYTE))
    }

    /// Reserves `bytes`, or refuses when the budget cannot hold them now.
    pub fn reserve(self: &Arc<Self>, bytes: u64) -> Result<Reservation, ServiceError> {
        let mut current = self.in_flight.load(Ordering::Acquire);
        loop {
            let next = current.saturating_add(bytes);
            if next > self.budget {
                self.refused.fetch_add(1, Ordering::Relaxed);
                return Err(ServiceError::RequestMemory {
                    needed: bytes,
                    in_flight: current,
                    budget: self.budget,
                });
            }
            match self.in_flight.compare_exchange_weak(
                current,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Ok(Reservation {
                        work: self.clone(),
                        bytes,
                    });
                }
                Err(seen) => current = seen,
            }
        }
    }

    /// Runs `f` on a blocking thread once one of the preparation threads is free.
    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, ServiceError> {
        let _permit = self
            .threads
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ServiceError::ShuttingDown)?;
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| ServiceError::Internal(format!("request preparation failed: {e}")))
    }

    /// Bytes reserved now.
    pub fn in_flight_bytes(&self) -> u64 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// The budget.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Requests refused for want of budget so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_are_bounded_and_returned() {
        let w = RequestWork::new(2, 1000);
        let a = w.reserve(600).unwrap();
        assert!(matches!(
            w.reserve(500),
            Err(ServiceError::RequestMemory {
                needed: 500,
                in_flight: 600,
                budget: 1000
            })
        ));
        let b = w.reserve(400).unwrap();
        assert_eq!(w.in_flight_bytes(), 1000);
        drop(a);
        assert_eq!(w.in_flight_bytes(), 400);
        drop(b);
        assert_eq!(w.in_flight_bytes(), 0);
        assert_eq!(w.refused(), 1);
        assert_eq!(
            RequestWork::estimate(10, 5),
            20 + 5 * TOKENIZE_BYTES_PER_BYTE
        );
    }

    #[tokio::test]
    async fn work_runs_and_returns() {
        let w = RequestWork::new(1, 1);
        assert_eq!(w.run(|| 6 * 7).await.unwrap(), 42);
    }
}
