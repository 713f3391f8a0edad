//! Backing stores behind one trait: a file or block device, memory, and a fault-injecting wrapper.
//!
//! Contract (all offsets and lengths in bytes, callers keep them inside `size_bytes()`):
//! * `read_at` fills the whole buffer or fails; holes read as zeroes.
//! * `write_at` writes the whole buffer or fails; data may sit in a volatile cache until `flush`.
//! * `flush` makes every completed write durable (fsync/fdatasync).
//! * `punch_hole` deallocates a range where the store can (reads then return zeroes); a store that
//!   cannot deallocate writes zeroes instead.
//! * `is_mapped` tells, for GET LBA STATUS, whether `offset` is in allocated space and how long
//!   the run of the same kind is.
//!
//! Errors are `std::io::Error`: the logical unit turns them into MEDIUM ERROR / HARDWARE ERROR
//! sense and never hides them.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// A logical unit's storage. See the module documentation for the contract.
/// The error a store returns when it lost the right to serve the command (a replicated volume
/// whose leadership moved while the command ran). It is not a medium error: the caller turns
/// the command into UNIT ATTENTION, and it is logged as an ordinary event.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Fenced(pub String);

impl Fenced {
    pub fn into_io(self) -> io::Error {
        io::Error::other(self)
    }

    /// Whether `e` is a [`Fenced`] error.
    pub fn is(e: &io::Error) -> bool {
        e.get_ref().is_some_and(|inner| inner.is::<Fenced>())
    }
}

pub trait BackingStore: Send + Sync {
    fn size_bytes(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Writes `bufs` one after the other from `offset`, as one write where the store can (a
    /// file: one `pwritev`, so the page cache takes the run in large folios instead of one call
    /// per buffer). All of it is written, or `Err`.
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        let mut at = offset;
        for b in bufs {
            self.write_at(b, at)?;
            at += b.len() as u64;
        }
        Ok(())
    }
    fn flush(&self) -> io::Result<()>;
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// `(mapped, run_len)`: whether `offset` is allocated and how many bytes from `offset` (at
    /// most `len`) share that state.
    fn is_mapped(&self, offset: u64, len: u64) -> io::Result<(bool, u64)>;
    /// For `raftsan show`: what this store is.
    fn describe(&self) -> String;
}

/// `pwritev(2)` of all of `bufs` at `offset`, resumed after short writes and EINTR (at most
/// `IOV_MAX` buffers per call).
fn pwritev_all(file: &std::fs::File, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    const IOV_MAX: usize = 1024;
    let mut idx = 0; // first buffer not fully written
    let mut skip = 0; // bytes of bufs[idx] already written
    let mut at = offset;
    loop {
        // Skip what is written (and empty buffers); done when nothing is left.
        while idx < bufs.len() && bufs[idx].len() == skip {
            idx += 1;
            skip = 0;
        }
        if idx == bufs.len() {
            return Ok(());
        }
        let iov: Vec<libc::iovec> = bufs[idx..]
            .iter()
            .take(IOV_MAX)
            .enumerate()
            .map(|(i, b)| {
                let b = if i == 0 { &b[skip..] } else { b };
                libc::iovec {
                    iov_base: b.as_ptr() as *mut libc::c_void,
                    iov_len: b.len(),
                }
            })
            .collect();
        let off = libc::off_t::try_from(at).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: every iovec points into a live slice of `bufs` for the duration of the call,
        // and pwritev only reads from them.
        let n = unsafe { libc::pwritev(file.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int, off) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        let mut n = n as usize;
        at += n as u64;
        while n > 0 {
            let left = bufs[idx].len() - skip;
            if n >= left {
                n -= left;
                idx += 1;
                skip = 0;
            } else {
                skip += n;
                n = 0;
            }
        }
    }
}

/// Writes zeroes over a range in bounded chunks (the fallback of `punch_hole`).
fn write_zeroes(store: &dyn Fn(&[u8], u64) -> io::Result<()>, offset: u64, len: u64) -> io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeroes = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done) as usize;
        store(&zeroes[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// A regular file or a block device.
pub struct FileStore {
    file: File,
    path: PathBuf,
    /// Read once at open; [`FileStore::refresh_size`] re-reads it after the file grew.
    size_bytes: AtomicU64,
    block_device: bool,
    /// Cleared after the first `EOPNOTSUPP` from fallocate: zeroes are written from then on.
    can_punch: AtomicBool,
}

impl FileStore {
    /// Opens `path` read-write (read-only when `read_only`). The size is the file's length or, for
    /// a block device, its capacity.
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        let mut file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let meta = file.metadata()?;
        let block_device = meta.file_type().is_block_device();
        let size_bytes = if block_device {
            file.seek(SeekFrom::End(0))?
        } else {
            meta.len()
        };
        Ok(FileStore {
            file,
            path: path.to_path_buf(),
            size_bytes: AtomicU64::new(size_bytes),
            block_device,
            can_punch: AtomicBool::new(true),
        })
    }
}

impl FileStore {
    /// Re-reads the size of the file or device (after it was extended by someone else) and
    /// returns it.
    pub fn refresh_size(&self) -> io::Result<u64> {
        let size = if self.block_device {
            (&self.file).seek(SeekFrom::End(0))?
        } else {
            self.file.metadata()?.len()
        };
        self.size_bytes.store(size, Ordering::Release);
        Ok(size)
    }

    /// Sets a regular file's length (growing it sparsely or truncating it).
    pub fn set_len(&self, size_bytes: u64) -> io::Result<()> {
        if self.block_device {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("{} is a block device: its size cannot be set", self.path.display()),
            ));
        }
        self.file.set_len(size_bytes)?;
        self.size_bytes.store(size_bytes, Ordering::Release);
        Ok(())
    }
}

