//! The chunk journal of a received snapshot.
//!
//! A follower that receives a snapshot does not overwrite its image while the stream runs (a
//! crash would leave a mix of old and new bytes that no log replay can repair). The receiver
//! writes the chunks that differ from its own file into a journal, makes it durable, and the state
//! machine lays the journal over its file only after the whole snapshot arrived; laying it over
//! again after a crash is harmless (redo log).
//!
//! ```text
//! header   "RSJN" u32 LE version (1)
//! chunk    u64 LE offset, u32 LE len (1..=MAX_CHUNK), u32 LE CRC-32C of data, data
//! ...
//! trailer  u64 LE u64::MAX, u32 LE 0, u32 LE CRC-32C of the trailer body, then the body:
//!          u64 LE final file size, u64 LE chunk count
//! ```
//!
//! A journal without its trailer (the stream broke, or the writer crashed) is refused.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"RSJN";
const VERSION: u32 = 1;
/// Largest chunk a journal holds.
pub const MAX_CHUNK: u32 = 16 << 20;
const TRAILER_OFFSET: u64 = u64::MAX;

fn invalid(path: &Path, msg: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("snapshot journal {}: {msg}", path.display()),
    )
}

/// Writes a journal; nothing is valid until [`JournalWriter::finish`] returns.
pub struct JournalWriter {
    path: PathBuf,
    out: BufWriter<File>,
    chunks: u64,
}

impl JournalWriter {
    /// Creates (truncates) the journal at `path`.
    pub fn create(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut out = BufWriter::with_capacity(1 << 20, File::create(&path)?);
        out.write_all(MAGIC)?;
        out.write_all(&VERSION.to_le_bytes())?;
        Ok(JournalWriter { path, out, chunks: 0 })
    }

    /// Appends one chunk: `data` belongs at byte `offset` of the file.
    pub fn append(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        if data.is_empty() || data.len() > MAX_CHUNK as usize || offset == TRAILER_OFFSET {
            return Err(invalid(
                &self.path,
                format!("chunk of {} bytes at {offset} refused", data.len()),
            ));
        }
        self.out.write_all(&offset.to_le_bytes())?;
        self.out.write_all(&(data.len() as u32).to_le_bytes())?;
        self.out.write_all(&crc32c::crc32c(data).to_le_bytes())?;
        self.out.write_all(data)?;
        self.chunks += 1;
        Ok(())
    }

    /// Chunks appended so far.
    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    /// Writes the trailer and fsyncs: the journal is complete and durable.
    pub fn finish(mut self, size_bytes: u64) -> io::Result<PathBuf> {
        let mut body = Vec::with_capacity(16);
        body.extend_from_slice(&size_bytes.to_le_bytes());
        body.extend_from_slice(&self.chunks.to_le_bytes());
        self.out.write_all(&TRAILER_OFFSET.to_le_bytes())?;
        self.out.write_all(&0u32.to_le_bytes())?;
        self.out.write_all(&crc32c::crc32c(&body).to_le_bytes())?;
        self.out.write_all(&body)?;
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(self.path)
    }
}

/// Reads a complete journal chunk by chunk.
pub struct JournalReader {
    path: PathBuf,
    input: BufReader<File>,
    done: bool,
    chunks: u64,
    /// Final file size, known once the trailer was read.
    size_bytes: Option<u64>,
}

