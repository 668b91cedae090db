//! Who may take a semaphore's permits now (pure): the queueing rule of the
//! key's Semaphore applied to its waiters and the permits in use.

use std::time::Duration;

use crate::crd::Queueing;

/// How long the head of a BestEffortFIFO queue may be passed by later
/// requests that fit; after that it blocks them until it is granted.
pub const HEAD_PATIENCE: Duration = Duration::from_secs(60);

/// What a waiter asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Want {
    pub permits: u32,
    pub exclusive: bool,
    /// How long it has waited (since it arrived).
    pub waited: Duration,
}

/// The permits of a key as this controller sees them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capacity {
    pub limit: u32,
    /// Permits in use (an exclusive holder counts as the whole limit).
    pub held: u32,
    /// Someone holds every permit (a writer).
    pub exclusive_held: bool,
    /// Who holds them (display names), oldest grant first.
    pub holders: Vec<String>,
}

impl Capacity {
    /// "3/3 permits held by a, b, c" (at most five names).
    pub fn summary(&self) -> String {
        let mut text = format!("{}/{} permits held", self.held, self.limit);
        if !self.holders.is_empty() {
            let shown: Vec<&str> = self.holders.iter().take(5).map(String::as_str).collect();
            text.push_str(&format!(" by {}", shown.join(", ")));
            if self.holders.len() > shown.len() {
                text.push_str(&format!(" and {} more", self.holders.len() - shown.len()));
            }
        }
        text
    }

    /// Whether `want` can never be granted under the current limit.
    pub fn exceeds_limit(&self, want: &Want) -> bool {
        self.limit == 0 || (!want.exclusive && want.permits > self.limit)
    }

    /// Whether `want` fits now.
    pub fn fits(&self, want: &Want) -> bool {
        if self.exceeds_limit(want) || self.exclusive_held {
            return false;
        }
        if want.exclusive {
            return self.held == 0;
        }
        self.held.saturating_add(want.permits) <= self.limit
    }
}

/// A waiter's turn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Turn {
    /// Take the permits now (`skipped`: this many waiters ahead do not fit
    /// and are passed, BestEffortFIFO).
    Go { skipped: usize },
    /// Asks for more than the limit (or the key is closed): waits for the limit to rise.
    ExceedsLimit,
    /// Its turn, but the permits are in use.
    Full,
    /// Others go first.
    Behind,
}

/// The turn of `waiters[me]` (waiters in queue order).
pub fn turn(queueing: Queueing, capacity: &Capacity, waiters: &[Want], me: usize) -> Turn {
    let want = &waiters[me];
    if capacity.exceeds_limit(want) {
        return Turn::ExceedsLimit;
    }
    // waiters that can never fit under this limit do not hold up the others
    let ahead = waiters[..me].iter().filter(|w| !capacity.exceeds_limit(w));
    match queueing {
        Queueing::StrictFIFO => {
            if ahead.count() > 0 {
                Turn::Behind
            } else if capacity.fits(want) {
                Turn::Go { skipped: 0 }
            } else {
                Turn::Full
            }
        }
        Queueing::BestEffortFIFO => {
            let mut skipped = 0;
            for before in ahead {
                // an earlier request that fits goes first; one that has
                // waited past HEAD_PATIENCE is passed no more
                if capacity.fits(before) || before.waited >= HEAD_PATIENCE {
                    return Turn::Behind;
                }
                skipped += 1;
            }
            if capacity.fits(want) {
                Turn::Go { skipped }
            } else if skipped == 0 {
                Turn::Full
            } else {
                Turn::Behind
            }
        }
    }
}

/// "1st", "2nd", "3rd", "4th", "11th", "21st"…
pub fn ordinal(n: usize) -> String {
    let suffix = match (n % 10, n % 100) {
        (1, r) if r != 11 => "st",
        (2, r) if r != 12 => "nd",
        (3, r) if r != 13 => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(permits: u32) -> Want {
        Want {
            permits,
            exclusive: false,
            waited: Duration::from_secs(1),
        }
    }

    fn writer() -> Want {
        Want {
            exclusive: true,
            ..want(1)
        }
    }

    fn capacity(limit: u32, held: u32) -> Capacity {
        Capacity {
            limit,
            held,
            ..Default::default()
        }
    }

    #[test]
    fn strict_fifo_serves_only_the_head() {
        let queue = [want(2), want(1)];
        assert_eq!(turn(Queueing::StrictFIFO, &capacity(3, 2), &queue, 0), Turn::Full);
        assert_eq!(turn(Queueing::StrictFIFO, &capacity(3, 2), &queue, 1), Turn::Behind);
        assert_eq!(
            turn(Queueing::StrictFIFO, &capacity(3, 1), &queue, 0),
            Turn::Go { skipped: 0 }
        );
    }

    #[test]
    fn best_effort_lets_a_fitting_request_pass_a_blocked_head() {
        let queue = [want(2), want(1)];
        assert_eq!(turn(Queueing::BestEffortFIFO, &capacity(3, 2), &queue, 0), Turn::Full);
        assert_eq!(
            turn(Queueing::BestEffortFIFO, &capacity(3, 2), &queue, 1),
            Turn::Go { skipped: 1 }
        );
        // a head that fits goes first
        assert_eq!(turn(Queueing::BestEffortFIFO, &capacity(3, 1), &queue, 1), Turn::Behind);
    }

    #[test]
    fn best_effort_stops_passing_a_head_that_waited_too_long() {
        let starving = Want {
            waited: HEAD_PATIENCE,
            ..want(2)
        };
        let queue = [starving, want(1)];
        assert_eq!(turn(Queueing::BestEffortFIFO, &capacity(3, 2), &queue, 1), Turn::Behind);
    }

    #[test]
    fn a_request_over_the_limit_waits_and_blocks_nobody() {
        let queue = [want(5), want(1)];
        for queueing in [Queueing::StrictFIFO, Queueing::BestEffortFIFO] {
            assert_eq!(turn(queueing, &capacity(3, 0), &queue, 0), Turn::ExceedsLimit);
            assert_eq!(turn(queueing, &capacity(3, 0), &queue, 1), Turn::Go { skipped: 0 });
        }
        assert_eq!(
            turn(Queueing::StrictFIFO, &capacity(0, 0), &[want(1)], 0),
            Turn::ExceedsLimit
        );
    }

    #[test]
    fn a_writer_waits_for_readers_and_blocks_readers_behind_it() {
        let queue = [writer(), want(1)];
        assert_eq!(turn(Queueing::StrictFIFO, &capacity(3, 1), &queue, 0), Turn::Full);
        assert_eq!(turn(Queueing::StrictFIFO, &capacity(3, 1), &queue, 1), Turn::Behind);
        assert_eq!(
            turn(Queueing::StrictFIFO, &capacity(3, 0), &queue, 0),
            Turn::Go { skipped: 0 }
        );
        let held_by_writer = Capacity {
            exclusive_held: true,
            ..capacity(3, 3)
        };
        assert_eq!(turn(Queueing::StrictFIFO, &held_by_writer, &[want(1)], 0), Turn::Full);
    }

    #[test]
    fn ordinals() {
        let got: Vec<_> = [1, 2, 3, 4, 11, 12, 13, 21, 22, 101].map(ordinal).to_vec();
        assert_eq!(
            got,
            [
                "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "101st"
            ]
        );
    }
}
