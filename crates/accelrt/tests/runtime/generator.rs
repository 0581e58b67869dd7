//! The Philox 4x32-10 generator: known-answer vectors, determinism, offsets and state.

use accelrt::generator::{philox4x32_10, Generator, DEFAULT_SEED, STATE_LEN};
use accelrt::DeviceError;

/// Random123's known-answer tests for philox4x32_10: (counter, key, output).
const KAT: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
    (
        [0, 0, 0, 0],
        [0, 0],
        [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8],
    ),
    (
        [0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff],
        [0xffffffff, 0xffffffff],
        [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd],
    ),
    (
        [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
        [0xa4093822, 0x299f31d0],
        [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
    ),
];

#[test]
fn philox_matches_random123_known_answers() {
    for (counter, key, want) in KAT {
        assert_eq!(
            philox4x32_10(counter, key),
            want,
            "counter {counter:08x?} key {key:08x?}"
        );
    }
}

#[test]
fn the_stream_is_philox_blocks_keyed_by_the_seed() {
    // Seed 0, offset 0: the first block is the all-zero KAT.
    let g = Generator::new(0);
    let first: Vec<u32> = (0..4).map(|_| g.next_u32()).collect();
    assert_eq!(first, KAT[0].2);
    // Seed = key words (lo, hi); offset 4 * n reads counter n.
    let seed = 0xffff_ffff_ffff_ffff;
    let g = Generator::new(seed);
    let block = 0x0000_0001_0000_0002u64;
    g.set_offset(block * 4);
    let mut out = [0u32; 4];
    g.fill_u32(&mut out);
    assert_eq!(out, philox4x32_10([2, 1, 0, 0], [0xffff_ffff, 0xffff_ffff]));
}

#[test]
fn same_seed_same_numbers_other_seed_other_numbers() {
    let draw = |seed: u64| {
        let g = Generator::new(seed);
        (0..64).map(|_| g.next_u32()).collect::<Vec<_>>()
    };
    assert_eq!(draw(42), draw(42));
    assert_ne!(draw(42), draw(43));
    assert_eq!(Generator::default().seed(), DEFAULT_SEED);
}

#[test]
fn every_draw_advances_the_offset_by_its_length() {
    let g = Generator::new(9);
    // (operation, how far it moves the offset)
    type Op = (&'static str, fn(&Generator), u64);
    let ops: [Op; 5] = [
        (
            "next_u32",
            |g| {
                g.next_u32();
            },
            1,
        ),
        (
            "next_f32",
            |g| {
                g.next_f32();
            },
            1,
        ),
        ("fill 0", |g| g.fill_u32(&mut []), 0),
        ("fill 7", |g| g.fill_u32(&mut [0; 7]), 7),
        ("fill 64", |g| g.fill_u32(&mut [0; 64]), 64),
    ];
    let mut expected = 0;
    for (name, op, step) in ops {
        op(&g);
        expected += step;
        assert_eq!(g.offset(), expected, "after {name}");
    }
}

#[test]
fn set_offset_replays_and_set_seed_restarts() {
    let g = Generator::new(1234);
    let mut first = [0u32; 10];
    g.fill_u32(&mut first);
    g.set_offset(3);
    assert_eq!(g.next_u32(), first[3]);
    g.set_seed(1234);
    assert_eq!(g.offset(), 0, "reseeding restarts the stream");
    assert_eq!(g.next_u32(), first[0]);
}

#[test]
fn state_round_trips_and_bad_lengths_are_rejected() {
    let g = Generator::new(77);
    g.fill_u32(&mut [0; 5]);
    let state = g.get_state();
    assert_eq!(state.len(), STATE_LEN);
    let expected_next: Vec<u32> = (0..8).map(|_| g.next_u32()).collect();

    let other = Generator::new(1);
    other.set_state(&state).unwrap();
    assert_eq!((other.seed(), other.offset()), (77, 5));
    let replayed: Vec<u32> = (0..8).map(|_| other.next_u32()).collect();
    assert_eq!(replayed, expected_next);

    let before = other.get_state();
    for len in [0, 1, 15, 17, 32] {
        let err = other.set_state(&vec![0xAB; len]).unwrap_err();
        assert!(matches!(err, DeviceError::InvalidArgument(_)), "{err:?}");
        assert!(
            err.to_string().contains(&format!("got {len} bytes")),
            "{err}"
        );
        assert_eq!(
            other.get_state(),
            before,
            "a rejected state changes nothing"
        );
    }
}

#[test]
fn floats_are_uniform_in_the_unit_interval() {
    let g = Generator::new(2024);
    let n = 20_000;
    let values: Vec<f32> = (0..n).map(|_| g.next_f32()).collect();
    assert!(values.iter().all(|v| (0.0..1.0).contains(v)));
    let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
    // Standard error of the mean is 0.002; 0.02 is ten of them.
    assert!((mean - 0.5).abs() < 0.02, "mean {mean}");
    let low = values.iter().filter(|&&v| v < 0.25).count() as f64 / n as f64;
    assert!((low - 0.25).abs() < 0.02, "share below 0.25: {low}");
}

#[test]
fn a_shared_generator_hands_out_disjoint_positions_across_threads() {
    let g = Generator::new(5);
    let per_thread = 1000;
    let mut all: Vec<u64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    (0..per_thread)
                        .map(|_| {
                            let mut v = [0u32; 2];
                            g.fill_u32(&mut v);
                            (u64::from(v[0]) << 32) | u64::from(v[1])
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(g.offset(), 4 * per_thread * 2);
    let reference = Generator::new(5);
    let mut expected: Vec<u64> = (0..4 * per_thread)
        .map(|_| {
            let mut v = [0u32; 2];
            reference.fill_u32(&mut v);
            (u64::from(v[0]) << 32) | u64::from(v[1])
        })
        .collect();
    all.sort_unstable();
    expected.sort_unstable();
    assert_eq!(
        all, expected,
        "threads drew exactly the first 8000 values, each once"
    );
}
