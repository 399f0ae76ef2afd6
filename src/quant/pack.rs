//! GPTQ v1 bit packing (DESIGN.md section 5): integers of a [`QuantizedTensor`]-style grid into the
//! int32 words that `qweight` and `qzeros` hold, and back.
//!
//! Conventions (identical to AutoGPTQ's `QuantLinear.pack` and GPTQModel's v1 writer):
//! - every packed row is a little-endian bit stream: value `k` of the row occupies bits
//!   `k*b .. k*b+b` of the stream, and stream bit `p` is bit `p % 32` of word `p / 32`. For b in
//!   {2, 4, 8} that is "word r holds `q[r*pf + j] << (b*j)`, pf = 32/b". For b = 3 values straddle
//!   words: 32 values span exactly 3 words (values 10 and 21 are split between two words), which is
//!   what AutoGPTQ's explicit 3-bit loop produces (see `pack_3bit_matches_autogptq_loop`).
//! - `qweight` is [in*b/32, out]: packed along the INPUT dim (one stream per output column).
//! - `qzeros` is [G, out*b/32]: packed along the OUTPUT dim, storing `zero - 1` modulo 2^b (the v1
//!   convention). A zero of 0 therefore stores `maxq`. [`unpack_qzeros`] inverts that exactly
//!   (`(stored + 1) mod 2^b`), so our round trip is lossless; but v1 runtimes compute
//!   `stored + 1` without the modulus and would read `2^b` for that group. [`unpack_qzeros_stored`]
//!   returns the stored values for callers that apply the runtime rule; the GPTQ exporter decides
//!   what to do about zero 0 (crate::export::gptq).
//!
//! This module only moves bits: it never quantizes, never touches files and never allocates more
//! than the packed/unpacked result. Unsupported widths (anything but 2, 3, 4, 8) and dimensions
//! that do not fill whole words are errors, never silent padding.
//!
//! [`QuantizedTensor`]: crate::quant::QuantizedTensor

use crate::error::{Error, Result};

/// Bit widths the GPTQ v1 format (and every runtime kernel that reads it) supports.
pub const SUPPORTED_BITS: [u8; 4] = [2, 3, 4, 8];

/// Checks `bits` is a GPTQ-packable width.
pub fn check_bits(bits: u8) -> Result<()> {
    if SUPPORTED_BITS.contains(&bits) {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "GPTQ packing supports 2, 3, 4 or 8 bits, got {bits}"
        )))
    }
}

/// How many values one packing unit holds: `32 / bits` values per word for 2/4/8 bits, 32 values
/// per 3 words for 3 bits. A packed dimension must be a multiple of this.
pub fn pack_unit(bits: u8) -> Result<usize> {
    check_bits(bits)?;
    Ok(if bits == 3 { 32 } else { 32 / bits as usize })
}

/// Number of 32-bit words a packed dimension of `n` values needs (`n * bits / 32`), or a clear error
/// when `n` does not fill whole packing units.
pub fn packed_len(n: usize, bits: u8, what: &str) -> Result<usize> {
    let unit = pack_unit(bits)?;
    if !n.is_multiple_of(unit) {
        return Err(Error::invalid(format!(
            "{what}: dimension {n} is not a multiple of {unit}, which {bits}-bit GPTQ packing needs"
        )));
    }
    Ok(n * bits as usize / 32)
}

/// Packs `n_streams` streams of `len` values each. Value `k` of stream `s` is `get(s, k)`; the
/// result is [len*bits/32, n_streams] when `words_major` (stream index fastest, as `qweight`),
/// else [n_streams, len*bits/32] (as `qzeros`).
fn pack_streams(
    n_streams: usize,
    len: usize,
    bits: u8,
    words_major: bool,
    what: &str,
    get: impl Fn(usize, usize) -> u32 + Sync,
) -> Result<Vec<i32>> {
    let n_words = packed_len(len, bits, what)?;
    let maxq = (1u32 << bits) - 1;
    let b = bits as usize;
    // Validate first (cheap, and the error names the first bad value), then pack on all cores.
    let bad = crate::par::sum(n_streams, |r| {
        r.map(|s| (0..len).filter(|&k| get(s, k) > maxq).count())
            .sum::<usize>() as f64
    });
    if bad > 0.0 {
        for s in 0..n_streams {
            for k in 0..len {
                let v = get(s, k);
                if v > maxq {
                    return Err(Error::invalid(format!(
                        "{what}: value {v} at ({s}, {k}) does not fit in {bits} bits"
                    )));
                }
            }
        }
    }
    // Word w of stream s holds bits w*32 .. w*32+31 of the stream's concatenated values: the
    // values starting in it, and the high bits of a 3-bit value that started at bit 30 or 31 of
    // the word before.
    let word = |s: usize, w: usize| -> u32 {
        let mut acc = 0u32;
        for k in (w * 32) / b..((w + 1) * 32).div_ceil(b).min(len) {
            let v = get(s, k);
            let p = k * b;
            let (ww, sh) = (p / 32, p % 32);
            if ww == w {
                acc |= v << sh;
            } else if sh + b > 32 {
                acc |= v >> (32 - sh);
            }
        }
        acc
    };
    let (lines, line_len) = if words_major {
        (n_words, n_streams)
    } else {
        (n_streams, n_words)
    };
    let mut out = vec![0u32; lines * line_len];
    if line_len > 0 {
        let per = crate::par::PIECE.div_ceil(line_len) * line_len;
        crate::par::for_chunks_mut(&mut out, per, |start, o| {
            for (i, line) in o.chunks_mut(line_len).enumerate() {
                let l = start / line_len + i;
                for (j, x) in line.iter_mut().enumerate() {
                    *x = if words_major { word(j, l) } else { word(l, j) };
                }
            }
        });
    }
    // int32 is the format's storage type; the bit pattern is what matters.
    Ok(out.into_iter().map(|w| w as i32).collect())
}

