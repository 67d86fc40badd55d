//! Our CUDA kernels' own sources, run on the CPU for the tests: `emulator/harness.cpp` includes
//! the `.cu` files over `emulator/cuda_emu.h` (every GPU thread an OS thread, blocks one after
//! another, barriers for `__syncthreads` and the warp shuffles) and is built here with the host's
//! C++ compiler under AddressSanitizer, each buffer in an allocation of its exact size. The
//! tests below launch each kernel as its `cuda_fwd` does (the same [`Launch`]: grid, block,
//! scalars) and compare with the op's CPU side, which the ops' own tests hold to candle's ops.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::launch::Launch;

/// A run that takes longer has hung: some barrier is not reached by every thread.
const HANG: Duration = Duration::from_secs(300);

/// The harness, built once per test process.
fn harness() -> &'static PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/engine/gpu/emulator");
        let out =
            std::env::temp_dir().join(format!("smolchat-cuda-emulator-{}", std::process::id()));
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let built = Command::new(&cxx)
            .args(["-std=c++20", "-O1", "-g", "-pthread", "-mf16c"])
            .args(["-fsanitize=address,undefined", "-fno-sanitize-recover=all"])
            .args([
                "-Wall",
                "-Wno-unknown-pragmas",
                "-Wno-sign-compare",
                "-Werror",
            ])
            .arg(format!("-I{dir}"))
            .arg(format!("{dir}/harness.cpp"))
            .arg("-o")
            .arg(&out)
            .status()
            .unwrap_or_else(|e| panic!("cannot run the C++ compiler `{cxx}`: {e}"));
        assert!(built.success(), "the kernel emulator did not build");
        out
    })
}

