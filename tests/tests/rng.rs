//! `--rng torch-cpu` and `--rng philox` against reference draws (expected/rng.safetensors from
//! make_rng_fixtures.py): bit-exact, for several seeds and shapes, two draws in a row.

use sd_pipeline::rng::PhiloxRng;
use sd_pipeline::rng::TorchRng;
use sd_tests::expected;

const SEEDS: [u64; 5] = [0, 1, 42, 123_456_789, (1 << 32) + 5];
const SHAPES: [&[usize]; 9] = [
    &[1],
    &[5],
    &[15],
    &[16],
    &[17],
    &[3, 4],
    &[1, 4, 8, 8],
    &[2, 4, 9, 7],
    &[1, 4, 32, 24],
];

fn check(kind: &str, mut draw: impl FnMut(u64) -> Box<dyn FnMut(usize) -> Vec<f32>>) {
    let exp = expected("rng.safetensors");
    let mut compared = 0;
    for seed in SEEDS {
        for shape in SHAPES {
            let n: usize = shape.iter().product();
            let name = shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join("x");
            let mut g = draw(seed);
            for k in 0..2 {
                let want = exp[&format!("{kind}_{seed}_{name}_{k}")]
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let got = g(n);
                let same = sd_tests::paired(&format!("{kind} seed {seed} draw {k}"), &got, &want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "{kind} seed {seed} shape {shape:?} draw {k}: {got:?} vs {want:?}"
                );
                compared += n;
            }
        }
    }
    assert!(compared > 30_000);
}

#[test]
fn torch_cpu_generator_is_bit_exact() {
    check("cpu", |seed| {
        let mut r = TorchRng::new(seed);
        Box::new(move |n| r.randn_f32(n))
    });
}

#[test]
fn philox_generator_is_bit_exact() {
    check("philox", |seed| {
        let mut r = PhiloxRng::new(seed);
        Box::new(move |n| r.randn_f32(n))
    });
}
