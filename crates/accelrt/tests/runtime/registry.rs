//! The registry: backends registered by name at run time are found by the same lookups as
//! the built-in ones; names are checked; unknown names say which are known; global
//! allocator callbacks reach every allocator, existing and future.
//! (A working registered backend, `fault`, is tested in its own crate, `accelrt-fault`.)

use crate::common;

use accelrt::DeviceError;
use std::collections::HashSet;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use accelrt::alloc::AllocatorEvent;
use accelrt::backend::UnavailableBackend;
use accelrt::device::BackendName;
use accelrt::registry;
use accelrt::{Backend, Device, DeviceType, Error};
use common::runtime;

/// A stand-in registered under `name`, for the life of the process.
fn stand_in(name: &'static str, reason: &str) -> &'static UnavailableBackend {
    Box::leak(Box::new(UnavailableBackend::unavailable(
        DeviceType::custom(name),
        reason,
    )))
}

#[test]
fn a_registered_backend_is_found_by_every_lookup() {
    let b = stand_in("registry-test", "a stand-in for the registry test");
    registry::register(b).unwrap();
    let kind = DeviceType::custom("registry-test");

    assert!(std::ptr::addr_eq(registry::backend(kind), b));
    assert!(std::ptr::addr_eq(
        registry::backend_by_name("registry-test").unwrap(),
        b
    ));
    assert_eq!(DeviceType::from_str("registry-test").unwrap(), kind);
    assert!(registry::names().contains(&"registry-test"));
    let listed: Vec<DeviceType> = registry::backends()
        .iter()
        .map(|b| b.device_type())
        .collect();
    assert_eq!(listed[..2], DeviceType::ALL, "built-in backends come first");
    assert!(listed.contains(&kind));
    assert_eq!(kind.to_string(), "registry-test");
    assert!(!kind.is_builtin());
    // Registering the same object again is harmless; another object under the name is not.
    registry::register(b).unwrap();
    let err = registry::register(stand_in("registry-test", "an impostor")).unwrap_err();
    assert!(err.to_string().contains("already registered"), "{err}");
    assert!(
        std::ptr::addr_eq(registry::backend(kind), b),
        "the first one stays"
    );
}

#[test]
fn builtin_kinds_cannot_be_registered_and_aliases_resolve() {
    for kind in DeviceType::ALL {
        let err = registry::register(stand_in_builtin(kind)).unwrap_err();
        assert!(err.to_string().contains("it is built in"), "{kind}: {err}");
    }
    // (name, the built-in it means)
    for (name, kind) in [
        ("host", DeviceType::Host),
        ("CPU", DeviceType::Host),
        ("cuda", DeviceType::Cuda),
        ("Gpu", DeviceType::Cuda),
    ] {
        assert_eq!(DeviceType::from_str(name).unwrap(), kind, "{name}");
        assert_eq!(registry::backend_by_name(name).unwrap().device_type(), kind);
    }
}

fn stand_in_builtin(kind: DeviceType) -> &'static UnavailableBackend {
    Box::leak(Box::new(UnavailableBackend::unavailable(
        kind,
        "not allowed",
    )))
}

#[test]
fn unknown_names_list_the_known_ones() {
    let err = registry::backend_by_name("no-such-backend")
        .err()
        .expect("an unknown name is an error");
    let text = err.to_string();
    assert!(
        matches!(err, Error::Device(DeviceError::InvalidArgument(_))),
        "{err:?}"
    );
    assert!(
        text.contains("unknown device type 'no-such-backend'"),
        "{text}"
    );
    assert!(text.contains("host, cuda"), "{text}");
    assert!(DeviceType::from_str("no-such-backend").is_err());
}

#[test]
fn a_name_nobody_registered_answers_unavailable_naming_the_call() {
    let kind = DeviceType::custom("never-registered");
    let b = registry::backend(kind);
    assert_eq!(b.device_type(), kind);
    assert!(!b.is_available() && !b.is_built());
    let reason = b.unavailable_reason().unwrap();
    assert!(
        reason.contains("no backend named 'never-registered'"),
        "{reason}"
    );
    assert_eq!(b.device_count(), 0, "a missing backend reports no devices");
    let err = b.allocator(0).unwrap_err();
    assert_eq!(
        err,
        Error::Device(DeviceError::NeedsBackend {
            call: "allocator",
            needs: kind,
            reason
        })
    );
    assert!(
        std::ptr::addr_eq(b, registry::backend(kind)),
        "one stand-in per name"
    );
}

