//! A multipath logical unit as a block device: byte offsets in, SCSI commands out.
//!
//! [`Volume::open`] waits for a usable path, then reads the capacity and the limits (Block Limits
//! and Logical Block Provisioning VPD pages) through the multipath layer. Reads and writes are
//! split at the LU's maximum transfer length; FLUSH is SYNCHRONIZE CACHE, TRIM is UNMAP when the
//! LU supports it (a no-op otherwise: trimming is a hint), WRITE ZEROES is WRITE SAME of a zero
//! block (plain zero writes when the LU refuses WRITE SAME).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tracing::{info, warn};

use crate::multipath::{Connector, Multipath, MultipathError, Reply, Request};
use crate::nbd::{BlockDevice, DeviceError};
use crate::scsi::{self, BlockLimits, Capacity, Provisioning, Sense, key, status};

/// The largest single SCSI transfer this layer sends (smaller when the LU says so).
const MAX_CHUNK_BYTES: u64 = 8 << 20;

/// Why a block operation failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum VolumeError {
    #[error(transparent)]
    Path(#[from] MultipathError),
    #[error("the target answered {what}: {detail}")]
    Scsi {
        what: &'static str,
        detail: String,
        sense_key: Option<u8>,
    },
    #[error("{0}")]
    Invalid(String),
}

impl VolumeError {
    fn from_reply(what: &'static str, reply: Reply) -> VolumeError {
        let sense_key = reply.sense().map(|s: Sense| s.code.key);
        let detail = match reply.good() {
            Ok(_) => "GOOD".into(),
            Err(e) => e,
        };
        VolumeError::Scsi {
            what,
            detail,
            sense_key,
        }
    }
}

/// A logical unit reached through a [`Multipath`].
pub struct Volume<C: Connector> {
    mp: Multipath<C>,
    lun: u64,
    capacity: Capacity,
    limits: BlockLimits,
    provisioning: Provisioning,
    write_same: AtomicBool,
}

impl<C: Connector> Volume<C> {
    /// Waits up to `wait` for a usable path, then reads the LU's geometry.
    pub async fn open(mp: Multipath<C>, wait: Duration) -> Result<Volume<C>, VolumeError> {
        if !mp.wait_usable(wait).await {
            return Err(VolumeError::Path(MultipathError::NoPath {
                target: mp.config().target.clone(),
                waited: wait,
                paths: mp.view().paths.iter().map(path_line).collect::<Vec<_>>().join(", "),
            }));
        }
        let lun = mp.config().lun;
        let data_in = |cdb: Vec<u8>, len: u32| Request {
            lun,
            cdb,
            data_out: None,
            data_in_len: len,
        };
        let reply = mp.execute(data_in(scsi::read_capacity16(), 32)).await?;
        if reply.status != status::GOOD {
            return Err(VolumeError::from_reply("READ CAPACITY (16)", reply));
        }
        let capacity = Capacity::parse(&reply.data).map_err(|e| VolumeError::Invalid(e.to_string()))?;
        // Optional pages: a target without them gets the defaults.
        let page = |p: u8| data_in(scsi::inquiry(Some(p), 255), 255);
        let limits = match mp.execute(page(0xb0)).await? {
            r if r.status == status::GOOD => BlockLimits::parse(&r.data).unwrap_or_default(),
            _ => BlockLimits::default(),
        };
        let provisioning = match mp.execute(page(0xb2)).await? {
            r if r.status == status::GOOD && capacity.lbpme => Provisioning::parse(&r.data).unwrap_or_default(),
            _ => Provisioning::default(),
        };
        info!(
            target = %mp.config().target, lun, blocks = capacity.blocks, block_size = capacity.block_size,
            max_transfer = limits.max_transfer, unmap = provisioning.unmap, "volume opened"
        );
        Ok(Volume {
            mp,
            lun,
            capacity,
            limits,
            provisioning,
            write_same: AtomicBool::new(true),
        })
    }

