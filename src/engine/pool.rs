//! A small thread pool for the engine's parallel loops.
//!
//! A decode step of a small model is a few hundred parallel sections of tens of microseconds
//! each; waking sleeping threads through the OS for every one of them costs more than the work.
//! Here workers spin for a short while after each section (so the next one starts at once) and
//! only then sleep on a condition variable. The calling thread takes tasks too. Sections from
//! different callers are serialized.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it sleeps.
const SPIN: Duration = Duration::from_micros(300);

type Task<'a> = &'a (dyn Fn(usize) + Sync);

struct Shared {
    /// Bumped for every section; workers watch it.
    epoch: AtomicUsize,
    /// The current section's epoch and function, erased to 'static for the workers (see `run`).
    job: Mutex<Option<(usize, Task<'static>)>>,
    n_tasks: AtomicUsize,
    /// `epoch << 32 | next task index`: a worker can only claim tasks of the epoch it joined.
    next: AtomicU64,
    done: AtomicUsize,
    /// Workers that may be holding the current function.
    active: AtomicUsize,
    sleep: Mutex<()>,
    wake: Condvar,
}

pub struct Pool {
    shared: Arc<Shared>,
    threads: usize,
    caller: Mutex<()>,
}

static POOL: OnceLock<Pool> = OnceLock::new();
static THREADS: AtomicUsize = AtomicUsize::new(0);

/// Sets the number of threads (callers included) before the pool is first used.
pub fn set_threads(n: usize) {
    THREADS.store(n.max(1), Ordering::SeqCst);
}

/// The engine's pool, started on first use.
pub fn global() -> &'static Pool {
    POOL.get_or_init(|| {
        let n = match THREADS.load(Ordering::SeqCst) {
            0 => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            n => n,
        };
        Pool::new(n)
    })
}

impl Pool {
    fn new(threads: usize) -> Self {
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            job: Mutex::new(None),
            n_tasks: AtomicUsize::new(0),
            next: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
        });
        for i in 1..threads {
            let s = shared.clone();
            let _ = std::thread::Builder::new()
                .name(format!("smolchat-engine-{i}"))
                .spawn(move || worker(&s));
        }
        Self {
            shared,
            threads,
            caller: Mutex::new(()),
        }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f(0..n)` across the pool and returns when every task is done.
    pub fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        if n == 0 {
            return;
        }
        if self.threads == 1 || n == 1 {
            (0..n).for_each(f);
            return;
        }
        let _serial = self.caller.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        let epoch = s.epoch.load(Ordering::SeqCst).wrapping_add(1) & 0xFFFF_FFFF;
        // SAFETY: workers only call the erased function after taking it from `job` under its
        // lock while counted in `active`; below, `job` is cleared and `active` drained before
        // this function returns, so no call outlives `f`.
        let erased: Task<'static> = unsafe { std::mem::transmute::<Task<'_>, Task<'static>>(f) };
        *lock(&s.job) = Some((epoch, erased));
        s.n_tasks.store(n, Ordering::SeqCst);
        s.done.store(0, Ordering::SeqCst);
        s.next.store((epoch as u64) << 32, Ordering::SeqCst);
        s.epoch.store(epoch, Ordering::SeqCst);
        {
            let _g = lock(&s.sleep);
            s.wake.notify_all();
        }
        take_tasks(s, epoch, f);
        while s.done.load(Ordering::Acquire) < n {
            std::hint::spin_loop();
        }
        *lock(&s.job) = None;
        while s.active.load(Ordering::Acquire) > 0 {
            std::hint::spin_loop();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn take_tasks(s: &Shared, epoch: usize, f: &(dyn Fn(usize) + Sync)) {
    let n = s.n_tasks.load(Ordering::Acquire);
    let mut cur = s.next.load(Ordering::Acquire);
    loop {
        if (cur >> 32) as usize != epoch || (cur & 0xFFFF_FFFF) as usize >= n {
            return;
        }
        match s
            .next
            .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {
                f((cur & 0xFFFF_FFFF) as usize);
                s.done.fetch_add(1, Ordering::AcqRel);
                cur = s.next.load(Ordering::Acquire);
            }
            Err(actual) => cur = actual,
        }
    }
}

fn worker(s: &Shared) {
    let mut seen = 0;
    loop {
        let spin_start = Instant::now();
        let mut spins = 0u32;
        loop {
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen {
                seen = e;
                break;
            }
            spins = spins.wrapping_add(1);
            // Reading the clock costs more than a spin: look at it now and then.
            if spins.is_multiple_of(256) && spin_start.elapsed() > SPIN {
                let g = lock(&s.sleep);
                if s.epoch.load(Ordering::Acquire) == seen {
                    let _g = s.wake.wait_timeout(g, Duration::from_millis(100));
                }
                continue;
            }
            std::hint::spin_loop();
        }
        s.active.fetch_add(1, Ordering::AcqRel);
        let job = *lock(&s.job);
        if let Some((epoch, f)) = job {
            take_tasks(s, epoch, f);
        }
        s.active.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once() {
        let pool = Pool::new(3);
        for n in [1usize, 2, 7, 100] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            pool.run(n, &|i| {
                hits[i].fetch_add(1, Ordering::SeqCst);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::SeqCst) == 1));
        }
    }
}