impl BackingStore for FileStore {
    fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::Acquire)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        pwritev_all(&self.file, bufs, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        // Block devices support PUNCH_HOLE too (Linux ≥ 4.9: discard or write-zeroes underneath).
        if self.can_punch.load(Ordering::Relaxed) {
            let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "range beyond off_t"));
            };
            // SAFETY: fallocate on an fd we own, with plain integer arguments.
            let rc = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off,
                    l,
                )
            };
            if rc == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => self.can_punch.store(false, Ordering::Relaxed),
                // A range the device cannot punch (alignment): write zeroes this time.
                Some(libc::EINVAL) => {}
                _ => return Err(err),
            }
        }
        write_zeroes(&|b, o| self.write_at(b, o), offset, len)
    }

    fn is_mapped(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        if self.block_device {
            return Ok((true, len));
        }
        let fd = self.file.as_raw_fd();
        let Ok(off) = libc::off_t::try_from(offset) else {
            return Ok((true, len));
        };
        // SAFETY: lseek on an fd we own; SEEK_DATA/SEEK_HOLE do not touch memory.
        let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if data < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                // No data from `offset` to the end: all hole.
                Some(libc::ENXIO) => Ok((false, len)),
                // The file system cannot tell: report mapped.
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok((true, len)),
                _ => Err(err),
            };
        }
        let data = data as u64;
        if data > offset {
            return Ok((false, (data - offset).min(len)));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, off, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((true, (hole as u64).saturating_sub(offset).clamp(1, len.max(1)).min(len)))
    }

    fn describe(&self) -> String {
        let kind = if self.block_device { "block device" } else { "file" };
        format!("{kind} {}", self.path.display())
    }
}

/// Memory, with hole tracking at `granularity` (the block size): a punched range reads as zeroes
/// and reports deallocated.
pub struct MemStore {
    data: RwLock<Vec<u8>>,
    /// One flag per granule: allocated.
    mapped: RwLock<Vec<bool>>,
    granularity: u64,
}

impl MemStore {
    pub fn new(size_bytes: u64) -> Self {
        Self::with_granularity(size_bytes, 512)
    }

    pub fn with_granularity(size_bytes: u64, granularity: u64) -> Self {
        let granularity = granularity.max(1);
        let granules = size_bytes.div_ceil(granularity) as usize;
        MemStore {
            data: RwLock::new(vec![0; size_bytes as usize]),
            mapped: RwLock::new(vec![false; granules]),
            granularity,
        }
    }

