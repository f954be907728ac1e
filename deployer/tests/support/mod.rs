//! What the deployer's end-to-end tests share: the repository root and a runner for
//! the real `deployer` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root (for ansible/ and the zones).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

/// dig, through a load balancer, gets www.example.test's records.
pub fn assert_answers_through(dns: std::net::SocketAddr) {
    let out = Command::new("dig")
        .args([
            "@127.0.0.1",
            "-p",
            &dns.port().to_string(),
            "+short",
            "www.example.test.",
        ])
        .output()
        .expect("dig is installed");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("192.0.2.20"), "dig through {dns}: {text}");
}

/// Runs `deployer --config <config>` with extra environment; output must never
/// contain `secret`.
pub struct Cli {
    /// The config file.
    pub config: PathBuf,
    /// Extra environment variables.
    pub env: Vec<(&'static str, String)>,
    /// A string no output may contain (an API token).
    pub secret: Option<&'static str>,
}

impl Cli {
    /// The command, ready to spawn.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_deployer"));
        c.arg("--config").arg(&self.config).args(args);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// Runs to completion; checks the secret never shows.
    pub fn run(&self, args: &[&str]) -> Output {
        let out = self.cmd(args).output().unwrap();
        if let Some(secret) = self.secret {
            let all = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                !all.contains(secret),
                "secret leaked in the output of {args:?}"
            );
        }
        out
    }

    /// Runs and requires success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "deployer {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }
}
