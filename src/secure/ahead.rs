//! How far the dealer's offline thread may run ahead of its online part (docs/method.md 8.5).
//!
//! Per image the dealer produces the input-independent material (offline) on its own thread
//! while its online part answers comparisons. The client must read every offline frame sent
//! before the online frame it waits for and keeps them until needed, so whatever the offline
//! thread produces ahead is client memory. The [`Gate`] bounds it in DReLU batches: the offline
//! part may produce batch `c` once the online part has finished batch `c - ahead`. That cannot
//! deadlock: batch `c - ahead` needs only material produced before batch `c`.
//!
//! [`Carry`] moves the values the offline part keeps for the online part (the masks whose bits
//! it shared) in order, within one thread or between the two. [`Dealer`] holds all of this:
//! the state only the dealer has.
use crate::error::{Error, Result};
use std::collections::VecDeque;
use std::sync::{mpsc, Arc, Condvar, Mutex};

/// What the dealer does in a protocol call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Both parts in each call (protocol tests).
    Inline,
    /// Only the input-independent part: correlated randomness, sent ahead.
    Offline,
    /// Only the part that needs the other parties' messages (the comparisons).
    Online,
}

/// The dealer's own state in a session.
pub struct Dealer {
    /// Which part of each protocol to run.
    phase: Phase,
    /// Private values the offline part keeps for the online part, in order.
    pub carry: Carry,
    /// While the offline part runs on its own thread: the bound on its lead.
    gate: Option<Arc<Gate>>,
    /// DReLU batches of the current image seen by this part so far.
    batches: u64,
    /// DReLU batches the offline thread may run ahead.
    ahead: u64,
}

impl Dealer {
    /// Both parts inline; `ahead`: the lead allowed once [`Dealer::split`] runs them apart.
    pub fn new(ahead: u64) -> Dealer {
        Dealer {
            phase: Phase::Inline,
            carry: Carry::Local(VecDeque::new()),
            gate: None,
            batches: 0,
            ahead,
        }
    }

    /// This part becomes the online one of an image; returns the offline one, which sends it
    /// the carried values and waits at the shared gate.
    pub fn split(&mut self) -> Dealer {
        let gate = Arc::new(Gate::new(self.ahead));
        let (tx, rx) = mpsc::channel();
        self.carry = Carry::Recv(rx);
        self.gate = Some(gate.clone());
        self.phase = Phase::Online;
        self.batches = 0;
        Dealer {
            phase: Phase::Offline,
            carry: Carry::Send(tx),
            gate: Some(gate),
            batches: 0,
            ahead: self.ahead,
        }
    }

    /// The image is done: both parts on this one again.
    pub fn rejoin(&mut self) {
        self.carry = Carry::Local(VecDeque::new());
        self.gate = None;
    }

    pub fn does_offline(&self) -> bool {
        self.phase != Phase::Online
    }

    pub fn does_online(&self) -> bool {
        self.phase != Phase::Offline
    }

    /// Offline part: waits until the next DReLU batch may be produced.
    pub fn batch_ahead(&mut self) -> Result<()> {
        let c = self.batches;
        self.batches += 1;
        match &self.gate {
            Some(g) => g.wait(c),
            None => Ok(()),
        }
    }

    /// Online part: a DReLU batch is done (the client has used its material).
    pub fn batch_done(&self) {
        if let Some(g) = &self.gate {
            g.pass();
        }
    }

    /// Online part: stopped; a waiting offline part gives up.
    pub fn stop(&self) {
        if let Some(g) = &self.gate {
            g.stop();
        }
    }
}

/// Online progress in DReLU batches, shared by the dealer's two threads.
pub struct Gate {
    /// (batches finished online, stopped)
    state: Mutex<(u64, bool)>,
    cv: Condvar,
    ahead: u64,
}

impl Gate {
    pub fn new(ahead: u64) -> Gate {
        Gate {
            state: Mutex::new((0, false)),
            cv: Condvar::new(),
            ahead,
        }
    }

    /// Offline side: waits until batch `c` may be produced; fails once the online side stopped.
    pub fn wait(&self, c: u64) -> Result<()> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while s.0 + self.ahead < c && !s.1 {
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        if s.1 && s.0 + self.ahead < c {
            return Err(Error::Link {
                peer: "dealer".into(),
                msg: "the online part stopped".into(),
            });
        }
        Ok(())
    }

    /// Online side: one more batch finished.
    pub fn pass(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.0 += 1;
        self.cv.notify_all();
    }

    /// Online side: stopped (error or end of image); releases a waiting offline side.
    pub fn stop(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.1 = true;
        self.cv.notify_all();
    }
}

/// Values kept by the offline part of a protocol for its online part, in order.
pub enum Carry {
    /// Both parts on one thread (protocol tests, or the dealer's inline mode).
    Local(VecDeque<Vec<u64>>),
    /// The offline thread's end.
    Send(mpsc::Sender<Vec<u64>>),
    /// The online thread's end.
    Recv(mpsc::Receiver<Vec<u64>>),
}

impl Carry {
    pub fn push(&mut self, v: Vec<u64>) -> Result<()> {
        match self {
            Carry::Local(q) => q.push_back(v),
            Carry::Send(tx) => tx.send(v).map_err(|_| Error::Link {
                peer: "dealer".into(),
                msg: "the online part stopped".into(),
            })?,
            Carry::Recv(_) => unreachable_carry("push on the online side")?,
        }
        Ok(())
    }

    pub fn pop(&mut self) -> Result<Vec<u64>> {
        let missing =
            || Error::InvalidArgument("dealer: a comparison without its offline values".into());
        match self {
            Carry::Local(q) => q.pop_front().ok_or_else(missing),
            Carry::Recv(rx) => rx.recv().map_err(|_| missing()),
            Carry::Send(_) => unreachable_carry("pop on the offline side"),
        }
    }
}

fn unreachable_carry<T>(what: &str) -> Result<T> {
    Err(Error::InvalidArgument(format!(
        "dealer: {what} (a protocol ran the wrong part)"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The offline side never gets more than `ahead` batches in front; stopping releases it.
    #[test]
    fn gate_bounds_the_lead_and_releases_on_stop() {
        let g = Arc::new(Gate::new(2));
        let produced = Arc::new(Mutex::new(0u64));
        let (g2, p2) = (g.clone(), produced.clone());
        let h = std::thread::spawn(move || {
            for c in 0..10 {
                if g2.wait(c).is_err() {
                    return c;
                }
                *p2.lock().unwrap() = c + 1;
            }
            10
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(*produced.lock().unwrap(), 3); // batches 0, 1, 2 before any finished
        g.pass();
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(*produced.lock().unwrap(), 4);
        g.stop();
        assert_eq!(h.join().unwrap(), 4);
    }
}