    /// Grows (with zeroes, deallocated) or shrinks the store.
    pub fn resize(&self, size_bytes: u64) -> io::Result<()> {
        let mut d = self.data.write().map_err(|_| io::Error::other("poisoned"))?;
        let mut m = self.mapped.write().map_err(|_| io::Error::other("poisoned"))?;
        d.resize(size_bytes as usize, 0);
        m.resize(size_bytes.div_ceil(self.granularity) as usize, false);
        Ok(())
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<(usize, usize)> {
        let size = self.size_bytes();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok((offset as usize, end as usize)),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "range beyond the end of the store",
            )),
        }
    }
}

impl BackingStore for MemStore {
    fn size_bytes(&self) -> u64 {
        self.data.read().map(|d| d.len() as u64).unwrap_or(0)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let (a, b) = self.check(offset, buf.len() as u64)?;
        let d = self.data.read().map_err(|_| io::Error::other("poisoned"))?;
        buf.copy_from_slice(&d[a..b]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let (a, b) = self.check(offset, buf.len() as u64)?;
        let mut d = self.data.write().map_err(|_| io::Error::other("poisoned"))?;
        d[a..b].copy_from_slice(buf);
        if b > a {
            let mut m = self.mapped.write().map_err(|_| io::Error::other("poisoned"))?;
            let g = self.granularity as usize;
            m[a / g..b.div_ceil(g)].fill(true);
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let (a, b) = self.check(offset, len)?;
        let mut d = self.data.write().map_err(|_| io::Error::other("poisoned"))?;
        d[a..b].fill(0);
        // Only whole granules become holes (like a file system's blocks).
        let g = self.granularity as usize;
        let (first, last) = (a.div_ceil(g), b / g);
        if first < last {
            let mut m = self.mapped.write().map_err(|_| io::Error::other("poisoned"))?;
            m[first..last].fill(false);
        }
        Ok(())
    }

    fn is_mapped(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        let (a, b) = self.check(offset, len)?;
        if a == b {
            return Ok((true, 0));
        }
        let m = self.mapped.read().map_err(|_| io::Error::other("poisoned"))?;
        let g = self.granularity as usize;
        let state = m[a / g];
        let mut end = (a / g + 1) * g;
        while end < b && m[end / g] == state {
            end += g;
        }
        Ok((state, (end.min(b) - a) as u64))
    }

    fn describe(&self) -> String {
        format!("memory ({} bytes)", self.size_bytes())
    }
}

/// Which operation a fault applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOp {
    Read,
    Write,
    Flush,
}

impl FaultOp {
    pub fn label(self) -> &'static str {
        match self {
            FaultOp::Read => "read",
            FaultOp::Write => "write",
            FaultOp::Flush => "flush",
        }
    }
}

/// A programmed fault: fail `op` after `after_ops` more successful operations of that kind
/// (counted from when it was armed), optionally only when the I/O overlaps `range` (byte
/// offsets, end exclusive).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    pub op: FaultOp,
    pub after_ops: u64,
    pub range: Option<(u64, u64)>,
    /// The errno to fail with (e.g. `libc::EIO`, `libc::ENOSPC`).
    pub errno: i32,
}

/// An armed fault and the matching operations it let through so far.
struct Armed {
    fault: Fault,
    passed: u64,
}

/// Faults armed and cleared at run time through a shared handle: the switch behind
/// [`FaultyStore`] and the Raft log's fault hooks (the node's testing-only fault injection).
/// While nothing is armed a [`FaultSwitch::check`] costs one relaxed atomic load. Armed faults
/// stay armed until [`FaultSwitch::clear`]: every matching operation past the countdown fails.
#[derive(Default)]
pub struct FaultSwitch {
    armed: AtomicBool,
    faults: Mutex<Vec<Armed>>,
}

impl std::fmt::Debug for FaultSwitch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultSwitch").field("armed", &self.armed()).finish()
    }
}

