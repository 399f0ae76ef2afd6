//! Atomic output: everything a command writes goes into `<OUT>.partial-<pid>` next to OUT and is
//! renamed into place only when the whole output is complete. A failure (or a panic, or ^C before
//! the rename) leaves OUT as it was. Also the one safetensors writer (streamed, no whole-file copy).

use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Name of the marker file that says "wgpress wrote this directory", so a later run may replace it.
pub const MARKER: &str = "report.json";

/// A tensor to write: raw little-endian bytes in `dtype`'s layout.
#[derive(Clone)]
pub struct TensorOut {
    pub name: String,
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// An output directory under construction.
pub struct OutputDir {
    final_path: PathBuf,
    tmp_path: PathBuf,
    committed: bool,
}

impl OutputDir {
    /// Starts an output at `out`. Refuses an existing non-empty directory that wgpress did not write
    /// (it holds no `report.json` with `"tool": "wgpress"`), so user data is never replaced.
    pub fn create(out: &Path) -> Result<Self> {
        if out.exists() {
            if !out.is_dir() {
                return Err(Error::Output {
                    path: out.into(),
                    problem: "exists and is not a directory".into(),
                });
            }
            let non_empty = std::fs::read_dir(out)
                .map_err(|e| Error::io(out, e))?
                .next()
                .is_some();
            if non_empty && !written_by_wgpress(out) {
                return Err(Error::Output {
                    path: out.into(),
                    problem: "exists, is not empty and was not written by wgpress; choose another --out or remove it".into(),
                });
            }
        }
        let name = out
            .file_name()
            .ok_or_else(|| Error::Output {
                path: out.into(),
                problem: "has no directory name".into(),
            })?
            .to_string_lossy()
            .to_string();
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if let Some(file) = parent.ancestors().find(|a| a.is_file()) {
            return Err(Error::Output {
                path: out.into(),
                problem: format!("{} is a file, not a directory", file.display()),
            });
        }
        std::fs::create_dir_all(&parent).map_err(|e| Error::Output {
            path: out.into(),
            problem: format!("cannot create parent directory {}: {e}", parent.display()),
        })?;
        let tmp_path = parent.join(format!(".{name}.partial-{}", std::process::id()));
        if tmp_path.exists() {
            let _ = std::fs::remove_dir_all(&tmp_path);
        }
        std::fs::create_dir(&tmp_path).map_err(|e| Error::Output {
            path: out.into(),
            problem: format!("cannot write in {}: {e}", parent.display()),
        })?;
        Ok(OutputDir {
            final_path: out.to_path_buf(),
            tmp_path,
            committed: false,
        })
    }

    /// The temporary directory files are written into.
    pub fn path(&self) -> &Path {
        &self.tmp_path
    }

    pub fn final_path(&self) -> &Path {
        &self.final_path
    }

    pub fn write_file(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let p = self.tmp_path.join(name);
        std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))
    }

    pub fn write_json(&self, name: &str, value: &serde_json::Value) -> Result<()> {
        let s = serde_json::to_string_pretty(value)
            .map_err(|e| Error::format(self.tmp_path.join(name), e.to_string()))?;
        self.write_file(name, s.as_bytes())
    }

    pub fn copy_file(&self, src: &Path, name: &str) -> Result<()> {
        let dst = self.tmp_path.join(name);
        std::fs::copy(src, &dst).map_err(|e| Error::io(src, e))?;
        Ok(())
    }

    /// Writes a safetensors file (tensors in the order given; metadata as `__metadata__`).
    pub fn write_safetensors(
        &self,
        name: &str,
        tensors: &[TensorOut],
        metadata: &BTreeMap<String, String>,
    ) -> Result<()> {
        write_safetensors(&self.tmp_path.join(name), tensors, metadata)
    }

    /// Moves the finished output into place, replacing an earlier wgpress output at the same path.
    pub fn commit(mut self) -> Result<PathBuf> {
        let out = self.final_path.clone();
        let mut old = None;
        if out.exists() {
            let o = out.with_file_name(format!(
                ".{}.old-{}",
                out.file_name().unwrap_or_default().to_string_lossy(),
                std::process::id()
            ));
            std::fs::rename(&out, &o).map_err(|e| Error::io(&out, e))?;
            old = Some(o);
        }
        if let Err(e) = std::fs::rename(&self.tmp_path, &out) {
            if let Some(o) = &old {
                let _ = std::fs::rename(o, &out);
            }
            return Err(Error::io(&out, e));
        }
        self.committed = true;
        if let Some(o) = old {
            let _ = std::fs::remove_dir_all(o);
        }
        Ok(out)
    }
}

