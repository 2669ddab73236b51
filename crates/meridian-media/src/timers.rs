//! When each connection next needs [`str0m::Rtc::handle_input`] with a timeout: a
//! min-heap of deadlines, so `Sfu::poll_timeout` is O(1) and `Sfu::handle_timeout`
//! touches only the connections that are due (O(due · log n)), instead of walking
//! every participant on every wake-up.
//!
//! Entries are never removed from the middle of the heap. Each key keeps, next to its
//! real deadline, the time of the one entry that is live for it (`scheduled`); an
//! entry whose time differs from its key's `scheduled` is stale and skipped when it
//! comes up. A deadline that moves earlier pushes a new entry; one that moves later
//! pushes nothing: when the earlier entry comes up and the key is not due, it is
//! pushed again at its real deadline. So the heap holds about one entry per key plus
//! the deadlines that moved earlier since, and a connection whose deadline moves on
//! every packet costs no heap operation for it.
//!
//! A deadline already due when it is set does not go into the heap: it is kept in a
//! plain list, taken first by the next [`TimerHeap::pop_due`]. str0m sets one for every
//! packet written to a connection (a stream with unsent packets asks for a timeout at
//! once: its pacer picks the queue to send from only in `handle_timeout`), so the
//! common per-packet round — due now, handled, next deadline set — costs a list push
//! and pop instead of a heap push and pop, each O(log n) in the connections with a
//! cache miss per level. (The pacer then asks for another timeout 1 µs after the packet
//! leaves, before it releases the next: that one goes through the heap.)

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

/// A min-heap of `(deadline, key)` with lazy deletion; see the module documentation.
#[derive(Debug)]
pub(crate) struct TimerHeap<K> {
    heap: BinaryHeap<Reverse<(Instant, K)>>,
    /// Entries that were due (at or before the caller's `now`) when set; see the
    /// module documentation.
    due: Vec<(Instant, K)>,
}

impl<K: Ord + Copy> TimerHeap<K> {
    pub(crate) fn new() -> Self {
        TimerHeap {
            heap: BinaryHeap::new(),
            due: Vec::new(),
        }
    }

    /// Records that `key`'s deadline is now `at` (`now`: the caller's time, to tell
    /// a deadline already due). `scheduled` is the key's own record of its live entry
    /// (`None`: it has none); it is updated here.
    pub(crate) fn update(
        &mut self,
        key: K,
        at: Instant,
        now: Instant,
        scheduled: &mut Option<Instant>,
    ) {
        if scheduled.is_none_or(|s| at < s) {
            *scheduled = Some(at);
            if at <= now {
                self.due.push((at, key));
            } else {
                self.heap.push(Reverse((at, key)));
            }
        }
    }

    /// The earliest entry's time: no key is due before it (it may be a stale entry,
    /// so nothing may be due at it either). With entries that were due when set, one
    /// of their times: already past, so the caller comes back at once.
    pub(crate) fn peek(&self) -> Option<Instant> {
        let heap = self.heap.peek().map(|Reverse((at, _))| *at);
        match (self.due.last(), heap) {
            (Some((due, _)), Some(heap)) => Some((*due).min(heap)),
            (Some((due, _)), None) => Some(*due),
            (None, heap) => heap,
        }
    }

