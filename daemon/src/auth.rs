//! Optional bearer-token authentication for gRPC and HTTP. Health checks stay open (for supervisors);
//! everything else needs `authorization: Bearer <token>` when a token is configured.

use std::sync::Arc;

use tonic::{Request, Status};

use crate::metrics::Metrics;

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The one bearer-token check every front door uses: with a token configured, `header` (the
/// `authorization` value) must be `Bearer <token>`.
pub fn bearer_ok(token: Option<&str>, header: Option<&str>) -> bool {
    match token {
        None => true,
        Some(t) => header
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|given| constant_time_eq(given.as_bytes(), t.as_bytes())),
    }
}

/// A tonic interceptor that checks the bearer token and counts refusals.
#[derive(Clone)]
pub struct BearerAuth {
    token: Option<Arc<str>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BearerAuth")
            .field("enabled", &self.token.is_some())
            .finish()
    }
}

impl BearerAuth {
    /// Checks `token` when it is set; lets everything through otherwise.
    pub fn new(token: Option<Arc<str>>, metrics: Arc<Metrics>) -> Self {
        Self { token, metrics }
    }
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if bearer_ok(self.token.as_deref(), header) {
            Ok(request)
        } else {
            self.metrics.unauthenticated("grpc");
            Err(Status::unauthenticated("missing or wrong bearer token"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret!"));
        assert!(constant_time_eq(b"", b""));
    }
}