impl Drop for OutputDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp_path);
        }
    }
}

fn written_by_wgpress(dir: &Path) -> bool {
    std::fs::read(dir.join(MARKER))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| {
            v.get("tool")
                .and_then(|t| t.as_str())
                .map(|t| t == "wgpress")
        })
        .unwrap_or(false)
}

fn dtype_name(d: safetensors::Dtype) -> String {
    // safetensors' header names match the Debug names of its Dtype enum (F32, F16, BF16, I32, U8...).
    format!("{d:?}")
}

/// The safetensors header for tensors of (name, dtype, shape, byte length), laid out in that order,
/// padded with spaces so the data starts 8-byte aligned as the reference writer does; with its
/// 8-byte length prefix.
fn header_bytes(
    path: &Path,
    entries: &[(String, safetensors::Dtype, Vec<usize>, usize)],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).unwrap_or_default(),
        );
    }
    let mut off = 0usize;
    for (name, dtype, shape, len) in entries {
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": dtype_name(*dtype),
                "shape": shape,
                "data_offsets": [off, off + len],
            }),
        );
        off += len;
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header))
        .map_err(|e| Error::format(path, e.to_string()))?;
    while (h.len() + 8) % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    Ok(out)
}

/// The byte length `t`'s shape and dtype need, or the error naming the mismatch.
fn checked_len(path: &Path, t: &TensorOut) -> Result<usize> {
    let expect = t.shape.iter().product::<usize>() * t.dtype.bitsize() / 8;
    if expect != t.data.len() {
        return Err(Error::tensor(
            path,
            &t.name,
            format!(
                "data has {} bytes but shape {:?} {:?} needs {expect}",
                t.data.len(),
                t.shape,
                t.dtype
            ),
        ));
    }
    Ok(expect)
}

/// Writes a safetensors file to `path` when every tensor is at hand (header, then each tensor's
/// bytes).
pub fn write_safetensors(
    path: &Path,
    tensors: &[TensorOut],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut entries = Vec::with_capacity(tensors.len());
    for t in tensors {
        entries.push((
            t.name.clone(),
            t.dtype,
            t.shape.clone(),
            checked_len(path, t)?,
        ));
    }
    let h = header_bytes(path, &entries, metadata)?;
    let f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = std::io::BufWriter::new(f);
    let io = |e| Error::io(path, e);
    w.write_all(&h).map_err(io)?;
    for t in tensors {
        w.write_all(&t.data).map_err(io)?;
    }
    w.flush().map_err(io)?;
    Ok(())
}

/// A file whose header is known only after its data: the data goes to a body file next to it as
/// it is produced, and [`BodyFile::finish`] writes the header, appends the body with a file-to-file
/// copy and removes it. Lets an exporter hold one tensor instead of the whole model; the body
/// lives in the output's temporary directory, so a failed run leaves nothing behind.
///
/// With room reserved for the header ([`BodyFile::reserve`], before any data) the data goes
/// straight to the file after that room and a header of exactly that size is written in place:
/// the copy took 3 s of a 7B-shaped run (3.7 GB written twice). A header of another size falls
/// back to a copy into a new file.
pub struct BodyFile {
    path: PathBuf,
    body_path: PathBuf,
    body: std::io::BufWriter<std::fs::File>,
    len: u64,
    /// Bytes reserved for the header at the start of `path` (0: the body is in `body_path`).
    reserved: u64,
}

impl BodyFile {
    /// Starts file `name` of `out`.
    pub fn create(out: &OutputDir, name: &str) -> Result<Self> {
        let path = out.path().join(name);
        let body_path = out.path().join(format!("{name}.body"));
        let f = std::fs::File::create(&body_path).map_err(|e| Error::io(&body_path, e))?;
        Ok(BodyFile {
            path,
            body_path,
            body: std::io::BufWriter::with_capacity(1 << 20, f),
            len: 0,
            reserved: 0,
        })
    }