    /// Removes and returns an entry at or before `now`: first those that were due
    /// when set, then the heap's earliest. The caller checks it against the key's
    /// `scheduled` (stale if different), clears `scheduled`, and either handles the
    /// key (which sets a new deadline through [`TimerHeap::update`]) or, when the key
    /// is not due yet, calls `update` with its real deadline.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<(Instant, K)> {
        if let Some(entry) = self.due.pop() {
            return Some(entry);
        }
        if self.heap.peek()?.0.0 > now {
            return None;
        }
        self.heap.pop().map(|Reverse(entry)| entry)
    }

    /// Entries held, stale ones included.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.heap.len() + self.due.len()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use super::*;

    /// A key's real deadline and its live entry, as a connection keeps them.
    #[derive(Default)]
    struct Key {
        deadline: Option<Instant>,
        scheduled: Option<Instant>,
    }

    /// Pops everything due at `now` the way `Sfu::handle_timeout` does; returns the
    /// keys that fired, in deadline order.
    fn fire(timers: &mut TimerHeap<u32>, keys: &mut HashMap<u32, Key>, now: Instant) -> Vec<u32> {
        let mut fired = Vec::new();
        while let Some((at, k)) = timers.pop_due(now) {
            let Some(key) = keys.get_mut(&k) else {
                continue; // removed
            };
            if key.scheduled != Some(at) {
                continue; // stale
            }
            key.scheduled = None;
            let deadline = key.deadline.expect("scheduled keys have deadlines");
            if deadline <= now {
                fired.push(k);
                key.deadline = None;
            } else {
                timers.update(k, deadline, now, &mut key.scheduled);
            }
        }
        fired
    }

    #[test]
    fn due_keys_fire_once_in_order_and_moved_deadlines_are_followed() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut timers = TimerHeap::new();
        let mut keys: HashMap<u32, Key> = HashMap::new();
        let set = |timers: &mut TimerHeap<u32>, keys: &mut HashMap<u32, Key>, k, at| {
            let key = keys.entry(k).or_default();
            key.deadline = Some(at);
            timers.update(k, at, t0, &mut key.scheduled);
        };
        set(&mut timers, &mut keys, 1, ms(30));
        set(&mut timers, &mut keys, 2, ms(10));
        set(&mut timers, &mut keys, 3, ms(20));
        assert_eq!(timers.peek(), Some(ms(10)));
        // Key 3 moves later (no push), key 1 earlier (a push, its old entry goes stale).
        set(&mut timers, &mut keys, 3, ms(50));
        set(&mut timers, &mut keys, 1, ms(5));
        assert_eq!(timers.len(), 4);
        assert_eq!(timers.peek(), Some(ms(5)));
        assert!(fire(&mut timers, &mut keys, ms(4)).is_empty());
        assert_eq!(fire(&mut timers, &mut keys, ms(25)), vec![1, 2]);
        // Key 3's entry at 20 came up early and was pushed again at 50.
        assert_eq!(timers.peek(), Some(ms(30)), "key 1's stale entry");
        assert!(fire(&mut timers, &mut keys, ms(45)).is_empty());
        assert_eq!(timers.peek(), Some(ms(50)));
        assert_eq!(timers.len(), 1);
        // A removed key's entry is skipped.
        keys.remove(&3);
        assert!(fire(&mut timers, &mut keys, ms(60)).is_empty());
        assert_eq!(timers.peek(), None);
    }

    #[test]
    fn a_deadline_moving_on_every_packet_costs_no_heap_growth() {
        let t0 = Instant::now();
        let mut timers = TimerHeap::new();
        let mut scheduled = None;
        for i in 0..10_000u64 {
            timers.update(
                7u32,
                t0 + Duration::from_micros(1000 + i),
                t0,
                &mut scheduled,
            );
        }
        assert_eq!(timers.len(), 1);
    }

    #[test]
    fn deadlines_due_when_set_skip_the_heap_and_come_first() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut timers = TimerHeap::new();
        let mut keys: HashMap<u32, Key> = HashMap::new();
        let mut set = |timers: &mut TimerHeap<u32>, k, at, now| {
            let key = keys.entry(k).or_default();
            key.deadline = Some(at);
            timers.update(k, at, now, &mut key.scheduled);
        };
        set(&mut timers, 1, ms(30), ms(0));
        set(&mut timers, 2, ms(40), ms(0));
        assert_eq!(timers.heap.len(), 2);
        // At 20 ms key 2 asks for a timeout "now" (as str0m does after a packet): it is
        // due at once, without a heap entry, and comes before the heap's earlier key 1.
        set(&mut timers, 2, ms(20), ms(20));
        assert_eq!((timers.heap.len(), timers.due.len()), (2, 1));
        assert_eq!(timers.peek(), Some(ms(20)));
        assert_eq!(timers.pop_due(ms(20)), Some((ms(20), 2)));
        assert_eq!(timers.pop_due(ms(20)), None, "key 1 is not due at 20 ms");
        assert_eq!(timers.peek(), Some(ms(30)));
        assert_eq!(timers.pop_due(ms(30)), Some((ms(30), 1)));
        // Key 2's entry at 40 is stale now (its live one was the due entry at 20).
        assert_eq!(timers.pop_due(ms(45)), Some((ms(40), 2)));
        assert_eq!(timers.peek(), None);
    }
}
