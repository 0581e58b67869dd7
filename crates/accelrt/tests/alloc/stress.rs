//! Multi-thread stress with deterministic seeds: threads allocate on their own streams,
//! hand some buffers to other threads to free (cross-thread, cross-pool frees), and check
//! that no buffer is ever overwritten while live.

use std::sync::{Arc, Barrier, Mutex};

use accelrt::alloc::{AllocatorConfig, CachingAllocator};
use accelrt::backend::host::HostMemory;

use crate::common::{host_stream, HOST0 as DEV};

const THREADS: u64 = 8;
const OPS: usize = 20_000;

/// splitmix64: small, deterministic, good enough for test workloads.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Clone, Copy)]
struct Live {
    ptr: usize,
    size: usize,
    tag: u64,
}

fn stamp(l: &Live) {
    let words = (l.size / 8).min(64);
    for i in 0..words {
        // SAFETY: the first `words` u64s lie inside the live, 512-aligned buffer `l`.
        unsafe { ((l.ptr as *mut u64).add(i)).write(l.tag ^ i as u64) };
    }
}

fn verify(l: &Live) {
    let words = (l.size / 8).min(64);
    for i in 0..words {
        // SAFETY: as in `stamp`; the buffer is still live.
        let v = unsafe { ((l.ptr as *const u64).add(i)).read() };
        assert_eq!(
            v,
            l.tag ^ i as u64,
            "buffer {:#x} overwritten while live",
            l.ptr
        );
    }
}

fn stress(seed: u64, conf: &str) {
    stress_for(seed, conf, OPS);
}

/// `ops` operations a thread under `conf` (which may turn `debug_checks` on: every call is
/// then checked, with the others held off meanwhile).
fn stress_for(seed: u64, conf: &str, ops: usize) {
    let config = AllocatorConfig::parse(conf).unwrap();
    let a = Arc::new(
        CachingAllocator::new(DEV, Arc::new(HostMemory::new(8 << 30)), None, config).unwrap(),
    );
    let mailbox: Arc<Mutex<Vec<Live>>> = Arc::new(Mutex::new(Vec::new()));
    let barrier = Arc::new(Barrier::new(THREADS as usize));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (a, mailbox, barrier) = (a.clone(), mailbox.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(seed ^ (t << 32));
                let stream = host_stream(t as u32);
                let mut mine: Vec<Live> = Vec::new();
                barrier.wait();
                for i in 0..ops {
                    let r = rng.below(100);
                    if mine.is_empty() || (r < 50 && mine.len() < 48) {
                        let size = match rng.below(10) {
                            0..=6 => 1 + rng.below(64 << 10),
                            7..=8 => 1 + rng.below(4 << 20),
                            _ => 1 + rng.below(48 << 20),
                        } as usize;
                        let ptr = a.raw_alloc(size, stream).expect("8 GiB is plenty");
                        let l = Live {
                            ptr,
                            size,
                            tag: (t << 56) ^ (i as u64) ^ 0x5A5A_0000,
                        };
                        stamp(&l);
                        mine.push(l);
                    } else if r < 92 {
                        let l = mine.swap_remove(rng.below(mine.len() as u64) as usize);
                        verify(&l);
                        a.raw_free(l.ptr).unwrap();
                    } else if r < 95 {
                        // Hand a buffer to whichever thread looks next.
                        let l = mine.swap_remove(rng.below(mine.len() as u64) as usize);
                        mailbox.lock().unwrap().push(l);
                    } else if let Some(l) = mailbox.lock().unwrap().pop() {
                        verify(&l);
                        a.raw_free(l.ptr).unwrap();
                    }
                }
                for l in mine {
                    verify(&l);
                    a.raw_free(l.ptr).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    for l in mailbox.lock().unwrap().drain(..) {
        verify(&l);
        a.raw_free(l.ptr).unwrap();
    }
    a.check_invariants().unwrap();
    let s = a.stats().all();
    assert_eq!(s.allocation.current, 0);
    assert_eq!(s.allocated_bytes.current, 0);
    a.empty_cache().unwrap();
    assert_eq!(a.reserved_bytes(), 0);
    a.check_invariants().unwrap();
}

#[test]
fn eight_threads_default_config() {
    stress(0xACCE_1257, "");
}

#[test]
fn eight_threads_without_release_at_peak() {
    stress(42, "release_at_peak:false,max_split_size_mb:32");
}

#[test]
fn eight_threads_plain_segments() {
    stress(7, "expandable_segments:false");
}

/// With `debug_checks`, the checker after each call holds the others off: it never sees one
/// half done. (Before the checker's gate, new address ranges, moves and releases in flight
/// on one thread made the check after another thread's call fail, e.g. "segment index has 8
/// entries, pools have 5".)
#[test]
fn eight_threads_with_every_call_checked() {
    stress_for(0x0C4E_C4ED, "debug_checks:true", 300);
    stress_for(12, "debug_checks:true,expandable_segments:false", 300);
}

/// `check_invariants` from another thread at any moment, with `debug_checks` on: it waits
/// for the calls in flight and finds every invariant holding.
#[test]
fn the_checker_may_run_beside_calls_on_other_threads() {
    let config = AllocatorConfig::parse("debug_checks:true").unwrap();
    let a = CachingAllocator::new(DEV, Arc::new(HostMemory::new(8 << 30)), None, config).unwrap();
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4u64)
            .map(|t| {
                let a = &a;
                scope.spawn(move || {
                    let mut rng = Rng(99 ^ (t << 32));
                    let stream = host_stream(t as u32);
                    let mut mine = Vec::new();
                    for _ in 0..600 {
                        if mine.is_empty() || (rng.below(2) == 0 && mine.len() < 32) {
                            let size = 1 + rng.below(16 << 20) as usize;
                            mine.push(a.raw_alloc(size, stream).unwrap());
                        } else {
                            let i = rng.below(mine.len() as u64) as usize;
                            a.raw_free(mine.swap_remove(i)).unwrap();
                        }
                        if rng.below(64) == 0 {
                            a.empty_cache().unwrap();
                        }
                    }
                    for p in mine {
                        a.raw_free(p).unwrap();
                    }
                })
            })
            .collect();
        scope.spawn(|| {
            let mut checks = 0u32;
            while !done.load(std::sync::atomic::Ordering::Relaxed) || checks == 0 {
                a.check_invariants().unwrap();
                checks += 1;
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        });
        for w in workers {
            w.join().unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    assert_eq!(a.allocated_bytes(), 0);
}
