//! A queue of jobs served by worker threads that start on demand, up to a limit: what a
//! front end uses for requests that may wait (NBD and iSCSI connections each have one).
//!
//! ```text
//!   submit(job) ─► queue ─► idle worker, or a new one while fewer than `max` run
//!   close()     ─► workers finish the queue, then exit; close joins them
//! ```

use std::collections::VecDeque;
use std::io;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::sync;

/// Jobs of type `J` and the threads that run them. The pool does not know what a job is:
/// each worker is a loop over [`Pool::next`] that the caller starts.
#[derive(Debug)]
pub struct Pool<J> {
    state: Mutex<State<J>>,
    ready: Condvar,
    max: usize,
}

#[derive(Debug)]
struct State<J> {
    jobs: VecDeque<J>,
    idle: usize,
    threads: Vec<JoinHandle<()>>,
    closed: bool,
}

impl<J> Pool<J> {
    /// A pool of at most `max` workers (at least one).
    pub fn new(max: usize) -> Pool<J> {
        Pool {
            state: Mutex::new(State {
                jobs: VecDeque::new(),
                idle: 0,
                threads: Vec::new(),
                closed: false,
            }),
            ready: Condvar::new(),
            max: max.max(1),
        }
    }

    /// The most workers it runs.
    pub fn max(&self) -> usize {
        self.max
    }

    fn lock(&self) -> MutexGuard<'_, State<J>> {
        sync::lock(&self.state)
    }

    /// Queues `job`. If no worker is idle and fewer than `max` run, `start` is called to
    /// start one (a thread looping over [`next`](Self::next)). If it fails while workers run,
    /// they take the job; if none runs, the job comes back with the error. After
    /// [`close`](Self::close) the job is dropped.
    pub fn submit(
        &self,
        job: J,
        start: impl FnOnce() -> io::Result<JoinHandle<()>>,
    ) -> Result<(), (J, io::Error)> {
        let mut st = self.lock();
        if st.closed {
            return Ok(());
        }
        if st.idle == 0 && st.threads.len() < self.max {
            match start() {
                Ok(h) => st.threads.push(h),
                Err(e) if st.threads.is_empty() => return Err((job, e)),
                Err(_) => {} // the workers already running will take it
            }
        }
        st.jobs.push_back(job);
        drop(st);
        self.ready.notify_one();
        Ok(())
    }

    /// The next job, waiting for one; None once the pool is closed and its queue empty.
    pub fn next(&self) -> Option<J> {
        let mut st = self.lock();
        loop {
            if let Some(job) = st.jobs.pop_front() {
                return Some(job);
            }
            if st.closed {
                return None;
            }
            st.idle += 1;
            st = sync::wait(&self.ready, st);
            st.idle -= 1;
        }
    }

    /// Lets the workers finish every queued job, then joins them. A worker calling this on
    /// its own pool would wait for itself: only the pool's owner calls it.
    pub fn close(&self) {
        let threads = {
            let mut st = self.lock();
            st.closed = true;
            std::mem::take(&mut st.threads)
        };
        self.ready.notify_all();
        for t in threads {
            let _ = t.join(); // a worker that panicked has already been reported
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    #[test]
    fn every_job_runs_before_close_returns() {
        const JOBS: usize = 100;
        let pool: Arc<Pool<usize>> = Arc::new(Pool::new(4));
        let sum = Arc::new(AtomicUsize::new(0));
        for i in 0..JOBS {
            let (p, s) = (Arc::clone(&pool), Arc::clone(&sum));
            let started = pool.submit(i, move || {
                std::thread::Builder::new().spawn(move || {
                    while let Some(j) = p.next() {
                        s.fetch_add(j, Ordering::SeqCst);
                    }
                })
            });
            assert!(started.is_ok());
        }
        pool.close();
        assert_eq!(sum.load(Ordering::SeqCst), JOBS * (JOBS - 1) / 2);
    }

    #[test]
    fn a_job_no_worker_can_run_comes_back() {
        let pool: Pool<u8> = Pool::new(2);
        let r = pool.submit(7, || Err(io::Error::other("no threads")));
        assert_eq!(r.map_err(|(j, _)| j), Err(7));
    }

    #[test]
    fn jobs_after_close_are_dropped() {
        let pool: Pool<u8> = Pool::new(1);
        pool.close();
        let mut started = false;
        let r = pool.submit(1, || {
            started = true;
            Err(io::Error::other("unreachable"))
        });
        assert!(r.is_ok());
        assert!(!started);
        assert!(pool.next().is_none());
    }
}
