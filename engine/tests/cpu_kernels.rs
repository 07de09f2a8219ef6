//! ult's CPU quantized matmul kernels (the vendored candle-core's Q4_1, Q5_0 and Q8_0 tile kernels for
//! steps of several rows) against the one-row kernels and against f32 arithmetic on the dequantized
//! weights.
//!
//! Tolerances, stated before comparing: a row's result must be the same bits whether it is multiplied
//! alone (the decode kernel) or inside a step of any number of rows (the tile kernel, with its 1–3-row
//! remainders, eight-row tiles where AVX-512 has the registers, and an odd last column): batched = alone
//! depends on it. Against f32 arithmetic on the dequantized weights the only difference is the 8-bit
//! quantization of the activations (blocks of 32), so the relative L2 error of a whole output is held to
//! 1e-2 (each check prints what it measured).
#![allow(clippy::unwrap_used)] // tests may unwrap

use candle_core::quantized::k_quants::{BlockQ4_1, BlockQ5_0, BlockQ8_0, GgmlType};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

/// Deterministic values in [-1, 1) from a seed (an LCG; no dependency).
fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Row `r` of `x` `(1, m, k)` multiplied alone (the one-row path).
fn row_alone(mm: &QMatMul, x: &Tensor, r: usize) -> Vec<f32> {
    let out = mm.forward(&x.narrow(1, r, 1).unwrap()).unwrap();
    out.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn check(dtype: GgmlDType, n: usize, k: usize, rows: &[usize]) {
    let dev = Device::Cpu;
    let w = Tensor::from_vec(values(7 + n as u64, n * k), (n, k), &dev).unwrap();
    let q = QTensor::quantize(&w, dtype).unwrap();
    let dequant = q.dequantize(&dev).unwrap();
    let mm = QMatMul::from_qtensor(q).unwrap();
    for &m in rows {
        let x = Tensor::from_vec(values(100 + m as u64, m * k), (1, m, k), &dev).unwrap();
        let all = mm.forward(&x).unwrap().squeeze(0).unwrap();
        let all: Vec<Vec<f32>> = all.to_vec2().unwrap();
        for (r, got) in all.iter().enumerate() {
            let alone = row_alone(&mm, &x, r);
            let same = got
                .iter()
                .zip(&alone)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "{dtype:?} {n}x{k}: row {r} of {m} differs from the row alone"
            );
        }
        let reference: Vec<Vec<f32>> = x
            .squeeze(0)
            .unwrap()
            .matmul(&dequant.t().unwrap())
            .unwrap()
            .to_vec2()
            .unwrap();
        let (mut err, mut norm) = (0f64, 0f64);
        for (g, r) in all.iter().flatten().zip(reference.iter().flatten()) {
            err += f64::from(g - r).powi(2);
            norm += f64::from(*r).powi(2);
        }
        let rel = (err / norm).sqrt();
        eprintln!("{dtype:?} {n}x{k}, {m} rows: relative L2 {rel:.2e} against f32");
        assert!(
            rel < 1e-2,
            "{dtype:?} {n}x{k}, {m} rows: relative L2 {rel:.2e} against f32"
        );
    }
}

#[test]
fn q4_1_rows_of_a_step_equal_each_row_alone() {
    // Row counts around the tile (4 rows) and the row tile (16): every remainder kernel runs; 577
    // columns leave an odd one after the column pairs, 1536 none.
    let rows = [1, 2, 3, 4, 5, 7, 9, 16, 17, 21, 33];
    check(GgmlDType::Q4_1, 577, 576, &rows);
    check(GgmlDType::Q4_1, 1536, 576, &rows);
    check(GgmlDType::Q4_1, 576, 1536, &[1, 6, 13]);
}

#[test]
fn q5_0_rows_of_a_step_equal_each_row_alone() {
    check(
        GgmlDType::Q5_0,
        641,
        640,
        &[1, 2, 3, 4, 5, 8, 9, 12, 16, 19, 27],
    );
    check(GgmlDType::Q5_0, 640, 2048, &[1, 6, 13]);
}