/// Inverse of [`pack_streams`]: calls `put(s, k, value)` for every value.
fn unpack_streams(
    packed: &[i32],
    n_streams: usize,
    len: usize,
    bits: u8,
    words_major: bool,
    what: &str,
    mut put: impl FnMut(usize, usize, u32),
) -> Result<()> {
    let n_words = packed_len(len, bits, what)?;
    if packed.len() != n_words * n_streams {
        return Err(Error::invalid(format!(
            "{what}: packed data has {} words, expected {n_words} x {n_streams} = {}",
            packed.len(),
            n_words * n_streams
        )));
    }
    let maxq = (1u32 << bits) - 1;
    let b = bits as usize;
    let word = |s: usize, w: usize| {
        let i = if words_major {
            w * n_streams + s
        } else {
            s * n_words + w
        };
        packed[i] as u32
    };
    for s in 0..n_streams {
        for k in 0..len {
            let p = k * b;
            let (w, sh) = (p / 32, p % 32);
            let mut v = word(s, w) >> sh;
            if sh + b > 32 {
                v |= word(s, w + 1) << (32 - sh);
            }
            put(s, k, v & maxq);
        }
    }
    Ok(())
}

/// Packs row-major `q` (`rows_out` x `cols_in`, values in 0..2^bits) into GPTQ `qweight`
/// [cols_in*bits/32, rows_out], packed along the input dim, lowest input index in the lowest bits.
pub fn pack_qweight(q: &[u8], rows_out: usize, cols_in: usize, bits: u8) -> Result<Vec<i32>> {
    if q.len() != rows_out * cols_in {
        return Err(Error::invalid(format!(
            "qweight: {} values for a {rows_out} x {cols_in} matrix",
            q.len()
        )));
    }
    pack_streams(
        rows_out,
        cols_in,
        bits,
        true,
        "qweight (input dim)",
        |o, i| q[o * cols_in + i] as u32,
    )
}

/// Inverse of [`pack_qweight`]: row-major `rows_out` x `cols_in` integers.
pub fn unpack_qweight(
    packed: &[i32],
    rows_out: usize,
    cols_in: usize,
    bits: u8,
) -> Result<Vec<u8>> {
    let mut q = vec![0u8; rows_out * cols_in];
    // Values are masked to `bits` <= 8, so the cast to u8 is lossless.
    unpack_streams(
        packed,
        rows_out,
        cols_in,
        bits,
        true,
        "qweight (input dim)",
        |o, i, v| q[o * cols_in + i] = v as u8,
    )?;
    Ok(q)
}

/// Packs zero points `zeros` ([groups, cols_out] row-major, values in 0..2^bits) into GPTQ v1
/// `qzeros` [groups, cols_out*bits/32], packed along the output dim, storing `(zero - 1) mod 2^bits`
/// (so a zero of 0 stores `maxq`; see the module docs for what runtimes make of that).
pub fn pack_qzeros(zeros: &[u32], groups: usize, cols_out: usize, bits: u8) -> Result<Vec<i32>> {
    check_bits(bits)?;
    if zeros.len() != groups * cols_out {
        return Err(Error::invalid(format!(
            "qzeros: {} values for {groups} groups x {cols_out} outputs",
            zeros.len()
        )));
    }
    let maxq = (1u32 << bits) - 1;
    if let Some((i, z)) = zeros.iter().enumerate().find(|(_, z)| **z > maxq) {
        return Err(Error::invalid(format!(
            "qzeros: zero point {z} at index {i} does not fit in {bits} bits"
        )));
    }
    pack_streams(
        groups,
        cols_out,
        bits,
        false,
        "qzeros (output dim)",
        |g, o| {
            // zero - 1 in b-bit arithmetic: 0 wraps to maxq, which `unpack_qzeros` maps back to 0.
            (zeros[g * cols_out + o] + maxq) & maxq
        },
    )
}

