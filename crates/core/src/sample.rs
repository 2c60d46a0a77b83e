//! A small deterministic generator for sample workloads (quickstart, tests, benchmarks): the
//! same seed gives the same writes on every run and machine. Not for anything secret.

/// Xorshift64: fast, reproducible, good enough to make data incompressible.
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator from `seed` (zero is replaced, since xorshift would stay at zero).
    pub fn new(seed: u64) -> Self {
        XorShift(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Fills `buf` with pseudo-random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn same_seed_same_bytes() {
        let (mut a, mut b) = (super::XorShift::new(1), super::XorShift::new(1));
        let (mut x, mut y) = ([0u8; 13], [0u8; 13]);
        a.fill(&mut x);
        b.fill(&mut y);
        assert_eq!(x, y);
        assert_ne!(x, [0u8; 13]);
        assert_ne!(super::XorShift::new(0).next_u64(), 0);
    }
}