/// Runs `launch` over `buffers` (in the kernel's parameter order) and gives back every buffer
/// as the kernel left it, or the harness's complaint (an AddressSanitizer report, say).
pub(super) fn run(launch: &Launch, buffers: &[Vec<u8>]) -> Result<Vec<Vec<u8>>, String> {
    let word = |w: u32| w.to_le_bytes();
    let mut input = Vec::new();
    input.extend(word(launch.kernel.len() as u32));
    input.extend(launch.kernel.as_bytes());
    input.extend(
        launch
            .grid
            .iter()
            .chain(&launch.block)
            .flat_map(|&d| word(d)),
    );
    input.extend(word(buffers.len() as u32));
    for b in buffers {
        input.extend(word(b.len() as u32));
        input.extend(b);
    }
    input.extend(word(launch.scalars.len() as u32));
    input.extend(launch.scalars.iter().flat_map(|s| word(s.bits())));

    let mut child = Command::new(harness())
        .env("ASAN_OPTIONS", "detect_leaks=0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the kernel emulator starts");
    let mut stdin = child.stdin.take().expect("piped");
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let (mut stdout, mut stderr) = (
        child.stdout.take().expect("piped"),
        child.stderr.take().expect("piped"),
    );
    // Each pipe drained by a thread of its own, so that a long report on one cannot block
    // the harness while the other is read.
    let out_reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out);
        out
    });
    let err_reader = std::thread::spawn(move || {
        let mut err = String::new();
        let _ = stderr.read_to_string(&mut err);
        err
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting on the emulator") {
            break s;
        }
        if start.elapsed() > HANG {
            let _ = child.kill();
            panic!(
                "`{}` hung in the emulator: a barrier not every thread reaches",
                launch.kernel
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let _ = writer.join();
    let (out, err) = (
        out_reader.join().expect("stdout reader"),
        err_reader.join().expect("stderr reader"),
    );
    if !status.success() {
        return Err(err);
    }
    let mut rest = out.as_slice();
    Ok(buffers
        .iter()
        .map(|b| {
            let (this, tail) = rest.split_at(b.len());
            rest = tail;
            this.to_vec()
        })
        .collect())
}

/// A buffer's bytes as the kernels read them: `le(v)` is the element type's `to_le_bytes`.
fn bytes<T: Copy, const N: usize>(v: &[T], le: fn(T) -> [u8; N]) -> Vec<u8> {
    v.iter().flat_map(|&x| le(x)).collect()
}

pub(super) fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

mod tests {
    use candle_core::{Device, Tensor};
    use half::f16;

    use super::super::decode_attention::{DecodeLaunch, PagedDecode};
    use super::super::kv_write::KvWrite;
    use super::super::rope::{test_tables, RopeRows};
    use super::super::test_values as values;
    use super::*;
    use crate::engine::kv::BLOCK_LEN;

    /// The f16 values of `v`, as a slab would hold them.
    fn halves(v: &[f32]) -> Vec<f16> {
        v.iter().map(|&x| f16::from_f32(x)).collect()
    }

    #[test]
    fn the_decode_attention_kernel_matches_its_cpu_side() {
        let dev = Device::Cpu;
        // (head size, KV heads, group): SmolLM2-135M's, SmolLM3-3B's, the widest group, the
        // smallest head, and a head size that is not a multiple of the warp.
        for (case, &(hd, nkv, group)) in
            [(64, 3, 3), (128, 4, 4), (32, 1, 8), (16, 2, 1), (80, 2, 2)]
                .iter()
                .enumerate()
        {
            let blocks = 9;
            let slab_rows = blocks * nkv * BLOCK_LEN;
            let (k, v) = (
                halves(&values(slab_rows * hd, 10 + case as u32)),
                halves(&values(slab_rows * hd, 20 + case as u32)),
            );
            // Empty, one position, a block less one, exactly one, one more, and several blocks
            // out of order (the warps see different numbers of positions).
            let ids: [&[u32]; 6] = [&[], &[3], &[8], &[0], &[5, 1], &[7, 2, 6, 4]];
            let lens = [0usize, 1, 31, 32, 33, 100];
            let caches: Vec<(usize, &[u32])> = lens.iter().copied().zip(ids).collect();
            let table = PagedDecode::table(&caches, blocks, &dev).unwrap();
            let b = caches.len();
            let width = nkv * group * hd;
            // Queries as a column range of a wider projection (strided rows, an offset).
            let wide = values(b * (width + 8), 30 + case as u32);
            let q = Tensor::from_vec(wide.clone(), (b, width + 8), &dev)
                .unwrap()
                .narrow(1, 8, width)
                .unwrap();
            let op = PagedDecode {
                table: &table,
                n_kv: nkv,
                group,
                head_dim: hd,
                scale: 1.0 / (hd as f32).sqrt(),
            };
            let slab = |s: &[f16]| Tensor::from_vec(s.to_vec(), (slab_rows, hd), &dev).unwrap();
            let want = q
                .apply_op3_no_bwd(&slab(&k), &slab(&v), &op)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();

            let table = table.flatten_all().unwrap().to_vec1::<u32>().unwrap();
            // One split (what the launch chooses for caches this short); splits at block
            // boundaries (4 of them, the last ones past most caches' ends); splits that cut
            // blocks.
            assert_eq!(op.chunk(b).unwrap(), None, "{hd}/{nkv}/{group}");
            for chunk in [None, Some(32), Some(40)] {
                let launch = op.launch(b, width + 8, chunk).unwrap();
                assert_eq!(launch.merge.is_some(), chunk.is_some());
                let buffers = [
                    bytes(&wide[8..], f32::to_le_bytes), // the GPU path passes the queries from their offset
                    bytes(&k, f16::to_le_bytes),
                    bytes(&v, f16::to_le_bytes),
                    bytes(&table, u32::to_le_bytes),
                    vec![0; 4 * b * width],
                ];
                let got = decode(&launch, buffers)
                    .unwrap_or_else(|e| panic!("{hd}/{nkv}/{group}, chunk {chunk:?}: {e}"));
                assert_eq!(got.len(), want.len());
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-5 + 1e-5 * w.abs(),
                        "heads of {hd} × {nkv} × {group}, chunk {chunk:?}, row {} value {}: \
                         kernel {g}, CPU side {w}",
                        i / width,
                        i % width
                    );
                }
                assert!(
                    got[..width].iter().all(|&x| x == 0.0),
                    "an empty cache gives zeros"
                );
                assert!(got[width..].iter().any(|&x| x != 0.0));
            }
        }
    }

    /// Runs a paged decode's launches over its first five buffers (queries, slabs, table,
    /// output), with room for the partial sums; gives the output.
    fn decode(launch: &DecodeLaunch, buffers: [Vec<u8>; 5]) -> Result<Vec<f32>, String> {
        let [q, k, v, table, out] = buffers;
        let part = vec![0; 4 * launch.partials.max(1)];
        let mut done = run(&launch.attention, &[q, k, v, table, out, part])?;
        if let Some(merge) = &launch.merge {
            let (part, out) = (done.swap_remove(5), done.swap_remove(4));
            done = run(merge, &[part, out])?;
            return Ok(f32s(&done[1]));
        }
        Ok(f32s(&done[4]))
    }

    #[test]
    fn long_caches_of_few_rows_are_split_among_enough_blocks() {
        let dev = Device::Cpu;
        let table = |len: usize, rows: usize| {
            let ids: Vec<u32> = (0..len.div_ceil(BLOCK_LEN) as u32).collect();
            let caches: Vec<(usize, &[u32])> = (0..rows).map(|_| (len, &ids[..])).collect();
            PagedDecode::table(&caches, 1 << 12, &dev).unwrap()
        };
        let chunk = |len, rows| {
            let t = table(len, rows);
            let op = PagedDecode {
                table: &t,
                n_kv: 4,
                group: 4,
                head_dim: 128,
                scale: 1.0,
            };
            op.chunk(rows).unwrap()
        };
        // SmolLM3's 4 KV heads: one stream at 4,096 positions takes 32 splits of 128.
        assert_eq!(chunk(4096, 1), Some(128));
        // 8 streams: 32 blocks, split 8 ways.
        assert_eq!(chunk(4096, 8), Some(512));
        // 64 streams fill the GPU without splits; so does a short cache.
        assert_eq!(chunk(4096, 64), None);
        assert_eq!(chunk(100, 1), None);
    }

    #[test]
    fn the_emulator_catches_a_read_outside_the_slabs() {
        let dev = Device::Cpu;
        let (hd, nkv, group, blocks) = (64, 3, 3, 2);
        let slab_rows = blocks * nkv * BLOCK_LEN;
        // The host check refuses block 2 of 2 slabs' worth; the kernel is given it anyway.
        let table = PagedDecode::table(&[(5, &[2])], blocks + 1, &dev).unwrap();
        let op = PagedDecode {
            table: &table,
            n_kv: nkv,
            group,
            head_dim: hd,
            scale: 0.125,
        };
        let width = nkv * group * hd;
        let buffers = [
            bytes(&values(width, 1), f32::to_le_bytes),
            vec![0; 2 * slab_rows * hd],
            vec![0; 2 * slab_rows * hd],
            bytes(
                &table.flatten_all().unwrap().to_vec1::<u32>().unwrap(),
                u32::to_le_bytes,
            ),
            vec![0; 4 * width],
        ];
        let err = decode(&op.launch(1, width, None).unwrap(), buffers).unwrap_err();
        assert!(err.contains("AddressSanitizer"), "{err}");
    }

    #[test]
    fn the_kv_write_kernel_writes_the_bytes_of_its_cpu_side() {
        let dev = Device::Cpu;
        let (n_kv, hd, t, slab_rows) = (3, 64, 5, 40);
        // K's columns of a fused projection: 5 tokens × (16 other columns, 3 heads × 64, 8 more).
        let stride = 16 + n_kv * hd + 8;
        let fused = values(t * stride, 7);
        let src = Tensor::from_vec(fused.clone(), (t, stride), &dev)
            .unwrap()
            .narrow(1, 16, n_kv * hd)
            .unwrap();
        let rows: Vec<u32> = (0..(t * n_kv) as u32).map(|r| (r * 7 + 3) % 40).collect();
        let rows_t = Tensor::from_vec(rows.clone(), rows.len(), &dev).unwrap();
        let before = halves(&values(slab_rows * hd, 8));
        let (cos, sin) = (test_tables(t, hd, f32::cos), test_tables(t, hd, f32::sin));
        for rope in [None, Some((&cos, &sin))] {
            let op = KvWrite {
                n_kv,
                head_dim: hd,
                rope,
            };
            let slab = Tensor::from_vec(before.clone(), (slab_rows, hd), &dev).unwrap();
            slab.inplace_op3(&src, &rows_t, &op).unwrap();
            let want = slab.flatten_all().unwrap().to_vec1::<f16>().unwrap();

            let table = |x: &Tensor| x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let (c, s) = match rope {
                Some((c, s)) => (
                    bytes(&table(c), f32::to_le_bytes),
                    bytes(&table(s), f32::to_le_bytes),
                ),
                None => (Vec::new(), Vec::new()), // not read: the GPU path passes the source
            };
            let buffers = [
                bytes(&fused[16..], f32::to_le_bytes),
                bytes(&rows, u32::to_le_bytes),
                bytes(&before, f16::to_le_bytes),
                c,
                s,
            ];
            let out = run(&op.launch(rows.len(), stride).unwrap(), &buffers).unwrap();
            assert_eq!(
                out[2],
                bytes(&want, f16::to_le_bytes),
                "rope: {}",
                rope.is_some()
            );
            assert_ne!(out[2], bytes(&before, f16::to_le_bytes));
        }
    }

    #[test]
    fn the_rope_kernel_gives_the_values_of_its_cpu_side() {
        let dev = Device::Cpu;
        let (t, heads, hd) = (7, 9, 64);
        let stride = heads * hd + 2 * 3 * hd; // the queries, then K and V of a fused projection
        let fused = values(t * stride, 11);
        let src = Tensor::from_vec(fused.clone(), (t, stride), &dev)
            .unwrap()
            .narrow(1, 0, heads * hd)
            .unwrap();
        let (cos, sin) = (test_tables(t, hd, f32::cos), test_tables(t, hd, f32::sin));
        let op = RopeRows {
            heads,
            head_dim: hd,
        };
        let want = src
            .apply_op3_no_bwd(&cos, &sin, &op)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let table = |x: &Tensor| {
            bytes(
                &x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                f32::to_le_bytes,
            )
        };
        let buffers = [
            bytes(&fused, f32::to_le_bytes),
            table(&cos),
            table(&sin),
            vec![0; 4 * t * heads * hd],
        ];
        let out = run(&op.launch(t, stride).unwrap(), &buffers).unwrap();
        assert_eq!(f32s(&out[3]), want);
    }
}