#[test]
fn q8_0_rows_of_a_step_equal_each_row_alone() {
    check(
        GgmlDType::Q8_0,
        641,
        640,
        &[1, 2, 3, 4, 5, 8, 9, 12, 16, 19, 27],
    );
}

/// The AVX2 tiles (the sign-transfer Q5_0/Q8_0 kernels, Q4_1 without `vpdpbusd`), which a machine with
/// AVX-512 VNNI would not otherwise run: `MISTRALRS_FORCE_AVX2=1` is read once per process, and nextest
/// (`scripts/test.sh`) runs each test in its own.
#[test]
fn avx2_tiles_give_the_same_bits_as_the_one_row_kernels() {
    // SAFETY: set before any matmul of this process reads it, and no other thread reads the environment.
    unsafe { std::env::set_var("MISTRALRS_FORCE_AVX2", "1") };
    let rows = [1, 2, 3, 4, 5, 8, 9, 17];
    check(GgmlDType::Q4_1, 577, 576, &rows);
    check(GgmlDType::Q5_0, 641, 640, &rows);
    check(GgmlDType::Q8_0, 641, 640, &rows);
}

#[test]
fn other_types_rows_of_a_step_equal_each_row_alone() {
    check(GgmlDType::Q4_0, 130, 256, &[1, 3, 9]);
}

/// Every output of a matmul, one row alone and rows in a step, against ggml's one-row dot product
/// (`GgmlType::vec_dot`, the kernel the decode path used before the tiles) of that weight row and that
/// activation row, quantized as the matmul quantizes them: the same bits.
fn check_against_vec_dot<T: GgmlType>(dtype: GgmlDType, n: usize, k: usize, m: usize) {
    let dev = Device::Cpu;
    let wv = values(11 + n as u64, n * k);
    let xv = values(200 + m as u64, m * k);
    let quantize = |v: &[f32], blocks: usize| -> Vec<Vec<T::VecDotType>> {
        v.chunks(k)
            .map(|row| {
                let mut b = vec![T::VecDotType::zeros(); blocks];
                T::VecDotType::from_float(row, &mut b);
                b
            })
            .collect()
    };
    let weights: Vec<Vec<T>> = wv
        .chunks(k)
        .map(|row| {
            let mut b = vec![T::zeros(); k / T::BLCK_SIZE];
            T::from_float(row, &mut b);
            b
        })
        .collect();
    let acts = quantize(&xv, k / T::BLCK_SIZE);
    let w = Tensor::from_vec(wv, (n, k), &dev).unwrap();
    let mm = QMatMul::from_qtensor(QTensor::quantize(&w, dtype).unwrap()).unwrap();
    let x = Tensor::from_vec(xv, (1, m, k), &dev).unwrap();
    let got: Vec<Vec<f32>> = mm
        .forward(&x)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    for (r, row) in got.iter().enumerate() {
        let alone = row_alone(&mm, &x, r);
        for (c, w) in weights.iter().enumerate() {
            let want = T::vec_dot(k, w, &acts[r]);
            assert_eq!(
                row[c].to_bits(),
                want.to_bits(),
                "{dtype:?}: row {r} of {m}, column {c}"
            );
            assert_eq!(
                alone[c].to_bits(),
                want.to_bits(),
                "{dtype:?}: row {r} alone, column {c}"
            );
        }
    }
}

#[test]
fn every_kernel_gives_the_bits_of_ggmls_one_row_dot_product() {
    for m in [1, 3, 4, 9, 17] {
        check_against_vec_dot::<BlockQ4_1>(GgmlDType::Q4_1, 67, 576, m);
        check_against_vec_dot::<BlockQ5_0>(GgmlDType::Q5_0, 67, 640, m);
        check_against_vec_dot::<BlockQ8_0>(GgmlDType::Q8_0, 67, 640, m);
    }
}
