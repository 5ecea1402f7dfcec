//! Random hex strings (run ids, nonces) from the OS's random source, on every host OS.

/// `n` random bytes as `2n` lowercase hex digits. The OS source (the `getrandom` crate:
/// getrandom(2), getentropy(2) on macOS, ...) is used; should it fail, the time and the pid
/// still make the value unlikely to repeat.
pub fn hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    if getrandom::fill(&mut bytes).is_err() {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let seed = (t.as_nanos() as u64) ^ u64::from(std::process::id()).rotate_left(32);
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (seed.rotate_left(8 * (i as u32 % 8)) & 0xff) as u8;
        }
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_has_the_asked_length_and_differs_between_calls() {
        let a = super::hex(6);
        assert_eq!(a.len(), 12);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()), "{a}");
        assert_ne!(a, super::hex(6));
    }
}
