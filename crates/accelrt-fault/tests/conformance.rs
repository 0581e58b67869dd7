//! The conformance suite (`accelrt-conformance`) on the registered fault backend, with no
//! fault asked for: it behaves as the host backend it runs on.

accelrt_conformance::conformance_tests!(Some(
    accelrt_fault::register().expect("register the fault backend") as &dyn accelrt::Backend
));
