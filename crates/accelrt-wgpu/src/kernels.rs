//! GPU work on streams: fills (a WGSL kernel, or `clear_buffer` for zeros), copies
//! (`copy_buffer_to_buffer`), writes of host bytes (`Queue::write_buffer`, with a small atomic
//! kernel for bytes that do not fill a whole 4-byte word), reads back into host memory
//! (a copy into a mappable staging buffer), and timestamps.
//!
//! Each operation is one submission, numbered by [`DeviceShared::submit`].

use std::sync::Arc;

use accelrt::error::{DeviceError, DeviceResult};
use parking_lot::{Condvar, Mutex};
use wgpu::util::DeviceExt;

use crate::device::pipelines::FILL_GROUP;
use crate::device::points::Point;
use crate::device::{map_read, DeviceShared};

/// A byte range of one buffer.
#[derive(Clone, Debug)]
pub(crate) struct Region {
    pub(crate) buffer: wgpu::Buffer,
    pub(crate) offset: u64,
    pub(crate) len: u64,
}

/// Where a read's bytes will be: set once the copy into the staging buffer is submitted.
#[derive(Default)]
pub(crate) struct ReadReply {
    staged: Mutex<Option<DeviceResult<Staged>>>,
    cv: Condvar,
}

/// A submitted read: the staging buffer, the submission that fills it, and which bytes of
/// it are the ones asked for.
pub(crate) struct Staged {
    buffer: wgpu::Buffer,
    submission: u64,
    skip: usize,
    len: usize,
}

impl ReadReply {
    pub(crate) fn set(&self, staged: DeviceResult<Staged>) {
        *self.staged.lock() = Some(staged);
        self.cv.notify_all();
    }

    /// Block until the read has been submitted and has run, then return its bytes.
    pub(crate) fn wait(&self, dev: &DeviceShared) -> DeviceResult<Vec<u8>> {
        let staged = {
            let mut s = self.staged.lock();
            while s.is_none() {
                self.cv.wait(&mut s);
            }
            s.take().expect("set above")
        }?;
        dev.wait(staged.submission)?;
        let bytes = map_read(dev, &staged.buffer)?;
        Ok(bytes[staged.skip..staged.skip + staged.len].to_vec())
    }
}

/// A GPU operation on a stream (captured in graphs and replayed by encoding it again).
#[derive(Clone)]
pub(crate) enum GpuOp {
    Fill {
        dst: Region,
        value: u32,
        pattern: bool,
        rounds: u32,
    },
    Copy {
        src: Region,
        dst: Region,
    },
    Write {
        dst: Region,
        bytes: Arc<[u8]>,
    },
    Read {
        src: Region,
        reply: Arc<ReadReply>,
    },
    /// A timing event's record: write a timestamp into the point's slot.
    Timestamp {
        point: Arc<Point>,
    },
}

impl GpuOp {
    /// What the operation is, for messages.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            GpuOp::Fill { .. } => "fill",
            GpuOp::Copy { .. } => "copy",
            GpuOp::Write { .. } => "write",
            GpuOp::Read { .. } => "read",
            GpuOp::Timestamp { .. } => "timestamp",
        }
    }
}

/// Encode and submit `op`; returns its submission number. A read's reply and a timestamp's
/// point learn the number too.
pub(crate) fn run(dev: &DeviceShared, op: &GpuOp) -> DeviceResult<u64> {
    let result = dev.scoped("wgpu (stream work)", || submit(dev, op));
    let n = match result {
        Ok(Ok(n)) => Ok(n),
        Ok(Err(e)) | Err(e) => Err(e),
    };
    match op {
        GpuOp::Read { reply, .. } => {
            if let Err(e) = &n {
                reply.set(Err(e.clone()));
            }
        }
        GpuOp::Timestamp { point } => {
            if let Ok(n) = n {
                point.resolve(n);
            }
        }
        _ => {}
    }
    n
}

fn encoder(dev: &DeviceShared, label: &'static str) -> wgpu::CommandEncoder {
    dev.device
        .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) })
}

fn submit(dev: &DeviceShared, op: &GpuOp) -> DeviceResult<u64> {
    match op {
        GpuOp::Fill {
            dst,
            value,
            pattern,
            rounds,
        } => {
            let mut e = encoder(dev, "accelrt fill");
            if !*pattern && *value == 0 {
                e.clear_buffer(&dst.buffer, dst.offset, Some(dst.len));
            } else {
                encode_fill(dev, &mut e, dst, *value, *pattern, *rounds)?;
            }
            dev.submit(|_| {}, Some(e.finish()))
        }
        GpuOp::Copy { src, dst } => {
            let mut e = encoder(dev, "accelrt copy");
            if src.buffer == dst.buffer {
                // wgpu copies between two buffers only: go through a temporary one (which
                // also makes overlapping ranges copy as memmove does).
                let tmp = dev.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("accelrt copy within a segment"),
                    size: dst.len,
                    usage: wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                });
                e.copy_buffer_to_buffer(&src.buffer, src.offset, &tmp, 0, dst.len);
                e.copy_buffer_to_buffer(&tmp, 0, &dst.buffer, dst.offset, dst.len);
            } else {
                e.copy_buffer_to_buffer(&src.buffer, src.offset, &dst.buffer, dst.offset, dst.len);
            }
            dev.submit(|_| {}, Some(e.finish()))
        }
        GpuOp::Write { dst, bytes } => submit_write(dev, dst, bytes),
        GpuOp::Read { src, reply } => {
            let start = src.offset / 4 * 4;
            let end = (src.offset + src.len).next_multiple_of(4);
            let staging = dev.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("accelrt read"),
                size: end - start,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let mut e = encoder(dev, "accelrt read");
            e.copy_buffer_to_buffer(&src.buffer, start, &staging, 0, end - start);
            let n = dev.submit(|_| {}, Some(e.finish()))?;
            reply.set(Ok(Staged {
                buffer: staging,
                submission: n,
                skip: (src.offset - start) as usize,
                len: src.len as usize,
            }));
            Ok(n)
        }
        GpuOp::Timestamp { point } => {
            let slot = point
                .timing_slot()
                .expect("timestamp operations are made for timing points only");
            let mut e = encoder(dev, "accelrt timestamp");
            slot.encode(&mut e);
            dev.submit(|_| {}, Some(e.finish()))
        }
    }
}

