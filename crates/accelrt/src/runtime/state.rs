//! Small helpers and the per-thread state (current device and stream per runtime).

use super::*;

// ---------------------------------------------------------------------------------------
// small helpers

/// A `OnceLock` whose initialiser may fail (and is retried on the next call).
pub(super) struct Lazy<T> {
    pub(super) cell: OnceLock<T>,
    pub(super) init: Mutex<()>,
}

impl<T> Lazy<T> {
    pub(super) fn new() -> Self {
        Lazy {
            cell: OnceLock::new(),
            init: Mutex::new(()),
        }
    }

    #[inline]
    pub(super) fn get(&self) -> Option<&T> {
        self.cell.get()
    }

    #[inline]
    pub(super) fn get_or_try_init<E>(
        &self,
        f: impl FnOnce() -> std::result::Result<T, E>,
    ) -> std::result::Result<&T, E> {
        match self.cell.get() {
            Some(v) => Ok(v),
            None => self.init_slow(f),
        }
    }

    #[cold]
    pub(super) fn init_slow<E>(
        &self,
        f: impl FnOnce() -> std::result::Result<T, E>,
    ) -> std::result::Result<&T, E> {
        let _guard = self.init.lock();
        if let Some(v) = self.cell.get() {
            return Ok(v);
        }
        let v = f()?;
        Ok(self.cell.get_or_init(|| v))
    }
}

pub(super) fn priority_index(p: StreamPriority) -> usize {
    match p {
        StreamPriority::Normal => 0,
        StreamPriority::High => 1,
    }
}

// ---------------------------------------------------------------------------------------
// per-thread state

pub(super) static NEXT_RUNTIME_ID: AtomicU64 = AtomicU64::new(1);

/// What one thread has selected on one runtime.
pub(super) struct ThreadState {
    pub(super) runtime: u64,
    pub(super) device: u32,
    /// `(device, stream index)` of streams made current with `set_current_stream`.
    pub(super) streams: Vec<(u32, u32)>,
}

thread_local! {
    static THREAD: RefCell<Vec<ThreadState>> = const { RefCell::new(Vec::new()) };
}

pub(super) fn with_thread<R>(runtime: u64, f: impl FnOnce(&mut ThreadState) -> R) -> R {
    THREAD.with(|t| {
        let mut states = t.borrow_mut();
        let i = match states.iter().position(|s| s.runtime == runtime) {
            Some(i) => i,
            None => {
                states.push(ThreadState {
                    runtime,
                    device: 0,
                    streams: Vec::new(),
                });
                states.len() - 1
            }
        };
        f(&mut states[i])
    })
}
