//! Per-client concurrency limits: each client (an IP address, or the local user on the Unix socket) may
//! have at most `max` requests running or waiting at once; the next one is refused at once with
//! RESOURCE_EXHAUSTED (HTTP 429) instead of queueing behind the client's own flood.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::ServiceError;

/// Counts requests per client.
#[derive(Debug)]
pub struct ClientLimits {
    max: usize,
    counts: Mutex<HashMap<String, usize>>,
}

/// A request slot; dropping it frees the slot.
#[derive(Debug)]
pub struct ClientSlot {
    limits: Arc<ClientLimits>,
    client: String,
}

impl ClientLimits {
    /// At most `max` concurrent requests per client (0: no limit).
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            counts: Mutex::new(HashMap::new()),
        })
    }

    /// Takes a slot for `client`, or refuses when it has `max` already.
    pub fn acquire(self: &Arc<Self>, client: &str) -> Result<ClientSlot, ServiceError> {
        let mut counts = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = counts.entry(client.to_string()).or_insert(0);
        if self.max > 0 && *n >= self.max {
            return Err(ServiceError::TooManyRequests {
                client: client.to_string(),
                limit: self.max,
            });
        }
        *n += 1;
        Ok(ClientSlot {
            limits: self.clone(),
            client: client.to_string(),
        })
    }

    /// Requests `client` has running or waiting now.
    pub fn current(&self, client: &str) -> usize {
        let counts = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        counts.get(client).copied().unwrap_or(0)
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut counts = self
            .limits
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = counts.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.client);
            }
        }
    }
}

/// The client key of a peer: its IP address, or "unix" for the Unix socket (whose mode already limits it
/// to the owner).
pub fn client_key(peer: Option<std::net::SocketAddr>) -> String {
    peer.map_or_else(|| "unix".to_string(), |a| a.ip().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_per_client_and_freed() {
        let limits = ClientLimits::new(2);
        let a1 = limits.acquire("a").unwrap();
        let _a2 = limits.acquire("a").unwrap();
        assert!(matches!(
            limits.acquire("a"),
            Err(ServiceError::TooManyRequests { limit: 2, .. })
        ));
        let _b = limits.acquire("b").unwrap();
        drop(a1);
        assert_eq!(limits.current("a"), 1);
        assert!(limits.acquire("a").is_ok());
        assert!(ClientLimits::new(0).acquire("x").is_ok());
    }
}