/// The storage binding that covers `[offset, offset + len)` of a buffer: its start (aligned
/// as the device requires), its size, and the index of `offset`'s word in it.
fn window(dev: &DeviceShared, offset: u64, len: u64) -> (u64, u64, u32) {
    let align = u64::from(dev.limits.min_storage_buffer_offset_alignment).max(4);
    let start = offset / align * align;
    let size = (offset + len - start).next_multiple_of(4);
    (start, size, ((offset - start) / 4) as u32)
}

/// Dispatch the fill kernel over `dst` (4-byte aligned), in bindings no larger than the
/// device allows.
fn encode_fill(
    dev: &DeviceShared,
    e: &mut wgpu::CommandEncoder,
    dst: &Region,
    value: u32,
    pattern: bool,
    rounds: u32,
) -> DeviceResult<()> {
    let kernels = dev.kernels()?;
    let align = u64::from(dev.limits.min_storage_buffer_offset_alignment).max(4);
    let max_binding = dev.limits.max_storage_buffer_binding_size.min(1 << 31);
    let max_words = (max_binding - align) / 4;
    let per_dim = u64::from(dev.limits.max_compute_workgroups_per_dimension.max(1));
    let words = dst.len / 4;
    let mut done = 0u64;
    while done < words {
        let chunk = (words - done).min(max_words);
        let (start, size, first) = window(dev, dst.offset + done * 4, chunk * 4);
        let groups = chunk.div_ceil(FILL_GROUP);
        let x = groups.min(per_dim);
        let y = groups.div_ceil(x);
        if y > per_dim {
            return Err(DeviceError::InvalidArgument(format!(
                "a fill of {} bytes needs {groups} workgroups, more than {} allows",
                dst.len,
                dev.label()
            )));
        }
        let params: [u32; 8] = [
            first,
            chunk as u32,
            value,
            u32::from(pattern),
            rounds,
            (x * FILL_GROUP) as u32,
            done as u32,
            0,
        ];
        dispatch(
            dev,
            e,
            &kernels.fill,
            &dst.buffer,
            (start, size),
            &params,
            (x as u32, y as u32),
        );
        done += chunk;
    }
    Ok(())
}

/// One dispatch of `pipeline` with the storage binding `(start, size)` of `buffer` and
/// `params` as its uniform.
fn dispatch(
    dev: &DeviceShared,
    e: &mut wgpu::CommandEncoder,
    pipeline: &wgpu::ComputePipeline,
    buffer: &wgpu::Buffer,
    (start, size): (u64, u64),
    params: &[u32],
    (x, y): (u32, u32),
) {
    let bytes: Vec<u8> = params.iter().flat_map(|p| p.to_le_bytes()).collect();
    let uniform = dev
        .device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("accelrt kernel parameters"),
            contents: &bytes,
            usage: wgpu::BufferUsages::UNIFORM,
        });
    let group = dev.device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("accelrt kernel bindings"),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &[
            wgpu::BindGroupEntry {
                binding: 0,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer,
                    offset: start,
                    size: std::num::NonZeroU64::new(size),
                }),
            },
            wgpu::BindGroupEntry {
                binding: 1,
                resource: uniform.as_entire_binding(),
            },
        ],
    });
    let mut pass = e.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some("accelrt kernel"),
        timestamp_writes: None,
    });
    pass.set_pipeline(pipeline);
    pass.set_bind_group(0, &group, &[]);
    pass.dispatch_workgroups(x, y, 1);
}

/// Write `bytes` at `dst`: whole words through `Queue::write_buffer` (wgpu runs it at the
/// start of the submission), the bytes of partly written words through the patch kernel.
fn submit_write(dev: &DeviceShared, dst: &Region, bytes: &[u8]) -> DeviceResult<u64> {
    let start = dst.offset;
    let end = start + bytes.len() as u64;
    let whole = (start.next_multiple_of(4), end / 4 * 4);
    let mut e = encoder(dev, "accelrt write");
    let mut partial_words: Vec<u64> = vec![start / 4, (end - 1) / 4];
    partial_words.dedup();
    for w in partial_words {
        let (lo, hi) = ((w * 4).max(start), (w * 4 + 4).min(end));
        if lo == w * 4 && hi == w * 4 + 4 {
            continue; // a whole word: written below
        }
        let (mut keep, mut bits) = (u32::MAX, 0u32);
        for at in lo..hi {
            let shift = 8 * (at - w * 4) as u32;
            keep &= !(0xff << shift);
            bits |= u32::from(bytes[(at - start) as usize]) << shift;
        }
        let (wstart, wsize, word) = window(dev, w * 4, 4);
        let kernels = dev.kernels()?;
        dispatch(
            dev,
            &mut e,
            &kernels.patch,
            &dst.buffer,
            (wstart, wsize),
            &[word, keep, bits, 0],
            (1, 1),
        );
    }
    let commands = e.finish();
    dev.submit(
        |queue| {
            if whole.0 < whole.1 {
                let from = (whole.0 - start) as usize;
                let to = (whole.1 - start) as usize;
                queue.write_buffer(&dst.buffer, whole.0, &bytes[from..to]);
            }
        },
        Some(commands),
    )
}
