//! Snapshots (structured, and in PyTorch's pickle layout) and recording the allocator's
//! memory history.

use std::ffi::c_int;
use std::ptr::null_mut;

use accelrt::alloc::HistoryConfig;
use accelrt::snapshot::Snapshot;
use accelrt::{Device, Stream};

use crate::errors::{guard, Failure, Report};
use crate::state::state;
use crate::{malloc_copy, status};

/// The snapshot of `device` (-1: every device accelrt has allocated on).
pub fn snapshot(device: c_int) -> Result<Snapshot, Failure> {
    let st = state()?;
    let devices: Vec<u32> = if device == -1 {
        st.existing_allocators().map(|(d, _)| d).collect()
    } else {
        vec![st.check_device(device)?]
    };
    let mut snaps = Vec::new();
    let mut settings = serde_json::Value::Null;
    for &d in &devices {
        if let Some(a) = st.existing_allocator(d) {
            snaps.push(a.memory_snapshot());
            settings = accelrt::snapshot::settings_json(a.config());
        }
    }
    let mut snap = Snapshot::from_memory_snapshots(&snaps, settings);
    // PyTorch's snapshots name streams by their handles: stream index i of device d is
    // handle stream_handles[d][i] (the runtime's streams are numbered 0..n).
    snap.stream_handles = vec![Vec::new(); snap.device_traces.len()];
    for &d in &devices {
        if let Some(handles) = snap.stream_handles.get_mut(d as usize) {
            *handles = (0..accelrt::alloc::MAX_STREAM_POOLS as u32)
                .map_while(|index| {
                    st.native_handle(Stream {
                        device: Device {
                            kind: st.kind,
                            index: d,
                        },
                        index,
                    })
                })
                .collect();
        }
    }
    Ok(snap)
}

/// A snapshot of `device` (-1: every device in use) in PyTorch's pickle layout
/// (`torch.cuda.memory._snapshot()`; <https://pytorch.org/memory_viz> reads it). Its size
/// goes to `*len`; free it with [`accelrt_torch_free_buffer`](crate::accelrt_torch_free_buffer). NULL on failure.
///
/// # Safety
/// `len` must be NULL or valid for writing one `size_t`.
#[no_mangle]
pub unsafe extern "C" fn accelrt_torch_snapshot_pickle(device: c_int, len: *mut usize) -> *mut u8 {
    guard(
        "accelrt_torch_snapshot_pickle",
        null_mut(),
        Report::Status,
        || {
            if len.is_null() {
                return Err("len is NULL: pass a pointer to a size_t for the size".into());
            }
            let bytes = snapshot(device)?.to_pickle();
            let p = malloc_copy(&bytes, false)?;
            // SAFETY: checked non-NULL above; the caller guarantees it is writable.
            unsafe { *len = bytes.len() };
            Ok(p)
        },
    )
}

/// What `accelrt_torch_record_history` and its `_ex` form ask for: `None` turns history
/// off; keeping 0 entries is refused.
pub(crate) fn history_config(
    enabled: c_int,
    max_entries: usize,
    context: bool,
) -> Result<Option<HistoryConfig>, Failure> {
    if enabled == 0 {
        return Ok(None);
    }
    if max_entries == 0 {
        return Err(
            "max_entries is 0: pass how many events to keep (PyTorch's default is 100000)".into(),
        );
    }
    Ok(Some(HistoryConfig {
        max_entries,
        context,
    }))
}

/// Start (`enabled` != 0, keeping at most `max_entries` events) or stop recording the
/// allocator's history on `device` (-1: every device, including devices used later).
#[no_mangle]
pub extern "C" fn accelrt_torch_record_history(
    device: c_int,
    enabled: c_int,
    max_entries: usize,
) -> c_int {
    status("accelrt_torch_record_history", || {
        let config = history_config(enabled, max_entries, false)?;
        let st = state()?;
        if device == -1 {
            st.set_history_all(config);
        } else {
            st.allocator(device)?.record_memory_history(config);
        }
        Ok(())
    })
}
