//! The hires fix's latent upscalers against `torch.nn.functional.interpolate`
//! (make_hires_fixtures.py): every A1111 latent mode, up 2x, up by a fraction, and down.
//! Tolerance 1e-5 (f32 weights; the sums run in another order than ATen's).

use sd_pipeline::generation::latent_resize::{resize_latents, LatentUpscale};
use sd_tests::{assert_close, expected, get};

#[test]
fn latent_upscalers_match_torch_interpolate() {
    let exp = expected("latent_resize.safetensors");
    let x = get(&exp, "input");
    let mut n = 0;
    for mode in LatentUpscale::ALL {
        for (h, w) in [(16, 24), (13, 19), (6, 9)] {
            let want = get(&exp, &format!("{}.{h}x{w}", mode.name()));
            let got = resize_latents(x, h, w, mode).unwrap();
            assert_close(&format!("{mode} {h}x{w}"), &got, want, 1e-5);
            n += 1;
        }
    }
    assert_eq!(n, 18);
    // A1111's names parse to the same modes
    assert_eq!(
        "Latent (bicubic antialiased)"
            .parse::<LatentUpscale>()
            .unwrap(),
        LatentUpscale::BicubicAntialias
    );
    assert!("Latent (lanczos)".parse::<LatentUpscale>().is_err());
}
