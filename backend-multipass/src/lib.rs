//! Multipass backend. Not implemented yet: see issue 6.
