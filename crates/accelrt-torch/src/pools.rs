//! Private pools: routing the allocations of the streams a C filter accepts to a pool
//! (graph capture, `torch.cuda.MemPool`), ending the routing, and a pool's uses.

use std::ffi::{c_int, c_void};
use std::sync::Arc;

use accelrt::alloc::StreamFilter;
use accelrt::{MempoolId, Stream};
use parking_lot::Mutex;

use crate::errors::{guard, Failure, Report};
use crate::state::state;
use crate::{device_name, maybe_relaxed, status, DropFn, FilterFn};

/// Serialises the check-then-act steps of the pool functions (create or add a use, begin).
static POOLS: Mutex<()> = Mutex::new(());

/// A stream filter from C: the function, its context, and who frees the context.
struct ForeignFilter {
    accept: FilterFn,
    ctx: *mut c_void,
    drop_ctx: DropFn,
}

// SAFETY: the header's contract for begin_allocate_to_pool: `filter(ctx, ..)` is callable from
// any thread, concurrently, until `drop_ctx(ctx)`, which this type calls once, in `Drop`.
unsafe impl Send for ForeignFilter {}
// SAFETY: as above.
unsafe impl Sync for ForeignFilter {}

impl ForeignFilter {
    fn accepts(&self, handle: u64) -> bool {
        match self.accept {
            // SAFETY: the header's contract (see the Send impl); the function must not unwind.
            Some(f) => unsafe { f(self.ctx, handle as usize as *mut c_void) != 0 },
            None => true,
        }
    }
}

impl Drop for ForeignFilter {
    fn drop(&mut self) {
        if let Some(drop_ctx) = self.drop_ctx {
            // SAFETY: the library owns `ctx` (header contract) and this is its only drop.
            unsafe { drop_ctx(self.ctx) }
        }
    }
}

pub(crate) fn pool_id(id0: u64, id1: u64) -> Result<MempoolId, Failure> {
    let id = MempoolId(id0, id1);
    if id.is_none() {
        return Err(
            "pool id (0, 0) is not a pool: PyTorch's MempoolId_t of a graph or a \
                    MemPool is never (0, 0)"
                .into(),
        );
    }
    Ok(id)
}

/// Route allocations on the streams `filter` accepts to private pool `(id0, id1)` of
/// `device`, adding a use of the pool (created with one use), until
/// [`accelrt_torch_end_allocate_to_pool`]. `filter` NULL accepts every stream.
///
/// # Safety
/// `filter(ctx, stream)` must be callable from any thread until `drop_ctx(ctx)` and must not
/// unwind. The library owns `ctx` from the call on, also when the call fails, and calls
/// `drop_ctx` (when not NULL) exactly once.
#[no_mangle]
pub unsafe extern "C" fn accelrt_torch_begin_allocate_to_pool(
    device: c_int,
    id0: u64,
    id1: u64,
    filter: FilterFn,
    ctx: *mut c_void,
    drop_ctx: DropFn,
) -> c_int {
    // Owned before anything can fail, so every path drops the context exactly once.
    let filter = ForeignFilter {
        accept: filter,
        ctx,
        drop_ctx,
    };
    status("accelrt_torch_begin_allocate_to_pool", || {
        let id = pool_id(id0, id1)?;
        let st = state()?;
        let a = st.allocator(device)?;
        let d = device as u32;
        let _pools = POOLS.lock();
        if st.route_open(d, id) {
            return Err(format!(
                "already allocating to pool ({id0}, {id1}) on {}: end_allocate_to_pool first",
                device_name(st, device)
            )
            .into());
        }
        let stream_filter = match filter.accept {
            None => StreamFilter::All,
            Some(_) => {
                let filter = Arc::new(filter);
                let backend = st.backend;
                StreamFilter::Custom(Arc::new(move |s: Stream| {
                    backend
                        .stream_native_handle(s)
                        .is_ok_and(|h| filter.accepts(h))
                }))
            }
        };
        let existed = a.pool_use_count(id).is_some();
        if existed {
            a.retain_pool(id).map_err(|e| e.to_string())?;
        }
        if let Err(e) = a.begin_allocate_to_pool(id, stream_filter) {
            if existed {
                let _ = a.release_pool(id);
            }
            return Err(format!("{}: {e}", device_name(st, device)).into());
        }
        st.set_route(d, id, true);
        Ok(())
    })
}

/// Stop routing allocations to pool `(id0, id1)` of `device` (its memory stays reserved).
#[no_mangle]
pub extern "C" fn accelrt_torch_end_allocate_to_pool(device: c_int, id0: u64, id1: u64) -> c_int {
    status("accelrt_torch_end_allocate_to_pool", || {
        let id = pool_id(id0, id1)?;
        let st = state()?;
        let a = st.allocator(device)?;
        let _pools = POOLS.lock();
        a.end_allocate_to_pool(id)
            .map_err(|e| format!("{}: {e}", device_name(st, device)))?;
        st.set_route(device as u32, id, false);
        Ok(())
    })
}

/// Drop a use of pool `(id0, id1)` of `device`; at zero its cached memory goes back now and
/// the rest as its blocks are freed.
#[no_mangle]
pub extern "C" fn accelrt_torch_release_pool(device: c_int, id0: u64, id1: u64) -> c_int {
    status("accelrt_torch_release_pool", || {
        let id = pool_id(id0, id1)?;
        let st = state()?;
        let a = st.allocator(device)?;
        let _pools = POOLS.lock();
        maybe_relaxed(st, || a.release_pool(id))
            .map_err(|e| format!("{}: {e}", device_name(st, device)))?;
        if a.pool_use_count(id).is_none_or(|uses| uses == 0) {
            // At zero the allocator dropped the pool's routes.
            st.set_route(device as u32, id, false);
        }
        Ok(())
    })
}

/// Add a use of pool `(id0, id1)` of `device`, creating it with one use
/// (`torch.cuda.MemPool`'s constructor).
#[no_mangle]
pub extern "C" fn accelrt_torch_create_or_incref_pool(device: c_int, id0: u64, id1: u64) -> c_int {
    status("accelrt_torch_create_or_incref_pool", || {
        let id = pool_id(id0, id1)?;
        let st = state()?;
        let a = st.allocator(device)?;
        let _pools = POOLS.lock();
        let r = if a.pool_use_count(id).is_some() {
            a.retain_pool(id)
        } else {
            // A pool is created by beginning to allocate to it; a filter that accepts no
            // stream routes nothing, and the route ends at once.
            a.begin_allocate_to_pool(id, StreamFilter::Custom(Arc::new(|_| false)))
                .and_then(|()| a.end_allocate_to_pool(id))
        };
        r.map_err(|e| format!("{}: {e}", device_name(st, device)).into())
    })
}

/// Uses of pool `(id0, id1)` of `device` (0 when there is no such pool), or -1 on failure.
#[no_mangle]
pub extern "C" fn accelrt_torch_pool_use_count(device: c_int, id0: u64, id1: u64) -> c_int {
    guard("accelrt_torch_pool_use_count", -1, Report::Status, || {
        let id = pool_id(id0, id1)?;
        let uses = state()?.allocator(device)?.pool_use_count(id).unwrap_or(0);
        Ok(c_int::try_from(uses).unwrap_or(c_int::MAX))
    })
}