impl JournalReader {
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut input = BufReader::with_capacity(1 << 20, File::open(&path)?);
        let mut head = [0u8; 8];
        input
            .read_exact(&mut head)
            .map_err(|e| invalid(&path, format!("header: {e}")))?;
        if &head[..4] != MAGIC || u32::from_le_bytes(head[4..8].try_into().unwrap_or_default()) != VERSION {
            return Err(invalid(&path, "bad magic or version"));
        }
        Ok(JournalReader {
            path,
            input,
            done: false,
            chunks: 0,
            size_bytes: None,
        })
    }

    /// The next chunk `(offset, data)`, or None after the trailer (then [`Self::size_bytes`] is
    /// known). A truncated or corrupt journal is an `InvalidData` error.
    pub fn next_chunk(&mut self) -> io::Result<Option<(u64, Vec<u8>)>> {
        if self.done {
            return Ok(None);
        }
        let mut head = [0u8; 16];
        self.input
            .read_exact(&mut head)
            .map_err(|e| invalid(&self.path, format!("truncated after {} chunks: {e}", self.chunks)))?;
        let offset = u64::from_le_bytes(head[..8].try_into().unwrap_or_default());
        let len = u32::from_le_bytes(head[8..12].try_into().unwrap_or_default());
        let crc = u32::from_le_bytes(head[12..16].try_into().unwrap_or_default());
        if offset == TRAILER_OFFSET {
            let mut body = [0u8; 16];
            self.input
                .read_exact(&mut body)
                .map_err(|e| invalid(&self.path, format!("truncated trailer: {e}")))?;
            if len != 0 || crc32c::crc32c(&body) != crc {
                return Err(invalid(&self.path, "corrupt trailer"));
            }
            let size = u64::from_le_bytes(body[..8].try_into().unwrap_or_default());
            let count = u64::from_le_bytes(body[8..].try_into().unwrap_or_default());
            if count != self.chunks {
                return Err(invalid(
                    &self.path,
                    format!("trailer says {count} chunks, found {}", self.chunks),
                ));
            }
            self.size_bytes = Some(size);
            self.done = true;
            return Ok(None);
        }
        if len == 0 || len > MAX_CHUNK {
            return Err(invalid(&self.path, format!("chunk {} has length {len}", self.chunks)));
        }
        let mut data = vec![0u8; len as usize];
        self.input
            .read_exact(&mut data)
            .map_err(|e| invalid(&self.path, format!("truncated chunk {}: {e}", self.chunks)))?;
        if crc32c::crc32c(&data) != crc {
            return Err(invalid(
                &self.path,
                format!("chunk {} at {offset}: checksum mismatch", self.chunks),
            ));
        }
        self.chunks += 1;
        Ok(Some((offset, data)))
    }

    /// The file size the journal ends with (after the last chunk was read).
    pub fn size_bytes(&self) -> Option<u64> {
        self.size_bytes
    }

    /// Reads the whole journal once to check it is complete and intact; returns the final size.
    pub fn verify(path: impl AsRef<Path>) -> io::Result<u64> {
        let mut r = Self::open(path)?;
        while r.next_chunk()?.is_some() {}
        r.size_bytes.ok_or_else(|| invalid(&r.path, "no trailer"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let mut w = JournalWriter::create(&p).unwrap();
        w.append(0, b"hello").unwrap();
        w.append(1 << 20, &[7u8; 4096]).unwrap();
        assert!(w.append(5, b"").is_err());
        w.finish(2 << 20).unwrap();
        assert_eq!(JournalReader::verify(&p).unwrap(), 2 << 20);
        let mut r = JournalReader::open(&p).unwrap();
        assert_eq!(r.next_chunk().unwrap(), Some((0, b"hello".to_vec())));
        assert_eq!(r.next_chunk().unwrap(), Some((1 << 20, vec![7u8; 4096])));
        assert_eq!(r.next_chunk().unwrap(), None);
        assert_eq!(r.size_bytes(), Some(2 << 20));

        // A flipped data byte, and a missing trailer, are both refused.
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[8 + 16] ^= 1;
        std::fs::write(&p, &bytes).unwrap();
        assert!(JournalReader::verify(&p).is_err());
        bytes[8 + 16] ^= 1;
        bytes.truncate(bytes.len() - 10);
        std::fs::write(&p, &bytes).unwrap();
        assert!(JournalReader::verify(&p).is_err());
    }
}
