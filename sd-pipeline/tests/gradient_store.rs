//! candle-core's gradient store as patched in `vendor/candle-core` (see vendor/README.md): the
//! first gradient reaching a tensor is stored as it is, later ones are added, subtraction
//! negates, and constants get no gradient. Checked against gradients worked out by hand.

use candle_core::{Device, Tensor, Var, D};

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn assert_near(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(want) {
        // f32 arithmetic on values of order 1: a few ulps
        assert!(
            (g - w).abs() < 1e-5 * w.abs().max(1.0),
            "{what}: {got:?} vs {want:?}"
        );
    }
}

#[test]
fn fan_in_sums_subtraction_negates_and_constants_get_nothing() {
    let dev = Device::Cpu;
    let xs = [1f32, 2., 3.];
    let cs = [0.5f32, -1., 2.];
    let x = Var::new(&xs, &dev).unwrap();
    let c = Tensor::new(&cs, &dev).unwrap();
    let xt = x.as_tensor();
    // y = sum(x*x + x*c + sin(x) - x/c - (c - x))
    let y = ((xt * xt).unwrap() + (xt * &c).unwrap()).unwrap();
    let y = (y + xt.sin().unwrap()).unwrap();
    let y = (y - (xt / &c).unwrap()).unwrap();
    let y = (y - (&c - xt).unwrap()).unwrap().sum_all().unwrap();
    let g = y.backward().unwrap();
    let want: Vec<f32> = xs
        .iter()
        .zip(cs)
        .map(|(&x, c)| 2.0 * x + c + x.cos() - 1.0 / c + 1.0)
        .collect();
    assert_near(&values(g.get(xt).unwrap()), &want, "dy/dx");
    assert!(g.get(&c).is_none(), "a constant got a gradient");
}

#[test]
fn matmul_and_broadcast_take_only_the_variables_gradient() {
    let dev = Device::Cpu;
    let x = Var::new(&[[1f32, -2., 0.5]], &dev).unwrap(); // [1, 3]
    let w = Tensor::new(&[[1f32, 2.], [3., -1.], [0.25, 4.]], &dev).unwrap(); // [3, 2], frozen
    let b = Var::new(&[0.5f32, -0.5], &dev).unwrap();
    // z = sum((x w + b) broadcast to [4, 2] * r), r = row index + 1: dz/dx = 10 * w.sum(1),
    // dz/db = 10 per element
    let r = Tensor::new(&[[1f32], [2.], [3.], [4.]], &dev).unwrap();
    let h = x
        .as_tensor()
        .matmul(&w)
        .unwrap()
        .broadcast_add(b.as_tensor())
        .unwrap();
    let z = h
        .broadcast_as((4, 2))
        .unwrap()
        .broadcast_mul(&r)
        .unwrap()
        .sum_keepdim(D::Minus1)
        .unwrap()
        .sum_all()
        .unwrap();
    let g = z.backward().unwrap();
    assert_near(
        &values(g.get(x.as_tensor()).unwrap()),
        &[30.0, 20.0, 42.5],
        "dz/dx",
    );
    assert_near(
        &values(g.get(b.as_tensor()).unwrap()),
        &[10.0, 10.0],
        "dz/db",
    );
    assert!(g.get(&w).is_none() && g.get(&r).is_none());
}
