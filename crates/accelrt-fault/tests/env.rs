//! Faults from the environment (`ACCELRT_FAULTS`), read when the backend opens. One test in
//! this binary, so setting the variable races nothing.

use accelrt::backend::host::HostDriver;
use accelrt::runtime::Runtime;
use accelrt::Backend;
use accelrt_fault::{Fault, FaultDriver, FAULTS_ENV};

#[test]
fn faults_come_from_the_environment_and_a_bad_value_says_why() {
    std::env::set_var(FAULTS_ENV, "allocation=2,event_query=1,delay_ms=3");
    let rt: Runtime<FaultDriver<HostDriver>> = Runtime::new();
    let faults = rt.driver().unwrap().faults();
    assert_eq!(faults.pending(Fault::Allocation), 2);
    assert_eq!(faults.pending(Fault::EventQuery), 1);
    assert_eq!(faults.completion_delay().as_millis(), 3);
    assert!(rt.show_config().contains("ACCELRT_FAULTS=allocation=2"));

    std::env::set_var(FAULTS_ENV, "allocation=2,typo=1");
    let rt: Runtime<FaultDriver<HostDriver>> = Runtime::new();
    let reason = rt.unavailable_reason().expect("unavailable");
    assert!(
        reason.contains(FAULTS_ENV) && reason.contains("unknown fault 'typo'"),
        "{reason}"
    );
    let err = rt.init().unwrap_err().to_string();
    assert!(
        err.starts_with("cannot execute init() without the fault backend"),
        "{err}"
    );
    std::env::remove_var(FAULTS_ENV);
}
