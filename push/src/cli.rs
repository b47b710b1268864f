//! The command-line flags of the push sender, shared by `parley up` and
//! (in a cluster) the push sender's own process. Key files are read from
//! paths (in Kubernetes, a Secret mounted as files); the webhook's secret
//! is best given in the environment (`PARLEY_PUSH_WEBHOOK_SECRET`), where
//! `ps` does not show it.

use std::path::PathBuf;
use std::time::Duration;

use crate::ProvidersConfig;
use crate::apns::{self, ApnsConfig};
use crate::fcm::{self, FcmConfig};
use crate::webhook::WebhookConfig;

/// Where notifications go. Registrations for a provider with nothing
/// configured are counted (`outcome="unconfigured"`) and not sent.
#[derive(clap::Args, Clone, Default)]
pub struct PushArgs {
    /// APNs: the team's .p8 key file (PKCS#8 PEM). With --apns-key-id and
    /// --apns-team-id, notifications for APNS registrations go to Apple.
    #[arg(long, env = "PARLEY_APNS_KEY_FILE")]
    pub apns_key_file: Option<PathBuf>,
    /// APNs: the key's 10-character id.
    #[arg(long, env = "PARLEY_APNS_KEY_ID")]
    pub apns_key_id: Option<String>,
    /// APNs: the team's 10-character id.
    #[arg(long, env = "PARLEY_APNS_TEAM_ID")]
    pub apns_team_id: Option<String>,
    /// APNs: "production", "sandbox" (apps built for development), or a
    /// URL (a stand-in; http:// speaks HTTP/2 without TLS).
    #[arg(long, env = "PARLEY_APNS_ENDPOINT", default_value = "production")]
    pub apns_endpoint: String,
    /// FCM: a service account's key file (JSON, from the Firebase
    /// console); notifications for FCM registrations go to its project.
    #[arg(long, env = "PARLEY_FCM_CREDENTIALS_FILE")]
    pub fcm_credentials_file: Option<PathBuf>,
    /// FCM: where the API is (a stand-in's URL in tests).
    #[arg(long, env = "PARLEY_FCM_ENDPOINT", default_value = fcm::ENDPOINT)]
    pub fcm_endpoint: String,
    /// The app's push webhook: notifications for WEBHOOK registrations are
    /// POSTed there, signed as Standard Webhooks says (docs/operations.md).
    #[arg(long, env = "PARLEY_PUSH_WEBHOOK_URL", hide_env_values = true)]
    pub push_webhook_url: Option<String>,
    /// The webhook's signing secret: whsec_ and base64, or any string of at
    /// least 24 bytes.
    #[arg(long, env = "PARLEY_PUSH_WEBHOOK_SECRET", hide_env_values = true)]
    pub push_webhook_secret: Option<String>,
    /// The longest one request to a provider may take, in seconds.
    #[arg(long, env = "PARLEY_PUSH_TIMEOUT_SECS", default_value_t = 10)]
    pub push_timeout_secs: u64,
}

impl std::fmt::Debug for PushArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret, nor a URL's credentials.
        f.debug_struct("PushArgs")
            .field("apns_key_file", &self.apns_key_file)
            .field("apns_endpoint", &self.apns_endpoint)
            .field("fcm_credentials_file", &self.fcm_credentials_file)
            .field("fcm_endpoint", &self.fcm_endpoint)
            .field(
                "push_webhook_url",
                &self
                    .push_webhook_url
                    .as_deref()
                    .map(parley_core::redact_urls),
            )
            .finish_non_exhaustive()
    }
}

fn read(path: &PathBuf, what: &str) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map_err(|e| format!("{what} {} cannot be read: {e}", path.display()))
}

impl PushArgs {
    /// The providers these flags configure.
    pub fn providers(&self) -> Result<ProvidersConfig, String> {
        let timeout = Duration::from_secs(self.push_timeout_secs.max(1));
        let apns = match (&self.apns_key_file, &self.apns_key_id, &self.apns_team_id) {
            (None, None, None) => None,
            (Some(file), Some(key_id), Some(team_id)) => Some(ApnsConfig {
                key_pem: read(file, "--apns-key-file")?,
                key_id: key_id.clone(),
                team_id: team_id.clone(),
                endpoint: match self.apns_endpoint.as_str() {
                    "production" => apns::PRODUCTION.to_owned(),
                    "sandbox" => apns::SANDBOX.to_owned(),
                    url => url.to_owned(),
                },
                timeout,
            }),
            _ => {
                return Err(
                    "--apns-key-file, --apns-key-id and --apns-team-id go together".to_owned(),
                );
            }
        };
        let fcm = match &self.fcm_credentials_file {
            None => None,
            Some(file) => Some(FcmConfig {
                service_account: read(file, "--fcm-credentials-file")?,
                endpoint: self.fcm_endpoint.clone(),
                timeout,
            }),
        };
        let webhook = match (&self.push_webhook_url, &self.push_webhook_secret) {
            (None, None) => None,
            (Some(url), Some(secret)) => Some(WebhookConfig {
                url: url.clone(),
                secret: secret.clone(),
                timeout,
            }),
            _ => {
                return Err("--push-webhook-url and --push-webhook-secret go together".to_owned());
            }
        };
        Ok(ProvidersConfig { apns, fcm, webhook })
    }
}
