//! Per-user limits, and the logs of recent events that the limits over time count: sends per
//! user a minute, new users per address an hour.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::net::IpAddr;
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
    /// New users stored per client address (IPv6: per /64) an hour: a visitor is stored with
    /// their first conversation, and a script that fetches a fresh cookie for every
    /// conversation would otherwise get round `conversations_per_user` (`too_many_new_users`).
    pub new_users_per_address_per_hour: usize,
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
            new_users_per_address_per_hour: 100,
            max_bad_frames: 10,
            write_timeout: Duration::from_secs(30),
        }
    }
}

/// When each key's recent events were, over a sliding window. A key whose events have all
/// left the window is forgotten, so the log holds only those seen within it, whoever has come
/// and gone since the server started.
#[derive(Debug)]
pub(super) struct RecentLog<K> {
    window: Duration,
    by_key: HashMap<K, VecDeque<Instant>>,
    /// The log is swept when it holds this many keys (doubling, so sweeps cost O(1) an event).
    sweep_at: usize,
}

/// Sends per user (`messages_per_minute`).
pub(super) type SendLog = RecentLog<UserId>;
/// New users per client address (`new_users_per_address_per_hour`).
pub(super) type NewUserLog = RecentLog<IpAddr>;

impl SendLog {
    pub fn per_minute() -> Self {
        Self::new(Duration::from_secs(60))
    }
}

impl NewUserLog {
    pub fn per_hour() -> Self {
        Self::new(Duration::from_secs(3600))
    }
}

impl<K: Hash + Eq> RecentLog<K> {
    fn new(window: Duration) -> Self {
        Self {
            window,
            by_key: HashMap::new(),
            sweep_at: 0,
        }
    }

    /// Records an event for `key` at `now` if fewer than `limit` came within the window.
    pub fn admit(&mut self, key: K, now: Instant, limit: usize) -> bool {
        let window = self.window;
        let recent = |t: &Instant| now.saturating_duration_since(*t) <= window;
        if self.by_key.len() >= self.sweep_at {
            self.by_key.retain(|_, q| q.back().is_some_and(recent));
            self.sweep_at = (2 * self.by_key.len()).max(64);
        }
        let q = self.by_key.entry(key).or_default();
        while q.front().is_some_and(|t| !recent(t)) {
            q.pop_front();
        }
        if q.len() >= limit {
            return false;
        }
        q.push_back(now);
        true
    }

    /// Takes back the latest event admitted for `key` (what it was for did not happen).
    pub fn take_back(&mut self, key: &K) {
        if let Some(q) = self.by_key.get_mut(key) {
            q.pop_back();
            if q.is_empty() {
                self.by_key.remove(key);
            }
        }
    }

    /// Keys in the log.
    #[cfg(test)]
    fn keys(&self) -> usize {
        self.by_key.len()
    }
}

/// The address that new users are counted against: the client's IPv4 address, or its IPv6
/// /64 (one subscriber's network, which hands out addresses within it freely). An IPv4 address
/// mapped into IPv6 counts as itself.
pub(super) fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_are_counted_per_user_over_a_minute() {
        let mut log = SendLog::per_minute();
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
        let mut log = SendLog::per_minute();
        let t0 = Instant::now();
        // Ten thousand users who each sent once, a minute apart in waves of a hundred.
        for wave in 0..100u64 {
            let now = t0 + Duration::from_secs(61 * wave);
            for _ in 0..100 {
                assert!(log.admit(UserId::new(), now, 20));
            }
            assert!(log.keys() <= 400, "wave {wave}: {} users", log.keys());
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

    #[test]
    fn new_users_are_counted_per_address_over_an_hour_and_can_be_taken_back() {
        let mut log = NewUserLog::per_hour();
        let a: IpAddr = "203.0.113.7".parse().unwrap();
        let b: IpAddr = "203.0.113.8".parse().unwrap();
        let t0 = Instant::now();
        assert!(log.admit(a, t0, 2));
        assert!(log.admit(a, t0, 2));
        assert!(!log.admit(a, t0 + Duration::from_secs(3599), 2));
        assert!(log.admit(b, t0, 2), "another address has its own");
        log.take_back(&a);
        assert!(
            log.admit(a, t0, 2),
            "a refused creation gives its place back"
        );
        assert!(
            log.admit(a, t0 + Duration::from_secs(3601), 2),
            "an hour on"
        );
    }

    #[test]
    fn an_ipv6_subscriber_is_one_address_and_a_mapped_ipv4_is_itself() {
        let key = |s: &str| address_key(s.parse().unwrap());
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:bbbb::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:198.51.100.4"), key("198.51.100.4"));
        assert_ne!(key("198.51.100.4"), key("198.51.100.5"));
    }
}
