//! The accelrt_torch package (python/) against the library cargo built, through ctypes, on the host
//! backend (python/tests/test_accelrt_torch.py; PyTorch and a GPU are not needed). Skipped,
//! with the reason printed, where python3 is not installed.

mod common;

use std::process::Command;

#[test]
fn the_python_module_drives_the_built_library() {
    let version = Command::new("python3").arg("--version").output();
    match &version {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            println!(
                "SKIPPED: `python3 --version` failed ({}): the Python module is not tested here",
                out.status
            );
            return;
        }
        Err(e) => {
            println!(
                "SKIPPED: python3 is not installed ({e}): the Python module is not tested here"
            );
            return;
        }
    }
    let script = common::crate_dir().join("../../python/tests/test_accelrt_torch.py");
    let out = Command::new("python3")
        .arg("-B")
        .arg(&script)
        .env("ACCELRT_TORCH_LIB", common::cdylib())
        .env("ACCELRT_TORCH_BACKEND", "host")
        .env_remove("ACCELRT_ALLOC_CONF")
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}{stderr}");
    assert!(
        out.status.success(),
        "{} failed ({}):\n{stdout}{stderr}",
        script.display(),
        out.status
    );
    assert!(stdout.contains(" passed"), "{stdout}");
}