impl FaultSwitch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn inject(&self, fault: Fault) {
        let mut f = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        f.push(Armed { fault, passed: 0 });
        self.armed.store(true, Ordering::Relaxed);
    }

    pub fn clear(&self) {
        let mut f = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        f.clear();
        self.armed.store(false, Ordering::Relaxed);
    }

    /// The faults armed now.
    pub fn armed(&self) -> Vec<Fault> {
        let f = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        f.iter().map(|a| a.fault.clone()).collect()
    }

    /// `Err` with the fault's errno when an armed fault fails this operation.
    #[inline]
    pub fn check(&self, op: FaultOp, offset: u64, len: u64) -> io::Result<()> {
        if !self.armed.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.check_armed(op, offset, len)
    }

    #[cold]
    fn check_armed(&self, op: FaultOp, offset: u64, len: u64) -> io::Result<()> {
        let mut faults = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        let mut result = Ok(());
        for a in faults.iter_mut().filter(|a| a.fault.op == op) {
            let overlaps = match a.fault.range {
                None => true,
                Some((lo, hi)) => offset < hi && offset.saturating_add(len.max(1)) > lo,
            };
            if !overlaps {
                continue;
            }
            if a.passed >= a.fault.after_ops {
                if result.is_ok() {
                    result = Err(io::Error::from_raw_os_error(a.fault.errno));
                }
            } else {
                a.passed += 1;
            }
        }
        result
    }
}

/// Wraps a store and fails chosen operations (unit tests, and the node's image under the
/// testing-only fault injection). Faults stay armed until [`FaultyStore::clear`].
pub struct FaultyStore<S> {
    inner: S,
    switch: Arc<FaultSwitch>,
}

impl<S: BackingStore> FaultyStore<S> {
    pub fn new(inner: S) -> Self {
        Self::with_switch(inner, Arc::new(FaultSwitch::new()))
    }

    /// A store whose faults are armed through `switch` (shared with whoever injects them).
    pub fn with_switch(inner: S, switch: Arc<FaultSwitch>) -> Self {
        FaultyStore { inner, switch }
    }

    pub fn inject(&self, fault: Fault) {
        self.switch.inject(fault);
    }

    pub fn clear(&self) {
        self.switch.clear();
    }

    pub fn switch(&self) -> &Arc<FaultSwitch> {
        &self.switch
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }
}

impl<S: BackingStore> BackingStore for FaultyStore<S> {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.switch.check(FaultOp::Read, offset, buf.len() as u64)?;
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.switch.check(FaultOp::Write, offset, buf.len() as u64)?;
        self.inner.write_at(buf, offset)
    }

    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        self.switch.check(FaultOp::Write, offset, len as u64)?;
        self.inner.write_vectored_at(bufs, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.switch.check(FaultOp::Flush, 0, 0)?;
        self.inner.flush()
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.switch.check(FaultOp::Write, offset, len)?;
        self.inner.punch_hole(offset, len)
    }

    fn is_mapped(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        self.inner.is_mapped(offset, len)
    }

    fn describe(&self) -> String {
        format!("faulty {}", self.inner.describe())
    }
}

