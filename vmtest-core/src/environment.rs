//! Which environment variables a guest command gets.
//!
//! The rules, applied in this order:
//! 1. Start from the host environment, or from nothing with `clear`.
//! 2. Drop [`HOST_ONLY_VARS`]: they name host sockets and sessions the guest cannot reach.
//! 3. Drop every name in `unset`.
//! 4. Copy every name in `pass` from the host (useful after `clear`).
//! 5. Set every `NAME=VALUE` in `set`.

use std::ffi::{OsStr, OsString};

/// Variables dropped by default: each points at a host-side socket, display or session that
/// does not exist inside the VM. Pass one explicitly (`--env NAME`) to keep it anyway.
pub const HOST_ONLY_VARS: &[&str] =
    &["SSH_AUTH_SOCK", "DBUS_SESSION_BUS_ADDRESS", "DISPLAY", "WAYLAND_DISPLAY", "XDG_RUNTIME_DIR"];

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnvRules {
    pub clear: bool,
    pub unset: Vec<OsString>,
    pub pass: Vec<OsString>,
    pub set: Vec<(OsString, OsString)>,
}

impl EnvRules {
    /// Parse one `--env` argument: `NAME=VALUE` sets, a bare `NAME` passes the host's value.
    pub fn add_env_arg(&mut self, arg: &OsStr) {
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(arg);
        match bytes.iter().position(|b| *b == b'=') {
            Some(i) => {
                use std::os::unix::ffi::OsStrExt;
                self.set
                    .push((OsStr::from_bytes(&bytes[..i]).into(), OsStr::from_bytes(&bytes[i + 1..]).into()));
            }
            None => self.pass.push(arg.into()),
        }
    }

    /// The guest environment for this host environment.
    pub fn apply<I>(&self, host: I) -> Vec<(OsString, OsString)>
    where
        I: IntoIterator<Item = (OsString, OsString)>,
    {
        let host: Vec<(OsString, OsString)> = host.into_iter().collect();
        let mut env: Vec<(OsString, OsString)> = if self.clear {
            Vec::new()
        } else {
            host.iter()
                .filter(|(k, _)| !HOST_ONLY_VARS.iter().any(|h| k == h))
                .filter(|(k, _)| !self.unset.contains(k))
                .cloned()
                .collect()
        };
        let mut put = |k: &OsString, v: &OsString| match env.iter_mut().find(|(ek, _)| ek == k) {
            Some(slot) => slot.1 = v.clone(),
            None => env.push((k.clone(), v.clone())),
        };
        for name in &self.pass {
            if let Some((k, v)) = host.iter().find(|(k, _)| k == name) {
                put(k, v);
            }
        }
        for (k, v) in &self.set {
            put(k, v);
        }
        env
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Vec<(OsString, OsString)> {
        [("PATH", "/bin"), ("HOME", "/root"), ("SSH_AUTH_SOCK", "/run/ssh"), ("SECRET", "x")]
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect()
    }

    fn get(env: &[(OsString, OsString)], k: &str) -> Option<String> {
        env.iter().find(|(ek, _)| ek == k).map(|(_, v)| v.to_string_lossy().into_owned())
    }

    #[test]
    fn default_passes_all_but_host_only_sockets() {
        let env = EnvRules::default().apply(host());
        assert_eq!(get(&env, "PATH").as_deref(), Some("/bin"));
        assert_eq!(get(&env, "SECRET").as_deref(), Some("x"));
        assert_eq!(get(&env, "SSH_AUTH_SOCK"), None);
    }

    #[test]
    fn clear_then_pass_and_set() {
        let mut rules = EnvRules { clear: true, ..Default::default() };
        rules.add_env_arg(OsStr::new("PATH"));
        rules.add_env_arg(OsStr::new("SSH_AUTH_SOCK"));
        rules.add_env_arg(OsStr::new("A=b=c"));
        let env = rules.apply(host());
        assert_eq!(env.len(), 3);
        assert_eq!(get(&env, "SSH_AUTH_SOCK").as_deref(), Some("/run/ssh"));
        assert_eq!(get(&env, "A").as_deref(), Some("b=c"));
    }

    #[test]
    fn unset_and_override() {
        let rules = EnvRules {
            unset: vec!["SECRET".into()],
            set: vec![("HOME".into(), "/home/x".into())],
            ..Default::default()
        };
        let env = rules.apply(host());
        assert_eq!(get(&env, "SECRET"), None);
        assert_eq!(get(&env, "HOME").as_deref(), Some("/home/x"));
    }
}
