//! The unit checksum: xxh3-64 over the xxh3-64 digests of fixed 4 MiB chunks.
//!
//! Hashing per chunk lets every I/O worker verify the chunk it just read, in parallel,
//! instead of one thread hashing a whole 400 MB layer after the fact.

use xxhash_rust::xxh3::{xxh3_64, Xxh3};

/// Chunk size of the checksum, in bytes. I/O chunks are multiples of it.
pub const CHECKSUM_CHUNK: u64 = 4 << 20;

/// Combine the digests of consecutive chunks into the unit checksum.
pub fn combine(chunk_digests: &[u64]) -> u64 {
    let mut bytes = Vec::with_capacity(chunk_digests.len() * 8);
    for d in chunk_digests {
        bytes.extend_from_slice(&d.to_le_bytes());
    }
    xxh3_64(&bytes)
}

/// The checksum of `data` as a store records it.
pub fn chunked_checksum(data: &[u8]) -> u64 {
    let digests: Vec<u64> = data.chunks(CHECKSUM_CHUNK as usize).map(xxh3_64).collect();
    combine(&digests)
}

/// Streaming form of [`chunked_checksum`], for writers that see the data piece by piece.
#[derive(Clone)]
pub struct ChunkedHasher {
    current: Xxh3,
    in_chunk: u64,
    digests: Vec<u64>,
}

impl Default for ChunkedHasher {
    fn default() -> Self {
        Self {
            current: Xxh3::new(),
            in_chunk: 0,
            digests: Vec::new(),
        }
    }
}

impl ChunkedHasher {
    /// Feed the next bytes.
    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let room = (CHECKSUM_CHUNK - self.in_chunk) as usize;
            let take = room.min(data.len());
            self.current.update(&data[..take]);
            self.in_chunk += take as u64;
            data = &data[take..];
            if self.in_chunk == CHECKSUM_CHUNK {
                self.digests.push(self.current.digest());
                self.current = Xxh3::new();
                self.in_chunk = 0;
            }
        }
    }

    /// The checksum of everything fed so far.
    pub fn finish(mut self) -> u64 {
        if self.in_chunk > 0 {
            self.digests.push(self.current.digest());
        }
        combine(&self.digests)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_matches_one_shot_across_chunk_boundaries() {
        let data: Vec<u8> = (0..(CHECKSUM_CHUNK as usize * 2 + 123))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let mut h = ChunkedHasher::default();
        for piece in data.chunks(1_000_003) {
            h.update(piece);
        }
        assert_eq!(h.finish(), chunked_checksum(&data));
        assert_ne!(chunked_checksum(&data[1..]), chunked_checksum(&data));
    }
}
