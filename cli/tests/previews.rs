//! TAESD in `sdctl generate`: `--vae` with a TAESD decodes the result with it (the model's own
//! VAE still encodes), and `--preview-path` writes a live preview after every step, latent-sized
//! with A1111's cheap map or image-sized with `--taesd`.

use sd_pipeline::model::taesd::AutoencoderTiny;
use sd_tests::model_dir;

use crate::common::{fails, latents, s, scratch, sdctl};

fn base<'a>(model: &'a str, out: &'a str, lat: &'a str) -> Vec<&'a str> {
    vec![
        "generate",
        "--model",
        model,
        "--prompt",
        "a cat",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "2",
        "--seed",
        "9",
        "--output",
        out,
        "--save-latents",
        lat,
    ]
}

#[test]
fn a_taesd_as_vae_decodes_the_image() {
    let dir = scratch("previews", "vae");
    let (out, lat) = (dir.join("o.png"), dir.join("l.safetensors"));
    let (plain_out, plain_lat) = (dir.join("p.png"), dir.join("pl.safetensors"));
    let model = model_dir("sd1");
    let taesd = model_dir("taesd-tiny");
    let mut a = base(s(&model), s(&out), s(&lat));
    a.extend(["--vae", s(&taesd)]);
    let o = sdctl(&a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = sdctl(&base(s(&model), s(&plain_out), s(&plain_lat)));
    assert!(o.status.success());
    // the same latents; the image is the tiny decoder's
    sd_tests::assert_close("latents", &latents(&lat), &latents(&plain_lat), 0.0);
    let t =
        AutoencoderTiny::load(&taesd, &candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
    let want = t.decode_images(&latents(&lat)).unwrap();
    let (w, h, px) = sd_pipeline::generation::image_io::to_rgb8(&want.get(0).unwrap()).unwrap();
    let got = image::open(&out).unwrap().to_rgb8();
    assert_eq!((got.width() as usize, got.height() as usize), (w, h));
    assert_eq!(got.into_raw(), px);
    assert_ne!(image::open(&plain_out).unwrap().to_rgb8().into_raw(), px);
}

#[test]
fn previews_are_written_after_every_step() {
    let dir = scratch("previews", "preview");
    let (out, lat) = (dir.join("o.png"), dir.join("l.safetensors"));
    let model = model_dir("sd1");
    let cheap = dir.join("cheap.png");
    let mut a = base(s(&model), s(&out), s(&lat));
    a.extend(["--preview-path", s(&cheap)]);
    let o = sdctl(&a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(image::image_dimensions(&cheap).unwrap(), (8, 8));
    let tiny = dir.join("tiny.png");
    let taesd = model_dir("taesd-tiny");
    let mut a = base(s(&model), s(&out), s(&lat));
    a.extend(["--preview-path", s(&tiny), "--taesd", s(&taesd)]);
    let o = sdctl(&a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(image::image_dimensions(&tiny).unwrap(), (64, 64));
    // --preview KIND without a path: beside the output; taesd needs its decoder
    let mut a = base(s(&model), s(&out), s(&lat));
    a.extend(["--preview", "taesd", "--taesd", s(&taesd)]);
    let o = sdctl(&a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        image::image_dimensions(dir.join("o.preview.png")).unwrap(),
        (64, 64)
    );
    let mut a = base(s(&model), s(&out), s(&lat));
    a.extend(["--preview", "cheap", "--taesd", s(&taesd)]);
    assert!(sdctl(&a).status.success());
    assert_eq!(
        image::image_dimensions(dir.join("o.preview.png")).unwrap(),
        (8, 8)
    );
    // a TAESD that is none is refused before anything runs
    let dir = scratch("previews", "bad");
    let (out, lat) = (dir.join("o.png"), dir.join("l.safetensors"));
    let mut a = base(s(&model), s(&out), s(&lat));
    let vae = model_dir("sd1").join("vae");
    a.extend(["--preview-path", s(&tiny), "--taesd", s(&vae)]);
    let err = fails(&a, &out);
    assert!(err.contains("taesd"), "{err}");
    let mut a = base(s(&model), s(&out), s(&lat));
    a.extend(["--preview", "taesd"]);
    let err = fails(&a, &out);
    assert!(err.contains("needs --taesd"), "{err}");
}