#[test]
fn backend_names_are_checked() {
    // (name, accepted)
    let cases = [
        ("fault", true),
        ("my_backend-2", true),
        ("a", true),
        ("", false),
        ("Fault", false),
        ("2fast", false),
        ("has space", false),
        ("dot.ted", false),
        ("host", false),
        ("cpu", false),
        ("cuda", false),
        ("gpu", false),
        ("a-name-that-is-longer-than-32-chars", false),
    ];
    for (name, accepted) in cases {
        assert_eq!(BackendName::check(name).is_none(), accepted, "{name:?}");
    }
    let caught = std::panic::catch_unwind(|| BackendName::new("Not Valid"));
    assert!(caught.is_err(), "a bad name in BackendName::new panics");
}

#[test]
fn device_types_serialize_as_names_and_unregistered_names_load() {
    for (kind, json) in [
        (DeviceType::Host, "\"host\""),
        (DeviceType::Cuda, "\"cuda\""),
        (DeviceType::custom("fault"), "\"fault\""),
    ] {
        assert_eq!(serde_json::to_string(&kind).unwrap(), json);
        assert_eq!(serde_json::from_str::<DeviceType>(json).unwrap(), kind);
    }
    // A snapshot from a process that had a backend this one lacks still loads.
    let device: Device = serde_json::from_str(r#"{"kind": "someone-elses", "index": 3}"#).unwrap();
    assert_eq!(device.kind.name(), "someone-elses");
    assert_eq!(device.to_string(), "someone-elses:3");
    let err = serde_json::from_str::<DeviceType>("\"Not A Name\"").unwrap_err();
    assert!(err.to_string().contains("not a device type"), "{err}");
}

/// Events a global callback saw for the pointers in `mine`.
type Seen = Arc<Mutex<Vec<(Device, usize, AllocatorEvent)>>>;

#[test]
fn global_allocator_callbacks_reach_every_allocator_existing_and_future() {
    let (before, after) = (runtime(1), runtime(2));
    let existing = before.allocator(0).unwrap();
    let seen: Seen = Arc::default();
    let mine: Arc<Mutex<HashSet<usize>>> = Arc::default();
    let (s, m) = (Arc::clone(&seen), Arc::clone(&mine));
    let id = registry::add_allocator_callback(Arc::new(move |device, ptr, _size, event| {
        // Other tests of this binary allocate too: keep only this test's pointers.
        if m.lock().unwrap().contains(&ptr) {
            s.lock().unwrap().push((device, ptr, event));
        }
    }));
    let future = after.allocator(1).unwrap();
    let own_calls = Arc::new(Mutex::new(0));
    let o = Arc::clone(&own_calls);
    existing.add_callback(Arc::new(move |_, _, _| *o.lock().unwrap() += 1));

    let round = |a: &accelrt::alloc::CachingAllocator, stream| {
        // A first allocation and free warm the pool; the second allocation is recycled.
        let p = a.raw_alloc(4096, stream).unwrap();
        mine.lock().unwrap().insert(p);
        a.raw_free(p).unwrap();
        let q = a.raw_alloc(4096, stream).unwrap();
        assert_eq!(q, p, "the cached block comes back");
        a.raw_free(q).unwrap();
        p
    };
    let p0 = round(&existing, before.default_stream(0).unwrap());
    let p1 = round(&future, after.default_stream(1).unwrap());
    let host = |index| Device {
        kind: DeviceType::Host,
        index,
    };
    let expected = |d, p| {
        vec![
            (d, p, AllocatorEvent::Freed),
            (d, p, AllocatorEvent::Recycled),
            (d, p, AllocatorEvent::Freed),
        ]
    };
    assert_eq!(
        *seen.lock().unwrap(),
        [expected(host(0), p0), expected(host(1), p1)].concat()
    );
    assert!(
        *own_calls.lock().unwrap() >= 3,
        "per-allocator callbacks still run next to the global ones"
    );

    assert!(registry::remove_allocator_callback(id));
    assert!(!registry::remove_allocator_callback(id), "already removed");
    seen.lock().unwrap().clear();
    round(&existing, before.default_stream(0).unwrap());
    assert!(
        seen.lock().unwrap().is_empty(),
        "a removed callback is not called"
    );
}