    /// Reserves `bytes` at the start of the file for the header (see [`BodyFile`]); only before
    /// any data was written.
    pub fn reserve(&mut self, bytes: u64) -> Result<()> {
        use std::io::{Seek, SeekFrom};
        if self.len != 0 || self.reserved != 0 {
            return Err(Error::invalid(format!(
                "{}: header room must be reserved before any data",
                self.path.display()
            )));
        }
        let mut f = std::fs::File::create(&self.path).map_err(|e| Error::io(&self.path, e))?;
        f.set_len(bytes).map_err(|e| Error::io(&self.path, e))?;
        f.seek(SeekFrom::Start(bytes))
            .map_err(|e| Error::io(&self.path, e))?;
        let old = std::mem::replace(
            &mut self.body,
            std::io::BufWriter::with_capacity(1 << 20, f),
        );
        drop(old);
        std::fs::remove_file(&self.body_path).map_err(|e| Error::io(&self.body_path, e))?;
        self.body_path = self.path.clone();
        self.reserved = bytes;
        Ok(())
    }

    /// Bytes reserved for the header (0 when none were).
    pub fn reserved(&self) -> u64 {
        self.reserved
    }

    /// The final file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Offset in the data of the next byte written (the bytes written so far).
    pub fn position(&self) -> u64 {
        self.len
    }

    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.body
            .write_all(bytes)
            .map_err(|e| Error::io(&self.body_path, e))?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Writes the file: `head`, then the data.
    pub fn finish(self, head: &[u8]) -> Result<()> {
        use std::io::{Seek, SeekFrom};
        let BodyFile {
            path,
            body_path,
            body,
            reserved,
            ..
        } = self;
        // Flushed to the OS (not to disk): the copy below reads it back through a new handle.
        let mut written = body
            .into_inner()
            .map_err(|e| Error::io(&body_path, e.into_error()))?;
        if reserved > 0 && head.len() as u64 == reserved {
            written
                .seek(SeekFrom::Start(0))
                .map_err(|e| Error::io(&path, e))?;
            return written.write_all(head).map_err(|e| Error::io(&path, e));
        }
        drop(written);
        // The header does not fill the room exactly (or none was reserved): header and data go
        // to a new file.
        let tmp = if reserved > 0 {
            path.with_extension("header")
        } else {
            path.clone()
        };
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(head).map_err(|e| Error::io(&tmp, e))?;
        let mut src = std::fs::File::open(&body_path).map_err(|e| Error::io(&body_path, e))?;
        src.seek(SeekFrom::Start(reserved))
            .map_err(|e| Error::io(&body_path, e))?;
        // File to file: std uses copy_file_range/sendfile where the OS has them.
        std::io::copy(&mut src, &mut f).map_err(|e| Error::io(&tmp, e))?;
        drop(src);
        if reserved > 0 {
            std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))
        } else {
            std::fs::remove_file(&body_path).map_err(|e| Error::io(&body_path, e))
        }
    }
}

/// A safetensors file written as its tensors arrive (a [`BodyFile`]; the header is written last),
/// for exporters that get a model tensor by tensor.
pub struct SafetensorsStream {
    file: BodyFile,
    entries: Vec<(String, safetensors::Dtype, Vec<usize>, usize)>,
}

impl SafetensorsStream {
    /// Starts file `name` of `out`.
    pub fn create(out: &OutputDir, name: &str) -> Result<Self> {
        Ok(SafetensorsStream {
            file: BodyFile::create(out, name)?,
            entries: Vec::new(),
        })
    }

    /// Appends `t` (its bytes are written now and dropped with `t`).
    pub fn add(&mut self, t: TensorOut) -> Result<()> {
        let len = checked_len(self.file.path(), &t)?;
        self.file.write(&t.data)?;
        self.entries.push((t.name, t.dtype, t.shape, len));
        Ok(())
    }

    /// Reserves header room for about `tensors` entries (before the first [`add`]), so the
    /// header is written in place instead of copying the data behind it (see [`BodyFile`]):
    /// 256 bytes per entry, plus 4 KiB. A header that outgrows it still works, by the copy.
    ///
    /// [`add`]: SafetensorsStream::add
    pub fn expect_tensors(&mut self, tensors: usize) -> Result<()> {
        self.file
            .reserve((4096 + 256 * tensors as u64).next_multiple_of(8))
    }

    /// Writes the file: header, then the tensors' bytes.
    pub fn finish(self, metadata: &BTreeMap<String, String>) -> Result<()> {
        let mut h = header_bytes(self.file.path(), &self.entries, metadata)?;
        let room = self.file.reserved() as usize;
        if h.len() < room {
            // The header JSON may end in spaces (the format's own padding): fill the room.
            h.resize(room, b' ');
            h[..8].copy_from_slice(&((room - 8) as u64).to_le_bytes());
        }
        self.file.finish(&h)
    }
}