/// The values `qzeros` stores ([groups, cols_out], each `(zero - 1) mod 2^bits`), for applying the
/// v1 runtime rule `zero = stored + 1`.
pub fn unpack_qzeros_stored(
    packed: &[i32],
    groups: usize,
    cols_out: usize,
    bits: u8,
) -> Result<Vec<u32>> {
    let mut z = vec![0u32; groups * cols_out];
    unpack_streams(
        packed,
        groups,
        cols_out,
        bits,
        false,
        "qzeros (output dim)",
        |g, o, v| z[g * cols_out + o] = v,
    )?;
    Ok(z)
}

/// Exact inverse of [`pack_qzeros`]: zero points [groups, cols_out] in 0..2^bits
/// (`(stored + 1) mod 2^bits`).
pub fn unpack_qzeros(packed: &[i32], groups: usize, cols_out: usize, bits: u8) -> Result<Vec<u32>> {
    let maxq = (1u32 << bits) - 1;
    let mut z = unpack_qzeros_stored(packed, groups, cols_out, bits)?;
    for v in &mut z {
        *v = (*v + 1) & maxq;
    }
    Ok(z)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn words(v: &[i32]) -> Vec<u32> {
        v.iter().map(|&w| w as u32).collect()
    }

    #[test]
    fn pack_4bit_by_hand() {
        // 2 outputs x 8 inputs: one word per output column, input 0 in the lowest nibble.
        let q: Vec<u8> = vec![1, 2, 3, 4, 5, 6, 7, 8, 15, 0, 0, 0, 0, 0, 0, 9];
        let p = pack_qweight(&q, 2, 8, 4).unwrap();
        assert_eq!(words(&p), vec![0x8765_4321, 0x9000_000F]);
        assert_eq!(unpack_qweight(&p, 2, 8, 4).unwrap(), q);
    }

    #[test]
    fn pack_qweight_is_input_major_with_outputs_fastest() {
        // 3 outputs x 32 inputs at 4 bits: 4 words per column; word r of column o at [r][o].
        let (rows, cols) = (3, 32);
        let q: Vec<u8> = (0..rows * cols)
            .map(|i| ((i / cols) * 5 + i % cols) as u8 % 16)
            .collect();
        let p = words(&pack_qweight(&q, rows, cols, 4).unwrap());
        assert_eq!(p.len(), 4 * 3);
        for r in 0..4 {
            for o in 0..rows {
                let mut w = 0u32;
                for j in 0..8 {
                    w |= (q[o * cols + r * 8 + j] as u32) << (4 * j);
                }
                assert_eq!(p[r * rows + o], w, "word {r} column {o}");
            }
        }
    }

    #[test]
    fn pack_2bit_and_8bit_by_hand() {
        // 16 inputs at 2 bits: value k at bits 2k.
        let q: Vec<u8> = vec![3, 0, 1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(
            words(&pack_qweight(&q, 1, 16, 2).unwrap()),
            vec![0x4000_0093]
        );
        let q: Vec<u8> = vec![0x12, 0x34, 0x56, 0xff];
        assert_eq!(
            words(&pack_qweight(&q, 1, 4, 8).unwrap()),
            vec![0xff56_3412]
        );
    }

    #[test]
    fn pack_3bit_by_hand() {
        // Values 0, 10 and 21 (the two that straddle words) and 31 set, the rest 0.
        let mut q = vec![0u8; 32];
        q[0] = 7;
        q[10] = 0b101;
        q[21] = 0b011;
        q[31] = 0b110;
        let p = words(&pack_qweight(&q, 1, 32, 3).unwrap());
        // word 0: value 0 at bits 0..3, low 2 bits of value 10 (0b01) at bits 30, 31.
        // word 1: high bit of value 10 (1) at bit 0, low bit of value 21 (1) at bit 31.
        // word 2: high 2 bits of value 21 (0b01) at bits 0, 1; value 31 at bits 29..32.
        assert_eq!(p, vec![0x4000_0007, 0x8000_0001, 0xC000_0001]);
        assert_eq!(
            unpack_qweight(&p.iter().map(|&w| w as i32).collect::<Vec<_>>(), 1, 32, 3).unwrap(),
            q
        );
    }

    /// AutoGPTQ's `QuantLinear.pack` 3-bit loop (qlinear_cuda_old.py), transcribed literally for
    /// one output column, as the independent source of the 3-bit layout.
    // Kept index-for-index like the Python so the transcription can be checked by eye.
    #[allow(clippy::needless_range_loop)]
    fn autogptq_pack_3bit(x: &[u32]) -> Vec<u32> {
        let mut qw = vec![0u32; x.len() / 32 * 3];
        let (mut i, mut row) = (0usize, 0usize);
        while row < qw.len() {
            for j in i..i + 10 {
                qw[row] |= x[j] << (3 * (j - i));
            }
            i += 10;
            qw[row] |= x[i] << 30;
            row += 1;
            qw[row] |= (x[i] >> 2) & 1;
            i += 1;
            for j in i..i + 10 {
                qw[row] |= x[j] << (3 * (j - i) + 1);
            }
            i += 10;
            qw[row] |= x[i] << 31;
            row += 1;
            qw[row] |= (x[i] >> 1) & 0x3;
            i += 1;
            for j in i..i + 10 {
                qw[row] |= x[j] << (3 * (j - i) + 2);
            }
            i += 10;
            row += 1;
        }
        qw
    }

    #[test]
    fn pack_3bit_matches_autogptq_loop() {
        let mut rng = Rng::new(3);
        let q: Vec<u8> = (0..96).map(|_| rng.below(8) as u8).collect();
        let p = words(&pack_qweight(&q, 1, 96, 3).unwrap());
        let x: Vec<u32> = q.iter().map(|&v| v as u32).collect();
        assert_eq!(p, autogptq_pack_3bit(&x));
    }

    #[test]
    fn qzeros_store_zero_minus_one_along_outputs() {
        // 1 group x 8 outputs at 4 bits: stored zero - 1; zero 0 stores 15.
        let z = vec![8, 1, 2, 3, 4, 5, 6, 0];
        let p = pack_qzeros(&z, 1, 8, 4).unwrap();
        assert_eq!(words(&p), vec![0xF543_2107]);
        assert_eq!(
            unpack_qzeros_stored(&p, 1, 8, 4).unwrap(),
            vec![7, 0, 1, 2, 3, 4, 5, 15]
        );
        assert_eq!(unpack_qzeros(&p, 1, 8, 4).unwrap(), z);
        // 2 groups x 16 outputs at 2 bits: [G, out*b/32] = [2, 1], group-major.
        let mut z = vec![1u32; 32];
        z[16] = 2;
        z[31] = 0;
        let p = words(&pack_qzeros(&z, 2, 16, 2).unwrap());
        assert_eq!(p, vec![0, 0xC000_0001]);
    }

    #[test]
    fn random_round_trips() {
        let mut rng = Rng::new(7);
        for &bits in &SUPPORTED_BITS {
            let maxq = (1u64 << bits) - 1;
            for &(rows, cols) in &[(96usize, 160usize), (32, 64), (64, 32), (128, 256)] {
                let q: Vec<u8> = (0..rows * cols)
                    .map(|_| rng.below(maxq + 1) as u8)
                    .collect();
                let p = pack_qweight(&q, rows, cols, bits).unwrap();
                assert_eq!(p.len(), cols * bits as usize / 32 * rows);
                assert_eq!(
                    unpack_qweight(&p, rows, cols, bits).unwrap(),
                    q,
                    "{bits} bits {rows}x{cols}"
                );
                let groups = 5;
                let z: Vec<u32> = (0..groups * rows)
                    .map(|_| rng.below(maxq + 1) as u32)
                    .collect();
                let pz = pack_qzeros(&z, groups, rows, bits).unwrap();
                assert_eq!(pz.len(), groups * rows * bits as usize / 32);
                assert_eq!(unpack_qzeros(&pz, groups, rows, bits).unwrap(), z);
            }
        }
    }

    #[test]
    fn clear_errors() {
        let e = pack_qweight(&[0; 32], 1, 32, 5).unwrap_err().to_string();
        assert!(e.contains("2, 3, 4 or 8 bits"), "{e}");
        let e = pack_qweight(&[0; 16], 1, 16, 3).unwrap_err().to_string();
        assert!(e.contains("not a multiple of 32"), "{e}");
        let e = pack_qweight(&[0; 12], 1, 12, 4).unwrap_err().to_string();
        assert!(e.contains("not a multiple of 8"), "{e}");
        let e = pack_qweight(&[16; 8], 1, 8, 4).unwrap_err().to_string();
        assert!(e.contains("does not fit in 4 bits"), "{e}");
        let e = pack_qzeros(&[0; 10], 1, 10, 8).unwrap_err().to_string();
        assert!(e.contains("output dim"), "{e}");
        assert!(pack_qzeros(&[4; 16], 1, 16, 2).is_err());
        assert!(unpack_qweight(&[0; 3], 1, 32, 4).is_err());
    }
}
