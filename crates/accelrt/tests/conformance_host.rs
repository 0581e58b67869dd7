//! The conformance suite (`accelrt-conformance`) on the process-wide host backend.

accelrt_conformance::conformance_tests!(Some(accelrt::registry::host() as &dyn accelrt::Backend));