impl<T: BackingStore + ?Sized> BackingStore for std::sync::Arc<T> {
    fn size_bytes(&self) -> u64 {
        (**self).size_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        (**self).write_vectored_at(bufs, offset)
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).punch_hole(offset, len)
    }
    fn is_mapped(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        (**self).is_mapped(offset, len)
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_store_round_trip_and_hole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lu.img");
        let f = File::create(&path).unwrap();
        f.set_len(1 << 20).unwrap();
        drop(f);
        let s = FileStore::open(&path, false).unwrap();
        assert_eq!(s.size_bytes(), 1 << 20);
        s.write_at(&[7u8; 65536], 0).unwrap();
        let mut b = [0u8; 4];
        s.read_at(&mut b, 65532).unwrap();
        assert_eq!(b, [7; 4]);
        assert!(s.is_mapped(0, 4096).unwrap().0);
        s.punch_hole(0, 65536).unwrap();
        s.read_at(&mut b, 100).unwrap();
        assert_eq!(b, [0; 4]);
        // Holes only where the file system supports them (tmpfs, ext4, xfs, btrfs do).
        let (mapped, run) = s.is_mapped(0, 65536).unwrap();
        if !mapped {
            assert_eq!(run, 65536);
        }
        assert!(FileStore::open(&path, true).unwrap().write_at(&[1], 0).is_err());
    }

    #[test]
    fn vectored_writes_land_in_order_like_single_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lu.img");
        File::create(&path).unwrap().set_len(4 << 20).unwrap();
        let file = FileStore::open(&path, false).unwrap();
        let mem = MemStore::with_granularity(4 << 20, 512);
        // More buffers than one pwritev takes (IOV_MAX), some empty, odd sizes, odd offset.
        let bufs: Vec<Vec<u8>> = (0..2500usize)
            .map(|i| (0..(i * 7919) % 1301).map(|j| (i * 31 + j) as u8).collect())
            .collect();
        let slices: Vec<&[u8]> = bufs.iter().map(Vec::as_slice).collect();
        let total: usize = slices.iter().map(|b| b.len()).sum();
        assert!(total < (4 << 20) - 4099);
        file.write_vectored_at(&slices, 4099).unwrap();
        mem.write_vectored_at(&slices, 4099).unwrap();
        let mut got = vec![0u8; total];
        file.read_at(&mut got, 4099).unwrap();
        assert_eq!(got, slices.concat(), "pwritev path");
        let mut got_mem = vec![0u8; total];
        mem.read_at(&mut got_mem, 4099).unwrap();
        assert_eq!(got_mem, got, "default (one write per buffer) path");
        let mut before = [9u8; 1];
        file.read_at(&mut before, 4098).unwrap();
        assert_eq!(before, [0], "nothing written before the offset");
        file.write_vectored_at(&[], 0).unwrap();
        file.write_vectored_at(&[&[], &[]], 0).unwrap();
        // A faulty store refuses the whole range before writing any of it.
        let faulty = FaultyStore::new(file);
        let last = 4099 + total as u64 - 1;
        faulty.switch().inject(Fault {
            op: FaultOp::Write,
            after_ops: 0,
            range: Some((last, last + 1)),
            errno: libc::EIO,
        });
        let ones = [1u8; 8];
        assert!(faulty.write_vectored_at(&[&ones, &ones], last - 15).is_err());
        let mut tail = [0u8; 16];
        faulty.inner().read_at(&mut tail, last - 15).unwrap();
        assert_eq!(tail[..], got[total - 16..], "a refused vectored write writes nothing");
    }

    #[test]
    fn mem_store_tracks_holes() {
        let s = MemStore::with_granularity(8192, 512);
        assert_eq!(s.is_mapped(0, 8192).unwrap(), (false, 8192));
        s.write_at(&[1; 1024], 1024).unwrap();
        assert_eq!(s.is_mapped(0, 8192).unwrap(), (false, 1024));
        assert_eq!(s.is_mapped(1024, 7168).unwrap(), (true, 1024));
        s.punch_hole(1024, 512).unwrap();
        assert_eq!(s.is_mapped(1024, 7168).unwrap(), (false, 512));
        assert!(s.read_at(&mut [0; 2], 8191).is_err());
    }

    #[test]
    fn faulty_store_fails_on_schedule() {
        let s = FaultyStore::new(MemStore::new(4096));
        s.inject(Fault {
            op: FaultOp::Write,
            after_ops: 1,
            range: None,
            errno: libc::EIO,
        });
        s.write_at(&[1], 0).unwrap();
        assert_eq!(s.write_at(&[1], 0).unwrap_err().raw_os_error(), Some(libc::EIO));
        s.inject(Fault {
            op: FaultOp::Read,
            after_ops: 0,
            range: Some((1024, 2048)),
            errno: libc::EIO,
        });
        s.read_at(&mut [0; 10], 0).unwrap();
        assert!(s.read_at(&mut [0; 10], 1020).is_err());
        s.clear();
        s.read_at(&mut [0; 10], 1020).unwrap();
    }

    #[test]
    fn fault_switch_counts_from_arming_and_uses_the_errno() {
        let switch = Arc::new(FaultSwitch::new());
        let s = FaultyStore::with_switch(MemStore::new(4096), switch.clone());
        for _ in 0..5 {
            s.write_at(&[1], 0).unwrap();
        }
        switch.inject(Fault {
            op: FaultOp::Flush,
            after_ops: 2,
            range: None,
            errno: libc::ENOSPC,
        });
        s.flush().unwrap();
        s.write_at(&[1], 0).unwrap();
        s.flush().unwrap();
        assert_eq!(s.flush().unwrap_err().raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(s.flush().unwrap_err().raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(switch.armed().len(), 1);
        switch.clear();
        s.flush().unwrap();
        assert!(switch.armed().is_empty());
    }
}
