//! Per-user limits, and the log of recent sends that the messages-per-minute limit counts.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::store::UserId;

/// Per-user limits; each has its own error code.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest WebSocket frame or message (bytes); larger closes the socket with 1009.
    pub max_frame_bytes: usize,
    /// Longest chat message, in characters (`message_too_long`).
    pub max_message_chars: usize,
    /// Messages that start a generation, per user per minute (`rate_limited`).
    pub messages_per_minute: usize,
    /// Conversations generating at once, per user (`too_many_generations`).
    pub concurrent_generations: usize,
    /// Open sockets per user (HTTP 429 at the upgrade).
    pub sockets_per_user: usize,
    /// Conversations one socket follows at once (`too_many_subscriptions`; the page follows
    /// one, closing it when it opens another).
    pub subscriptions_per_socket: usize,
    /// Conversations one user may hold (`too_many_conversations` when creating one more).
    pub conversations_per_user: usize,
    /// Bad frames (invalid JSON, unknown types, …) before the socket is closed with 1008.
    pub max_bad_frames: usize,
    /// How long a frame may wait for a client that does not read before the socket is dropped
    /// (its conversations are left as they are; their answers go on and are stored).
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 256 * 1024,
            max_message_chars: 16_000,
            messages_per_minute: 20,
            concurrent_generations: 2,
            sockets_per_user: 8,
            subscriptions_per_socket: 16,
            conversations_per_user: 5_000,
            max_bad_frames: 10,
            write_timeout: Duration::from_secs(30),
        }
    }
}

/// The window `messages_per_minute` counts over.
const WINDOW: Duration = Duration::from_secs(60);

/// When each user's recent sends were. A user whose sends have all left the window is
/// forgotten, so the log holds only those who sent in the last minute, whoever has come and
/// gone since the server started.
#[derive(Debug, Default)]
pub(super) struct SendLog {
    by_user: HashMap<UserId, VecDeque<Instant>>,
    /// The log is swept when it holds this many users (doubling, so sweeps cost O(1) a send).
    sweep_at: usize,
}

impl SendLog {
    /// Records a send by `user` at `now` if fewer than `per_minute` came in the last minute.
    pub fn admit(&mut self, user: UserId, now: Instant, per_minute: usize) -> bool {
        if self.by_user.len() >= self.sweep_at {
            self.by_user
                .retain(|_, q| q.back().is_some_and(|t| now.duration_since(*t) <= WINDOW));
            self.sweep_at = (2 * self.by_user.len()).max(64);
        }
        let q = self.by_user.entry(user).or_default();
        while q.front().is_some_and(|t| now.duration_since(*t) > WINDOW) {
            q.pop_front();
        }
        if q.len() >= per_minute {
            return false;
        }
        q.push_back(now);
        true
    }

    /// Users in the log.
    #[cfg(test)]
    fn users(&self) -> usize {
        self.by_user.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_are_counted_per_user_over_a_minute() {
        let mut log = SendLog::default();
        let (alice, bob) = (UserId::new(), UserId::new());
        let t0 = Instant::now();
        assert!(log.admit(alice, t0, 2));
        assert!(log.admit(alice, t0 + Duration::from_secs(1), 2));
        assert!(!log.admit(alice, t0 + Duration::from_secs(2), 2), "a third");
        assert!(
            log.admit(bob, t0 + Duration::from_secs(2), 2),
            "Bob has his own"
        );
        assert!(
            !log.admit(alice, t0 + Duration::from_secs(60), 2),
            "still in the minute"
        );
        assert!(
            log.admit(alice, t0 + Duration::from_secs(61), 2),
            "the first has left it"
        );
    }

    #[test]
    fn users_who_stopped_sending_are_forgotten() {
        let mut log = SendLog::default();
        let t0 = Instant::now();
        // Ten thousand users who each sent once, a minute apart in waves of a hundred.
        for wave in 0..100u64 {
            let now = t0 + Duration::from_secs(61 * wave);
            for _ in 0..100 {
                assert!(log.admit(UserId::new(), now, 20));
            }
            assert!(log.users() <= 400, "wave {wave}: {} users", log.users());
        }
        // And one who keeps sending is remembered through the sweeps.
        let carol = UserId::new();
        let now = t0 + Duration::from_secs(61 * 100);
        for i in 0..3 {
            assert!(log.admit(carol, now + Duration::from_millis(i), 3));
        }
        for _ in 0..500 {
            log.admit(UserId::new(), now, 20);
        }
        assert!(
            !log.admit(carol, now, 3),
            "Carol's three sends survived the sweeps"
        );
    }
}
