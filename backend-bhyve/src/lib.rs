//! bhyve backend (FreeBSD and illumos). Not implemented yet: see issue 7.
