//! A token bucket in virtual time (the generic cell rate algorithm: one timestamp, no
//! refill loop), for frames the engine sends on its own initiative in answer to what it
//! receives: the RSTs of the `reset` unknown-flow policy. Without a bound, whoever sends
//! spoofed segments makes xlb send as many RSTs to the spoofed addresses.

use crate::time::Nanos;

/// At most `rate` events per second on average, `burst` at once after a quiet second.
#[derive(Clone, Copy, Debug)]
pub struct TokenBucket {
    /// Nanoseconds one token takes to come back.
    interval: Nanos,
    /// How far ahead of `now` the theoretical arrival time may run: `(burst - 1) × interval`.
    tolerance: Nanos,
    /// When the bucket will be full again if nothing more is taken.
    full_at: Nanos,
}

impl TokenBucket {
    /// `rate` per second (at least 1), `burst` at once (at least 1).
    pub fn new(rate: u32, burst: u32) -> TokenBucket {
        let interval = 1_000_000_000 / u64::from(rate.max(1));
        TokenBucket {
            interval,
            tolerance: interval * u64::from(burst.max(1) - 1),
            full_at: 0,
        }
    }

    /// Takes a token at `now` if there is one.
    #[inline]
    pub fn take(&mut self, now: Nanos) -> bool {
        let at = self.full_at.max(now);
        if at - now > self.tolerance {
            return false;
        }
        self.full_at = at.saturating_add(self.interval);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Nanos = 1_000_000_000;

    #[test]
    fn burst_then_rate() {
        let mut b = TokenBucket::new(100, 10);
        let t0 = 5 * S;
        assert_eq!((0..50).filter(|_| b.take(t0)).count(), 10, "the burst");
        assert!(!b.take(t0 + S / 100 - 1), "no token before 10 ms");
        assert!(b.take(t0 + S / 100));
        // Over a second at a steady 1000 asks per second: the rate, not the asks.
        let got = (0..1000).filter(|i| b.take(t0 + S + i * S / 1000)).count();
        assert!((100..=111).contains(&got), "{got}");
        // A quiet second refills the burst, and no more.
        let t = t0 + 3 * S;
        assert_eq!((0..50).filter(|_| b.take(t)).count(), 10);
    }

    #[test]
    fn starts_full_and_never_panics_at_the_extremes() {
        let mut b = TokenBucket::new(0, 0);
        assert!(b.take(0));
        assert!(!b.take(0));
        let mut b = TokenBucket::new(u32::MAX, u32::MAX);
        assert!((0..1000).all(|_| b.take(Nanos::MAX / 2)));
    }
}
