//! Helpers shared by the host-backend tests.
#![allow(dead_code)]

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use accelrt::backend::host::HostDriver;
use accelrt::hooks::HostTask;
use accelrt::runtime::Runtime;
use accelrt::{Device, DeviceType, Stream};

pub mod memory;

/// Host device 0, for tests that build an allocator on host memory directly.
pub const HOST0: Device = Device {
    kind: DeviceType::Host,
    index: 0,
};

/// Stream `index` of [`HOST0`] (an allocator's stream id; no runtime behind it).
pub fn host_stream(index: u32) -> Stream {
    Stream {
        device: HOST0,
        index,
    }
}

/// Longest any test waits for something that should happen at once; only reached on a bug.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A host runtime with `devices` devices, independent of the environment and of other tests.
pub fn runtime(devices: u32) -> Runtime<HostDriver> {
    Runtime::with_driver(HostDriver::with_devices(devices).expect("valid device count"))
}

/// A gate that host tasks can wait on, to hold a stream at a known point.
#[derive(Clone, Default)]
pub struct Gate(Arc<(Mutex<bool>, Condvar)>);

impl Gate {
    pub fn new() -> Self {
        Self::default()
    }

    /// A task that blocks its stream until [`Gate::open`] (or [`PATIENCE`] passes).
    pub fn task(&self) -> HostTask {
        let gate = self.clone();
        Arc::new(move || gate.wait())
    }

    pub fn wait(&self) {
        let (lock, cv) = &*self.0;
        let open = lock.lock().unwrap();
        let _unused = cv
            .wait_timeout_while(open, PATIENCE, |open| !*open)
            .unwrap();
    }

    pub fn open(&self) {
        let (lock, cv) = &*self.0;
        *lock.lock().unwrap() = true;
        cv.notify_all();
    }
}

/// A shared log that tasks append to, to check the order work ran in.
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    pub fn new() -> Self {
        Self::default()
    }

    /// A task that appends `entry` each time it runs.
    pub fn task(&self, entry: impl Into<String>) -> HostTask {
        let log = self.clone();
        let entry = entry.into();
        Arc::new(move || log.push(entry.clone()))
    }

    pub fn push(&self, entry: impl Into<String>) {
        self.0.lock().unwrap().push(entry.into());
    }

    pub fn entries(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

/// Poll `cond` until it holds or [`PATIENCE`] passes; returns whether it held.
pub fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + PATIENCE;
    while std::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    cond()
}
