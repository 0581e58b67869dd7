//! Several devices: peer access and copies between devices, the work of the `Backend`
//! calls `runtime.rs` forwards here.

use super::*;

impl<D: Driver> Runtime<D> {
    pub(super) fn can_device_access_peer_impl(&self, device: u32, peer: u32) -> Result<bool> {
        let ready = self.ready("can_device_access_peer")?;
        ready.core.check_device(device)?;
        ready.core.check_device(peer)?;
        if device == peer {
            return Ok(true);
        }
        Ok(ready.core.driver.can_access_peer(device, peer)?)
    }

    pub(super) fn enable_peer_access_impl(&self, device: u32, peer: u32) -> Result<()> {
        let ready = self.ready("enable_peer_access")?;
        ready.core.check_device(device)?;
        ready.core.check_device(peer)?;
        let mut peers = ready.peers.lock();
        if device == peer || peers.contains(&(device, peer)) {
            return Ok(());
        }
        if !ready.core.driver.can_access_peer(device, peer)? {
            return Err(DeviceError::Unsupported {
                backend: D::KIND,
                what: "peer access between these two devices (the driver says they cannot \
                       reach each other; memcpy_async still copies between them)",
            }
            .into());
        }
        ready.core.driver.enable_peer_access(device, peer)?;
        peers.insert((device, peer));
        Ok(())
    }

    pub(super) fn is_peer_access_enabled_impl(&self, device: u32, peer: u32) -> Result<bool> {
        let ready = self.ready("is_peer_access_enabled")?;
        ready.core.check_device(device)?;
        ready.core.check_device(peer)?;
        Ok(device == peer || ready.peers.lock().contains(&(device, peer)))
    }

    pub(super) fn memcpy_async_impl(
        &self,
        dst: usize,
        dst_device: u32,
        src: usize,
        src_device: u32,
        bytes: usize,
        stream: Stream,
    ) -> Result<()> {
        let ready = self.ready("memcpy_async")?;
        ready.core.check_device(dst_device)?;
        ready.core.check_device(src_device)?;
        let slot = ready.core.stream(stream)?;
        if stream.device.index != dst_device && stream.device.index != src_device {
            return Err(DeviceError::InvalidArgument(format!(
                "memcpy_async: the copy runs on {stream}, of neither device of the copy \
                 ({} {dst_device} and {src_device}): use a stream of one of them",
                D::KIND
            ))
            .into());
        }
        ready
            .core
            .check_not_capturing(&slot, stream, "copy between buffers on")?;
        if bytes == 0 {
            return Ok(());
        }
        let dst_alloc = self.allocator_in(ready, dst_device)?;
        let src_alloc = self.allocator_in(ready, src_device)?;
        dst_alloc.check_live_range(dst, bytes, "memcpy_async destination")?;
        src_alloc.check_live_range(src, bytes, "memcpy_async source")?;
        // SAFETY: both ranges lie inside live allocations of this runtime's allocators (just
        // checked), and the copy is queued on a stream of one of the two devices: memory freed
        // later waits for that stream when its free was recorded there, as every free of a
        // block used on another stream must be (record_stream), which PyTorch does for peer
        // copies.
        unsafe { Ok(ready.core.driver.copy_async(&slot.raw, dst, src, bytes)?) }
    }
}
