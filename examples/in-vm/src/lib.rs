//! Run through `vmtest run --` as a cargo runner; see tests/in_vm.rs.
