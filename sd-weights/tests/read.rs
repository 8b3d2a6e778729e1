//! Reading small files written here: shapes from the header, tensors by name, and errors that
//! name the file and say what was expected.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use sd_weights::{pickle, tensor_shapes, Error, Store};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sd-weights-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn write_small(path: &PathBuf) {
    let mut m = HashMap::new();
    m.insert(
        "b.weight".to_string(),
        Tensor::arange(0f32, 6., &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap(),
    );
    m.insert(
        "a.bias".to_string(),
        Tensor::new(&[1f32, 2.], &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&m, path).unwrap();
}

#[test]
fn safetensors_shapes_come_sorted_from_the_header() {
    let p = scratch("small.safetensors");
    write_small(&p);
    let shapes = tensor_shapes(&p).unwrap();
    assert_eq!(
        shapes,
        vec![
            ("a.bias".to_string(), vec![2]),
            ("b.weight".to_string(), vec![2, 3])
        ]
    );
}

#[test]
fn store_reads_tensors_by_name() {
    let p = scratch("store.safetensors");
    write_small(&p);
    let store = Store::open(&p).unwrap();
    assert_eq!(store.shapes().get("b.weight"), Some(&vec![2, 3]));
    assert!(store.contains("a.bias"));
    assert!(!store.contains("c"));
    let t = store.get("b.weight").unwrap();
    assert_eq!(
        t.to_vec2::<f32>().unwrap(),
        vec![vec![0., 1., 2.], vec![3., 4., 5.]]
    );
    assert!(store.get("missing").is_err());
}

#[test]
fn a_malformed_safetensors_names_the_file() {
    let p = scratch("bad.safetensors");
    std::fs::write(&p, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}").unwrap();
    let e = tensor_shapes(&p).unwrap_err();
    assert!(matches!(e, Error::Safetensors { .. }));
    let m = e.to_string();
    assert!(m.contains("bad.safetensors"), "{m}");
    assert!(m.contains("not a safetensors file"), "{m}");
}

#[test]
fn a_missing_file_names_the_file() {
    let p = scratch("absent.safetensors");
    let e = tensor_shapes(&p).unwrap_err();
    assert!(matches!(e, Error::Io { .. }));
    assert!(e.to_string().contains("absent.safetensors"));
    assert!(Store::open(&p).is_err());
}

#[test]
fn a_pth_that_is_not_a_zip_archive_is_refused_with_the_reason() {
    let p = scratch("legacy.pth");
    std::fs::write(&p, b"\x80\x02}q\x00.").unwrap();
    assert!(pickle::is_pickle(&p));
    let e = Store::open(&p).err().expect("not a zip archive");
    assert!(matches!(e, Error::Pickle { .. }));
    let m = e.to_string();
    assert!(m.contains("legacy.pth"), "{m}");
    assert!(m.contains("not a PyTorch zip archive"), "{m}");
}
