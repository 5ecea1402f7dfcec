//! `ShellSession`: commands over any serial console (see issue 7). Not implemented yet.