    pub fn multipath(&self) -> &Multipath<C> {
        &self.mp
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.capacity.bytes()
    }

    pub fn block_size(&self) -> u32 {
        self.capacity.block_size
    }

    pub fn capacity(&self) -> Capacity {
        self.capacity
    }

    /// Blocks per SCSI command for reads and writes.
    fn chunk_blocks(&self) -> u64 {
        let bs = u64::from(self.capacity.block_size);
        let mut n = MAX_CHUNK_BYTES / bs;
        if self.limits.max_transfer > 0 {
            n = n.min(u64::from(self.limits.max_transfer));
        }
        n.max(1)
    }

    /// Checks alignment and range; returns (first LBA, blocks).
    fn extent(&self, offset: u64, len: u64) -> Result<(u64, u64), VolumeError> {
        let bs = u64::from(self.capacity.block_size);
        if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
            return Err(VolumeError::Invalid(format!(
                "offset {offset} and length {len} must be multiples of the block size {bs}"
            )));
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok((offset / bs, len / bs)),
            _ => Err(VolumeError::Invalid(format!(
                "{len} bytes at {offset} run past the end ({})",
                self.size()
            ))),
        }
    }

    async fn run(&self, what: &'static str, req: Request) -> Result<Bytes, VolumeError> {
        let reply = self.mp.execute(req).await?;
        if reply.status == status::GOOD {
            Ok(reply.data)
        } else {
            Err(VolumeError::from_reply(what, reply))
        }
    }

    pub async fn read(&self, offset: u64, len: u64) -> Result<Bytes, VolumeError> {
        let (lba, blocks) = self.extent(offset, len)?;
        let bs = u64::from(self.capacity.block_size);
        let chunk = self.chunk_blocks();
        if blocks <= chunk {
            return self.read_blocks(lba, blocks, bs).await;
        }
        let mut out = BytesMut::with_capacity(len as usize);
        let mut at = 0;
        while at < blocks {
            let n = chunk.min(blocks - at);
            out.extend_from_slice(&self.read_blocks(lba + at, n, bs).await?);
            at += n;
        }
        Ok(out.freeze())
    }

    async fn read_blocks(&self, lba: u64, blocks: u64, bs: u64) -> Result<Bytes, VolumeError> {
        let len = (blocks * bs) as u32;
        let req = Request {
            lun: self.lun,
            cdb: scsi::read16(lba, blocks as u32),
            data_out: None,
            data_in_len: len,
        };
        let data = self.run("READ (16)", req).await?;
        if data.len() != len as usize {
            return Err(VolumeError::Invalid(format!(
                "READ (16) returned {} of {len} bytes",
                data.len()
            )));
        }
        Ok(data)
    }

    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), VolumeError> {
        let (lba, blocks) = self.extent(offset, data.len() as u64)?;
        let bs = u64::from(self.capacity.block_size);
        let chunk = self.chunk_blocks();
        let mut at = 0;
        while at < blocks {
            let n = chunk.min(blocks - at);
            let piece = data.slice((at * bs) as usize..((at + n) * bs) as usize);
            let req = Request {
                lun: self.lun,
                cdb: scsi::write16(lba + at, n as u32, fua),
                data_out: Some(piece),
                data_in_len: 0,
            };
            self.run("WRITE (16)", req).await?;
            at += n;
        }
        Ok(())
    }

    pub async fn flush(&self) -> Result<(), VolumeError> {
        let req = Request {
            lun: self.lun,
            cdb: scsi::synchronize_cache16(),
            data_out: None,
            data_in_len: 0,
        };
        self.run("SYNCHRONIZE CACHE (16)", req).await.map(drop)
    }

    /// Unmaps the range when the LU supports UNMAP; otherwise does nothing (a hint).
    pub async fn trim(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        let (lba, blocks) = self.extent(offset, len)?;
        if !self.provisioning.unmap {
            return Ok(());
        }
        let max = match self.limits.max_unmap_blocks {
            0 | u32::MAX => u64::from(u32::MAX),
            m => u64::from(m),
        };
        let mut at = 0;
        while at < blocks {
            let n = max.min(blocks - at);
            let (cdb, list) = scsi::unmap(lba + at, n as u32);
            let req = Request {
                lun: self.lun,
                cdb,
                data_out: Some(Bytes::from(list)),
                data_in_len: 0,
            };
            self.run("UNMAP", req).await?;
            at += n;
        }
        Ok(())
    }

    /// Writes zeros (WRITE SAME of a zero block, or plain writes when the LU refuses WRITE SAME).
    pub async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), VolumeError> {
        let (lba, blocks) = self.extent(offset, len)?;
        let bs = u64::from(self.capacity.block_size);
        if self.write_same.load(Ordering::Relaxed) {
            // WRITE SAME's transfer length is 32 bits; keep each command to 1 GiB of blocks.
            let per = ((1u64 << 30) / bs).max(1);
            let mut at = 0;
            while at < blocks {
                let n = per.min(blocks - at);
                let req = Request {
                    lun: self.lun,
                    cdb: scsi::write_same16(lba + at, n as u32),
                    data_out: Some(Bytes::from(vec![0u8; bs as usize])),
                    data_in_len: 0,
                };
                match self.run("WRITE SAME (16)", req).await {
                    Ok(_) => at += n,
                    Err(VolumeError::Scsi {
                        sense_key: Some(key::ILLEGAL_REQUEST),
                        detail,
                        ..
                    }) if at == 0 => {
                        warn!(detail, "the LU refuses WRITE SAME (16); writing zeros instead");
                        self.write_same.store(false, Ordering::Relaxed);
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            if self.write_same.load(Ordering::Relaxed) {
                if fua {
                    self.flush().await?;
                }
                return Ok(());
            }
        }
        let chunk = self.chunk_blocks().min((1 << 20) / bs).max(1);
        let mut at = 0;
        while at < blocks {
            let n = chunk.min(blocks - at);
            self.write((lba + at) * bs, Bytes::from(vec![0u8; (n * bs) as usize]), fua)
                .await?;
            at += n;
        }
        Ok(())
    }
}

fn path_line(p: &crate::multipath::PathView) -> String {
    match &p.last_error {
        Some(e) => format!("{} {} ({e})", p.portal, p.status),
        None => format!("{} {}", p.portal, p.status),
    }
}

impl From<VolumeError> for DeviceError {
    fn from(e: VolumeError) -> DeviceError {
        match e {
            VolumeError::Path(p) => DeviceError::Unavailable(p.to_string()),
            VolumeError::Invalid(m) => DeviceError::Invalid(m),
            VolumeError::Scsi {
                sense_key: Some(key::ILLEGAL_REQUEST),
                ..
            } => DeviceError::Invalid(e.to_string()),
            VolumeError::Scsi { .. } => DeviceError::Io(e.to_string()),
        }
    }
}

/// The NBD export's view of the volume.
impl<C: Connector> BlockDevice for Volume<C> {
    fn size(&self) -> u64 {
        Volume::size(self)
    }

    fn block_size(&self) -> u32 {
        Volume::block_size(self)
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, DeviceError> {
        Ok(Volume::read(self, offset, u64::from(len)).await?)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), DeviceError> {
        Ok(Volume::write(self, offset, data, fua).await?)
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        Ok(Volume::flush(self).await?)
    }

    async fn trim(&self, offset: u64, len: u32) -> Result<(), DeviceError> {
        Ok(Volume::trim(self, offset, u64::from(len)).await?)
    }

    async fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> Result<(), DeviceError> {
        Ok(Volume::write_zeroes(self, offset, u64::from(len), fua).await?)
    }
}
