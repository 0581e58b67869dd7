//! Graph capture and replay on a real GPU: captured kernels and a captured host task do not
//! run at capture, and each replay runs them once more.
#![cfg(feature = "cuda")]

mod cuda_common;

use accelrt::DeviceError;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use accelrt::{Backend, Error, MempoolId, StreamPriority};
use cuda_common::{gpu, read_u32};

#[test]
fn captured_increments_run_once_per_replay() {
    let Some(rt) = gpu("captured_increments_run_once_per_replay") else {
        return;
    };
    const WORDS: usize = 1 << 16;
    const KERNELS: u32 = 3;
    const REPLAYS: u32 = 10;
    let s = rt.new_stream(0, StreamPriority::Normal).unwrap();
    let alloc = rt.allocator(0).unwrap();
    let buf = alloc.raw_alloc(WORDS * 4, s).unwrap();
    // SAFETY: `buf` is ours, used on `s` only.
    rt.with_stream(s, |d, raw| unsafe { d.memset_u32(raw, buf, WORDS, 7) })
        .unwrap();
    rt.stream_synchronize(s).unwrap();

    // keep_graph: the capture is instantiated by graph_instantiate below, not at its end.
    let g = rt.graph_create_with(0, true).unwrap();
    rt.graph_capture_begin(g, s, MempoolId::NONE).unwrap();
    for _ in 0..KERNELS {
        // SAFETY: as above; the launch is captured, and replays run while `buf` is live.
        rt.with_stream(s, |d, raw| unsafe { d.add_u32(raw, buf, WORDS, 1) })
            .unwrap();
    }
    let ran = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&ran);
    rt.launch_host(
        s,
        Arc::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        }),
    )
    .unwrap();
    rt.graph_capture_end(g).unwrap();

    // Capturing ran nothing.
    rt.stream_synchronize(s).unwrap();
    assert!(read_u32(rt, 0, buf, WORDS).iter().all(|&w| w == 7));
    assert_eq!(ran.load(Ordering::SeqCst), 0);

    assert_eq!(rt.graph_is_instantiated(g), Ok(false));
    rt.graph_instantiate(g).unwrap();
    assert_eq!(rt.graph_is_instantiated(g), Ok(true));
    for _ in 0..REPLAYS {
        rt.graph_replay(g).unwrap();
    }
    rt.stream_synchronize(s).unwrap();
    let words = read_u32(rt, 0, buf, WORDS);
    let want = 7 + KERNELS * REPLAYS;
    assert!(
        words.iter().all(|&w| w == want),
        "expected every word to be {want}, first words: {:?}",
        &words[..8]
    );
    assert_eq!(ran.load(Ordering::SeqCst), REPLAYS);

    rt.graph_destroy(g).unwrap();
    alloc.raw_free(buf).unwrap();
}

#[test]
fn the_default_stream_cannot_be_captured_and_says_why() {
    let Some(rt) = gpu("the_default_stream_cannot_be_captured_and_says_why") else {
        return;
    };
    let g = rt.graph_create(0).unwrap();
    let default = rt.default_stream(0).unwrap();
    let err = rt
        .graph_capture_begin(g, default, MempoolId::NONE)
        .unwrap_err();
    assert!(matches!(err, Error::Device(DeviceError::Graph(_))), "{err}");
    assert!(err.to_string().contains("stream_from_pool"), "{err}");
    // The stream is usable afterwards, and the graph can capture elsewhere.
    rt.stream_synchronize(default).unwrap();
    let s = rt.stream_from_pool(0, StreamPriority::Normal).unwrap();
    rt.graph_capture_begin(g, s, MempoolId::NONE).unwrap();
    rt.graph_capture_end(g).unwrap();
    rt.graph_replay(g).unwrap();
    rt.stream_synchronize(s).unwrap();
    rt.graph_destroy(g).unwrap();
}
