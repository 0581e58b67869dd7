//! Environment variables read by the host runtime. One test in its own binary, because it
//! changes the process environment.

use accelrt::backend::host::{HostDriver, HOST_DEVICES_ENV};
use accelrt::hooks::Backend;
use accelrt::runtime::Runtime;
use accelrt::AllocError;
use accelrt::{Error, StreamPriority};

#[test]
fn host_devices_and_allocator_configuration_come_from_the_environment() {
    // (value of ACCELRT_HOST_DEVICES, expected device count or None for unavailable)
    let cases: [(Option<&str>, Option<u32>); 5] = [
        (None, Some(1)),
        (Some("3"), Some(3)),
        (Some("0"), None),
        (Some("lots"), None),
        (Some("9999"), None),
    ];
    for (value, want) in cases {
        match value {
            Some(v) => std::env::set_var(HOST_DEVICES_ENV, v),
            None => std::env::remove_var(HOST_DEVICES_ENV),
        }
        let rt: Runtime<HostDriver> = Runtime::new();
        match want {
            Some(n) => {
                assert!(
                    rt.is_available(),
                    "{value:?}: {:?}",
                    rt.unavailable_reason()
                );
                assert_eq!(rt.device_count(), n, "{value:?}");
            }
            None => {
                assert!(!rt.is_available(), "{value:?}");
                assert_eq!(rt.device_count(), 0);
                let reason = rt.unavailable_reason().unwrap();
                assert!(reason.contains(HOST_DEVICES_ENV), "{value:?}: {reason}");
                let err = rt.new_stream(0, StreamPriority::Normal).unwrap_err();
                assert!(err.to_string().contains(HOST_DEVICES_ENV), "{err}");
            }
        }
    }
    std::env::remove_var(HOST_DEVICES_ENV);

    // A malformed allocator configuration is an error from the calls that build allocators,
    // and does not stop the rest of the backend.
    std::env::set_var("ACCELRT_ALLOC_CONF", "no_such_option:1");
    let rt: Runtime<HostDriver> = Runtime::new();
    assert!(rt.is_available());
    let err = rt.allocator(0).map(drop).expect_err("allocator");
    assert!(
        matches!(err, Error::Alloc(AllocError::Config(_))),
        "{err:?}"
    );
    assert!(err.to_string().contains("no_such_option"), "{err}");
    // The pinned allocator has no options of that string: it is not affected.
    rt.pinned_allocator().unwrap();
    assert!(rt.show_config().contains("no_such_option"));
    let s = rt.default_stream(0).unwrap();
    rt.stream_synchronize(s).unwrap();
    // Fixing the variable lets the next call succeed: the failure was not cached.
    std::env::remove_var("ACCELRT_ALLOC_CONF");
    rt.allocator(0).unwrap();
}
