//! The order in which changes reach the disk: the order of their log records.
//!
//! A change is appended to the log under the log lock and takes a [`Ticket`] there; it is
//! written to the disk when its ticket's turn comes, after the log lock is released. So the
//! next change can be logged while this one is written to the disk (a two-stage pipeline),
//! and overlapping changes still reach the disk in log order.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Hands out turns in ticket order.
#[derive(Default)]
pub struct Turnstile {
    state: Mutex<State>,
    moved: Condvar,
}

#[derive(Default)]
struct State {
    /// The ticket whose turn it is.
    turn: u64,
    /// Threads waiting for a turn: with none, ending a turn wakes nobody (no system call).
    waiting: usize,
}

impl Turnstile {
    fn state(&self) -> MutexGuard<'_, State> {
        // The guarded values are counters that are always valid: a panic elsewhere cannot
        // break them.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until every ticket below `n` has had its turn.
    pub fn wait_for(&self, n: u64) {
        let mut state = self.state();
        if state.turn >= n {
            return;
        }
        state.waiting += 1;
        while state.turn < n {
            state = self.moved.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.waiting -= 1;
    }

    fn end_turn(&self, n: u64) {
        let mut state = self.state();
        state.turn = n + 1;
        let waiting = state.waiting > 0;
        drop(state);
        if waiting {
            self.moved.notify_all();
        }
    }
}

/// A place in the disk order. Dropping it ends its turn (waiting for the turn first if
/// [`Ticket::wait`] was not called), so an error path cannot stall the tickets after it.
pub struct Ticket {
    n: u64,
    gate: Arc<Turnstile>,
    waited: bool,
}

impl Ticket {
    /// The ticket `n` of `gate`; tickets must be issued 0, 1, 2, ... with none skipped.
    pub fn new(gate: Arc<Turnstile>, n: u64) -> Self {
        Ticket {
            n,
            gate,
            waited: false,
        }
    }

    /// Blocks until every earlier ticket has ended its turn.
    pub fn wait(&mut self) {
        self.gate.wait_for(self.n);
        self.waited = true;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.waited {
            self.wait();
        }
        self.gate.end_turn(self.n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_follow_ticket_order_whatever_the_thread_order() {
        let gate = Arc::new(Turnstile::default());
        let seen = Arc::new(Mutex::new(Vec::new()));
        // Ticket 0 ends without an explicit wait: its drop must still pass the turn on.
        drop(Ticket::new(gate.clone(), 0));
        let threads: Vec<_> = (1..16)
            .rev()
            .map(|n| {
                let (gate, seen) = (gate.clone(), seen.clone());
                let mut ticket = Ticket::new(gate, n);
                std::thread::spawn(move || {
                    ticket.wait();
                    seen.lock().unwrap().push(n);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        gate.wait_for(16);
        assert_eq!(*seen.lock().unwrap(), (1..16).collect::<Vec<_>>());
    }
}
