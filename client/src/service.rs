//! Running ultd as a per-user service: the launchd agent (macOS) and the systemd user unit (Linux) that
//! `ultctl service install` writes, generated here as plain text so they are tested on any machine
//! (`systemd-analyze verify` on the unit, a plist parser on the agent).

use std::path::{Path, PathBuf};

/// The launchd label, also the plist's file name.
pub const LAUNCHD_LABEL: &str = "dev.ult.ultd";
/// The systemd unit's name.
pub const SYSTEMD_UNIT: &str = "ultd.service";

/// What the service runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// The ultd binary (absolute).
    pub ultd: PathBuf,
    /// models.toml (absolute).
    pub config: PathBuf,
    /// Where launchd writes ultd's log (systemd uses the journal).
    pub log: PathBuf,
}

/// The platforms a service can be written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    /// A systemd user unit.
    Systemd,
    /// A launchd agent.
    Launchd,
}

impl Platform {
    /// This machine's.
    pub fn current() -> Self {
        if cfg!(target_os = "macos") {
            Self::Launchd
        } else {
            Self::Systemd
        }
    }

    /// Where the file goes under `home` (systemd honours `$XDG_CONFIG_HOME` when given).
    pub fn file(self, home: &Path, xdg_config: Option<&Path>) -> PathBuf {
        match self {
            Self::Systemd => xdg_config
                .map_or_else(|| home.join(".config"), Path::to_path_buf)
                .join("systemd/user")
                .join(SYSTEMD_UNIT),
            Self::Launchd => home
                .join("Library/LaunchAgents")
                .join(format!("{LAUNCHD_LABEL}.plist")),
        }
    }

    /// The file's text for `spec`.
    pub fn render(self, spec: &ServiceSpec) -> String {
        match self {
            Self::Systemd => systemd_unit(spec),
            Self::Launchd => launchd_plist(spec),
        }
    }
}

/// A word of a systemd `ExecStart=` line: quoted, with `\`, `"`, `%` (specifiers) and `$` (variables)
/// escaped.
fn systemd_word(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '%' => out.push_str("%%"),
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The systemd user unit: ultd restarted on failure, stopped with SIGTERM and time for its shutdown grace,
/// its open-file limit raised for the connection caps, logging to the journal.
pub fn systemd_unit(spec: &ServiceSpec) -> String {
    format!(
        "# Written by `ultctl service install`; remove with `ultctl service uninstall`.\n\
         [Unit]\n\
         Description=ult: resident LLMs and embedding models under memory governance\n\
         After=network.target\n\
         \n\
         [Service]\n\
         Type=exec\n\
         ExecStart={} --config {}\n\
         Environment=ULT_LOG=ultd=info,warn\n\
         Restart=on-failure\n\
         RestartSec=2\n\
         KillSignal=SIGTERM\n\
         TimeoutStopSec=30\n\
         LimitNOFILE=65536\n\
         \n\
         [Install]\n\
         WantedBy=default.target\n",
        systemd_word(&spec.ultd.display().to_string()),
        systemd_word(&spec.config.display().to_string()),
    )
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

/// The launchd agent: started at login and kept alive unless it exits cleanly, interactive priority (not
/// throttled as a background job), its open-file limit raised, its output in `spec.log`.
pub fn launchd_plist(spec: &ServiceSpec) -> String {
    let s = |p: &Path| xml(&p.display().to_string());
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<!-- Written by `ultctl service install`; remove with `ultctl service uninstall`. -->
<plist version="1.0">
<dict>
  <key>Label</key>
  <string>{LAUNCHD_LABEL}</string>
  <key>ProgramArguments</key>
  <array>
    <string>{ultd}</string>
    <string>--config</string>
    <string>{config}</string>
  </array>
  <key>EnvironmentVariables</key>
  <dict>
    <key>ULT_LOG</key>
    <string>ultd=info,warn</string>
  </dict>
  <key>RunAtLoad</key>
  <true/>
  <key>KeepAlive</key>
  <dict>
    <key>SuccessfulExit</key>
    <false/>
  </dict>
  <key>ThrottleInterval</key>
  <integer>5</integer>
  <key>ExitTimeOut</key>
  <integer>30</integer>
  <key>ProcessType</key>
  <string>Interactive</string>
  <key>SoftResourceLimits</key>
  <dict>
    <key>NumberOfFiles</key>
    <integer>10240</integer>
  </dict>
  <key>StandardOutPath</key>
  <string>{log}</string>
  <key>StandardErrorPath</key>
  <string>{log}</string>
</dict>
</plist>
"#,
        ultd = s(&spec.ultd),
        config = s(&spec.config),
        log = s(&spec.log),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ServiceSpec {
        ServiceSpec {
            ultd: "/opt/ult 1/ultd".into(),
            config: "/home/a/models & more/100%$x\"q.toml".into(),
            log: "/home/a/Library/Logs/ult/ultd.log".into(),
        }
    }

    #[test]
    fn the_unit_quotes_and_escapes_its_paths() {
        let u = systemd_unit(&spec());
        assert!(
            u.contains(
                r#"ExecStart="/opt/ult 1/ultd" --config "/home/a/models & more/100%%$$x\"q.toml""#
            ),
            "{u}"
        );
        assert!(u.contains("WantedBy=default.target"));
    }

    #[test]
    fn the_agent_escapes_xml() {
        let p = launchd_plist(&spec());
        assert!(
            p.contains("<string>/home/a/models &amp; more/100%$x&quot;q.toml</string>"),
            "{p}"
        );
        assert!(p.contains(&format!("<string>{LAUNCHD_LABEL}</string>")));
    }

    #[test]
    fn files_go_where_each_platform_looks() {
        let home = Path::new("/home/a");
        assert_eq!(
            Platform::Systemd.file(home, None),
            PathBuf::from("/home/a/.config/systemd/user/ultd.service")
        );
        assert_eq!(
            Platform::Systemd.file(home, Some(Path::new("/x"))),
            PathBuf::from("/x/systemd/user/ultd.service")
        );
        assert_eq!(
            Platform::Launchd.file(home, None),
            PathBuf::from("/home/a/Library/LaunchAgents/dev.ult.ultd.plist")
        );
    }
}
