//! One deadline per request: fixed on arrival from the API server's
//! `?timeout=` minus the margin, then handed to every step (slot wait, body
//! read, Restore lookup, group wait, live GETs). No step restarts the clock.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// What the API server waits when the URL carries no `?timeout=`
/// (the admissionregistration/v1 default `timeoutSeconds`).
pub const DEFAULT_API_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest timeout taken from a request. The API server caps `timeoutSeconds`
/// at 30; anything longer in a query string is clamped, never trusted.
pub const MAX_API_TIMEOUT: Duration = Duration::from_secs(30);

/// The timeout in a webhook URL's query string (`timeout=10s`, which the API
/// server appends). A value that does not parse, or is absurd, is ignored:
/// the default deadline then applies. Never panics.
pub fn api_timeout_from_query(query: &str) -> Option<Duration> {
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix("timeout="))
        .and_then(|value| crate::settings::humantime_duration(value).ok())
}

/// The instant by which a request must be answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    at: Instant,
}

/// A step ran into the request's deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the request's deadline passed")]
pub struct DeadlineExceeded;

impl Deadline {
    /// The deadline for a request that arrived at `arrived` with the API
    /// server's `api_timeout`, keeping `margin` free to send the answer.
    pub fn for_request(arrived: Instant, api_timeout: Option<Duration>, margin: Duration) -> Self {
        let budget = api_timeout
            .unwrap_or(DEFAULT_API_TIMEOUT)
            .min(MAX_API_TIMEOUT)
            .saturating_sub(margin);
        Deadline {
            at: arrived + budget,
        }
    }

    /// A deadline `after` from now, capped so that it cannot overflow.
    pub fn after(after: Duration) -> Self {
        Deadline {
            at: Instant::now() + after.min(Duration::from_secs(24 * 3600)),
        }
    }

    pub fn at(&self) -> Instant {
        self.at
    }

    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    pub fn expired(&self) -> bool {
        self.remaining().is_zero()
    }

    /// The earlier of this deadline and `bound` from now.
    pub fn min_after(&self, bound: Duration) -> Deadline {
        let other = Deadline::after(bound);
        if other.at < self.at { other } else { *self }
    }

    /// Runs `step`, cancelling it (dropping the future, which aborts an HTTP
    /// request in flight) when the deadline passes.
    pub async fn run<T>(&self, step: impl Future<Output = T>) -> Result<T, DeadlineExceeded> {
        tokio::time::timeout_at(self.at, step)
            .await
            .map_err(|_| DeadlineExceeded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn budget_is_timeout_minus_margin_and_clamped() {
        let now = Instant::now();
        let deadline =
            Deadline::for_request(now, Some(Duration::from_secs(10)), Duration::from_secs(2));
        assert_eq!(deadline.at() - now, Duration::from_secs(8));
        let absent = Deadline::for_request(now, None, Duration::from_secs(2));
        assert_eq!(absent.at() - now, Duration::from_secs(8));
        let huge = Deadline::for_request(now, Some(Duration::MAX), Duration::from_secs(2));
        assert_eq!(huge.at() - now, Duration::from_secs(28));
        let tiny = Deadline::for_request(now, Some(Duration::from_secs(1)), Duration::from_secs(2));
        assert!(tiny.expired());
    }

    #[tokio::test(start_paused = true)]
    async fn run_cancels_a_step_at_the_deadline() {
        let deadline = Deadline::after(Duration::from_secs(3));
        let slow = deadline
            .run(tokio::time::sleep(Duration::from_secs(60)))
            .await;
        assert_eq!(slow, Err(DeadlineExceeded));
        assert!(deadline.expired());
        let fast = Deadline::after(Duration::from_secs(3))
            .run(async { 7 })
            .await;
        assert_eq!(fast, Ok(7));
    }

    #[tokio::test(start_paused = true)]
    async fn min_after_never_extends() {
        let deadline = Deadline::after(Duration::from_secs(5));
        assert_eq!(deadline.min_after(Duration::from_secs(60)), deadline);
        assert!(deadline.min_after(Duration::from_secs(1)).remaining() <= Duration::from_secs(1));
    }
}
