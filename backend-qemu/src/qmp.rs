//! A minimal QMP client: the capabilities handshake and synchronous commands, skipping
//! asynchronous events. Enough to save a guest's state (`migrate`) and stop QEMU.

use serde_json::{json, Value};
use std::path::Path;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use vmtest_core::{Error, Result};

pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Qmp {
    /// Connect, read the greeting, negotiate capabilities.
    pub async fn connect(path: &Path) -> Result<Qmp> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| Error::io(format!("cannot connect to QMP at {}", path.display()), e))?;
        let (r, w) = stream.into_split();
        let mut qmp = Qmp { reader: BufReader::new(r), writer: w };
        let greeting = qmp.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(Error::infra(format!("unexpected QMP greeting: {greeting}")));
        }
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    async fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).await.map_err(|e| Error::io("cannot read from QMP", e))?;
        if n == 0 {
            return Err(Error::infra("QEMU closed its QMP socket"));
        }
        serde_json::from_str(&line).map_err(|e| Error::infra(format!("bad QMP message {line:?}: {e}")))
    }

    /// Run a command and return its `return` value; a QMP error becomes an infra error.
    pub async fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let msg = json!({ "execute": command, "arguments": arguments });
        let mut line = msg.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes()).await.map_err(|e| Error::io("cannot write to QMP", e))?;
        loop {
            let reply = self.read_message().await?;
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                let desc = err.get("desc").and_then(Value::as_str).unwrap_or("unknown error");
                return Err(Error::infra(format!("QMP {command}: {desc}")));
            }
            // An event ({"event": ...}): not ours to answer; keep reading.
        }
    }
}
