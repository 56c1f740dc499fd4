//! MurmurHash3 (x86, 32-bit), the hash Feast names its Redis fields with and scikit-learn's
//! FeatureHasher buckets strings with; both use seed 0.

/// MurmurHash3_x86_32 of `data` with `seed`.
pub fn murmur3_32(data: &[u8], seed: u32) -> u32 {
    const C1: u32 = 0xcc9e_2d51;
    const C2: u32 = 0x1b87_3593;
    let mut h = seed;
    let mut blocks = data.chunks_exact(4);
    for b in &mut blocks {
        let mut k = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        h ^= k;
        h = h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
    }
    let tail = blocks.remainder();
    if !tail.is_empty() {
        let mut k = 0u32;
        for (i, &b) in tail.iter().enumerate() {
            k |= u32::from(b) << (8 * i);
        }
        h ^= k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    }
    h ^= data.len() as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_published_vectors() {
        // Feast's field names (test vectors in its test suite) and the reference test values.
        assert_eq!(
            murmur3_32(b"feature_view_1:feature_10", 0).to_le_bytes(),
            *b"&m_9"
        );
        assert_eq!(
            murmur3_32(b"feature_view_1:feature_11", 0).to_le_bytes(),
            [0xc3, 0x37, 0x9a, 0xbf]
        );
        assert_eq!(
            murmur3_32(b"feature_view_1:feature_12", 0).to_le_bytes(),
            [0x77, 0x72, 0xb5, 0x64]
        );
        assert_eq!(
            murmur3_32(b"test", 0).to_le_bytes(),
            [0x13, 0xd2, 0x6b, 0xba]
        );
        assert_eq!(murmur3_32(b"", 0), 0);
        assert_eq!(murmur3_32(b"", 1), 0x514e_28b7);
    }
}
