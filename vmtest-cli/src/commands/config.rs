//! `vmtest config`: the effective settings of `vmtest run` and where each came from.

use crate::cli::ConfigArgs;
use serde_json::{json, Value};
use vmtest_core::config::{self, EnvRule, Source, Val};
use vmtest_core::{Error, Result};

pub fn config(args: ConfigArgs) -> Result<i32> {
    let cwd = std::env::current_dir().map_err(|e| {
        Error::usage(format!("cannot read the current directory: {e}; cd to an existing directory"))
    })?;
    let eff = config::resolve(&args.settings.flags(&args.command_args), &config::process_env, &cwd)?;
    // Values are checked as `vmtest run` would, so a bad one fails here too.
    eff.vm_spec()?;
    if let Some(t) = &eff.timeout.value {
        config::blame(vmtest_core::spec::parse_duration(t), &eff.timeout.source)?;
    }
    let keep = |k: vmtest_core::runner::KeepPolicy| serde_json::to_value(k).unwrap_or(Value::Null);
    let rows: Vec<(&str, Value, &Source)> = vec![
        ("backend", json!(eff.backend.value), &eff.backend.source),
        // One kernel as a path, a matrix as a list, none as not set.
        (
            "kernel",
            match eff.kernel.value.as_slice() {
                [] => Value::Null,
                [one] => json!(one),
                many => json!(many),
            },
            &eff.kernel.source,
        ),
        ("modules", json!(eff.modules.value), &eff.modules.source),
        ("image", json!(eff.image.value), &eff.image.source),
        ("accel", json!(eff.accel.value), &eff.accel.source),
        ("cpus", json!(eff.cpus.value), &eff.cpus.source),
        ("memory", json!(eff.memory.value), &eff.memory.source),
        ("boot-timeout", json!(eff.boot_timeout.value), &eff.boot_timeout.source),
        ("timeout", json!(eff.timeout.value), &eff.timeout.source),
        ("kernel-args", json!(eff.kernel_args.value), &eff.kernel_args.source),
        ("keep", keep(eff.keep.value), &eff.keep.source),
        (
            "kernel-warnings",
            serde_json::to_value(eff.kernel_warnings.value).unwrap_or(Value::Null),
            &eff.kernel_warnings.source,
        ),
        ("max-vms", json!(eff.max_vms.value), &eff.max_vms.source),
    ];
    if args.json {
        let settings: serde_json::Map<String, Value> = rows
            .iter()
            .map(|(k, v, s)| ((*k).to_owned(), json!({"value": v, "source": s.to_string()})))
            .collect();
        let env: Vec<Value> = eff
            .env
            .iter()
            .map(|(r, s)| {
                let (rule, name, value) = match r {
                    EnvRule::Clear => ("clear", None, None),
                    EnvRule::Pass(n) => ("pass", Some(n), None),
                    EnvRule::Unset(n) => ("unset", Some(n), None),
                    EnvRule::Set(n, v) => ("set", Some(n), Some(v)),
                };
                json!({"rule": rule, "name": name, "value": value, "source": s.to_string()})
            })
            .collect();
        let out = json!({
            "config_file": eff.file,
            "target": eff.target.as_ref().map(|t| json!({"value": t.value, "source": t.source.to_string()})),
            "settings": settings,
            "env": env,
        });
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        return Ok(0);
    }

    let mut out = String::new();
    match &eff.file {
        Some(p) => out.push_str(&format!("# config file: {}\n", p.display())),
        None => out.push_str(&format!(
            "# config file: none ({} not found in {} or above)\n",
            config::FILE_NAME,
            cwd.display()
        )),
    }
    if let Some(Val { value, source }) = &eff.target {
        out.push_str(&format!("# target: {value} (from {source})\n"));
    }
    let lines: Vec<(String, &Source)> = rows
        .iter()
        .map(|(k, v, s)| match v {
            Value::Null => (format!("# {k} is not set"), *s),
            v => (format!("{k} = {}", toml_value(v)), *s),
        })
        .collect();
    let width = lines.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
    for (l, s) in &lines {
        out.push_str(&format!("{l:width$}  # {s}\n"));
    }
    out.push_str("\n[env]  # applied in this order to the host environment minus host-only variables\n");
    if eff.env.is_empty() {
        out.push_str("# no rules: the guest gets the host environment\n");
    }
    let env_lines: Vec<(String, &Source)> = eff
        .env
        .iter()
        .map(|(r, s)| {
            let l = match r {
                EnvRule::Clear => "clear = true".to_owned(),
                EnvRule::Pass(n) => format!("pass = [{}]", toml_value(&json!(n))),
                EnvRule::Unset(n) => format!("unset = [{}]", toml_value(&json!(n))),
                EnvRule::Set(n, v) => format!("set.{} = {}", toml_key(n), toml_value(&json!(v))),
            };
            (l, s)
        })
        .collect();
    let width = env_lines.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
    for (l, s) in &env_lines {
        out.push_str(&format!("{l:width$}  # {s}\n"));
    }
    print!("{out}");
    Ok(0)
}

fn toml_value(v: &Value) -> String {
    match v {
        // JSON string escapes are valid TOML basic-string escapes.
        Value::String(_) | Value::Number(_) | Value::Bool(_) => v.to_string(),
        other => other.to_string(),
    }
}

fn toml_key(k: &str) -> String {
    if !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        k.to_owned()
    } else {
        json!(k).to_string()
    }
}
